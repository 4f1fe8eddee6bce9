//! Opt-in: boots Debian's cloud kernel (bzImage, Linux 64-bit boot protocol) and checks
//! its early boot messages. This host's KVM emulates guests at ~1.3 MIPS, so the kernel's
//! decompressor alone takes minutes here; on hardware virtualisation the same code boots
//! it fully. Run with:
//!
//!     cargo test -p novacron-vmm --test linux_boot -- --ignored --nocapture

mod common;

use common::{kvm_or_skip, vmm};
use novacron_guest_image::watch::Watched;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Decompressing the 14 MB LZ4 bzImage took 3.5 minutes here.
const BANNER_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const LINE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

fn debian_kernel() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/fetch-debian-kernel");
    let out = Command::new(script).output().expect("scripts/fetch-debian-kernel runs");
    assert!(out.status.success(), "fetching the kernel failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
#[ignore = "downloads Debian's kernel and takes minutes under this host's emulated KVM"]
fn kvm_linux_bzimage_boots_to_early_kernel_messages() {
    if !kvm_or_skip("kvm_linux_bzimage_boots_to_early_kernel_messages") {
        return;
    }
    let kernel = debian_kernel();
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 nokaslr reboot=k panic=1";
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(&kernel).args(["--mem", "512", "--vcpus", "1", "--cmdline", cmdline]);
    let mut vm = Watched::spawn(cmd).unwrap();

    let banner = vm.wait_for("the Linux version banner", BANNER_TIMEOUT, |l| l.text.contains("Linux version")).unwrap();
    eprintln!("{}", banner.text);
    for (what, needle) in [
        ("the command line we passed", format!("Command line: {cmdline}")),
        ("our e820 map", "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".to_string()),
        ("KVM detection", "Hypervisor detected: KVM".to_string()),
        ("kvm-clock", "kvm-clock: Using msrs".to_string()),
        ("our ACPI tables", "ACPI: RSDP 0x00000000000E0000".to_string()),
        ("our MADT", "ACPI: APIC 0x".to_string()),
    ] {
        let line = vm.wait_for(what, LINE_TIMEOUT, |l| l.text.contains(&needle)).unwrap();
        eprintln!("{}", line.text);
    }
}
