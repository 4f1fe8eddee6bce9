//! Snapshots on real KVM: a VM continues from its snapshot in a new VMM process (the
//! heartbeat sequence goes on, memory verifies), and damaged or mismatched snapshots are
//! refused with a clear error.

mod common;

use common::{TIMEOUT, kvm_or_skip, test_guest, vmm};
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::Watched;
use novacron_vmm::api::Request;
use novacron_vmm::api::client::call;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the test guest, snapshots it paused after a few heartbeats and verdicts, and
/// returns the last heartbeat it printed before the snapshot.
fn snapshot_of(vcpus: u8, mem_mib: u64, cmdline: &str, dir: &Path, extra: &[String]) -> u64 {
    let sock = dir.join("src.sock");
    let mut cmd = vmm();
    cmd.args(["--vcpus", &vcpus.to_string(), "--mem", &mem_mib.to_string(), "--cmdline", cmdline]);
    cmd.arg("--api-sock").arg(&sock);
    cmd.args(extra);
    let mut vm = Watched::spawn(cmd).unwrap();
    vm.wait_verified(2, TIMEOUT).unwrap();
    let reply =
        call(&sock, Request::Snapshot { dir: dir.join("snap").to_string_lossy().into(), paused: true }, CALL_TIMEOUT);
    let report = reply.unwrap().snapshot.unwrap();
    assert!(report.pages_written > 0 && report.memory_bytes == mem_mib << 20, "{report:?}");
    // Lines already on their way are read; a paused VM prints nothing more.
    while let Ok(Some(_)) = vm.next_line(Duration::from_millis(300)) {}
    let last = *vm.heartbeats().last().unwrap();
    call(&sock, Request::Shutdown, CALL_TIMEOUT).unwrap();
    vm.wait_exit(TIMEOUT).unwrap();
    last
}

fn restore(dir: &Path) -> Watched {
    restore_with(dir, "auto", None)
}

/// Restores `dir`/snap with `--restore-memory how`, with a control socket if given.
fn restore_with(dir: &Path, how: &str, sock: Option<&Path>) -> Watched {
    let mut cmd = vmm();
    cmd.arg("--restore-from").arg(dir.join("snap")).args(["--restore-memory", how]);
    if let Some(sock) = sock {
        cmd.arg("--api-sock").arg(sock);
    }
    Watched::spawn(cmd).unwrap()
}

const WORKLOAD: &str = "ws=8 rate=2000 verify=300 hb=100";

fn continues_where_it_stopped(vcpus: u8, how: &str) {
    let dir = tempfile::tempdir().unwrap();
    let last = snapshot_of(vcpus, 128, WORKLOAD, dir.path(), &[]);
    let restored = restore_with(dir.path(), how, None);
    goes_on_from(restored, last, vcpus);
}

/// The restored guest's first heartbeat follows `last`, its memory verifies on all
/// `vcpus`, and it never booted again.
fn goes_on_from(mut restored: Watched, last: u64, vcpus: u8) {
    let first = restored
        .wait_for("a heartbeat after restore", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_)))
        .unwrap();
    let verdict = restored
        .wait_for("a verdict after restore", TIMEOUT, |l| {
            matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
        })
        .unwrap();

    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1), "the sequence goes on");
    assert!(matches!(verdict.parsed, GuestLine::VerifyOk { cpus, .. } if cpus == u64::from(vcpus)), "{}", verdict.text);
    assert!(
        !restored.seen.iter().any(|l| matches!(l.parsed, GuestLine::Boot | GuestLine::Banner { .. })),
        "no new boot"
    );
}

#[test]
fn kvm_snapshot_restore_1_vcpu_continues_and_verifies() {
    if kvm_or_skip("kvm_snapshot_restore_1_vcpu_continues_and_verifies") {
        continues_where_it_stopped(1, "eager");
    }
}

#[test]
fn kvm_snapshot_restore_4_vcpus_continues_and_verifies() {
    if kvm_or_skip("kvm_snapshot_restore_4_vcpus_continues_and_verifies") {
        continues_where_it_stopped(4, "lazy");
    }
}

#[test]
fn kvm_lazy_restore_runs_at_once_loads_every_chunk_and_the_guest_verifies() {
    if !kvm_or_skip("kvm_lazy_restore_runs_at_once_loads_every_chunk_and_the_guest_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let last = snapshot_of(2, 128, WORKLOAD, dir.path(), &[]);
    let sock = dir.path().join("lazy.sock");
    let mut restored = restore_with(dir.path(), "lazy", Some(&sock));
    let first = restored.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let mut status = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !status.memory_load.is_some_and(|m| m.done) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        status = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap();
    }
    // The snapshot's files may go once everything is in: the VM no longer needs them.
    std::fs::remove_dir_all(dir.path().join("snap")).unwrap();
    let verified = restored.wait_verified(2, TIMEOUT);

    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1), "the sequence goes on");
    let load = status.memory_load.expect("a lazy restore reports its loader");
    assert!(load.done, "{load:?}");
    assert_eq!((load.loaded_mib, load.total_mib), (128, 128), "every chunk is in: {load:?}");
    assert!(status.first_instruction_us.is_some(), "the guest ran: {status:?}");
    assert!(verified.is_ok(), "the guest's memory verifies on both vCPUs: {verified:?}");
    assert!(!restored.seen.iter().any(|l| matches!(l.parsed, GuestLine::VerifyFail { .. })), "no failed verdict");
}

#[test]
fn kvm_a_lazily_restored_vm_migrates_while_its_memory_is_still_loading() {
    if !kvm_or_skip("kvm_a_lazily_restored_vm_migrates_while_its_memory_is_still_loading") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    snapshot_of(2, 128, WORKLOAD, dir.path(), &[]);
    let sock = dir.path().join("lazy.sock");
    // Only what is touched comes in: most of the memory is still in the snapshot file.
    let mut restored = restore_with(dir.path(), "on-demand", Some(&sock));
    restored.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let before = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap().memory_load.unwrap();
    let tls = dir.path().join("tls");
    novacron_migration::tls::init(&tls, "node").unwrap();
    let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let dst_sock = dir.path().join("dst.sock");
    let mut receiver = vmm();
    receiver.args(["--receive-on", &addr]).arg("--tls-dir").arg(&tls).arg("--api-sock").arg(&dst_sock);
    let mut dst = Watched::spawn(receiver).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !dst_sock.exists() {
        assert!(std::time::Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let request = serde_json::json!({ "to": addr, "tls_dir": tls });
    let reply = call(&sock, Request::Migrate(serde_json::from_value(request).unwrap()), CALL_TIMEOUT).unwrap();
    let (status, _) = restored.wait_exit(TIMEOUT).unwrap();
    let last = *restored.heartbeats().last().unwrap();

    assert!(!before.done && before.loaded_mib < before.total_mib, "the memory was still loading: {before:?}");
    let report = reply.migration.and_then(|m| m.report).expect("a migration report");
    assert!(report.digests_matched, "{report:?}");
    assert!(status.success(), "the source VMM ended with {status}");
    let first = dst.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1), "the sequence goes on at the destination");
    // Memory the loader had not put in yet holds the snapshot's contents: read through
    // the loader, not skipped as never touched, or the working set would verify wrong.
    assert!(dst.wait_verified(1, TIMEOUT).is_ok(), "the guest's memory verifies at the destination");
    assert!(!dst.seen.iter().any(|l| matches!(l.parsed, GuestLine::VerifyFail { .. })), "no failed verdict");
}

/// Runs the VMM in a mount namespace where /dev/userfaultfd is /dev/null, so that a
/// userfaultfd cannot be created (as on a host that does not allow one).
fn vmm_without_userfaultfd(args: &[&std::ffi::OsStr]) -> std::process::Command {
    let vmm = std::path::PathBuf::from(env!("CARGO_BIN_EXE_novacron-vmm"));
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind /dev/null /dev/userfaultfd && exec \"$@\"",
        "sh",
    ]);
    cmd.arg(vmm).args(args);
    cmd
}

#[test]
fn kvm_restore_without_a_userfaultfd_refuses_lazy_and_falls_back_on_auto() {
    if !kvm_or_skip("kvm_restore_without_a_userfaultfd_refuses_lazy_and_falls_back_on_auto") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let last = snapshot_of(1, 64, WORKLOAD, dir.path(), &[]);
    let snap = dir.path().join("snap");
    let args = |how: &'static str| -> Vec<&std::ffi::OsStr> {
        vec!["--restore-from".as_ref(), snap.as_os_str(), "--restore-memory".as_ref(), how.as_ref()]
    };
    let refused = vmm_without_userfaultfd(&args("lazy")).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let fallback = Watched::spawn(vmm_without_userfaultfd(&args("auto"))).unwrap();

    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot serve the guest's memory lazily") && stderr.contains("userfaultfd"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    goes_on_from(fallback, last, 1);
}

#[test]
fn kvm_snapshot_with_devices_restores_them_and_refuses_a_changed_disk() {
    if !kvm_or_skip("kvm_snapshot_with_devices_restores_them_and_refuses_a_changed_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let extra = vec!["--rng".to_string(), "--disk".to_string(), format!("path={}", disk.display())];
    let last = snapshot_of(1, 128, "ws=4 verify=300 hb=100 blk=8 rng=64", dir.path(), &extra);

    let mut restored = restore(dir.path());
    let first = restored.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    drop(restored);
    std::fs::File::options().write(true).open(&disk).unwrap().set_len(2 << 20).unwrap();
    let out = vmm().arg("--restore-from").arg(dir.path().join("snap")).output().unwrap();

    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("disk size in sectors"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn kvm_damaged_snapshots_are_refused_with_one_line() {
    if !kvm_or_skip("kvm_damaged_snapshots_are_refused_with_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    snapshot_of(1, 128, "ws=4 verify=300 hb=100", dir.path(), &[]);
    let snap = dir.path().join("snap");
    let state = std::fs::read(snap.join("state.bin")).unwrap();
    let memory_len = std::fs::metadata(snap.join("memory.bin")).unwrap().len();
    let flip = |file: &str, at: u64| {
        let f = std::fs::File::options().read(true).write(true).open(snap.join(file)).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    };
    let attempt_with = |how: &str| {
        let out = vmm().arg("--restore-from").arg(&snap).args(["--restore-memory", how]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let attempt = || attempt_with("auto");

    flip("state.bin", state.len() as u64 / 2);
    let state_flipped = attempt();
    std::fs::write(snap.join("state.bin"), &state[..state.len() - 7]).unwrap();
    let state_truncated = attempt();
    std::fs::write(snap.join("state.bin"), &state).unwrap();
    flip("memory.bin", memory_len / 3);
    let chunk = memory_len / 3 / (2 << 20);
    let memory_flipped = attempt_with("eager");
    // Lazily, the guest starts first; the damaged chunk is found when it is loaded, and
    // stops the VM before anything could read it.
    let memory_flipped_lazily = attempt_with("lazy");

    let damaged_chunk = format!("memory.bin chunk {chunk} fails its checksum");
    for ((code, stderr), expected_code, needle) in [
        (state_flipped, 1, "checksum"),
        (state_truncated, 1, "truncated"),
        (memory_flipped, 1, damaged_chunk.as_str()),
        (memory_flipped_lazily, 3, damaged_chunk.as_str()),
    ] {
        assert_eq!(code, Some(expected_code), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn kvm_snapshot_of_a_running_vm_resumes_it() {
    if !kvm_or_skip("kvm_snapshot_of_a_running_vm_resumes_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(2, 64, "ws=4 hb=100 verify=300", Some(&sock));
    vm.wait_for("HB 2", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s >= 2)).unwrap();

    let reply = call(
        &sock,
        Request::Snapshot { dir: dir.path().join("s").to_string_lossy().into(), paused: false },
        CALL_TIMEOUT,
    );
    let seq = *vm.heartbeats().last().unwrap();
    let later =
        vm.wait_for("a later heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s > seq + 2));
    let status = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap();

    assert!(reply.is_ok(), "{reply:?}");
    assert!(later.is_ok(), "the VM goes on after the snapshot");
    assert_eq!(status.state, novacron_vmm::api::VmState::Running);
}

/// The names of the files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn snapshot_request(dir: &Path, paused: bool) -> Request {
    Request::Snapshot { dir: dir.to_string_lossy().into(), paused }
}

#[test]
fn kvm_snapshot_over_the_snapshot_a_vm_runs_from_keeps_the_vm_and_the_snapshot() {
    if !kvm_or_skip("kvm_snapshot_over_the_snapshot_a_vm_runs_from_keeps_the_vm_and_the_snapshot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let first_last = snapshot_of(1, 128, WORKLOAD, dir.path(), &[]);
    let sock = dir.path().join("restored.sock");
    let mut cmd = vmm();
    cmd.arg("--restore-from").arg(&snap).arg("--api-sock").arg(&sock);
    let mut restored = Watched::spawn(cmd).unwrap();
    restored.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();

    // The VM's memory is a private mapping of the very file this snapshot replaces.
    let reply = call(&sock, snapshot_request(&snap, true), CALL_TIMEOUT);
    while let Ok(Some(_)) = restored.next_line(Duration::from_millis(300)) {}
    let second_last = *restored.heartbeats().last().unwrap();
    call(&sock, Request::Resume, CALL_TIMEOUT).unwrap();
    let verified_before = restored.seen.iter().filter(|l| matches!(l.parsed, GuestLine::VerifyOk { .. })).count();
    let goes_on = restored.wait_verified(verified_before + 2, TIMEOUT);
    call(&sock, Request::Shutdown, CALL_TIMEOUT).unwrap();
    let (status, err) = restored.wait_exit(TIMEOUT).unwrap();
    let files = listing(&snap);
    let mut again = restore(dir.path());
    let first = again.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let verdict = again.wait_verified(1, TIMEOUT);

    assert!(reply.is_ok(), "{reply:?}");
    assert!(goes_on.is_ok(), "the restored VM goes on after the snapshot: {goes_on:?}");
    assert_eq!(status.code(), Some(0), "the VMM ended by shutdown, not by a signal: {err}");
    assert_eq!(files, ["memory.1.bin", "state.bin"], "one whole snapshot, the old memory file gone");
    assert!(second_last > first_last);
    assert_eq!(first.parsed, GuestLine::Heartbeat(second_last + 1), "the new snapshot holds the later state");
    assert!(verdict.is_ok(), "{verdict:?}");
}

#[test]
fn kvm_snapshot_that_runs_out_of_space_keeps_the_previous_one_and_the_vm() {
    if !kvm_or_skip("kvm_snapshot_that_runs_out_of_space_keeps_the_previous_one_and_the_vm") {
        return;
    }
    let fs = novacron_guest_image::tmpfs::Tmpfs::mount(48).unwrap();
    let snap = fs.path().join("snap");
    let sock = fs.path().join("vm.sock");
    let mut vm = test_guest(1, 64, "ws=16 rate=2000 verify=300 hb=100", Some(&sock));
    vm.wait_verified(1, TIMEOUT).unwrap();
    call(&sock, snapshot_request(&snap, true), CALL_TIMEOUT).unwrap();
    while let Ok(Some(_)) = vm.next_line(Duration::from_millis(300)) {}
    let last = *vm.heartbeats().last().unwrap();
    call(&sock, Request::Resume, CALL_TIMEOUT).unwrap();
    let (old_files, old_state) = (listing(&snap), std::fs::read(snap.join("state.bin")).unwrap());
    let empty = fs.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    // The new snapshot's memory (16 MiB of working set) cannot fit in what is left.
    fs.fill_leaving(4 << 20).unwrap();

    let over_old = call(&sock, snapshot_request(&snap, false), CALL_TIMEOUT);
    let into_empty = call(&sock, snapshot_request(&empty, false), CALL_TIMEOUT);
    let into_new = call(&sock, snapshot_request(&fs.path().join("new"), false), CALL_TIMEOUT);
    let verified = vm.seen.iter().filter(|l| matches!(l.parsed, GuestLine::VerifyOk { .. })).count();
    let goes_on = vm.wait_verified(verified + 2, TIMEOUT);
    call(&sock, Request::Shutdown, CALL_TIMEOUT).unwrap();
    vm.wait_exit(TIMEOUT).unwrap();
    let mut cmd = vmm();
    cmd.arg("--restore-from").arg(&snap);
    let mut restored = Watched::spawn(cmd).unwrap();
    let first = restored.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let verdict = restored.wait_verified(1, TIMEOUT);

    for (what, reply) in
        [("over the old one", over_old), ("into an empty dir", into_empty), ("into a new dir", into_new)]
    {
        let err = format!("{:?}", reply.expect_err(what));
        assert!(err.contains("No space left on device"), "{what}: {err}");
    }
    assert!(goes_on.is_ok(), "the VM runs on after the failed snapshots: {goes_on:?}");
    assert_eq!(listing(&snap), old_files, "the old snapshot's files, nothing partial");
    assert_eq!(std::fs::read(snap.join("state.bin")).unwrap(), old_state);
    assert!(listing(&empty).is_empty(), "no partial memory file: {:?}", listing(&empty));
    assert!(!fs.path().join("new").exists(), "a directory the failed snapshot made is removed");
    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1), "the old snapshot restores");
    assert!(verdict.is_ok(), "{verdict:?}");
}

#[test]
fn kvm_fifo_in_a_snapshot_is_refused_without_waiting_on_it() {
    if !kvm_or_skip("kvm_fifo_in_a_snapshot_is_refused_without_waiting_on_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    snapshot_of(1, 128, "ws=4 verify=300 hb=100", dir.path(), &[]);
    let snap = dir.path().join("snap");
    let fifo = |name: &str| {
        std::fs::remove_file(snap.join(name)).unwrap();
        let made = std::process::Command::new("mkfifo").arg(snap.join(name)).status().unwrap();
        assert!(made.success());
    };
    let attempt = || {
        let mut cmd = vmm();
        cmd.arg("--restore-from").arg(&snap);
        let mut restore = Watched::spawn(cmd).unwrap();
        restore.wait_exit(Duration::from_secs(30)).expect("the restore ends instead of hanging in open()")
    };
    fifo("memory.bin");
    let memory_fifo = attempt();
    fifo("state.bin");
    let state_fifo = attempt();

    for ((status, stderr), name) in [(memory_fifo, "memory.bin"), (state_fifo, "state.bin")] {
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{name} is not a regular file")), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

/// The committed snapshots a format-1 VMM wrote (`tests/fixtures/snapshot-v1-VENDOR`:
/// state.bin, memory.bin compressed, and the last heartbeat before it), one per CPU
/// vendor, since a VM's vCPU state moves only between CPUs of one vendor. Once the
/// snapshot format or a section moves on, they are the N-1 snapshots this build must still
/// restore; they stay as they are. `NOVACRON_WRITE_FIXTURES=1` writes this host's anew, for
/// a new version.
fn fixture() -> std::path::PathBuf {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let vendor = cpuinfo.lines().find_map(|l| l.strip_prefix("vendor_id")).unwrap_or_default();
    let name = match vendor.trim_start_matches([' ', '\t', ':']) {
        "GenuineIntel" => "intel",
        "AuthenticAMD" => "amd",
        other => panic!("no committed snapshot for CPU vendor {other:?}: write one with NOVACRON_WRITE_FIXTURES=1"),
    };
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("snapshot-v1-{name}"))
}

#[test]
fn kvm_the_committed_v1_snapshot_restores_and_the_guest_goes_on() {
    if !kvm_or_skip("kvm_the_committed_v1_snapshot_restores_and_the_guest_goes_on") {
        return;
    }
    let fixture = &fixture();
    if std::env::var_os("NOVACRON_WRITE_FIXTURES").is_some() {
        let dir = tempfile::tempdir().unwrap();
        let last = snapshot_of(1, 32, WORKLOAD, dir.path(), &[]);
        std::fs::create_dir_all(fixture).unwrap();
        std::fs::copy(dir.path().join("snap/state.bin"), fixture.join("state.bin")).unwrap();
        let memory = std::fs::read(dir.path().join("snap/memory.bin")).unwrap();
        std::fs::write(fixture.join("memory.bin.zst"), zstd::bulk::compress(&memory, 19).unwrap()).unwrap();
        std::fs::write(fixture.join("last-heartbeat"), format!("{last}\n")).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    std::fs::copy(fixture.join("state.bin"), snap.join("state.bin")).unwrap();
    let compressed = std::fs::read(fixture.join("memory.bin.zst")).unwrap();
    let memory = zstd::bulk::decompress(&compressed, 32 << 20).unwrap();
    std::fs::write(snap.join("memory.bin"), memory).unwrap();
    let last: u64 = std::fs::read_to_string(fixture.join("last-heartbeat")).unwrap().trim().parse().unwrap();
    let snapshot = novacron_vmm::snapshot::read(&snap).unwrap();
    assert_eq!((snapshot.state.spec.vcpus, snapshot.state.spec.mem_mib), (1, 32));
    assert_eq!(snapshot.memory.file, "memory.bin");

    goes_on_from(restore(dir.path()), last, 1);
}

#[test]
fn a_lazy_restore_loads_first_the_pages_kvm_and_the_vcpu_touch_first() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture.join("state.bin"), dir.path().join("state.bin")).unwrap();
    // Only the state is read here; the memory file need not exist.
    let bytes = std::fs::read(dir.path().join("state.bin")).unwrap();
    let (state, memory) = novacron_vmm::snapshot::parse_state(&bytes).unwrap();
    let first = novacron_vmm::snapshot::lazy::first_touched(&state);
    let total: u64 = memory.region_sizes.iter().sum();
    let vcpu = &state.vcpus[0];
    let clock = vcpu.msrs.iter().find(|m| m.index == 0x4b56_4d01).expect("the test guest uses KVM's clock");

    assert!(first.contains(&(clock.data & !0x3f)), "the clock page: {first:x?}");
    assert!(first.contains(&vcpu.regs.rip) && vcpu.regs.rip < total, "the code the vCPU runs: {first:x?}");
}
