//! The host daemon's state store: what must survive a restart of the daemon.
//!
//! One redb file (`<data dir>/state.redb`) with four tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `"format"` | the store's format version (u32) |
//! | `vms` | VM name | a [`VmRecord`]: its spec, desired state, last known VMM process |
//! | `events` | sequence number | an [`Event`] |
//! | `snapshots` | a snapshot directory | the name of the VM the daemon wrote it of |
//!
//! Values are postcard-encoded. Every write is one redb transaction, committed durably
//! before the call returns: a daemon killed at any moment finds either the old or the new
//! record, never half of one. A record that does not decode is reported with its key
//! rather than skipped, so nothing is lost silently.
//!
//! A store is refused rather than trusted when it cannot be what the daemon wrote: an
//! empty file (a store is never empty once made: it is made aside and renamed into place),
//! a file redb finds damaged (its integrity is checked at every open; a panic inside redb
//! is caught and reported the same way), another format, or a record that does not decode.
//! A write that fails (a full disk) is an error of that call; the handle is then closed and
//! reopened by the next call, since redb refuses every later write on a handle that saw an
//! I/O error.

use crate::spec::VmSpec;
use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The store's file in the data dir.
pub const STORE_FILE: &str = "state.redb";

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Snapshot directories the daemon wrote, and the VM each is of.
const SNAPSHOTS: TableDefinition<&str, &str> = TableDefinition::new("snapshots");

/// Bumped when a table's layout or a value's encoding changes incompatibly (a new table is
/// not such a change). 2: specs carry placement rules.
pub const FORMAT_VERSION: u32 = 2;
/// Events kept; older ones are dropped as new ones come (a ring, by sequence number).
pub const MAX_EVENTS: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store {path} (is another daemon using this data dir?)")]
    Open {
        path: PathBuf,
        #[source]
        source: DatabaseError,
    },
    #[error("the state store {path} is empty (0 bytes), so the VMs it held are not known")]
    Empty { path: PathBuf },
    #[error("the state store {path} is damaged ({reason})")]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot read the state store {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state store {path} has format {found}, this daemon reads format {FORMAT_VERSION}")]
    Format { path: PathBuf, found: u32 },
    #[error("the state store could not save {what}")]
    Save {
        what: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("the state store could not read {what}")]
    Read {
        what: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error(
        "state store: the {table} record {key} is damaged ({reason}); restore the data dir from a backup or delete that record"
    )]
    Corrupt { table: &'static str, key: String, reason: String },
    #[error("state store: cannot encode the record {key}: {reason}")]
    Encode { key: String, reason: String },
}

impl StoreError {
    /// The file system under the store is full (the operator's part: free some space).
    pub fn is_full(&self) -> bool {
        let io = match self {
            StoreError::Save { source: redb::Error::Io(e), .. }
            | StoreError::Read { source: redb::Error::Io(e), .. } => e,
            StoreError::Io { source, .. } => source,
            _ => return false,
        };
        matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
    }

    /// The store's file cannot be trusted: a daemon must not start on it.
    pub fn is_damaged(&self) -> bool {
        matches!(self, StoreError::Empty { .. } | StoreError::Damaged { .. } | StoreError::Corrupt { .. })
    }
}

fn save_err<E: Into<redb::Error>>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Save { what, source: e.into() }
}

fn read_err<E: Into<redb::Error>>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Read { what, source: e.into() }
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
    /// Paused by itself for want of a run permit (`VmPhase::Fenced`). New kinds go last:
    /// the events already stored are read by their position.
    Fenced,
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
    path: PathBuf,
    /// `None` after a failed write: the next call opens the file again.
    db: Mutex<Option<Database>>,
}

/// Opens an existing store file, checking its integrity; redb may panic on a file damaged
/// outside it, which is caught and reported as damage.
fn open_file(path: &Path) -> Result<Database, StoreError> {
    let opened = std::panic::catch_unwind(|| {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(true);
        builder.open(path)
    });
    let damaged = |reason: String| StoreError::Damaged { path: path.to_owned(), reason };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(source @ (DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch))) => {
            Err(StoreError::Open { path: path.to_owned(), source })
        }
        Ok(Err(DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() != std::io::ErrorKind::InvalidData && e.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            Err(StoreError::Io { path: path.to_owned(), source: e })
        }
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(damaged(format!("redb failed reading it: {what}")))
        }
    }
}

/// Makes a new store beside `path` and renames it into place, so that a daemon killed
/// meanwhile leaves no empty store behind (an empty one is refused as damaged).
fn create_file(path: &Path) -> Result<(), StoreError> {
    let mut new = path.as_os_str().to_owned();
    new.push(".new");
    let new = PathBuf::from(new);
    let io = |source| StoreError::Io { path: new.clone(), source };
    match std::fs::remove_file(&new) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let db = Database::create(&new).map_err(|source| StoreError::Open { path: new.clone(), source })?;
    let tx = db.begin_write().map_err(save_err("the store's format"))?;
    tx.open_table(META)
        .map_err(save_err("the store's format"))?
        .insert("format", FORMAT_VERSION)
        .map_err(save_err("the store's format"))?;
    tx.commit().map_err(save_err("the store's format"))?;
    drop(db);
    std::fs::rename(&new, path).map_err(io)
}

impl Store {
    /// Opens `<dir>/state.redb`, or makes it when there is none. Fails while another
    /// process has it open, and refuses a file that is empty or damaged, of another
    /// format, or holding a VM record that does not decode.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(STORE_FILE);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == 0 => return Err(StoreError::Empty { path }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_file(&path)?,
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        let db = open_file(&path)?;
        let tx = db.begin_write().map_err(save_err("the store's tables"))?;
        {
            let meta = tx.open_table(META).map_err(save_err("the store's tables"))?;
            let found = meta.get("format").map_err(read_err("the store's format"))?.map(|v| v.value());
            match found {
                Some(v) if v != FORMAT_VERSION => return Err(StoreError::Format { path, found: v }),
                Some(_) => {}
                None => return Err(StoreError::Damaged { path, reason: "it records no format".into() }),
            }
            tx.open_table(VMS).map_err(save_err("the store's tables"))?;
            tx.open_table(EVENTS).map_err(save_err("the store's tables"))?;
            tx.open_table(SNAPSHOTS).map_err(save_err("the store's tables"))?;
        }
        tx.commit().map_err(save_err("the store's tables"))?;
        let store = Store { path, db: Mutex::new(Some(db)) };
        // A damaged record is found now, before a daemon relies on the store.
        store.list_vms()?;
        Ok(store)
    }

    /// Runs `f` on the open database (opened again first after a failure). When `f` fails
    /// to save or read, the handle is closed, so that the next call opens the file again:
    /// redb refuses every later write on a handle that saw an I/O error.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        // A panic while holding it leaves nothing half-done: redb's transactions are whole.
        let mut guard = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let db = match guard.take() {
            Some(db) => db,
            None => {
                let db = open_file(&self.path)?;
                tracing::info!(path = %self.path.display(), "the state store is open again");
                db
            }
        };
        let result = f(&db);
        match &result {
            Err(e @ (StoreError::Save { .. } | StoreError::Read { .. })) => {
                tracing::warn!("{}; the state store is opened again at its next use", crate::error_chain(e));
            }
            _ => *guard = Some(db),
        }
        result
    }

    /// Runs `f` in one write transaction and commits it.
    fn write<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(save_err(what))?;
            let value = f(&tx)?;
            tx.commit().map_err(save_err(what))?;
            Ok(value)
        })
    }

    /// Runs `f` in one read transaction.
    fn read<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_db(|db| f(&db.begin_read().map_err(read_err(what))?))
    }

    /// Writes a VM's record, replacing the one of the same name.
    pub fn put_vm(&self, record: &VmRecord) -> Result<(), StoreError> {
        let name = record.spec.name.as_str();
        let bytes =
            postcard::to_stdvec(record).map_err(|e| StoreError::Encode { key: name.into(), reason: e.to_string() })?;
        let what = "a VM's record";
        self.write(what, |tx| {
            tx.open_table(VMS).map_err(save_err(what))?.insert(name, bytes.as_slice()).map_err(save_err(what))?;
            Ok(())
        })
    }

    pub fn get_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        self.read("a VM's record", |tx| {
            let table = tx.open_table(VMS).map_err(read_err("the vms table"))?;
            let Some(value) = table.get(name).map_err(read_err("a VM's record"))? else { return Ok(None) };
            decode("vms", name, value.value()).map(Some)
        })
    }

    /// Removes a VM's record; false when there was none.
    pub fn delete_vm(&self, name: &str) -> Result<bool, StoreError> {
        let what = "the deletion of a VM";
        self.write(what, |tx| {
            let removed = tx.open_table(VMS).map_err(save_err(what))?.remove(name).map_err(save_err(what))?.is_some();
            Ok(removed)
        })
    }

    /// Every VM, by name.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.read("the VMs", |tx| {
            let table = tx.open_table(VMS).map_err(read_err("the vms table"))?;
            let mut vms = Vec::new();
            for entry in table.iter().map_err(read_err("the VMs"))? {
                let (key, value) = entry.map_err(read_err("the VMs"))?;
                vms.push(decode("vms", key.value(), value.value())?);
            }
            Ok(vms)
        })
    }

    /// Appends an event and returns its sequence number (1, 2, ...). Beyond MAX_EVENTS the
    /// oldest is dropped.
    pub fn append_event(&self, event: &Event) -> Result<u64, StoreError> {
        let bytes = postcard::to_stdvec(event)
            .map_err(|e| StoreError::Encode { key: "event".into(), reason: e.to_string() })?;
        let what = "an event";
        self.write(what, |tx| {
            let mut table = tx.open_table(EVENTS).map_err(save_err(what))?;
            let last = table.last().map_err(save_err(what))?.map_or(0, |(k, _)| k.value());
            let seq = last + 1;
            table.insert(seq, bytes.as_slice()).map_err(save_err(what))?;
            if seq > MAX_EVENTS {
                table.remove(seq - MAX_EVENTS).map_err(save_err(what))?;
            }
            Ok(seq)
        })
    }

    /// Up to `limit` events with sequence numbers above `after`, oldest first.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        self.read("the events", |tx| {
            let table = tx.open_table(EVENTS).map_err(read_err("the events table"))?;
            let mut events = Vec::new();
            for entry in table.range(after.saturating_add(1)..).map_err(read_err("the events"))?.take(limit) {
                let (key, value) = entry.map_err(read_err("the events"))?;
                let seq = key.value();
                events.push((seq, decode("events", &seq.to_string(), value.value())?));
            }
            Ok(events)
        })
    }

    /// Records that the snapshot in `dir` is of VM `vm`.
    pub fn put_snapshot(&self, dir: &Path, vm: &str) -> Result<(), StoreError> {
        let what = "a snapshot's origin";
        let key = dir.to_string_lossy();
        self.write(what, |tx| {
            tx.open_table(SNAPSHOTS).map_err(save_err(what))?.insert(key.as_ref(), vm).map_err(save_err(what))?;
            Ok(())
        })
    }

    /// The VM the daemon wrote the snapshot in `dir` of, if it wrote one there.
    pub fn snapshot_of(&self, dir: &Path) -> Result<Option<String>, StoreError> {
        let key = dir.to_string_lossy();
        self.read("a snapshot's origin", |tx| {
            let table = tx.open_table(SNAPSHOTS).map_err(read_err("the snapshots table"))?;
            let vm = table.get(key.as_ref()).map_err(read_err("a snapshot's origin"))?.map(|v| v.value().to_string());
            Ok(vm)
        })
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
        store
            .write("a test record", |tx| {
                tx.open_table(VMS).unwrap().insert("bad", [0xffu8, 0xff, 0xff].as_slice()).unwrap();
                Ok(())
            })
            .unwrap();
        let err = store.list_vms().unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { table: "vms", key, .. } if key == "bad"), "{err}");
        assert_eq!(store.get_vm("good").unwrap(), Some(record("good")));
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write("a test format", |tx| {
                    tx.open_table(META).unwrap().insert("format", FORMAT_VERSION + 1).unwrap();
                    Ok(())
                })
                .unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Format { found, .. } if found == FORMAT_VERSION + 1), "{err}");
    }

    #[test]
    fn a_damaged_record_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write("a test record", |tx| {
                    tx.open_table(VMS).unwrap().insert("bad", [0xffu8, 0xff].as_slice()).unwrap();
                    Ok(())
                })
                .unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(err.is_damaged() && matches!(&err, StoreError::Corrupt { key, .. } if key == "bad"), "{err}");
    }

    #[test]
    fn an_emptied_store_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap().put_vm(&record("web-1")).unwrap();
        let path = dir.path().join(STORE_FILE);
        std::fs::File::create(&path).unwrap();

        let err = Store::open(dir.path()).err().unwrap();

        assert!(matches!(&err, StoreError::Empty { path: p } if *p == path), "{err}");
        assert!(err.is_damaged());
        assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "not made anew");
    }

    #[test]
    fn a_new_store_is_made_aside_and_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        // A daemon killed while making the store left this behind.
        std::fs::write(dir.path().join("state.redb.new"), b"half").unwrap();

        let store = Store::open(dir.path()).unwrap();

        assert!(!dir.path().join("state.redb.new").exists());
        assert_eq!(store.list_vms().unwrap(), []);
        assert!(std::fs::metadata(dir.path().join(STORE_FILE)).unwrap().len() > 0);
    }

    /// Damage anywhere in a real store: either it opens with every record as written (the
    /// bytes hit free space), or it is refused as damaged; it never panics.
    #[test]
    fn damaged_bytes_anywhere_are_refused_or_harmless_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<VmRecord> = (0..20).map(|i| record(&format!("vm-{i:02}"))).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            for r in &written {
                store.put_vm(r).unwrap();
                store.append_event(&event(&r.spec.name, EventKind::Created)).unwrap();
            }
        }
        let path = dir.path().join(STORE_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut refused = 0;
        // 64 flipped bytes every 997 (a prime: the hits fall at every offset within a page).
        for offset in (0..good.len()).step_by(997) {
            let mut bad = good.clone();
            let end = (offset + 64).min(bad.len());
            bad[offset..end].iter_mut().for_each(|b| *b ^= 0x5a);
            std::fs::write(&path, &bad).unwrap();
            match Store::open(dir.path()) {
                Ok(store) => assert_eq!(store.list_vms().unwrap(), written, "offset {offset}"),
                Err(e) => {
                    assert!(e.is_damaged(), "offset {offset}: {e}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "some damage must hit the records");
    }

    #[test]
    fn snapshot_origins_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_snapshot(Path::new("/snaps/a"), "web-1").unwrap();
        assert_eq!(store.snapshot_of(Path::new("/snaps/a")).unwrap().as_deref(), Some("web-1"));
        assert_eq!(store.snapshot_of(Path::new("/snaps/b")).unwrap(), None);
    }
}
