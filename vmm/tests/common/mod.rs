//! Shared by the VMM's integration tests: the KVM gate and VM process helpers.
#![allow(dead_code)]

use novacron_guest_image::watch::Watched;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Generous: the guest runs emulated at ~1.3 MIPS on this kind of host.
pub const TIMEOUT: Duration = Duration::from_secs(90);

/// True when /dev/kvm can be used. Otherwise says loudly that the test is skipped, or fails
/// it when NOVACRON_REQUIRE_KVM is set (CI sets it: there, KVM tests must really run).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("NOVACRON_REQUIRE_KVM").is_none(),
                "{test}: /dev/kvm is required but cannot be opened: {e}"
            );
            eprintln!("\n*** SKIPPED {test}: /dev/kvm is not usable here ({e}) ***\n");
            false
        }
    }
}

pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_novacron-vmm"))
}

/// A VMM process running the test guest with `cmdline`.
pub fn test_guest(vcpus: u8, mem_mib: u64, cmdline: &str, api_sock: Option<&Path>) -> Watched {
    let mut cmd = vmm();
    cmd.args(["--vcpus", &vcpus.to_string(), "--mem", &mem_mib.to_string(), "--cmdline", cmdline]);
    if let Some(sock) = api_sock {
        cmd.arg("--api-sock").arg(sock);
    }
    Watched::spawn(cmd).expect("the VMM binary starts")
}
