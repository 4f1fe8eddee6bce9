//! `HostSupervisor`: one per host. It owns the host's VmSupervisors (spawned linked to it),
//! the host's capacity and the admission of new VMs, and restarts a VmSupervisor that
//! fails: the new one re-adopts the still-running VMM process, so the guest never notices.
//! Restarts of one VM's supervisor are bounded (`HostConfig::actor_restarts` within
//! `HostConfig::actor_restart_window`); past that the host gives that VM up.

use crate::process::VmmProcess;
use crate::spec::{SpecError, VmSpec};
use crate::store::{DesiredState, Event, EventKind, Store, StoreError, VmRecord};
use crate::supervisor::policy::{Decision, ProcessExit, RestartPolicy, RestartTracker};
use crate::vm::{Adopt, Incoming, VmError, VmInfo, VmMsg, VmPaths, VmPhase, VmReport, VmSupervisor, VmSupervisorArgs};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Longest Unix socket path (`sun_path` is 108 bytes with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a VmSupervisor may take to answer the host.
const CHILD_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Events a slow watcher may fall behind by before it is told it missed some.
const EVENT_BACKLOG: usize = 4096;

/// What a host can give to VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcpus: u32,
    pub mem_mib: u64,
}

impl Capacity {
    /// The host's online CPUs (`/proc/cpuinfo`) and total memory (`/proc/meminfo`). No
    /// overcommit: a VM's vCPUs and memory are reserved for it as a whole.
    pub fn from_proc() -> Result<Self, HostError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| HostError::Capacity { what: path.into(), source })
        };
        let vcpus = read("/proc/cpuinfo")?.lines().filter(|l| l.starts_with("processor")).count() as u32;
        let mem_kib = read("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if vcpus == 0 || mem_kib == 0 {
            let source = std::io::Error::other("no processor lines or no MemTotal");
            return Err(HostError::Capacity { what: "/proc/cpuinfo and /proc/meminfo".into(), source });
        }
        Ok(Capacity { vcpus, mem_mib: mem_kib / 1024 })
    }
}

/// How a HostSupervisor is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Control sockets, serial logs and VMM logs go here (`<name>.sock`, ...).
    pub runtime_dir: PathBuf,
    /// The `novacron-vmm` binary.
    pub vmm_binary: PathBuf,
    /// `None`: measured from /proc.
    pub capacity: Option<Capacity>,
    /// Restarts of one VM's supervisor allowed within `actor_restart_window`.
    pub actor_restarts: u32,
    pub actor_restart_window: Duration,
    /// How long `StopVm` waits for a guest to shut down before it kills the VMM.
    pub stop_timeout: Duration,
    /// Where the state store lives (`state.redb`): with one, the VMs survive a restart of
    /// the host (their VMM processes are re-adopted). `None`: nothing is kept.
    pub data_dir: Option<PathBuf>,
}

impl HostConfig {
    /// Defaults: capacity from /proc, 3 supervisor restarts per 10 s, 10 s stop timeout.
    pub fn new(runtime_dir: impl Into<PathBuf>, vmm_binary: impl Into<PathBuf>) -> Self {
        HostConfig {
            runtime_dir: runtime_dir.into(),
            vmm_binary: vmm_binary.into(),
            capacity: None,
            actor_restarts: 3,
            actor_restart_window: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(10),
            data_dir: None,
        }
    }
}

/// What `HostInfo` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub capacity: Capacity,
    /// Reserved by the VMs on this host (every VM it holds, whatever its phase).
    pub used: Capacity,
    pub vms: usize,
    pub runtime_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("a VM named {0:?} already exists on this host; choose another name or delete that VM first")]
    AlreadyExists(String),
    #[error(
        "VM {name} does not fit on this host: it needs {need_vcpus} vCPUs and {need_mem_mib} MiB, \
         {free_vcpus} vCPUs and {free_mem_mib} MiB are free (of {total_vcpus} and {total_mem_mib} MiB)"
    )]
    NoCapacity {
        name: String,
        need_vcpus: u8,
        need_mem_mib: u64,
        free_vcpus: u32,
        free_mem_mib: u64,
        total_vcpus: u32,
        total_mem_mib: u64,
    },
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    #[error("the control socket path {0} is too long for a Unix socket; use a shorter runtime directory or VM name")]
    SocketPath(PathBuf),
    #[error(
        "VM {name}: its supervisor gave up after {restarts} restarts within {window:?}; stop the VM and create it again"
    )]
    GaveUp { name: String, restarts: u32, window: Duration },
    #[error("cannot start the supervisor of VM {name}: {reason}")]
    Spawn { name: String, reason: String },
    #[error("the supervisor of VM {name} did not answer: {reason}")]
    Unresponsive { name: String, reason: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot read the host's capacity from {what}")]
    Capacity {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the runtime directory {path}")]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM binary {0} does not exist; build it with `cargo build -p novacron-vmm --bin novacron-vmm`")]
    VmmBinary(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `Events` answers: the recorded events asked for, and every later one as it comes.
pub struct EventFeed {
    pub past: Vec<(u64, Event)>,
    /// Lagging more than 4,096 events behind loses the oldest (the receiver says how many).
    pub live: broadcast::Receiver<(u64, Event)>,
}

pub enum HostMsg {
    /// Admits and starts a VM; answers once its supervisor runs (the guest may still boot).
    CreateVm(VmSpec, RpcReplyPort<Result<VmInfo, HostError>>),
    /// Admits a VM without starting it (phase `Stopped`); `StartVm` boots it.
    DefineVm(VmSpec, RpcReplyPort<Result<VmInfo, HostError>>),
    /// Boots a `Stopped` or `Failed` VM; from now on the host keeps it running.
    StartVm(String, RpcReplyPort<Result<VmInfo, HostError>>),
    /// Shuts a VM down (SIGKILL after `HostConfig::stop_timeout`); it stays defined,
    /// `Stopped`, holding its capacity, and a restarted host leaves it stopped.
    StopVm(String, RpcReplyPort<Result<VmInfo, HostError>>),
    /// Stops a VM if it runs, stops its supervisor, forgets it and frees its capacity.
    /// Answers the VM's last info.
    DeleteVm(String, RpcReplyPort<Result<VmInfo, HostError>>),
    /// Admits a VM arriving by live migration and starts its receiving VMM. It is not
    /// recorded in the store until `Arrived`; if its VMM ends before, it stays `Failed`
    /// until `DeleteVm`.
    ReceiveVm {
        spec: VmSpec,
        incoming: Incoming,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
    },
    /// The VM's incoming migration completed: it is this host's VM from now on.
    Arrived(String, RpcReplyPort<Result<VmInfo, HostError>>),
    /// The VM migrated away: forget it without stopping anything (its VMM has ended).
    Departed(String, RpcReplyPort<Result<VmInfo, HostError>>),
    /// Events with sequence numbers above `after` (at most `limit`), oldest first, and
    /// every later one.
    Events {
        after: u64,
        limit: usize,
        reply: RpcReplyPort<Result<EventFeed, HostError>>,
    },
    /// Every VM, by name, as last reported by its supervisor.
    ListVms(RpcReplyPort<Vec<VmInfo>>),
    /// One VM, fresh from its supervisor.
    GetVm(String, RpcReplyPort<Result<VmInfo, HostError>>),
    /// The VM's supervisor, for messages the host does not relay (`Pause`, `Resume`).
    VmActor(String, RpcReplyPort<Result<ActorRef<VmMsg>, HostError>>),
    HostInfo(RpcReplyPort<HostInfo>),
    /// Sent by a VmSupervisor after every change of its VM.
    #[doc(hidden)]
    VmChanged(VmReport),
}

struct VmEntry {
    spec: VmSpec,
    desired: DesiredState,
    /// Arriving by migration: not in the store yet.
    incoming: bool,
    paths: VmPaths,
    /// `None` once the host gave up restarting its supervisor.
    actor: Option<ActorRef<VmMsg>>,
    last: VmReport,
    /// Restart intensity of this VM's supervisor.
    actor_restarts: RestartTracker,
    supervisor_restarts: u32,
}

pub struct HostState {
    config: HostConfig,
    capacity: Capacity,
    vms: BTreeMap<String, VmEntry>,
    store: Option<Store>,
    events: broadcast::Sender<(u64, Event)>,
    /// Sequence numbers of events when there is no store.
    event_seq: u64,
}

impl HostState {
    /// Writes a VM's record (when there is a store). A failure is logged: the VM runs on,
    /// and the next change writes the record again.
    fn persist(&self, name: &str) {
        let (Some(store), Some(entry)) = (&self.store, self.vms.get(name)) else { return };
        if entry.incoming {
            return;
        }
        let info = &entry.last.info;
        let record =
            VmRecord { spec: entry.spec.clone(), desired: entry.desired, pid: info.pid, restarts: info.restarts };
        if let Err(e) = store.put_vm(&record) {
            tracing::error!(vm = %name, "cannot save the VM's record: {e}");
        }
    }

    /// Records an event in the store and tells the watchers.
    fn event(&mut self, vm: &str, kind: EventKind, message: String) {
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = Event { at_ms, vm: Some(vm.to_string()), kind, message };
        let seq = match &self.store {
            Some(store) => match store.append_event(&event) {
                Ok(seq) => seq,
                Err(e) => {
                    tracing::error!(vm, "cannot record an event: {e}");
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

    fn entry(&mut self, name: &str) -> Result<&mut VmEntry, HostError> {
        self.vms.get_mut(name).ok_or_else(|| HostError::NotFound(name.to_string()))
    }

    fn used(&self) -> Capacity {
        self.vms.values().fold(Capacity { vcpus: 0, mem_mib: 0 }, |acc, e| Capacity {
            vcpus: acc.vcpus + u32::from(e.spec.vcpus),
            mem_mib: acc.mem_mib + e.spec.mem_mib,
        })
    }

    fn info(&self) -> HostInfo {
        HostInfo {
            capacity: self.capacity,
            used: self.used(),
            vms: self.vms.len(),
            runtime_dir: self.config.runtime_dir.clone(),
        }
    }

    fn admit(&self, spec: &VmSpec) -> Result<VmPaths, HostError> {
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
        Ok(paths)
    }

    fn name_of(&self, id: ActorId) -> Option<String> {
        self.vms.iter().find(|(_, e)| e.actor.as_ref().is_some_and(|a| a.get_id() == id)).map(|(n, _)| n.clone())
    }

    fn actor(&self, name: &str) -> Result<ActorRef<VmMsg>, HostError> {
        let entry = self.vms.get(name).ok_or_else(|| HostError::NotFound(name.to_string()))?;
        entry.actor.clone().ok_or_else(|| HostError::GaveUp {
            name: name.to_string(),
            restarts: self.config.actor_restarts,
            window: self.config.actor_restart_window,
        })
    }
}

/// The event a change of phase makes, if any (`Starting` makes none: the boot's outcome does).
fn phase_event(before: VmPhase, now: VmPhase) -> Option<EventKind> {
    match (before, now) {
        (b, n) if b == n => None,
        (VmPhase::Paused, VmPhase::Running) => Some(EventKind::Resumed),
        (_, VmPhase::Running) => Some(EventKind::Started),
        (_, VmPhase::Paused) => Some(EventKind::Paused),
        (_, VmPhase::Stopped) => Some(EventKind::Stopped),
        (_, VmPhase::Failed) => Some(EventKind::Failed),
        (_, VmPhase::Starting) => None,
    }
}

fn unanswered(name: &str, e: impl std::fmt::Display) -> HostError {
    HostError::Unresponsive { name: name.to_string(), reason: e.to_string() }
}

pub struct HostSupervisor;

impl HostSupervisor {
    async fn spawn_vm(
        myself: &ActorRef<HostMsg>,
        config: &HostConfig,
        spec: &VmSpec,
        paths: &VmPaths,
        adopt: Option<Adopt>,
        incoming: Option<Incoming>,
    ) -> Result<ActorRef<VmMsg>, HostError> {
        let args = VmSupervisorArgs {
            spec: spec.clone(),
            paths: paths.clone(),
            vmm_binary: config.vmm_binary.clone(),
            adopt,
            host: Some(myself.clone()),
            incoming,
        };
        // Unnamed: actor names are process-global, and several hosts may share a process.
        let (actor, _) = Actor::spawn_linked(None, VmSupervisor, args, myself.get_cell())
            .await
            .map_err(|e| HostError::Spawn { name: spec.name.clone(), reason: crate::error_chain(&e) })?;
        Ok(actor)
    }

    /// Admits `spec`, records it, and starts its supervisor: booting the VM when `start`,
    /// else holding it `Stopped`. A refusal or a failed start changes nothing.
    async fn create(
        myself: &ActorRef<HostMsg>,
        state: &mut HostState,
        spec: VmSpec,
        start: bool,
    ) -> Result<VmInfo, HostError> {
        let paths = state.admit(&spec)?;
        let desired = if start { DesiredState::Running } else { DesiredState::Stopped };
        // Recorded before it starts: a host that dies right after the start finds the VM.
        if let Some(store) = &state.store {
            store.put_vm(&VmRecord { spec: spec.clone(), desired, pid: None, restarts: 0 })?;
        }
        let adopt = (!start).then(|| Adopt::stopped(spec.restart));
        let info = match Self::start_entry(myself, state, spec.clone(), desired, paths, adopt, None).await {
            Ok(info) => info,
            Err(e) => {
                if let Some(store) = &state.store {
                    let _ = store.delete_vm(&spec.name);
                }
                return Err(e);
            }
        };
        state.persist(&spec.name);
        state.event(&spec.name, EventKind::Created, format!("created ({} vCPUs, {} MiB)", spec.vcpus, spec.mem_mib));
        tracing::info!(vm = %spec.name, start, "VM created");
        Ok(info)
    }

    /// Starts a VM's supervisor (fresh, or adopting a running VMM) and takes it in.
    async fn start_entry(
        myself: &ActorRef<HostMsg>,
        state: &mut HostState,
        spec: VmSpec,
        desired: DesiredState,
        paths: VmPaths,
        adopt: Option<Adopt>,
        incoming: Option<Incoming>,
    ) -> Result<VmInfo, HostError> {
        let tracker = adopt.as_ref().map_or_else(|| RestartTracker::new(spec.restart), |a| a.tracker.clone());
        let is_incoming = incoming.is_some();
        let actor = Self::spawn_vm(myself, &state.config, &spec, &paths, adopt, incoming).await?;
        let info = ractor::call_t!(actor, VmMsg::GetInfo, CHILD_CALL_TIMEOUT.as_millis() as u64)
            .map_err(|e| unanswered(&spec.name, e))?;
        let intensity = RestartPolicy::OnFailure {
            max_restarts: state.config.actor_restarts,
            window: state.config.actor_restart_window,
            backoff_initial: Duration::ZERO,
            backoff_max: Duration::ZERO,
        };
        let last = VmReport { info: info.clone(), tracker };
        state.vms.insert(
            spec.name.clone(),
            VmEntry {
                spec,
                desired,
                incoming: is_incoming,
                paths,
                actor: Some(actor),
                last,
                actor_restarts: RestartTracker::new(intensity),
                supervisor_restarts: 0,
            },
        );
        Ok(info)
    }

    /// Boots a stopped VM and makes running its desired state.
    async fn start(state: &mut HostState, name: &str) -> Result<VmInfo, HostError> {
        let actor = state.actor(name)?;
        let info = ractor::call_t!(actor, VmMsg::Start, CHILD_CALL_TIMEOUT.as_millis() as u64)
            .map_err(|e| unanswered(name, e))??;
        let entry = state.entry(name)?;
        entry.desired = DesiredState::Running;
        entry.last.info = info.clone();
        state.persist(name);
        Ok(info)
    }

    /// Shuts a VM down and makes stopped its desired state (written first, so that a host
    /// that dies during the shutdown does not boot it again).
    async fn stop(state: &mut HostState, name: &str) -> Result<VmInfo, HostError> {
        let actor = state.actor(name);
        state.entry(name)?.desired = DesiredState::Stopped;
        state.persist(name);
        let info = match actor {
            Ok(actor) => {
                let timeout = state.config.stop_timeout;
                let wait = timeout + Duration::from_secs(10);
                ractor::call_t!(actor, |reply| VmMsg::Stop { timeout, reply }, wait.as_millis() as u64)
                    .map_err(|e| unanswered(name, e))??
            }
            Err(HostError::GaveUp { .. }) => state.entry(name)?.last.info.clone(),
            Err(e) => return Err(e),
        };
        state.entry(name)?.last.info = info.clone();
        state.persist(name);
        Ok(info)
    }

    /// Stops a VM, stops its supervisor and forgets the VM.
    async fn delete(state: &mut HostState, name: &str) -> Result<VmInfo, HostError> {
        let info = Self::stop(state, name).await?;
        if let Some(store) = &state.store {
            store.delete_vm(name)?;
        }
        // Removed from the map first, so its supervisor's end is not taken for a failure.
        if let Some(actor) = state.vms.remove(name).and_then(|e| e.actor) {
            actor.stop(Some("VM deleted".into()));
        }
        state.event(name, EventKind::Deleted, "stopped and deleted".into());
        tracing::info!(vm = %name, "VM deleted");
        Ok(info)
    }

    async fn receive(
        myself: &ActorRef<HostMsg>,
        state: &mut HostState,
        spec: VmSpec,
        incoming: Incoming,
    ) -> Result<VmInfo, HostError> {
        let paths = state.admit(&spec)?;
        let from = incoming.listen.clone();
        let info =
            Self::start_entry(myself, state, spec.clone(), DesiredState::Running, paths, None, Some(incoming)).await?;
        tracing::info!(vm = %spec.name, listen = %from, "waiting for the VM to arrive");
        Ok(info)
    }

    async fn arrived(state: &mut HostState, name: &str) -> Result<VmInfo, HostError> {
        let actor = state.actor(name)?;
        let info = ractor::call_t!(actor, VmMsg::Arrived, CHILD_CALL_TIMEOUT.as_millis() as u64)
            .map_err(|e| unanswered(name, e))?;
        let entry = state.entry(name)?;
        entry.incoming = false;
        entry.last.info = info.clone();
        state.persist(name);
        state.event(name, EventKind::MigratedIn, "arrived by live migration".into());
        Ok(info)
    }

    async fn departed(state: &mut HostState, name: &str) -> Result<VmInfo, HostError> {
        let actor = state.actor(name)?;
        let info = ractor::call_t!(actor, VmMsg::GetInfo, CHILD_CALL_TIMEOUT.as_millis() as u64)
            .map_err(|e| unanswered(name, e))?;
        if info.pid.is_some() {
            return Err(HostError::Vm(VmError::Busy { name: name.into(), phase: info.phase, what: "forget" }));
        }
        if let Some(store) = &state.store {
            store.delete_vm(name)?;
        }
        if let Some(actor) = state.vms.remove(name).and_then(|e| e.actor) {
            actor.stop(Some("VM migrated away".into()));
        }
        state.event(name, EventKind::MigratedOut, "left by live migration".into());
        Ok(info)
    }

    fn events(state: &HostState, after: u64, limit: usize) -> Result<EventFeed, HostError> {
        // Subscribed first: an event between the read and the subscription is not lost
        // (a watcher skips what it has seen by sequence number).
        let receiver = state.events.subscribe();
        let past = match &state.store {
            Some(store) => store.events_after(after, limit)?,
            None => Vec::new(),
        };
        Ok(EventFeed { past, live: receiver })
    }

    /// A VmSupervisor died (`why`): restart it in adopt mode, within the restart intensity.
    async fn child_died(myself: &ActorRef<HostMsg>, state: &mut HostState, cell: &ActorCell, why: &str) {
        let Some(name) = state.name_of(cell.get_id()) else {
            return; // a VM that was stopped and removed on purpose
        };
        let config = state.config.clone();
        let Some(entry) = state.vms.get_mut(&name) else { return };
        entry.actor = None;
        // The intensity tracker sees every supervisor death as a failure.
        if entry.actor_restarts.on_exit(ProcessExit::Unknown, Instant::now()) == Decision::GiveUp {
            tracing::error!(
                vm = %name,
                "its supervisor failed {} times within {:?} ({why}); giving up on this VM",
                config.actor_restarts + 1,
                config.actor_restart_window
            );
            Self::give_up(entry);
            return;
        }
        entry.supervisor_restarts += 1;
        let adopt = entry.last.adopt();
        tracing::warn!(vm = %name, pid = ?adopt.pid, "its supervisor failed ({why}); restarting it to re-adopt the VM");
        match Self::spawn_vm(myself, &config, &entry.spec, &entry.paths, Some(adopt), None).await {
            Ok(actor) => entry.actor = Some(actor),
            Err(e) => {
                tracing::error!(vm = %name, "cannot restart its supervisor: {e}; giving up on this VM");
                Self::give_up(entry);
            }
        }
    }

    /// Takes back every VM of the store: a VMM process still running it is adopted (the
    /// guest never notices the host's restart); a VM whose process ended meanwhile goes to
    /// its restart policy as an exit while nobody watched.
    async fn readopt(myself: &ActorRef<HostMsg>, state: &mut HostState) -> Result<(), HostError> {
        let Some(store) = &state.store else { return Ok(()) };
        let records = store.list_vms()?;
        for record in records {
            let name = record.spec.name.clone();
            let paths = VmPaths::new(&state.config.runtime_dir, &record.spec);
            let phase = match (record.pid, record.desired) {
                (Some(_), _) => VmPhase::Running,
                (None, DesiredState::Running) => VmPhase::Starting,
                (None, DesiredState::Stopped) => VmPhase::Stopped,
            };
            let adopt = Adopt {
                pid: record.pid,
                phase,
                restarts: record.restarts,
                last_exit: None,
                tracker: RestartTracker::new(record.spec.restart),
            };
            match Self::start_entry(myself, state, record.spec.clone(), record.desired, paths, Some(adopt), None).await
            {
                Ok(info) => {
                    let same = info.pid.is_some() && info.pid == record.pid;
                    let what = match (same, record.pid) {
                        (true, _) => "re-adopted its running VMM process",
                        (false, Some(_)) => "its VMM process was gone",
                        (false, None) => "taken back",
                    };
                    tracing::info!(vm = %name, pid = ?info.pid, "{what}");
                    state.persist(&name);
                    state.event(&name, EventKind::Adopted, what.into());
                }
                Err(e) => {
                    tracing::error!(vm = %name, "cannot take the VM back: {e}");
                    state.event(&name, EventKind::Failed, format!("cannot take it back: {e}"));
                }
            }
        }
        Ok(())
    }

    /// No supervisor any more: kill its VMM (an unsupervised guest would hold capacity
    /// nobody can manage) and keep the entry, `Failed`, until `DeleteVm` removes it.
    fn give_up(entry: &mut VmEntry) {
        if let Some(pid) = entry.last.info.pid
            && VmmProcess::is_vmm_of(pid, &entry.paths.socket)
            && let Ok(process) = VmmProcess::adopt(pid)
        {
            let _ = process.signal(libc::SIGKILL);
        }
        entry.last.info.pid = None;
        entry.last.info.phase = VmPhase::Failed;
        entry.last.info.error = Some("its supervisor kept failing; the host gave up on it".into());
    }
}

impl Actor for HostSupervisor {
    type Msg = HostMsg;
    type State = HostState;
    type Arguments = HostConfig;

    async fn pre_start(&self, myself: ActorRef<HostMsg>, config: HostConfig) -> Result<HostState, ActorProcessingErr> {
        std::fs::create_dir_all(&config.runtime_dir)
            .map_err(|source| HostError::RuntimeDir { path: config.runtime_dir.clone(), source })?;
        if !config.vmm_binary.is_file() {
            return Err(HostError::VmmBinary(config.vmm_binary.clone()).into());
        }
        let capacity = match config.capacity {
            Some(c) => c,
            None => Capacity::from_proc()?,
        };
        tracing::info!(vcpus = capacity.vcpus, mem_mib = capacity.mem_mib, "host supervisor started");
        let store = config.data_dir.as_deref().map(Store::open).transpose()?;
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let mut state = HostState { config, capacity, vms: BTreeMap::new(), store, events, event_seq: 0 };
        Self::readopt(&myself, &mut state).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<HostMsg>,
        msg: HostMsg,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HostMsg::CreateVm(spec, reply) => {
                let _ = reply.send(Self::create(&myself, state, spec, true).await);
            }
            HostMsg::DefineVm(spec, reply) => {
                let _ = reply.send(Self::create(&myself, state, spec, false).await);
            }
            HostMsg::StartVm(name, reply) => {
                let _ = reply.send(Self::start(state, &name).await);
            }
            HostMsg::StopVm(name, reply) => {
                let _ = reply.send(Self::stop(state, &name).await);
            }
            HostMsg::DeleteVm(name, reply) => {
                let _ = reply.send(Self::delete(state, &name).await);
            }
            HostMsg::ReceiveVm { spec, incoming, reply } => {
                let _ = reply.send(Self::receive(&myself, state, spec, incoming).await);
            }
            HostMsg::Arrived(name, reply) => {
                let _ = reply.send(Self::arrived(state, &name).await);
            }
            HostMsg::Departed(name, reply) => {
                let _ = reply.send(Self::departed(state, &name).await);
            }
            HostMsg::Events { after, limit, reply } => {
                let _ = reply.send(Self::events(state, after, limit));
            }
            HostMsg::ListVms(reply) => {
                let _ = reply.send(state.vms.values().map(|e| e.last.info.clone()).collect());
            }
            HostMsg::GetVm(name, reply) => {
                let result = match state.actor(&name) {
                    // A supervisor that just died answers nothing until it is restarted:
                    // its last report stands in.
                    Ok(actor) => match ractor::call_t!(actor, VmMsg::GetInfo, CHILD_CALL_TIMEOUT.as_millis() as u64) {
                        Ok(info) => Ok(info),
                        Err(e) => state
                            .vms
                            .get(&name)
                            .map(|entry| entry.last.info.clone())
                            .ok_or_else(|| unanswered(&name, e)),
                    },
                    Err(HostError::GaveUp { .. }) => {
                        state.vms.get(&name).map(|e| e.last.info.clone()).ok_or(HostError::NotFound(name))
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            HostMsg::VmActor(name, reply) => {
                let _ = reply.send(state.actor(&name));
            }
            HostMsg::HostInfo(reply) => {
                let _ = reply.send(state.info());
            }
            HostMsg::VmChanged(report) => {
                let Some(entry) = state.vms.get_mut(&report.info.name) else { return Ok(()) };
                let before = std::mem::replace(&mut entry.last, report).info;
                let now = entry.last.info.clone();
                if now.pid != before.pid || now.restarts != before.restarts {
                    state.persist(&now.name);
                }
                if now.restarts > before.restarts {
                    let exit = now.last_exit.map_or_else(|| "an unknown exit".to_string(), |e| e.to_string());
                    state.event(&now.name, EventKind::Restarted, format!("restart {} after {exit}", now.restarts));
                }
                if let Some(kind) = phase_event(before.phase, now.phase) {
                    let message = match (&now.error, now.last_exit) {
                        (Some(error), _) => format!("{}: {error}", now.phase),
                        (None, Some(exit)) if kind != EventKind::Paused => format!("{} ({exit})", now.phase),
                        _ => now.phase.to_string(),
                    };
                    state.event(&now.name, kind, message);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<HostMsg>,
        event: SupervisionEvent,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        // Overridden on purpose: ractor's default stops the supervisor when a child fails.
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                Self::child_died(&myself, state, &cell, &format!("failed: {err}")).await;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let why = format!("terminated: {}", reason.as_deref().unwrap_or("no reason"));
                Self::child_died(&myself, state, &cell, &why).await;
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}
