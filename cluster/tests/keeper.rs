//! The host keeper with real VMM processes running the test guest under run permits, on the
//! embedded store: it permits what its host owns and shuts down what another host owns now;
//! its guests fence themselves when it is gone and go on when it is back; a keeper restarted
//! within the lease's TTL costs nothing; it claims an arriving migration at the commit, and
//! refuses a claim the records do not allow; a second machine's keeper with the same host
//! name is refused.

use novacron_cluster::keeper::{CLAIM_SOCKET, Keeper, KeeperConfig, KeeperError};
use novacron_cluster::records::{self, VmRecord, vm_key};
use novacron_cluster::timing::Timing;
use novacron_guest_image::binaries::vmm_binary;
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Line, Watched, kvm_or_skip};
use novacron_store::embedded::EmbeddedStore;
use novacron_store::{Op, Store, Txn};
use novacron_vmm::api::client::call;
use novacron_vmm::api::{MigrateRequest, Request};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(10);

struct Host {
    config: KeeperConfig,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<Result<(), KeeperError>>>,
}

impl Host {
    fn new(dir: &Path, name: &str) -> Host {
        let run_dir = dir.join(name);
        std::fs::create_dir_all(&run_dir).unwrap();
        let config = KeeperConfig {
            host: name.into(),
            identity: format!("test-machine:{}", run_dir.display()),
            lease_file: run_dir.join("keeper.lease"),
            run_dir,
            store_is_local: false,
            timing: Timing::default(),
            daemon_pid_file: None,
        };
        Host { config, stop: None, task: None }
    }

    fn start(&mut self, store: &Arc<dyn Store>) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let keeper = Keeper::new(self.config.clone(), store.clone());
        self.task = Some(tokio::spawn(async move { keeper.run(rx).await }));
        self.stop = Some(tx);
    }

    /// Ends the keeper as a crash would: no goodbye, the lease just stops being renewed.
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.stop = None;
    }

    fn sock(&self, vm: &str) -> PathBuf {
        self.config.run_dir.join(format!("{vm}.sock"))
    }
}

fn store_in(dir: &Path) -> Arc<dyn Store> {
    Arc::new(EmbeddedStore::open(&dir.join("cluster.redb")).unwrap())
}

async fn set_record(store: &Arc<dyn Store>, vm: &str, owner: &str, epoch: u64, moving_to: Option<&str>) {
    let record =
        VmRecord { owner: owner.into(), epoch, moving_to: moving_to.map(str::to_string), rest: Default::default() };
    let key = vm_key(vm);
    store.txn(Txn::new().then(Op::put(&key, records::encode(&key, &record).unwrap()))).await.unwrap();
}

async fn record(store: &Arc<dyn Store>, vm: &str) -> VmRecord {
    records::decode(&store.get(&vm_key(vm)).await.unwrap().unwrap()).unwrap()
}

/// A VMM under a permit, its control socket in the host's run dir.
fn permitted_vmm(host: &Host, vm: &str, cmdline: &str) -> Watched {
    let mut cmd = Command::new(vmm_binary());
    cmd.args(["--mem", "64", "--cmdline", cmdline, "--require-permit"]).arg("--api-sock").arg(host.sock(vm));
    Watched::spawn(cmd).unwrap()
}

/// The guest's lines over `d`, read on a blocking thread.
async fn lines_for(vm: Watched, d: Duration) -> (Watched, Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let until = Instant::now() + d;
        let mut lines = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Ok(Some(l)) = vm.next_line(left) {
                lines.push(l.text);
            }
        }
        (vm, lines)
    })
    .await
    .unwrap()
}

async fn wait_beat(vm: Watched, after: u64) -> (Watched, Result<Line, String>) {
    tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        let line = vm
            .wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(s) if s > after))
            .map_err(|e| e.to_string());
        (vm, line)
    })
    .await
    .unwrap()
}

fn fenced(sock: &Path) -> bool {
    call(sock, Request::Status, CALL).unwrap().status.unwrap().permit.unwrap().fenced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_keeper_permits_what_its_host_owns_and_evicts_a_stale_copy() {
    if !kvm_or_skip("kvm_keeper_permits_what_its_host_owns_and_evicts_a_stale_copy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let mut h1 = Host::new(dir.path(), "h1");
    set_record(&store, "ours", "h1", 1, None).await;
    set_record(&store, "theirs", "h2", 3, None).await;
    let ours = permitted_vmm(&h1, "ours", "ws=2 hb=100");
    let mut theirs = permitted_vmm(&h1, "theirs", "ws=2 hb=100");

    h1.start(&store);
    let (_ours, beat) = wait_beat(ours, 0).await;
    let stale = tokio::task::spawn_blocking(move || theirs.wait_exit(TIMEOUT).map(|(s, _)| (s, theirs.seen.len())))
        .await
        .unwrap();

    assert!(beat.is_ok(), "the owned VM runs: {beat:?}");
    let (status, printed) = stale.unwrap();
    assert_eq!(
        status.code(),
        Some(novacron_vmm::runtime::EVICTED_EXIT_CODE),
        "the stale copy was evicted (an exit its supervisor never restarts)"
    );
    assert_eq!(printed, 0, "the stale copy never ran its guest");
    let alive = store.get(&records::alive_key("h1")).await.unwrap().unwrap();
    assert_ne!(alive.lease, 0, "alive/h1 is under the host's lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_guests_fence_when_the_keeper_is_gone_and_go_on_when_it_is_back() {
    if !kvm_or_skip("kvm_guests_fence_when_the_keeper_is_gone_and_go_on_when_it_is_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let mut h1 = Host::new(dir.path(), "h1");
    set_record(&store, "vm", "h1", 1, None).await;
    let vm = permitted_vmm(&h1, "vm", "ws=2 rate=200 verify=300 hb=100");
    h1.start(&store);
    let (vm, _) = wait_beat(vm, 2).await;
    let first_lease = store.get(&records::alive_key("h1")).await.unwrap().unwrap().lease;

    // Back within the bound: the permits never run out.
    h1.kill().await;
    let (vm, _) = lines_for(vm, Duration::from_secs(1)).await;
    h1.start(&store);
    let (vm, _) = lines_for(vm, Duration::from_millis(1500)).await;
    let fenced_after_quick_restart = fenced(&h1.sock("vm"));
    let same_lease = store.get(&records::alive_key("h1")).await.unwrap().unwrap().lease;
    // Gone for longer than the lease: the guest fences itself, the lease expires.
    h1.kill().await;
    let (vm, _) = lines_for(vm, Duration::from_millis(2300)).await;
    let last = *vm.heartbeats().last().unwrap();
    let (vm, during) = lines_for(vm, Duration::from_secs(2)).await;
    let fenced_when_gone = fenced(&h1.sock("vm"));
    let alive_while_gone = store.get(&records::alive_key("h1")).await.unwrap();
    h1.start(&store);
    let (_vm, after) = wait_beat(vm, last).await;

    assert!(!fenced_after_quick_restart);
    assert_eq!(same_lease, first_lease, "a keeper restarted in time goes on with its lease");
    assert!(fenced_when_gone);
    assert!(during.iter().all(|l| !l.starts_with("HB ")), "the guest ran without a keeper: {during:?}");
    assert_eq!(alive_while_gone, None, "the host's lease ran out");
    let after = after.unwrap();
    assert_eq!(after.parsed, GuestLine::Heartbeat(last + 1), "it goes on where it fenced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_keeper_claims_an_arriving_migration_at_the_commit() {
    if !kvm_or_skip("kvm_keeper_claims_an_arriving_migration_at_the_commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    novacron_migration::tls::init(&tls, "node").unwrap();
    let store = store_in(dir.path());
    let (mut h1, mut h2) = (Host::new(dir.path(), "h1"), Host::new(dir.path(), "h2"));
    set_record(&store, "vm", "h1", 1, None).await;
    let src = permitted_vmm(&h1, "vm", "ws=8 rate=500 verify=300 hb=100");
    h1.start(&store);
    h2.start(&store);
    let (src, _) = wait_beat(src, 2).await;
    let addr = free_udp_addr();
    let mut receiver = Command::new(vmm_binary());
    receiver.args(["--receive-on", &addr, "--require-permit"]).arg("--tls-dir").arg(&tls);
    receiver.arg("--api-sock").arg(h2.sock("vm")).arg("--claim-from").arg(h2.config.run_dir.join(CLAIM_SOCKET));
    let dst = Watched::spawn(receiver).unwrap();
    wait_for_file(&h2.sock("vm"));
    set_record(&store, "vm", "h1", 1, Some("h2")).await;

    let request = migrate_request(&addr, &tls);
    let src_sock = h1.sock("vm");
    let moved = tokio::task::spawn_blocking(move || call(&src_sock, request, TIMEOUT)).await.unwrap();
    let last = *src.heartbeats().last().unwrap();
    let now = record(&store, "vm").await;
    let (_dst, first) = wait_beat(dst, 0).await;

    assert!(moved.is_ok(), "{moved:?}");
    assert_eq!((now.owner.as_str(), now.epoch, now.moving_to), ("h2", 2, None));
    let first = first.unwrap();
    assert!(matches!(first.parsed, GuestLine::Heartbeat(s) if s > last), "{}", first.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_a_claim_the_records_do_not_allow_fails_the_commit_and_the_source_keeps_the_vm() {
    if !kvm_or_skip("kvm_a_claim_the_records_do_not_allow_fails_the_commit_and_the_source_keeps_the_vm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    novacron_migration::tls::init(&tls, "node").unwrap();
    let store = store_in(dir.path());
    let (mut h1, mut h2) = (Host::new(dir.path(), "h1"), Host::new(dir.path(), "h2"));
    // The record says nothing of a migration to h2.
    set_record(&store, "vm", "h1", 1, None).await;
    let src = permitted_vmm(&h1, "vm", "ws=8 rate=500 verify=300 hb=100");
    h1.start(&store);
    h2.start(&store);
    let (src, _) = wait_beat(src, 2).await;
    let addr = free_udp_addr();
    let mut receiver = Command::new(vmm_binary());
    receiver.args(["--receive-on", &addr, "--require-permit"]).arg("--tls-dir").arg(&tls);
    receiver.arg("--api-sock").arg(h2.sock("vm")).arg("--claim-from").arg(h2.config.run_dir.join(CLAIM_SOCKET));
    let mut dst = Watched::spawn(receiver).unwrap();
    wait_for_file(&h2.sock("vm"));

    let request = migrate_request(&addr, &tls);
    let src_sock = h1.sock("vm");
    let moved = tokio::task::spawn_blocking(move || call(&src_sock, request, TIMEOUT)).await.unwrap();
    let dst_end =
        tokio::task::spawn_blocking(move || dst.wait_exit(TIMEOUT).map(|(s, e)| (s, e, dst.seen.len()))).await.unwrap();
    let now = record(&store, "vm").await;
    let src_sock = h1.sock("vm");
    let resumed = tokio::task::spawn_blocking(move || call(&src_sock, Request::Resume, CALL)).await.unwrap();
    let last = src.heartbeats().last().copied().unwrap_or(0);
    let (_src, goes_on) = wait_beat(src, last).await;

    let e = moved.expect_err("the commit fails");
    assert!(e.to_string().contains("not migrating to h2"), "{e}");
    let (status, stderr, printed) = dst_end.unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(printed, 0, "the destination's guest never ran");
    assert_eq!((now.owner.as_str(), now.epoch), ("h1", 1), "the source still owns it");
    assert!(resumed.is_ok(), "the source, still the owner, may resume: {resumed:?}");
    assert!(goes_on.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_machines_keeper_with_the_same_host_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let mut first = Host::new(dir.path(), "h1");
    first.start(&store);
    let deadline = Instant::now() + TIMEOUT;
    while store.get(&records::alive_key("h1")).await.unwrap().is_none() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut config = Host::new(&dir.path().join("other"), "h1").config;
    config.identity = "another-machine:/var/lib/novacron".into();

    let (_tx, rx) = tokio::sync::watch::channel(false);
    let refused = tokio::time::timeout(TIMEOUT, Keeper::new(config, store.clone()).run(rx)).await.unwrap();

    let e = refused.expect_err("the same host name from another machine");
    assert!(matches!(e, KeeperError::DuplicateHost { ref host, .. } if host == "h1"), "{e}");
    assert!(e.to_string().contains("another-machine") || e.to_string().contains("test-machine"), "{e}");
}

fn free_udp_addr() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().to_string()
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn migrate_request(to: &str, tls: &Path) -> Request {
    Request::Migrate(MigrateRequest {
        to: to.into(),
        tls_dir: tls.to_string_lossy().into(),
        max_bandwidth: 0,
        downtime_ms: 50,
        auto_converge: true,
        compress: true,
        delta_cache_mib: 64,
        workers: 0,
        keep_snapshot: None,
        transport: Default::default(),
        dry_run: false,
        fault: None,
        post_copy: None,
        id: None,
    })
}
