//! `novacron daemon`: the HostSupervisor with its state store, served on the control port
//! until SIGINT or SIGTERM. The VMM processes run in sessions of their own, so stopping
//! (or killing) the daemon leaves every guest running; the next daemon on the same data
//! dir takes them back.

use crate::auth::{Authenticator, load_or_create_token, server_tls};
use crate::cluster::ClusterArgs;
use crate::convert::HostIdentity;
use crate::ha::leadership::{Campaigner, Leadership};
use crate::ha::reconcile::Leaving;
use crate::ha::{ClusterStore, KeeperProcess, StoreMode};
use crate::listen::Gate;
use crate::operations::Operations;
use crate::pb::control_server::ControlServer;
use crate::service::ControlService;
use novacron_actors::placement::{Policy, Strategy};
use novacron_actors::process::VmmProcess;
use novacron_actors::store::{STORE_FILE, Store, VmRecord as LocalVm};
use novacron_actors::{Capacity, HostConfig, HostSupervisor};
use novacron_cluster::election::Candidate;
use novacron_cluster::records::HostRecord;
use novacron_cluster::steady::StoreMonitor;
use novacron_cluster::timing::Timing;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where a daemon keeps its VMs' sockets and logs, under its data dir.
pub const RUNTIME_SUBDIR: &str = "run";
/// The TLS directory used when none is given, under the data dir.
pub const TLS_SUBDIR: &str = "tls";

#[derive(Debug, Clone)]
pub struct DaemonArgs {
    pub data_dir: PathBuf,
    pub listen: String,
    /// The cluster's TLS directory; `None`: `<data dir>/tls`, made with a new cluster CA
    /// when it does not exist.
    pub tls_dir: Option<PathBuf>,
    /// This host's name; `None`: the machine's host name.
    pub name: Option<String>,
    /// `None`: `novacron-vmm` next to this program.
    pub vmm_binary: Option<PathBuf>,
    /// vCPUs the host's VMs may have per physical CPU (memory is never overcommitted).
    pub cpu_overcommit: u32,
    /// On the embedded store: the control port of the cluster's first daemon, which holds
    /// the store; `None`: this daemon holds it (or the store is etcd).
    pub join: Option<String>,
    /// This host's labels (`zone=a`), for placement rules.
    pub labels: BTreeMap<String, String>,
    /// On the leader: how new VMs are spread over the hosts.
    pub strategy: Strategy,
    /// The cluster store on etcd: its client URLs (TLS with the cluster CA). Empty: the
    /// embedded store (this daemon's, or with `join` the first daemon's).
    pub etcd: Vec<String>,
    /// The host lease's time to live in seconds (`docs/ha.md`).
    pub lease_ttl: u64,
}

/// How long the daemon waits for its keeper to hold the host's lease before it says it is up.
const KEEPER_START: Duration = Duration::from_secs(10);
/// How long open calls get to end after SIGTERM.
const DRAIN: Duration = Duration::from_secs(2);
/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot use the data dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the cluster's TLS directory {path}")]
    TlsInit {
        path: PathBuf,
        #[source]
        source: novacron_migration::tls::TlsError,
    },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("cannot listen on {addr} (is another daemon using that port? choose another with --listen)")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the host supervisor: {0}")]
    Host(String),
    #[error("the control port failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot find the VMM binary next to {0}; pass --vmm-binary")]
    VmmBinary(PathBuf),
    #[error("cannot join the cluster at {addr}: {reason}")]
    Join { addr: String, reason: String },
    #[error(transparent)]
    Store(#[from] novacron_actors::store::StoreError),
    /// Shown whole (the store's error first): its kinds carry no deeper cause.
    #[error("{store}; refusing to start: {advice}")]
    Untrusted { store: Box<novacron_actors::store::StoreError>, advice: String },
    #[error("--listen {0} is not a concrete address other hosts can reach; give an IP, e.g. 10.0.0.5:7700")]
    Unreachable(SocketAddr),
    #[error(transparent)]
    Ha(#[from] crate::ha::HaError),
    #[error(transparent)]
    Timing(#[from] novacron_cluster::timing::TimingError),
    #[error("--join and --etcd do not go together: on etcd every daemon reaches the store itself")]
    JoinAndEtcd,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

fn vmm_binary() -> Result<PathBuf, DaemonError> {
    if let Some(path) = std::env::var_os("NOVACRON_VMM") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().map_err(|_| DaemonError::VmmBinary("this program".into()))?;
    let dir = exe.parent().ok_or_else(|| DaemonError::VmmBinary(exe.clone()))?;
    // Test binaries live in target/<profile>/deps, the VMM one level up.
    [dir.join("novacron-vmm"), dir.join("../novacron-vmm")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(DaemonError::VmmBinary(exe))
}

/// The TLS directory to serve with, made (a new cluster CA and this node's certificate)
/// when it is the default one and does not exist yet.
fn tls_dir(args: &DaemonArgs, name: &str) -> Result<PathBuf, DaemonError> {
    if let Some(dir) = &args.tls_dir {
        return Ok(dir.clone());
    }
    let dir = args.data_dir.join(TLS_SUBDIR);
    if !dir.join(novacron_migration::tls::CA_CERT).exists() {
        novacron_migration::tls::init(&dir, name)
            .map_err(|source| DaemonError::TlsInit { path: dir.clone(), source })?;
        tracing::info!(
            "made a new cluster CA in {}; issue other hosts' and clients' certificates with `novacron certs issue --ca-dir {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// Opens the state store once before anything else, and refuses a store that cannot be
/// trusted (emptied, damaged, a record that does not decode), saying which VMMs of this
/// data dir still run: a daemon started on it would not know them, and they would run
/// unsupervised (and block VMs of their names). Returns the VMs it holds.
fn check_store(data_dir: &Path) -> Result<Vec<LocalVm>, DaemonError> {
    // redb may panic on a damaged file; the store catches it, and this keeps the panic's
    // message (and backtrace) off the one line that says what is wrong. Nothing else runs
    // yet that could panic meanwhile.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = Store::open(data_dir);
    std::panic::set_hook(hook);
    match opened {
        Ok(store) => Ok(store.list_vms()?),
        Err(source) if source.is_damaged() => {
            let advice = untrusted_advice(&data_dir.join(RUNTIME_SUBDIR), &data_dir.join(STORE_FILE));
            Err(DaemonError::Untrusted { store: Box::new(source), advice })
        }
        Err(e) => Err(e.into()),
    }
}

/// What to do about a store that cannot be trusted, given the VMMs still running.
fn untrusted_advice(runtime_dir: &Path, store: &Path) -> String {
    let mut running: Vec<(String, Option<u32>)> = VmmProcess::running_in(runtime_dir)
        .into_iter()
        .map(|(pid, socket)| (vm_of_socket(&socket), Some(pid)))
        .collect();
    // A socket that answers though no process names it (a VMM started another way).
    if let Ok(entries) = std::fs::read_dir(runtime_dir) {
        for path in entries.flatten().map(|e| e.path()) {
            let name = vm_of_socket(&path);
            let is_socket = path.extension().is_some_and(|e| e == "sock");
            if is_socket && !running.iter().any(|(n, _)| *n == name) && UnixStream::connect(&path).is_ok() {
                running.push((name, None));
            }
        }
    }
    if running.is_empty() {
        return format!(
            "no VMM of this data dir runs: move {} away to start with an empty store, or restore it from a backup",
            store.display()
        );
    }
    let listed: Vec<String> = running
        .iter()
        .map(|(name, pid)| match pid {
            Some(pid) => format!("{name} (pid {pid})"),
            None => format!("{name} (its socket answers)"),
        })
        .collect();
    let pids: Vec<String> = running.iter().filter_map(|(_, pid)| pid.map(|p| p.to_string())).collect();
    let (count, verb) =
        if running.len() == 1 { ("1 VMM".to_string(), "runs") } else { (format!("{} VMMs", running.len()), "run") };
    format!(
        "{count} of this data dir still {verb}: {}; a new store would not know them: restore {} from a backup, or stop them (kill {}) and move it away",
        listed.join(", "),
        store.display(),
        pids.join(" ")
    )
}

/// The VM a control socket `<runtime dir>/NAME.sock` is of.
fn vm_of_socket(socket: &Path) -> String {
    socket.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn create_dir(path: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(path).map_err(|source| DaemonError::DataDir { path: path.to_owned(), source })
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(args: &DaemonArgs) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(args))
}

async fn serve(args: &DaemonArgs) -> Result<(), DaemonError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    create_dir(&args.data_dir)?;
    let data_dir = std::path::absolute(&args.data_dir)
        .map_err(|source| DaemonError::DataDir { path: args.data_dir.clone(), source })?;
    let local_vms = check_store(&data_dir)?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let tls_dir = tls_dir(args, &name)?;
    let tls = server_tls(&tls_dir)?;
    let token = load_or_create_token(&data_dir)?;
    let vmm_binary = match &args.vmm_binary {
        Some(p) => p.clone(),
        None => vmm_binary()?,
    };

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|source| DaemonError::Listen { addr: args.listen.clone(), source })?;
    let addr: SocketAddr =
        listener.local_addr().map_err(|source| DaemonError::Listen { addr: args.listen.clone(), source })?;

    if addr.ip().is_unspecified() && args.join.is_some() {
        return Err(DaemonError::Unreachable(addr));
    }
    let physical = Capacity::from_proc().map_err(|e| DaemonError::Host(novacron_actors::error_chain(&e)))?;
    let me = HostIdentity {
        name: name.clone(),
        address: addr.to_string(),
        cpus: physical.vcpus,
        labels: args.labels.clone(),
        primary: args.join.is_none(),
    };
    let mode = match (&args.join, args.etcd.is_empty()) {
        (Some(_), false) => return Err(DaemonError::JoinAndEtcd),
        (Some(addr), true) => StoreMode::Joined(addr.clone()),
        (None, false) => StoreMode::Etcd(args.etcd.clone()),
        (None, true) => StoreMode::Embedded,
    };
    let timing = Timing::from_ttl(Duration::from_secs(args.lease_ttl))?;
    let cluster_store = ClusterStore::open(mode.clone(), &data_dir, &tls_dir, &addr.to_string(), timing).await?;
    let store = cluster_store.store.clone();
    let host_record =
        HostRecord { name: name.clone(), address: addr.to_string(), labels: args.labels.clone(), cordoned: false };
    let identity = novacron_cluster::process::identity(&data_dir);
    crate::ha::check_name_free(store.as_ref(), &name, &identity).await?;
    crate::ha::import_vms(store.as_ref(), &name, &local_vms).await?;
    crate::ha::write_host_record(store.as_ref(), host_record).await?;
    let keeper = KeeperProcess::new(&cluster_store, &name, &addr.to_string(), &data_dir, &tls_dir)?;
    // For the keeper: it ends this daemon's tenure when this daemon dies.
    let pid_file = data_dir.join(novacron_cluster::process::DAEMON_PID_FILE);
    std::fs::write(&pid_file, std::process::id().to_string())
        .map_err(|source| DaemonError::DataDir { path: pid_file.clone(), source })?;

    let mut config = HostConfig::new(data_dir.join(RUNTIME_SUBDIR), vmm_binary);
    config.data_dir = Some(data_dir.clone());
    config.capacity = Some(Capacity { vcpus: physical.vcpus.saturating_mul(args.cpu_overcommit.max(1)), ..physical });
    config.keeper = Some(keeper.socket().to_owned());
    let (host, host_task) = ractor::Actor::spawn(None, HostSupervisor, config)
        .await
        .map_err(|e| DaemonError::Host(novacron_actors::error_chain(&e)))?;

    let policy = Policy {
        cpu_overcommit_permille: args.cpu_overcommit.max(1).saturating_mul(1000),
        mem_overcommit_permille: 1000,
        strategy: args.strategy,
    };
    let leadership = Leadership::default();
    let steady = StoreMonitor::start(store.clone());
    let cluster_args = {
        let (me, host, tls_dir, store) = (me.clone(), host.clone(), tls_dir.clone(), store.clone());
        move |tenure| ClusterArgs {
            me: me.clone(),
            host: host.clone(),
            tls_dir: tls_dir.clone(),
            policy,
            store: store.clone(),
            tenure,
            timing,
            steady: steady.clone(),
        }
    };
    let candidate = || Candidate::new(store.clone(), &name, &addr.to_string(), timing.ttl);
    let campaigner = Campaigner {
        candidate: candidate(),
        host: name.clone(),
        cluster_args: Box::new(cluster_args),
        tls_dir: tls_dir.clone(),
        timing,
        may_lead: mode.elects(),
    };
    let leaving = Leaving::default();

    let service = ControlService {
        host: host.clone(),
        me,
        operations: Arc::new(Operations::new(&name)),
        leadership: leadership.clone(),
        store: store.clone(),
        leaving: leaving.clone(),
        peers: Default::default(),
        tls_dir: tls_dir.clone(),
        snapshots: Default::default(),
    };
    let gate = Arc::new(Gate::default());
    let incoming = crate::listen::Incoming::new(listener, gate.clone());
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = {
        let (stopping, leadership, candidate) = (stopping.clone(), leadership.clone(), candidate());
        async move {
            shutdown_signal().await;
            // Another daemon leads at once. The keeper stays: the VMs run on, and nothing
            // fails over while the daemon is away.
            crate::ha::leadership::step_down(&candidate, &leadership).await;
            stopping.notify_one();
        }
    };
    let authenticator = Authenticator::new(&token, Some(gate));
    let mut router = tonic::transport::Server::builder()
        .tls_config(tls.timeout(TLS_HANDSHAKE_TIMEOUT))
        .map_err(DaemonError::Serve)?
        .add_service(ControlServer::with_interceptor(service, authenticator.clone()));
    // The embedded store, served to the other daemons and the keepers.
    if let Some(served) = &cluster_store.service {
        use tonic::service::interceptor::InterceptedService;
        router = router
            .add_service(InterceptedService::new(served.kv(), authenticator.clone()))
            .add_service(InterceptedService::new(served.watch(), authenticator.clone()))
            .add_service(InterceptedService::new(served.lease(), authenticator.clone()))
            .add_service(InterceptedService::new(served.cluster(), authenticator.clone()))
            .add_service(InterceptedService::new(served.maintenance(), authenticator.clone()));
    }
    let server = router.serve_with_incoming_shutdown(incoming, signalled);
    let server = tokio::spawn(server);
    // With the port open (the keeper of the store's own host reaches the store there).
    keeper.keep_running();
    crate::ha::reconcile::run(store.clone(), host.clone(), name.clone(), leaving);
    let leadership_view = leadership.clone();
    crate::ha::leadership::start(campaigner, leadership).await;
    wait_for_lease(store.as_ref(), &name, &keeper).await;
    wait_until_placeable(&leadership_view, &name).await;
    // The one line scripts and tests wait for: the port is open, the host's keeper holds
    // its lease (VMs may run here) and the cluster's leader is known.
    println!(
        "novacron daemon: host {name} listening on {addr}; data dir {}; token in {}",
        data_dir.display(),
        data_dir.join(crate::auth::TOKEN_FILE).display()
    );
    tracing::info!(%addr, host = %name, "control port open");
    let server = async {
        match server.await {
            Ok(served) => served.map_err(DaemonError::Serve),
            Err(e) => Err(DaemonError::Host(format!("the control port's task ended: {e}"))),
        }
    };
    // Open streams (`events --follow`) get a moment to end, not a veto.
    let result = tokio::select! {
        result = server => result,
        () = async { stopping.notified().await; tokio::time::sleep(DRAIN).await } => Ok(()),
    };
    tracing::info!("daemon stopping; the VMs keep running and the next daemon on this data dir takes them back");
    host.stop(Some("daemon stopping".into()));
    let _ = host_task.await;
    result
}

/// Waits (a while) until the host's keeper, the one running with this daemon's settings,
/// holds its lease: not a keeper this daemon just replaced, whose record may still be
/// there.
async fn wait_for_lease(store: &dyn novacron_store::Store, name: &str, keeper: &KeeperProcess) {
    let key = novacron_cluster::records::alive_key(name);
    let deadline = tokio::time::Instant::now() + KEEPER_START;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(kv)) = store.get(&key).await
            && let Ok(alive) = novacron_cluster::records::decode::<novacron_cluster::records::AliveRecord>(&kv)
            && keeper.is_current(alive.pid)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("the host's keeper holds no lease yet (see keeper.log in the data dir); VMs here wait for it");
}

/// On the leader, waits (a while) until its ClusterSupervisor sees this host up, so that
/// the first VM created can be placed here.
async fn wait_until_placeable(leadership: &Leadership, name: &str) {
    let Some(cluster) = leadership.cluster() else { return };
    let deadline = tokio::time::Instant::now() + KEEPER_START;
    while tokio::time::Instant::now() < deadline {
        let hosts = ractor::call_t!(cluster, crate::cluster::ClusterMsg::Hosts, 2000).unwrap_or_default();
        if hosts.iter().any(|h| h.name == name && h.state == "up") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot watch SIGTERM/SIGINT; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
