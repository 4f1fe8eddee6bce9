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

/// The test guest's FNV-1a over 64-bit little-endian words, zero-padded.
fn word_hash(bytes: &[u8]) -> u64 {
    bytes.chunks(8).fold(0xcbf2_9ce4_8422_2325u64, |h, chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn kvm_initrd_reaches_the_pvh_guest_intact() {
    if !kvm_or_skip("kvm_initrd_reaches_the_pvh_guest_intact") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    // 100 003 bytes: not a multiple of the page or word size.
    let bytes: Vec<u8> = (0..100_003u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&initrd, &bytes).unwrap();
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--cmdline", "ws=4 hb=100 exit=1"]).arg("--initrd").arg(&initrd);
    let mut vm = Watched::spawn(cmd).unwrap();

    let line = vm.wait_for("the INITRD line", TIMEOUT, |l| l.text.starts_with("INITRD ")).unwrap();

    let expected = format!("INITRD bytes={} hash={:#x}", bytes.len(), word_hash(&bytes));
    assert_eq!(line.text, expected);
    assert_eq!(vm.wait_exit(TIMEOUT).unwrap().0.code(), Some(0));

    // initrd=skip (the migration benchmark's memory image): the size only.
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--cmdline", "ws=4 hb=100 exit=1 initrd=skip"]).arg("--initrd").arg(&initrd);
    let mut vm = Watched::spawn(cmd).unwrap();
    let line = vm.wait_for("the INITRD line", TIMEOUT, |l| l.text.starts_with("INITRD ")).unwrap();
    assert_eq!(line.text, format!("INITRD bytes={} hash=skipped", bytes.len()));
    assert_eq!(vm.wait_exit(TIMEOUT).unwrap().0.code(), Some(0));
}

#[test]
fn kvm_serial_file_receives_the_console() {
    if !kvm_or_skip("kvm_serial_file_receives_the_console") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--cmdline", "ws=4 hb=50 exit=2"]).arg("--serial-file").arg(&console);
    let mut vm = Watched::spawn(cmd).unwrap();

    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(vm.seen.is_empty(), "nothing on stdout: {:?}", vm.seen);
    let text = std::fs::read_to_string(&console).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"NOVACRON-GUEST boot"));
    assert!(lines.contains(&"HB 2"), "{text}");
}

#[test]
fn kvm_sigint_stops_the_vmm_with_status_130() {
    if !kvm_or_skip("kvm_sigint_stops_the_vmm_with_status_130") {
        return;
    }
    let mut vm = test_guest(2, 64, "ws=4 hb=50", None);
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();

    // SAFETY: sends a signal to the child we spawned and still own.
    let rc = unsafe { libc::kill(vm.child.id() as i32, libc::SIGINT) };
    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();

    assert_eq!(rc, 0);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("signal 2"), "{stderr}");
}

/// A 32-bit PVH kernel by hand: prints a line in 32-bit protected mode, then powers off
/// through the FADT's sleep control port.
fn elf32_pvh_kernel(message: &[u8]) -> Vec<u8> {
    const LOAD: u32 = 0x10_0000;
    const EHDR: usize = 52;
    const PHDR: usize = 32;
    let mut code: Vec<u8> = Vec::new();
    let code_len = 4 + 5 + 5 + 2 + 4 + 2 + 1 + 1 + 2;
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.push(0xbe); // mov esi, message
    code.extend_from_slice(&(LOAD + code_len).to_le_bytes());
    code.push(0xb9); // mov ecx, len
    code.extend_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06]); // mov dx, 0x600
    code.extend_from_slice(&[0xb0, 0x34]); // mov al, S5 | SLP_EN
    code.push(0xee); // out dx, al
    code.push(0xf4); // hlt
    code.extend_from_slice(&[0xeb, 0xfd]); // jmp hlt
    assert_eq!(code.len() as u32, code_len);
    code.extend_from_slice(message);

    let mut notes = Vec::new();
    for v in [4u32, 4, 18] {
        notes.extend_from_slice(&v.to_le_bytes());
    }
    notes.extend_from_slice(b"Xen\0");
    notes.extend_from_slice(&LOAD.to_le_bytes());
    let notes_off = EHDR + 2 * PHDR;
    let code_off = 0x1000;
    let mut f = vec![0u8; EHDR];
    f[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[24..28].copy_from_slice(&LOAD.to_le_bytes());
    f[28..32].copy_from_slice(&(EHDR as u32).to_le_bytes());
    f[42..44].copy_from_slice(&(PHDR as u16).to_le_bytes());
    f[44..46].copy_from_slice(&2u16.to_le_bytes());
    for (kind, off, addr, size) in [(1u32, code_off, LOAD, code.len()), (4, notes_off, 0, notes.len())] {
        for v in [kind, off as u32, addr, addr, size as u32, size as u32, 7, 4] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    }
    f.extend_from_slice(&notes);
    f.resize(code_off, 0);
    f.extend_from_slice(&code);
    f
}

#[test]
fn kvm_32_bit_pvh_elf_boots() {
    if !kvm_or_skip("kvm_32_bit_pvh_elf_boots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("pvh32.elf");
    std::fs::write(&kernel, elf32_pvh_kernel(b"hello from a 32-bit PVH kernel\n")).unwrap();
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(&kernel).args(["--mem", "32"]);
    let mut vm = Watched::spawn(cmd).unwrap();

    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();

    assert_eq!(status.code(), Some(0), "{stderr}");
    let text: Vec<&str> = vm.seen.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(text, vec!["hello from a 32-bit PVH kernel"]);
}
