//! The cluster store: the one interface the cluster's state, leadership, leases and
//! fencing are written against, and its two implementations.
//!
//! The interface is etcd's model, cut to what the cluster needs: string keys holding bytes,
//! each with the revision that created it and the one that last changed it; one revision
//! counter for the whole store, raised by every change; transactions that compare keys'
//! revisions or values and then apply one list of changes or another, atomically; leases
//! with a time to live that take their keys with them when they expire; and watches that
//! deliver every change under a prefix, in revision order, from a given revision on.
//!
//! - [`embedded::EmbeddedStore`]: a redb file of this daemon's, for a single machine and the
//!   demo. No external service; not highly available: when this machine is gone, so is
//!   the store.
//! - [`etcd::EtcdStore`]: an etcd 3.4 cluster over its v3 gRPC API, with mutual TLS.
//!
//! Both answer within a bounded time or fail with an error for which
//! [`StoreError::is_unavailable`] holds, so that callers fail fast while there is no quorum.

pub mod embedded;
pub mod etcd;
pub mod serve;
#[cfg(feature = "test-cluster")]
pub mod testing;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

/// A future that a `dyn Store` can return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The store's revision: raised by one for every transaction that changes something.
pub type Revision = i64;

/// A lease's id (never 0).
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision that last changed it.
    pub mod_revision: Revision,
    /// Changes since it was created, counting the creation (1 for a new key).
    pub version: i64,
    /// The lease the key goes with, 0 for none.
    pub lease: LeaseId,
}

/// Every key under a prefix, as of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl Cmp {
    fn holds<T: PartialOrd>(self, left: T, right: T) -> bool {
        match self {
            Cmp::Equal => left == right,
            Cmp::NotEqual => left != right,
            Cmp::Less => left < right,
            Cmp::Greater => left > right,
        }
    }
}

/// One condition of a transaction. A key that does not exist has revisions and version 0
/// (so `Compare::absent` is "create revision equals 0") and matches no value comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    ModRevision { key: String, cmp: Cmp, revision: Revision },
    CreateRevision { key: String, cmp: Cmp, revision: Revision },
    Version { key: String, cmp: Cmp, version: i64 },
    Value { key: String, cmp: Cmp, value: Vec<u8> },
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::CreateRevision { key: key.into(), cmp: Cmp::Equal, revision: 0 }
    }

    /// The key was last changed at `revision` (so nobody changed it since it was read).
    pub fn unchanged_since(key: impl Into<String>, revision: Revision) -> Self {
        Compare::ModRevision { key: key.into(), cmp: Cmp::Equal, revision }
    }

    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision { key, .. }
            | Compare::CreateRevision { key, .. }
            | Compare::Version { key, .. }
            | Compare::Value { key, .. } => key,
        }
    }

    /// Whether the condition holds for `kv` (None: the key does not exist).
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        match self {
            Compare::ModRevision { cmp, revision, .. } => cmp.holds(kv.map_or(0, |k| k.mod_revision), *revision),
            Compare::CreateRevision { cmp, revision, .. } => cmp.holds(kv.map_or(0, |k| k.create_revision), *revision),
            Compare::Version { cmp, version, .. } => cmp.holds(kv.map_or(0, |k| k.version), *version),
            Compare::Value { cmp, value, .. } => kv.is_some_and(|k| cmp.holds(k.value.as_slice(), value.as_slice())),
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets the key; with a lease, the key goes when the lease does.
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    Get {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put { key: key.into(), value: value.into(), lease: None }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
}

/// If every condition of `when` holds, `then` is applied, else `otherwise`; atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    pub fn when(mut self, c: Compare) -> Self {
        self.when.push(c);
        self
    }

    pub fn then(mut self, op: Op) -> Self {
        self.then.push(op);
        self
    }

    pub fn otherwise(mut self, op: Op) -> Self {
        self.otherwise.push(op);
        self
    }
}

/// What one operation of a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Put,
    Deleted(u64),
    Got(Option<KeyValue>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether `when` held (and `then` was applied).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
    pub results: Vec<OpResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. A delete carries the key and the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The changes under a prefix, in revision order. It ends with an error when the store
/// goes away or the watcher falls behind: list again and watch from that revision.
pub struct Watch {
    events: tokio::sync::mpsc::Receiver<Result<WatchEvent, StoreError>>,
}

impl Watch {
    pub fn new(events: tokio::sync::mpsc::Receiver<Result<WatchEvent, StoreError>>) -> Self {
        Watch { events }
    }

    /// The next change; an error ends the watch.
    pub async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        self.events.recv().await.unwrap_or(Err(StoreError::WatchEnded))
    }
}

/// One member of the store's cluster, as `cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub endpoint: String,
    pub healthy: bool,
    pub leader: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// "embedded" or "etcd".
    pub kind: &'static str,
    pub members: Vec<Member>,
    pub revision: Revision,
}

/// What the store's members each said of their leader, asked one by one
/// (`Store::poll_leaderless`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaderPoll {
    /// The voting members of the store's cluster, as the members that answered list them
    /// (0: the store has no members that elect a leader).
    pub voters: usize,
    /// Distinct voting members that answered in time that they have no leader, and whose
    /// own state still has the asked key under the asked lease.
    pub leaderless_holding: usize,
}

impl LeaderPoll {
    /// Whether a strict majority of the voters has no leader: every leader elected from
    /// here on needs one of their votes, so it is elected after this poll.
    pub fn majority_leaderless(&self) -> bool {
        self.voters > 0 && self.leaderless_holding * 2 > self.voters
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("etcd endpoint {url} is not a URL ({reason}): give https://HOST:PORT")]
    BadUrl { url: String, reason: &'static str },
    #[error("the TLS handshake with {endpoints} failed: {reason}")]
    TlsRefused { endpoints: String, reason: String },
    #[error("etcd {op} failed")]
    Etcd {
        op: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error("etcd did not answer {op} within {timeout:?}: no quorum, or no member reachable")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("etcd {op}: {reason}")]
    Protocol { op: &'static str, reason: String },
    #[error("lease {0:x} has expired or was revoked")]
    LeaseGone(LeaseId),
    #[error("the changes before revision {0} are no longer kept: list again and watch from there")]
    Compacted(Revision),
    #[error("the watch fell behind the store (its reader was too slow): list again and watch from there")]
    FellBehind,
    #[error("the watch ended: the store went away")]
    WatchEnded,
    #[error("a transaction may change a key once; {0} is changed twice")]
    DuplicateKey(String),
    #[error("the embedded store {path} cannot {what}")]
    Embedded {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the embedded store {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot read {path}")]
    Tls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// The store cannot be reached or has no quorum: the call may succeed later, and
    /// callers should answer UNAVAILABLE rather than wait.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::Timeout { .. } | StoreError::WatchEnded => true,
            StoreError::Etcd { status, .. } => {
                matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted)
            }
            _ => false,
        }
    }
}

/// The store: see the module doc. Every method answers within a bounded time.
pub trait Store: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>>;
    /// Every key that starts with `prefix`, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>>;
    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>>;
    /// A new lease of `ttl` (rounded up to whole seconds, at least 1; etcd may raise it).
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<(LeaseId, Duration), StoreError>>;
    /// Renews the lease to its full TTL; returns it. `LeaseGone` once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, StoreError>>;
    /// Ends the lease now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The changes under `prefix` from revision `from` (inclusive) on.
    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<Watch, StoreError>>;
    fn health(&self) -> BoxFuture<'_, Result<Health, StoreError>>;
    /// Asks every member on its own, each within `within` and without its leader, whether
    /// it has a leader and whether its own state has `key` under `lease`. A store without
    /// members that elect a leader (the embedded one) answers an empty poll.
    fn poll_leaderless<'a>(&'a self, key: &'a str, lease: LeaseId, within: Duration) -> BoxFuture<'a, LeaderPoll> {
        let _ = (key, lease, within);
        Box::pin(async { LeaderPoll::default() })
    }
}

/// The end of the key range of every key that starts with `prefix` (etcd's `range_end`):
/// the prefix with its last byte that can be raised raised by one.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: etcd's "\0" range end.
    vec![0]
}

/// Seconds for a lease TTL, rounded up, at least one.
pub fn ttl_seconds(ttl: Duration) -> i64 {
    (ttl.as_millis().div_ceil(1000) as i64).max(1)
}

/// Checks that a transaction changes each key at most once (etcd refuses it otherwise).
fn check_distinct_keys(ops: &[Op]) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    for op in ops {
        if let Op::Put { key, .. } | Op::Delete { key } = op
            && !seen.insert(key.as_str())
        {
            return Err(StoreError::DuplicateKey(key.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_prefix_end_raises_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"/vms/"), b"/vms0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn test_compare_treats_a_missing_key_as_revision_zero() {
        let kv = KeyValue {
            key: "k".into(),
            value: b"v".to_vec(),
            create_revision: 3,
            mod_revision: 5,
            version: 2,
            lease: 0,
        };
        assert!(Compare::absent("k").holds(None));
        assert!(!Compare::absent("k").holds(Some(&kv)));
        assert!(Compare::unchanged_since("k", 5).holds(Some(&kv)));
        assert!(!Compare::unchanged_since("k", 4).holds(Some(&kv)));
        assert!(!Compare::Value { key: "k".into(), cmp: Cmp::Equal, value: vec![] }.holds(None));
        assert!(Compare::Version { key: "k".into(), cmp: Cmp::Greater, version: 1 }.holds(Some(&kv)));
    }

    #[test]
    fn test_a_leaderless_poll_needs_a_strict_majority_of_the_voters() {
        let poll = |voters, leaderless_holding| LeaderPoll { voters, leaderless_holding }.majority_leaderless();
        assert!(poll(3, 2) && poll(3, 3) && poll(1, 1) && poll(5, 3));
        assert!(!poll(3, 1), "one member of three may be the one cut off");
        assert!(!poll(4, 2), "the other two of four cannot elect, but a half is not a majority");
        assert!(!poll(0, 0), "a store without members that elect");
    }

    #[test]
    fn test_ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn test_a_key_changed_twice_in_one_transaction_is_refused() {
        let ops = [Op::put("a", "1"), Op::Get { key: "a".into() }, Op::delete("a")];
        assert!(matches!(check_distinct_keys(&ops), Err(StoreError::DuplicateKey(k)) if k == "a"));
        assert!(check_distinct_keys(&ops[..2]).is_ok());
    }
}
