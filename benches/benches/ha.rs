//! The HA control plane against etcd's own figures, in one run: a three-member etcd
//! cluster on loopback (Debian's etcd 3.4, TLS with the cluster CA, 50 ms heartbeats and
//! 500 ms elections, pre-vote) and three release `novacron daemon` processes on it.
//!
//! - a VM create through a daemon (`CreateVm`, defined but not started: the control
//!   plane's part, no boot) against a bare `etcdctl put` and against one transaction of
//!   NovaCron's own etcd client;
//! - leader failover: SIGKILL of the leading daemon to the first create accepted again
//!   through another daemon, against etcd's own leader election (SIGKILL of etcd's leader
//!   to the first write accepted again);
//! - host loss: SIGKILL of a whole host (its daemon, its keeper, its VMMs) to the first
//!   heartbeat of the guest booted again on another host (needs /dev/kvm).
//!
//! ```text
//! cargo bench -p novacron-benches --bench ha [-- ROUNDS] [--creates=N]
//! ```

use novacron_benches::{Error, release_binary};
use novacron_daemon::client::{Client, Connect};
use novacron_daemon::pb;
use novacron_store::etcd::EtcdStore;
use novacron_store::testing::{EtcdCluster, etcd_installed};
use novacron_store::{Op, Store, Txn};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT_ROUNDS: usize = 3;
const DEFAULT_CREATES: usize = 200;
const ETCDCTL_PUTS: usize = 50;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const WORKLOAD: &str = "ws=2 rate=100 hb=50";

struct Host {
    name: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    addr: String,
}

impl Host {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&mut self, novacron: &Path, vmm: &Path, etcd: &[String], tls: &Path) -> Result<(), Error> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("daemon.log"))?;
        let mut child = Command::new(novacron)
            .arg("daemon")
            .arg("--data-dir")
            .arg(self.data())
            .args(["--listen", "127.0.0.1:0", "--name", &self.name, "--etcd", &etcd.join(",")])
            .arg("--tls-dir")
            .arg(tls)
            .arg("--vmm-binary")
            .arg(vmm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(START_TIMEOUT).map_err(|_| format!("daemon {} did not start", self.name))?;
        self.addr = line
            .split_once(" listening on ")
            .and_then(|(_, rest)| rest.split(';').next())
            .ok_or_else(|| format!("unexpected line: {line}"))?
            .to_string();
        self.child = Some(child);
        Ok(())
    }

    fn kill_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon, the keeper and the VMMs: the whole host.
    fn kill_all(&mut self) {
        self.kill_daemon();
        novacron_guest_image::binaries::kill_vmms_under(self.dir.path());
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}

async fn client(addr: &str, tls: &Path) -> Result<Client, Error> {
    Ok(Connect { endpoint: addr.to_string(), tls_dir: tls.to_owned(), token: None }.connect().await?)
}

fn spec(name: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        mem_mib: 32,
        cmdline: WORKLOAD.into(),
        restart: Some(pb::RestartPolicy { kind: "always".into(), ..Default::default() }),
        ..Default::default()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn listed(v: &[Duration]) -> String {
    v.iter().map(|d| format!("{:.0}", ms(*d))).collect::<Vec<_>>().join(", ")
}

/// The leading daemon's host.
async fn leader(c: &mut Client) -> Result<String, Error> {
    Ok(c.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner().leader)
}

struct Bench {
    hosts: Vec<Host>,
    etcd: EtcdCluster,
    tls: PathBuf,
    novacron: PathBuf,
    vmm: PathBuf,
    _ca: tempfile::TempDir,
}

impl Bench {
    async fn setup() -> Result<Bench, Error> {
        let novacron = release_binary("novacron", "novacron")?;
        let vmm = release_binary("novacron-vmm", "novacron-vmm")?;
        let ca = tempfile::tempdir()?;
        novacron_migration::tls::init(ca.path(), "bench")?;
        let etcd = EtcdCluster::start(3, Some(ca.path()))?;
        etcd.wait_ready(Duration::from_secs(30)).await?;
        let tls = ca.path().to_owned();
        let mut hosts = Vec::new();
        for name in ["h1", "h2", "h3"] {
            let mut h = Host {
                name: name.into(),
                dir: tempfile::Builder::new().prefix("nc-ha-").tempdir()?,
                child: None,
                addr: String::new(),
            };
            h.start(&novacron, &vmm, &etcd.endpoints(), &tls)?;
            hosts.push(h);
        }
        Ok(Bench { hosts, etcd, tls, novacron, vmm, _ca: ca })
    }

    fn index(&self, name: &str) -> Result<usize, Error> {
        self.hosts.iter().position(|h| h.name == name).ok_or_else(|| format!("no host {name}").into())
    }

    async fn any_client(&self, except: usize) -> Result<(usize, Client), Error> {
        let i = (except + 1) % self.hosts.len();
        Ok((i, client(&self.hosts[i].addr, &self.tls).await?))
    }

    /// Creates (and, with `start`, boots) VM `name` through host `via`.
    async fn create(c: &mut Client, name: &str, start: bool) -> Result<pb::Vm, Error> {
        Ok(c.create_vm(pb::CreateVmRequest { spec: Some(spec(name)), start: Some(start) }).await?.into_inner())
    }
}

/// Until the leading daemon has heard from every host (so that it places on all of them).
async fn wait_all_up(b: &Bench) -> Result<(), Error> {
    let (_, mut c) = b.any_client(0).await?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let hosts = c.cluster_info(pb::ClusterInfoRequest {}).await.map(|r| r.into_inner().hosts).unwrap_or_default();
        if hosts.iter().filter(|h| h.state == "up").count() == b.hosts.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the leader sees {} of {} hosts up", hosts.len(), b.hosts.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each create is deleted again, so that the hosts never fill up.
async fn create_latency(b: &Bench, n: usize) -> Result<Duration, Error> {
    let (_, mut c) = b.any_client(0).await?;
    let mut samples = Vec::new();
    for i in 0..n + n / 10 {
        let name = format!("def-{i:04}");
        let started = Instant::now();
        Bench::create(&mut c, &name, false).await?;
        if i >= n / 10 {
            samples.push(started.elapsed());
        }
        c.delete_vm(pb::VmRef { name }).await?;
    }
    Ok(median(samples))
}

fn etcdctl_put(b: &Bench) -> Result<Duration, Error> {
    let tls = &b.tls;
    let mut samples = Vec::new();
    for i in 0..ETCDCTL_PUTS {
        let started = Instant::now();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", b.etcd.endpoints().join(",")))
            .arg(format!("--cacert={}", tls.join("ca.pem").display()))
            .arg(format!("--cert={}", tls.join("node.pem").display()))
            .arg(format!("--key={}", tls.join("node.key").display()))
            // Our node certificates name no IP: etcdctl checks the server's name otherwise.
            .arg("--insecure-skip-tls-verify")
            .args(["put", "/bench/etcdctl", &format!("v{i}")])
            .output()?;
        if !out.status.success() {
            return Err(format!("etcdctl put: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        samples.push(started.elapsed());
    }
    Ok(median(samples))
}

async fn client_txn(b: &Bench) -> Result<Duration, Error> {
    let store = EtcdStore::connect(&b.etcd.config()).await?;
    let mut samples = Vec::new();
    for i in 0..220 {
        let started = Instant::now();
        store.txn(Txn::new().then(Op::put("/bench/client", format!("v{i}")))).await?;
        if i >= 20 {
            samples.push(started.elapsed());
        }
    }
    Ok(median(samples))
}

/// SIGKILL of the leading daemon to the first create accepted through another daemon.
async fn daemon_failover(b: &mut Bench, round: usize) -> Result<Duration, Error> {
    let (_, mut c) = b.any_client(0).await?;
    let leading = leader(&mut c).await?;
    let killed = b.index(&leading)?;
    let (_, mut other) = b.any_client(killed).await?;
    b.hosts[killed].kill_daemon();
    let t0 = Instant::now();
    loop {
        if Bench::create(&mut other, &format!("after-{round}"), false).await.is_ok() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("no create accepted within 30 s of the leader's death".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed();
    let (novacron, vmm, etcd, tls) = (b.novacron.clone(), b.vmm.clone(), b.etcd.endpoints(), b.tls.clone());
    b.hosts[killed].start(&novacron, &vmm, &etcd, &tls)?;
    wait_all_up(b).await?;
    Ok(took)
}

/// SIGKILL of etcd's leader to the next write accepted.
async fn etcd_election(b: &mut Bench) -> Result<Duration, Error> {
    let quick = novacron_store::etcd::EtcdConfig { timeout: Duration::from_millis(100), ..b.etcd.config() };
    let store = EtcdStore::connect(&quick).await?;
    let i = b.etcd.kill_leader().await?;
    let took = novacron_store::testing::until_a_write(&store, Duration::from_secs(30)).await?;
    b.etcd.start_member(i)?;
    b.etcd.wait_ready(Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(took)
}

/// The last heartbeat number in a serial log.
fn last_heartbeat(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| l.strip_prefix("HB ").and_then(|n| n.trim().parse().ok()))
}

/// SIGKILL of the host of a running VM to its guest's first heartbeat on another host.
async fn host_loss(b: &mut Bench, round: usize) -> Result<Duration, Error> {
    let name = format!("lost-{round}");
    let (_, mut c) = b.any_client(0).await?;
    let vm = Bench::create(&mut c, &name, true).await?;
    let dead = b.index(&vm.host)?;
    let log = PathBuf::from(&vm.serial_log);
    let deadline = Instant::now() + START_TIMEOUT;
    while last_heartbeat(&log).is_none() {
        if Instant::now() > deadline {
            return Err(format!("VM {name} never beat on {}", vm.host).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, mut other) = b.any_client(dead).await?;
    b.hosts[dead].kill_all();
    let t0 = Instant::now();
    let moved = loop {
        if let Ok(v) = other.get_vm(pb::VmRef { name: name.clone() }).await {
            let v = v.into_inner();
            if v.host != b.hosts[dead].name && last_heartbeat(Path::new(&v.serial_log)).is_some() {
                break v;
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("VM {name} never beat elsewhere").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = t0.elapsed();
    println!("  round {round}: {name} from {} to {} in {:.0} ms", b.hosts[dead].name, moved.host, ms(took));
    let (novacron, vmm, etcd, tls) = (b.novacron.clone(), b.vmm.clone(), b.etcd.endpoints(), b.tls.clone());
    b.hosts[dead].start(&novacron, &vmm, &etcd, &tls)?;
    wait_all_up(b).await?;
    Ok(took)
}

async fn run(rounds: usize, creates: usize) -> Result<(), Error> {
    if !etcd_installed() {
        return Err("etcd is not installed: run scripts/test-deps".into());
    }
    let mut b = Bench::setup().await?;
    println!("three daemons on a three-member etcd cluster on loopback (TLS):");
    wait_all_up(&b).await?;
    let create = create_latency(&b, creates).await?;
    let put = etcdctl_put(&b)?;
    let txn = client_txn(&b).await?;
    println!(
        "  create a VM (defined, not started): p50 {:.2} ms; etcdctl put p50 {:.2} ms ({:.2}x); one etcd txn p50 {:.2} ms ({:.1}x)",
        ms(create),
        ms(put),
        create.as_secs_f64() / put.as_secs_f64(),
        ms(txn),
        create.as_secs_f64() / txn.as_secs_f64()
    );
    let mut failovers = Vec::new();
    let mut elections = Vec::new();
    for round in 0..rounds {
        failovers.push(daemon_failover(&mut b, round).await?);
        elections.push(etcd_election(&mut b).await?);
    }
    let (f, e) = (median(failovers.clone()), median(elections.clone()));
    println!(
        "  leader daemon SIGKILLed to the next create accepted: median {:.0} ms ({} ms); etcd's own election: median {:.0} ms ({} ms); ratio {:.2}",
        ms(f),
        listed(&failovers),
        ms(e),
        listed(&elections),
        f.as_secs_f64() / e.as_secs_f64()
    );
    if std::fs::File::options().read(true).write(true).open("/dev/kvm").is_ok() {
        let mut losses = Vec::new();
        for round in 0..rounds {
            losses.push(host_loss(&mut b, round).await?);
        }
        println!(
            "  host SIGKILLed (daemon, keeper, VMMs) to its guest's first heartbeat elsewhere: median {:.0} ms ({} ms; lease TTL 3 s + wait 0.5 s + boot)",
            ms(median(losses.clone())),
            listed(&losses)
        );
    } else {
        println!("  host loss: skipped (no /dev/kvm)");
    }
    Ok(())
}

fn main() {
    let (rounds, creates) = novacron_benches::count_args(DEFAULT_ROUNDS, "creates", DEFAULT_CREATES);
    novacron_benches::run_async("ha bench", || run(rounds, creates));
}
