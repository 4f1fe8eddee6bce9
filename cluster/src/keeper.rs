//! The host's keeper: holds the host's lease in the cluster store, keeps `alive/HOST` under
//! it, sends every VMM of a VM this host owns a run permit after each renewal, claims
//! arriving migrations at their commit, and shuts down VMMs of VMs that another host owns
//! now (`docs/ha.md`). It is a process of its own (`novacron keeper`), apart from the
//! daemon, so that a daemon that crashes and comes back costs the guests nothing.
//!
//! Each round (every R): renew the lease, noting when the renewal was sent (`s`); read the
//! VM records; permit each owned VM's VMM until `s + F`. A renewal that fails sends no
//! permits (those already sent run out by themselves), unless the store is this host's
//! own embedded store, which no other host can decide with while this one cannot reach it.
//! A lease that expired is replaced, and `alive/HOST` written again, before the records are
//! read and anything is permitted: the leader's failover compares `alive/HOST` absent, so
//! either it moved a VM before that write (and the read shows the new owner) or it fails.
//!
//! A renewal that is slow or fails because the store is away is bridged: the keeper asks
//! each member on its own whether it has a leader. When a strict majority has none, and
//! each still has `alive/HOST` under this host's lease, no leader can be elected but after
//! that poll, and a new leader gives every lease its full TTL: what this host owned is
//! permitted until `t + F`, `t` the time the poll was sent. So running guests go on
//! through a loss of quorum (`docs/ha.md`, "While the store has no quorum"; the leader's
//! side of the argument is `steady.rs`).

use crate::records::{self, AliveRecord, RecordError, VmRecord, alive_key, vm_key};
use crate::timing::{LEADER_POLL_WITHIN, Timing};
use novacron_store::{Compare, LeaseId, Op, OpResult, Revision, Store, StoreError, Txn};
use novacron_vmm::api::Request;
use novacron_vmm::api::client::call;
use novacron_vmm::permit::{ClaimAnswer, ClaimRequest, boottime_ms};
use novacron_vmm::process::error_chain;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The keeper's socket in the run directory, where arriving VMMs ask for their claim.
pub const CLAIM_SOCKET: &str = "keeper.sock";
/// How long a VMM may take to answer a permit or a status request.
const VMM_TIMEOUT: Duration = Duration::from_secs(1);
/// A claim needs a permit that holds at least this long.
const CLAIM_MIN_LEFT_MS: u64 = 200;
/// A renewal not answered within this is bridged (see the module doc).
const SLOW_RENEWAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct KeeperConfig {
    pub host: String,
    /// This machine and data dir: another keeper with the same host name and another
    /// identity is refused.
    pub identity: String,
    /// The VMMs' control sockets (`NAME.sock`) and the keeper's own.
    pub run_dir: PathBuf,
    /// Where the lease id is kept, so that a restarted keeper goes on with the same lease.
    pub lease_file: PathBuf,
    /// The store is this host's embedded store (see the module doc).
    pub store_is_local: bool,
    pub timing: Timing,
    /// Where the host's daemon writes its pid: when that daemon dies while it leads the
    /// cluster, the keeper ends its tenure at once, so that another daemon leads within
    /// moments instead of after the leadership lease's TTL.
    pub daemon_pid_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error(
        "host name {host} is in use by another keeper ({other}); give this host another --name, or stop the other one"
    )]
    DuplicateHost { host: String, other: String },
    #[error("cannot use the keeper's socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// What the claim server needs of the renewal loop.
#[derive(Debug, Default)]
struct Shared {
    /// The lease and the mod revision of our `alive/HOST` write under it.
    lease: Option<(LeaseId, Revision)>,
    /// Until when (CLOCK_BOOTTIME ms) the last successful renewal lets this host run guests.
    permit_until: Option<u64>,
}

pub struct Keeper {
    config: KeeperConfig,
    store: Arc<dyn Store>,
    shared: Arc<Mutex<Shared>>,
    /// The VMs this host owned (with their epochs) when the records were last read: on
    /// this host's own embedded store, what is permitted while the store cannot be read.
    owned: Mutex<BTreeMap<String, u64>>,
    /// Bridged permits since the last renewal (for the log).
    bridged: std::sync::atomic::AtomicU32,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Keeper {
    pub fn new(config: KeeperConfig, store: Arc<dyn Store>) -> Self {
        Keeper {
            config,
            store,
            shared: Arc::new(Mutex::new(Shared::default())),
            owned: Mutex::new(BTreeMap::new()),
            bridged: Default::default(),
        }
    }

    /// Runs until `stop` says so (then it revokes nothing: a keeper that stops on purpose
    /// lets its lease run out, as a crashed one would, unless the daemon stops the host).
    pub async fn run(&self, stop: tokio::sync::watch::Receiver<bool>) -> Result<(), KeeperError> {
        let listener = self.bind_claims()?;
        // One future: when the keeper's task ends (or is dropped), its claim server goes too.
        let claims = serve_claims(listener, self.config.clone(), self.store.clone(), self.shared.clone());
        tokio::select! {
            result = self.rounds(stop) => result,
            () = claims => Ok(()),
            () = self.watch_daemon() => Ok(()),
        }
    }

    /// Waits for the host's daemon to die, again and again; each time, ends its tenure if
    /// it led the cluster (a dead daemon can neither lead nor step down).
    async fn watch_daemon(&self) {
        let Some(pid_file) = self.config.daemon_pid_file.clone() else { return std::future::pending().await };
        let read_pid = || std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
        loop {
            let pid = read_pid();
            let watched = pid.and_then(|pid| novacron_actors::process::VmmProcess::adopt(pid).ok().map(|p| (pid, p)));
            match watched.as_ref().and_then(|(pid, p)| p.exited().ok().map(|exited| (*pid, exited))) {
                Some((pid, exited)) => {
                    let _ = exited.await;
                    self.daemon_died(pid).await;
                }
                None => tokio::time::sleep(self.config.timing.renew).await,
            }
            // A pid file left by the daemon that just died: wait for its successor's.
            while read_pid() == pid {
                tokio::time::sleep(self.config.timing.renew).await;
            }
        }
    }

    /// Ends the tenure of the daemon `pid` of this host, if it leads.
    async fn daemon_died(&self, pid: u32) {
        let leader = match self.store.get(records::LEADER).await {
            Ok(Some(kv)) => serde_json::from_slice::<crate::election::LeaderRecord>(&kv.value).ok(),
            _ => None,
        };
        if let Some(leader) = leader.filter(|l| held_by_dead_daemon(l, &self.config.host, pid)) {
            tracing::warn!(host = %self.config.host, "this host's daemon died while it led the cluster; ending its tenure");
            if let Err(e) = self.store.revoke(leader.lease).await {
                tracing::warn!("cannot end the dead daemon's tenure: {}", error_chain(&e));
            }
        }
    }

    async fn rounds(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<(), KeeperError> {
        let mut tick = tokio::time::interval(self.config.timing.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => {
                    self.last_permits().await;
                    return Ok(());
                }
            }
            match self.round().await {
                Err(e @ KeeperError::DuplicateHost { .. }) => return Err(e),
                Err(e) => tracing::warn!("keeper round: {}", error_chain(&e)),
                Ok(()) => {}
            }
        }
    }

    /// On this host's own embedded store, what this host owned is permitted once more as
    /// the keeper stops, so that a daemon replacing its keeper (it listens elsewhere now)
    /// gives the next keeper a whole fence time to take over. On another store nothing is
    /// sent: the lease is not renewed any more.
    async fn last_permits(&self) {
        if !self.config.store_is_local || lock(&self.shared).permit_until.is_none() {
            return;
        }
        self.permit_owned(boottime_ms() + self.config.timing.fence.as_millis() as u64).await;
    }

    /// Permits what this host owned when the records were last read.
    async fn permit_owned(&self, until: u64) {
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let run_dir = self.config.run_dir.clone();
        let _ = tokio::task::spawn_blocking(move || permit_and_evict(&run_dir, &owned, &BTreeMap::new(), until)).await;
    }

    fn bind_claims(&self) -> Result<tokio::net::UnixListener, KeeperError> {
        let path = self.config.run_dir.join(CLAIM_SOCKET);
        let err = |source| KeeperError::Socket { path: path.clone(), source };
        std::fs::create_dir_all(&self.config.run_dir).map_err(err)?;
        // A socket left by a keeper that died; a live keeper would answer.
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(KeeperError::Socket {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another keeper runs for this run dir"),
            });
        }
        let _ = std::fs::remove_file(&path);
        tokio::net::UnixListener::bind(&path).map_err(err)
    }

    /// One round: renew (or take) the lease, then permit what this host owns.
    async fn round(&self) -> Result<(), KeeperError> {
        let sent = boottime_ms();
        let renewed = self.renew_bridged().await;
        let until = match renewed {
            Ok(()) => {
                let bridged = self.bridged.swap(0, std::sync::atomic::Ordering::Relaxed);
                if bridged > 0 {
                    tracing::info!(host = %self.config.host, bridged, "the host's lease is renewed again");
                }
                Some(sent + self.config.timing.fence.as_millis() as u64)
            }
            Err(e @ KeeperError::DuplicateHost { .. }) => return Err(e),
            Err(e) if self.config.store_is_local => {
                tracing::debug!("the local store did not answer ({e}); permits go on");
                Some(sent + self.config.timing.fence.as_millis() as u64)
            }
            Err(e) => {
                tracing::warn!("cannot renew the host's lease: {}", error_chain(&e));
                if store_away(&e) {
                    self.bridge().await;
                }
                None
            }
        };
        lock(&self.shared).permit_until = until;
        let Some(until) = until else { return Ok(()) };
        let records = match self.store.list(records::VMS).await {
            Ok(listing) => listing.kvs,
            Err(e) if self.config.store_is_local => {
                // Nobody decides anything while this host's own store is away: what it owned
                // it still owns.
                tracing::debug!("cannot read the VM records: {e}; permitting what this host owned");
                self.permit_owned(until).await;
                return Ok(());
            }
            Err(e) => return Err(RecordError::from(e).into()),
        };
        let mut owned = BTreeMap::new();
        let mut elsewhere = BTreeMap::new();
        for kv in &records {
            let Some(name) = records::name_of(&kv.key, records::VMS) else { continue };
            let record: VmRecord = match records::decode(kv) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            };
            if record.owner == self.config.host {
                owned.insert(name.to_string(), record.epoch);
            } else if record.moving_to.as_deref() != Some(self.config.host.as_str()) {
                elsewhere.insert(name.to_string(), record.epoch);
            }
        }
        *self.owned.lock().unwrap_or_else(|p| p.into_inner()) = owned.clone();
        let run_dir = self.config.run_dir.clone();
        // Blocking socket calls, off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || permit_and_evict(&run_dir, &owned, &elsewhere, until)).await;
        Ok(())
    }

    /// Renews the lease, bridging while the renewal is slow (see the module doc).
    async fn renew_bridged(&self) -> Result<(), KeeperError> {
        if self.config.store_is_local {
            return self.renew().await;
        }
        let renewal = self.renew();
        tokio::select! {
            renewed = renewal => renewed,
            never = self.bridge_from(SLOW_RENEWAL) => match never {},
        }
    }

    /// Bridges after `delay`, then every R, until dropped.
    async fn bridge_from(&self, delay: Duration) -> std::convert::Infallible {
        tokio::time::sleep(delay).await;
        loop {
            self.bridge().await;
            tokio::time::sleep(self.config.timing.renew).await;
        }
    }

    /// Permits what this host owned until `t + F` if, at `t`, a strict majority of the
    /// store's members has no leader and still has `alive/HOST` under this host's lease.
    async fn bridge(&self) {
        let Some((lease, _)) = lock(&self.shared).lease else { return };
        let asked = boottime_ms();
        let alive = alive_key(&self.config.host);
        let poll = self.store.poll_leaderless(&alive, lease, LEADER_POLL_WITHIN).await;
        if !poll.majority_leaderless() {
            tracing::debug!(?poll, "no majority of the store's members is without a leader: no permits");
            return;
        }
        if self.bridged.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            tracing::warn!(
                host = %self.config.host,
                leaderless = poll.leaderless_holding,
                voters = poll.voters,
                "the store has no leader: permitting this host's VMs on (a leader elected from here gives the host's lease its full TTL)"
            );
        }
        self.permit_owned(asked + self.config.timing.fence.as_millis() as u64).await;
    }

    /// Renews the lease, or takes a new one (and writes `alive/HOST` under it).
    async fn renew(&self) -> Result<(), KeeperError> {
        let held = lock(&self.shared).lease;
        if let Some((id, _)) = held {
            match self.store.keep_alive(id).await {
                Ok(_) => return Ok(()),
                Err(StoreError::LeaseGone(_)) => {
                    tracing::warn!(lease = format_args!("{id:x}"), "the host's lease expired; taking a new one");
                    lock(&self.shared).lease = None;
                }
                Err(e) => return Err(RecordError::from(e).into()),
            }
        }
        let id = self.lease_to_use().await?;
        let alive_rev = self.write_alive(id).await?;
        lock(&self.shared).lease = Some((id, alive_rev));
        if let Err(e) = std::fs::write(&self.config.lease_file, id.to_string()) {
            tracing::warn!("cannot keep the lease id in {}: {e}", self.config.lease_file.display());
        }
        tracing::info!(host = %self.config.host, lease = format_args!("{id:x}"), "holding the host's lease");
        Ok(())
    }

    /// The lease a keeper before this one left in the lease file, if it still runs, or a
    /// new one.
    async fn lease_to_use(&self) -> Result<LeaseId, KeeperError> {
        let kept = std::fs::read_to_string(&self.config.lease_file).ok().and_then(|s| s.trim().parse::<LeaseId>().ok());
        if let Some(id) = kept
            && self.store.keep_alive(id).await.is_ok()
        {
            return Ok(id);
        }
        let (id, _) = self.store.grant(self.config.timing.ttl).await.map_err(RecordError::from)?;
        Ok(id)
    }

    /// Writes `alive/HOST` under `lease`, unless another machine's keeper holds the name.
    async fn write_alive(&self, lease: LeaseId) -> Result<Revision, KeeperError> {
        let key = alive_key(&self.config.host);
        let record = AliveRecord { identity: self.config.identity.clone(), pid: std::process::id(), lease };
        let value = records::encode(&key, &record)?;
        let existing = self.store.get(&key).await.map_err(RecordError::from)?;
        let guard = match &existing {
            None => Compare::absent(&key),
            Some(kv) => {
                let other: AliveRecord = records::decode(kv)?;
                if other.identity != self.config.identity {
                    return Err(KeeperError::DuplicateHost {
                        host: self.config.host.clone(),
                        other: format!("{} (pid {})", other.identity, other.pid),
                    });
                }
                Compare::unchanged_since(&key, kv.mod_revision)
            }
        };
        let put = Op::Put { key: key.clone(), value, lease: Some(lease) };
        let outcome = self.store.txn(Txn::new().when(guard).then(put)).await.map_err(RecordError::from)?;
        if !outcome.succeeded {
            // Someone wrote it between our read and our write: try again next round.
            return Err(
                RecordError::from(StoreError::Protocol { op: "alive", reason: "changed meanwhile".into() }).into()
            );
        }
        Ok(outcome.revision)
    }
}

/// Whether a renewal failed because the store cannot be reached or has no quorum (not
/// because the lease is gone).
fn store_away(error: &KeeperError) -> bool {
    matches!(error, KeeperError::Record(RecordError::Store(e)) if e.is_unavailable())
}

/// Whether `leader` is the tenure of this host's daemon `pid`, which died: not that of a
/// daemon that started after it and already won the office.
fn held_by_dead_daemon(leader: &crate::election::LeaderRecord, host: &str, pid: u32) -> bool {
    leader.host == host && (leader.pid == 0 || leader.pid == pid)
}

/// Permits the VMMs of owned VMs; shuts down those of VMs another host owns at a newer
/// epoch than the one they run under.
fn permit_and_evict(run_dir: &Path, owned: &BTreeMap<String, u64>, elsewhere: &BTreeMap<String, u64>, until: u64) {
    for (name, epoch) in owned {
        let sock = run_dir.join(format!("{name}.sock"));
        if !sock.exists() {
            continue;
        }
        if let Err(e) = call(&sock, Request::Permit { epoch: *epoch, until_ms: until }, VMM_TIMEOUT) {
            tracing::debug!(vm = %name, "no permit sent: {e}");
        }
    }
    for (name, epoch) in elsewhere {
        let sock = run_dir.join(format!("{name}.sock"));
        if !sock.exists() {
            continue;
        }
        let Ok(status) = call(&sock, Request::Status, VMM_TIMEOUT) else { continue };
        let Some(permit) = status.status.and_then(|s| s.permit) else { continue };
        // A migration's source, whose VM another host took at the commit, ends by itself
        // once it has its answer: leave it to finish.
        let migrating = call(&sock, Request::MigrateStatus, VMM_TIMEOUT)
            .ok()
            .and_then(|r| r.migration)
            .is_some_and(|m| m.error.is_none());
        if permit.epoch < *epoch && !migrating {
            tracing::warn!(vm = %name, running = permit.epoch, owner_epoch = epoch, "a stale copy: another host owns the VM now; shutting it down");
            // An older VMM knows no eviction: shut it down; the reconcile deletes a restart.
            if call(&sock, Request::Evict { owner_epoch: *epoch }, VMM_TIMEOUT).is_err() {
                let _ = call(&sock, Request::Shutdown, VMM_TIMEOUT);
            }
        }
    }
}

/// Answers arriving VMMs' claims, one line each way per connection.
async fn serve_claims(
    listener: tokio::net::UnixListener,
    config: KeeperConfig,
    store: Arc<dyn Store>,
    shared: Arc<Mutex<Shared>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (config, store, shared) = (config.clone(), store.clone(), shared.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read).take(4096);
            let answer = match reader.read_line(&mut line).await {
                // A look at whether the keeper runs (the daemon's), not a claim.
                Ok(0) => return,
                Ok(_) => match serde_json::from_str::<ClaimRequest>(&line) {
                    Ok(request) => claim(&config, store.as_ref(), &shared, &request).await,
                    Err(e) => Err(format!("not a claim request: {e}")),
                },
                Err(e) => Err(format!("cannot read the claim: {e}")),
            };
            let answer = match answer {
                Ok((epoch, until_ms)) => ClaimAnswer { ok: true, epoch, until_ms, error: None },
                Err(error) => {
                    tracing::warn!("refused a claim: {error}");
                    ClaimAnswer { ok: false, epoch: 0, until_ms: 0, error: Some(error) }
                }
            };
            let mut bytes = serde_json::to_vec(&answer).unwrap_or_default();
            bytes.push(b'\n');
            let _ = write.write_all(&bytes).await;
        });
    }
}

/// Moves the VM whose VMM asks from its source to this host: `Moving(src → here, e)` to
/// `Owned(here, e + 1)`, guarded by the record not having changed and by this host's
/// `alive` key being the one its lease wrote. Returns the permit for the new epoch.
async fn claim(
    config: &KeeperConfig,
    store: &dyn Store,
    shared: &Mutex<Shared>,
    request: &ClaimRequest,
) -> Result<(u64, u64), String> {
    let sock = Path::new(&request.api_sock);
    let name = sock
        .parent()
        .filter(|dir| *dir == config.run_dir)
        .and(sock.file_name())
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_suffix(".sock"))
        .ok_or_else(|| format!("{} is not a VMM socket in {}", sock.display(), config.run_dir.display()))?;
    let (lease, until) = {
        let s = lock(shared);
        (s.lease, s.permit_until)
    };
    let (Some((_, alive_rev)), Some(until)) = (lease, until) else {
        return Err("this host holds no lease now: it cannot take a VM".into());
    };
    if until < boottime_ms() + CLAIM_MIN_LEFT_MS {
        return Err("this host's lease is about to run out: it cannot take a VM".into());
    }
    let key = vm_key(name);
    let kv = store.get(&key).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("no VM {name} in the cluster"))?;
    let mut record: VmRecord = records::decode(&kv).map_err(|e| e.to_string())?;
    if record.moving_to.as_deref() != Some(config.host.as_str()) {
        return Err(format!(
            "VM {name} is not migrating to {} (owner {}, epoch {})",
            config.host, record.owner, record.epoch
        ));
    }
    let from = std::mem::replace(&mut record.owner, config.host.clone());
    record.epoch += 1;
    record.moving_to = None;
    let value = records::encode(&key, &record).map_err(|e| e.to_string())?;
    let txn = Txn::new()
        .when(Compare::unchanged_since(&key, kv.mod_revision))
        .when(Compare::unchanged_since(alive_key(&config.host), alive_rev))
        .then(Op::put(&key, value))
        .otherwise(Op::Get { key: key.clone() });
    let outcome = store.txn(txn).await.map_err(|e| e.to_string())?;
    if !outcome.succeeded {
        let now = match outcome.results.first() {
            Some(OpResult::Got(Some(kv))) => records::decode::<VmRecord>(kv)
                .map(|r| format!("owner {} at epoch {}", r.owner, r.epoch))
                .unwrap_or_else(|e| e.to_string()),
            _ => "gone".into(),
        };
        return Err(format!("VM {name} changed before the claim ({now}), or this host's lease did"));
    }
    tracing::info!(vm = %name, from = %from, epoch = record.epoch, "claimed an arriving VM");
    Ok((record.epoch, until))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::LeaderRecord;

    fn leader(host: &str, pid: u32) -> LeaderRecord {
        LeaderRecord { host: host.into(), address: "127.0.0.1:7000".into(), lease: 7, pid }
    }

    #[test]
    fn test_a_dead_daemon_ends_only_its_own_tenure() {
        assert!(held_by_dead_daemon(&leader("h1", 41), "h1", 41));
        // A successor daemon on the same host won the office before the keeper looked.
        assert!(!held_by_dead_daemon(&leader("h1", 42), "h1", 41));
        assert!(!held_by_dead_daemon(&leader("h2", 41), "h1", 41), "another host's leader");
    }

    #[test]
    fn test_a_leader_record_from_before_the_pid_is_read_and_goes_by_host() {
        let old = br#"{"host":"h1","address":"127.0.0.1:7000","lease":7}"#;
        let record: LeaderRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(record.pid, 0);
        assert!(held_by_dead_daemon(&record, "h1", 41));
        assert!(!held_by_dead_daemon(&record, "h2", 41));
    }
}
