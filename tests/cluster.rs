//! Several daemons on one machine form a cluster (loopback, own ports and data dirs):
//! placement across three hosts, live migration through the control port, and a dead
//! host's VMs started again on the others, once.

mod common;

use common::daemon::{Daemon, pid_of, serial, str_of, wait_heartbeat};
use common::stderr;
use novacron_guest_image::watch::kvm_or_skip;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WORKLOAD: &str = "ws=4 rate=200 verify=500 hb=100";

fn three_hosts() -> (Daemon, Daemon, Daemon) {
    let h1 = Daemon::start_with("h1", &["--label", "zone=a"]);
    let h2 = Daemon::join("h2", &h1, &["--label", "zone=b"]);
    let h3 = Daemon::join("h3", &h1, &["--label", "zone=b"]);
    // Every host answered the primary's poll at least once.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = h1.json(&["host", "list"]);
        let up = hosts.as_array().unwrap().iter().filter(|h| str_of(h, "state") == "up").count();
        if up == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the hosts never all came up: {hosts}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (h1, h2, h3)
}

fn host_of(d: &Daemon, vm: &str) -> String {
    str_of(&d.vm(vm), "host").to_string()
}

#[test]
fn placement_rules_are_honoured_across_three_hosts() {
    let (h1, h2, _h3) = three_hosts();
    // Anti-affinity: three replicas on three hosts, a fourth fits nowhere.
    for i in 1..=3 {
        let name = format!("web-{i}");
        h1.ok(&[
            "vm",
            "create",
            &name,
            "--no-start",
            "--mem",
            "32",
            "--group",
            "app=web",
            "--anti-affinity",
            "app=web",
        ]);
    }
    let mut hosts: Vec<String> = (1..=3).map(|i| host_of(&h1, &format!("web-{i}"))).collect();
    hosts.sort();
    assert_eq!(hosts, ["h1", "h2", "h3"]);
    let out = h1.cli(&["vm", "create", "web-4", "--no-start", "--group", "app=web", "--anti-affinity", "app=web"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("anti-affinity group app=web"), "{}", stderr(&out));

    // A required host label.
    for i in 1..=3 {
        h1.ok(&["vm", "create", &format!("zoned-{i}"), "--no-start", "--mem", "32", "--host-label", "zone=b"]);
        assert_ne!(host_of(&h1, &format!("zoned-{i}")), "h1", "h1 is in zone a");
    }
    let out = h1.cli(&["vm", "create", "nowhere", "--no-start", "--host-label", "zone=c"]);
    assert!(stderr(&out).contains("label"), "{}", stderr(&out));

    // Affinity: next to its database, wherever that is.
    h1.ok(&["vm", "create", "db", "--no-start", "--mem", "32", "--group", "app=db", "--host-label", "zone=a"]);
    h1.ok(&["vm", "create", "cache", "--no-start", "--mem", "32", "--affinity", "app=db"]);
    assert_eq!(host_of(&h1, "db"), "h1");
    assert_eq!(host_of(&h1, "cache"), "h1");

    // Capacity: a VM as big as a whole host's memory fits on none (each holds VMs).
    let mem = h1.json(&["host", "list"])[0]["mem_mib"].as_u64().unwrap();
    let out = h1.cli(&["vm", "create", "huge", "--no-start", "--mem", &mem.to_string()]);
    assert!(stderr(&out).contains("no host fits VM huge"), "{}", stderr(&out));

    // Every host's endpoint shows the whole cluster.
    let from_member = h2.json(&["vm", "list"]);
    assert_eq!(from_member, h1.json(&["vm", "list"]));
    assert_eq!(from_member.as_array().unwrap().len(), 8);
}

/// The guest went on at the destination (serial log `dst_log`) where it stopped at the
/// source (`src_log`, which had beaten `seen` times): the next heartbeat, no reboot, and
/// its memory verified.
fn assert_went_on(dst_log: &Path, src_log: &Path, seen: u64) {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let text = std::fs::read_to_string(dst_log).unwrap_or_default();
        if text.contains("VERIFY OK") {
            break;
        }
        assert!(!text.contains("VERIFY FAIL"), "{text}");
        assert!(Instant::now() < deadline, "no VERIFY OK at the destination: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (beats, boots) = serial(dst_log);
    assert_eq!(boots, 0, "not booted again");
    assert!(beats[0] > seen, "the heartbeat sequence goes on: {} after {seen}", beats[0]);
    let src_last = *serial(src_log).0.last().unwrap();
    assert_eq!(beats[0], src_last + 1, "no heartbeat lost or repeated");
}

#[test]
fn kvm_a_busy_vm_moves_between_hosts_with_post_copy() {
    if !kvm_or_skip("kvm_a_busy_vm_moves_between_hosts_with_post_copy") {
        return;
    }
    let h1 = Daemon::start("h1");
    let h2 = Daemon::join("h2", &h1, &[]);
    h1.ok(&["vm", "create", "busy", "--vcpus", "2", "--mem", "64", "--cmdline", "ws=4 rate=2000 verify=300 hb=100"]);
    let before = h1.wait_vm("busy", "ran", |v| str_of(v, "phase") == "running");
    assert_eq!(str_of(&before, "host"), "h1", "on empty hosts, spread breaks the tie by name");
    let src_log = PathBuf::from(str_of(&before, "serial_log"));
    // The workload runs once the guest has verified its working set twice.
    let deadline = Instant::now() + common::TIMEOUT;
    while std::fs::read_to_string(&src_log).unwrap_or_default().matches("VERIFY OK").count() < 2 {
        assert!(Instant::now() < deadline, "the guest never verified its memory");
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = wait_heartbeat(&src_log, 3);
    let bad = h1.cli(&["vm", "migrate", "busy", "--to-host", "h2", "--post-copy", "after-rounds=0"]);
    assert!(stderr(&bad).contains("at least 1"), "{}", stderr(&bad));

    // The guest's pages compress well (the daemon compresses), but not below what
    // 50 kB/s carries of 2000 written a second: one round, then post-copy.
    let done = h1.json(&[
        "vm",
        "migrate",
        "busy",
        "--to-host",
        "h2",
        "--max-bandwidth",
        "50k",
        "--post-copy",
        "after-rounds=1",
    ]);
    assert_eq!(str_of(&done, "state"), "succeeded", "{done}");
    let message = str_of(&done, "message");
    assert!(message.contains("post-copy: ") && message.contains("memory verified"), "{done}");
    let after = h1.vm("busy");
    assert_eq!((str_of(&after, "host"), str_of(&after, "phase")), ("h2", "running"), "{after}");
    assert!(h1.vmm_pids().is_empty(), "the source VMM is gone");
    assert_eq!(h2.vmm_pids(), [pid_of(&after)], "one VMM, at the destination");
    assert_went_on(&PathBuf::from(str_of(&after, "serial_log")), &src_log, seen);
}

#[test]
fn kvm_a_vm_migrates_between_hosts_through_the_control_port() {
    if !kvm_or_skip("kvm_a_vm_migrates_between_hosts_through_the_control_port") {
        return;
    }
    let (h1, h2, _h3) = three_hosts();
    // On empty hosts, spread breaks the tie by name: h1.
    h1.ok(&["vm", "create", "mover", "--mem", "64", "--cmdline", WORKLOAD]);
    h1.ok(&["vm", "create", "pinned", "--no-start", "--mem", "32", "--host-label", "zone=a"]);
    let before = h1.wait_vm("mover", "ran", |v| str_of(v, "phase") == "running");
    assert_eq!(str_of(&before, "host"), "h1");
    let src_log = PathBuf::from(str_of(&before, "serial_log"));
    let seen = wait_heartbeat(&src_log, 3);

    // Refused, changing nothing: to where it is, to no such host, an unknown VM.
    for (args, expected) in [
        (["vm", "migrate", "mover", "--to-host", "h1"], "already"),
        (["vm", "migrate", "mover", "--to-host", "h9"], "no host \"h9\""),
        (["vm", "migrate", "ghost", "--to-host", "h2"], "no VM named"),
        (["vm", "migrate", "pinned", "--to-host", "h2"], "lacks label zone=a"),
    ] {
        let out = h1.cli(&args);
        assert!(!out.status.success() && stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    }

    // A dry run predicts and moves nothing: the VM stays, the receiver at h2 goes again.
    let dry = h1.json(&["vm", "migrate", "mover", "--to-host", "h2", "--dry-run"]);
    assert_eq!((str_of(&dry, "state"), str_of(&dry, "kind")), ("succeeded", "migrate-dry-run"), "{dry}");
    let p = &dry["prediction"];
    assert_eq!(p["converges"], true, "{dry}");
    assert!(p["touched_pages"].as_u64().unwrap() > 1024 && p["link_bytes_per_s"].as_u64().unwrap() > 0, "{dry}");
    assert!(str_of(&dry, "message").starts_with("would converge"), "{dry}");
    assert_eq!(host_of(&h1, "mover"), "h1");
    assert_eq!(h1.vmm_pids().len(), 1, "the VM's VMM runs on at h1");
    let deadline = Instant::now() + common::TIMEOUT;
    while !h2.vmm_pids().is_empty() {
        assert!(Instant::now() < deadline, "the dry run's receiver at h2 stayed: {:?}", h2.vmm_pids());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Through a member's endpoint (it passes the request to the primary), slowly enough
    // that a second migration of the VM meanwhile is refused.
    let op = h2.json(&["vm", "migrate", "mover", "--to-host", "h2", "--max-bandwidth", "100k", "--no-wait"]);
    let id = str_of(&op, "id").to_string();
    let second = h1.cli(&["vm", "migrate", "mover", "--to-host", "h3"]);
    assert!(stderr(&second).contains("migrating already"), "{}", stderr(&second));
    let deadline = Instant::now() + common::TIMEOUT;
    let done = loop {
        let op = h1.json(&["vm", "operation", &id]);
        if str_of(&op, "state") != "running" {
            break op;
        }
        assert!(Instant::now() < deadline, "the migration never ended: {op}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(str_of(&done, "state"), "succeeded", "{done}");
    assert!(str_of(&done, "message").contains("memory verified"), "{done}");
    let after = h1.vm("mover");
    assert_eq!(str_of(&after, "host"), "h2");
    assert_eq!(str_of(&after, "phase"), "running");
    assert!(h1.vmm_pids().is_empty(), "the source VMM is gone");
    assert_eq!(host_of(&h1, "pinned"), "h1", "the refused migration changed nothing");
    assert_eq!(h2.vmm_pids(), [pid_of(&after)], "one VMM, at the destination");

    assert_went_on(&PathBuf::from(str_of(&after, "serial_log")), &src_log, seen);

    // The destination supervises it now: a SIGKILLed VMM is restarted there.
    // SAFETY: kill has no memory effects; the pid is this test's VMM.
    unsafe { libc::kill(pid_of(&after) as i32, libc::SIGKILL) };
    let again = h1.wait_vm("mover", "restarted", |v| v["restarts"] == 1 && str_of(v, "phase") == "running");
    assert_eq!(str_of(&again, "host"), "h2");
    let events = h2.ok(&["events", "--vm", "mover"]);
    assert!(events.contains("migrated-in") && events.contains("restarted"), "{events}");
}

#[test]
fn kvm_a_dead_hosts_vms_start_on_the_others_once() {
    if !kvm_or_skip("kvm_a_dead_hosts_vms_start_on_the_others_once") {
        return;
    }
    let (h1, mut h2, mut h3) = three_hosts();
    // Two VMs on one zone-b host (one that must come back, one that must not).
    h1.ok(&["vm", "create", "keep", "--mem", "32", "--cmdline", WORKLOAD, "--host-label", "zone=b", "--group", "g=1"]);
    h1.ok(&["vm", "create", "once", "--mem", "32", "--cmdline", WORKLOAD, "--affinity", "g=1", "--restart", "never"]);
    let dead_host = host_of(&h1, "keep");
    assert_eq!(host_of(&h1, "once"), dead_host, "affinity");
    let (dying, living) = if dead_host == "h2" { (&mut h2, &h3) } else { (&mut h3, &h2) };
    h1.wait_vm("keep", "ran", |v| str_of(v, "phase") == "running");

    // The host dies: its daemon, its keeper (so its lease runs out) and its VMMs.
    dying.kill_host();
    let died = Instant::now();
    let moved = h1.wait_vm("keep", "moved", |v| str_of(v, "host") != dead_host && str_of(v, "phase") == "running");
    let noticed = died.elapsed();
    assert!(noticed < Duration::from_secs(15), "took {noticed:?}");
    wait_heartbeat(&PathBuf::from(str_of(&moved, "serial_log")), 0);
    let hosts = h1.json(&["host", "list"]);
    let state = hosts.as_array().unwrap().iter().find(|h| h["name"] == dead_host.as_str()).map(|h| str_of(h, "state"));
    assert_eq!(state, Some("down"), "{hosts}");

    // The host comes back: it drops the VM that another host owns now.
    dying.restart("127.0.0.1:0");
    let deadline = Instant::now() + common::TIMEOUT;
    let vms = loop {
        let vms = h1.json(&["vm", "list"]);
        let keeps = vms.as_array().unwrap().iter().filter(|v| v["spec"]["name"] == "keep").count();
        let dropped = dying.log().contains("another host owns this VM now");
        if keeps == 1 && dying.vmm_pids().is_empty() && dropped {
            break vms;
        }
        assert!(Instant::now() < deadline, "the returned host kept a copy of 'keep': {vms}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let total: usize = [&h1, living].iter().map(|d| d.vmm_pids().len()).sum();
    assert_eq!(total, 1, "one VMM in the cluster: 'keep'; 'once' has restart policy never: {vms}");
}

#[test]
fn kvm_a_daemon_stopped_on_purpose_is_not_taken_for_dead() {
    if !kvm_or_skip("kvm_a_daemon_stopped_on_purpose_is_not_taken_for_dead") {
        return;
    }
    let (h1, h2, h3) = three_hosts();
    h1.ok(&[
        "vm",
        "create",
        "stays",
        "--mem",
        "32",
        "--cmdline",
        WORKLOAD,
        "--host-label",
        "zone=b",
        "--restart",
        "always",
    ]);
    let before = h1.wait_vm("stays", "ran", |v| str_of(v, "phase") == "running");
    let host = str_of(&before, "host").to_string();
    let mut member = if host == "h2" { h2 } else { h3 };
    let log = PathBuf::from(str_of(&before, "serial_log"));
    let seen = wait_heartbeat(&log, 2);

    // SIGTERM: the daemon goes, its keeper stays: the host keeps its lease, so it is
    // up, and its VM is left alone.
    member.stop();
    let hosts = h1.json(&["host", "list"]);
    let state =
        hosts.as_array().unwrap().iter().find(|h| h["name"] == host.as_str()).map(|h| str_of(h, "state").to_string());
    assert_eq!(state.as_deref(), Some("up"), "{hosts}");
    assert_eq!(member.keeper_pids().len(), 1, "the keeper outlives the daemon");
    std::thread::sleep(Duration::from_secs(5));
    assert!(h1.vmm_pids().is_empty(), "not started elsewhere");
    wait_heartbeat(&log, seen + 5);

    // Back: the same VMM process, adopted, nothing doubled.
    member.restart("127.0.0.1:0");
    let after = h1.wait_vm("stays", "came back", |v| str_of(v, "phase") == "running");
    assert_eq!((pid_of(&after), str_of(&after, "host")), (pid_of(&before), host.as_str()));
    assert_eq!(member.vmm_pids(), [pid_of(&before)]);
    assert_eq!(serial(&log).1, 1, "never rebooted");
}

#[test]
fn kvm_a_drained_hosts_vms_all_move_and_keep_verifying_and_an_impossible_drain_moves_nothing() {
    if !kvm_or_skip("kvm_a_drained_hosts_vms_all_move_and_keep_verifying_and_an_impossible_drain_moves_nothing") {
        return;
    }
    let (h1, h2, h3) = three_hosts();
    h1.ok(&["host", "cordon", "h1"]);
    h1.ok(&["host", "cordon", "h3"]);
    let names = ["d1", "d2", "d3"];
    for name in names {
        h1.ok(&["vm", "create", name, "--mem", "32", "--cmdline", WORKLOAD]);
    }
    let before: Vec<serde_json::Value> =
        names.iter().map(|n| h1.wait_vm(n, "ran", |v| str_of(v, "phase") == "running")).collect();
    assert!(before.iter().all(|v| str_of(v, "host") == "h2"), "all on the one host not cordoned");
    let logs: Vec<PathBuf> = before.iter().map(|v| PathBuf::from(str_of(v, "serial_log"))).collect();
    let seen: Vec<u64> = logs.iter().map(|l| wait_heartbeat(l, 1)).collect();

    // Nowhere to go: refused up front, saying which, and nothing moves.
    let refused = h1.cli(&["host", "drain", "h2"]);
    let err = stderr(&refused);
    assert!(!refused.status.success());
    assert!(names.iter().all(|n| err.contains(&format!("VM {n} "))) && err.contains("nothing was moved"), "{err}");
    assert!(names.iter().all(|n| host_of(&h1, n) == "h2"));

    h1.ok(&["host", "uncordon", "h1"]);
    h1.ok(&["host", "uncordon", "h3"]);
    let drained = h1.ok(&["host", "drain", "h2"]);
    assert!(drained.contains("drained: 3 VMs moved"), "{drained}");
    let status: serde_json::Value = serde_json::from_str(&h1.ok(&["cluster", "status", "--output", "json"])).unwrap();

    assert!(h2.vmm_pids().is_empty(), "nothing left on the drained host");
    for (i, name) in names.iter().enumerate() {
        let after = h1.vm(name);
        let dst = PathBuf::from(str_of(&after, "serial_log"));
        assert_ne!(str_of(&after, "host"), "h2");
        // The guest went on (its heartbeat sequence, no boot) and verifies its memory there.
        let deadline = Instant::now() + common::TIMEOUT;
        while !std::fs::read_to_string(&dst).unwrap_or_default().contains("VERIFY OK") {
            assert!(Instant::now() < deadline, "{name}: no VERIFY OK after the drain");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (beats, boots) = serial(&dst);
        assert_eq!(boots, 0, "{name}: not booted again");
        assert!(beats[0] > seen[i], "{name}: the sequence goes on");
    }
    let total: usize = [&h1, &h3].iter().map(|d| d.vmm_pids().len()).sum();
    assert_eq!(total, 3, "one VMM per VM");
    let hosts = status["hosts"].as_array().unwrap();
    let h2_status = hosts.iter().find(|h| h["name"] == "h2").unwrap();
    assert_eq!(h2_status["cordoned"], true, "{status}");
    for vm in status["vms"].as_array().unwrap() {
        assert_ne!(vm["owner"], "h2", "{status}");
        assert_eq!(vm["epoch"], 2, "one change of owner each: {status}");
    }
}

/// Stops a daemon and its keeper: the host as it was before it ever knew a cluster store.
fn stop_with_keeper(d: &mut Daemon) {
    d.stop();
    for pid in d.keeper_pids() {
        // SAFETY: kill has no memory effects; the pid is this test's keeper.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.keeper_pids().is_empty() {
        assert!(Instant::now() < deadline, "the keeper outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A data dir whose VMs the cluster store has never recorded (from before the store, or
/// moved to a new one): its VMs become the host's records, are not taken for VMs the
/// cluster deleted (those are deleted on their host), and a VM of the same name elsewhere
/// in the cluster makes the daemon refuse to join, saying which, with nothing changed.
#[test]
fn a_data_dir_from_before_the_cluster_store_keeps_its_vms_and_a_namesake_in_the_cluster_is_refused() {
    let mut old = Daemon::start("old");
    old.ok(&["vm", "create", "kept", "--mem", "32", "--no-start"]);
    stop_with_keeper(&mut old);
    std::fs::remove_file(old.data_dir().join("cluster.redb")).unwrap();
    old.start_again();
    // Two reconcile rounds (2 s each) and more: a VM without a record would be gone.
    std::thread::sleep(Duration::from_secs(5));
    let kept = old.vm("kept");
    assert_eq!((str_of(&kept, "phase"), str_of(&kept, "host")), ("stopped", "old"), "{kept}");
    assert_eq!(old.vm_names(), ["kept"]);

    // Another cluster holds a VM "kept" too: joining it would make one name two VMs.
    let other = Daemon::start("other");
    other.ok(&["vm", "create", "kept", "--mem", "32", "--no-start"]);
    stop_with_keeper(&mut old);
    let tls = old.data_dir().join("joined-tls");
    common::issue_cert("old", &other.tls_dir(), &tls);
    let own = std::mem::replace(
        &mut old.extra,
        vec!["--tls-dir".into(), tls.display().to_string(), "--join".into(), other.addr.clone()],
    );
    let (code, err) = old.start_refused();
    assert_ne!(code, Some(0));
    assert!(
        err.contains("VM kept of this data dir has a namesake in the cluster, on host other"),
        "the refusal names the VM and the host: {err}"
    );
    assert!(old.keeper_pids().is_empty(), "a refused daemon starts no keeper: {err}");
    let hosts = other.json(&["host", "list"]);
    assert!(hosts.as_array().unwrap().iter().all(|h| h["name"] != "old"), "old never joined: {hosts}");
    assert_eq!(str_of(&other.vm("kept"), "host"), "other");

    // On its own store again, its VM is still there.
    old.extra = own;
    old.start_again();
    assert_eq!(str_of(&old.vm("kept"), "host"), "old");
}
