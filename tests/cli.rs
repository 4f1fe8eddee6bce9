//! The `novacron` command line: bad input gets one line and a non-zero status; `vmm run`
//! boots the bundled test guest; the control commands talk to a running VM.

use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Watched, kvm_or_skip};
use std::process::{Command, Output};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(90);

fn novacron(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_novacron")).args(args).output().expect("novacron runs")
}

/// The status is non-zero and stderr is exactly one line that contains `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got {:?}", out.status);
    assert_ne!(out.status.code(), Some(101), "a panic is not an error message: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

#[test]
fn test_vm_run_bad_arguments_get_one_line_errors_and_the_documented_status() {
    // As the README says: 2 for a command line that does not parse, 1 for a VM that
    // cannot be built from it.
    let (usage, build) = (2, 1);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kernel");
    let cases: Vec<(Vec<String>, &str, i32)> = vec![
        (vec!["--vcpus".into(), "9".into()], "--vcpus", usage),
        (vec!["--vcpus".into(), "zero".into()], "--vcpus", usage),
        (vec!["--mem".into(), "-5".into()], "-5", usage),
        (vec!["--mem".into(), "lots".into()], "--mem", usage),
        (vec!["--bogus".into()], "--bogus", usage),
        (vec!["--net".into(), "tap=t0,queues=2".into()], "unknown net setting", usage),
        (vec!["--mem".into(), "4".into()], "too small", build),
        (vec!["--mem".into(), "999999999".into()], "more than this host", build),
        (vec!["--kernel".into(), missing.display().to_string()], "does not exist", build),
        (vec!["--kernel".into(), dir.path().display().to_string()], "not a regular file", build),
        (vec!["--initrd".into(), missing.display().to_string()], "initrd", build),
    ];
    for (args, needle, code) in cases {
        let mut full = vec!["vmm", "run"];
        full.extend(args.iter().map(String::as_str));
        let out = novacron(&full);
        assert_one_line_error(&out, needle);
        assert_eq!(out.status.code(), Some(code), "{full:?}");
    }
}

#[test]
fn test_control_commands_without_a_vm_say_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    for verb in ["pause", "resume", "status", "shutdown"] {
        let out = novacron(&["vmm", verb, "--api-sock", sock.to_str().unwrap()]);
        assert_one_line_error(&out, "is the VM running");
    }
}

#[test]
fn test_migrate_and_receive_worker_counts_outside_1_to_256_are_refused_in_one_line() {
    for bad in ["0", "257", "many"] {
        let migrate = ["vmm", "migrate", "--api-sock", "/nonexistent", "--to", "127.0.0.1:1", "--workers", bad];
        let receive = ["vmm", "receive", "--listen", "127.0.0.1:0", "--tls-dir", "/nonexistent", "--workers", bad];
        for args in [&migrate[..], &receive[..]] {
            let out = novacron(args);
            assert_one_line_error(&out, "--workers");
            assert_eq!(out.status.code(), Some(2), "{args:?}");
        }
    }
}

#[test]
fn test_unknown_command_is_one_line() {
    assert_one_line_error(&novacron(&["vmm", "teleport"]), "teleport");
}

#[test]
fn kvm_cli_vm_run_boots_test_guest_and_controls_it() {
    if !kvm_or_skip("kvm_cli_vm_run_boots_test_guest_and_controls_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_novacron"));
    cmd.args(["vmm", "run", "--vcpus", "2", "--mem", "128", "--cmdline", "ws=8 hb=100 verify=300", "--api-sock"])
        .arg(&sock);
    let mut vm = Watched::spawn(cmd).unwrap();
    vm.wait_verified(1, TIMEOUT).unwrap();

    let status = novacron(&["vmm", "status", "--api-sock", sock.to_str().unwrap(), "--output", "json"]);
    let paused = novacron(&["vmm", "pause", "--api-sock", sock.to_str().unwrap()]);
    let table = novacron(&["vmm", "status", "--api-sock", sock.to_str().unwrap()]);
    let resumed = novacron(&["vmm", "resume", "--api-sock", sock.to_str().unwrap()]);
    let seq = *vm.heartbeats().last().unwrap();
    vm.wait_for("a heartbeat after resume", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s > seq))
        .unwrap();
    let shut = novacron(&["vmm", "shutdown", "--api-sock", sock.to_str().unwrap()]);
    let (exit, _) = vm.wait_exit(TIMEOUT).unwrap();

    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        (json["state"].as_str(), json["vcpus"].as_u64(), json["mem_mib"].as_u64()),
        (Some("running"), Some(2), Some(128))
    );
    assert!(paused.status.success() && resumed.status.success() && shut.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("paused")), "{table}");
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn kvm_demo_tells_the_whole_story_and_succeeds() {
    if !kvm_or_skip("kvm_demo_tells_the_whole_story_and_succeeds") {
        return;
    }
    // The demo's daemons run the VMM of this build (made here when missing or stale).
    let out = Command::new(env!("CARGO_BIN_EXE_novacron"))
        .args(["demo", "--mem", "128", "--ws", "8"])
        .env("NOVACRON_VMM", novacron_guest_image::binaries::vmm_binary())
        .output()
        .expect("novacron runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout.split("NovaCron demo summary").nth(1).unwrap_or_else(|| panic!("no summary:\n{stdout}"));
    let row = |label: &str| {
        let line = summary.lines().find_map(|l| l.trim_start().strip_prefix(label));
        line.unwrap_or_else(|| panic!("no {label:?} row in the summary:\n{summary}")).trim().to_string()
    };
    let migration = row("live migration");
    let pause = row("pause the guest saw");
    let verified: u64 = row("VERIFY OK").split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let beats: Vec<u64> = pause.split("HB ").skip(1).filter_map(|w| w.split(' ').next()?.parse().ok()).collect();

    assert_eq!(row("VERIFY FAIL"), "0", "the guest's memory was corrupted:\n{stdout}");
    // One verification before the move, one after it, one after the restart, at least.
    assert!(verified >= 3, "{summary}");
    assert!(migration.contains(" ms in all, ") && !migration.contains('?'), "{migration}");
    assert!(row("downtime").ends_with("switchover)") && !row("downtime").starts_with('?'), "{summary}");
    assert_eq!(beats.len(), 2, "{pause}");
    assert_eq!(beats[1], beats[0] + 1, "the heartbeats go on across the move: {pause}");
    assert!(row("restarts").starts_with("1 "), "{summary}");
    assert!(row("SIGKILL -> heartbeat").ends_with(" ms"), "{summary}");
}
