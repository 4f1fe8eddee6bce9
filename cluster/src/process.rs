//! `novacron keeper`: the keeper as a process of its own, as the daemon starts it (in a
//! session of its own, so that it outlives the daemon).

use crate::keeper::{Keeper, KeeperConfig, KeeperError};
use crate::timing::{Timing, TimingError};
use novacron_store::Store;
use novacron_store::etcd::{DEFAULT_TIMEOUT, EtcdConfig, EtcdStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The keeper's file of the lease it holds, in the data dir.
pub const LEASE_FILE: &str = "keeper.lease";
/// The daemon's pid, in the data dir (the keeper watches it).
pub const DAEMON_PID_FILE: &str = "daemon.pid";

#[derive(clap::Args, Debug, Clone)]
pub struct KeeperArgs {
    /// The daemon's data dir (the VMMs' sockets are in its `run/`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// This host's name in the cluster.
    #[arg(long)]
    pub name: String,
    /// The cluster store: etcd's client URLs, or the first daemon's control port for the
    /// embedded store (https://HOST:PORT).
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    pub store: Vec<String>,
    /// The TLS directory: the cluster CA and this node's certificate.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: PathBuf,
    /// The host lease's time to live, in seconds (`docs/ha.md`).
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    pub lease_ttl: u64,
    /// The store is this host's own embedded store: never fence for want of it.
    #[arg(long)]
    pub local_store: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperProcessError {
    #[error(transparent)]
    Timing(#[from] TimingError),
    #[error("cannot reach the cluster store")]
    Store(#[source] novacron_store::StoreError),
    #[error(transparent)]
    Keeper(#[from] KeeperError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// What identifies this machine and data dir to the cluster (see `KeeperConfig::identity`).
pub fn identity(data_dir: &Path) -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{machine}:{}", data_dir.display())
}

/// Runs the keeper until SIGTERM or SIGINT.
pub fn run(args: &KeeperArgs) -> Result<(), KeeperProcessError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(KeeperProcessError::Runtime)?;
    runtime.block_on(async {
        let timing = Timing::from_ttl(Duration::from_secs(args.lease_ttl))?;
        let config = EtcdConfig { endpoints: args.store.clone(), tls_dir: Some(args.tls_dir.clone()), timeout: DEFAULT_TIMEOUT };
        // The store may not be up yet (the first daemon starting): keep trying.
        let store: Arc<dyn Store> = loop {
            match EtcdStore::connect(&config).await {
                Ok(s) => break Arc::new(s),
                Err(e) => {
                    tracing::warn!("keeper: {}; trying again", novacron_vmm::process::error_chain(&e));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let keeper = Keeper::new(
            KeeperConfig {
                host: args.name.clone(),
                identity: identity(&args.data_dir),
                run_dir: args.data_dir.join("run"),
                lease_file: args.data_dir.join(LEASE_FILE),
                store_is_local: args.local_store,
                timing,
                daemon_pid_file: Some(args.data_dir.join(DAEMON_PID_FILE)),
            },
            store,
        );
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            let _ = stop_tx.send(true);
        });
        keeper.run(stop).await.map_err(KeeperProcessError::from)
    })
}
