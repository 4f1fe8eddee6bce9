//! What a HostSupervisor holds: its VMs (each with its supervisor, spec, desired state and
//! last report), their admission, and keeping their records in the state store.

use super::{Capacity, FLUSH_EVERY, HostConfig, HostError, HostInfo, MAX_SOCKET_PATH};
use crate::process::VmmProcess;
use crate::spec::VmSpec;
use crate::store::{DesiredState, Event, EventKind, Store, VmRecord};
use crate::supervisor::policy::RestartTracker;
use crate::vm::{VmMsg, VmPaths, VmReport};
use ractor::{ActorId, ActorRef};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::broadcast;

/// A VM's supervisor, as the host holds it.
pub(super) enum Supervisor {
    Running(ActorRef<VmMsg>),
    /// Being started, restarted or re-adopting the VMM, from a task.
    Starting,
    /// The host gave the VM up.
    GaveUp,
}

pub(super) struct VmEntry {
    pub(super) spec: VmSpec,
    pub(super) desired: DesiredState,
    /// Arriving by migration: not in the store yet.
    pub(super) incoming: bool,
    pub(super) paths: VmPaths,
    pub(super) supervisor: Supervisor,
    pub(super) last: VmReport,
    /// Restart intensity of this VM's supervisor.
    pub(super) actor_restarts: RestartTracker,
}

pub struct HostState {
    pub(super) config: HostConfig,
    pub(super) capacity: Capacity,
    pub(super) vms: BTreeMap<String, VmEntry>,
    pub(super) store: Option<Store>,
    pub(super) events: broadcast::Sender<(u64, Event)>,
    /// Sequence numbers of events when there is no store.
    pub(super) event_seq: u64,
    /// VMs whose record could not be saved last time (tried again every `FLUSH_EVERY`).
    pub(super) unsaved: BTreeSet<String>,
}

impl HostState {
    /// Saves a VM's record (when there is a store). A failure is the caller's error, and
    /// the record is tried again later.
    pub(super) fn save(&mut self, name: &str) -> Result<(), HostError> {
        let (Some(store), Some(entry)) = (&self.store, self.vms.get(name)) else {
            self.unsaved.remove(name);
            return Ok(());
        };
        if entry.incoming {
            return Ok(());
        }
        let info = &entry.last.info;
        let record =
            VmRecord { spec: entry.spec.clone(), desired: entry.desired, pid: info.pid, restarts: info.restarts };
        match store.put_vm(&record) {
            Ok(()) => {
                self.unsaved.remove(name);
                Ok(())
            }
            Err(e) => {
                self.unsaved.insert(name.to_string());
                Err(e.into())
            }
        }
    }

    /// As `save`, for what no caller waits on (a new pid, a restart count): a failure is
    /// logged, the VM runs on, and the record is tried again later.
    pub(super) fn persist(&mut self, name: &str) {
        if let Err(e) = self.save(name) {
            tracing::error!(vm = %name, "{}; trying again every {FLUSH_EVERY:?}", crate::error_chain(&e));
        }
    }

    /// Saves again what could not be saved, until the first failure.
    pub(super) fn flush(&mut self) {
        let names: Vec<String> = self.unsaved.iter().cloned().collect();
        for name in names {
            if self.save(&name).is_err() {
                return;
            }
            tracing::info!(vm = %name, "the VM's record is saved again");
        }
    }

    /// Sets a VM's desired state and saves it; answers the state before. When it cannot
    /// be saved, nothing changes.
    pub(super) fn set_desired(&mut self, name: &str, desired: DesiredState) -> Result<DesiredState, HostError> {
        let before = std::mem::replace(&mut self.entry(name)?.desired, desired);
        if let Err(e) = self.save(name) {
            if let Some(entry) = self.vms.get_mut(name) {
                entry.desired = before;
            }
            return Err(e);
        }
        Ok(before)
    }

    /// Records an event in the store and tells the watchers.
    pub(super) fn event(&mut self, vm: &str, kind: EventKind, message: String) {
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = Event { at_ms, vm: Some(vm.to_string()), kind, message };
        let seq = match &self.store {
            Some(store) => match store.append_event(&event) {
                Ok(seq) => seq,
                Err(e) => {
                    tracing::error!(vm, "cannot record an event: {}", crate::error_chain(&e));
                    return;
                }
            },
            None => {
                self.event_seq += 1;
                self.event_seq
            }
        };
        // No receiver is not an error: nobody watches.
        let _ = self.events.send((seq, event));
    }

    pub(super) fn entry(&mut self, name: &str) -> Result<&mut VmEntry, HostError> {
        self.vms.get_mut(name).ok_or_else(|| HostError::NotFound(name.to_string()))
    }

    pub(super) fn used(&self) -> Capacity {
        self.vms.values().fold(Capacity { vcpus: 0, mem_mib: 0 }, |acc, e| Capacity {
            vcpus: acc.vcpus + u32::from(e.spec.vcpus),
            mem_mib: acc.mem_mib + e.spec.mem_mib,
        })
    }

    pub(super) fn info(&self) -> HostInfo {
        HostInfo {
            capacity: self.capacity,
            used: self.used(),
            vms: self.vms.len(),
            runtime_dir: self.config.runtime_dir.clone(),
        }
    }

    pub(super) fn admit(&self, spec: &VmSpec) -> Result<VmPaths, HostError> {
        spec.validate()?;
        if self.vms.contains_key(&spec.name) {
            return Err(HostError::AlreadyExists(spec.name.clone()));
        }
        let used = self.used();
        let free_vcpus = self.capacity.vcpus.saturating_sub(used.vcpus);
        let free_mem_mib = self.capacity.mem_mib.saturating_sub(used.mem_mib);
        if u32::from(spec.vcpus) > free_vcpus || spec.mem_mib > free_mem_mib {
            return Err(HostError::NoCapacity {
                name: spec.name.clone(),
                need_vcpus: spec.vcpus,
                need_mem_mib: spec.mem_mib,
                free_vcpus,
                free_mem_mib,
                total_vcpus: self.capacity.vcpus,
                total_mem_mib: self.capacity.mem_mib,
            });
        }
        let paths = VmPaths::new(&self.config.runtime_dir, spec);
        if paths.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HostError::SocketPath(paths.socket));
        }
        // A VMM this host does not know (left by a lost store) would keep the socket.
        if paths.socket.exists()
            && let Some(pid) = VmmProcess::serving(&paths.socket)
        {
            return Err(HostError::Orphan { pid, socket: paths.socket });
        }
        Ok(paths)
    }

    pub(super) fn name_of(&self, id: ActorId) -> Option<String> {
        self.vms
            .iter()
            .find(|(_, e)| matches!(&e.supervisor, Supervisor::Running(a) if a.get_id() == id))
            .map(|(n, _)| n.clone())
    }

    pub(super) fn actor(&self, name: &str) -> Result<ActorRef<VmMsg>, HostError> {
        let entry = self.vms.get(name).ok_or_else(|| HostError::NotFound(name.to_string()))?;
        match &entry.supervisor {
            Supervisor::Running(actor) => Ok(actor.clone()),
            Supervisor::Starting => Err(HostError::Restarting(name.to_string())),
            Supervisor::GaveUp => Err(HostError::GaveUp {
                name: name.to_string(),
                restarts: self.config.actor_restarts,
                window: self.config.actor_restart_window,
            }),
        }
    }
}
