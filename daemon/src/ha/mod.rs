//! The daemon's part of the HA control plane (`docs/ha.md`): the cluster store it uses,
//! the host's keeper process, the host's record, leadership, the VM records and the
//! reconciliation of this host's VMs with them.
//!
//! - [`records`]: VM records (owner, epoch, spec, desired state).
//! - [`leadership`]: the election loop and who leads now.
//! - [`reconcile`]: this host's VMs brought in line with the records.

pub mod leadership;
pub mod ops;
pub mod reconcile;
pub mod records;

use novacron_actors::process::{Launch, VmmProcess};
use novacron_actors::store::VmRecord as LocalVm;
use novacron_cluster::keeper::CLAIM_SOCKET;
use novacron_cluster::records::{HostRecord, host_key};
use novacron_cluster::timing::Timing;
use novacron_store::embedded::EmbeddedStore;
use novacron_store::etcd::{DEFAULT_TIMEOUT, EtcdConfig, EtcdStore};
use novacron_store::serve::StoreService;
use novacron_store::{Op, Store, StoreError, Txn};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The embedded store's file in the first daemon's data dir.
pub const CLUSTER_STORE_FILE: &str = "cluster.redb";
/// The keeper's log in the data dir.
pub const KEEPER_LOG: &str = "keeper.log";
/// How long a joining daemon keeps trying to reach the first daemon's store.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);
/// How often the daemon checks that its host's keeper runs.
const KEEPER_CHECK: Duration = Duration::from_secs(1);

/// Where the cluster's state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreMode {
    /// This daemon holds the embedded store and serves it to the others (no HA).
    Embedded,
    /// The embedded store of the first daemon, at its control port.
    Joined(String),
    /// An etcd cluster: its client URLs.
    Etcd(Vec<String>),
}

impl StoreMode {
    /// Only daemons on etcd elect a leader; on the embedded store the first daemon leads.
    pub fn elects(&self) -> bool {
        matches!(self, StoreMode::Etcd(_) | StoreMode::Embedded)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("cannot open the embedded cluster store")]
    Embedded(#[source] StoreError),
    #[error(
        "cannot reach the cluster store at {endpoints}; check --etcd (or --join) and that the cluster CA in {tls_dir} is etcd's"
    )]
    Connect {
        endpoints: String,
        tls_dir: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(
        "--etcd {url} is not a URL ({reason}): give etcd's client URLs as https://HOST:PORT[,https://HOST:PORT...]"
    )]
    BadUrl { url: String, reason: &'static str },
    #[error(
        "the cluster store at {endpoints} and this node do not trust each other's certificates ({reason}): the certificate in {tls_dir} must be of the cluster's CA (novacron certs issue --ca-dir CLUSTER_CA_DIR --out {tls_dir})"
    )]
    Certificate { endpoints: String, tls_dir: PathBuf, reason: String },
    #[error(
        "host name {host} is in use by another daemon ({other}); give this daemon another --name, or stop the other one"
    )]
    DuplicateHost { host: String, other: String },
    #[error("cannot read from the cluster store whether host name {host} is free")]
    NameCheck {
        host: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot write this host's record in the cluster store")]
    HostRecord(#[source] StoreError),
    #[error(
        "cannot put VM {vm} of this data dir into the cluster's records; start the daemon again once the store answers"
    )]
    Import {
        vm: String,
        #[source]
        source: tonic::Status,
    },
    #[error(
        "VM {vm} of this data dir has a namesake in the cluster, on host {owner}: one name cannot be two VMs; delete one of them (or start this daemon on its own store) and start it again"
    )]
    ImportConflict { vm: String, owner: String },
    #[error("cannot start the host's keeper")]
    Keeper(#[source] novacron_actors::process::ProcessError),
}

/// The cluster store as this daemon uses it.
pub struct ClusterStore {
    pub store: Arc<dyn Store>,
    pub mode: StoreMode,
    /// With the embedded store: the services that serve it on this daemon's port.
    pub service: Option<StoreService>,
    pub timing: Timing,
}

fn etcd_config(endpoints: Vec<String>, tls_dir: &Path) -> EtcdConfig {
    EtcdConfig { endpoints, tls_dir: Some(tls_dir.to_owned()), timeout: DEFAULT_TIMEOUT }
}

impl ClusterStore {
    /// Opens (embedded) or reaches (joined, etcd) the cluster store. `address` is this
    /// daemon's control port.
    pub async fn open(
        mode: StoreMode,
        data_dir: &Path,
        tls_dir: &Path,
        address: &str,
        timing: Timing,
    ) -> Result<ClusterStore, HaError> {
        let connect_err = |endpoints: String, source| match source {
            StoreError::BadUrl { url, reason } => HaError::BadUrl { url, reason },
            StoreError::TlsRefused { endpoints, reason } => {
                HaError::Certificate { endpoints, tls_dir: tls_dir.to_owned(), reason }
            }
            source => HaError::Connect { endpoints, tls_dir: tls_dir.to_owned(), source },
        };
        let (store, service): (Arc<dyn Store>, _) = match &mode {
            StoreMode::Embedded => {
                let store: Arc<dyn Store> =
                    Arc::new(EmbeddedStore::open(&data_dir.join(CLUSTER_STORE_FILE)).map_err(HaError::Embedded)?);
                let service = StoreService::new(store.clone(), format!("https://{address}"));
                (store, Some(service))
            }
            StoreMode::Joined(addr) => {
                let config = etcd_config(vec![format!("https://{addr}")], tls_dir);
                let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
                let store = loop {
                    match EtcdStore::connect(&config).await {
                        Ok(s) => break s,
                        // Waiting mends neither a wrong address nor a wrong certificate.
                        Err(e @ (StoreError::BadUrl { .. } | StoreError::TlsRefused { .. })) => {
                            return Err(connect_err(addr.clone(), e));
                        }
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            tracing::warn!("cannot reach the cluster at {addr} yet ({e}); retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => return Err(connect_err(addr.clone(), e)),
                    }
                };
                (Arc::new(store), None)
            }
            StoreMode::Etcd(urls) => {
                let store = EtcdStore::connect(&etcd_config(urls.clone(), tls_dir))
                    .await
                    .map_err(|e| connect_err(urls.join(","), e))?;
                (Arc::new(store), None)
            }
        };
        Ok(ClusterStore { store, mode, service, timing })
    }

    /// The client URLs the host's keeper reaches the store at.
    fn keeper_endpoints(&self, address: &str) -> Vec<String> {
        match &self.mode {
            StoreMode::Embedded => vec![format!("https://{address}")],
            StoreMode::Joined(addr) => vec![format!("https://{addr}")],
            StoreMode::Etcd(urls) => urls.clone(),
        }
    }
}

/// Refuses a host name whose lease another keeper holds (another machine, or another data
/// dir on this one): two daemons under one name would each take the other's VMs for their
/// own.
pub async fn check_name_free(store: &dyn Store, host: &str, identity: &str) -> Result<(), HaError> {
    let key = novacron_cluster::records::alive_key(host);
    let read = store.get(&key).await.map_err(|source| HaError::NameCheck { host: host.to_string(), source })?;
    let Some(kv) = read else { return Ok(()) };
    match novacron_cluster::records::decode::<novacron_cluster::records::AliveRecord>(&kv) {
        Ok(alive) if alive.identity != identity => Err(HaError::DuplicateHost {
            host: host.to_string(),
            other: format!("its keeper is pid {} for {}", alive.pid, alive.identity),
        }),
        _ => Ok(()),
    }
}

/// Puts the VMs of this data dir into the cluster's records, as this host's, when the
/// host is new to the store (a data dir from before the cluster store, or a host moved to
/// a new store). Done before the host's record is written, so a daemon stopped half-way
/// does it again. From then on a VM here without a record is one the cluster deleted.
pub async fn import_vms(store: &dyn Store, host: &str, local: &[LocalVm]) -> Result<(), HaError> {
    if store.get(&host_key(host)).await.map_err(HaError::HostRecord)?.is_some() {
        return Ok(());
    }
    // Namesakes first, so that a refused host leaves no records behind (a host without a
    // host record is never failed over, but its records would block those names).
    for vm in local {
        let name = vm.spec.name.clone();
        match records::get(store, &name).await {
            Ok(Some(other)) if other.record.owner != host => {
                return Err(HaError::ImportConflict { vm: name, owner: other.record.owner });
            }
            Ok(_) => {}
            Err(source) => return Err(HaError::Import { vm: name, source }),
        }
    }
    for vm in local {
        let name = vm.spec.name.clone();
        match records::import(store, host, &vm.spec, vm.desired).await {
            Ok(None) => tracing::info!(vm = %name, "a VM of this data dir is in the cluster's records now"),
            Ok(Some(owner)) => return Err(HaError::ImportConflict { vm: name, owner }),
            Err(source) => return Err(HaError::Import { vm: name, source }),
        }
    }
    Ok(())
}

/// Writes (or updates) this host's record, keeping a cordon already set.
pub async fn write_host_record(store: &dyn Store, mut record: HostRecord) -> Result<(), HaError> {
    let key = host_key(&record.name);
    if let Some(kv) = store.get(&key).await.map_err(HaError::HostRecord)?
        && let Ok(old) = serde_json::from_slice::<HostRecord>(&kv.value)
    {
        record.cordoned = old.cordoned;
    }
    let value = serde_json::to_vec(&record)
        .map_err(|e| HaError::HostRecord(StoreError::Protocol { op: "host record", reason: e.to_string() }))?;
    store.txn(Txn::new().then(Op::put(&key, value))).await.map_err(HaError::HostRecord)?;
    Ok(())
}

/// The host's keeper, kept running by the daemon (in a session of its own: it outlives the
/// daemon, which is the point of it).
#[derive(Clone)]
pub struct KeeperProcess {
    launch: Launch,
    socket: PathBuf,
}

impl KeeperProcess {
    pub fn new(
        store: &ClusterStore,
        name: &str,
        address: &str,
        data_dir: &Path,
        tls_dir: &Path,
    ) -> Result<KeeperProcess, HaError> {
        let exe = std::env::current_exe().map_err(|source| {
            HaError::Keeper(novacron_actors::process::ProcessError::Spawn { binary: "novacron".into(), source })
        })?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "keeper".into(),
            "--data-dir".into(),
            data_dir.into(),
            "--name".into(),
            name.into(),
            "--store".into(),
            store.keeper_endpoints(address).join(",").into(),
            "--tls-dir".into(),
            tls_dir.into(),
            "--lease-ttl".into(),
            store.timing.ttl.as_secs().to_string().into(),
        ];
        if store.mode == StoreMode::Embedded {
            args.push("--local-store".into());
        }
        let launch = Launch { binary: exe, args, log: data_dir.join(KEEPER_LOG) };
        Ok(KeeperProcess { launch, socket: data_dir.join(crate::run::RUNTIME_SUBDIR).join(CLAIM_SOCKET) })
    }

    /// The keeper's socket, which the VMMs ask for their claims.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
    }

    /// Keepers of this data dir running now, with their command lines.
    fn running_keepers(&self) -> Vec<(u32, Vec<std::ffi::OsString>)> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| Some((pid, self.keeper_args(pid)?)))
            .collect()
    }

    /// The arguments of process `pid` if it is a keeper of this data dir.
    fn keeper_args(&self, pid: u32) -> Option<Vec<std::ffi::OsString>> {
        let data_dir = self.launch.args.get(2)?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let words: Vec<std::ffi::OsString> = raw
            .split(|&b| b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| std::ffi::OsString::from(String::from_utf8_lossy(w).into_owned()))
            .collect();
        let is_ours = words.get(1).is_some_and(|w| w == "keeper") && words.get(3) == Some(data_dir);
        is_ours.then(|| words[1..].to_vec())
    }

    /// Ends a keeper of this data dir started with other arguments (the daemon listens
    /// elsewhere now, or the store moved): the new one goes on with its lease.
    fn replace_stale(&self) {
        for (pid, args) in self.running_keepers() {
            if args != self.launch.args {
                tracing::info!(pid, "the host's keeper runs with other settings; replacing it");
                // SAFETY: kill has no memory effects; the pid runs this data dir's keeper.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::path::Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Whether process `pid` is this data dir's keeper, running with this daemon's settings.
    pub fn is_current(&self, pid: u32) -> bool {
        self.keeper_args(pid).is_some_and(|args| args == self.launch.args)
    }

    /// Starts the keeper unless one runs for this data dir, and keeps it running.
    pub fn keep_running(&self) {
        self.replace_stale();
        let this = self.clone();
        tokio::spawn(async move {
            let mut started: Option<VmmProcess> = None;
            loop {
                let alive = this.running() || started.as_ref().is_some_and(|p| p.reap().is_none());
                if !alive {
                    match VmmProcess::spawn(&this.launch) {
                        Ok(p) => {
                            tracing::info!(pid = p.pid(), "started the host's keeper");
                            started = Some(p);
                        }
                        Err(e) => {
                            tracing::error!("cannot start the host's keeper: {}", novacron_actors::error_chain(&e))
                        }
                    }
                }
                tokio::time::sleep(KEEPER_CHECK).await;
            }
        });
    }
}
