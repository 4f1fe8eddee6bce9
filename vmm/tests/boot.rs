//! Booting the test guest on real KVM: shapes, verdicts, and every way a VM can end.

mod common;

use common::{TIMEOUT, kvm_or_skip, test_guest, vmm};
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::Watched;

fn boot_and_verify(vcpus: u8, mem_mib: u64, ws_mib: u64) {
    let mut vm = test_guest(vcpus, mem_mib, &format!("ws={ws_mib} rate=2000 verify=300 hb=200"), None);

    let banner = vm.wait_for("the banner", TIMEOUT, |l| matches!(l.parsed, GuestLine::Banner { .. })).unwrap();
    let online = vm.wait_for("SMP online", TIMEOUT, |l| matches!(l.parsed, GuestLine::Online(_))).unwrap();
    let third = vm.wait_verified(3, TIMEOUT).unwrap();

    let GuestLine::Banner { cpus, mem_mib: seen_mem } = banner.parsed else { unreachable!() };
    assert_eq!(cpus, u64::from(vcpus));
    // The e820 map reserves the BIOS area (~0.4 MiB) below 1 MiB.
    assert!(seen_mem + 1 >= mem_mib && seen_mem <= mem_mib, "guest sees {seen_mem} MiB of {mem_mib}");
    assert_eq!(online.parsed, GuestLine::Online(u64::from(vcpus)));
    let GuestLine::VerifyOk { pages, cpus: verified_by, .. } = third.parsed else { unreachable!() };
    assert_eq!(pages, ws_mib * 256, "every page of the working set is verified");
    assert_eq!(verified_by, u64::from(vcpus), "every vCPU takes part");
    assert!(
        !vm.seen.iter().any(|l| matches!(l.parsed, GuestLine::VerifyFail { .. } | GuestLine::Trouble(_))),
        "{:?}",
        vm.seen
    );
}

#[test]
fn kvm_boot_1_vcpu_64_mib_verifies() {
    if kvm_or_skip("kvm_boot_1_vcpu_64_mib_verifies") {
        boot_and_verify(1, 64, 16);
    }
}

#[test]
fn kvm_boot_4_vcpus_64_mib_verifies() {
    if kvm_or_skip("kvm_boot_4_vcpus_64_mib_verifies") {
        boot_and_verify(4, 64, 16);
    }
}

#[test]
fn kvm_boot_1_vcpu_512_mib_verifies() {
    if kvm_or_skip("kvm_boot_1_vcpu_512_mib_verifies") {
        boot_and_verify(1, 512, 64);
    }
}

#[test]
fn kvm_boot_4_vcpus_512_mib_verifies() {
    if kvm_or_skip("kvm_boot_4_vcpus_512_mib_verifies") {
        boot_and_verify(4, 512, 64);
    }
}

#[test]
fn kvm_guest_verification_detects_a_corrupted_page() {
    if !kvm_or_skip("kvm_guest_verification_detects_a_corrupted_page") {
        return;
    }
    let mut vm = test_guest(2, 64, "ws=8 verify=200 hb=100 corrupt=2", None);

    let first = vm
        .wait_for("verdict 1", TIMEOUT, |l| {
            matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
        })
        .unwrap();
    let second = vm
        .wait_for("verdict 2", TIMEOUT, |l| {
            matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
        })
        .unwrap();

    assert!(matches!(first.parsed, GuestLine::VerifyOk { epoch: 1, .. }), "{}", first.text);
    assert_eq!(second.parsed, GuestLine::VerifyFail { epoch: 2, bad: 1 });
}

fn run_to_exit(cmdline: &str) -> (i32, String, Watched) {
    let mut vm = test_guest(2, 64, cmdline, None);
    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();
    (status.code().expect("the VMM exits, it is not killed"), stderr, vm)
}

#[test]
fn kvm_guest_power_off_ends_the_vmm_with_status_0() {
    if !kvm_or_skip("kvm_guest_power_off_ends_the_vmm_with_status_0") {
        return;
    }
    let (code, stderr, vm) = run_to_exit("ws=4 hb=50 exit=3 exitmode=poweroff");

    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(vm.heartbeats(), vec![1, 2, 3]);
    assert!(!vm.seen.iter().any(|l| l.text.contains("FAILED")), "the VMM stopped the guest before its fallback");
}

#[test]
fn kvm_guest_i8042_reset_ends_the_vmm_with_status_0() {
    if !kvm_or_skip("kvm_guest_i8042_reset_ends_the_vmm_with_status_0") {
        return;
    }
    let (code, stderr, vm) = run_to_exit("ws=4 hb=50 exit=2 exitmode=reset");

    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(vm.heartbeats(), vec![1, 2]);
}

#[test]
fn kvm_guest_triple_fault_ends_the_vmm_with_clear_error() {
    if !kvm_or_skip("kvm_guest_triple_fault_ends_the_vmm_with_clear_error") {
        return;
    }
    let (code, stderr, _vm) = run_to_exit("ws=4 hb=50 exit=1 exitmode=triplefault");

    assert_eq!(code, 2);
    assert!(stderr.contains("triple-fault"), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn kvm_file_that_is_not_a_kernel_is_refused_with_one_line() {
    if !kvm_or_skip("kvm_file_that_is_not_a_kernel_is_refused_with_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a kernel\n").unwrap();

    let out = vmm().arg("--kernel").arg(&text).output().unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("not a kernel"), "{stderr}");
    assert!(stderr.contains("notes.txt"), "the error names the file: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
}
