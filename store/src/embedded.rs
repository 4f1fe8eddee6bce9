//! The embedded store: the cluster store in one redb file of this daemon's (the default,
//! with no external service: one machine, the demo). It is not highly available: the
//! cluster's state lives and dies with this machine's disk.
//!
//! The keys live in memory and in the file's `kvs` table; every transaction that changes
//! something is one redb write transaction, committed durably before it answers, under
//! the same lock that orders revisions, so the file always holds the state of one
//! revision. Leases are kept in the file with their TTL; their deadlines are not (they are
//! instants of this process), so a reopened store gives every lease its full TTL again,
//! as etcd does when it elects a new leader. The last `HISTORY` changes are kept in memory
//! for watches that start in the past; a reopened store keeps none.

use crate::{
    BoxFuture, EventKind, Health, KeyValue, LeaseId, Listing, Member, Op, OpResult, Revision, Store, StoreError, Txn,
    TxnOutcome, Watch, WatchEvent, check_distinct_keys, ttl_seconds,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

const KVS: TableDefinition<&str, &[u8]> = TableDefinition::new("kvs");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Lease id to its TTL in seconds.
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");

/// Changes kept for watches that start in the past.
const HISTORY: usize = 10_000;
/// Events a watcher may have unread before it is dropped as fallen behind.
const WATCH_QUEUE: usize = 4096;

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
}

impl Watcher {
    /// Queues `event`; false when the watcher is gone or has fallen behind (it is then
    /// told so, in the slot kept for that).
    fn offer(&self, event: &WatchEvent) -> bool {
        if !event.kv.key.starts_with(&self.prefix) {
            return !self.tx.is_closed();
        }
        if self.tx.capacity() > 1 {
            return self.tx.try_send(Ok(event.clone())).is_ok();
        }
        let _ = self.tx.try_send(Err(StoreError::FellBehind));
        false
    }
}

struct State {
    revision: Revision,
    next_lease: LeaseId,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    history: VecDeque<WatchEvent>,
    /// The oldest revision a watch may start from.
    oldest_kept: Revision,
    watchers: Vec<Watcher>,
}

struct Inner {
    path: PathBuf,
    db: Database,
    state: Mutex<State>,
    /// Wakes the lease reaper when a deadline may have moved earlier.
    leases_changed: Arc<Notify>,
}

/// See the module doc. Cloning shares the store.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

fn fail<E: std::error::Error + Send + Sync + 'static>(path: &Path, what: &'static str) -> impl FnOnce(E) -> StoreError {
    let path = path.to_owned();
    move |e| StoreError::Embedded { path, what, source: Box::new(e) }
}

/// What one transaction changes: each key's new value, or None for deleted.
type Changes = BTreeMap<String, Option<KeyValue>>;

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`. Needs a tokio runtime (the lease reaper runs
    /// on it). A file that is not a store, or a damaged one, is refused with the reason.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        // redb can panic on some damaged files; a damaged file is an error, not a crash.
        let opened = std::panic::catch_unwind(|| Database::create(path));
        let db = match opened {
            Ok(db) => db.map_err(fail(path, "be opened (is another daemon using it?)"))?,
            Err(_) => {
                return Err(StoreError::Damaged { path: path.to_owned(), reason: "redb could not read it".into() });
            }
        };
        let state = load(&db, path)?;
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            db,
            state: Mutex::new(state),
            leases_changed: Arc::new(Notify::new()),
        });
        tokio::spawn(reap_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        let mut state = self.state();
        let succeeded = txn.when.iter().all(|c| c.holds(state.kvs.get(c.key())));
        let ops = if succeeded { &txn.then } else { &txn.otherwise };
        check_distinct_keys(ops)?;
        let next = state.revision + 1;
        let mut changes = Changes::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(stage(&state, &mut changes, op, next)?);
        }
        if !changes.is_empty() {
            commit(&self.inner, &mut state, changes, next)?;
        }
        Ok(TxnOutcome { succeeded, revision: state.revision, results })
    }

    fn grant_now(&self, ttl: Duration) -> Result<(LeaseId, Duration), StoreError> {
        let mut state = self.state();
        let id = state.next_lease;
        let seconds = ttl_seconds(ttl);
        let w = self.inner.db.begin_write().map_err(fail(&self.inner.path, "begin a write"))?;
        {
            let mut leases = w.open_table(LEASES).map_err(fail(&self.inner.path, "open the leases"))?;
            leases.insert(id, seconds).map_err(fail(&self.inner.path, "write a lease"))?;
            let mut meta = w.open_table(META).map_err(fail(&self.inner.path, "open the meta table"))?;
            meta.insert("next_lease", id + 1).map_err(fail(&self.inner.path, "write the next lease id"))?;
        }
        w.commit().map_err(fail(&self.inner.path, "commit"))?;
        let ttl = Duration::from_secs(seconds as u64);
        state.next_lease = id + 1;
        state.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
        drop(state);
        self.inner.leases_changed.notify_one();
        Ok((id, ttl))
    }

    fn keep_alive_now(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let now = Instant::now();
        let mut state = self.state();
        match state.leases.get_mut(&id) {
            Some(lease) if lease.deadline > now => {
                lease.deadline = now + lease.ttl;
                Ok(lease.ttl)
            }
            _ => Err(StoreError::LeaseGone(id)),
        }
    }

    fn watch_now(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let mut state = self.state();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let from = if from <= 0 || from > state.revision { state.revision + 1 } else { from };
        if from < state.oldest_kept {
            return Err(StoreError::Compacted(state.oldest_kept));
        }
        let watcher = Watcher { prefix: prefix.to_string(), tx };
        let keep = state.history.iter().filter(|e| e.revision() >= from).all(|e| watcher.offer(e));
        if keep {
            state.watchers.push(watcher);
        }
        Ok(Watch::new(rx))
    }
}

/// Reads the file into memory (creating the tables of a new store).
fn load(db: &Database, path: &Path) -> Result<State, StoreError> {
    let w = db.begin_write().map_err(fail(path, "begin a write"))?;
    w.open_table(KVS).map_err(fail(path, "open its tables"))?;
    w.open_table(LEASES).map_err(fail(path, "open its tables"))?;
    w.open_table(META).map_err(fail(path, "open its tables"))?;
    w.commit().map_err(fail(path, "commit"))?;
    let r = db.begin_read().map_err(fail(path, "begin a read"))?;
    let meta = r.open_table(META).map_err(fail(path, "open the meta table"))?;
    let get = |name: &str| -> Result<Option<i64>, StoreError> {
        Ok(meta.get(name).map_err(fail(path, "read the meta table"))?.map(|v| v.value()))
    };
    let revision = get("revision")?.unwrap_or(0);
    let next_lease = get("next_lease")?.unwrap_or(1).max(1);
    let mut kvs = BTreeMap::new();
    for row in r.open_table(KVS).map_err(fail(path, "open the keys"))?.iter().map_err(fail(path, "read the keys"))? {
        let (key, value) = row.map_err(fail(path, "read a key"))?;
        let kv: KeyValue = postcard::from_bytes(value.value()).map_err(|e| StoreError::Damaged {
            path: path.to_owned(),
            reason: format!("key {:?} does not decode: {e}", key.value()),
        })?;
        if kv.mod_revision > revision || kv.key != key.value() {
            return Err(StoreError::Damaged {
                path: path.to_owned(),
                reason: format!(
                    "key {:?} is at revision {}, past the store's {revision}",
                    key.value(),
                    kv.mod_revision
                ),
            });
        }
        kvs.insert(kv.key.clone(), kv);
    }
    let now = Instant::now();
    let mut leases = HashMap::new();
    for row in
        r.open_table(LEASES).map_err(fail(path, "open the leases"))?.iter().map_err(fail(path, "read the leases"))?
    {
        let (id, seconds) = row.map_err(fail(path, "read a lease"))?;
        let ttl = Duration::from_secs(seconds.value().clamp(1, i64::from(u32::MAX)) as u64);
        leases.insert(id.value(), Lease { ttl, deadline: now + ttl, keys: BTreeSet::new() });
    }
    for kv in kvs.values().filter(|kv| kv.lease != 0) {
        match leases.get_mut(&kv.lease) {
            Some(lease) => {
                lease.keys.insert(kv.key.clone());
            }
            None => {
                return Err(StoreError::Damaged {
                    path: path.to_owned(),
                    reason: format!("key {:?} names lease {:x}, which the store does not have", kv.key, kv.lease),
                });
            }
        }
    }
    Ok(State {
        revision,
        next_lease,
        kvs,
        leases,
        history: VecDeque::new(),
        oldest_kept: revision + 1,
        watchers: Vec::new(),
    })
}

/// The key as the transaction has it so far.
fn current<'a>(state: &'a State, changes: &'a Changes, key: &str) -> Option<&'a KeyValue> {
    match changes.get(key) {
        Some(change) => change.as_ref(),
        None => state.kvs.get(key),
    }
}

/// Adds what `op` does to `changes`, at revision `next`.
fn stage(state: &State, changes: &mut Changes, op: &Op, next: Revision) -> Result<OpResult, StoreError> {
    Ok(match op {
        Op::Get { key } => OpResult::Got(current(state, changes, key).cloned()),
        Op::Put { key, value, lease } => {
            let lease = lease.unwrap_or(0);
            if lease != 0 && !state.leases.contains_key(&lease) {
                return Err(StoreError::LeaseGone(lease));
            }
            let before = current(state, changes, key);
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: before.map_or(next, |b| b.create_revision),
                mod_revision: next,
                version: before.map_or(1, |b| b.version + 1),
                lease,
            };
            changes.insert(key.clone(), Some(kv));
            OpResult::Put
        }
        Op::Delete { key } => {
            let existed = current(state, changes, key).is_some();
            if existed {
                changes.insert(key.clone(), None);
            }
            OpResult::Deleted(u64::from(existed))
        }
        Op::DeletePrefix { prefix } => {
            let mut keys: BTreeSet<String> = state
                .kvs
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect();
            keys.extend(changes.iter().filter(|(k, v)| k.starts_with(prefix) && v.is_some()).map(|(k, _)| k.clone()));
            let live: Vec<String> = keys.into_iter().filter(|k| current(state, changes, k).is_some()).collect();
            for k in &live {
                changes.insert(k.clone(), None);
            }
            OpResult::Deleted(live.len() as u64)
        }
    })
}

/// Writes `changes` as revision `next` (file first, then memory), and tells the watchers.
fn commit(inner: &Inner, state: &mut State, changes: Changes, next: Revision) -> Result<(), StoreError> {
    let path = &inner.path;
    let w = inner.db.begin_write().map_err(fail(path, "begin a write"))?;
    {
        let mut kvs = w.open_table(KVS).map_err(fail(path, "open the keys"))?;
        for (key, change) in &changes {
            match change {
                Some(kv) => {
                    let bytes = postcard::to_stdvec(kv).map_err(fail(path, "encode a key"))?;
                    kvs.insert(key.as_str(), bytes.as_slice()).map_err(fail(path, "write a key"))?;
                }
                None => {
                    kvs.remove(key.as_str()).map_err(fail(path, "delete a key"))?;
                }
            }
        }
        let mut meta = w.open_table(META).map_err(fail(path, "open the meta table"))?;
        meta.insert("revision", next).map_err(fail(path, "write the revision"))?;
    }
    w.commit().map_err(fail(path, "commit"))?;
    state.revision = next;
    for (key, change) in changes {
        let event = match change {
            Some(kv) => {
                if let Some(old) = state.kvs.get(&key).filter(|old| old.lease != 0 && old.lease != kv.lease) {
                    let old_lease = old.lease;
                    if let Some(l) = state.leases.get_mut(&old_lease) {
                        l.keys.remove(&key);
                    }
                }
                if let Some(l) = state.leases.get_mut(&kv.lease) {
                    l.keys.insert(key.clone());
                }
                state.kvs.insert(key, kv.clone());
                WatchEvent { kind: EventKind::Put, kv }
            }
            None => {
                let Some(old) = state.kvs.remove(&key) else { continue };
                if let Some(l) = state.leases.get_mut(&old.lease) {
                    l.keys.remove(&key);
                }
                let kv = KeyValue { mod_revision: next, value: Vec::new(), ..old };
                WatchEvent { kind: EventKind::Delete, kv }
            }
        };
        state.watchers.retain(|w| w.offer(&event));
        state.history.push_back(event);
    }
    while state.history.len() > HISTORY {
        if let Some(dropped) = state.history.pop_front() {
            state.oldest_kept = dropped.revision() + 1;
        }
    }
    Ok(())
}

/// Ends lease `id`: deletes its keys as one revision, and forgets it in the file.
fn end_lease(inner: &Inner, state: &mut State, id: LeaseId) -> Result<(), StoreError> {
    let Some(lease) = state.leases.get(&id) else { return Err(StoreError::LeaseGone(id)) };
    let changes: Changes = lease.keys.iter().map(|k| (k.clone(), None)).collect();
    let w = inner.db.begin_write().map_err(fail(&inner.path, "begin a write"))?;
    {
        let mut leases = w.open_table(LEASES).map_err(fail(&inner.path, "open the leases"))?;
        leases.remove(id).map_err(fail(&inner.path, "delete a lease"))?;
    }
    w.commit().map_err(fail(&inner.path, "commit"))?;
    state.leases.remove(&id);
    if !changes.is_empty() {
        let next = state.revision + 1;
        commit(inner, state, changes, next)?;
    }
    Ok(())
}

/// Expires leases at their deadlines, for as long as the store exists.
async fn reap_leases(inner: Weak<Inner>) {
    loop {
        let Some(store) = inner.upgrade() else { return };
        let next_deadline = {
            let mut state = store.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let expired: Vec<LeaseId> =
                state.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
            for id in expired {
                match end_lease(&store, &mut state, id) {
                    Ok(()) => tracing::debug!(lease = format_args!("{id:x}"), "lease expired"),
                    Err(e) => tracing::warn!("cannot expire lease {id:x}: {e}"),
                }
            }
            state.leases.values().map(|l| l.deadline).min()
        };
        let notify = store.leases_changed.clone();
        drop(store);
        let changed = notify.notified();
        match next_deadline {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = changed => {}
                }
            }
            // Nothing to expire: wake on a new lease, and now and then to see whether the
            // store is still there.
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(5), changed).await;
            }
        }
    }
}

impl Store for EmbeddedStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(async move { Ok(self.state().kvs.get(key).cloned()) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        Box::pin(async move {
            let state = self.state();
            let kvs = state
                .kvs
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect();
            Ok(Listing { kvs, revision: state.revision })
        })
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>> {
        Box::pin(async move { self.apply(&txn) })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<(LeaseId, Duration), StoreError>> {
        Box::pin(async move { self.grant_now(ttl) })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, StoreError>> {
        Box::pin(async move { self.keep_alive_now(lease) })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.state();
            end_lease(&self.inner, &mut state, lease)
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move { self.watch_now(prefix, from) })
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, StoreError>> {
        Box::pin(async move {
            let member = Member {
                name: "embedded".into(),
                endpoint: self.inner.path.display().to_string(),
                healthy: true,
                leader: true,
            };
            Ok(Health { kind: "embedded", members: vec![member], revision: self.state().revision })
        })
    }
}
