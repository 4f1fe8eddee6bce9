//! For tests and benchmarks: a real etcd cluster on loopback, its members child processes
//! of this one (Debian's `etcd-server`, which `scripts/test-deps` installs), each of
//! which can be killed and started again. Raft runs with pre-vote and a short election
//! timeout (50 ms heartbeats, 500 ms elections) so that failovers take well under a second.

use crate::etcd::{DEFAULT_TIMEOUT, EtcdConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HEARTBEAT_MS: u64 = 50;
pub const ELECTION_MS: u64 = 500;

pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    /// The network namespace it runs in (`start_placed`), or the root's.
    netns: Option<String>,
    args: Vec<String>,
    child: Option<Child>,
}

impl EtcdMember {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    tls_dir: Option<PathBuf>,
    /// Holds the members' data and their logs.
    dir: tempfile::TempDir,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start etcd (install Debian's etcd-server: scripts/test-deps)")]
    Spawn(#[source] std::io::Error),
    #[error("cannot make the cluster's directory")]
    Dir(#[source] std::io::Error),
    #[error("cannot find free ports for the cluster's members")]
    Ports(#[source] std::io::Error),
    #[error("etcd did not elect a leader within {limit:?}{members}")]
    NoLeader { limit: Duration, members: String },
    #[error("cannot ask etcd which member leads")]
    Store(#[source] crate::StoreError),
    #[error("etcd has no leader now")]
    NoLeaderNow,
}

/// Where a member of `EtcdCluster::start_placed` runs: a network namespace, the address
/// its clients reach it at and the address its peers do (each on a link of its own, so
/// that a test can cut the members off from each other and leave them to their clients).
#[derive(Debug, Clone)]
pub struct MemberPlace {
    pub netns: String,
    pub client_ip: std::net::Ipv4Addr,
    pub peer_ip: std::net::Ipv4Addr,
}

/// The ports of a member in a namespace of its own (etcd's).
const PLACED_CLIENT_PORT: u16 = 2379;
const PLACED_PEER_PORT: u16 = 2380;

/// Where one member listens, and where its clients and peers reach it.
struct MemberUrls {
    listen_clients: String,
    client_url: String,
    peer_url: String,
    netns: Option<String>,
}

/// Member `i`'s command line.
fn member_args(i: usize, dir: &Path, urls: &MemberUrls, initial: &str, tls_dir: Option<&Path>) -> Vec<String> {
    use novacron_migration::tls::{CA_CERT, NODE_CERT, NODE_KEY};
    let mut args = vec![
        format!("--name=m{i}"),
        format!("--data-dir={}", dir.join(format!("m{i}")).display()),
        format!("--listen-client-urls={}", urls.listen_clients),
        format!("--advertise-client-urls={}", urls.client_url),
        format!("--listen-peer-urls={}", urls.peer_url),
        format!("--initial-advertise-peer-urls={}", urls.peer_url),
        format!("--initial-cluster={initial}"),
        "--initial-cluster-state=new".into(),
        format!("--initial-cluster-token=novacron-test-{}", std::process::id()),
        format!("--heartbeat-interval={HEARTBEAT_MS}"),
        format!("--election-timeout={ELECTION_MS}"),
        "--pre-vote".into(),
        "--logger=zap".into(),
        "--log-level=error".into(),
    ];
    if let Some(tls) = tls_dir {
        args.push(format!("--cert-file={}", tls.join(NODE_CERT).display()));
        args.push(format!("--key-file={}", tls.join(NODE_KEY).display()));
        args.push(format!("--trusted-ca-file={}", tls.join(CA_CERT).display()));
        args.push("--client-cert-auth".into());
    }
    args
}

/// The lowest port the kernel hands to outgoing connections (Linux's default if unread).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// `n` distinct free ports on loopback, below the kernel's ephemeral range: a port in it
/// can be taken by any outgoing connection (a member's own, to its peers) between the
/// choice and the member's bind, and a member that cannot bind leaves its cluster
/// without a leader. Each port is held until all are chosen, so none is chosen twice.
fn free_ports(n: usize) -> Result<Vec<u16>, ClusterError> {
    const FIRST: u16 = 10_000;
    let top = ephemeral_low().max(FIRST + 1000);
    // Processes, and clusters of one process (tests run in threads), start from different
    // places: a cluster's ports are free again once its members bind them.
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = u32::from(top - FIRST);
    let earlier = STARTED.fetch_add(n as u32 * 4, std::sync::atomic::Ordering::Relaxed);
    let start = std::process::id().wrapping_mul(2_654_435_761).wrapping_add(earlier) % span;
    let mut port = FIRST + start as u16;
    let mut held = Vec::new();
    for _ in 0..span {
        if held.len() == n {
            break;
        }
        port = if port + 1 >= top { FIRST } else { port + 1 };
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        let e = std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{n} free ports below {top}"));
        return Err(ClusterError::Ports(e));
    }
    held.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(ClusterError::Ports)).collect()
}

/// Member `i`'s log (its standard error), in the cluster's directory.
fn member_log(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("m{i}.log"))
}

/// Whether `etcd` can be run here.
pub fn etcd_installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when etcd can be used for a test. Otherwise says loudly that the test is skipped,
/// or fails it when NOVACRON_REQUIRE_ETCD is set (CI sets it: there, etcd tests must run).
pub fn etcd_or_skip() -> bool {
    if etcd_installed() {
        return true;
    }
    assert!(std::env::var_os("NOVACRON_REQUIRE_ETCD").is_none(), "etcd is required: run scripts/test-deps");
    eprintln!("\n*** SKIPPED: etcd is not installed (scripts/test-deps installs it) ***\n");
    false
}

fn scheme(tls_dir: Option<&Path>) -> &'static str {
    if tls_dir.is_some() { "https" } else { "http" }
}

impl EtcdCluster {
    /// Starts `n` members; with `tls_dir` (a NovaCron TLS directory) clients must present a
    /// certificate of that cluster CA, and the members present theirs. Peers talk plain
    /// HTTP on loopback.
    pub fn start(n: usize, tls_dir: Option<&Path>) -> Result<EtcdCluster, ClusterError> {
        Self::start_also_on(n, tls_dir, None)
    }

    /// As `start`, with the members' client ports open on `also` too (the address of a
    /// link to a network namespace, whose hosts reach etcd there: `endpoints_on`).
    pub fn start_also_on(
        n: usize,
        tls_dir: Option<&Path>,
        also: Option<std::net::Ipv4Addr>,
    ) -> Result<EtcdCluster, ClusterError> {
        let scheme = scheme(tls_dir);
        let ports = free_ports(2 * n)?;
        let urls = ports
            .chunks(2)
            .map(|pair| {
                let (client, peer) = (pair[0], pair[1]);
                let client_url = format!("{scheme}://127.0.0.1:{client}");
                let listen_clients = match also {
                    Some(ip) => format!("{client_url},{scheme}://{ip}:{client}"),
                    None => client_url.clone(),
                };
                MemberUrls { listen_clients, client_url, peer_url: format!("http://127.0.0.1:{peer}"), netns: None }
            })
            .collect();
        Self::start_members(tls_dir, urls)
    }

    /// A member in each of `places`, talking to its peers and its clients at the addresses
    /// given there.
    pub fn start_placed(tls_dir: Option<&Path>, places: &[MemberPlace]) -> Result<EtcdCluster, ClusterError> {
        let scheme = scheme(tls_dir);
        let urls = places
            .iter()
            .map(|place| {
                let client_url = format!("{scheme}://{}:{PLACED_CLIENT_PORT}", place.client_ip);
                MemberUrls {
                    listen_clients: client_url.clone(),
                    client_url,
                    peer_url: format!("http://{}:{PLACED_PEER_PORT}", place.peer_ip),
                    netns: Some(place.netns.clone()),
                }
            })
            .collect();
        Self::start_members(tls_dir, urls)
    }

    fn start_members(tls_dir: Option<&Path>, urls: Vec<MemberUrls>) -> Result<EtcdCluster, ClusterError> {
        let dir = tempfile::tempdir().map_err(ClusterError::Dir)?;
        let initial: Vec<String> = urls.iter().enumerate().map(|(i, u)| format!("m{i}={}", u.peer_url)).collect();
        let initial = initial.join(",");
        let members = urls
            .into_iter()
            .enumerate()
            .map(|(i, u)| EtcdMember {
                name: format!("m{i}"),
                args: member_args(i, dir.path(), &u, &initial, tls_dir),
                client_url: u.client_url,
                netns: u.netns,
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { members, tls_dir: tls_dir.map(Path::to_owned), dir };
        for i in 0..cluster.members.len() {
            cluster.start_member(i)?;
        }
        Ok(cluster)
    }

    pub fn start_member(&mut self, i: usize) -> Result<(), ClusterError> {
        // Appended to: a member started again keeps what it said before.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(member_log(self.dir.path(), i))
            .map_err(ClusterError::Dir)?;
        let m = &mut self.members[i];
        let mut command = match &m.netns {
            // `ip netns exec` execs etcd: the child is the member.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = command
            .args(&m.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(ClusterError::Spawn)?;
        m.child = Some(child);
        Ok(())
    }

    /// SIGKILLs member `i` and waits for it to be gone.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URLs on the address given to `start_also_on`.
    pub fn endpoints_on(&self, ip: std::net::Ipv4Addr) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.replace("127.0.0.1", &ip.to_string())).collect()
    }

    pub fn config(&self) -> EtcdConfig {
        EtcdConfig { endpoints: self.endpoints(), tls_dir: self.tls_dir.clone(), timeout: DEFAULT_TIMEOUT }
    }

    /// SIGKILLs the member that leads now; answers its index (`start_member` starts it
    /// again).
    pub async fn kill_leader(&mut self) -> Result<usize, ClusterError> {
        use crate::Store;
        let store = crate::etcd::EtcdStore::connect(&self.config()).await.map_err(ClusterError::Store)?;
        let health = store.health().await.map_err(ClusterError::Store)?;
        let leader = health.members.iter().find(|m| m.leader).ok_or(ClusterError::NoLeaderNow)?;
        let i = self.members.iter().position(|m| m.name == leader.name).ok_or(ClusterError::NoLeaderNow)?;
        self.kill_member(i);
        Ok(i)
    }

    /// Waits until a write through the store succeeds (a leader is elected).
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), ClusterError> {
        use crate::{Op, Store, Txn};
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(store) = crate::etcd::EtcdStore::connect(&self.config()).await
                && store.txn(Txn::new().then(Op::put("/novacron-test/ready", "1"))).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ClusterError::NoLeader { limit, members: self.last_log_lines() })
    }

    /// Each member's last log line, for an error that says why no leader came.
    fn last_log_lines(&self) -> String {
        (0..self.members.len())
            .filter_map(|i| {
                let text = std::fs::read_to_string(member_log(self.dir.path(), i)).ok()?;
                let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
                Some(format!("; m{i}'s log ends: {last}"))
            })
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}

/// Tries a write through `store` every 2 ms until one is accepted; answers how long that
/// took (a failover's length, seen by a client).
pub async fn until_a_write(store: &dyn crate::Store, limit: Duration) -> Result<Duration, ClusterError> {
    use crate::{Op, Txn};
    let started = Instant::now();
    while store.txn(Txn::new().then(Op::put("/novacron-test/write", "x"))).await.is_err() {
        if started.elapsed() > limit {
            return Err(ClusterError::NoLeader { limit, members: String::new() });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(started.elapsed())
}
