//! Long operations (a snapshot, a migration): the call answers at once with an operation,
//! whose id the caller follows with `GetOperation` or `WatchOperation` while a task does
//! the work. The last `KEPT` ended operations are kept for late readers.

use crate::pb;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const KEPT: usize = 1000;
pub const RUNNING: &str = "running";
pub const SUCCEEDED: &str = "succeeded";
pub const FAILED: &str = "failed";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Default)]
struct Registry {
    next: u64,
    all: BTreeMap<String, watch::Sender<pb::Operation>>,
    ended: VecDeque<String>,
}

/// Every operation of this daemon.
pub struct Operations {
    /// Ids are `<host>-<n>`: unique within the cluster as host names are.
    prefix: String,
    registry: Mutex<Registry>,
}

/// The task's end of one operation.
pub struct Progress {
    ops: Arc<Operations>,
    id: String,
    sender: watch::Sender<pb::Operation>,
}

impl Operations {
    pub fn new(host: &str) -> Self {
        Operations { prefix: host.to_string(), registry: Mutex::new(Registry::default()) }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic elsewhere while holding it leaves nothing half-written: every change is
        // one insert or one remove.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new running operation of `kind` on `vm`.
    pub fn start(self: &Arc<Self>, kind: &str, vm: &str, message: &str) -> Progress {
        let mut reg = self.registry();
        reg.next += 1;
        let id = format!("{}-{}", self.prefix, reg.next);
        let op = pb::Operation {
            id: id.clone(),
            kind: kind.into(),
            vm: vm.into(),
            state: RUNNING.into(),
            message: message.into(),
            started_at_ms: now_ms(),
            ..Default::default()
        };
        let (sender, _) = watch::channel(op);
        reg.all.insert(id.clone(), sender.clone());
        Progress { ops: self.clone(), id, sender }
    }

    pub fn get(&self, id: &str) -> Option<pb::Operation> {
        self.registry().all.get(id).map(|s| s.borrow().clone())
    }

    pub fn watch(&self, id: &str) -> Option<watch::Receiver<pb::Operation>> {
        self.registry().all.get(id).map(|s| s.subscribe())
    }

    fn ended(&self, id: &str) {
        let mut reg = self.registry();
        reg.ended.push_back(id.to_string());
        while reg.ended.len() > KEPT {
            if let Some(old) = reg.ended.pop_front() {
                reg.all.remove(&old);
            }
        }
    }
}

impl Progress {
    pub fn snapshot(&self) -> pb::Operation {
        self.sender.borrow().clone()
    }

    pub fn update(&self, message: &str, percent: u32) {
        self.sender.send_modify(|op| {
            op.message = message.into();
            op.percent = percent.min(100);
        });
    }

    pub fn succeed(self, message: &str) {
        self.end(SUCCEEDED, message, "");
    }

    /// A migration's dry run ended with this prediction.
    pub fn predicted(self, message: &str, prediction: pb::MigrationPrediction) {
        self.sender.send_modify(|op| op.prediction = Some(prediction));
        self.succeed(message);
    }

    pub fn fail(self, error: &str) {
        self.end(FAILED, "", error);
    }

    fn end(self, state: &str, message: &str, error: &str) {
        self.sender.send_modify(|op| {
            op.state = state.into();
            if !message.is_empty() {
                op.message = message.into();
            }
            op.error = error.into();
            if state == SUCCEEDED {
                op.percent = 100;
            }
            op.ended_at_ms = now_ms();
        });
        self.ops.ended(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_operation_is_watched_to_its_end_and_old_ones_are_dropped() {
        let ops = Arc::new(Operations::new("h1"));
        let op = ops.start("snapshot", "vm-a", "writing");
        let id = op.snapshot().id;
        assert_eq!(id, "h1-1");
        let mut rx = ops.watch(&id).unwrap();
        assert_eq!(rx.borrow_and_update().state, RUNNING);
        op.succeed("done");
        rx.changed().await.unwrap();
        let end = ops.get(&id).unwrap();
        assert_eq!((end.state.as_str(), end.message.as_str(), end.percent), (SUCCEEDED, "done", 100));
        assert!(end.ended_at_ms >= end.started_at_ms);
        for _ in 0..KEPT {
            ops.start("snapshot", "vm-b", "").fail("no");
        }
        assert!(ops.get(&id).is_none(), "the oldest ended operation is dropped");
        assert_eq!(ops.get(&format!("h1-{}", KEPT + 1)).unwrap().state, FAILED);
        assert!(ops.get("h1-999999").is_none());
    }
}
