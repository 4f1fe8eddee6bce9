//! `VmSupervisor`: one actor per VM. It owns the VM's `novacron-vmm` process (started in a
//! session of its own), talks to it over its control socket, watches it through a pidfd and
//! restarts it by the VM's [`RestartPolicy`](crate::RestartPolicy). Started with
//! [`Adopt`], it takes over a VMM process that is already running (after this actor
//! crashed and its HostSupervisor restarted it) without touching the guest.

use crate::host::HostMsg;
use crate::process::{Launch, ProcessError, VmmProcess, api_call};
use crate::spec::VmSpec;
use crate::supervisor::policy::{Decision, ProcessExit, RestartTracker};
use novacron_vmm::api::client::ClientError;
use novacron_vmm::api::{ApiError, Request, Response, VmState};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a new VMM process may take to answer `status` on its control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a re-adoption waits for the control socket of the running process.
pub const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one control socket request.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// After `Stop`'s own timeout ran out and SIGKILL was sent: how long to wait for the end.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How much longer than its own timeout a `Stop` may take to answer: the shutdown request,
/// the wait after SIGKILL, and a margin.
pub const STOP_OVERHEAD: Duration = Duration::from_secs(5 + 5 + 5);

/// Where a VM's files live: `<runtime dir>/<name>.sock`, `.serial` and `.vmm.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub socket: PathBuf,
    pub serial: PathBuf,
    /// The VMM process's stderr, appended to across restarts.
    pub log: PathBuf,
}

impl VmPaths {
    pub fn new(runtime_dir: &Path, spec: &VmSpec) -> Self {
        VmPaths {
            socket: runtime_dir.join(format!("{}.sock", spec.name)),
            serial: spec.serial_log.clone().unwrap_or_else(|| runtime_dir.join(format!("{}.serial", spec.name))),
            log: runtime_dir.join(format!("{}.vmm.log", spec.name)),
        }
    }
}

/// The life of a VM as its supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPhase {
    /// A VMM process is starting (or will start after the restart backoff).
    Starting,
    Running,
    Paused,
    /// Its VMM runs but has no run permit from the host's keeper (the host has no lease in
    /// the cluster store, or the cluster moved the VM away): the guest is paused by itself,
    /// and goes on once permitted.
    Fenced,
    /// Its VMM is being shut down (`Stop`); `Stopped` once it has ended.
    Stopping,
    /// No process: it was stopped or powered off, and the policy does not restart it.
    Stopped,
    /// No process: it failed and the policy gave up (or it could not be started).
    Failed,
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmPhase::Starting => "starting",
            VmPhase::Running => "running",
            VmPhase::Paused => "paused",
            VmPhase::Fenced => "fenced",
            VmPhase::Stopping => "stopping",
            VmPhase::Stopped => "stopped",
            VmPhase::Failed => "failed",
        })
    }
}

/// What `GetInfo` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub phase: VmPhase,
    /// The VMM process, while there is one.
    pub pid: Option<u32>,
    /// Process restarts made by the restart policy since the VM was created.
    pub restarts: u32,
    pub last_exit: Option<ProcessExit>,
    /// Why the VM is `Failed`, when it is not only its exit.
    pub error: Option<String>,
    pub socket: PathBuf,
    pub serial_log: PathBuf,
    pub spec: VmSpec,
    /// It came as the destination of a live migration that has not completed here
    /// (`Arrived`): still receiving, or failed receiving.
    pub receiving: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM {name} is {phase}, so it has no VMM process to ask")]
    NotRunning { name: String, phase: VmPhase },
    #[error("the VMM of VM {name} refused the request")]
    Refused {
        name: String,
        #[source]
        source: ApiError,
    },
    #[error("cannot reach the VMM of VM {name}")]
    Control {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("cannot start VM {name}: {reason}")]
    Start { name: String, reason: String },
    #[error("cannot {what} VM {name} while it is {phase}; stop it first")]
    Busy { name: String, phase: VmPhase, what: &'static str },
    #[error("VM {name} is stopping; wait for its stop to end, then try again")]
    Stopping { name: String },
    #[error(
        "cannot re-adopt the VMM process {pid} of VM {name}: {reason}; stop that process by hand if it is still running"
    )]
    Adopt { name: String, pid: u32, reason: String },
    #[error("VMM process of VM {name}")]
    Process {
        name: String,
        #[source]
        source: ProcessError,
    },
}

/// The running process the HostSupervisor hands to a restarted VmSupervisor, with the
/// history that must survive the restart.
#[derive(Debug, Clone)]
pub struct Adopt {
    /// The VMM process to adopt; `None` when there was none (stopped, failed, or waiting
    /// for a restart).
    pub pid: Option<u32>,
    pub phase: VmPhase,
    pub restarts: u32,
    pub last_exit: Option<ProcessExit>,
    pub tracker: RestartTracker,
}

/// What a VmSupervisor tells its HostSupervisor after every change: enough to restart it
/// in adopt mode.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub info: VmInfo,
    pub tracker: RestartTracker,
}

impl Adopt {
    /// A VM defined but not started: no process, and the supervisor starts none.
    pub fn stopped(policy: crate::RestartPolicy) -> Self {
        Adopt { pid: None, phase: VmPhase::Stopped, restarts: 0, last_exit: None, tracker: RestartTracker::new(policy) }
    }
}

impl VmReport {
    pub fn adopt(&self) -> Adopt {
        Adopt {
            pid: self.info.pid,
            phase: self.info.phase,
            restarts: self.info.restarts,
            last_exit: self.info.last_exit,
            tracker: self.tracker.clone(),
        }
    }
}

pub struct VmSupervisorArgs {
    pub spec: VmSpec,
    pub paths: VmPaths,
    pub vmm_binary: PathBuf,
    pub adopt: Option<Adopt>,
    /// Gets a [`VmReport`] after every change.
    pub host: Option<ActorRef<HostMsg>>,
    /// Start the VMM as the destination of a live migration instead of booting.
    pub incoming: Option<Incoming>,
    /// In a cluster: the host keeper's socket. Every VMM then runs its guest only under
    /// the keeper's run permits (`--require-permit`), and a migration's destination asks
    /// the keeper to claim the VM at the commit (`--claim-from`).
    pub keeper: Option<PathBuf>,
}

/// A VM arriving by live migration: its VMM listens on `listen` (QUIC) with the
/// certificates of `tls_dir`. Until [`VmMsg::Arrived`] the VM is not this host's to run:
/// its VMM ending is a failed migration, never restarted.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub listen: String,
    pub tls_dir: PathBuf,
}

// The hidden variants are internal messages and a test hook, not a non-exhaustive marker.
#[allow(clippy::manual_non_exhaustive)]
pub enum VmMsg {
    GetInfo(RpcReplyPort<VmInfo>),
    Pause(RpcReplyPort<Result<VmInfo, VmError>>),
    Resume(RpcReplyPort<Result<VmInfo, VmError>>),
    /// Starts a `Stopped` or `Failed` VM again (a fresh boot); a VM that has a process
    /// already is left as it is.
    Start(RpcReplyPort<Result<VmInfo, VmError>>),
    /// Shuts the guest down through the control socket; SIGKILL if it has not ended after
    /// `timeout`. The VM stays `Stopped` (the policy does not restart it).
    Stop {
        timeout: Duration,
        reply: RpcReplyPort<Result<VmInfo, VmError>>,
    },
    /// Boots a `Stopped` or `Failed` VM from the snapshot in `from` instead of its spec
    /// (later restarts boot from the spec).
    Restore {
        from: PathBuf,
        reply: RpcReplyPort<Result<VmInfo, VmError>>,
    },
    /// Sends `request` to the VMM's control socket and answers its response. The call runs
    /// beside the actor (a snapshot or a migration takes a while; `GetInfo` and the rest
    /// are answered meanwhile). A `Snapshot { paused: true }` leaves the phase `Paused`.
    Control {
        request: Request,
        timeout: Duration,
        reply: RpcReplyPort<Result<Response, VmError>>,
    },
    /// The incoming migration completed: the VM is this host's now, under its restart
    /// policy (a restart boots it from its spec).
    Arrived(RpcReplyPort<VmInfo>),
    /// Tests only: panics inside the actor.
    #[doc(hidden)]
    Crash,
    /// A `Migrate` control request failed: the VM stays here after all.
    #[doc(hidden)]
    StayedAfterAll {
        generation: u64,
    },
    /// A `Control` request that pauses the VM succeeded for the process of `generation`.
    #[doc(hidden)]
    PausedBy {
        generation: u64,
    },
    /// The rest of a request whose VMM call ran beside the actor.
    #[doc(hidden)]
    Then(VmThen),
    /// The process of `generation` has ended.
    #[doc(hidden)]
    Exited {
        generation: u64,
    },
    /// The process of `generation` answered its control socket.
    #[doc(hidden)]
    Ready {
        generation: u64,
        phase: VmPhase,
    },
    /// The VMM of `generation` changed its run state by itself (its permit).
    #[doc(hidden)]
    RunState {
        generation: u64,
        phase: VmPhase,
    },
    #[doc(hidden)]
    StartTimedOut {
        generation: u64,
    },
    /// The restart backoff of `generation` is over.
    #[doc(hidden)]
    RestartNow {
        generation: u64,
    },
}

/// What a request does with its VMM's answer, inside the VM's supervisor.
pub struct VmThen(Box<dyn FnOnce(&mut VmSupervisorState) + Send>);

/// Hands `then` back to the actor `me` (a VMM call ran beside it).
fn then(me: &ActorRef<VmMsg>, then: impl FnOnce(&mut VmSupervisorState) + Send + 'static) {
    // An actor that ended meanwhile drops `then`, and with it the caller's reply port.
    let _ = me.cast(VmMsg::Then(VmThen(Box::new(then))));
}

/// A task that is cancelled with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Running {
    process: VmmProcess,
    /// The exit watcher and the start probe; they die with the process record, so a
    /// crashed supervisor leaves nothing behind that could race its successor.
    _tasks: Vec<AbortOnDrop>,
}

/// A `Stop` under way: its VMM is being shut down from a task.
struct Stopping {
    pid: u32,
    /// Every `Stop` asked meanwhile; all are answered when the VMM has ended.
    replies: Vec<RpcReplyPort<Result<VmInfo, VmError>>>,
    _task: AbortOnDrop,
}

pub struct VmSupervisorState {
    spec: VmSpec,
    paths: VmPaths,
    launch: Launch,
    phase: VmPhase,
    restarts: u32,
    tracker: RestartTracker,
    last_exit: Option<ProcessExit>,
    error: Option<String>,
    /// Counts process starts and ends; messages of an older generation are stale.
    generation: u64,
    process: Option<Running>,
    stopping: Option<Stopping>,
    /// Adopt found the process gone, with this exit: the policy decides in `post_start`.
    ended_while_away: Option<ProcessExit>,
    host: Option<ActorRef<HostMsg>>,
    reported: Option<VmInfo>,
    /// Arriving by migration (see [`Incoming`]).
    incoming: Option<Incoming>,
    /// Migrating away: the VMM's end is the migration's success, not a failure.
    leaving: bool,
    keeper: Option<PathBuf>,
}

impl VmSupervisorState {
    fn info(&self) -> VmInfo {
        VmInfo {
            name: self.spec.name.clone(),
            phase: self.phase,
            pid: self.process.as_ref().map(|r| r.process.pid()).or(self.stopping.as_ref().map(|s| s.pid)),
            restarts: self.restarts,
            last_exit: self.last_exit,
            error: self.error.clone(),
            socket: self.paths.socket.clone(),
            serial_log: self.paths.serial.clone(),
            spec: self.spec.clone(),
            receiving: self.incoming.is_some(),
        }
    }

    /// Tells the host what changed (nothing when nothing did).
    fn report(&mut self) {
        let info = self.info();
        if self.reported.as_ref() == Some(&info) {
            return;
        }
        if let Some(host) = &self.host {
            let _ = host.cast(HostMsg::VmChanged(VmReport { info: info.clone(), tracker: self.tracker.clone() }));
        }
        self.reported = Some(info);
    }

    fn not_running(&self) -> VmError {
        VmError::NotRunning { name: self.spec.name.clone(), phase: self.phase }
    }
}

fn control_error(name: &str, e: ClientError) -> VmError {
    match e {
        ClientError::Refused(source) => VmError::Refused { name: name.to_string(), source },
        source => VmError::Control { name: name.to_string(), source },
    }
}

/// Under a keeper, the VMM runs only with its permits.
fn permit_args(args: &mut Vec<std::ffi::OsString>, keeper: Option<&Path>) {
    if keeper.is_some() {
        args.push("--require-permit".into());
    }
}

fn launch(spec: &VmSpec, paths: &VmPaths, binary: &Path, keeper: Option<&Path>) -> Launch {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--vcpus".into(),
        spec.vcpus.to_string().into(),
        "--mem".into(),
        spec.mem_mib.to_string().into(),
        "--api-sock".into(),
        paths.socket.clone().into(),
        "--serial-file".into(),
        paths.serial.clone().into(),
    ];
    if let Some(kernel) = &spec.kernel {
        args.extend(["--kernel".into(), kernel.clone().into()]);
    }
    if !spec.cmdline.is_empty() {
        args.extend(["--cmdline".into(), spec.cmdline.clone().into()]);
    }
    permit_args(&mut args, keeper);
    Launch { binary: binary.to_owned(), args, log: paths.log.clone() }
}

/// The same VM continued from the snapshot in `from` (its shape comes from the snapshot).
fn restore_launch(paths: &VmPaths, binary: &Path, from: &Path, keeper: Option<&Path>) -> Launch {
    let mut args = vec![
        "--api-sock".into(),
        paths.socket.clone().into(),
        "--serial-file".into(),
        paths.serial.clone().into(),
        "--restore-from".into(),
        from.into(),
    ];
    permit_args(&mut args, keeper);
    Launch { binary: binary.to_owned(), args, log: paths.log.clone() }
}

/// The VM as the destination of a live migration (its shape comes from the source).
fn receive_launch(paths: &VmPaths, binary: &Path, incoming: &Incoming, keeper: Option<&Path>) -> Launch {
    let mut args = vec![
        "--api-sock".into(),
        paths.socket.clone().into(),
        "--serial-file".into(),
        paths.serial.clone().into(),
        "--receive-on".into(),
        incoming.listen.clone().into(),
        "--tls-dir".into(),
        incoming.tls_dir.clone().into(),
    ];
    permit_args(&mut args, keeper);
    if let Some(keeper) = keeper {
        args.extend(["--claim-from".into(), keeper.into()]);
    }
    Launch { binary: binary.to_owned(), args, log: paths.log.clone() }
}

/// The VMM truncates its serial file when it starts: keep the previous boot's console as
/// `<serial>.prev` so a crash's last words survive the restart. The new one is made here,
/// readable by the daemon's user only (the VMM opens it as it is).
fn rotate_serial(serial: &Path) {
    if serial.exists() {
        let mut prev = serial.as_os_str().to_owned();
        prev.push(".prev");
        if let Err(e) = std::fs::rename(serial, &prev) {
            tracing::warn!("cannot keep the previous serial log {}: {e}", serial.display());
        }
    }
    if let Err(e) = crate::process::private_file(serial, true) {
        tracing::warn!("cannot make the serial log {}: {e}", serial.display());
    }
}

/// Watches `process` for its end and tells the actor.
fn watch_exit(myself: &ActorRef<VmMsg>, process: &VmmProcess, generation: u64) -> Result<AbortOnDrop, ProcessError> {
    let exited = process.exited().map_err(|source| ProcessError::Pidfd { pid: process.pid(), source })?;
    let me = myself.clone();
    Ok(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = exited.await {
            tracing::warn!("cannot watch the VMM process: {e}; treating it as ended");
        }
        let _ = me.cast(VmMsg::Exited { generation });
    })))
}

/// Asks the new process's control socket for its state until it answers.
fn probe_start(myself: &ActorRef<VmMsg>, socket: PathBuf, generation: u64) -> AbortOnDrop {
    let me = myself.clone();
    AbortOnDrop(tokio::spawn(async move {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(resp) = api_call(&socket, Request::Status, CALL_TIMEOUT).await
                && let Some(status) = resp.status
            {
                let _ = me.cast(VmMsg::Ready { generation, phase: phase_of(&status) });
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = me.cast(VmMsg::StartTimedOut { generation });
    }))
}

/// The exit status of `pid` if it is a zombie child of ours (its supervisor died before
/// reaping it); otherwise unknown.
fn reap_zombie(pid: u32) -> ProcessExit {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state is the field after the parenthesised command name.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    match VmmProcess::adopt(pid) {
        Ok(process) if zombie => process.reap().unwrap_or(ProcessExit::Unknown),
        _ => ProcessExit::Unknown,
    }
}

fn phase_of(status: &novacron_vmm::api::VmStatus) -> VmPhase {
    match status.state {
        _ if status.permit.is_some_and(|p| p.fenced) => VmPhase::Fenced,
        VmState::Running => VmPhase::Running,
        VmState::Paused => VmPhase::Paused,
    }
}

/// Whether a VM in `phase` has a VMM that answers (to pause, resume, snapshot, migrate).
fn answering(phase: VmPhase) -> bool {
    matches!(phase, VmPhase::Running | VmPhase::Paused | VmPhase::Fenced)
}

/// Follows the VMM's run state (fenced, permitted, paused, resumed: the VMM changes it by
/// itself under a permit) through its `watch` connection, for as long as it runs.
fn watch_run_state(myself: &ActorRef<VmMsg>, socket: PathBuf, generation: u64) -> AbortOnDrop {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let me = myself.clone();
    AbortOnDrop(tokio::spawn(async move {
        let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else { return };
        let (read, mut write) = stream.into_split();
        if write.write_all(b"{\"version\":1,\"op\":\"watch\"}\n").await.is_err() {
            return;
        }
        let mut lines = tokio::io::BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(response) = novacron_vmm::api::client::parse_response(&line)
                && let Some(status) = response.status
            {
                let _ = me.cast(VmMsg::RunState { generation, phase: phase_of(&status) });
            }
        }
    }))
}

/// `shutdown` through the control socket; SIGKILL if the VMM still runs `timeout` later.
/// Answers its exit, if it could be collected.
async fn shut_down(name: &str, socket: &Path, process: &VmmProcess, timeout: Duration) -> Option<ProcessExit> {
    if let Err(e) = api_call(socket, Request::Shutdown, CALL_TIMEOUT).await {
        tracing::warn!(vm = %name, "shutdown request failed ({e}); will kill the process");
    }
    if !process.wait_exited(timeout).await {
        tracing::warn!(vm = %name, "VMM still running {timeout:?} after shutdown; sending SIGKILL");
        if let Err(e) = process.signal(libc::SIGKILL) {
            tracing::error!(vm = %name, "{e}");
        }
        process.wait_exited(KILL_WAIT).await;
    }
    process.reap()
}

pub struct VmSupervisor;

impl VmSupervisor {
    fn start_process(myself: &ActorRef<VmMsg>, state: &mut VmSupervisorState, restore: Option<&Path>) {
        state.generation += 1;
        rotate_serial(&state.paths.serial);
        let launch = match (restore, &state.incoming) {
            (Some(from), _) => restore_launch(&state.paths, &state.launch.binary, from, state.keeper.as_deref()),
            (None, Some(incoming)) => {
                receive_launch(&state.paths, &state.launch.binary, incoming, state.keeper.as_deref())
            }
            (None, None) => state.launch.clone(),
        };
        let started = VmmProcess::spawn(&launch).and_then(|process| {
            let mut tasks = vec![watch_exit(myself, &process, state.generation)?];
            // A receiving VMM answers its socket only once the VM has arrived, however long
            // the migration takes: `Arrived` asks it then.
            if state.incoming.is_none() {
                tasks.push(probe_start(myself, state.paths.socket.clone(), state.generation));
            }
            Ok(Running { process, _tasks: tasks })
        });
        match started {
            Ok(running) => {
                tracing::info!(vm = %state.spec.name, pid = running.process.pid(), "VMM process started");
                state.phase = VmPhase::Starting;
                state.error = None;
                state.process = Some(running);
            }
            Err(e) => {
                tracing::error!(vm = %state.spec.name, "cannot start the VMM process: {e}");
                state.phase = VmPhase::Failed;
                state.error = Some(crate::error_chain(&e));
            }
        }
    }

    /// The process is gone with `exit`: the policy decides what follows.
    fn after_exit(myself: &ActorRef<VmMsg>, state: &mut VmSupervisorState, exit: ProcessExit) {
        state.process = None;
        state.generation += 1;
        state.last_exit = Some(exit);
        if state.leaving {
            tracing::info!(vm = %state.spec.name, "VMM process {exit} after migrating the VM away");
            state.phase = VmPhase::Stopped;
            return;
        }
        if state.incoming.is_some() {
            tracing::warn!(vm = %state.spec.name, "the receiving VMM {exit}: the migration failed");
            state.phase = VmPhase::Failed;
            state.error = Some(format!("the incoming migration failed: its VMM {exit}"));
            return;
        }
        if exit == ProcessExit::Code(novacron_vmm::runtime::EVICTED_EXIT_CODE) {
            // Its host's keeper found another host owning the VM: a restart would be a copy.
            tracing::warn!(vm = %state.spec.name, "VMM process evicted: another host owns the VM now; not restarted");
            state.phase = VmPhase::Stopped;
            return;
        }
        match state.tracker.on_exit(exit, Instant::now()) {
            Decision::Restart { after } => {
                state.restarts += 1;
                state.phase = VmPhase::Starting;
                tracing::warn!(vm = %state.spec.name, "VMM process {exit}; restart {} in {after:?}", state.restarts);
                let generation = state.generation;
                myself.send_after(after, move || VmMsg::RestartNow { generation });
            }
            Decision::Done => {
                tracing::info!(vm = %state.spec.name, "VMM process {exit}; not restarted (clean exit)");
                state.phase = VmPhase::Stopped;
            }
            Decision::GiveUp => {
                tracing::error!(vm = %state.spec.name, "VMM process {exit}; the restart policy gives up");
                state.phase = if exit.is_failure() { VmPhase::Failed } else { VmPhase::Stopped };
            }
        }
    }

    /// Shuts the VMM down from a task (the guest's shutdown takes a while, a hung VMM the
    /// whole timeout); the actor answers everything else meanwhile, phase `Stopping`.
    fn stop(
        myself: &ActorRef<VmMsg>,
        state: &mut VmSupervisorState,
        timeout: Duration,
        reply: RpcReplyPort<Result<VmInfo, VmError>>,
    ) {
        if let Some(stopping) = &mut state.stopping {
            stopping.replies.push(reply);
            return;
        }
        state.generation += 1; // cancels a pending restart and the watcher's message
        let Some(Running { process, _tasks }) = state.process.take() else {
            if state.phase == VmPhase::Starting {
                state.phase = VmPhase::Stopped;
            }
            let _ = reply.send(Ok(state.info()));
            return;
        };
        drop(_tasks);
        state.phase = VmPhase::Stopping;
        let pid = process.pid();
        let (me, socket, name, generation) =
            (myself.clone(), state.paths.socket.clone(), state.spec.name.clone(), state.generation);
        let task = tokio::spawn(async move {
            let exit = shut_down(&name, &socket, &process, timeout).await;
            then(&me, move |state| {
                if generation != state.generation {
                    return;
                }
                let Some(stopping) = state.stopping.take() else { return };
                state.last_exit = exit.or(state.last_exit);
                state.phase = VmPhase::Stopped;
                let info = state.info();
                for reply in stopping.replies {
                    let _ = reply.send(Ok(info.clone()));
                }
            });
        });
        state.stopping = Some(Stopping { pid, replies: vec![reply], _task: AbortOnDrop(task) });
    }

    /// Pauses or resumes the VMM from a task; the phase changes when it has answered.
    fn control(
        myself: &ActorRef<VmMsg>,
        state: &mut VmSupervisorState,
        request: Request,
        reply: RpcReplyPort<Result<VmInfo, VmError>>,
    ) {
        if state.process.is_none() || !answering(state.phase) {
            let _ = reply.send(Err(state.not_running()));
            return;
        }
        let phase = if request == Request::Pause { VmPhase::Paused } else { VmPhase::Running };
        let (me, socket, name, generation) =
            (myself.clone(), state.paths.socket.clone(), state.spec.name.clone(), state.generation);
        tokio::spawn(async move {
            let answer = api_call(&socket, request, CALL_TIMEOUT).await.map_err(|e| control_error(&name, e));
            then(&me, move |state| {
                let result = answer.map(|_| {
                    if generation == state.generation {
                        state.phase = phase;
                    }
                    state.info()
                });
                let _ = reply.send(result);
            });
        });
    }

    /// The incoming migration completed: the VM is this host's, and its phase is what its
    /// VMM says (asked from a task).
    fn arrived(myself: &ActorRef<VmMsg>, state: &mut VmSupervisorState, reply: RpcReplyPort<VmInfo>) {
        state.incoming = None;
        if state.process.is_none() {
            let _ = reply.send(state.info());
            return;
        }
        let (me, socket, generation) = (myself.clone(), state.paths.socket.clone(), state.generation);
        tokio::spawn(async move {
            let status = api_call(&socket, Request::Status, CALL_TIMEOUT).await.ok().and_then(|r| r.status);
            then(&me, move |state| {
                if let Some(status) = status
                    && generation == state.generation
                {
                    state.phase = phase_of(&status);
                }
                let _ = reply.send(state.info());
            });
        });
    }

    /// Takes over the VMM process that serves the VM's control socket. The socket is the
    /// truth: `hint` (the pid last reported to the host) may be stale if the supervisor
    /// died just after a restart. The process must be alive and answer `status` with its
    /// own pid. No answer from a live VMM of this VM is an error (the host gives up rather
    /// than start a second VMM); no process at all is an exit the policy decides on.
    async fn adopt(state: &mut VmSupervisorState, hint: Option<u32>) -> Result<(), VmError> {
        let name = state.spec.name.clone();
        let socket = state.paths.socket.clone();
        let hint_alive = hint.filter(|pid| VmmProcess::is_vmm_of(*pid, &socket));
        // A live VMM may still be binding its socket; a dead one will never answer.
        let deadline = Instant::now() + if hint_alive.is_some() { ADOPT_TIMEOUT } else { Duration::ZERO };
        let status = loop {
            match api_call(&socket, Request::Status, CALL_TIMEOUT).await {
                Ok(resp) if resp.status.is_some() => break resp.status,
                _ if Instant::now() >= deadline => break None,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let pid = match (status, hint_alive) {
            (Some(status), _) => status.pid,
            (None, Some(pid)) => {
                let reason = format!("it runs but its control socket {} does not answer", socket.display());
                return Err(VmError::Adopt { name, pid, reason });
            }
            (None, None) if hint.is_none() => {
                // It was waiting out a restart backoff (already counted): start afresh.
                return Ok(());
            }
            (None, None) => {
                tracing::warn!(vm = %name, "the VMM process ended while it had no supervisor");
                state.ended_while_away = Some(hint.map_or(ProcessExit::Unknown, reap_zombie));
                return Ok(());
            }
        };
        if hint.is_some_and(|h| h != pid) {
            tracing::warn!(vm = %name, pid, ?hint, "the control socket is served by another process than reported");
        }
        let process = match VmmProcess::adopt(pid) {
            Ok(p) => p,
            Err(ProcessError::Gone { .. }) => {
                state.ended_while_away = Some(ProcessExit::Unknown);
                return Ok(());
            }
            Err(source) => return Err(VmError::Process { name, source }),
        };
        let status = api_call(&socket, Request::Status, CALL_TIMEOUT)
            .await
            .ok()
            .and_then(|r| r.status)
            .filter(|s| s.pid == pid)
            .ok_or_else(|| VmError::Adopt { name: name.clone(), pid, reason: "it stopped answering".into() })?;
        state.phase = phase_of(&status);
        state.process = Some(Running { process, _tasks: Vec::new() });
        tracing::info!(vm = %name, pid, "re-adopted the running VMM process");
        Ok(())
    }
}

impl Actor for VmSupervisor {
    type Msg = VmMsg;
    type State = VmSupervisorState;
    type Arguments = VmSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<VmMsg>,
        args: VmSupervisorArgs,
    ) -> Result<VmSupervisorState, ActorProcessingErr> {
        let launch = launch(&args.spec, &args.paths, &args.vmm_binary, args.keeper.as_deref());
        let mut state = VmSupervisorState {
            tracker: RestartTracker::new(args.spec.restart),
            spec: args.spec,
            paths: args.paths,
            launch,
            phase: VmPhase::Starting,
            restarts: 0,
            last_exit: None,
            error: None,
            generation: 0,
            process: None,
            stopping: None,
            ended_while_away: None,
            host: args.host,
            reported: None,
            incoming: args.incoming,
            leaving: false,
            keeper: args.keeper,
        };
        if let Some(adopt) = args.adopt {
            state.phase = adopt.phase;
            state.restarts = adopt.restarts;
            state.last_exit = adopt.last_exit;
            state.tracker = adopt.tracker;
            // Whatever the host last heard, a VMM may be serving the socket.
            if adopt.pid.is_some() || adopt.phase == VmPhase::Starting {
                Self::adopt(&mut state, adopt.pid).await?;
            }
        }
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<VmMsg>,
        state: &mut VmSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(exit) = state.ended_while_away {
            Self::after_exit(&myself, state, exit);
        } else if let Some(running) = &mut state.process {
            // Adopted: only the exit watcher is needed, the process already answered.
            state.generation += 1;
            let watcher = watch_exit(&myself, &running.process, state.generation)
                .map_err(|source| VmError::Process { name: state.spec.name.clone(), source })?;
            running._tasks.push(watcher);
            if state.keeper.is_some() {
                running._tasks.push(watch_run_state(&myself, state.paths.socket.clone(), state.generation));
            }
        } else if state.phase == VmPhase::Starting {
            Self::start_process(&myself, state, None);
        }
        state.report();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<VmMsg>,
        msg: VmMsg,
        state: &mut VmSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VmMsg::GetInfo(reply) => {
                let _ = reply.send(state.info());
            }
            VmMsg::Pause(reply) => Self::control(&myself, state, Request::Pause, reply),
            VmMsg::Resume(reply) => Self::control(&myself, state, Request::Resume, reply),
            VmMsg::Start(reply) if state.stopping.is_some() => {
                let _ = reply.send(Err(VmError::Stopping { name: state.spec.name.clone() }));
            }
            VmMsg::Start(reply) => {
                if state.process.is_none() {
                    Self::start_process(&myself, state, None);
                }
                let result = match (state.phase, &state.error) {
                    (VmPhase::Failed, Some(reason)) => {
                        Err(VmError::Start { name: state.spec.name.clone(), reason: reason.clone() })
                    }
                    _ => Ok(state.info()),
                };
                let _ = reply.send(result);
            }
            VmMsg::Stop { timeout, reply } => Self::stop(&myself, state, timeout, reply),
            VmMsg::Restore { from, reply } => {
                let result = if state.stopping.is_some() {
                    Err(VmError::Stopping { name: state.spec.name.clone() })
                } else if state.process.is_some() {
                    Err(VmError::Busy { name: state.spec.name.clone(), phase: state.phase, what: "restore" })
                } else {
                    Self::start_process(&myself, state, Some(&from));
                    match (state.phase, &state.error) {
                        (VmPhase::Failed, Some(reason)) => {
                            Err(VmError::Start { name: state.spec.name.clone(), reason: reason.clone() })
                        }
                        _ => Ok(state.info()),
                    }
                };
                let _ = reply.send(result);
            }
            VmMsg::Control { request, timeout, reply } => {
                if state.process.is_none() || !answering(state.phase) {
                    let _ = reply.send(Err(state.not_running()));
                } else {
                    let pauses = matches!(request, Request::Snapshot { paused: true, .. });
                    let migrates = matches!(request, Request::Migrate(_));
                    // Set before the VMM can end: its exit after the switchover is expected.
                    state.leaving |= migrates;
                    let (me, socket, generation, name) =
                        (myself.clone(), state.paths.socket.clone(), state.generation, state.spec.name.clone());
                    tokio::spawn(async move {
                        let result = api_call(&socket, request, timeout).await.map_err(|e| control_error(&name, e));
                        if pauses && result.is_ok() {
                            let _ = me.cast(VmMsg::PausedBy { generation });
                        }
                        if migrates && result.is_err() {
                            let _ = me.cast(VmMsg::StayedAfterAll { generation });
                        }
                        let _ = reply.send(result);
                    });
                }
            }
            VmMsg::PausedBy { generation } if generation == state.generation => {
                state.phase = VmPhase::Paused;
            }
            VmMsg::StayedAfterAll { generation } if generation == state.generation => {
                state.leaving = false;
            }
            VmMsg::Arrived(reply) => Self::arrived(&myself, state, reply),
            VmMsg::Then(VmThen(then)) => then(state),
            VmMsg::Crash => panic!("VmSupervisor {}: crash injected by a test", state.spec.name),
            VmMsg::Exited { generation } if generation == state.generation => {
                let exit = match state.process.as_ref().map(|r| r.process.reap()) {
                    Some(Some(exit)) => exit,
                    // The pidfd said it ended; if waitid disagrees, trust the pidfd.
                    _ => ProcessExit::Unknown,
                };
                Self::after_exit(&myself, state, exit);
            }
            VmMsg::Ready { generation, phase } if generation == state.generation => {
                if state.phase == VmPhase::Starting {
                    state.phase = phase;
                    tracing::info!(vm = %state.spec.name, "VMM answers on its control socket");
                }
                if state.keeper.is_some()
                    && let Some(running) = state.process.as_mut()
                {
                    running._tasks.push(watch_run_state(&myself, state.paths.socket.clone(), generation));
                }
            }
            VmMsg::RunState { generation, phase } if generation == state.generation => {
                if answering(state.phase) {
                    state.phase = phase;
                }
            }
            VmMsg::StartTimedOut { generation } if generation == state.generation => {
                if let Some(running) = &state.process {
                    tracing::error!(vm = %state.spec.name, "VMM did not answer within {START_TIMEOUT:?}; killing it");
                    state.error = Some(format!(
                        "the VMM did not answer on {} within {START_TIMEOUT:?}; see {}",
                        state.paths.socket.display(),
                        state.paths.log.display()
                    ));
                    if let Err(e) = running.process.signal(libc::SIGKILL) {
                        tracing::error!(vm = %state.spec.name, "{e}");
                    }
                }
            }
            VmMsg::RestartNow { generation } if generation == state.generation && state.process.is_none() => {
                Self::start_process(&myself, state, None);
            }
            VmMsg::Exited { .. }
            | VmMsg::Ready { .. }
            | VmMsg::RunState { .. }
            | VmMsg::StartTimedOut { .. }
            | VmMsg::RestartNow { .. }
            | VmMsg::PausedBy { .. }
            | VmMsg::StayedAfterAll { .. } => {
                tracing::debug!(vm = %state.spec.name, "stale message of an earlier VMM process ignored");
            }
        }
        state.report();
        Ok(())
    }
}
