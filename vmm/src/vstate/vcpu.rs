//! vCPUs: configuration, and the thread that runs each one.
//!
//! A vCPU thread is a small state machine (running or paused), driven only by
//! [`VcpuCommand`]s through its [`VcpuHandle`] and answering with [`VcpuEvent`]s. To get a
//! thread out of `KVM_RUN`, the handle sends the command and then a signal whose handler
//! sets `kvm_run.immediate_exit`: if the signal lands before `KVM_RUN` is entered, the next
//! `KVM_RUN` returns at once, so no command is ever missed (Firecracker's scheme).

use super::persist::{StateError, VcpuState, msr_list};
use super::vm::Vm;
use crate::arch::x86_64::cpuid::{CpuidError, vcpu_cpuid};
use crate::arch::x86_64::msr::{MsrError, boot_msrs};
use crate::arch::x86_64::regs::{self, BootEntry};
use crate::permit::RunPermit;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_run};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use novacron_devices::Bus;
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {what} failed")]
    Configure {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM took {set} of {total} boot MSRs")]
    PartialMsrs { index: u8, set: usize, total: usize },
    #[error("cannot read KVM's supported CPUID")]
    HostQueries(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Msrs(#[from] MsrError),
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot restore vCPU {index}")]
    Restore {
        index: u8,
        #[source]
        source: StateError,
    },
    #[error("cannot start the thread of vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault,
    /// The guest asked for power-off through a KVM system event (PSCI-style).
    PowerOff,
    /// The guest asked for a reset through a KVM system event.
    Reset,
    /// KVM could not go on: internal error, failed entry, an exit we cannot handle.
    KvmError(String),
    /// The vCPU thread panicked; a bug in the VMM.
    Panic(String),
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::TripleFault => f.write_str("the guest triple-faulted (KVM_EXIT_SHUTDOWN)"),
            VcpuStop::PowerOff => f.write_str("the guest powered off"),
            VcpuStop::Reset => f.write_str("the guest reset"),
            VcpuStop::KvmError(e) => write!(f, "KVM error: {e}"),
            VcpuStop::Panic(e) => write!(f, "vCPU thread panicked: {e}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    /// Capture the vCPU's state (only while paused).
    SaveState,
    /// Leave the thread.
    Exit,
}

#[derive(Debug)]
pub enum VcpuEvent {
    Paused(u8),
    Resumed(u8),
    Exited(u8),
    Stopped(u8, VcpuStop),
    /// The answer to SaveState.
    Saved(u8, Result<Box<VcpuState>, String>),
}

impl VcpuEvent {
    pub fn index(&self) -> u8 {
        match self {
            VcpuEvent::Paused(i) | VcpuEvent::Resumed(i) | VcpuEvent::Exited(i) => *i,
            VcpuEvent::Stopped(i, _) | VcpuEvent::Saved(i, _) => *i,
        }
    }
}

/// Port I/O and MMIO buses shared by all vCPUs.
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
            // before it first enters KVM_RUN and valid for the thread's whole life.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the kick handler (idempotent; once per process is enough).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::SignalHandler)
}

/// What every vCPU asks /dev/kvm, asked once: the supported CPUID, fetched by the first
/// thread that needs it (KVM_GET_SUPPORTED_CPUID costs ~0.4 ms on this host: the kernel
/// runs the host's CPUID for every leaf, each a trap in a nested VM, so it overlaps with
/// other set-up), and the MSRs worth saving.
pub struct HostQueries {
    kvm: Kvm,
    cell: OnceLock<Result<CpuId, kvm_ioctls::Error>>,
    /// The MSRs KVM can save, asked for at the first snapshot.
    msrs: OnceLock<Result<Vec<u32>, String>>,
}

impl HostQueries {
    pub fn new(kvm: Kvm) -> Arc<Self> {
        Arc::new(HostQueries { kvm, cell: OnceLock::new(), msrs: OnceLock::new() })
    }

    fn msr_indices(&self) -> Result<Vec<u32>, String> {
        self.msrs.get_or_init(|| msr_list(&self.kvm).map_err(|e| crate::process::error_chain(&e))).clone()
    }

    fn get(&self) -> Result<CpuId, VcpuError> {
        self.cell
            .get_or_init(|| self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))
            .clone()
            .map_err(VcpuError::HostQueries)
    }
}

/// What a set-up vCPU needs to enter the guest.
pub struct VcpuStart {
    pub buses: Arc<IoBuses>,
    pub init: VcpuInit,
    pub throttle: Arc<Throttle>,
    pub permit: Arc<RunPermit>,
    /// When a vCPU of this VM first entered the guest (set once, by the first to do so).
    pub first_run: Arc<OnceLock<Instant>>,
}

/// How long a throttled vCPU runs the guest before it naps.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// Auto-converge's brake: while `percent` is above 0, every vCPU runs the guest for a
/// THROTTLE_SLICE, then stays out of it for `percent / (100 - percent)` of a slice (so
/// the guest gets `100 - percent`% of the time). The VMM kicks the vCPU threads once per
/// slice meanwhile (`Machine::set_throttle`), so a vCPU that never exits notices too.
#[derive(Debug, Default)]
pub struct Throttle {
    percent: AtomicU8,
}

impl Throttle {
    pub fn set(&self, percent: u8) {
        self.percent.store(percent.min(99), Ordering::Relaxed);
    }

    pub fn percent(&self) -> u8 {
        self.percent.load(Ordering::Relaxed)
    }

    /// How long to nap after a slice in the guest.
    fn nap(&self) -> Option<Duration> {
        let p = u32::from(self.percent());
        (p > 0).then(|| THROTTLE_SLICE * p / (100 - p))
    }
}

/// How a vCPU begins: at the kernel's entry (the first vCPU of a booting VM), from a saved
/// state (every vCPU of a restored VM), or waiting for INIT/SIPI from the guest.
pub enum VcpuInit {
    Boot(BootEntry, u64),
    Restore(Box<VcpuState>),
    WaitForSipi,
}

/// A vCPU's answer to its set-up steps: created and configured, then boot registers set.
pub type SetupReport = (u8, Result<(), VcpuError>);

struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    fn step<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Configure { index: self.index, what, source })
    }

    /// Creates the vCPU with CPUID, MSRs, FPU and LINT pins; the boot registers come later
    /// and only for the first vCPU (the others wait for INIT/SIPI from the guest).
    fn create(vm: &Vm, index: u8, count: u8, cpuid: &HostQueries) -> Result<Self, VcpuError> {
        let fd = vm.fd.create_vcpu(u64::from(index)).map_err(|source| VcpuError::Create { index, source })?;
        let vcpu = Vcpu { index, fd };
        let table = vcpu_cpuid(&cpuid.get()?, index, count)?;
        vcpu.step("KVM_SET_CPUID2", vcpu.fd.set_cpuid2(&table))?;
        let msrs = boot_msrs()?;
        let set = vcpu.step("KVM_SET_MSRS", vcpu.fd.set_msrs(&msrs))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::PartialMsrs { index, set, total: msrs.as_slice().len() });
        }
        vcpu.step("KVM_SET_FPU", vcpu.fd.set_fpu(&regs::boot_fpu()))?;
        let mut lapic = vcpu.step("KVM_GET_LAPIC", vcpu.fd.get_lapic())?;
        regs::set_lint(&mut lapic);
        vcpu.step("KVM_SET_LAPIC", vcpu.fd.set_lapic(&lapic))?;
        Ok(vcpu)
    }

    /// Registers at the kernel's entry (the tables they point to are already in memory).
    fn set_boot_registers(&self, boot: BootEntry, start_info: u64) -> Result<(), VcpuError> {
        let mut sregs = self.step("KVM_GET_SREGS", self.fd.get_sregs())?;
        regs::setup_sregs(&mut sregs, boot);
        self.step("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
        self.step("KVM_SET_REGS", self.fd.set_regs(&regs::boot_regs(boot, start_info)))
    }
}

/// What the VMM thread hands a vCPU thread during set-up, in this order.
enum Handover {
    /// The VM exists with its interrupt controller: the vCPU can be created.
    Vm(Arc<Vm>),
    /// Everything is ready: enter the guest.
    Start(VcpuStart),
}

/// Starts the thread of vCPU `index` of `count`, before the VM exists: it reads KVM's
/// supported CPUID meanwhile. Given the VM (`VcpuHandle::create`), it creates and
/// configures its vCPU and reports on `setup`; given its start (`VcpuHandle::start`), it
/// sets its boot registers if it has any, reports again, and runs. Runtime events go to
/// `events`, with `notify` written after each.
pub fn spawn(
    (index, count): (u8, u8),
    cpuid: Arc<HostQueries>,
    setup: Sender<SetupReport>,
    events: Sender<VcpuEvent>,
    notify: EventFd,
) -> Result<VcpuHandle, VcpuError> {
    let (commands_tx, commands) = channel();
    let (handover_tx, handover) = channel::<Handover>();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            // Fetch it now, while the VMM thread creates the VM; errors are reported below.
            let _ = cpuid.get();
            let Ok(Handover::Vm(vm)) = handover.recv() else { return };
            let vcpu = match Vcpu::create(&vm, index, count, &cpuid) {
                Ok(v) => v,
                Err(e) => {
                    let _ = setup.send((index, Err(e)));
                    return;
                }
            };
            drop(vm);
            let _ = setup.send((index, Ok(())));
            // No start means the VM is not going to run after all.
            let Ok(Handover::Start(start)) = handover.recv() else { return };
            let registers = match start.init {
                VcpuInit::Boot(boot, start_info) => vcpu.set_boot_registers(boot, start_info),
                VcpuInit::Restore(state) => cpuid.get().and_then(|host| {
                    state.restore(&vcpu.fd, host.as_slice()).map_err(|e| VcpuError::Restore { index, source: e })
                }),
                VcpuInit::WaitForSipi => Ok(()),
            };
            let failed = registers.is_err();
            let _ = setup.send((index, registers));
            if failed {
                return;
            }
            let reporter = Reporter { events, notify };
            let mut runner = Runner {
                vcpu,
                buses: start.buses,
                commands,
                host: cpuid,
                throttle: start.throttle,
                permit: start.permit,
                first_run: start.first_run,
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run(&reporter)));
            if let Err(panic) = outcome {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                reporter.send(VcpuEvent::Stopped(index, VcpuStop::Panic(msg)));
                // Wait to be told to leave, as after any other stop.
                while let Ok(cmd) = runner.commands.recv() {
                    if cmd == VcpuCommand::Exit {
                        break;
                    }
                }
                reporter.send(VcpuEvent::Exited(index));
            }
        })
        .map_err(|source| VcpuError::Spawn { index, source })?;
    Ok(VcpuHandle { index, commands: commands_tx, handover: handover_tx, thread: Some(thread) })
}

struct Reporter {
    events: Sender<VcpuEvent>,
    notify: EventFd,
}

impl Reporter {
    fn send(&self, event: VcpuEvent) {
        // The receiver is gone only when the VMM is exiting anyway.
        if self.events.send(event).is_ok() {
            let _ = self.notify.write(1);
        }
    }
}

enum Next {
    Continue,
    Stop(VcpuStop),
}

struct Runner {
    vcpu: Vcpu,
    buses: Arc<IoBuses>,
    commands: Receiver<VcpuCommand>,
    host: Arc<HostQueries>,
    throttle: Arc<Throttle>,
    permit: Arc<RunPermit>,
    first_run: Arc<OnceLock<Instant>>,
}

/// How often a vCPU without a valid run permit looks again (the VMM thread pauses it
/// soon after; this only covers the moments before it does).
const NO_PERMIT_POLL: Duration = Duration::from_millis(5);

impl Runner {
    fn run(&mut self, reporter: &Reporter) {
        let index = self.vcpu.index;
        let run_ptr: *mut kvm_run = self.vcpu.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        let mut paused = false;
        let mut slice_start = Instant::now();
        let mut pending = None;
        loop {
            // Commands first: a kick only makes KVM_RUN return, the command says why.
            let cmd = match pending.take() {
                Some(cmd) => Some(cmd),
                None if paused => self.commands.recv().ok(),
                None => self.commands.try_recv().ok(),
            };
            match cmd {
                Some(VcpuCommand::Pause) => {
                    paused = true;
                    reporter.send(VcpuEvent::Paused(index));
                    continue;
                }
                Some(VcpuCommand::Resume) => {
                    paused = false;
                    reporter.send(VcpuEvent::Resumed(index));
                    continue;
                }
                Some(VcpuCommand::SaveState) => {
                    let state = if paused { self.save_state(run_ptr) } else { Err("the vCPU is not paused".into()) };
                    reporter.send(VcpuEvent::Saved(index, state));
                    continue;
                }
                Some(VcpuCommand::Exit) => break,
                None if paused => break, // every handle is gone
                None => {}
            }
            if !self.permit.allows_now() {
                // No guest time without a permit, even before the VMM thread fences.
                match self.commands.recv_timeout(NO_PERMIT_POLL) {
                    Ok(cmd) => pending = Some(cmd),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
                continue;
            }
            match self.run_once(run_ptr) {
                Next::Continue => {
                    if let Some(nap) = self.throttle.nap()
                        && slice_start.elapsed() >= THROTTLE_SLICE
                    {
                        // Nap, but wake for any command.
                        pending = self.commands.recv_timeout(nap).ok();
                        slice_start = Instant::now();
                    }
                }
                Next::Stop(why) => {
                    reporter.send(VcpuEvent::Stopped(index, why));
                    // Stay out of the guest; only leave when told.
                    while let Ok(cmd) = self.commands.recv() {
                        if cmd == VcpuCommand::Exit {
                            break;
                        }
                    }
                    break;
                }
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        reporter.send(VcpuEvent::Exited(index));
    }

    fn run_once(&mut self, run_ptr: *mut kvm_run) -> Next {
        let buses = &*self.buses;
        if self.first_run.get().is_none() {
            let _ = self.first_run.set(Instant::now());
        }
        let result = self.vcpu.fd.run();
        match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                // SAFETY: the exit is KVM_EXIT_IO, so the `io` member of the union is valid.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size }).max(1);
                for chunk in data.chunks(size) {
                    buses.pio.write(u64::from(port), chunk);
                }
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // SAFETY: as above.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size }).max(1);
                for chunk in data.chunks_mut(size) {
                    buses.pio.read(u64::from(port), chunk);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => Next::Continue,
            Ok(VcpuExit::Shutdown) => Next::Stop(VcpuStop::TripleFault),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => Next::Stop(VcpuStop::PowerOff),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => Next::Stop(VcpuStop::Reset),
            Ok(VcpuExit::SystemEvent(kind, _)) => Next::Stop(VcpuStop::KvmError(format!("system event {kind}"))),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit is KVM_EXIT_INTERNAL_ERROR, so `internal` is valid.
                let suberror = unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror };
                let what = match suberror {
                    1 => "instruction emulation failed",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failed",
                    _ => "internal error",
                };
                Next::Stop(VcpuStop::KvmError(format!("{what} (suberror {suberror}) at {}", self.where_())))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Next::Stop(VcpuStop::KvmError(format!("VM entry failed (hardware reason {reason:#x}, host cpu {cpu})")))
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                Next::Stop(VcpuStop::KvmError(format!("{what} at {}", self.where_())))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(VcpuStop::KvmError(format!("KVM_RUN failed: {e}"))),
        }
    }

    /// Finishes any I/O the vCPU was in (a KVM_RUN that returns at once), then captures.
    fn save_state(&mut self, run_ptr: *mut kvm_run) -> Result<Box<VcpuState>, String> {
        self.vcpu.fd.set_kvm_immediate_exit(1);
        let completed =
            self.vcpu.fd.run().map(|_| ()).or_else(|e| if e.errno() == libc::EINTR { Ok(()) } else { Err(e) });
        self.vcpu.fd.set_kvm_immediate_exit(0);
        // SAFETY: reading a plain field of this thread's own kvm_run mapping.
        let _ = unsafe { (*run_ptr).exit_reason };
        completed.map_err(|e| format!("completing pending I/O: {e}"))?;
        let msrs = self.host.msr_indices().map_err(|e| e.to_string())?;
        VcpuState::capture(&self.vcpu.fd, &msrs).map(Box::new).map_err(|e| crate::process::error_chain(&e))
    }

    /// The guest's instruction pointer, for error messages.
    fn where_(&self) -> String {
        match self.vcpu.fd.get_regs() {
            Ok(r) => format!("rip {:#x}", r.rip),
            Err(_) => "an unknown rip".into(),
        }
    }
}

/// What the VMM thread holds of a running vCPU.
pub struct VcpuHandle {
    pub index: u8,
    commands: Sender<VcpuCommand>,
    handover: Sender<Handover>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Lets the thread create its vCPU in `vm`. False when the thread is gone.
    pub fn create(&self, vm: Arc<Vm>) -> bool {
        self.handover.send(Handover::Vm(vm)).is_ok()
    }

    /// Lets a created vCPU enter the guest. False when its thread is gone.
    pub fn start(&self, start: VcpuStart) -> bool {
        self.handover.send(Handover::Start(start)).is_ok()
    }

    /// Sends `cmd` and kicks the thread out of KVM_RUN. False when the thread is gone.
    pub fn send(&self, cmd: VcpuCommand) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        match &self.thread {
            Some(t) => t.kill(kick_signal()).is_ok(),
            None => false,
        }
    }

    /// The thread, for kicks from the throttle ticker.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kicks the vCPU threads out of the guest once per THROTTLE_SLICE while a throttle is
/// on, so that each checks whether its slice is up. Stop it before the threads end.
pub struct ThrottleTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ThrottleTicker {
    pub fn start(threads: Vec<libc::pthread_t>) -> std::io::Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("vcpu-throttle".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(THROTTLE_SLICE);
                for &t in &threads {
                    // SAFETY: the threads are joinable vCPU threads that outlive the ticker:
                    // `Machine` stops the ticker before it joins them. The signal only sets
                    // `immediate_exit` (see `kick_handler`).
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
            }
        })?;
        Ok(ThrottleTicker { stop, thread: Some(thread) })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ThrottleTicker {
    fn drop(&mut self) {
        self.stop();
    }
}
