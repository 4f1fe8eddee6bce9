//! The VMM thread's event loop: waits on the guest's stop requests, the vCPUs' reports,
//! termination signals and the control socket, until the VM ends.

use crate::api::server::ApiServer;
use crate::api::{Request, Response, SnapshotReport};
use crate::machine::Machine;
use crate::vstate::vcpu::VcpuStop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const TOKEN_VCPU: u64 = 0;
const TOKEN_POWER_OFF: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
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
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    Vcpu {
        index: u8,
        stop: VcpuStop,
    },
}

impl VmExit {
    /// 0 for an orderly end; 128+n for signal n; 2 for a guest crash; 3 for a KVM or VMM fault.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reset | VmExit::Shutdown => 0,
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
            VmExit::Signal(s) => write!(f, "stopped by signal {s}"),
            VmExit::Vcpu { index, stop } => write!(f, "vCPU {index}: {stop}"),
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

fn handle_request(machine: &mut Machine, request: Request) -> (Response, bool) {
    let result = match request {
        Request::Status => return (Response::status(machine.status()), false),
        Request::Pause => machine.pause(),
        Request::Resume => machine.resume(),
        Request::Shutdown => return (Response::done(), true),
        Request::Snapshot { dir, paused } => {
            let started = std::time::Instant::now();
            return match machine.snapshot(std::path::Path::new(&dir), paused) {
                Ok(stats) => {
                    let report = SnapshotReport {
                        state_bytes: stats.state_bytes,
                        memory_bytes: stats.memory_bytes,
                        pages_written: stats.pages_written,
                        millis: started.elapsed().as_millis() as u64,
                    };
                    (Response { snapshot: Some(report), ..Response::done() }, false)
                }
                Err(e) => (Response::error(e), false),
            };
        }
        Request::SetLimit { device, target, bandwidth, ops } => {
            machine.set_limit(&device, target, bandwidth.into(), ops.into())
        }
    };
    match result {
        Ok(()) => (Response::done(), false),
        Err(e) => (Response::error(e), false),
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
    for (slot, device) in machine.virtio.iter().enumerate() {
        let base = TOKEN_VIRTIO_BASE + ((slot as u64) << 16);
        for (queue, fd) in device.queue_fds().into_iter().enumerate() {
            poller.add(fd, base + queue as u64)?;
        }
        for source in device.event_sources() {
            let events = if source.edge { EventSet::IN | EventSet::EDGE_TRIGGERED } else { EventSet::IN };
            poller.add_with(source.fd, base + SOURCE_FLAG + u64::from(source.id), events)?;
        }
    }

    let mut events = vec![EpollEvent::default(); 16];
    let exit = 'outer: loop {
        let n = match poller.0.wait(IDLE_FLUSH_MS, &mut events) {
            Ok(0) => {
                machine.flush_serial();
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RuntimeError::Setup(e)),
        };
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
                            poller.add(fd, TOKEN_CONN_BASE + id)?;
                        }
                    }
                }
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
                    let Some(server) = api.as_mut() else { continue };
                    let id = token - TOKEN_CONN_BASE;
                    let incoming = server.read(id);
                    let mut shutdown = false;
                    for request in incoming.requests {
                        let (response, stop) = match request {
                            Ok(r) => handle_request(machine, r),
                            Err(e) => (Response::error(e), false),
                        };
                        server.reply(id, &response);
                        shutdown |= stop;
                    }
                    if incoming.closed {
                        if let Some(fd) = server.conn_fd(id) {
                            poller.remove(fd);
                        }
                        server.close(id);
                    }
                    if shutdown {
                        break 'outer VmExit::Shutdown;
                    }
                }
            }
        }
        // A stop that arrived while a pause or resume was waiting for answers.
        if let Some((index, stop)) = machine.take_vcpu_stops().into_iter().next() {
            break VmExit::Vcpu { index, stop };
        }
    };
    machine.shut_down();
    Ok(exit)
}
