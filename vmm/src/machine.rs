//! A running VM as the VMM thread sees it: the vCPU handles, the devices it must flush, the
//! event fds through which the guest asks to stop, and pause/resume across all vCPUs.

use crate::api::{ApiError, ErrorKind, MemoryLoadStatus, PermitStatus, VmState, VmStatus};
use crate::disk_locks::DiskLocks;
use crate::permit::RunPermit;
use crate::snapshot::lazy::LazyMemory;
use crate::snapshot::{self, MachineSpec, RunState, SavedState, SnapshotStats};
use crate::virtio::VirtioSlot;
use crate::vstate::memory::GuestMemory;
use crate::vstate::persist::{VcpuState, VmState as VmStateKvm};
use crate::vstate::vcpu::{IoBuses, Throttle, ThrottleTicker, VcpuCommand, VcpuEvent, VcpuHandle, VcpuStop};
use crate::vstate::vm::Vm;
use novacron_devices::legacy::Serial;
use novacron_devices::rate_limiter::BucketUpdate;
use novacron_devices::virtio::LimitTarget;
use novacron_devices::virtio::persist::TransportState;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// How long vCPUs get to answer pause/resume. They answer in microseconds; this only bounds
/// the wait on a wedged host.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The event fds the guest or the vCPUs use to end the VM.
pub struct StopEvents {
    /// A vCPU has sent a `VcpuEvent` (read them from `Machine::vcpu_events`).
    pub vcpu: EventFd,
    /// ACPI power-off.
    pub power_off: EventFd,
    /// i8042 or ACPI reset.
    pub reset: EventFd,
}

/// What the VMM thread and the vCPU threads share to control the guest, and the run state
/// the VM is built in.
pub(crate) struct Controls {
    pub throttle: Arc<Throttle>,
    pub permit: Arc<RunPermit>,
    pub disk_locks: Arc<DiskLocks>,
    pub state: VmState,
    pub start: StartClock,
    pub lazy: Option<LazyMemory>,
}

/// When the boot or restore began, and when a vCPU first entered the guest.
pub(crate) struct StartClock {
    pub began: Instant,
    pub first_run: Arc<OnceLock<Instant>>,
}

pub struct Machine {
    /// What the VM is made of: for status replies, and saved in snapshots.
    pub spec: MachineSpec,
    pub stop_events: StopEvents,
    vcpus: Vec<VcpuHandle>,
    vcpu_events: Receiver<VcpuEvent>,
    serial: Arc<Mutex<Serial>>,
    pub virtio: Vec<VirtioSlot>,
    state: VmState,
    started: Instant,
    /// A vCPU stop seen while waiting for pause/resume answers, for the event loop.
    pending_stops: Vec<(u8, VcpuStop)>,
    throttle: Arc<Throttle>,
    ticker: Option<ThrottleTicker>,
    disk_locks: Arc<DiskLocks>,
    permit: Arc<RunPermit>,
    /// Paused because the run permit ran out (or none has come yet).
    fenced: bool,
    /// Whether a fenced VM runs again once permitted (it ran when it was fenced).
    run_when_permitted: bool,
    start: StartClock,
    /// True while a post-copy still brings pages in (`migrate::post_copy`).
    memory_arriving: Arc<std::sync::atomic::AtomicBool>,
    // Dropped last, in this order: the loader of a lazy restore (once the vCPUs are
    // gone: one may wait on it), the buses (devices), the VM fd, then guest memory.
    lazy: Option<LazyMemory>,
    _buses: Arc<IoBuses>,
    vm: Arc<Vm>,
    memory: GuestMemory,
}

fn internal(what: &str, e: &dyn std::error::Error) -> ApiError {
    ApiError::new(ErrorKind::Internal, format!("{what}: {}", crate::process::error_chain(e)))
}

impl Machine {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        spec: MachineSpec,
        stop_events: StopEvents,
        vcpus: Vec<VcpuHandle>,
        vcpu_events: Receiver<VcpuEvent>,
        serial: Arc<Mutex<Serial>>,
        virtio: Vec<VirtioSlot>,
        buses: Arc<IoBuses>,
        vm: Arc<Vm>,
        memory: GuestMemory,
        controls: Controls,
    ) -> Self {
        let Controls { throttle, permit, disk_locks, state, start, lazy } = controls;
        // A VMM that needs a permit starts fenced; it runs once the first one comes.
        let fenced = permit.required() && !permit.allows_now();
        Machine {
            spec,
            stop_events,
            vcpus,
            vcpu_events,
            serial,
            virtio,
            state,
            started: Instant::now(),
            pending_stops: Vec::new(),
            throttle,
            ticker: None,
            disk_locks,
            permit,
            fenced,
            run_when_permitted: fenced,
            start,
            memory_arriving: Arc::default(),
            lazy,
            _buses: buses,
            vm,
            memory,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn status(&self) -> VmStatus {
        VmStatus {
            state: self.state,
            vcpus: self.spec.vcpus,
            mem_mib: self.spec.mem_mib,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            kernel: self.spec.kernel.clone(),
            boot_format: self.spec.boot_format.clone(),
            devices: self.virtio.iter().map(|v| v.name.clone()).collect(),
            permit: self.permit.required().then(|| PermitStatus {
                epoch: self.permit.epoch(),
                left_ms: self.permit.left().map_or(0, |d| d.as_millis() as u64),
                fenced: self.fenced,
            }),
            first_instruction_us: self
                .start
                .first_run
                .get()
                .map(|at| at.saturating_duration_since(self.start.began).as_micros() as u64),
            memory_load: self.lazy.as_ref().map(|l| {
                let f = l.progress();
                MemoryLoadStatus {
                    loaded_mib: f.loaded_bytes >> 20,
                    total_mib: f.total_bytes >> 20,
                    on_demand_chunks: f.on_demand_chunks,
                    elapsed_ms: f.elapsed_ms,
                    done: f.done,
                }
            }),
        }
    }

    /// vCPU stops that arrived since the last call, from the channel and from pause/resume.
    pub fn take_vcpu_stops(&mut self) -> Vec<(u8, VcpuStop)> {
        let mut stops = std::mem::take(&mut self.pending_stops);
        while let Ok(event) = self.vcpu_events.try_recv() {
            if let VcpuEvent::Stopped(index, why) = event {
                stops.push((index, why));
            }
        }
        stops
    }

    /// Sends `cmd` to every vCPU and collects, per vCPU, the first answer `answer` accepts
    /// (it returns the event back when the event is not the awaited kind).
    fn command_all<T>(
        &mut self,
        cmd: VcpuCommand,
        answer: impl Fn(VcpuEvent) -> Result<T, VcpuEvent>,
    ) -> Result<Vec<T>, ApiError> {
        for v in &self.vcpus {
            if !v.send(cmd) {
                return Err(ApiError::new(ErrorKind::Internal, format!("vCPU {} is gone", v.index)));
            }
        }
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        let mut answers: Vec<Option<T>> = (0..self.vcpus.len()).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vcpu_events.recv_timeout(left) {
                Ok(VcpuEvent::Stopped(index, why)) => {
                    let msg = format!("vCPU {index} stopped: {why}");
                    self.pending_stops.push((index, why));
                    return Err(ApiError::new(ErrorKind::Internal, msg));
                }
                Ok(event) => {
                    let index = usize::from(event.index());
                    if let (Ok(value), Some(slot)) = (answer(event), answers.get_mut(index)) {
                        *slot = Some(value);
                    }
                }
                Err(_) => {
                    let late: Vec<usize> = (0..answers.len()).filter(|&i| answers[i].is_none()).collect();
                    return Err(ApiError::new(
                        ErrorKind::Internal,
                        format!("vCPUs {late:?} did not answer {cmd:?} within {VCPU_ANSWER_TIMEOUT:?}"),
                    ));
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Changes a rate limiter of device `name` (`set-limit`).
    pub fn set_limit(
        &mut self,
        name: &str,
        target: LimitTarget,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), ApiError> {
        let slot = self.virtio.iter().find(|v| v.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.virtio.iter().map(|v| v.name.as_str()).collect();
            ApiError::new(ErrorKind::BadRequest, format!("no device {name:?}; this VM has {known:?}"))
        })?;
        slot.lock().device_mut().set_rate_limits(target, bandwidth, ops).map_err(|e| {
            ApiError::new(ErrorKind::BadRequest, format!("{name}: {}", crate::process::error_chain(&e)))
        })?;
        tracing::info!(device = name, ?target, "rate limit changed");
        Ok(())
    }

    /// Takes every vCPU out of the guest; they stay out until `resume`. Pausing a fenced
    /// VM keeps it paused once it is permitted again.
    pub fn pause(&mut self) -> Result<(), ApiError> {
        if self.fenced && self.run_when_permitted {
            self.run_when_permitted = false;
            return Ok(());
        }
        if self.state == VmState::Paused {
            return Err(ApiError::new(ErrorKind::InvalidState, "the VM is already paused"));
        }
        self.command_all(VcpuCommand::Pause, |e| if let VcpuEvent::Paused(_) = e { Ok(()) } else { Err(e) })?;
        self.state = VmState::Paused;
        self.flush_serial();
        tracing::info!("VM paused");
        Ok(())
    }

    /// Lets the vCPUs run again. A VM that does not hold its disk images' locks (a
    /// migration handed them over at its commit) takes them first, or stays paused.
    pub fn resume(&mut self) -> Result<(), ApiError> {
        if self.state == VmState::Running {
            return Err(ApiError::new(ErrorKind::InvalidState, "the VM is not paused"));
        }
        if !self.permit.allows_now() {
            return Err(ApiError::new(
                ErrorKind::InvalidState,
                "the VM is fenced: it has no valid run permit from its host's keeper (the host may have lost its lease)",
            ));
        }
        self.take_disk_locks()?;
        self.command_all(VcpuCommand::Resume, |e| if let VcpuEvent::Resumed(_) = e { Ok(()) } else { Err(e) })?;
        self.state = VmState::Running;
        tracing::info!("VM resumed");
        Ok(())
    }

    /// Whether the VM is paused for want of a run permit.
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// The permit has run out while the VM is not fenced yet.
    pub fn permit_lapsed(&self) -> bool {
        !self.fenced && !self.permit.allows_now()
    }

    /// How long until the permit runs out (None: no permit needed, or fenced already).
    pub fn permit_left(&self) -> Option<Duration> {
        if self.fenced { None } else { self.permit.left() }
    }

    /// Pauses the guest because its permit ran out; it runs again (if it ran) once a
    /// new permit comes.
    pub fn fence(&mut self) {
        if self.fenced {
            return;
        }
        self.run_when_permitted = self.state == VmState::Running;
        self.fenced = true;
        if self.state == VmState::Running
            && let Err(e) = self.pause()
        {
            // The vCPUs check the permit themselves before entering the guest.
            tracing::error!("cannot pause the vCPUs to fence the VM: {e}");
        }
        tracing::warn!(epoch = self.permit.epoch(), "run permit expired: the VM is fenced (paused) until a new one");
    }

    /// Whether a fenced VM should run once permitted (a migration's destination says so
    /// for a VM that ran at the source).
    pub fn set_run_when_permitted(&mut self, run: bool) {
        self.run_when_permitted = run;
    }

    /// Takes a new permit; a fenced VM that may run now is let out.
    pub fn grant_permit(&mut self, epoch: u64, until_ms: u64) -> Result<(), ApiError> {
        self.permit.grant(epoch, until_ms).map_err(|e| {
            let kind = match e {
                crate::permit::PermitError::NotRequired => ErrorKind::BadRequest,
                crate::permit::PermitError::Stale { .. } => ErrorKind::InvalidState,
            };
            ApiError::new(kind, e.to_string())
        })?;
        if self.fenced && self.permit.allows_now() {
            self.fenced = false;
            tracing::info!(epoch, "run permit granted: the VM is no longer fenced");
            if self.run_when_permitted && self.state == VmState::Paused {
                self.resume()?;
            }
        }
        Ok(())
    }

    /// The run permit, for the vCPU threads.
    pub fn permit(&self) -> Arc<RunPermit> {
        self.permit.clone()
    }

    /// Takes the disk images' locks if the VM does not hold them.
    pub fn take_disk_locks(&self) -> Result<(), ApiError> {
        if self.disk_locks.held() {
            return Ok(());
        }
        self.disk_locks.acquire().map_err(|e| {
            ApiError::new(
                ErrorKind::InvalidState,
                format!(
                    "the VM stays paused: {} (after a migration's commit the VM may run there)",
                    crate::process::error_chain(&e)
                ),
            )
        })
    }

    /// A flag that stays true while a post-copy still brings the VM's pages in: until
    /// then it can be neither migrated nor snapshotted (each would wait on the source).
    pub fn memory_arriving_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.memory_arriving.clone()
    }

    /// Refuses what must wait for a post-copy's last pages.
    pub fn check_memory_here(&self, what: &str) -> Result<(), ApiError> {
        if self.memory_arriving.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ApiError::new(
                ErrorKind::InvalidState,
                format!(
                    "cannot {what} yet: the VM's memory is still arriving from its post-copy; try again in a moment"
                ),
            ));
        }
        Ok(())
    }

    /// Whether all of guest memory is in: false while a lazy restore still loads it.
    pub fn memory_complete(&self) -> bool {
        self.lazy.as_ref().is_none_or(|l| l.progress().done)
    }

    /// The disk locks, for the migration engine (which hands them over at the commit).
    pub fn disk_locks(&self) -> Arc<DiskLocks> {
        self.disk_locks.clone()
    }

    /// Writes a snapshot into `dir`: pauses the VM (if it runs), saves everything, and
    /// resumes it unless `stay_paused`. A failure leaves the VM running as it was.
    pub fn snapshot(&mut self, dir: &std::path::Path, stay_paused: bool) -> Result<SnapshotStats, ApiError> {
        let was_running = self.state == VmState::Running;
        if was_running {
            self.pause()?;
        }
        let result = self.write_snapshot(dir, RunState { paused: !was_running });
        if was_running && (!stay_paused || result.is_err()) {
            self.resume()?;
        }
        result
    }

    fn write_snapshot(&mut self, dir: &std::path::Path, run: RunState) -> Result<SnapshotStats, ApiError> {
        let state = self.save_state(run)?;
        let stats = snapshot::write(dir, &state, &self.memory).map_err(|e| internal("writing the snapshot", &e))?;
        tracing::info!(dir = %dir.display(), memory_pages = stats.pages_written, state_bytes = stats.state_bytes, "snapshot written");
        Ok(stats)
    }

    /// Everything but memory, from a paused VM; `run` says whether it ran before the save
    /// paused it.
    pub fn save_state(&mut self, run: RunState) -> Result<SavedState, ApiError> {
        crate::vstate::persist::check_xsave_size(&self.vm.fd).map_err(|e| internal("checking the XSAVE area", &e))?;
        let vcpus = self.capture_vcpus()?;
        let vm = VmStateKvm::capture(&self.vm.fd)
            .map_err(|e| internal("saving the VM's interrupt controllers and clock", &e))?;
        let devices: Vec<(String, TransportState)> =
            self.virtio.iter().map(|v| (v.name.clone(), v.lock().save_state())).collect();
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner()).save_state();
        Ok(SavedState { spec: self.spec.clone(), vcpus, vm, devices, serial, run })
    }

    /// Every vCPU's state, in index order. The VM must be paused.
    pub fn capture_vcpus(&mut self) -> Result<Vec<VcpuState>, ApiError> {
        if self.state != VmState::Paused {
            return Err(ApiError::new(ErrorKind::InvalidState, "the VM must be paused to capture its vCPUs"));
        }
        let states = self.command_all(VcpuCommand::SaveState, |e| match e {
            VcpuEvent::Saved(_, state) => Ok(state),
            other => Err(other),
        })?;
        states
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(|b| *b).map_err(|e| ApiError::new(ErrorKind::Internal, format!("vCPU {i}: {e}"))))
            .collect()
    }

    pub fn flush_serial(&self) {
        self.serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }

    /// Keeps the vCPUs out of the guest `percent`% of the time (0: off), for auto-converge.
    pub fn set_throttle(&mut self, percent: u8) {
        self.throttle.set(percent);
        if percent == 0 {
            self.ticker = None;
        } else if self.ticker.is_none() {
            let threads = self.vcpus.iter().filter_map(VcpuHandle::pthread).collect();
            match ThrottleTicker::start(threads) {
                Ok(t) => self.ticker = Some(t),
                Err(e) => tracing::warn!("cannot start the vCPU throttle: {e}"),
            }
        }
        tracing::info!(percent, "vCPU throttle set");
    }

    /// Guest memory and the KVM VM, for the migration engine (which reads pages and the
    /// dirty log from its own thread).
    pub fn memory_and_vm(&self) -> (GuestMemory, Arc<Vm>) {
        (self.memory.clone(), self.vm.clone())
    }

    /// Stops every vCPU thread and waits for it, then flushes the console.
    pub fn shut_down(&mut self) {
        self.ticker = None;
        for v in &self.vcpus {
            v.send(VcpuCommand::Exit);
        }
        for v in &mut self.vcpus {
            v.join();
        }
        self.flush_serial();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shut_down();
    }
}
