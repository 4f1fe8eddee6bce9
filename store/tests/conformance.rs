//! The store's behaviour, the same test against both implementations: the embedded store
//! (a redb file), a real etcd (Debian's etcd-server, one member here; failover with three
//! is in `etcd_cluster.rs`), and the embedded store served over etcd's API to the etcd
//! client (as the other daemons of a cluster on the embedded store reach it). Each case
//! below becomes `<case>::embedded`, `<case>::etcd` and `<case>::served`.

use novacron_store::embedded::EmbeddedStore;
use novacron_store::etcd::EtcdStore;
use novacron_store::testing::{EtcdCluster, etcd_or_skip};
use novacron_store::{Cmp, Compare, EventKind, Op, OpResult, Store, StoreError, Txn};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A store to test and what keeps it alive.
struct Subject {
    store: Arc<dyn Store>,
    _keep: Box<dyn std::any::Any>,
}

fn embedded() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap();
    Subject { store: Arc::new(store), _keep: Box::new(dir) }
}

/// The embedded store behind `serve::StoreService` on loopback, through the etcd client.
async fn served() -> Subject {
    use novacron_store::serve::StoreService;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = StoreService::new(store, url.clone());
    let server = tonic::transport::Server::builder()
        .add_service(service.kv())
        .add_service(service.watch())
        .add_service(service.lease())
        .add_service(service.cluster())
        .add_service(service.maintenance())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);
    let config = novacron_store::etcd::EtcdConfig {
        endpoints: vec![url],
        tls_dir: None,
        timeout: novacron_store::etcd::DEFAULT_TIMEOUT,
    };
    let client = EtcdStore::connect(&config).await.unwrap();
    Subject { store: Arc::new(client), _keep: Box::new((dir, AbortOnDrop(server))) }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// None (with a loud note) when etcd is not installed and not required.
async fn etcd() -> Option<Subject> {
    if !etcd_or_skip() {
        return None;
    }
    let cluster = EtcdCluster::start(1, None).unwrap();
    cluster.wait_ready(Duration::from_secs(20)).await.unwrap();
    let store = EtcdStore::connect(&cluster.config()).await.unwrap();
    Some(Subject { store: Arc::new(store), _keep: Box::new(cluster) })
}

macro_rules! both {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let s = super::embedded();
                super::$case(s.store.as_ref()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                if let Some(s) = super::etcd().await {
                    super::$case(s.store.as_ref()).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn served() {
                let s = super::served().await;
                super::$case(s.store.as_ref()).await;
            }
        }
    };
}

both!(keys_carry_revisions_and_versions);
async fn keys_carry_revisions_and_versions(store: &dyn Store) {
    let first = store.txn(Txn::new().then(Op::put("/t/a", "1"))).await.unwrap();
    let second = store.txn(Txn::new().then(Op::put("/t/a", "2")).then(Op::put("/t/b", "x"))).await.unwrap();
    store.txn(Txn::new().then(Op::put("/u/c", "other prefix"))).await.unwrap();

    let a = store.get("/t/a").await.unwrap().unwrap();
    let listing = store.list("/t/").await.unwrap();
    let missing = store.get("/t/zzz").await.unwrap();

    assert_eq!(second.revision, first.revision + 1, "one revision per transaction");
    assert_eq!((a.value.as_slice(), a.version), (&b"2"[..], 2));
    assert_eq!((a.create_revision, a.mod_revision), (first.revision, second.revision));
    let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b"], "in key order, nothing of another prefix");
    assert_eq!(listing.revision, second.revision + 1);
    assert_eq!(missing, None);
}

both!(compare_and_swap_applies_one_branch_atomically);
async fn compare_and_swap_applies_one_branch_atomically(store: &dyn Store) {
    let create = |v: &str| {
        Txn::new()
            .when(Compare::absent("/t/owner"))
            .then(Op::put("/t/owner", v.to_string()))
            .then(Op::put("/t/epoch", "1"))
            .otherwise(Op::Get { key: "/t/owner".into() })
    };

    let won = store.txn(create("host-a")).await.unwrap();
    let lost = store.txn(create("host-b")).await.unwrap();
    let owner = store.get("/t/owner").await.unwrap().unwrap();
    let stale = store
        .txn(
            Txn::new()
                .when(Compare::unchanged_since("/t/owner", owner.mod_revision - 1))
                .then(Op::put("/t/owner", "host-c")),
        )
        .await
        .unwrap();
    let by_value = store
        .txn(
            Txn::new()
                .when(Compare::Value { key: "/t/owner".into(), cmp: Cmp::Equal, value: b"host-a".to_vec() })
                .then(Op::put("/t/owner", "host-d"))
                .then(Op::delete("/t/epoch")),
        )
        .await
        .unwrap();

    assert!(won.succeeded && !lost.succeeded);
    assert_eq!(lost.revision, won.revision, "a failed compare changes nothing");
    let OpResult::Got(Some(seen)) = &lost.results[0] else { panic!("{:?}", lost.results) };
    assert_eq!(seen.value, b"host-a");
    assert!(!stale.succeeded, "a write based on an old read is refused");
    assert!(by_value.succeeded);
    assert_eq!(by_value.results, [OpResult::Put, OpResult::Deleted(1)]);
    assert_eq!(store.get("/t/owner").await.unwrap().unwrap().value, b"host-d");
    assert_eq!(store.get("/t/epoch").await.unwrap(), None);
}

both!(a_transaction_changing_a_key_twice_is_refused);
async fn a_transaction_changing_a_key_twice_is_refused(store: &dyn Store) {
    let twice = store.txn(Txn::new().then(Op::put("/t/k", "1")).then(Op::put("/t/k", "2"))).await;

    assert!(matches!(twice, Err(StoreError::DuplicateKey(ref k)) if k == "/t/k"), "{twice:?}");
    assert_eq!(store.get("/t/k").await.unwrap(), None);
}

both!(a_lease_takes_its_keys_when_it_expires_or_is_revoked);
async fn a_lease_takes_its_keys_when_it_expires_or_is_revoked(store: &dyn Store) {
    let (short, ttl) = store.grant(Duration::from_secs(2)).await.unwrap();
    let (long, _) = store.grant(Duration::from_secs(60)).await.unwrap();
    let leased = |key: &str, lease| Op::Put { key: key.into(), value: b"alive".to_vec(), lease: Some(lease) };
    store.txn(Txn::new().then(leased("/t/short", short)).then(leased("/t/long", long))).await.unwrap();

    let renewed = store.keep_alive(short).await.unwrap();
    let started = Instant::now();
    while store.get("/t/short").await.unwrap().is_some() {
        assert!(started.elapsed() < ttl + Duration::from_secs(5), "the leased key outlived its lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = store.keep_alive(short).await;
    let put_on_gone = store.txn(Txn::new().then(leased("/t/late", short))).await;
    let long_still_there = store.get("/t/long").await.unwrap().is_some();
    store.revoke(long).await.unwrap();

    assert_eq!(renewed, ttl);
    assert!(started.elapsed() + Duration::from_millis(500) >= ttl, "expired early: {:?}", started.elapsed());
    assert!(matches!(gone, Err(StoreError::LeaseGone(id)) if id == short), "{gone:?}");
    assert!(matches!(put_on_gone, Err(StoreError::LeaseGone(_))), "{put_on_gone:?}");
    assert_eq!(store.get("/t/late").await.unwrap(), None);
    assert!(long_still_there);
    assert_eq!(store.get("/t/long").await.unwrap(), None, "revoking deletes the lease's keys");
}

both!(a_watch_sees_every_change_under_its_prefix_in_order);
async fn a_watch_sees_every_change_under_its_prefix_in_order(store: &dyn Store) {
    let before = store.txn(Txn::new().then(Op::put("/w/old", "0"))).await.unwrap().revision;
    let mut live = store.watch("/w/", before + 1).await.unwrap();
    store.txn(Txn::new().then(Op::put("/w/a", "1")).then(Op::put("/other", "x"))).await.unwrap();
    store.txn(Txn::new().then(Op::put("/w/a", "2"))).await.unwrap();
    let deleted = store.txn(Txn::new().then(Op::DeletePrefix { prefix: "/w/".into() })).await.unwrap();
    let mut replay = store.watch("/w/", before).await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..4 {
        let e = tokio::time::timeout(Duration::from_secs(10), live.next()).await.unwrap().unwrap();
        seen.push((e.kind, e.kv.key.clone(), e.revision()));
    }
    let first_replayed = tokio::time::timeout(Duration::from_secs(10), replay.next()).await.unwrap().unwrap();

    assert_eq!(
        seen,
        [
            (EventKind::Put, "/w/a".to_string(), before + 1),
            (EventKind::Put, "/w/a".to_string(), before + 2),
            (EventKind::Delete, "/w/a".to_string(), deleted.revision),
            (EventKind::Delete, "/w/old".to_string(), deleted.revision),
        ]
    );
    assert_eq!((first_replayed.kind, first_replayed.kv.key.as_str()), (EventKind::Put, "/w/old"));
    assert_eq!(first_replayed.revision(), before);
}

#[tokio::test]
async fn embedded_reopened_keeps_keys_revision_and_leases_and_refuses_old_watches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.redb");
    let (revision, lease) = {
        let store = EmbeddedStore::open(&path).unwrap();
        let (lease, _) = store.grant(Duration::from_secs(30)).await.unwrap();
        let put = Op::Put { key: "/k/leased".into(), value: b"v".to_vec(), lease: Some(lease) };
        store.txn(Txn::new().then(Op::put("/k/a", "1")).then(put)).await.unwrap();
        (store.txn(Txn::new().then(Op::put("/k/a", "2"))).await.unwrap().revision, lease)
    };

    let store = EmbeddedStore::open(&path).unwrap();
    let a = store.get("/k/a").await.unwrap().unwrap();
    let renewed = store.keep_alive(lease).await;
    let old_watch = store.watch("/k/", revision - 1).await.err();
    let next = store.txn(Txn::new().then(Op::put("/k/b", "3"))).await.unwrap();

    assert_eq!((a.value.as_slice(), a.mod_revision), (&b"2"[..], revision));
    assert!(store.get("/k/leased").await.unwrap().is_some(), "a leased key survives the restart");
    assert_eq!(renewed.unwrap(), Duration::from_secs(30));
    assert!(matches!(old_watch, Some(StoreError::Compacted(r)) if r == revision + 1), "{old_watch:?}");
    assert_eq!(next.revision, revision + 1, "revisions go on where they were");
}

#[tokio::test]
async fn embedded_store_on_a_damaged_file_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 64 << 10]).unwrap();
    let truncated = dir.path().join("truncated.redb");
    {
        let store = EmbeddedStore::open(&truncated).unwrap();
        store.txn(Txn::new().then(Op::put("/k", "v"))).await.unwrap();
    }
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&truncated).unwrap().set_len(len / 3).unwrap();

    for path in [&garbage, &truncated] {
        let refused = EmbeddedStore::open(path).err().unwrap();
        let text = novacron_migration::error_chain(&refused);
        assert!(
            matches!(refused, StoreError::Embedded { .. } | StoreError::Damaged { .. }),
            "{}: {text}",
            path.display()
        );
        assert!(text.contains(&path.display().to_string()), "the error names the file: {text}");
    }
}
