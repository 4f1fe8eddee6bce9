//! Shared by the VMM's integration tests: the KVM gate and VM process helpers.
#![allow(dead_code)]

use novacron_guest_image::watch::Watched;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Generous: the guest runs emulated at ~1.3 MIPS on this kind of host.
pub const TIMEOUT: Duration = Duration::from_secs(90);

pub use novacron_guest_image::watch::kvm_or_skip;

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
