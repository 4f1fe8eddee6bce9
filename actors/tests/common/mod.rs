//! Shared by the actors' integration tests: the VMM binary, a host with its runtime
//! directory, a follower of a VM's serial log, and a guard that kills every VMM process a
//! test left behind (also when it fails).
#![allow(dead_code)]

use novacron_actors::{HostConfig, HostInfo, HostMsg, HostSupervisor, VmInfo, VmMsg, VmPhase, VmSpec};
use ractor::ActorRef;
use std::time::{Duration, Instant};

pub use novacron_guest_image::binaries::{kill_vmms_under, vmm_binary, vmm_pids_under};
pub use novacron_guest_image::watch::{SerialTail, kvm_or_skip};

/// Generous: the guest runs emulated at ~1.3 MIPS on this kind of host.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// A tiny workload: 1 MiB working set, heartbeat every 100 ms.
pub const WORKLOAD: &str = "ws=1 rate=50 verify=1000 hb=100";
pub const HB_PERIOD: Duration = Duration::from_millis(100);

/// A HostSupervisor with its own runtime directory. Dropping it kills every VMM process
/// started under that directory and removes it.
pub struct Host {
    pub actor: ActorRef<HostMsg>,
    pub dir: tempfile::TempDir,
}

impl Host {
    pub async fn start(tweak: impl FnOnce(&mut HostConfig)) -> Host {
        // Short path: a control socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new().prefix("nca").tempdir_in("/tmp").unwrap();
        let mut config = HostConfig::new(dir.path(), vmm_binary());
        config.stop_timeout = Duration::from_secs(3);
        tweak(&mut config);
        let (actor, _) = ractor::Actor::spawn(None, HostSupervisor, config).await.unwrap();
        Host { actor, dir }
    }

    pub async fn create(&self, spec: VmSpec) -> Result<VmInfo, novacron_actors::HostError> {
        ractor::call!(self.actor, HostMsg::CreateVm, spec).unwrap()
    }

    pub async fn get(&self, name: &str) -> VmInfo {
        ractor::call!(self.actor, HostMsg::GetVm, name.to_string()).unwrap().unwrap()
    }

    pub async fn list(&self) -> Vec<VmInfo> {
        ractor::call!(self.actor, HostMsg::ListVms).unwrap()
    }

    pub async fn info(&self) -> HostInfo {
        ractor::call!(self.actor, HostMsg::HostInfo).unwrap()
    }

    pub async fn vm_actor(&self, name: &str) -> ActorRef<VmMsg> {
        ractor::call!(self.actor, HostMsg::VmActor, name.to_string()).unwrap().unwrap()
    }

    /// Polls `GetVm` until `want` holds; panics with the last info after `timeout`.
    pub async fn wait_vm(&self, name: &str, what: &str, want: impl Fn(&VmInfo) -> bool) -> VmInfo {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.get(name).await;
            if want(&info) {
                return info;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {name} to be {what}; it is {info:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_running(&self, name: &str) -> VmInfo {
        self.wait_vm(name, "running", |i| i.phase == VmPhase::Running && i.pid.is_some()).await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.actor.stop(None);
        kill_vmms_under(self.dir.path());
    }
}

/// SIGKILLs a VMM process by pid (the test's own fault injection).
pub fn sigkill(pid: u32) {
    // SAFETY: kill has no memory effects; the pid is a VMM process of this test, alive
    // (its supervisor holds a pidfd and has not reaped it).
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// A test-guest VM with the heartbeat workload.
pub fn spec(name: &str) -> VmSpec {
    let mut spec = VmSpec::new(name, 1, 64);
    spec.cmdline = WORKLOAD.to_string();
    spec
}

/// Polls `tail` until a heartbeat of at least `seq` is seen in its current file.
pub async fn wait_heartbeat(tail: &mut SerialTail, seq: u64) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        tail.poll();
        if let Some(last) = tail.last_heartbeat().filter(|s| *s >= seq) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat {seq} in {} after {TIMEOUT:?}; its lines: {:?}",
            tail.path().display(),
            tail.lines.iter().rev().take(10).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The longest time between two heartbeats in a row, and whether the sequence has holes.
pub fn gaps(heartbeats: &[(Instant, u64)]) -> (Duration, Vec<(u64, u64)>) {
    let mut longest = Duration::ZERO;
    let mut holes = Vec::new();
    for pair in heartbeats.windows(2) {
        longest = longest.max(pair[1].0 - pair[0].0);
        if pair[1].1 != pair[0].1 + 1 {
            holes.push((pair[0].1, pair[1].1));
        }
    }
    (longest, holes)
}
