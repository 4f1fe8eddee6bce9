//! A hung VMM on a member host (issue 18): stopping it holds up nothing else on that host,
//! so the primary never takes the host for dead and never starts its VMs a second time
//! elsewhere; the stop ends once the VMM runs again.

mod common;

use common::daemon::{Daemon, pid_of, serial, str_of, wait_heartbeat};
use common::stderr;
use novacron_guest_image::watch::kvm_or_skip;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const WORKLOAD: &str = "ws=1 rate=50 verify=1000 hb=100";

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory effects; the pid is this test's VMM.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

fn host_state(primary: &Daemon, host: &str) -> String {
    let hosts = primary.json(&["host", "list"]);
    let found = hosts.as_array().unwrap().iter().find(|h| h["name"] == host).map(|h| str_of(h, "state").to_string());
    found.unwrap_or_default()
}

#[test]
fn kvm_stopping_a_hung_vmm_blocks_nothing_and_never_runs_a_vm_twice() {
    if !kvm_or_skip("kvm_stopping_a_hung_vmm_blocks_nothing_and_never_runs_a_vm_twice") {
        return;
    }
    let h1 = Daemon::start_with("h1", &[]);
    let h2 = Daemon::join("h2", &h1, &[]);
    let deadline = Instant::now() + common::TIMEOUT;
    while host_state(&h1, "h2") != "up" {
        assert!(Instant::now() < deadline, "h2 never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A VM held on h1 makes spread put the next ones on h2; none has a rule that keeps it
    // off h1, so a failover would start them there.
    h1.ok(&["vm", "create", "filler", "--no-start", "--mem", "256"]);
    for name in ["hung", "bystander"] {
        h1.ok(&["vm", "create", name, "--mem", "32", "--cmdline", WORKLOAD, "--restart", "always"]);
    }
    let hung = h1.wait_vm("hung", "ran", |v| str_of(v, "phase") == "running");
    let bystander = h1.wait_vm("bystander", "ran", |v| str_of(v, "phase") == "running");
    assert_eq!((str_of(&hung, "host"), str_of(&bystander, "host")), ("h2", "h2"));
    let log = PathBuf::from(str_of(&bystander, "serial_log"));
    let first = wait_heartbeat(&log, 2);

    signal(pid_of(&hung), libc::SIGSTOP);
    let stop = {
        let (endpoint, tls) = (h1.addr.clone(), h1.tls_dir());
        std::thread::spawn(move || {
            common::novacron()
                .arg("--endpoint")
                .arg(endpoint)
                .arg("--tls-dir")
                .arg(tls)
                .args(["vm", "stop", "hung"])
                .output()
        })
    };
    // Well past the primary's 3 s of silence before a host is down.
    let hung_for = Duration::from_secs(8);
    let since = Instant::now();
    let mut stopping_seen = false;
    while since.elapsed() < hung_for {
        assert!(h1.vmm_pids().is_empty(), "a VM was started a second time on h1");
        assert!(h2.vmm_pids_of("hung").len() <= 1 && h2.vmm_pids_of("bystander").len() == 1);
        assert_eq!(host_state(&h1, "h2"), "up", "the primary took h2 for dead");
        let asked = Instant::now();
        let shown = h1.vm("hung");
        assert!(asked.elapsed() < Duration::from_secs(2), "vm show waited {:?} on the stop", asked.elapsed());
        stopping_seen |= str_of(&shown, "phase") == "stopping";
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(stopping_seen, "the VM being stopped never showed as stopping");
    assert!(!stop.is_finished(), "the stop ended while the VMM was stopped");

    // The VMM runs again: it reads its shutdown request, and the stop ends.
    signal(pid_of(&hung), libc::SIGCONT);
    let out = stop.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let after = h1.vm("hung");
    assert_eq!((str_of(&after, "phase"), pid_of(&after)), ("stopped", 0));
    std::thread::sleep(Duration::from_secs(2));
    assert!(h1.vmm_pids().is_empty() && h2.vmm_pids_of("hung").is_empty(), "no copy of the stopped VM anywhere");
    assert_eq!(h2.vmm_pids_of("bystander"), [pid_of(&bystander)], "the neighbour ran on, once");
    let beats: Vec<u64> = serial(&log).0.into_iter().filter(|b| *b >= first).collect();
    assert!(beats.windows(2).all(|w| w[1] == w[0] + 1), "the neighbour's heartbeats have a hole: {beats:?}");
    assert_eq!(serial(&log).1, 1, "the neighbour never rebooted");
}
