//! The daemon against a careful, hostile user (issue 18): a full data dir, an emptied or
//! damaged state store, idle connections that never authenticate, a snapshot of another
//! VM, a receive that clashes with a VM, a snapshot into a full directory, files that are
//! not kernels, a token file that is not a token. Each test checks that nothing is lost
//! (the guest runs on and verifies its memory, the VM stays manageable) and that the error
//! names its cause. Real daemon and VMM processes, a real tmpfs, real sockets.

mod common;

use common::daemon::{Daemon, cpu_time, open_fds, pid_of, refusal_line, serial, str_of, wait_heartbeat};
use common::stderr;
use novacron_daemon::pb;
use novacron_guest_image::report::{GuestLine, parse};
use novacron_guest_image::watch::kvm_or_skip;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WORKLOAD: &str = "ws=1 rate=50 verify=1000 hb=100";

fn create(d: &Daemon, name: &str, cmdline: &str) -> serde_json::Value {
    d.json(&["vm", "create", name, "--mem", "32", "--cmdline", cmdline])
}

fn running(d: &Daemon, name: &str) -> serde_json::Value {
    d.wait_vm(name, "ran", |v| str_of(v, "phase") == "running")
}

fn serial_of(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(str_of(v, "serial_log"))
}

/// The guest's `VERIFY OK` lines so far.
fn verified(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| matches!(parse(l), GuestLine::VerifyOk { .. })).count()
}

/// Waits until the guest has verified its memory more than `count` times.
fn wait_verified(log: &Path, count: usize) {
    let deadline = Instant::now() + common::TIMEOUT;
    while verified(log) <= count {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains("VERIFY FAIL"), "{text}");
        assert!(Instant::now() < deadline, "no VERIFY OK after {count} in {}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A refused call: status 1, one line naming what is expected.
fn refused(d: &Daemon, args: &[&str], expected: &[&str]) -> String {
    let out = d.cli(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    for e in expected {
        assert!(err.contains(e), "{args:?}: no {e:?} in: {err}");
    }
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
    err
}

/// Fills the file system of `dir` with one file until a write fails; answers that file.
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("fill");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 1] {
        let bytes = vec![0xa5u8; chunk];
        while file.write_all(&bytes).is_ok() {}
    }
    let _ = file.sync_all();
    path
}

/// Waits until the file has not grown for a second: its writer's writes fail.
fn wait_stalled(path: &Path) {
    let deadline = Instant::now() + common::TIMEOUT;
    let size = || std::fs::metadata(path).map_or(0, |m| m.len());
    loop {
        let before = size();
        std::thread::sleep(Duration::from_secs(1));
        if size() == before {
            return;
        }
        assert!(Instant::now() < deadline, "{} kept growing on a full file system", path.display());
    }
}

/// Pads a file to a whole number of the file system's blocks, so that its next write needs
/// a new block (on a full file system, a write into the last block's free room succeeds).
fn pad_to_block(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    let block = meta.blksize();
    let pad = (block - meta.len() % block) % block;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(&vec![b'.'; pad as usize]).unwrap();
}

/// A call that needs the store on a full disk: either it succeeded (and was saved: checked
/// after the restart), or it was refused in one line naming the cause. Answers whether it
/// succeeded.
fn saved_or_refused(d: &Daemon, args: &[&str]) -> bool {
    let out = d.cli(args);
    if out.status.success() {
        return true;
    }
    let err = stderr(&out);
    for cause in ["the state store could not save", "No space left on device"] {
        assert!(err.contains(cause), "{args:?}: no {cause:?} in: {err}");
    }
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
    false
}

#[test]
fn kvm_a_full_data_dir_ends_no_guest_and_reports_no_unsaved_write() {
    if !kvm_or_skip("kvm_a_full_data_dir_ends_no_guest_and_reports_no_unsaved_write") {
        return;
    }
    let mut d = Daemon::new("h1", &[]);
    d.mount_tmpfs("24m");
    d.restart("127.0.0.1:0");
    // A line every 20 ms: the console soon needs a block the full file system has not.
    create(&d, "steady", "ws=1 rate=50 verify=500 hb=20");
    create(&d, "other", WORKLOAD);
    d.ok(&["vm", "create", "idle", "--no-start", "--mem", "32"]);
    let (steady, other) = (running(&d, "steady"), running(&d, "other"));
    let log = serial_of(&steady);
    let first = wait_heartbeat(&log, 2);
    pad_to_block(&d.data_dir().join("run/steady.vmm.log"));

    let fill = fill_up(d.data_dir());
    // The console's writes fail now, and the VMM says so in its log, which fails too.
    wait_stalled(&log);

    // A write into blocks the store already has may still succeed; the store grows with
    // every event, so defining and deleting a VM soon needs a block there is no room for.
    let churn_exists = d.grpc(async |mut client| {
        let spec = pb::VmSpec { name: "churn".into(), vcpus: 1, mem_mib: 32, ..Default::default() };
        let mut exists = false;
        for _ in 0..2000 {
            let answer = if exists {
                client.delete_vm(pb::VmRef { name: "churn".into() }).await.map(|_| false)
            } else {
                client
                    .create_vm(pb::CreateVmRequest { spec: Some(spec.clone()), start: Some(false) })
                    .await
                    .map(|_| true)
            };
            match answer {
                Ok(made) => exists = made,
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("the state store could not save"), "{status:?}");
                    assert!(status.message().contains("No space left on device"), "{status:?}");
                    return exists;
                }
            }
        }
        panic!("no write of the store ever failed on the full disk");
    });
    // Calls that need the store now: each is saved, or refused naming the cause.
    let stopped = saved_or_refused(&d, &["vm", "stop", "other"]);
    let started = saved_or_refused(&d, &["vm", "start", "idle"]);
    std::thread::sleep(Duration::from_secs(1));
    let steady_now = d.vm("steady");
    assert_eq!((str_of(&steady_now, "phase"), pid_of(&steady_now)), ("running", pid_of(&steady)));
    assert_eq!(steady_now["restarts"], 0, "the guest was never ended: {steady_now}");
    let other_now = d.vm("other");
    if stopped {
        assert_eq!(str_of(&other_now, "phase"), "stopped");
    } else {
        assert_eq!((str_of(&other_now, "phase"), pid_of(&other_now)), ("running", pid_of(&other)), "a refused stop");
    }

    // Room again: the guest's console goes on and it verifies its memory; the store saves
    // again without a restart of the daemon.
    let verified_before = verified(&log);
    std::fs::remove_file(&fill).unwrap();
    let last_before = serial(&log).0.last().copied().unwrap_or(first);
    wait_heartbeat(&log, last_before);
    wait_verified(&log, verified_before);
    assert_eq!(serial(&log).1, 1, "one boot: never restarted");
    assert_eq!(pid_of(&d.vm("steady")), pid_of(&steady));
    d.ok(&["vm", "create", "after", "--no-start", "--mem", "32"]);

    // What was reported is what was saved: the next daemon finds exactly that.
    d.kill();
    d.restart("127.0.0.1:0");
    let listed = d.json(&["vm", "list"]);
    let mut names: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["spec"]["name"].as_str().unwrap()).collect();
    names.retain(|n| *n != "churn");
    assert_eq!(names, ["after", "idle", "other", "steady"]);
    let churn = d.cli(&["vm", "show", "churn"]).status.success();
    assert_eq!(churn, churn_exists, "churn is there exactly when its create was the last saved");
    let phase = |name| str_of(&d.vm(name), "phase").to_string();
    assert_eq!(phase("other") == "stopped", stopped, "the stop is saved exactly when it said so");
    assert_eq!(phase("idle") != "stopped", started, "the start is saved exactly when it said so");
    let again = d.vm("steady");
    assert_eq!((str_of(&again, "phase"), pid_of(&again)), ("running", pid_of(&steady)));
}

/// A daemon with one running VM, killed as a crash would (its VMM runs on); answers the
/// VM and its last heartbeat.
fn daemon_killed_with_a_running_vm() -> (Daemon, serde_json::Value, u64) {
    let mut d = Daemon::start("h1");
    create(&d, "web", WORKLOAD);
    let web = running(&d, "web");
    let beat = wait_heartbeat(&serial_of(&web), 2);
    d.kill();
    (d, web, beat)
}

#[test]
fn kvm_an_emptied_store_is_refused_naming_the_vmms_that_still_run() {
    if !kvm_or_skip("kvm_an_emptied_store_is_refused_naming_the_vmms_that_still_run") {
        return;
    }
    let (mut d, web, beat) = daemon_killed_with_a_running_vm();
    let store = d.data_dir().join("state.redb");
    std::fs::File::create(&store).unwrap();

    let (code, err) = d.start_refused();

    assert_eq!(code, Some(1), "{err}");
    let line = refusal_line(&err);
    let pid = pid_of(&web);
    for expected in [store.display().to_string(), "empty (0 bytes)".into(), format!("web (pid {pid})")] {
        assert!(line.contains(&expected), "no {expected:?} in: {line}");
    }
    assert!(line.contains(&format!("kill {pid}")) && line.contains("backup"), "says what to do: {line}");
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 0, "the store was left as it was");
    wait_heartbeat(&serial_of(&web), beat + 3);
    assert_eq!(d.vmm_pids(), [pid], "the guest runs on, once");

    // As it says: a store moved away gives an empty one. The cluster's record still has
    // the VM, so no other VM takes its name; the VMM the new store does not know blocks the
    // record's VM from being made again here, with the way out, rather than a second VMM
    // failing on its socket.
    std::fs::rename(&store, d.data_dir().join("state.redb.damaged")).unwrap();
    d.restart("127.0.0.1:0");
    refused(&d, &["vm", "create", "web", "--mem", "32"], &["already exists"]);
    let deadline = Instant::now() + common::TIMEOUT;
    while !d.log().contains(&format!("VMM process {pid} serves")) {
        assert!(Instant::now() < deadline, "the orphan was not reported: {}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.vmm_pids(), [pid]);
    // SAFETY: kill has no memory effects; the pid is this test's VMM.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    while !d.vmm_pids().iter().all(|p| *p != pid) {
        assert!(Instant::now() < deadline, "the VMM did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Then the daemon makes the VM again from the cluster's record, by itself.
    let again = running(&d, "web");
    assert_ne!(pid_of(&again), pid);
    assert_eq!(d.vmm_pids(), [pid_of(&again)], "one VMM");
}

#[test]
fn kvm_a_damaged_store_is_refused_without_a_panic() {
    if !kvm_or_skip("kvm_a_damaged_store_is_refused_without_a_panic") {
        return;
    }
    let (mut d, web, beat) = daemon_killed_with_a_running_vm();
    let store = d.data_dir().join("state.redb");
    let good = std::fs::read(&store).unwrap();
    let pid = pid_of(&web);
    // The header, and every page after it (redb panicked on some such files).
    for range in [0..64, 4096..good.len()] {
        let mut bad = good.clone();
        bad[range.clone()].iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(&store, &bad).unwrap();

        let (code, err) = d.start_refused();

        assert_eq!(code, Some(1), "{range:?}: {err}");
        let line = refusal_line(&err);
        for expected in [store.display().to_string(), "is damaged".into(), format!("web (pid {pid})")] {
            assert!(line.contains(&expected), "{range:?}: no {expected:?} in: {line}");
        }
        assert_eq!(std::fs::read(&store).unwrap(), bad, "{range:?}: the store was left as it was");
    }
    wait_heartbeat(&serial_of(&web), beat + 3);
    assert_eq!(d.vmm_pids(), [pid], "the guest runs on, once");

    // The good store back: the next daemon takes the VM back, the same process.
    std::fs::write(&store, &good).unwrap();
    d.restart("127.0.0.1:0");
    let back = running(&d, "web");
    assert_eq!(pid_of(&back), pid);
}

#[test]
fn idle_unauthenticated_connections_neither_exhaust_nor_spin_the_daemon() {
    let d = Daemon::start("h1");
    let pid = d.pid();
    // Few descriptors to spare: the idle connections below would take them all.
    let base = open_fds(pid);
    let limit = libc::rlimit { rlim_cur: (base + 32) as u64, rlim_max: (base + 32) as u64 };
    // The pid is this test's daemon.
    // SAFETY: prlimit reads `limit` and writes nothing (no old-limit pointer).
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    // Ten times the connections the daemon lets wait to authenticate, none saying a word.
    let opened = Instant::now();
    let idle: Vec<std::net::TcpStream> = (0..10 * novacron_daemon::listen::MAX_PENDING)
        .map(|_| std::net::TcpStream::connect(&d.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (cpu_before, since) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, elapsed) = (cpu_time(pid) - cpu_before, since.elapsed());

    // It does not spin, and an operator still gets through.
    assert!(cpu < elapsed / 4, "the daemon used {cpu:?} of CPU in {elapsed:?}: it spins");
    let listed = d.json(&["vm", "list"]);
    assert_eq!(listed, serde_json::json!([]));
    // Every idle connection is closed by the daemon, at the latest its timeout after.
    let patience = novacron_daemon::listen::PENDING_TIMEOUT + Duration::from_secs(10);
    for mut conn in idle {
        use std::io::Read;
        conn.set_read_timeout(Some(patience.saturating_sub(opened.elapsed()).max(Duration::from_millis(1)))).unwrap();
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed within {patience:?}: {other:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(open_fds(pid) <= base + 2, "descriptors back: {} now, {base} before", open_fds(pid));
    assert!(d.log().contains("cannot accept a connection on the control port"), "EMFILE was met: {}", d.log());
}

#[test]
fn kvm_restore_refuses_another_vms_snapshot_and_one_of_another_shape() {
    if !kvm_or_skip("kvm_restore_refuses_another_vms_snapshot_and_one_of_another_shape") {
        return;
    }
    let d = Daemon::start("h1");
    create(&d, "web", WORKLOAD);
    create(&d, "twin", WORKLOAD);
    d.ok(&["vm", "create", "big", "--vcpus", "2", "--mem", "64", "--cmdline", WORKLOAD]);
    for name in ["web", "twin", "big"] {
        running(&d, name);
    }
    let snap = |name: &str| {
        let dir = d.data_dir().join(format!("snap-{name}"));
        d.ok(&["vm", "snapshot", name, "--to", dir.to_str().unwrap()]);
        dir.display().to_string()
    };
    let (of_big, of_twin) = (snap("big"), snap("twin"));
    d.ok(&["vm", "stop", "web"]);

    refused(
        &d,
        &["vm", "restore", "web", "--from", &of_big],
        &["2 vCPUs, the VM 1", "64 MiB of memory, the VM 32 MiB"],
    );
    refused(&d, &["vm", "restore", "web", "--from", &of_twin], &["written of VM twin, not of VM web"]);
    let code = d.grpc(async |mut c| {
        let request = pb::RestoreRequest { name: "web".into(), dir: of_big.clone() };
        c.restore_vm(request).await.unwrap_err().code()
    });

    assert_eq!(code, tonic::Code::FailedPrecondition);
    let web = d.vm("web");
    assert_eq!((str_of(&web, "phase"), pid_of(&web)), ("stopped", 0), "nothing was started: {web}");
    assert_eq!((web["spec"]["vcpus"].as_u64(), web["spec"]["mem_mib"].as_u64()), (Some(1), Some(32)));
    assert_eq!(d.vmm_pids().len(), 2, "twin and big only");
    // Its own snapshot it takes.
    d.ok(&["vm", "start", "web"]);
    running(&d, "web");
    let of_web = snap("web");
    d.ok(&["vm", "stop", "web"]);
    d.ok(&["vm", "restore", "web", "--from", &of_web]);
    running(&d, "web");
}

#[test]
fn kvm_a_refused_receive_leaves_the_existing_vm_manageable() {
    if !kvm_or_skip("kvm_a_refused_receive_leaves_the_existing_vm_manageable") {
        return;
    }
    let d = Daemon::start("h1");
    let web = create(&d, "web", WORKLOAD);
    running(&d, "web");
    let socket = PathBuf::from(str_of(&web, "control_socket"));
    let beat = wait_heartbeat(&serial_of(&web), 2);

    let status = d.grpc(async |mut c| {
        let spec = pb::VmSpec { name: "web".into(), vcpus: 1, mem_mib: 32, ..Default::default() };
        c.receive_vm(pb::ReceiveVmRequest { spec: Some(spec) }).await.unwrap_err()
    });

    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("already exists"), "{status:?}");
    assert!(socket.exists(), "the VM's control socket is still there");
    assert_eq!(str_of(&d.json(&["vm", "pause", "web"]), "phase"), "paused");
    assert_eq!(str_of(&d.json(&["vm", "resume", "web"]), "phase"), "running");
    wait_heartbeat(&serial_of(&web), beat + 3);
    assert_eq!(d.vmm_pids(), [pid_of(&web)], "no receiving VMM was started");
}

#[test]
fn kvm_snapshots_go_into_new_or_empty_directories_only() {
    if !kvm_or_skip("kvm_snapshots_go_into_new_or_empty_directories_only") {
        return;
    }
    let d = Daemon::start("h1");
    create(&d, "web", WORKLOAD);
    running(&d, "web");
    let full = d.data_dir().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let file = d.data_dir().join("a-file");
    std::fs::write(&file, "mine").unwrap();

    refused(&d, &["vm", "snapshot", "web", "--to", full.to_str().unwrap()], &["is not empty", "keep.txt"]);
    refused(&d, &["vm", "snapshot", "web", "--to", file.to_str().unwrap()], &["is a file"]);

    let names: Vec<_> = std::fs::read_dir(&full).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["keep.txt"], "nothing was written into it");
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    assert_eq!(str_of(&d.vm("web"), "phase"), "running", "not paused by a refused snapshot");
    let empty = d.data_dir().join("empty");
    std::fs::create_dir(&empty).unwrap();
    d.ok(&["vm", "snapshot", "web", "--to", empty.to_str().unwrap()]);
    refused(&d, &["vm", "snapshot", "web", "--to", empty.to_str().unwrap()], &["is not empty"]);
}

#[test]
fn create_refuses_a_file_that_is_not_a_kernel_and_a_nul_in_the_command_line() {
    let d = Daemon::start("h1");
    let text = d.data_dir().join("notes.txt");
    std::fs::write(&text, "hello world, a secret").unwrap();
    let empty = d.data_dir().join("empty");
    std::fs::write(&empty, "").unwrap();

    for kernel in [&text, &empty] {
        let err = refused(&d, &["vm", "create", "x", "--kernel", kernel.to_str().unwrap()], &["is not a kernel"]);
        assert!(err.contains(kernel.to_str().unwrap()), "{err}");
        assert!(!err.contains("68 65"), "the file's bytes are not shown: {err}");
    }
    let status = d.grpc(async |mut c| {
        let spec = pb::VmSpec {
            name: "x".into(),
            vcpus: 1,
            mem_mib: 32,
            cmdline: "hb=100\0init=/x".into(),
            ..Default::default()
        };
        c.create_vm(pb::CreateVmRequest { spec: Some(spec), start: Some(true) }).await.unwrap_err()
    });

    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("NUL byte (at byte 6)"), "{status:?}");
    assert_eq!(d.json(&["vm", "list"]), serde_json::json!([]), "nothing was created");
    assert!(d.vmm_pids().is_empty());
    assert!(!d.data_dir().join("run/x.vmm.log").exists(), "no VMM started, so no log");
}

#[test]
fn kvm_vmm_logs_consoles_and_sockets_are_the_daemon_users_only() {
    if !kvm_or_skip("kvm_vmm_logs_consoles_and_sockets_are_the_daemon_users_only") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start("h1");
    create(&d, "web", WORKLOAD);
    running(&d, "web");
    d.ok(&["vm", "stop", "web"]);
    d.ok(&["vm", "start", "web"]);
    running(&d, "web");

    let mode = |name: &str| std::fs::metadata(d.data_dir().join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("run"), 0o700, "the runtime dir (control sockets)");
    for file in ["run/web.vmm.log", "run/web.serial", "run/web.serial.prev"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
}

#[test]
fn a_token_file_that_is_not_a_token_is_one_line_and_the_cli_never_dies_of_sigpipe() {
    use std::os::unix::process::ExitStatusExt;
    let d = Daemon::start("h1");
    let tmp = tempfile::tempdir().unwrap();
    let huge = tmp.path().join("token");
    std::fs::write(&huge, vec![b'a'; 1 << 20]).unwrap();
    let cli = |args: &[&str]| common::novacron().arg("--tls-dir").arg(d.tls_dir()).args(args).output().unwrap();

    let out = cli(&["--endpoint", &d.addr, "--token-file", huge.to_str().unwrap(), "vm", "list"]);
    let err = stderr(&out);
    assert_eq!((out.status.code(), out.status.signal()), (Some(1), None), "{err}");
    assert!(err.contains("1048576 bytes") && err.contains(huge.to_str().unwrap()), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // A peer that closes the connection at once: an error with a message, not a death.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in peer.incoming().flatten() {
            drop(conn);
        }
    });
    let out = cli(&["--endpoint", &peer_addr, "vm", "list"]);
    let err = stderr(&out);
    assert_eq!((out.status.code(), out.status.signal()), (Some(1), None), "{err}");
    assert!(err.starts_with("novacron: cannot") && err.trim_end().lines().count() == 1, "{err}");

    // Its output's reader gone: the command ends quietly, by itself, not by SIGPIPE.
    let mut child = common::novacron()
        .args(["--endpoint", &d.addr, "--tls-dir"])
        .arg(d.tls_dir())
        .args(["vm", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!((out.status.code(), out.status.signal()), (Some(0), None), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");

    // And SIGPIPE is ignored while it runs (a socket closed under it is then an error).
    let mut follow = common::novacron()
        .args(["--endpoint", &d.addr, "--tls-dir"])
        .arg(d.tls_dir())
        .args(["events", "--follow"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", follow.id())).unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    let ignored = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).map(|m| u64::from_str_radix(m.trim(), 16));
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    assert!(ignored.is_some_and(|m| m.is_ok_and(|m| m & sigpipe != 0)), "SIGPIPE not ignored: {status}");
}
