//! The cluster store against etcd's own figures, measured in the same run on a real
//! three-member etcd cluster on loopback (Debian's etcd 3.4, 50 ms heartbeats, 500 ms
//! elections, pre-vote):
//!
//! - a write: `etcdctl put` (a process per write, as a script would), etcd's client-side
//!   floor, against NovaCron's etcd client (`EtcdStore`, one transaction in flight on a
//!   kept connection), the embedded store (a durable redb commit) and the embedded store
//!   served over etcd's API to the same client (how the other daemons of an embedded
//!   cluster reach it);
//! - etcd's leader election: SIGKILL of etcd's leader to the first write accepted again,
//!   which is the floor for any control plane on etcd (the cluster's own failover is
//!   measured against it in the daemon's benchmark).
//!
//! ```text
//! cargo bench -p novacron-benches --bench store [-- WRITES] [--elections=N]
//! ```

use novacron_benches::Error;
use novacron_store::embedded::EmbeddedStore;
use novacron_store::etcd::{EtcdConfig, EtcdStore};
use novacron_store::testing::{EtcdCluster, etcd_installed};
use novacron_store::{Op, Store, Txn};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEFAULT_WRITES: usize = 1000;
const DEFAULT_ELECTIONS: usize = 3;
/// `etcdctl put` spawns a process each time: fewer of them.
const ETCDCTL_WRITES: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!("  {name:<44} p50 {:>8.3} ms   p99 {:>8.3} ms   ({} writes)", ms(p50), ms(p99), samples.len());
    p50
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn timed_writes(store: &dyn Store, n: usize, key: &str) -> Result<Vec<Duration>, Error> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let started = Instant::now();
        store.txn(Txn::new().then(Op::put(key, format!("value {i}")))).await.map_err(|e| Error::from(e.to_string()))?;
        if i >= n / 10 {
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

fn etcdctl_writes(endpoints: &[String], n: usize) -> Result<Vec<Duration>, Error> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["put", "/bench/etcdctl", &format!("value {i}")])
            .output()
            .map_err(|e| Error::from(format!("etcdctl: {e}")))?;
        if !out.status.success() {
            return Err(Error::from(format!("etcdctl put failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// SIGKILL of etcd's leader to the first write accepted again; the member comes back after.
async fn election(cluster: &mut EtcdCluster, store: &EtcdStore) -> Result<Duration, Error> {
    let index = cluster.kill_leader().await.map_err(|e| Error::from(e.to_string()))?;
    let took = novacron_store::testing::until_a_write(store, Duration::from_secs(30))
        .await
        .map_err(|e| Error::from(e.to_string()))?;
    cluster.start_member(index).map_err(|e| Error::from(e.to_string()))?;
    cluster.wait_ready(Duration::from_secs(30)).await.map_err(|e| Error::from(e.to_string()))?;
    // Let the member catch up before the next round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(took)
}

async fn served_embedded(dir: &std::path::Path) -> Result<(EtcdStore, tokio::task::JoinHandle<()>), Error> {
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.join("served.redb")).map_err(|e| Error::from(e.to_string()))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| Error::from(e.to_string()))?;
    let url = format!("http://{}", listener.local_addr().map_err(|e| Error::from(e.to_string()))?);
    let service = novacron_store::serve::StoreService::new(store, url.clone());
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service.kv())
            .add_service(service.lease())
            .add_service(service.watch())
            .add_service(service.cluster())
            .add_service(service.maintenance())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let config = EtcdConfig { endpoints: vec![url], tls_dir: None, timeout: novacron_store::etcd::DEFAULT_TIMEOUT };
    let client = EtcdStore::connect(&config).await.map_err(|e| Error::from(e.to_string()))?;
    Ok((client, server))
}

async fn bench(writes: usize, elections: usize) -> Result<(), Error> {
    if !etcd_installed() {
        return Err(Error::from("etcd is not installed: run scripts/test-deps"));
    }
    let mut cluster = EtcdCluster::start(3, None).map_err(|e| Error::from(e.to_string()))?;
    cluster.wait_ready(Duration::from_secs(30)).await.map_err(|e| Error::from(e.to_string()))?;
    let store = EtcdStore::connect(&cluster.config()).await.map_err(|e| Error::from(e.to_string()))?;
    let dir = tempfile::tempdir().map_err(|e| Error::from(e.to_string()))?;
    let embedded = EmbeddedStore::open(&dir.path().join("embedded.redb")).map_err(|e| Error::from(e.to_string()))?;
    let (served, server) = served_embedded(dir.path()).await?;

    println!("one write, one in flight, on loopback (etcd: 3 members):");
    let etcdctl = summary("etcdctl put (a process per write)", etcdctl_writes(&cluster.endpoints(), ETCDCTL_WRITES)?);
    let client = summary("EtcdStore txn (NovaCron's client)", timed_writes(&store, writes, "/bench/client").await?);
    let local = summary("EmbeddedStore txn (durable redb commit)", timed_writes(&embedded, writes, "/bench/e").await?);
    let over = summary("embedded store served, through EtcdStore", timed_writes(&served, writes, "/bench/s").await?);
    println!(
        "  ratios to etcdctl put: client {:.3}x, embedded {:.3}x, embedded served {:.3}x",
        client.as_secs_f64() / etcdctl.as_secs_f64(),
        local.as_secs_f64() / etcdctl.as_secs_f64(),
        over.as_secs_f64() / etcdctl.as_secs_f64()
    );

    // Short attempts, so that a write waiting on a member without a leader gives way to
    // the next try soon after the election rather than at the default timeout.
    let quick = EtcdConfig { timeout: Duration::from_millis(100), ..cluster.config() };
    let quick = EtcdStore::connect(&quick).await?;
    let mut times = Vec::new();
    for _ in 0..elections {
        times.push(election(&mut cluster, &quick).await?);
    }
    times.sort();
    let listed: Vec<String> = times.iter().map(|t| format!("{:.0}", ms(*t))).collect();
    println!(
        "etcd leader SIGKILLed to the next accepted write: median {:.0} ms ({} ms; {} elections)",
        ms(percentile(&times, 0.5)),
        listed.join(", "),
        times.len()
    );
    server.abort();
    Ok(())
}

fn main() {
    let (writes, elections) = novacron_benches::count_args(DEFAULT_WRITES, "elections", DEFAULT_ELECTIONS);
    novacron_benches::run_async("store bench", || bench(writes, elections));
}
