//! The cluster's event log in the store (`docs/ha.md`, "The cluster's event log"): what
//! the leader decided (it leads, a host went down or came back, a VM moved, a failover
//! found no place), one key per event, `events/SEQ`, written under the leader's tenure.
//! A new leader carries on from the last sequence number; a deposed one writes nothing.
//! Every write also drops the event `KEPT` places back, so the log stays bounded.

use crate::election::Tenure;
use crate::records::{self, RecordError};
use novacron_store::{Compare, Op, Store, Txn};
use novacron_vmm::process::error_chain;
use serde::{Deserialize, Serialize};

/// Where the events are: `events/` and the sequence number, zero-padded so that the
/// store's key order is the log's.
pub const EVENTS: &str = "/novacron/events/";
/// How many events the log keeps.
pub const KEPT: u64 = 2000;

pub fn event_key(seq: u64) -> String {
    format!("{EVENTS}{seq:020}")
}

/// One event of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// Wall-clock milliseconds since the Unix epoch, for people reading the log.
    pub at_ms: u64,
    /// What happened, one word: "leading", "host-down", "failover-held", "failover", "moved",
    /// "stuck", "host-up".
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub message: String,
    /// The tenure that wrote it (the leader record's create revision).
    pub tenure: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("this daemon no longer leads the cluster: the event was not written")]
    NotLeading,
}

/// Every event kept with a sequence number above `after`, oldest first (keys that do not
/// decode are logged and left out: one bad value must not hide the log).
pub async fn read(store: &dyn Store, after: u64) -> Result<Vec<(u64, ClusterEvent)>, RecordError> {
    let listing = store.list(EVENTS).await?;
    let mut events: Vec<(u64, ClusterEvent)> = listing
        .kvs
        .iter()
        .filter_map(|kv| {
            let seq = kv.key.strip_prefix(EVENTS)?.parse::<u64>().ok()?;
            match records::decode::<ClusterEvent>(kv) {
                Ok(event) => Some((seq, event)),
                Err(e) => {
                    tracing::warn!("{}", error_chain(&e));
                    None
                }
            }
        })
        .filter(|(seq, _)| *seq > after)
        .collect();
    events.sort_by_key(|(seq, _)| *seq);
    Ok(events)
}

/// The log as one tenure writes it.
pub struct EventLog {
    tenure: Tenure,
    next: u64,
    kept: u64,
}

impl EventLog {
    /// Carries on after the last event in the store.
    pub async fn resume(store: &dyn Store, tenure: Tenure) -> Result<EventLog, RecordError> {
        let listing = store.list(EVENTS).await?;
        let last = listing.kvs.iter().filter_map(|kv| kv.key.strip_prefix(EVENTS)?.parse::<u64>().ok()).max();
        Ok(EventLog { tenure, next: last.map_or(1, |s| s + 1), kept: KEPT })
    }

    /// Appends `event` (its tenure is set to this one's); returns its sequence number.
    pub async fn append(&mut self, store: &dyn Store, mut event: ClusterEvent) -> Result<u64, EventError> {
        event.tenure = self.tenure.revision;
        let key = event_key(self.next);
        let value = records::encode(&key, &event)?;
        let mut txn = Txn::new().when(self.tenure.guard()).when(Compare::absent(&key)).then(Op::put(&key, value));
        if let Some(old) = self.next.checked_sub(self.kept).filter(|s| *s > 0) {
            txn = txn.then(Op::delete(event_key(old)));
        }
        if !store.txn(txn).await.map_err(RecordError::from)?.succeeded {
            // Deposed, or (only if two leaders overlapped, which the guard rules out) the
            // number is taken: either way this tenure's log ends here.
            return Err(EventError::NotLeading);
        }
        self.next += 1;
        Ok(self.next - 1)
    }
}

/// How often a write the store did not take is tried before the event is given up.
const TRIES: u32 = 5;
const RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// A tenure's events, written in order by a task of their own, so that whoever reports
/// one never waits on the store. The task ends when the last writer is dropped, or when
/// the tenure has ended.
#[derive(Clone)]
pub struct EventWriter {
    tx: tokio::sync::mpsc::UnboundedSender<ClusterEvent>,
}

impl EventWriter {
    pub fn start(store: std::sync::Arc<dyn Store>, tenure: Tenure) -> EventWriter {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ClusterEvent>();
        tokio::spawn(async move {
            let mut log = loop {
                match EventLog::resume(store.as_ref(), tenure).await {
                    Ok(log) => break log,
                    Err(e) => {
                        tracing::warn!("cannot read the cluster's event log: {}; trying again", error_chain(&e));
                        tokio::time::sleep(RETRY).await;
                    }
                }
            };
            while let Some(event) = rx.recv().await {
                for attempt in 1..=TRIES {
                    match log.append(store.as_ref(), event.clone()).await {
                        Ok(_) => break,
                        Err(EventError::NotLeading) => return,
                        Err(e) if attempt == TRIES => {
                            tracing::warn!(kind = %event.kind, "an event of the cluster's log is lost: {}", error_chain(&e))
                        }
                        Err(_) => tokio::time::sleep(RETRY).await,
                    }
                }
            }
        });
        EventWriter { tx }
    }

    /// Logs what happened, about `host` and `vm` where it is about one.
    pub fn record(&self, kind: &str, host: Option<&str>, vm: Option<&str>, message: String) {
        let event = ClusterEvent {
            at_ms: now_ms(),
            kind: kind.to_string(),
            host: host.map(str::to_string),
            vm: vm.map(str::to_string),
            message,
            tenure: 0,
        };
        let _ = self.tx.send(event);
    }
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::{Campaign, Candidate};
    use novacron_store::embedded::EmbeddedStore;
    use std::sync::Arc;
    use std::time::Duration;

    fn event(kind: &str) -> ClusterEvent {
        ClusterEvent { at_ms: now_ms(), kind: kind.into(), host: None, vm: None, message: kind.into(), tenure: 0 }
    }

    async fn lead(store: &Arc<dyn Store>, host: &str) -> Tenure {
        let candidate = Candidate::new(store.clone(), host, "127.0.0.1:1", Duration::from_secs(5));
        match candidate.campaign().await.unwrap() {
            Campaign::Won(tenure) => tenure,
            Campaign::Lost(other) => panic!("{host} lost to {other:?}"),
        }
    }

    #[tokio::test]
    async fn test_a_new_leader_carries_on_and_a_deposed_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let first = lead(&store, "h1").await;
        let mut log = EventLog::resume(store.as_ref(), first).await.unwrap();
        assert_eq!(log.append(store.as_ref(), event("leading")).await.unwrap(), 1);
        assert_eq!(log.append(store.as_ref(), event("host-down")).await.unwrap(), 2);

        Candidate::new(store.clone(), "h1", "127.0.0.1:1", Duration::from_secs(5)).step_down(&first).await.unwrap();
        let second = lead(&store, "h2").await;
        let mut next = EventLog::resume(store.as_ref(), second).await.unwrap();
        assert_eq!(next.append(store.as_ref(), event("leading")).await.unwrap(), 3);
        let refused = log.append(store.as_ref(), event("moved")).await;
        assert!(matches!(refused, Err(EventError::NotLeading)), "{refused:?}");

        let read = read(store.as_ref(), 0).await.unwrap();
        let seen: Vec<(u64, &str, i64)> = read.iter().map(|(s, e)| (*s, e.kind.as_str(), e.tenure)).collect();
        assert_eq!(
            seen,
            [(1, "leading", first.revision), (2, "host-down", first.revision), (3, "leading", second.revision)]
        );
        assert_eq!(super::read(store.as_ref(), 2).await.unwrap().len(), 1, "after 2: only 3");
    }

    #[tokio::test]
    async fn test_the_log_keeps_the_last_kept_events_and_skips_a_value_that_does_not_decode() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let tenure = lead(&store, "h1").await;
        let mut log = EventLog::resume(store.as_ref(), tenure).await.unwrap();
        log.kept = 10;
        for _ in 0..15 {
            log.append(store.as_ref(), event("host-up")).await.unwrap();
        }
        store.txn(Txn::new().then(Op::put(event_key(16), b"not json".to_vec()))).await.unwrap();
        let kept: Vec<u64> = read(store.as_ref(), 0).await.unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(kept, (6..=15).collect::<Vec<u64>>(), "the last 10, the bad one left out");
    }
}
