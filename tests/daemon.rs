//! The daemon as an operator runs it: a real `novacron daemon` process, the CLI over its
//! gRPC port, real VMM processes running the test guest.

mod common;

use common::daemon::{Daemon, pid_of, serial, str_of, wait_heartbeat};
use common::stderr;
use novacron_guest_image::watch::kvm_or_skip;
use std::path::PathBuf;

const WORKLOAD: &str = "ws=1 rate=50 verify=1000 hb=100";
/// The guest's heartbeat period is 100 ms; a gap of more than this many is a hole.
const MAX_GAP: u64 = 1;

fn create(d: &Daemon, name: &str, restart: &str) -> serde_json::Value {
    d.json(&["vm", "create", name, "--mem", "32", "--cmdline", WORKLOAD, "--restart", restart])
}

fn running(d: &Daemon, name: &str) -> serde_json::Value {
    d.wait_vm(name, "ran", |v| str_of(v, "phase") == "running")
}

fn serial_of(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(str_of(v, "serial_log"))
}

/// Every heartbeat follows the one before it.
fn assert_no_hole(beats: &[u64], what: &str) {
    for pair in beats.windows(2) {
        assert!(pair[1] > pair[0] && pair[1] - pair[0] <= MAX_GAP, "{what}: heartbeat {} after {}", pair[1], pair[0]);
    }
}

#[test]
fn kvm_a_killed_daemon_leaves_its_guests_running_and_the_next_one_readopts_them() {
    if !kvm_or_skip("kvm_a_killed_daemon_leaves_its_guests_running_and_the_next_one_readopts_them") {
        return;
    }
    let mut d = Daemon::start("h1");
    create(&d, "alpha", "always");
    create(&d, "beta", "on-failure");
    d.json(&["vm", "create", "gamma", "--mem", "32", "--no-start"]);
    let (alpha, beta) = (running(&d, "alpha"), running(&d, "beta"));
    let (alpha_log, beta_log) = (serial_of(&alpha), serial_of(&beta));
    let seen = wait_heartbeat(&alpha_log, 2).min(wait_heartbeat(&beta_log, 2));

    // The daemon dies; the guests do not notice.
    d.kill();
    let alpha_beat = wait_heartbeat(&alpha_log, seen + 3);
    wait_heartbeat(&beta_log, seen + 3);
    d.restart("127.0.0.1:0");

    let listed = d.json(&["vm", "list"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["spec"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"], "no VM lost, none doubled");
    let (alpha2, beta2, gamma2) = (d.vm("alpha"), d.vm("beta"), d.vm("gamma"));
    assert_eq!((pid_of(&alpha2), pid_of(&beta2)), (pid_of(&alpha), pid_of(&beta)), "the same processes");
    assert_eq!((str_of(&alpha2, "phase"), str_of(&gamma2, "phase")), ("running", "stopped"));
    let mut pids = d.vmm_pids();
    pids.sort();
    let mut expected = vec![pid_of(&alpha), pid_of(&beta)];
    expected.sort();
    assert_eq!(pids, expected, "exactly one VMM per running VM, and none for the stopped one");
    wait_heartbeat(&alpha_log, alpha_beat + 2);
    let (beats, boots) = serial(&alpha_log);
    assert_eq!(boots, 1, "not rebooted");
    assert_no_hole(&beats, "alpha across the daemon's restart");

    // The new daemon supervises them: a SIGKILLed VMM is restarted, its neighbour goes on.
    let before = serial(&beta_log).0.len();
    // SAFETY: kill has no memory effects; the pid is this test's VMM.
    unsafe { libc::kill(pid_of(&alpha) as i32, libc::SIGKILL) };
    let again = d.wait_vm("alpha", "restarted", |v| v["restarts"] == 1 && str_of(v, "phase") == "running");
    assert_ne!(pid_of(&again), pid_of(&alpha));
    wait_heartbeat(&alpha_log, 0);
    let beta_beats = serial(&beta_log).0;
    assert!(beta_beats.len() > before);
    assert_no_hole(&beta_beats, "beta while alpha restarted");
    assert_eq!(d.vm("beta")["restarts"], 0);

    let events = d.ok(&["events", "--vm", "alpha"]);
    for kind in ["created", "started", "adopted", "restarted"] {
        assert!(events.contains(kind), "no {kind} event: {events}");
    }
}

#[test]
fn kvm_stop_start_snapshot_restore_and_delete_through_the_port() {
    if !kvm_or_skip("kvm_stop_start_snapshot_restore_and_delete_through_the_port") {
        return;
    }
    let d = Daemon::start("h1");
    let vm = create(&d, "web", "on-failure");
    let log = serial_of(&vm);
    running(&d, "web");
    wait_heartbeat(&log, 2);

    let snap = d.data_dir().join("snap");
    let out = d.ok(&["vm", "snapshot", "web", "--to", snap.to_str().unwrap(), "--paused"]);
    assert!(out.contains("succeeded") && out.contains("snapshot written"), "{out}");
    assert_eq!(str_of(&d.vm("web"), "phase"), "paused", "--paused leaves it paused");
    let at_snapshot = *serial(&log).0.last().unwrap();

    let stopped = d.json(&["vm", "stop", "web"]);
    assert_eq!((str_of(&stopped, "phase"), pid_of(&stopped)), ("stopped", 0));
    assert!(d.vmm_pids().is_empty());

    let restored = d.json(&["vm", "restore", "web", "--from", snap.to_str().unwrap()]);
    assert_ne!(pid_of(&restored), 0);
    // Restored paused, as it was snapshotted; resume it.
    d.wait_vm("web", "came back", |v| str_of(v, "phase") == "paused" || str_of(v, "phase") == "running");
    let _ = d.cli(&["vm", "resume", "web"]);
    let next = wait_heartbeat(&log, 0);
    let (_, boots) = serial(&log);
    assert_eq!(boots, 0, "continued from the snapshot, not booted");
    assert!(next > at_snapshot, "the heartbeat sequence goes on from the snapshot: {next} after {at_snapshot}");

    let stopped = d.json(&["vm", "stop", "web"]);
    assert_eq!(str_of(&stopped, "phase"), "stopped");
    let started = d.json(&["vm", "start", "web"]);
    assert_ne!(pid_of(&started), 0);
    running(&d, "web");
    d.ok(&["vm", "delete", "web"]);
    assert_eq!(d.json(&["vm", "list"]), serde_json::json!([]));
    assert!(d.vmm_pids().is_empty());
    let events = d.ok(&["events"]);
    for kind in ["paused", "stopped", "deleted"] {
        assert!(events.contains(kind), "no {kind} event: {events}");
    }
}

#[test]
fn unauthenticated_clients_are_refused() {
    let d = Daemon::start("h1");
    let tmp = tempfile::tempdir().unwrap();
    // Only the CA certificate: can check the daemon, cannot prove anything.
    let ca_only = tmp.path().join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(d.tls_dir().join("ca.pem"), ca_only.join("ca.pem")).unwrap();
    let wrong_token = tmp.path().join("token");
    std::fs::write(&wrong_token, "0123456789abcdef\n").unwrap();
    let run = |tls: &std::path::Path, token: Option<&std::path::Path>, args: &[&str]| {
        let mut cmd = common::novacron();
        cmd.arg("--endpoint").arg(&d.addr).arg("--tls-dir").arg(tls);
        if let Some(t) = token {
            cmd.arg("--token-file").arg(t);
        }
        cmd.args(args).output().unwrap()
    };

    for out in [
        run(&ca_only, None, &["vm", "create", "sneaky", "--no-start"]),
        run(&ca_only, Some(&wrong_token), &["vm", "create", "sneaky", "--no-start"]),
    ] {
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("no valid token") && err.lines().count() == 1, "{err}");
    }
    // A certificate of another cluster's CA: refused at the TLS handshake.
    let other = common::certs(tmp.path(), "other");
    let out = run(&other, None, &["vm", "list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));

    // Nothing was created; the daemon's token and a cluster certificate both work.
    let token = d.data_dir().join("token");
    let out = run(&ca_only, Some(&token), &["vm", "list", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    d.ok(&["vm", "create", "allowed", "--no-start"]);
}

#[test]
fn bad_requests_get_one_line_errors_and_change_nothing() {
    let d = Daemon::start("h1");
    d.ok(&["vm", "create", "db", "--no-start", "--mem", "32"]);
    let before = d.json(&["vm", "list"]);
    let cases: &[(&[&str], &str)] = &[
        (&["vm", "create", "Bad_Name", "--no-start"], "only a-z"),
        (&["vm", "create", "x", "--vcpus", "0", "--no-start"], "vCPU"),
        (&["vm", "create", "x", "--vcpus", "300", "--no-start"], "out of range"),
        (&["vm", "create", "x", "--mem", "4", "--no-start"], "memory"),
        (&["vm", "create", "x", "--mem", "99999999", "--no-start"], "memory"),
        (&["vm", "create", "x", "--kernel", "/no/such/vmlinux", "--no-start"], "/no/such/vmlinux"),
        (&["vm", "create", "db", "--no-start"], "already exists"),
        (&["vm", "create", "x", "--restart", "never", "--max-restarts", "2"], "on-failure only"),
        (&["vm", "start", "nope"], "no VM named"),
        (&["vm", "pause", "db"], "stopped"),
        (&["vm", "show", "nope"], "no VM named"),
        (&["vm", "delete", "nope"], "no VM named"),
        (&["vm", "snapshot", "db", "--to", "/tmp/x"], "stopped"),
        (&["vm", "snapshot", "db", "--to", "relative"], "absolute"),
        (&["vm", "restore", "db", "--from", "/no/such/snap"], "no snapshot"),
        (&["vm", "set-limit", "db", "--device", "disk0"], "changes nothing"),
        (&["vm", "set-limit", "db", "--device", "disk0", "--bw", "fast"], "bw"),
        (&["vm", "operation", "h1-999"], "no operation"),
        (&["events", "--vm", "NOPE"], "only a-z"),
    ];
    for (args, expected) in cases {
        let out = d.cli(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
    }
    assert_eq!(d.json(&["vm", "list"]), before, "no refused request changed anything");
    assert!(d.vmm_pids().is_empty());
}
