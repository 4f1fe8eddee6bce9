//! `HostSupervisor`: one per host. It owns the host's VmSupervisors (spawned linked to it),
//! the host's capacity and the admission of new VMs, and restarts a VmSupervisor that
//! fails: the new one re-adopts the still-running VMM process, so the guest never notices.
//! Restarts of one VM's supervisor are bounded (`HostConfig::actor_restarts` within
//! `HostConfig::actor_restart_window`); past that the host gives that VM up.
//!
//! The host never waits on a VM in its own handlers: a request that needs a VmSupervisor's
//! answer (a stop lasts as long as the guest's shutdown, and a hung VMM as long as the
//! timeouts) asks it from a task beside the mailbox, and the answer comes back as a
//! [`HostMsg::Then`] that finishes the request inside the host. So `HostInfo` and `ListVms`
//! (the cluster's liveness poll) are answered at once whatever a VM does. A VmSupervisor is
//! started (or restarted, or re-adopts its VMM) the same way.
//!
//! `state.rs` holds what the host keeps of its VMs: their entries, their admission, and their
//! records in the state store.

use crate::process::VmmProcess;
use crate::spec::{SpecError, VmSpec};
use crate::store::{DesiredState, Event, EventKind, Store, StoreError, VmRecord};
use crate::supervisor::policy::{Decision, ProcessExit, RestartPolicy, RestartTracker};
use crate::vm::{Adopt, Incoming, VmError, VmInfo, VmMsg, VmPaths, VmPhase, VmReport, VmSupervisor, VmSupervisorArgs};
use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

mod state;
pub use state::HostState;
use state::{Supervisor, VmEntry};

/// Longest Unix socket path (`sun_path` is 108 bytes with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a VmSupervisor may take to answer the host.
const CHILD_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often records that could not be saved are tried again.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
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
    /// In a cluster: the host keeper's socket; every VMM then runs under its permits
    /// (`VmSupervisorArgs::keeper`).
    pub keeper: Option<PathBuf>,
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
            keeper: None,
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
    #[error("the supervisor of VM {0} is starting (taking its VMM process back); try again in a moment")]
    Restarting(String),
    #[error("the snapshot in {dir} was written of VM {of}, not of VM {name}; restore it into {of}")]
    SnapshotOf { dir: PathBuf, of: String, name: String },
    #[error(
        "VMM process {pid} serves {socket}, but this host knows no such VM: stop that process (kill {pid}) or choose another name"
    )]
    Orphan { pid: u32, socket: PathBuf },
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
    /// Continues a VM that has no process from the snapshot in `from`; from now on the host
    /// keeps it running. A snapshot the host wrote of another VM is refused.
    RestoreVm {
        name: String,
        from: PathBuf,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
    },
    /// A snapshot of VM `name` was written into `dir`: kept, so that it is restored into
    /// that VM only.
    SnapshotTaken {
        name: String,
        dir: PathBuf,
    },
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
    /// The rest of a request, once a VmSupervisor has answered it beside the mailbox.
    #[doc(hidden)]
    Then(Then),
    /// Tries the records that could not be saved again.
    #[doc(hidden)]
    Flush,
}

/// What a request does with a VmSupervisor's answer, inside the host.
pub struct Then(Box<dyn ThenFn>);

/// The body of a [`Then`].
pub trait ThenFn: FnOnce(&ActorRef<HostMsg>, &mut HostState) + Send {}
impl<F: FnOnce(&ActorRef<HostMsg>, &mut HostState) + Send> ThenFn for F {}

/// Answers `reply` with the error and returns, or goes on with the value.
macro_rules! or_reply {
    ($result:expr, $reply:expr) => {
        match $result {
            Ok(value) => value,
            Err(e) => {
                let _ = $reply.send(Err(e));
                return;
            }
        }
    };
}

/// The event a change of phase makes, if any (`Starting` and `Stopping` make none: the
/// outcome does).
fn phase_event(before: VmPhase, now: VmPhase) -> Option<EventKind> {
    match (before, now) {
        (b, n) if b == n => None,
        (VmPhase::Paused, VmPhase::Running) => Some(EventKind::Resumed),
        (_, VmPhase::Running) => Some(EventKind::Started),
        (_, VmPhase::Paused) => Some(EventKind::Paused),
        (_, VmPhase::Stopped) => Some(EventKind::Stopped),
        (_, VmPhase::Failed) => Some(EventKind::Failed),
        (_, VmPhase::Fenced) => Some(EventKind::Fenced),
        (_, VmPhase::Starting | VmPhase::Stopping) => None,
    }
}

fn unanswered(name: &str, e: impl std::fmt::Display) -> HostError {
    HostError::Unresponsive { name: name.to_string(), reason: e.to_string() }
}

/// Asks a VM's supervisor from a task beside the host's mailbox, and finishes with `then`
/// inside the host once it has answered (or `wait` has passed).
fn beside<T, M, F>(myself: &ActorRef<HostMsg>, name: &str, actor: ActorRef<VmMsg>, wait: Duration, msg: M, then: F)
where
    T: Send + 'static,
    M: FnOnce(RpcReplyPort<T>) -> VmMsg + Send + 'static,
    F: FnOnce(&ActorRef<HostMsg>, &mut HostState, Result<T, HostError>) + Send + 'static,
{
    let (me, name) = (myself.clone(), name.to_string());
    tokio::spawn(async move {
        let answer = ractor::call_t!(actor, msg, wait.as_millis() as u64).map_err(|e| unanswered(&name, e));
        // A host that stopped meanwhile drops `then`, and with it the caller's reply port.
        let _ = me.cast(HostMsg::Then(Then(Box::new(move |myself, state| then(myself, state, answer)))));
    });
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
            keeper: config.keeper.clone(),
        };
        // Unnamed: actor names are process-global, and several hosts may share a process.
        let (actor, _) = Actor::spawn_linked(None, VmSupervisor, args, myself.get_cell())
            .await
            .map_err(|e| HostError::Spawn { name: spec.name.clone(), reason: crate::error_chain(&e) })?;
        Ok(actor)
    }

    /// Admits `spec`, records it, and starts its supervisor: booting the VM when `start`,
    /// else holding it `Stopped`. A refusal or a failed start changes nothing; so does a
    /// record that cannot be saved.
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

    /// Starts a new VM's supervisor and takes it in (a fresh one starts at once: no VMM to
    /// wait for).
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
        let entry = VmEntry {
            desired,
            incoming: is_incoming,
            paths,
            supervisor: Supervisor::Running(actor),
            last: VmReport { info: info.clone(), tracker },
            actor_restarts: RestartTracker::new(Self::intensity(&state.config)),
            spec,
        };
        state.vms.insert(entry.spec.name.clone(), entry);
        Ok(info)
    }

    /// The restart intensity of a VM's supervisor, as a restart policy.
    fn intensity(config: &HostConfig) -> RestartPolicy {
        RestartPolicy::OnFailure {
            max_restarts: config.actor_restarts,
            window: config.actor_restart_window,
            backoff_initial: Duration::ZERO,
            backoff_max: Duration::ZERO,
        }
    }

    /// Asks VM `name`'s supervisor beside the mailbox, and answers `reply` with what
    /// `finish` makes of its answer, inside the host.
    fn relay<T, M, F>(
        myself: &ActorRef<HostMsg>,
        state: &HostState,
        (name, wait): (String, Duration),
        msg: M,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
        finish: F,
    ) where
        T: Send + 'static,
        M: FnOnce(RpcReplyPort<T>) -> VmMsg + Send + 'static,
        F: FnOnce(&mut HostState, &str, Result<T, HostError>) -> Result<VmInfo, HostError> + Send + 'static,
    {
        let actor = or_reply!(state.actor(&name), reply);
        let who = name.clone();
        beside(myself, &who, actor, wait, msg, move |_, state, answer| {
            let _ = reply.send(finish(state, &name, answer));
        });
    }

    /// Boots a stopped VM (or continues it from a snapshot) and makes running its desired
    /// state, saved first: a start that cannot be saved is refused.
    fn start(
        myself: &ActorRef<HostMsg>,
        state: &mut HostState,
        name: String,
        from: Option<PathBuf>,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
    ) {
        or_reply!(state.actor(&name), reply);
        if let (Some(from), Some(store)) = (&from, &state.store)
            && let Some(of) = or_reply!(store.snapshot_of(from).map_err(HostError::from), reply)
            && of != name
        {
            let _ = reply.send(Err(HostError::SnapshotOf { dir: from.clone(), of, name }));
            return;
        }
        let before = or_reply!(state.set_desired(&name, DesiredState::Running), reply);
        let finish = move |state: &mut HostState, name: &str, answer: Result<Result<VmInfo, VmError>, HostError>| {
            let result = answer.and_then(|r| r.map_err(HostError::from));
            match (&result, state.vms.get_mut(name)) {
                (Ok(info), Some(entry)) => entry.last.info = info.clone(),
                (Err(_), Some(entry)) => entry.desired = before,
                (_, None) => {}
            }
            state.persist(name);
            result
        };
        let call = (name, CHILD_CALL_TIMEOUT);
        match from {
            Some(from) => Self::relay(myself, state, call, |reply| VmMsg::Restore { from, reply }, reply, finish),
            None => Self::relay(myself, state, call, VmMsg::Start, reply, finish),
        }
    }

    /// Shuts a VM down; with `delete`, then forgets it. Its desired state becomes stopped
    /// first, saved (a host that dies during the shutdown does not boot it again; a stop
    /// that cannot be saved is refused and the VM runs on).
    fn stop(
        myself: &ActorRef<HostMsg>,
        state: &mut HostState,
        name: String,
        delete: bool,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
    ) {
        let gave_up = match state.actor(&name) {
            Ok(_) => false,
            Err(HostError::GaveUp { .. }) => true,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        or_reply!(state.set_desired(&name, DesiredState::Stopped), reply);
        if gave_up {
            let result = state.entry(&name).map(|e| e.last.info.clone());
            let _ = reply.send(result.and_then(|info| Self::stopped(state, &name, info, delete)));
            return;
        }
        let timeout = state.config.stop_timeout;
        let call = (name, timeout + crate::vm::STOP_OVERHEAD);
        let msg = move |reply| VmMsg::Stop { timeout, reply };
        Self::relay(myself, state, call, msg, reply, move |state, name, answer| {
            let info = answer?.map_err(HostError::from)?;
            Self::stopped(state, name, info, delete)
        });
    }

    /// The end of a stop: the VM's info kept, and with `delete` the VM forgotten (a
    /// deletion that cannot be saved is an error; the VM stays, stopped).
    fn stopped(state: &mut HostState, name: &str, info: VmInfo, delete: bool) -> Result<VmInfo, HostError> {
        state.entry(name)?.last.info = info.clone();
        if !delete {
            state.persist(name);
            return Ok(info);
        }
        if let Some(store) = &state.store {
            store.delete_vm(name)?;
        }
        Self::forget(state, name, "VM deleted");
        state.event(name, EventKind::Deleted, "stopped and deleted".into());
        tracing::info!(vm = %name, "VM deleted");
        Ok(info)
    }

    /// Removes a VM from the host (removed from the map first, so that its supervisor's
    /// end is not taken for a failure).
    fn forget(state: &mut HostState, name: &str, why: &str) {
        state.unsaved.remove(name);
        if let Some(VmEntry { supervisor: Supervisor::Running(actor), .. }) = state.vms.remove(name) {
            actor.stop(Some(why.into()));
        }
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

    fn arrived(
        myself: &ActorRef<HostMsg>,
        state: &HostState,
        name: String,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
    ) {
        let call = (name, CHILD_CALL_TIMEOUT * 2);
        Self::relay(myself, state, call, VmMsg::Arrived, reply, |state, name, answer| {
            let info = answer?;
            let entry = state.entry(name)?;
            entry.incoming = false;
            entry.last.info = info.clone();
            state.save(name)?;
            state.event(name, EventKind::MigratedIn, "arrived by live migration".into());
            Ok(info)
        });
    }

    fn departed(
        myself: &ActorRef<HostMsg>,
        state: &HostState,
        name: String,
        reply: RpcReplyPort<Result<VmInfo, HostError>>,
    ) {
        Self::relay(myself, state, (name, CHILD_CALL_TIMEOUT), VmMsg::GetInfo, reply, |state, name, answer| {
            let info = answer?;
            if info.pid.is_some() {
                return Err(HostError::Vm(VmError::Busy { name: name.into(), phase: info.phase, what: "forget" }));
            }
            if let Some(store) = &state.store {
                store.delete_vm(name)?;
            }
            Self::forget(state, name, "VM migrated away");
            state.event(name, EventKind::MigratedOut, "left by live migration".into());
            Ok(info)
        });
    }

    /// One VM, fresh from its supervisor (asked from a task); its last report while the
    /// supervisor does not answer, is starting, or was given up.
    fn get_vm(state: &HostState, name: String, reply: RpcReplyPort<Result<VmInfo, HostError>>) {
        let Some(last) = state.vms.get(&name).map(|e| e.last.info.clone()) else {
            let _ = reply.send(Err(HostError::NotFound(name)));
            return;
        };
        let Ok(actor) = state.actor(&name) else {
            let _ = reply.send(Ok(last));
            return;
        };
        tokio::spawn(async move {
            let info = ractor::call_t!(actor, VmMsg::GetInfo, CHILD_CALL_TIMEOUT.as_millis() as u64).unwrap_or(last);
            let _ = reply.send(Ok(info));
        });
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

    /// A VM's supervisor ended (`why`): started again in adopt mode, within the restart
    /// intensity; past it, the host gives the VM up.
    fn restart_supervisor(myself: &ActorRef<HostMsg>, state: &mut HostState, name: &str, why: &str) {
        let config = state.config.clone();
        let Some(entry) = state.vms.get_mut(name) else { return };
        entry.supervisor = Supervisor::Starting;
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
        let adopt = entry.last.adopt();
        tracing::warn!(vm = %name, pid = ?adopt.pid, "its supervisor failed ({why}); restarting it to re-adopt the VM");
        Self::start_supervisor(myself, &config, entry, adopt, false);
    }

    /// Starts a VM's supervisor in adopt mode from a task (adopting waits on the VMM's
    /// control socket, up to `vm::ADOPT_TIMEOUT` for a VMM that does not answer); the
    /// supervisor is the VM's once `supervisor_started` runs.
    fn start_supervisor(myself: &ActorRef<HostMsg>, config: &HostConfig, entry: &VmEntry, adopt: Adopt, readopt: bool) {
        let (me, config, spec, paths) = (myself.clone(), config.clone(), entry.spec.clone(), entry.paths.clone());
        let hint = adopt.pid;
        tokio::spawn(async move {
            let started = match Self::spawn_vm(&me, &config, &spec, &paths, Some(adopt), None).await {
                Ok(actor) => match ractor::call_t!(actor, VmMsg::GetInfo, CHILD_CALL_TIMEOUT.as_millis() as u64) {
                    Ok(info) => Ok((actor, info)),
                    Err(e) => {
                        actor.stop(None);
                        Err(unanswered(&spec.name, e))
                    }
                },
                Err(e) => Err(e),
            };
            let then = move |myself: &ActorRef<HostMsg>, state: &mut HostState| {
                Self::supervisor_started(myself, state, &spec.name, started, hint, readopt);
            };
            let _ = me.cast(HostMsg::Then(Then(Box::new(then))));
        });
    }

    fn supervisor_started(
        myself: &ActorRef<HostMsg>,
        state: &mut HostState,
        name: &str,
        started: Result<(ActorRef<VmMsg>, VmInfo), HostError>,
        hint: Option<u32>,
        readopt: bool,
    ) {
        let Some(entry) = state.vms.get_mut(name) else {
            if let Ok((actor, _)) = started {
                actor.stop(Some("VM deleted".into()));
            }
            return;
        };
        match started {
            // It ended before the host took it (its end was not known as this VM's yet).
            Ok((actor, _)) if matches!(actor.get_status(), ActorStatus::Stopping | ActorStatus::Stopped) => {
                Self::restart_supervisor(myself, state, name, "it ended right after it started");
            }
            Ok((actor, info)) => {
                entry.supervisor = Supervisor::Running(actor);
                if readopt {
                    let what = match (info.pid.is_some() && info.pid == hint, hint) {
                        (true, _) => "re-adopted its running VMM process",
                        (false, Some(_)) => "its VMM process was gone",
                        (false, None) => "taken back",
                    };
                    tracing::info!(vm = %name, pid = ?info.pid, "{what}");
                    state.persist(name);
                    state.event(name, EventKind::Adopted, what.into());
                }
            }
            Err(e) => {
                tracing::error!(vm = %name, "cannot start its supervisor: {e}; giving up on this VM");
                Self::give_up(entry);
                if readopt {
                    state.event(name, EventKind::Failed, format!("cannot take it back: {e}"));
                }
            }
        }
    }

    /// Takes back every VM of the store, each from a task: a VMM process still running it
    /// is adopted (the guest never notices the host's restart); a VM whose process ended
    /// meanwhile goes to its restart policy as an exit while nobody watched. Until its
    /// supervisor runs, a VM is listed as the store last knew it, or as starting if its
    /// process is gone. VMMs in the runtime
    /// directory that no VM of the store names are reported.
    fn readopt(myself: &ActorRef<HostMsg>, state: &mut HostState) -> Result<(), HostError> {
        let Some(store) = &state.store else { return Ok(()) };
        let records = store.list_vms()?;
        for record in records {
            let paths = VmPaths::new(&state.config.runtime_dir, &record.spec);
            // Listed as running only while that process still serves the VM: one that
            // ended while nobody watched is listed as starting until its policy decides.
            let alive = record.pid.filter(|pid| VmmProcess::is_vmm_of(*pid, &paths.socket));
            let phase = match (alive, record.desired) {
                (Some(_), _) => VmPhase::Running,
                (None, DesiredState::Running) => VmPhase::Starting,
                (None, DesiredState::Stopped) => VmPhase::Stopped,
            };
            let tracker = RestartTracker::new(record.spec.restart);
            let adopt =
                Adopt { pid: record.pid, phase, restarts: record.restarts, last_exit: None, tracker: tracker.clone() };
            let info = VmInfo {
                name: record.spec.name.clone(),
                phase,
                pid: alive,
                restarts: record.restarts,
                last_exit: None,
                error: None,
                socket: paths.socket.clone(),
                serial_log: paths.serial.clone(),
                spec: record.spec.clone(),
                receiving: false,
            };
            let entry = VmEntry {
                spec: record.spec,
                desired: record.desired,
                incoming: false,
                paths,
                supervisor: Supervisor::Starting,
                last: VmReport { info, tracker },
                actor_restarts: RestartTracker::new(Self::intensity(&state.config)),
            };
            Self::start_supervisor(myself, &state.config, &entry, adopt, true);
            state.vms.insert(entry.spec.name.clone(), entry);
        }
        let known: BTreeSet<&Path> = state.vms.values().map(|e| e.paths.socket.as_path()).collect();
        for (pid, socket) in VmmProcess::running_in(&state.config.runtime_dir) {
            if !known.contains(socket.as_path()) {
                tracing::error!(
                    pid,
                    socket = %socket.display(),
                    "a VMM process runs that no VM of the state store names: nobody supervises it; stop it (kill {pid}) or restore the store it belongs to"
                );
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
        entry.supervisor = Supervisor::GaveUp;
        entry.last.info.pid = None;
        entry.last.info.phase = VmPhase::Failed;
        entry.last.info.error = Some("its supervisor kept failing; the host gave up on it".into());
    }

    fn vm_changed(state: &mut HostState, report: VmReport) {
        let Some(entry) = state.vms.get_mut(&report.info.name) else { return };
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

impl Actor for HostSupervisor {
    type Msg = HostMsg;
    type State = HostState;
    type Arguments = HostConfig;

    async fn pre_start(&self, myself: ActorRef<HostMsg>, config: HostConfig) -> Result<HostState, ActorProcessingErr> {
        create_runtime_dir(&config.runtime_dir)?;
        if !config.vmm_binary.is_file() {
            return Err(HostError::VmmBinary(config.vmm_binary.clone()).into());
        }
        let capacity = match config.capacity {
            Some(c) => c,
            None => Capacity::from_proc()?,
        };
        tracing::info!(vcpus = capacity.vcpus, mem_mib = capacity.mem_mib, "host supervisor started");
        let store = config.data_dir.as_deref().map(Store::open).transpose()?;
        if store.is_some() {
            myself.send_interval(FLUSH_EVERY, || HostMsg::Flush);
        }
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let mut state =
            HostState { config, capacity, vms: BTreeMap::new(), store, events, event_seq: 0, unsaved: BTreeSet::new() };
        Self::readopt(&myself, &mut state)?;
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
            HostMsg::StartVm(name, reply) => Self::start(&myself, state, name, None, reply),
            HostMsg::RestoreVm { name, from, reply } => Self::start(&myself, state, name, Some(from), reply),
            HostMsg::StopVm(name, reply) => Self::stop(&myself, state, name, false, reply),
            HostMsg::DeleteVm(name, reply) => Self::stop(&myself, state, name, true, reply),
            HostMsg::SnapshotTaken { name, dir } => {
                if let Some(store) = &state.store
                    && let Err(e) = store.put_snapshot(&dir, &name)
                {
                    tracing::error!(vm = %name, dir = %dir.display(), "cannot record whose snapshot it is: {}", crate::error_chain(&e));
                }
            }
            HostMsg::ReceiveVm { spec, incoming, reply } => {
                let _ = reply.send(Self::receive(&myself, state, spec, incoming).await);
            }
            HostMsg::Arrived(name, reply) => Self::arrived(&myself, state, name, reply),
            HostMsg::Departed(name, reply) => Self::departed(&myself, state, name, reply),
            HostMsg::Events { after, limit, reply } => {
                let _ = reply.send(Self::events(state, after, limit));
            }
            HostMsg::ListVms(reply) => {
                let _ = reply.send(state.vms.values().map(|e| e.last.info.clone()).collect());
            }
            HostMsg::GetVm(name, reply) => Self::get_vm(state, name, reply),
            HostMsg::VmActor(name, reply) => {
                let _ = reply.send(state.actor(&name));
            }
            HostMsg::HostInfo(reply) => {
                let _ = reply.send(state.info());
            }
            HostMsg::VmChanged(report) => Self::vm_changed(state, report),
            HostMsg::Then(Then(then)) => then(&myself, state),
            HostMsg::Flush => state.flush(),
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
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("terminated: {}", reason.as_deref().unwrap_or("no reason")))
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => return Ok(()),
        };
        // A VM that was stopped and removed on purpose is not in the map any more.
        if let Some(name) = state.name_of(cell.get_id()) {
            Self::restart_supervisor(&myself, state, &name, &why);
        }
        Ok(())
    }
}

/// The runtime directory, readable by the daemon's user only: it holds the VMs' control
/// sockets (whoever can connect commands the VMM), consoles and logs.
fn create_runtime_dir(dir: &Path) -> Result<(), HostError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| HostError::RuntimeDir { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)
}
