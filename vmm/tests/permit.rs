//! Run permits on real KVM: a VMM started with --require-permit runs its guest only while
//! it holds a permit, fences itself (pauses the guest) when the permit runs out, even when
//! it was stopped past the deadline, and goes on exactly where it was with a new one.

mod common;

use common::{TIMEOUT, kvm_or_skip, vmm};
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::Watched;
use novacron_vmm::api::client::{ClientError, call};
use novacron_vmm::api::{ErrorKind, Request, Response, VmEvent, VmState};
use novacron_vmm::permit::boottime_ms;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CALL: Duration = Duration::from_secs(10);

fn permitted_vm(dir: &Path, cmdline: &str) -> (Watched, PathBuf) {
    let sock = dir.join("vm.sock");
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--cmdline", cmdline, "--require-permit"]).arg("--api-sock").arg(&sock);
    let vm = Watched::spawn(cmd).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while call(&sock, Request::Status, CALL).is_err() {
        assert!(Instant::now() < deadline, "the VMM never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    (vm, sock)
}

fn permit(sock: &Path, epoch: u64, for_ms: u64) -> Result<Response, ClientError> {
    call(sock, Request::Permit { epoch, until_ms: boottime_ms() + for_ms }, CALL)
}

/// Every line the guest prints within `d`.
fn lines_for(vm: &mut Watched, d: Duration) -> Vec<String> {
    let until = Instant::now() + d;
    let mut lines = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(Some(l)) = vm.next_line(left) {
            lines.push(l.text);
        }
    }
    lines
}

fn is_beat(l: &novacron_guest_image::watch::Line) -> bool {
    matches!(l.parsed, GuestLine::Heartbeat(_))
}

#[test]
fn kvm_vmm_under_a_permit_waits_for_the_first_one() {
    if !kvm_or_skip("kvm_vmm_under_a_permit_waits_for_the_first_one") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock) = permitted_vm(dir.path(), "ws=2 hb=100");

    let before = lines_for(&mut vm, Duration::from_secs(2));
    let waiting = call(&sock, Request::Status, CALL).unwrap().status.unwrap();
    let resume = call(&sock, Request::Resume, CALL);
    permit(&sock, 1, 60_000).unwrap();
    let beat = vm.wait_for("a heartbeat", TIMEOUT, is_beat);
    let running = call(&sock, Request::Status, CALL).unwrap().status.unwrap();

    assert!(before.is_empty(), "the guest ran without a permit: {before:?}");
    assert_eq!(waiting.state, VmState::Paused);
    assert!(waiting.permit.is_some_and(|p| p.fenced && p.epoch == 0), "{waiting:?}");
    match resume {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidState);
            assert!(e.message.contains("fenced"), "{e}");
        }
        other => panic!("resume without a permit: {other:?}"),
    }
    assert!(beat.is_ok(), "{beat:?}");
    assert_eq!(running.state, VmState::Running);
    assert!(running.permit.is_some_and(|p| !p.fenced && p.epoch == 1 && p.left_ms > 50_000), "{running:?}");
}

#[test]
fn kvm_permit_that_runs_out_fences_the_guest_and_a_new_one_lets_it_go_on() {
    if !kvm_or_skip("kvm_permit_that_runs_out_fences_the_guest_and_a_new_one_lets_it_go_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock) = permitted_vm(dir.path(), "ws=4 rate=500 verify=300 hb=100");
    permit(&sock, 1, 60_000).unwrap();
    vm.wait_verified(1, TIMEOUT).unwrap();
    let watcher = UnixStream::connect(&sock).unwrap();
    watcher.set_read_timeout(Some(CALL)).unwrap();
    (&watcher).write_all(b"{\"version\":1,\"op\":\"watch\"}\n").unwrap();
    let mut events = BufReader::new(&watcher);
    let mut next_event = || {
        let mut line = String::new();
        events.read_line(&mut line).unwrap();
        serde_json::from_str::<Response>(&line).unwrap()
    };
    let watching = next_event();

    permit(&sock, 1, 1000).unwrap();
    let fenced = next_event();
    let _in_flight = lines_for(&mut vm, Duration::from_millis(300));
    let last = *vm.heartbeats().last().unwrap();
    let during = lines_for(&mut vm, Duration::from_secs(2));
    permit(&sock, 2, 60_000).unwrap();
    let permitted = next_event();
    let after = vm.wait_for("a heartbeat after the new permit", TIMEOUT, is_beat).unwrap();
    let verified = vm.seen.iter().filter(|l| matches!(l.parsed, GuestLine::VerifyOk { .. })).count();
    let verdict = vm.wait_verified(verified + 1, TIMEOUT);

    assert!(watching.ok && watching.status.is_some());
    assert_eq!(fenced.event, Some(VmEvent::Fenced));
    assert!(fenced.status.unwrap().permit.unwrap().fenced);
    assert!(during.is_empty(), "the guest ran while fenced: {during:?}");
    assert_eq!(permitted.event, Some(VmEvent::Permitted));
    assert_eq!(after.parsed, GuestLine::Heartbeat(last + 1), "it goes on where it was fenced");
    assert!(verdict.is_ok(), "{verdict:?}");
}

#[test]
fn kvm_vmm_stopped_past_its_permit_does_not_run_when_continued() {
    if !kvm_or_skip("kvm_vmm_stopped_past_its_permit_does_not_run_when_continued") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock) = permitted_vm(dir.path(), "ws=2 rate=500 hb=50");
    permit(&sock, 1, 60_000).unwrap();
    vm.wait_for("HB 3", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s >= 3)).unwrap();
    let pid = vm.child.id() as i32;

    permit(&sock, 1, 1000).unwrap();
    // SAFETY: signals a child process of this test.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let _in_flight = lines_for(&mut vm, Duration::from_millis(300));
    let last = vm.heartbeats().last().copied();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let after = lines_for(&mut vm, Duration::from_secs(2));
    let status = call(&sock, Request::Status, CALL).unwrap().status.unwrap();

    assert!(last.is_some());
    assert!(after.is_empty(), "the guest ran after its permit ran out: {after:?}");
    assert!(status.permit.is_some_and(|p| p.fenced), "{status:?}");
}

#[test]
fn kvm_permits_of_an_older_epoch_or_for_a_vmm_that_needs_none_are_refused() {
    if !kvm_or_skip("kvm_permits_of_an_older_epoch_or_for_a_vmm_that_needs_none_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_vm, sock) = permitted_vm(dir.path(), "ws=2 hb=100");
    let free_sock = dir.path().join("free.sock");
    let mut free = vmm();
    free.args(["--mem", "64", "--cmdline", "ws=2 hb=100"]).arg("--api-sock").arg(&free_sock);
    let mut free = Watched::spawn(free).unwrap();
    free.wait_for("a heartbeat", TIMEOUT, is_beat).unwrap();

    permit(&sock, 5, 60_000).unwrap();
    let stale = permit(&sock, 4, 60_000);
    let needless = permit(&free_sock, 1, 60_000);

    for (r, kind, needle) in [
        (stale, ErrorKind::InvalidState, "older than the epoch 5"),
        (needless, ErrorKind::BadRequest, "needs no permit"),
    ] {
        match r {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.kind, kind, "{e}");
                assert!(e.message.contains(needle), "{needle:?} not in {e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
