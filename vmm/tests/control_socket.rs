//! The control socket against a running VM: pause really stops the vCPUs, resume continues
//! where they stopped, status and shutdown answer, wrong requests are refused.

mod common;

use common::{TIMEOUT, kvm_or_skip, test_guest};
use novacron_guest_image::report::GuestLine;
use novacron_vmm::api::client::{ClientError, call};
use novacron_vmm::api::{ErrorKind, Request, VmState};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn kvm_pause_stops_the_guest_and_resume_continues_the_sequence() {
    if !kvm_or_skip("kvm_pause_stops_the_guest_and_resume_continues_the_sequence") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(2, 64, "ws=8 rate=1000 verify=300 hb=100", Some(&sock));
    vm.wait_verified(1, TIMEOUT).unwrap();
    vm.wait_for("HB 5", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s >= 5)).unwrap();

    call(&sock, Request::Pause, CALL_TIMEOUT).unwrap();
    let paused_at = Instant::now();
    let status = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap();
    // Lines the guest wrote before the pause may still be in flight; then silence.
    let mut last_before = *vm.heartbeats().last().unwrap();
    let mut during_pause = Vec::new();
    while paused_at.elapsed() < Duration::from_secs(2) {
        if let Ok(Some(line)) = vm.next_line(Duration::from_millis(100)) {
            if paused_at.elapsed() < Duration::from_millis(200) {
                if let GuestLine::Heartbeat(s) = line.parsed {
                    last_before = s;
                }
            } else {
                during_pause.push(line.text);
            }
        }
    }
    call(&sock, Request::Resume, CALL_TIMEOUT).unwrap();
    let after =
        vm.wait_for("a heartbeat after resume", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let verdicts_before = vm.seen.iter().filter(|l| matches!(l.parsed, GuestLine::VerifyOk { .. })).count();
    vm.wait_verified(verdicts_before + 1, TIMEOUT).unwrap();

    assert_eq!(status.state, VmState::Paused);
    assert!(during_pause.is_empty(), "the guest printed while paused: {during_pause:?}");
    assert_eq!(after.parsed, GuestLine::Heartbeat(last_before + 1), "the sequence continues where it stopped");
    assert!(!vm.seen.iter().any(|l| matches!(l.parsed, GuestLine::VerifyFail { .. })));
}

#[test]
fn kvm_status_reports_shape_and_wrong_state_requests_are_refused() {
    if !kvm_or_skip("kvm_status_reports_shape_and_wrong_state_requests_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(2, 96, "ws=4 hb=100", Some(&sock));
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();

    let status = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap();
    let resume_running = call(&sock, Request::Resume, CALL_TIMEOUT);
    call(&sock, Request::Pause, CALL_TIMEOUT).unwrap();
    let pause_paused = call(&sock, Request::Pause, CALL_TIMEOUT);

    assert_eq!((status.state, status.vcpus, status.mem_mib), (VmState::Running, 2, 96));
    assert_eq!(status.pid, vm.child.id());
    assert_eq!(status.kernel, "test-guest");
    for r in [resume_running, pause_paused] {
        match r {
            Err(ClientError::Refused(e)) => assert_eq!(e.kind, ErrorKind::InvalidState),
            other => panic!("expected an invalid-state refusal, got {other:?}"),
        }
    }
}

#[test]
fn kvm_malformed_requests_get_errors_and_the_vm_keeps_running() {
    if !kvm_or_skip("kvm_malformed_requests_get_errors_and_the_vm_keeps_running") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(1, 64, "ws=4 hb=100", Some(&sock));
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();

    let stream = UnixStream::connect(&sock).unwrap();
    stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    (&stream)
        .write_all(b"\x00\xff garbage\n{\"version\":99,\"op\":\"pause\"}\n{\"version\":1,\"op\":\"fly\"}\n")
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let kinds: Vec<String> = (0..3)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["ok"], false);
            v["error"]["kind"].as_str().unwrap().to_string()
        })
        .collect();
    let seq_before = *vm.heartbeats().last().unwrap();
    let next = vm.wait_for(
        "a later heartbeat",
        TIMEOUT,
        |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s > seq_before + 2),
    );

    assert_eq!(kinds, vec!["bad_request", "unsupported_version", "bad_request"]);
    assert!(next.is_ok(), "the guest keeps running");
}

#[test]
fn kvm_shutdown_request_ends_the_vmm_with_status_0_and_removes_socket() {
    if !kvm_or_skip("kvm_shutdown_request_ends_the_vmm_with_status_0_and_removes_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(2, 64, "ws=4 hb=100", Some(&sock));
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();

    let reply = call(&sock, Request::Shutdown, CALL_TIMEOUT).unwrap();
    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();

    assert!(reply.ok);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!sock.exists(), "the socket file is removed");
}

#[test]
fn kvm_set_limit_changes_a_running_devices_limiter_and_refuses_bad_ones() {
    if !kvm_or_skip("kvm_set_limit_changes_a_running_devices_limiter_and_refuses_bad_ones") {
        return;
    }
    use novacron_devices::rate_limiter::TokenBucketConfig;
    use novacron_devices::virtio::LimitTarget;
    use novacron_vmm::api::LimitChange;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let mut cmd = common::vmm();
    cmd.args(["--mem", "64", "--rng", "--cmdline", "ws=2 hb=100"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()));
    cmd.arg("--api-sock").arg(&sock);
    let mut vm = novacron_guest_image::watch::Watched::spawn(cmd).unwrap();
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let set = |device: &str, target, bandwidth, ops| {
        call(&sock, Request::SetLimit { device: device.into(), target, bandwidth, ops }, CALL_TIMEOUT)
    };
    let bucket = |size| LimitChange::Set(TokenBucketConfig { size, one_time_burst: 0, refill_time_ms: 1000 });

    let status = call(&sock, Request::Status, CALL_TIMEOUT).unwrap().status.unwrap();
    let ok_disk = set("disk0", LimitTarget::Device, bucket(1 << 20), bucket(100));
    let ok_off = set("rng0", LimitTarget::Device, LimitChange::Off, LimitChange::Keep);
    let wrong_target = set("disk0", LimitTarget::Rx, bucket(1), LimitChange::Keep);
    let unknown = set("disk9", LimitTarget::Device, bucket(1), LimitChange::Keep);
    let zero = set("disk0", LimitTarget::Device, bucket(0), LimitChange::Keep);
    let seq = *vm.heartbeats().last().unwrap();
    let alive =
        vm.wait_for("a later heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s > seq + 2));

    assert_eq!(status.devices, vec!["disk0".to_string(), "rng0".to_string()]);
    assert!(ok_disk.is_ok() && ok_off.is_ok(), "{ok_disk:?} {ok_off:?}");
    for (what, r) in [("wrong target", wrong_target), ("unknown device", unknown), ("zero-size bucket", zero)] {
        match r {
            Err(ClientError::Refused(e)) => assert_eq!(e.kind, ErrorKind::BadRequest, "{what}: {e}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
    assert!(alive.is_ok(), "the VM keeps running");
}

#[test]
fn kvm_api_sock_on_a_file_or_a_directory_is_refused_and_left_alone() {
    if !kvm_or_skip("kvm_api_sock_on_a_file_or_a_directory_is_refused_and_left_alone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"precious").unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let run =
        |path: &std::path::Path| common::vmm().args(["--mem", "64"]).arg("--api-sock").arg(path).output().unwrap();

    let on_file = run(&file);
    let on_dir = run(&sub);

    for (out, needle) in [(on_file, "is a regular file, not a socket"), (on_dir, "is a directory, not a socket")] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious", "the file is still there");
    assert!(sub.is_dir());
}

/// utime + stime of one thread, in clock ticks.
fn thread_cpu_ticks(pid: u32, tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start after its closing ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn set_open_files_limit(pid: u32, soft: u64) {
    // SAFETY: prlimit reads and writes rlimit structs on this stack frame.
    unsafe {
        let mut old: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old), 0);
        let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
        assert_eq!(libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()), 0);
    }
}

#[test]
fn kvm_descriptor_exhaustion_backs_off_logs_once_and_keeps_serving() {
    if !kvm_or_skip("kvm_descriptor_exhaustion_backs_off_logs_once_and_keeps_serving") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(1, 64, "ws=2 rate=100 hb=200", Some(&sock));
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let pid = vm.child.id();
    let kept = UnixStream::connect(&sock).unwrap();
    kept.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    let mut kept_reader = BufReader::new(kept.try_clone().unwrap());
    let mut ask_status = || {
        (&kept).write_all(b"{\"version\":1,\"op\":\"status\"}\n").unwrap();
        let mut line = String::new();
        kept_reader.read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    assert_eq!(ask_status()["ok"], true, "the kept connection is accepted");
    // No descriptor left for another connection.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    set_open_files_limit(pid, open);

    let waiting: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    let ticks_before = thread_cpu_ticks(pid, pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = thread_cpu_ticks(pid, pid) - ticks_before;
    let answer = ask_status();
    set_open_files_limit(pid, 1024);
    drop(waiting);
    let after = call(&sock, Request::Status, CALL_TIMEOUT);
    call(&sock, Request::Shutdown, CALL_TIMEOUT).unwrap();
    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();

    // Spinning on EMFILE was 100% of a core (300 ticks in 3 s) and millions of lines.
    assert!(ticks < 60, "the VMM thread used {ticks} ticks of CPU in 3 s while it could not accept");
    let warnings = stderr.lines().filter(|l| l.contains("cannot accept new connections")).count();
    assert_eq!(warnings, 1, "{stderr}");
    assert!(stderr.contains("Too many open files"), "{stderr}");
    assert_eq!(answer["status"]["state"], "running", "the open connection is still served: {answer}");
    assert!(after.is_ok(), "new connections are accepted once descriptors are back: {after:?}");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn kvm_snapshot_request_with_an_empty_or_relative_dir_is_refused() {
    if !kvm_or_skip("kvm_snapshot_request_with_an_empty_or_relative_dir_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let sock = dir.path().join("vm.sock");
    let mut cmd = common::vmm();
    cmd.args(["--mem", "64", "--cmdline", "ws=2 hb=100"]).arg("--api-sock").arg(&sock).current_dir(&work);
    let mut vm = novacron_guest_image::watch::Watched::spawn(cmd).unwrap();
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let snapshot = |dir: &str| call(&sock, Request::Snapshot { dir: dir.into(), paused: false }, CALL_TIMEOUT);

    let empty = snapshot("");
    let relative = snapshot("snap");
    let seq = *vm.heartbeats().last().unwrap();
    let alive = vm.wait_for("a later heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s > seq));

    for (r, needle) in [(empty, "dir is empty"), (relative, "dir \"snap\" is relative")] {
        match r {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
                assert!(e.message.contains(needle), "{needle:?} not in {e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "nothing written in the VMM's working directory");
    assert!(alive.is_ok());
}

#[test]
fn kvm_request_missing_a_field_names_its_op() {
    if !kvm_or_skip("kvm_request_missing_a_field_names_its_op") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = test_guest(1, 64, "ws=2 hb=100", Some(&sock));
    vm.wait_for("HB 1", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_))).unwrap();
    let stream = UnixStream::connect(&sock).unwrap();
    stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();

    (&stream).write_all(b"{\"version\":1,\"op\":\"migrate\",\"tls_dir\":\"/tls\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();

    assert_eq!(reply["error"]["kind"], "bad_request");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("bad \"migrate\" request") && message.contains("missing field `to`"), "{message}");
}
