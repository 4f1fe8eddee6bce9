//! The VMM thread's event loop: waits on the guest's stop requests, the vCPUs' reports,
//! termination signals and the control socket, until the VM ends.

use crate::api::server::ApiServer;
use crate::api::{ApiError, ErrorKind, MigrationStatus, Request, Response, SnapshotReport, VmEvent, VmState};
use crate::machine::Machine;
use crate::migrate::source::{self, EngineRequest, Migration, Outcome};
use crate::snapshot::RunState;
use crate::vstate::vcpu::VcpuStop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const TOKEN_VCPU: u64 = 0;
const TOKEN_POWER_OFF: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const TOKEN_MIGRATION: u64 = 5;
/// When nothing happens for this long, a partial console line (a prompt) is handed on.
const IDLE_FLUSH_MS: i32 = 50;
/// Connection `id` polls as `TOKEN_CONN_BASE + id`.
const TOKEN_CONN_BASE: u64 = 16;
/// Virtio slot `s` polls as `TOKEN_VIRTIO_BASE + (s << 16) + queue` for its queues and
/// `... + SOURCE_FLAG + id` for its own event sources.
const TOKEN_VIRTIO_BASE: u64 = 1 << 32;
const SOURCE_FLAG: u64 = 0x8000;

/// How the VM ended. `code` is the process exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    PowerOff,
    Reset,
    /// `shutdown` on the control socket.
    Shutdown,
    /// `evict` on the control socket: another host owns the VM at this epoch.
    Evicted(u64),
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    Vcpu {
        index: u8,
        stop: VcpuStop,
    },
    /// The VM moved away by live migration and runs at this address now.
    Migrated(String),
}

/// The exit status of a VMM evicted because another host owns its VM: not a failure, and
/// not to be restarted (a restart would be a second copy, fenced until it too is evicted).
pub const EVICTED_EXIT_CODE: i32 = 4;

impl VmExit {
    /// 0 for an orderly end; 128+n for signal n; 2 for a guest crash; 3 for a KVM or VMM
    /// fault; `EVICTED_EXIT_CODE` for an eviction.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::Evicted(_) => EVICTED_EXIT_CODE,
            VmExit::PowerOff | VmExit::Reset | VmExit::Shutdown | VmExit::Migrated(_) => 0,
            VmExit::Signal(s) => 128 + s,
            VmExit::Vcpu { stop: VcpuStop::PowerOff | VcpuStop::Reset, .. } => 0,
            VmExit::Vcpu { stop: VcpuStop::TripleFault, .. } => 2,
            VmExit::Vcpu { .. } => 3,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff => f.write_str("the guest powered off"),
            VmExit::Reset => {
                f.write_str("the guest reset the machine (the VM ends; restarting it is the supervisor's job)")
            }
            VmExit::Shutdown => f.write_str("shut down through the control socket"),
            VmExit::Evicted(epoch) => write!(f, "evicted: another host owns the VM now (epoch {epoch})"),
            VmExit::Signal(s) => write!(f, "stopped by signal {s}"),
            VmExit::Vcpu { index, stop } => write!(f, "vCPU {index}: {stop}"),
            VmExit::Migrated(to) => write!(f, "the VM moved to {to} and runs there now"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the event loop")]
    Setup(#[source] std::io::Error),
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in the calling thread and the threads it starts later, so
/// that they are delivered only through the event loop's signalfd. Call before building.
pub fn block_stop_signals() -> Result<(), RuntimeError> {
    let set = stop_signal_set();
    // SAFETY: changes this thread's signal mask with a valid set.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(RuntimeError::Setup(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn signal_fd() -> Result<OwnedFd, RuntimeError> {
    let set = stop_signal_set();
    // SAFETY: creates a new signalfd for a valid set; the fd is checked below.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(RuntimeError::Setup(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    let mut info: libc::signalfd_siginfo = unsafe_zeroed_siginfo();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is that large.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

fn unsafe_zeroed_siginfo() -> libc::signalfd_siginfo {
    // SAFETY: signalfd_siginfo is plain integers; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

struct Poller(Epoll);

impl Poller {
    fn add(&self, fd: RawFd, token: u64) -> Result<(), RuntimeError> {
        self.add_with(fd, token, EventSet::IN)
    }

    fn add_with(&self, fd: RawFd, token: u64, events: EventSet) -> Result<(), RuntimeError> {
        self.0.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)).map_err(RuntimeError::Setup)
    }

    fn remove(&self, fd: RawFd) {
        let _ = self.0.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// What the event loop keeps besides the machine.
struct Loop {
    poller: Poller,
    migration: Option<Migration>,
    /// The last migration's outcome, for `migrate_status` after it ended.
    last_migration: Option<MigrationStatus>,
    /// Device event sources are off the poller (while a migration's switchover has the VM,
    /// or while the VM is fenced).
    devices_frozen: bool,
    /// A migration's switchover has the VM paused and its devices frozen.
    switchover: bool,
    /// Connections that asked to `watch`, and what to tell them next.
    watchers: Vec<u64>,
    events: Vec<VmEvent>,
}

/// How to answer a request.
enum Answer {
    Now(Response),
    /// The answer comes later (a migration's outcome).
    Later,
    /// Answer, then end the VM so.
    Stop(Response, VmExit),
}

/// The answer to a migration or dry run that failed with `message`.
fn failed(status: &mut MigrationStatus, message: String) -> Response {
    status.error = Some(message.clone());
    let mut r = Response::error(ApiError::new(ErrorKind::Internal, message));
    r.migration = Some(status.clone());
    r
}

fn no_migration() -> ApiError {
    ApiError::new(ErrorKind::InvalidState, "no migration is running")
}

fn result(r: Result<(), ApiError>) -> Answer {
    Answer::Now(match r {
        Ok(()) => Response::done(),
        Err(e) => Response::error(e),
    })
}

impl Loop {
    /// The answer to a request that, when it succeeds, is an event for the watchers.
    fn noting(&mut self, event: VmEvent, r: Result<(), ApiError>) -> Answer {
        if r.is_ok() {
            self.events.push(event);
        }
        result(r)
    }

    /// Tells every watcher what happened, with the status now.
    fn flush_events(&mut self, machine: &Machine, api: Option<&mut ApiServer>) {
        let Some(server) = api else { return };
        if self.events.is_empty() {
            return;
        }
        self.watchers.retain(|id| server.conn_fd(*id).is_some());
        for event in std::mem::take(&mut self.events) {
            let line = Response { event: Some(event), status: Some(machine.status()), ..Response::done() };
            for id in &self.watchers {
                server.reply(*id, &line);
            }
        }
    }

    /// Fences the VM if its run permit has run out.
    fn check_permit(&mut self, machine: &mut Machine) -> Result<(), RuntimeError> {
        if machine.permit_lapsed() {
            machine.fence();
            self.events.push(VmEvent::Fenced);
        }
        self.sync_devices(machine)
    }

    /// The devices work unless a switchover has the VM or it is fenced.
    fn sync_devices(&mut self, machine: &Machine) -> Result<(), RuntimeError> {
        let on = !self.switchover && !machine.fenced();
        self.watch_devices(machine, on)
    }

    fn handle_request(&mut self, machine: &mut Machine, request: Request, conn: u64) -> Result<Answer, RuntimeError> {
        let frozen = || {
            Answer::Now(Response::error(ApiError::new(
                ErrorKind::InvalidState,
                "the VM is paused for a migration's switchover",
            )))
        };
        Ok(match request {
            Request::Status => Answer::Now(Response::status(machine.status())),
            Request::Pause | Request::Resume | Request::Snapshot { .. } if self.switchover => frozen(),
            Request::Pause => self.noting(VmEvent::Paused, machine.pause()),
            Request::Resume => self.noting(VmEvent::Resumed, machine.resume()),
            Request::Permit { epoch, until_ms } => {
                let was_fenced = machine.fenced();
                let granted = machine.grant_permit(epoch, until_ms);
                if was_fenced && !machine.fenced() {
                    self.events.push(VmEvent::Permitted);
                }
                result(granted)
            }
            Request::Watch => {
                self.watchers.push(conn);
                Answer::Now(Response::status(machine.status()))
            }
            Request::Shutdown => Answer::Stop(Response::done(), VmExit::Shutdown),
            Request::Evict { owner_epoch } => Answer::Stop(Response::done(), VmExit::Evicted(owner_epoch)),
            Request::Snapshot { dir, paused } => {
                let started = std::time::Instant::now();
                if let Err(e) =
                    machine.check_memory_here("snapshot it").and_then(|()| crate::api::check_snapshot_dir("dir", &dir))
                {
                    return Ok(Answer::Now(Response::error(e)));
                }
                Answer::Now(match machine.snapshot(std::path::Path::new(&dir), paused) {
                    Ok(stats) => {
                        let report = SnapshotReport {
                            state_bytes: stats.state_bytes,
                            memory_bytes: stats.memory_bytes,
                            pages_written: stats.pages_written,
                            millis: started.elapsed().as_millis() as u64,
                        };
                        Response { snapshot: Some(report), ..Response::done() }
                    }
                    Err(e) => Response::error(e),
                })
            }
            Request::SetLimit { device, target, bandwidth, ops } => {
                result(machine.set_limit(&device, target, bandwidth.into(), ops.into()))
            }
            Request::Migrate(request) => {
                if let Some(m) = &self.migration {
                    let msg = format!("a migration to {} is running already", m.to);
                    return Ok(Answer::Now(Response::error(ApiError::new(ErrorKind::InvalidState, msg))));
                }
                if let Err(e) = machine.check_memory_here("migrate it") {
                    return Ok(Answer::Now(Response::error(e)));
                }
                match source::start(machine, &request) {
                    Ok(mut m) => {
                        self.poller.add(m.notify.as_raw_fd(), TOKEN_MIGRATION)?;
                        m.waiting = Some(conn);
                        self.migration = Some(m);
                        Answer::Later
                    }
                    Err(e) => Answer::Now(Response::error(e)),
                }
            }
            Request::MigrateStatus => Answer::Now(match (&self.migration, &self.last_migration) {
                (Some(m), _) => Response { migration: Some(m.status()), ..Response::done() },
                (None, Some(last)) => Response { migration: Some(last.clone()), ..Response::done() },
                (None, None) => Response::error(no_migration()),
            }),
            Request::MigrateCancel => result(match &self.migration {
                Some(m) => {
                    m.control.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(to = %m.to, "migration cancel requested");
                    Ok(())
                }
                None => Err(no_migration()),
            }),
            Request::MigrateSet { max_bandwidth } => result(match &self.migration {
                Some(m) => {
                    m.bandwidth.set(max_bandwidth);
                    tracing::info!(max_bandwidth, "migration bandwidth limit changed");
                    Ok(())
                }
                None => Err(no_migration()),
            }),
        })
    }

    /// Puts the virtio devices' queue and event fds on the poller, or takes them off (while
    /// a switchover has the VM paused, no device may touch guest memory).
    fn watch_devices(&mut self, machine: &Machine, on: bool) -> Result<(), RuntimeError> {
        if on != self.devices_frozen {
            return Ok(());
        }
        for (slot, device) in machine.virtio.iter().enumerate() {
            let base = TOKEN_VIRTIO_BASE + ((slot as u64) << 16);
            for (queue, fd) in device.queue_fds().into_iter().enumerate() {
                if on { self.poller.add(fd, base + queue as u64)? } else { self.poller.remove(fd) }
            }
            for source in device.event_sources() {
                if on {
                    let events = if source.edge { EventSet::IN | EventSet::EDGE_TRIGGERED } else { EventSet::IN };
                    self.poller.add_with(source.fd, base + SOURCE_FLAG + u64::from(source.id), events)?;
                } else {
                    self.poller.remove(source.fd);
                }
            }
        }
        self.devices_frozen = !on;
        Ok(())
    }

    /// Serves the migration engine's requests; returns its outcome once it has finished.
    fn serve_engine(&mut self, machine: &mut Machine) -> Result<Option<Outcome>, RuntimeError> {
        let Some(m) = self.migration.as_mut() else { return Ok(None) };
        let _ = m.notify.read();
        let requests: Vec<EngineRequest> = m.requests.try_iter().collect();
        for request in requests {
            match request {
                EngineRequest::PauseAndSave(reply) => {
                    let was_running = machine.state() == VmState::Running;
                    if let Some(m) = self.migration.as_mut() {
                        m.was_running = was_running;
                    }
                    if was_running && let Err(e) = machine.pause() {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    self.switchover = true;
                    self.sync_devices(machine)?;
                    let state = machine.save_state(RunState { paused: !was_running }).and_then(|s| {
                        s.to_sections()
                            .map(|sections| novacron_migration::stream::encode(&sections))
                            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("encoding the state: {e}")))
                    });
                    if state.is_err() {
                        self.switchover = false;
                        self.sync_devices(machine)?;
                        if was_running {
                            let _ = machine.resume();
                        }
                    }
                    let _ = reply.send(state);
                }
                EngineRequest::Resume(reply) => {
                    self.switchover = false;
                    self.sync_devices(machine)?;
                    let was_running = self.migration.as_ref().is_some_and(|m| m.was_running);
                    let r = if was_running && machine.state() == VmState::Paused { machine.resume() } else { Ok(()) };
                    let _ = reply.send(r);
                }
                EngineRequest::Throttle(percent) => machine.set_throttle(percent),
                EngineRequest::Finished(outcome) => return Ok(Some(*outcome)),
            }
        }
        Ok(None)
    }

    /// Ends the migration: answers the waiting connection, and says whether the VM left.
    fn finish_migration(
        &mut self,
        machine: &mut Machine,
        api: Option<&mut ApiServer>,
        outcome: Outcome,
    ) -> Option<VmExit> {
        let mut m = self.migration.take()?;
        m.join();
        self.poller.remove(m.notify.as_raw_fd());
        machine.set_throttle(0);
        let mut status = m.status();
        let outcome = match outcome {
            Outcome::Migrated(outcome) => outcome,
            Outcome::Predicted(prediction) => {
                let response = match prediction {
                    Ok(p) => {
                        status.prediction = Some(p);
                        Response { migration: Some(status.clone()), ..Response::done() }
                    }
                    Err(e) => {
                        failed(&mut status, format!("the dry run failed: {}", novacron_migration::error_chain(&e)))
                    }
                };
                if let (Some(server), Some(conn)) = (api, m.waiting) {
                    server.reply(conn, &response);
                }
                self.last_migration = Some(status);
                return None;
            }
        };
        let (response, exit) = match outcome {
            Ok(report) => {
                if let Some(dir) = &m.keep_snapshot {
                    // The VM is paused and frozen: the snapshot is its final state. A
                    // failed write leaves the directory as it was (`snapshot::write`).
                    match machine.snapshot(dir, true) {
                        Ok(_) => tracing::info!(dir = %dir.display(), "kept a snapshot of the migrated VM"),
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), "cannot keep a snapshot: {e}");
                            status.keep_snapshot_error = Some(format!(
                                "the snapshot was not kept in {}: {}; the directory holds what it held before",
                                dir.display(),
                                e.message
                            ));
                        }
                    }
                }
                status.arrived = Some(if m.was_running { VmState::Running } else { VmState::Paused });
                status.report = Some(report);
                (Response { migration: Some(status.clone()), ..Response::done() }, Some(VmExit::Migrated(m.to)))
            }
            Err(e) => {
                let what = if e.committed() { "the migration's end is unknown" } else { "the migration failed" };
                let message = format!("{what}: {}", novacron_migration::error_chain(&e));
                if e.committed() {
                    // The VM stays paused, but the operator may resume it here once they
                    // know it does not run at the destination: give the devices back.
                    self.switchover = false;
                    if let Err(err) = self.sync_devices(machine) {
                        tracing::error!("cannot poll the devices again: {err}");
                    }
                } else {
                    tracing::info!("{message}; the VM goes on here");
                }
                (failed(&mut status, message), None)
            }
        };
        if let (Some(server), Some(conn)) = (api, m.waiting) {
            server.reply(conn, &response);
        }
        self.last_migration = Some(status);
        exit
    }
}

/// Runs until the VM ends; then stops the vCPUs and returns how it ended.
pub fn run(machine: &mut Machine, mut api: Option<ApiServer>) -> Result<VmExit, RuntimeError> {
    let poller = Poller(Epoll::new().map_err(RuntimeError::Setup)?);
    let signals = signal_fd()?;
    poller.add(machine.stop_events.vcpu.as_raw_fd(), TOKEN_VCPU)?;
    poller.add(machine.stop_events.power_off.as_raw_fd(), TOKEN_POWER_OFF)?;
    poller.add(machine.stop_events.reset.as_raw_fd(), TOKEN_RESET)?;
    poller.add(signals.as_raw_fd(), TOKEN_SIGNAL)?;
    if let Some(server) = &api {
        poller.add(server.listener_fd(), TOKEN_LISTENER)?;
    }
    let mut lp = Loop {
        poller,
        migration: None,
        last_migration: None,
        devices_frozen: true,
        switchover: false,
        watchers: Vec::new(),
        events: Vec::new(),
    };
    lp.sync_devices(machine)?;

    let mut events = vec![EpollEvent::default(); 16];
    // Set while the listener is off the poller (accepting backs off on EMFILE).
    let mut listener_off = false;
    let exit = 'outer: loop {
        lp.check_permit(machine)?;
        lp.flush_events(machine, api.as_mut());
        let mut timeout = IDLE_FLUSH_MS;
        if let Some(left) = machine.permit_left() {
            timeout = timeout.min(left.as_millis() as i32 + 1);
        }
        if let Some(server) = &api
            && let Some(at) = server.retry_accept_at()
        {
            let left = at.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                if listener_off {
                    lp.poller.add(server.listener_fd(), TOKEN_LISTENER)?;
                    listener_off = false;
                }
            } else {
                if !listener_off {
                    lp.poller.remove(server.listener_fd());
                    listener_off = true;
                }
                timeout = timeout.min(left.as_millis() as i32 + 1);
            }
        }
        let n = match lp.poller.0.wait(timeout, &mut events) {
            Ok(0) => {
                machine.flush_serial();
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RuntimeError::Setup(e)),
        };
        // Before any device work: a VMM that was stopped past its permit's deadline fences
        // first (its vCPUs check by themselves).
        lp.check_permit(machine)?;
        for event in &events[..n] {
            match event.data() {
                TOKEN_VCPU => {
                    let _ = machine.stop_events.vcpu.read();
                    if let Some((index, stop)) = machine.take_vcpu_stops().into_iter().next() {
                        break 'outer VmExit::Vcpu { index, stop };
                    }
                }
                TOKEN_POWER_OFF => break 'outer VmExit::PowerOff,
                TOKEN_RESET => break 'outer VmExit::Reset,
                TOKEN_SIGNAL => {
                    if let Some(sig) = read_signal(&signals) {
                        break 'outer VmExit::Signal(sig);
                    }
                }
                TOKEN_LISTENER => {
                    if let Some(server) = api.as_mut() {
                        for (id, fd) in server.accept() {
                            lp.poller.add(fd, TOKEN_CONN_BASE + id)?;
                        }
                    }
                }
                TOKEN_MIGRATION => {
                    if let Some(outcome) = lp.serve_engine(machine)?
                        && let Some(exit) = lp.finish_migration(machine, api.as_mut(), outcome)
                    {
                        break 'outer exit;
                    }
                }
                // Events read before the devices were frozen in this round wait for later.
                token if token >= TOKEN_VIRTIO_BASE && lp.devices_frozen => {}
                token if token >= TOKEN_VIRTIO_BASE => {
                    let slot = ((token - TOKEN_VIRTIO_BASE) >> 16) as usize;
                    let what = (token - TOKEN_VIRTIO_BASE) & 0xffff;
                    if let Some(device) = machine.virtio.get(slot) {
                        if what >= SOURCE_FLAG {
                            device.device_event((what - SOURCE_FLAG) as u32);
                        } else {
                            device.queue_event(what as usize);
                        }
                    }
                }
                token => {
                    if api.is_none() {
                        continue;
                    }
                    let id = token - TOKEN_CONN_BASE;
                    let incoming = api.as_mut().map(|s| s.read(id));
                    let Some(incoming) = incoming else { continue };
                    let mut stop = None;
                    for request in incoming.requests {
                        let answer = match request {
                            Ok(r) => lp.handle_request(machine, r, id)?,
                            Err(e) => Answer::Now(Response::error(e)),
                        };
                        lp.sync_devices(machine)?;
                        let response = match answer {
                            Answer::Now(r) => r,
                            Answer::Stop(r, exit) => {
                                stop = Some(exit);
                                r
                            }
                            Answer::Later => continue,
                        };
                        if let Some(server) = api.as_mut() {
                            server.reply(id, &response);
                        }
                    }
                    if incoming.closed
                        && let Some(server) = api.as_mut()
                    {
                        if let Some(fd) = server.conn_fd(id) {
                            lp.poller.remove(fd);
                        }
                        server.close(id);
                    }
                    if let Some(exit) = stop {
                        break 'outer exit;
                    }
                }
            }
        }
        // A stop that arrived while a pause or resume was waiting for answers.
        if let Some((index, stop)) = machine.take_vcpu_stops().into_iter().next() {
            break VmExit::Vcpu { index, stop };
        }
    };
    if let Some(m) = lp.migration.as_ref() {
        // The VM ends during a migration: stop the engine (it fails on its next step).
        m.control.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    machine.shut_down();
    Ok(exit)
}
