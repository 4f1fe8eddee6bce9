//! Leader election on both stores: one leader at a time, a deposed leader's guarded write
//! fails as a whole, and leadership passes when the leader steps down or its lease runs out.

use novacron_cluster::election::{Campaign, Candidate};
use novacron_store::embedded::EmbeddedStore;
use novacron_store::etcd::EtcdStore;
use novacron_store::testing::{EtcdCluster, etcd_or_skip};
use novacron_store::{Op, Store, Txn};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(2);

async fn each_store(case: impl AsyncFn(Arc<dyn Store>)) {
    let dir = tempfile::tempdir().unwrap();
    case(Arc::new(EmbeddedStore::open(&dir.path().join("c.redb")).unwrap())).await;
    if etcd_or_skip() {
        let cluster = EtcdCluster::start(1, None).unwrap();
        cluster.wait_ready(Duration::from_secs(20)).await.unwrap();
        case(Arc::new(EtcdStore::connect(&cluster.config()).await.unwrap())).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_deposed_leader_cannot_write() {
    each_store(async |store: Arc<dyn Store>| {
        let a = Candidate::new(store.clone(), "a", "127.0.0.1:1", TTL);
        let b = Candidate::new(store.clone(), "b", "127.0.0.1:2", TTL);

        let Campaign::Won(a_tenure) = a.campaign().await.unwrap() else { panic!("the first candidate wins") };
        let lost = b.campaign().await.unwrap();
        let write = |tenure: novacron_cluster::election::Tenure, v: &str| {
            Txn::new().when(tenure.guard()).then(Op::put("/novacron/vms/x", v.to_string()))
        };
        let as_leader = store.txn(write(a_tenure, "from a")).await.unwrap();
        a.step_down(&a_tenure).await.unwrap();
        let Campaign::Won(b_tenure) = b.campaign().await.unwrap() else { panic!("b wins once a stepped down") };
        let deposed = store.txn(write(a_tenure, "from deposed a")).await.unwrap();
        let (leader, _) = b.leader().await.unwrap().unwrap();

        assert!(matches!(lost, Campaign::Lost(ref r) if r.host == "a"), "{lost:?}");
        assert!(as_leader.succeeded);
        assert!(!deposed.succeeded, "a deposed leader's write fails");
        assert_eq!(store.get("/novacron/vms/x").await.unwrap().unwrap().value, b"from a");
        assert_ne!(a_tenure.revision, b_tenure.revision);
        assert_eq!(leader.host, "b");
        b.step_down(&b_tenure).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_passes_when_the_leaders_lease_runs_out() {
    each_store(async |store: Arc<dyn Store>| {
        let a = Candidate::new(store.clone(), "a", "127.0.0.1:1", TTL);
        let b = Candidate::new(store.clone(), "b", "127.0.0.1:2", TTL);
        let Campaign::Won(a_tenure) = a.campaign().await.unwrap() else { panic!() };
        let held = a.hold(&a_tenure).await.unwrap();

        // a stops renewing, as a leader that died would.
        let started = Instant::now();
        b.wait_vacant(Duration::from_secs(15)).await.unwrap();
        let waited = started.elapsed();
        let won = b.campaign().await.unwrap();
        let still_a = a.hold(&a_tenure).await.unwrap();

        assert!(held);
        assert!(waited >= TTL - Duration::from_millis(500) && waited < Duration::from_secs(15), "{waited:?}");
        assert!(matches!(won, Campaign::Won(_)), "{won:?}");
        assert!(!still_a, "the old tenure is over");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_simultaneous_candidates_exactly_one_wins() {
    each_store(async |store: Arc<dyn Store>| {
        let campaigns = (0..8).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { Candidate::new(store, &format!("h{i}"), "x", TTL).campaign().await.unwrap() })
        });
        let mut outcomes = Vec::new();
        for c in campaigns.collect::<Vec<_>>() {
            outcomes.push(c.await.unwrap());
        }
        let winners: Vec<_> =
            outcomes.iter().filter_map(|o| if let Campaign::Won(t) = o { Some(*t) } else { None }).collect();

        assert_eq!(winners.len(), 1, "{outcomes:?}");
        store.revoke(winners[0].lease).await.unwrap();
    })
    .await;
}
