//! A running VM as the VMM thread sees it: the vCPU handles, the devices it must flush, the
//! event fds through which the guest asks to stop, and pause/resume across all vCPUs.

use crate::api::{ApiError, ErrorKind, VmState, VmStatus};
use crate::disk_locks::DiskLocks;
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
use std::sync::{Arc, Mutex};
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
    // Dropped last, in this order: the buses (devices), the VM fd, then guest memory.
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
        (throttle, state): (Arc<Throttle>, VmState),
        disk_locks: Arc<DiskLocks>,
    ) -> Self {
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

    /// Takes every vCPU out of the guest; they stay out until `resume`.
    pub fn pause(&mut self) -> Result<(), ApiError> {
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
        self.take_disk_locks()?;
        self.command_all(VcpuCommand::Resume, |e| if let VcpuEvent::Resumed(_) = e { Ok(()) } else { Err(e) })?;
        self.state = VmState::Running;
        tracing::info!("VM resumed");
        Ok(())
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
