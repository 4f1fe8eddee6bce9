//! What a live migration keeps and hands over, between real VMM processes on loopback: a
//! paused VM arrives paused, the disk image's lock passes from source to destination at
//! the commit, a kept snapshot never destroys the memory a VM runs from nor an older
//! snapshot, and a second migration (to a busy receiver, or of a VM already migrating) is
//! refused with the reason, leaving every VM where it was.

mod common;

use common::vmm::{json_report, migrate, migrate_cmd, receiver, receiver_named, report, source, vm};
use common::{Host, SLOW, TIMEOUT, assert_moved, assert_source_runs, certs, novacron, stderr, wait_until_going};
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Watched, kvm_or_skip};
use novacron_vmm::api::client::call;
use novacron_vmm::api::{Request, VmState};
use std::path::Path;
use std::time::Duration;

const CALL: Duration = Duration::from_secs(60);

fn status_of(host: &Host) -> VmState {
    call(&host.sock, Request::Status, CALL).unwrap().status.unwrap().state
}

/// Lines already on their way are read; a paused VM prints nothing more.
fn drain(host: &mut Host) {
    while let Ok(Some(_)) = host.vm.next_line(Duration::from_millis(300)) {}
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn is_beat(l: &novacron_guest_image::watch::Line) -> bool {
    matches!(l.parsed, GuestLine::Heartbeat(_))
}

#[test]
fn kvm_migrate_a_paused_vm_arrives_paused_and_resumes_where_it_stopped() {
    if !kvm_or_skip("kvm_migrate_a_paused_vm_arrives_paused_and_resumes_where_it_stopped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 1, 128, "ws=8 rate=500 verify=300 hb=100");
    call(&src.sock, Request::Pause, CALL).unwrap();
    drain(&mut src);
    let last = *src.vm.heartbeats().last().unwrap();
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);

    let r = report(&migrate(&src, &addr, &tls, &[]));
    let (status, err) = src.vm.wait_exit(TIMEOUT).unwrap();
    let state_there = status_of(&dst);
    let silent = dst.vm.next_line(Duration::from_secs(2));
    call(&dst.sock, Request::Resume, CALL).unwrap();
    let first = dst.vm.wait_for("a heartbeat after resume", TIMEOUT, is_beat).unwrap();
    let verdict = dst.vm.wait_verified(1, TIMEOUT);

    assert_eq!(r["arrived"], "paused", "the report says how it arrived: {r}");
    assert!(status.success() && err.contains("moved to"), "{err}");
    assert_eq!(state_there, VmState::Paused);
    assert!(silent.is_err(), "the guest ran at the destination before it was resumed: {silent:?}");
    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1));
    assert!(verdict.is_ok(), "{verdict:?}");
}

#[test]
fn kvm_migrate_hands_the_disk_image_lock_to_the_destination_at_the_commit() {
    if !kvm_or_skip("kvm_migrate_hands_the_disk_image_lock_to_the_destination_at_the_commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let src = vm(dir.path(), "src", &["--mem", "128", "--disk", &disk_arg], "ws=8 rate=500 verify=300 hb=100 blk=8");
    let intruder = || novacron().args(["vmm", "run", "--mem", "64", "--disk", &disk_arg]).output().unwrap();
    let before = intruder();
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);

    let r = report(&migrate(&src, &addr, &tls, &[]));
    let dst_pid = dst.vm.child.id();
    let src_pid = src.vm.child.id();
    assert_moved(src, &mut dst);
    let after = intruder();

    assert_eq!(r["arrived"], "running", "{r}");
    for (out, holder) in [(before, src_pid), (after, dst_pid)] {
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("is in use by process {holder}")), "process {holder} holds it: {err}");
    }
}

#[test]
fn kvm_migrate_keeping_a_snapshot_in_the_vms_own_restore_dir_keeps_both() {
    if !kvm_or_skip("kvm_migrate_keeping_a_snapshot_in_the_vms_own_restore_dir_keeps_both") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let snap = dir.path().join("snap");
    let mut first = source(dir.path(), 1, 128, "ws=8 rate=500 verify=300 hb=100");
    let snapshot = Request::Snapshot { dir: snap.to_string_lossy().into(), paused: false };
    call(&first.sock, snapshot, CALL).unwrap();
    call(&first.sock, Request::Shutdown, CALL).unwrap();
    first.vm.wait_exit(TIMEOUT).unwrap();
    let sock = dir.path().join("restored.sock");
    let mut cmd = novacron();
    cmd.args(["vmm", "restore", "--from"]).arg(&snap).arg("--api-sock").arg(&sock);
    let mut restored = Host { vm: Watched::spawn(cmd).unwrap(), sock };
    restored.vm.wait_verified(2, TIMEOUT).unwrap();
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);

    // The source's memory is a private mapping of snap's memory file.
    let out = migrate(&restored, &addr, &tls, &["--keep-snapshot", snap.to_str().unwrap()]);
    let r = report(&out);
    assert_moved(restored, &mut dst);
    let first_there = dst.vm.seen.iter().find(|l| is_beat(l)).unwrap().parsed.clone();
    let files = listing(&snap);
    let mut cmd = novacron();
    cmd.args(["vmm", "restore", "--from"]).arg(&snap);
    let mut kept = Watched::spawn(cmd).unwrap();
    let first_kept = kept.wait_for("a heartbeat", TIMEOUT, is_beat).unwrap();
    let verdict = kept.wait_verified(1, TIMEOUT);

    assert!(r["keep_snapshot_error"].is_null(), "{r}");
    assert_eq!(files, ["memory.1.bin", "state.bin"], "one whole snapshot");
    assert_eq!(first_kept.parsed, first_there, "the kept snapshot is where the moved VM went on from");
    assert!(verdict.is_ok(), "{verdict:?}");
}

#[test]
fn kvm_migrate_whose_kept_snapshot_runs_out_of_space_says_so_and_keeps_the_old_one() {
    if !kvm_or_skip("kvm_migrate_whose_kept_snapshot_runs_out_of_space_says_so_and_keeps_the_old_one") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = novacron_guest_image::tmpfs::Tmpfs::mount(48).unwrap();
    let tls = certs(dir.path(), "tls");
    let snap = fs.path().join("snap");
    let src = source(dir.path(), 1, 64, "ws=16 rate=500 verify=300 hb=100");
    call(&src.sock, Request::Snapshot { dir: snap.to_string_lossy().into(), paused: false }, CALL).unwrap();
    let (old_files, old_state) = (listing(&snap), std::fs::read(snap.join("state.bin")).unwrap());
    fs.fill_leaving(4 << 20).unwrap();
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);

    let out = migrate(&src, &addr, &tls, &["--keep-snapshot", snap.to_str().unwrap()]);
    let r = json_report(&out);
    assert_moved(src, &mut dst);

    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "the VM moved but the snapshot was not kept: {err}");
    assert!(err.contains("the snapshot was not kept") && err.contains("No space left on device"), "{err}");
    assert!(r["keep_snapshot_error"].as_str().is_some_and(|e| e.contains("No space left")), "{r}");
    assert_eq!(r["digests_matched"], true, "{r}");
    assert_eq!(listing(&snap), old_files, "the old snapshot, nothing partial");
    assert_eq!(std::fs::read(snap.join("state.bin")).unwrap(), old_state);
}

#[test]
fn kvm_migrate_to_a_busy_receiver_is_refused_as_busy_and_both_sources_run_on() {
    if !kvm_or_skip("kvm_migrate_to_a_busy_receiver_is_refused_as_busy_and_both_sources_run_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut a = source(dir.path(), 1, 128, "ws=16 rate=500 verify=300 hb=100");
    let mut b = vm(dir.path(), "b", &["--mem", "128"], "ws=8 rate=500 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let first = wait_until_going(&a, migrate_cmd(&a, &addr, &tls, &SLOW).spawn().unwrap(), || true);

    let second = migrate(&b, &addr, &tls, &[]);
    let cancel = novacron().args(["vmm", "migrate-cancel"]).arg("--api-sock").arg(&a.sock).output().unwrap();
    let first = first.wait_with_output().unwrap();

    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("busy with another migration"), "{err}");
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    assert!(!first.status.success());
    assert_source_runs(&mut b);
    assert_source_runs(&mut a);
    let (status, _) = dst.vm.wait_exit(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(1), "the cancelled destination discards everything");
}

#[test]
fn kvm_second_migrate_of_a_migrating_vm_is_refused_without_the_first_ones_progress() {
    if !kvm_or_skip("kvm_second_migrate_of_a_migrating_vm_is_refused_without_the_first_ones_progress") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 1, 128, "ws=16 rate=500 verify=300 hb=100");
    let (_dst, addr) = receiver(dir.path(), &tls, &[]);
    let (_other, other_addr) = receiver_named(dir.path(), "other", &tls, &[]);
    let first = wait_until_going(&src, migrate_cmd(&src, &addr, &tls, &SLOW).spawn().unwrap(), || true);

    let second = migrate(&src, &other_addr, &tls, &[]);
    novacron().args(["vmm", "migrate-cancel"]).arg("--api-sock").arg(&src.sock).output().unwrap();
    first.wait_with_output().unwrap();

    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("a migration to {addr} is running already")), "{err}");
    assert!(!err.contains("migrating:"), "the second client showed the first one's progress: {err}");
    assert_source_runs(&mut src);
}

#[test]
fn kvm_migrate_to_a_receiver_under_a_permit_runs_the_vm_only_once_permitted() {
    if !kvm_or_skip("kvm_migrate_to_a_receiver_under_a_permit_runs_the_vm_only_once_permitted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 1, 128, "ws=8 rate=500 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &["--require-permit"]);

    let r = report(&migrate(&src, &addr, &tls, &[]));
    let (status, err) = src.vm.wait_exit(TIMEOUT).unwrap();
    let last = *src.vm.heartbeats().last().unwrap();
    let waiting = call(&dst.sock, Request::Status, CALL).unwrap().status.unwrap();
    let silent = dst.vm.next_line(Duration::from_secs(2));
    let until_ms = novacron_vmm::permit::boottime_ms() + 60_000;
    call(&dst.sock, Request::Permit { epoch: 2, until_ms }, CALL).unwrap();
    let first = dst.vm.wait_for("a heartbeat once permitted", TIMEOUT, is_beat).unwrap();

    assert_eq!(r["arrived"], "running", "{r}");
    assert!(status.success(), "{err}");
    assert!(waiting.permit.is_some_and(|p| p.fenced), "{waiting:?}");
    assert!(silent.is_err(), "the guest ran at the destination without a permit: {silent:?}");
    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1));
}
