//! The etcd store against a real three-member etcd cluster on loopback: it goes on when a
//! member (the leader included) is killed, fails fast and says so while there is no
//! quorum, refuses what cannot be reached or is not of the cluster's CA, and reports
//! each member's health.

use novacron_store::etcd::{EtcdConfig, EtcdStore};
use novacron_store::testing::{EtcdCluster, etcd_or_skip};
use novacron_store::{Op, Store, StoreError, Txn};
use std::time::{Duration, Instant};

async fn cluster(tls: Option<&std::path::Path>) -> Option<EtcdCluster> {
    if !etcd_or_skip() {
        return None;
    }
    let cluster = EtcdCluster::start(3, tls).unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    Some(cluster)
}

/// The index of the member etcd says leads.
async fn leader(store: &EtcdStore, cluster: &EtcdCluster) -> usize {
    let health = store.health().await.unwrap();
    let name = health.members.iter().find(|m| m.leader).map(|m| m.name.clone()).unwrap();
    cluster.members.iter().position(|m| m.name == name).unwrap()
}

/// Retries a write until it succeeds; returns how long that took.
async fn write_until_ok(store: &EtcdStore, key: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match store.txn(Txn::new().then(Op::put(key, "v"))).await {
            Ok(_) => return started.elapsed(),
            Err(e) => assert!(started.elapsed() < limit, "no write within {limit:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_goes_on_when_the_etcd_leader_is_killed() {
    let Some(mut cluster) = cluster(None).await else { return };
    let store = EtcdStore::connect(&cluster.config()).await.unwrap();
    store.txn(Txn::new().then(Op::put("/k/before", "kept"))).await.unwrap();
    let (lease, _) = store.grant(Duration::from_secs(30)).await.unwrap();
    let old_leader = leader(&store, &cluster).await;

    cluster.kill_member(old_leader);
    let took = write_until_ok(&store, "/k/after", Duration::from_secs(15)).await;
    let renewed = store.keep_alive(lease).await;
    let new_leader = leader(&store, &cluster).await;
    let health = store.health().await.unwrap();

    assert!(took < Duration::from_secs(15));
    assert_eq!(store.get("/k/before").await.unwrap().unwrap().value, b"kept");
    assert!(renewed.is_ok(), "the lease is renewed through another member: {renewed:?}");
    assert_ne!(new_leader, old_leader);
    let dead = &cluster.members[old_leader].name;
    assert!(health.members.iter().any(|m| &m.name == dead && !m.healthy), "{health:?}");
    assert_eq!(health.members.iter().filter(|m| m.healthy).count(), 2, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_without_quorum_fails_fast_and_recovers() {
    let Some(mut cluster) = cluster(None).await else { return };
    let config = EtcdConfig { timeout: Duration::from_secs(1), ..cluster.config() };
    let store = EtcdStore::connect(&config).await.unwrap();
    cluster.kill_member(1);
    cluster.kill_member(2);

    let started = Instant::now();
    let write = store.txn(Txn::new().then(Op::put("/k/no-quorum", "x"))).await;
    let took = started.elapsed();
    cluster.start_member(1).unwrap();
    let recovered = write_until_ok(&store, "/k/quorum-again", Duration::from_secs(20)).await;

    let e = write.expect_err("a write without quorum");
    assert!(e.is_unavailable(), "{e}");
    assert!(took < Duration::from_secs(4), "it waited {took:?} instead of failing fast");
    assert!(recovered < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_refuses_an_unreachable_url_with_one_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = EtcdConfig {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        tls_dir: None,
        timeout: Duration::from_secs(1),
    };

    let started = Instant::now();
    let refused = EtcdStore::connect(&config).await.err().unwrap();
    let text = novacron_migration::error_chain(&refused);

    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("no member"), "{text}");
    assert!(!text.contains('\n'), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_with_tls_takes_the_cluster_ca_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    novacron_migration::tls::init(&ours, "node-a").unwrap();
    novacron_migration::tls::init(&theirs, "intruder").unwrap();
    let Some(cluster) = cluster(Some(&ours)).await else { return };

    let store = EtcdStore::connect(&cluster.config()).await.unwrap();
    let written = store.txn(Txn::new().then(Op::put("/k/tls", "yes"))).await;
    let stranger = EtcdConfig { tls_dir: Some(theirs), ..cluster.config() };
    let refused = EtcdStore::connect(&stranger).await.err();

    assert!(written.is_ok(), "{written:?}");
    let text = refused.as_ref().map(|e| novacron_migration::error_chain(e)).unwrap_or_default();
    assert!(matches!(refused, Some(StoreError::TlsRefused { .. })), "a client of another CA got in: {text}");
    assert!(text.contains("TLS handshake") && text.contains("UnknownIssuer"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_ends_with_an_error_when_its_member_dies() {
    let Some(mut cluster) = cluster(None).await else { return };
    let one = EtcdConfig { endpoints: vec![cluster.endpoints()[0].clone()], ..cluster.config() };
    let store = EtcdStore::connect(&one).await.unwrap();
    let mut watch = store.watch("/w/", 0).await.unwrap();

    cluster.kill_member(0);
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.next()).await;

    let e = ended.expect("the watch reports the loss instead of hanging").expect_err("an error, not an event");
    assert!(!matches!(e, StoreError::Compacted(_)), "{e}");
}

/// A leader poll asks each member on its own: with a leader, none counts; with two of three
/// members killed, the one left has no leader but is no majority; a key under another
/// lease is not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_poll_counts_only_leaderless_members_that_hold_the_key() {
    let Some(mut cluster) = cluster(None).await else { return };
    let store = EtcdStore::connect(&cluster.config()).await.unwrap();
    let (lease, _) = store.grant(Duration::from_secs(30)).await.unwrap();
    let put = Op::Put { key: "/k/alive".into(), value: b"h1".to_vec(), lease: Some(lease) };
    store.txn(Txn::new().then(put)).await.unwrap();
    let within = Duration::from_millis(500);

    let led = store.poll_leaderless("/k/alive", lease, within).await;
    cluster.kill_member(1);
    cluster.kill_member(2);
    // The one left loses its leader after an election timeout (or was the leader, and
    // steps down after one).
    let deadline = Instant::now() + Duration::from_secs(10);
    let alone = loop {
        let poll = store.poll_leaderless("/k/alive", lease, within).await;
        if poll.leaderless_holding == 1 || Instant::now() > deadline {
            break poll;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let other_lease = store.poll_leaderless("/k/alive", lease + 1, within).await;

    assert_eq!(led, novacron_store::LeaderPoll { voters: 3, leaderless_holding: 0 }, "every member knows its leader");
    assert_eq!(alone, novacron_store::LeaderPoll { voters: 3, leaderless_holding: 1 });
    assert!(!alone.majority_leaderless(), "one of three cannot say the others do not decide");
    assert_eq!(other_lease.leaderless_holding, 0, "the key is not under that lease");
}
