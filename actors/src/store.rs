//! The host daemon's state store: what must survive a restart of the daemon.
//!
//! One redb file (`<data dir>/state.redb`) with three tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `"format"` | the store's format version (u32) |
//! | `vms` | VM name | a [`VmRecord`]: its spec, desired state, last known VMM process |
//! | `events` | sequence number | an [`Event`] |
//!
//! Values are postcard-encoded. Every write is one redb transaction, committed durably
//! before the call returns: a daemon killed at any moment finds either the old or the new
//! record, never half of one. A record that does not decode is reported with its key
//! rather than skipped, so nothing is lost silently.

use crate::spec::VmSpec;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// Bumped when a table's layout or a value's encoding changes incompatibly.
/// 2: specs carry placement rules.
pub const FORMAT_VERSION: u32 = 2;
/// Events kept; older ones are dropped as new ones come (a ring, by sequence number).
pub const MAX_EVENTS: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store {path} (is another daemon using this data dir?)")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("the state store {path} has format {found}, this daemon reads format {FORMAT_VERSION}")]
    Format { path: PathBuf, found: u32 },
    #[error("state store: {what}")]
    Redb { what: &'static str, source: redb::Error },
    #[error(
        "state store: the {table} record {key} is damaged ({reason}); restore the data dir from a backup or delete that record"
    )]
    Corrupt { table: &'static str, key: String, reason: String },
    #[error("state store: cannot encode the record {key}: {reason}")]
    Encode { key: String, reason: String },
}

fn redb_err<E: Into<redb::Error>>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Redb { what, source: e.into() }
}

/// What the operator asked a VM to be: the daemon brings it back to this after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    Running,
    Stopped,
}

/// A VM as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: DesiredState,
    /// The VMM process last known to run it, to re-adopt after a daemon restart.
    pub pid: Option<u32>,
    pub restarts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Paused,
    Resumed,
    /// The restart policy started a new VMM process.
    Restarted,
    /// A new daemon took over a VMM process that was still running.
    Adopted,
    Failed,
    Deleted,
    /// Arrived from another host by live migration.
    MigratedIn,
    /// Left for another host by live migration.
    MigratedOut,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub vm: Option<String>,
    pub kind: EventKind,
    pub message: String,
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) `<dir>/state.redb`. Fails while another process has it open.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|source| StoreError::Open { path: path.clone(), source })?;
        let tx = db.begin_write().map_err(redb_err("begin a write"))?;
        {
            let mut meta = tx.open_table(META).map_err(redb_err("open the meta table"))?;
            let found = meta.get("format").map_err(redb_err("read the format"))?.map(|v| v.value());
            match found {
                Some(v) if v != FORMAT_VERSION => return Err(StoreError::Format { path, found: v }),
                Some(_) => {}
                None => {
                    meta.insert("format", FORMAT_VERSION).map_err(redb_err("write the format"))?;
                }
            }
            tx.open_table(VMS).map_err(redb_err("open the vms table"))?;
            tx.open_table(EVENTS).map_err(redb_err("open the events table"))?;
        }
        tx.commit().map_err(redb_err("commit"))?;
        Ok(Store { db })
    }

    /// Writes a VM's record, replacing the one of the same name.
    pub fn put_vm(&self, record: &VmRecord) -> Result<(), StoreError> {
        let name = record.spec.name.as_str();
        let bytes =
            postcard::to_stdvec(record).map_err(|e| StoreError::Encode { key: name.into(), reason: e.to_string() })?;
        let tx = self.db.begin_write().map_err(redb_err("begin a write"))?;
        tx.open_table(VMS)
            .map_err(redb_err("open the vms table"))?
            .insert(name, bytes.as_slice())
            .map_err(redb_err("write a VM"))?;
        tx.commit().map_err(redb_err("commit"))
    }

    pub fn get_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err("begin a read"))?;
        let table = tx.open_table(VMS).map_err(redb_err("open the vms table"))?;
        let Some(value) = table.get(name).map_err(redb_err("read a VM"))? else { return Ok(None) };
        decode("vms", name, value.value()).map(Some)
    }

    /// Removes a VM's record; false when there was none.
    pub fn delete_vm(&self, name: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(redb_err("begin a write"))?;
        let removed = tx
            .open_table(VMS)
            .map_err(redb_err("open the vms table"))?
            .remove(name)
            .map_err(redb_err("delete a VM"))?
            .is_some();
        tx.commit().map_err(redb_err("commit"))?;
        Ok(removed)
    }

    /// Every VM, by name.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err("begin a read"))?;
        let table = tx.open_table(VMS).map_err(redb_err("open the vms table"))?;
        let mut vms = Vec::new();
        for entry in table.iter().map_err(redb_err("list the VMs"))? {
            let (key, value) = entry.map_err(redb_err("list the VMs"))?;
            vms.push(decode("vms", key.value(), value.value())?);
        }
        Ok(vms)
    }

    /// Appends an event and returns its sequence number (1, 2, ...). Beyond MAX_EVENTS the
    /// oldest is dropped.
    pub fn append_event(&self, event: &Event) -> Result<u64, StoreError> {
        let bytes = postcard::to_stdvec(event)
            .map_err(|e| StoreError::Encode { key: "event".into(), reason: e.to_string() })?;
        let tx = self.db.begin_write().map_err(redb_err("begin a write"))?;
        let seq = {
            let mut table = tx.open_table(EVENTS).map_err(redb_err("open the events table"))?;
            let last = table.last().map_err(redb_err("read the last event"))?.map_or(0, |(k, _)| k.value());
            let seq = last + 1;
            table.insert(seq, bytes.as_slice()).map_err(redb_err("write an event"))?;
            if seq > MAX_EVENTS {
                table.remove(seq - MAX_EVENTS).map_err(redb_err("drop an old event"))?;
            }
            seq
        };
        tx.commit().map_err(redb_err("commit"))?;
        Ok(seq)
    }

    /// Up to `limit` events with sequence numbers above `after`, oldest first.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err("begin a read"))?;
        let table = tx.open_table(EVENTS).map_err(redb_err("open the events table"))?;
        let mut events = Vec::new();
        for entry in table.range(after.saturating_add(1)..).map_err(redb_err("read events"))?.take(limit) {
            let (key, value) = entry.map_err(redb_err("read events"))?;
            let seq = key.value();
            events.push((seq, decode("events", &seq.to_string(), value.value())?));
        }
        Ok(events)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(table: &'static str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { table, key: key.into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VmRecord {
        let mut spec = VmSpec::new(name, 2, 128);
        spec.cmdline = "ws=1 hb=100".into();
        VmRecord { spec, desired: DesiredState::Running, pid: Some(4242), restarts: 1 }
    }

    fn event(vm: &str, kind: EventKind) -> Event {
        Event { at_ms: 1, vm: Some(vm.into()), kind, message: format!("{kind:?}") }
    }

    #[test]
    fn records_and_events_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_vm(&record("web-1")).unwrap();
            store.put_vm(&record("db-1")).unwrap();
            let mut changed = record("web-1");
            changed.desired = DesiredState::Stopped;
            store.put_vm(&changed).unwrap();
            assert_eq!(store.append_event(&event("web-1", EventKind::Created)).unwrap(), 1);
            assert_eq!(store.append_event(&event("web-1", EventKind::Stopped)).unwrap(), 2);
        }
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = store.list_vms().unwrap().into_iter().map(|r| r.spec.name).collect();
        assert_eq!(names, ["db-1", "web-1"]);
        assert_eq!(store.get_vm("web-1").unwrap().unwrap().desired, DesiredState::Stopped);
        assert_eq!(store.get_vm("db-1").unwrap(), Some(record("db-1")));
        let events = store.events_after(1, 10).unwrap();
        assert_eq!(events, vec![(2, event("web-1", EventKind::Stopped))]);
        assert_eq!(store.append_event(&event("db-1", EventKind::Started)).unwrap(), 3);
        assert!(store.delete_vm("db-1").unwrap());
        assert!(!store.delete_vm("db-1").unwrap());
        assert_eq!(store.get_vm("db-1").unwrap(), None);
    }

    #[test]
    fn a_second_daemon_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(err.to_string().contains("another daemon"), "{err}");
    }

    #[test]
    fn a_damaged_record_is_named_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_vm(&record("good")).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(VMS).unwrap().insert("bad", [0xffu8, 0xff, 0xff].as_slice()).unwrap();
        tx.commit().unwrap();
        let err = store.list_vms().unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { table: "vms", key, .. } if key == "bad"), "{err}");
        assert_eq!(store.get_vm("good").unwrap(), Some(record("good")));
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let tx = store.db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert("format", FORMAT_VERSION + 1).unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Format { found, .. } if found == FORMAT_VERSION + 1), "{err}");
    }
}
