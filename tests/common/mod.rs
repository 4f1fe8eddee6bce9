//! What the migration tests (`migration.rs`, `wan.rs`) share: the `novacron` binary,
//! certificates, a VM process with its control socket, and the assertions on where the
//! VM ended up.
#![allow(dead_code)]

pub mod daemon;
pub mod netns;
pub mod vmm;

use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Line, Watched};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(90);

/// A migration slow enough to interrupt: 1 MB/s for pages sent whole.
pub const SLOW: [&str; 4] = ["--max-bandwidth", "1M", "--compress", "none"];

pub fn novacron() -> Command {
    Command::new(env!("CARGO_BIN_EXE_novacron"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fresh cluster CA and node certificate in `dir/name`.
pub fn certs(dir: &Path, name: &str) -> PathBuf {
    let tls = dir.join(name);
    let out = novacron().args(["certs", "init", "--dir"]).arg(&tls).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    tls
}

/// A VM process (source or destination) and its control socket.
pub struct Host {
    pub vm: Watched,
    pub sock: PathBuf,
}

/// The running migration's progress, from the control socket.
pub fn migration_progress(sock: &Path) -> Option<novacron_migration::source::Progress> {
    use novacron_vmm::api::Request;
    let r = novacron_vmm::api::client::call(sock, Request::MigrateStatus, Duration::from_secs(5)).ok()?;
    Some(r.migration?.progress)
}

/// Bytes the running migration has sent, from the control socket.
pub fn migration_bytes_sent(sock: &Path) -> Option<u64> {
    migration_progress(sock).map(|p| p.bytes_sent)
}

/// Waits until the migration `child` started from `src` has sent more than 256 KiB and
/// `also()` holds; kills it and fails the test when it never gets going.
pub fn wait_until_going(src: &Host, mut child: Child, also: impl Fn() -> bool) -> Child {
    let deadline = Instant::now() + TIMEOUT;
    while migration_bytes_sent(&src.sock).is_none_or(|bytes| bytes <= 256 << 10) || !also() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the migration never got going");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The migration moved the VM: the source ended on its own with status 0, the
/// destination's guest went on with the next heartbeat and verified its memory again.
/// Returns the guest-visible pause: from the source's last heartbeat to the destination's
/// first (each as read from the console).
pub fn assert_moved(mut src: Host, dst: &mut Host) -> Duration {
    let (status, err) = src.vm.wait_exit(TIMEOUT).unwrap();
    assert!(status.success(), "source ended with {status}: {err}");
    assert!(err.contains("moved to"), "{err}");
    let last = *src.vm.heartbeats().last().unwrap();
    let is_beat = |l: &Line| matches!(l.parsed, GuestLine::Heartbeat(_));
    let first = match dst.vm.seen.iter().find(|l| is_beat(l)) {
        Some(l) => l.clone(),
        None => dst.vm.wait_for("a heartbeat", TIMEOUT, is_beat).unwrap(),
    };
    assert_eq!(first.parsed, GuestLine::Heartbeat(last + 1), "the heartbeat sequence goes on");
    let verdict = dst
        .vm
        .wait_for("a verdict", TIMEOUT, |l| {
            matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
        })
        .unwrap();
    assert!(matches!(verdict.parsed, GuestLine::VerifyOk { .. }), "{}", verdict.text);
    assert!(!dst.vm.seen.iter().any(|l| matches!(l.parsed, GuestLine::Boot | GuestLine::Banner { .. })), "no reboot");
    let last_at = src.vm.seen.iter().rev().find(|l| is_beat(l)).map(|l| l.at).unwrap();
    first.at.saturating_duration_since(last_at)
}

/// The source kept its VM: it is running, beats on and verifies its memory again.
pub fn assert_source_runs(src: &mut Host) {
    let status = novacron().args(["vmm", "status", "--output", "json"]).arg("--api-sock").arg(&src.sock).output();
    let status = status.unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("\"running\""), "{text} {}", stderr(&status));
    let before = src.vm.seen.iter().filter(|l| matches!(l.parsed, GuestLine::VerifyOk { .. })).count();
    src.vm.wait_verified(before + 1, TIMEOUT).unwrap();
    let beats = src.vm.heartbeats();
    assert!(beats.windows(2).all(|w| w[1] == w[0] + 1), "heartbeats skip: {beats:?}");
}

/// splitmix64: a seeded, reproducible sequence (a loss pattern, a chaos run).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs `future` to its end on a runtime of its own (the tests are synchronous).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// A new cluster CA and a three-member etcd cluster with its node certificate, ready for
/// writes; `also`: an address the members' client ports listen on too
/// (`EtcdCluster::start_also_on`). None when etcd is not installed (the test is skipped).
pub fn etcd_with_ca(
    also: Option<std::net::Ipv4Addr>,
) -> Option<(novacron_store::testing::EtcdCluster, tempfile::TempDir)> {
    if !novacron_store::testing::etcd_or_skip() {
        return None;
    }
    let ca = tempfile::tempdir().unwrap();
    novacron_migration::tls::init(ca.path(), "etcd").unwrap();
    let etcd = novacron_store::testing::EtcdCluster::start_also_on(3, Some(ca.path()), also).unwrap();
    block_on(etcd.wait_ready(Duration::from_secs(30))).unwrap();
    Some((etcd, ca))
}

/// Issues a certificate for `name` from the CA in `ca` into `out` (`novacron certs issue`).
pub fn issue_cert(name: &str, ca: &std::path::Path, out: &std::path::Path) {
    let cmd = novacron().args(["certs", "issue", "--name", name, "--ca-dir"]).arg(ca).arg("--out").arg(out).output();
    let cmd = cmd.unwrap();
    assert!(cmd.status.success(), "{}", stderr(&cmd));
}
