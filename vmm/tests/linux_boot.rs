//! Opt-in: boots Debian's cloud kernel (bzImage, Linux 64-bit boot protocol) with a
//! virtio disk and entropy device, and checks its early boot messages, up to the ACPI
//! tables that describe the devices. This host's KVM emulates guests at ~1.3 MIPS, so the kernel's
//! decompressor alone takes minutes here; on hardware virtualisation the same code boots
//! it fully. Run with:
//!
//!     cargo test -p novacron-vmm --test linux_boot -- --ignored --nocapture

mod common;

use common::{kvm_or_skip, vmm};
use novacron_guest_image::watch::Watched;
use novacron_vmm::arch::x86_64::acpi::{MmioDevice, dsdt};
use novacron_vmm::arch::x86_64::layout::{VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOT_SIZE};
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
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 nokaslr reboot=k panic=1";
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(&kernel).args(["--mem", "512", "--vcpus", "1", "--rng", "--cmdline", cmdline]);
    cmd.arg("--disk").arg(format!("path={}", disk.display()));
    // The DSDT the kernel must find: two virtio-mmio devices, in slots 0 and 1.
    let devices: Vec<MmioDevice> = (0..2u32)
        .map(|i| MmioDevice {
            base: VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SLOT_SIZE,
            size: VIRTIO_MMIO_SLOT_SIZE,
            gsi: VIRTIO_GSI_BASE + i,
        })
        .collect();
    let dsdt_line = format!("ACPI: DSDT 0x00000000000E0070 {:06X}", dsdt(&devices).len());
    let mut vm = Watched::spawn(cmd).unwrap();

    let banner = vm.wait_for("the Linux version banner", BANNER_TIMEOUT, |l| l.text.contains("Linux version")).unwrap();
    eprintln!("{}", banner.text);
    for (what, needle) in [
        ("the command line we passed", format!("Command line: {cmdline}")),
        ("our e820 map", "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".to_string()),
        ("KVM detection", "Hypervisor detected: KVM".to_string()),
        ("kvm-clock", "kvm-clock: Using msrs".to_string()),
        ("our ACPI tables", "ACPI: RSDP 0x00000000000E0000".to_string()),
        // Device discovery as far as this host's emulator lets the kernel go: it reads the
        // DSDT that describes the virtio devices (it stops soon after, in SLUB set-up, on
        // a cmpxchg16b the emulator cannot execute).
        ("the DSDT with our two virtio devices", dsdt_line),
        ("our MADT", "ACPI: APIC 0x".to_string()),
    ] {
        let line = vm.wait_for(what, LINE_TIMEOUT, |l| l.text.contains(&needle)).unwrap();
        eprintln!("{}", line.text);
    }
}
