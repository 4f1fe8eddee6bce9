//! From a checked `VmConfig` to a running `Machine`: KVM, memory, kernel, firmware tables,
//! devices, vCPUs. Each step's error says which step failed.

use crate::api::VmState;
use crate::arch::x86_64::layout::{self, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{acpi, mptable};
use crate::boot::{self, initrd, linux, pvh};
use crate::config::{KernelSource, VmConfig};
use crate::disk_locks::DiskLocks;
use crate::machine::{Controls, Machine, StartClock, StopEvents};
use crate::permit::RunPermit;
use crate::snapshot::lazy::LazyMemory;
use crate::snapshot::{self, MachineSpec, SavedState};
use crate::virtio;
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::persist::StateError;
use crate::vstate::vcpu::{self, IoBuses, SetupReport, Throttle, VcpuCommand, VcpuError, VcpuInit, VcpuStart};
use crate::vstate::vm::{Vm, VmError};
use novacron_devices::legacy::{
    AcpiPower, COM1_IRQ, COM1_PORT, I8042, POWER_PORT_BASE, POWER_PORT_LEN, Serial, SerialOutput,
};
use novacron_devices::virtio::block::lock::LockError;
use novacron_devices::{Bus, BusError};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot boot {kernel}")]
    Kernel {
        kernel: String,
        #[source]
        source: boot::LoadError,
    },
    #[error(transparent)]
    Initrd(#[from] initrd::InitrdError),
    #[error("cannot write the command line into guest memory")]
    Cmdline,
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    #[error(transparent)]
    Linux(#[from] linux::LinuxBootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {0}'s thread ended during set-up")]
    VcpuGone(u8),
    #[error("the vCPU threads ended during set-up without a word (a bug: see the log)")]
    VcpuSetupLost,
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    DiskLock(#[from] LockError),
    #[error("cannot restore the VM's interrupt controllers and clock")]
    State(#[source] StateError),
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] BusError),
    #[error("cannot create an event fd")]
    EventFd(#[source] std::io::Error),
}

fn event_fd() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn clone_fd(evt: &EventFd) -> Result<EventFd, BuildError> {
    evt.try_clone().map_err(BuildError::EventFd)
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::Read { what, path: path.to_owned(), source })
}

/// Loads the kernel (and initrd), and writes the command line, firmware tables and the
/// boot protocol's structure. Returns how the first vCPU enters, the PVH start_info address
/// (0 for Linux), and the kernel's format.
fn load_guest(
    config: &VmConfig,
    memory: &GuestMemory,
    devices: &[acpi::MmioDevice],
) -> Result<(BootEntry, u64, boot::KernelFormat), BuildError> {
    let file;
    let image: &[u8] = match &config.kernel {
        KernelSource::TestGuest => novacron_guest_image::ELF,
        KernelSource::File(path) => {
            file = read_file("kernel", path)?;
            &file
        }
    };
    let kernel = boot::load_kernel(memory, image)
        .map_err(|source| BuildError::Kernel { kernel: config.kernel.to_string(), source })?;

    let mem_bytes = config.mem_mib << 20;
    let low_ram_end = mem_bytes.min(MMIO_HOLE_START);
    let initrd = match &config.initrd {
        Some(path) => {
            let limit = match kernel.boot {
                BootEntry::Linux64 { .. } => low_ram_end.min(linux::initrd_limit(kernel.setup_header.as_ref())),
                BootEntry::Pvh { .. } => low_ram_end,
            };
            Some(initrd::load(memory, &read_file("initrd", path)?, kernel.end.max(HIMEM_START), limit)?)
        }
        None => None,
    };

    let mut cmdline = config.cmdline.clone().into_bytes();
    let cmdline_len = cmdline.len();
    cmdline.push(0);
    memory.write_slice(&cmdline, GuestAddress(CMDLINE_START)).map_err(|_| BuildError::Cmdline)?;

    let rsdp = acpi::write(memory, config.vcpus, devices)?;
    mptable::write(memory, config.vcpus)?;
    let e820 = layout::e820_map(mem_bytes);
    let start_info = match kernel.boot {
        BootEntry::Pvh { .. } => pvh::write_start_info(memory, CMDLINE_START, rsdp, &e820, initrd)?,
        BootEntry::Linux64 { .. } => {
            linux::write_zero_page(memory, kernel.setup_header, (CMDLINE_START, cmdline_len), rsdp, &e820, initrd)?;
            0
        }
    };
    Ok((kernel.boot, start_info, kernel.format))
}

/// Logs how long each start-up phase took (NOVACRON_LOG=debug), for boot-time work.
struct PhaseTimer(std::time::Instant);

impl PhaseTimer {
    fn mark(&mut self, phase: &str) {
        let now = Instant::now();
        tracing::debug!(phase, us = (now - self.0).as_micros() as u64, "start-up phase done");
        self.0 = now;
    }
}

/// Where the VM's contents come from.
pub enum Source {
    /// Boot the configured kernel.
    Boot,
    /// Continue a snapshot's state in `memory`, which holds the guest's RAM (or will:
    /// `lazy` fills it while the guest runs); the configuration was made from the state's
    /// machine spec.
    Restore { state: Box<SavedState>, memory: GuestMemory, lazy: Option<LazyMemory> },
    /// The same for a migration's destination: the vCPUs are set up but wait, and the
    /// disk images stay unlocked, until the source commits (`Machine::take_disk_locks`,
    /// then `Machine::resume`).
    Migration { state: Box<SavedState>, memory: GuestMemory },
}

/// Builds the VM and starts its vCPUs. Console output goes to `serial_out`.
///
/// The disk images are locked first (nothing else is done for a VM whose disk is in use).
/// Guest memory goes in before anything else (see `Vm::create_irqchip`). Then the vCPU
/// threads start: one of them reads KVM's supported CPUID while this thread creates the
/// interrupt controllers; each then creates and configures its own vCPU while this thread
/// loads the guest and wires the devices. Then every vCPU is told to start.
///
/// `began` is when the boot or restore began (the status's `first_instruction_us` counts
/// from it).
pub fn build(
    config: &VmConfig,
    serial_out: SerialOutput,
    source: Source,
    began: Instant,
) -> Result<Machine, BuildError> {
    let mut timer = PhaseTimer(Instant::now());
    let (memory, restore, incoming, lazy) = match source {
        Source::Boot => (None, None, false, None),
        Source::Restore { state, memory, lazy } => (Some(memory), Some(state), false, lazy),
        Source::Migration { state, memory } => (Some(memory), Some(state), true, None),
    };
    let disk_locks = Arc::new(DiskLocks::new(&config.disks));
    if !incoming {
        disk_locks.acquire()?;
    }
    let permit = Arc::new(RunPermit::new(config.require_permit));
    // Under a permit, the guest waits for the first one; a migration's for its commit.
    let paused = incoming || config.require_permit;
    vcpu::install_kick_handler()?;
    let kvm = kvm::open()?;
    kvm::check_capabilities(&kvm, config.vcpus)?;
    let vm = Arc::new(Vm::new(&kvm)?);
    let memory = match memory {
        Some(m) => m,
        None => memory::create(config.mem_mib << 20)?,
    };
    vm.register_memory(&memory)?;
    timer.mark("create VM, memory");
    let stop_events = StopEvents { vcpu: event_fd()?, power_off: event_fd()?, reset: event_fd()? };
    let cpuid = vcpu::HostQueries::new(kvm);
    let (setup_tx, setup_rx) = channel();
    let (events_tx, events_rx) = channel();
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let notify = clone_fd(&stop_events.vcpu)?;
        vcpus.push(vcpu::spawn((index, config.vcpus), cpuid.clone(), setup_tx.clone(), events_tx.clone(), notify)?);
    }
    timer.mark("spawn vCPU threads");
    vm.create_irqchip()?;
    for v in &vcpus {
        if !v.create(vm.clone()) {
            return Err(BuildError::VcpuGone(v.index));
        }
    }
    timer.mark("irqchip");

    let mut mmio = Bus::new();
    let virtio = virtio::attach(config, &vm, &memory, &mut mmio)?;
    timer.mark("virtio devices");
    let serial_irq = event_fd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
    let (mut inits, format): (Vec<VcpuInit>, String) = match restore {
        None => {
            let mmio_devices: Vec<acpi::MmioDevice> = virtio.iter().map(|v| v.mmio).collect();
            let (boot_entry, start_info, format) = load_guest(config, &memory, &mmio_devices)?;
            regs::write_boot_tables(&memory, boot_entry)?;
            let inits = (0..config.vcpus)
                .map(|i| if i == 0 { VcpuInit::Boot(boot_entry, start_info) } else { VcpuInit::WaitForSipi })
                .collect();
            (inits, format.to_string())
        }
        Some(state) => {
            restore_state(&state, &vm, &virtio, &serial)?;
            let inits = state.vcpus.into_iter().map(|s| VcpuInit::Restore(Box::new(s))).collect();
            (inits, state.spec.boot_format)
        }
    };
    timer.mark("load guest");
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT, 8)?;
    pio.insert(Arc::new(Mutex::new(I8042::new(clone_fd(&stop_events.reset)?))), I8042::PORT_BASE, I8042::PORT_LEN)?;
    let power = AcpiPower::new(clone_fd(&stop_events.power_off)?, clone_fd(&stop_events.reset)?);
    pio.insert(Arc::new(Mutex::new(power)), POWER_PORT_BASE, POWER_PORT_LEN)?;
    let buses = Arc::new(IoBuses { pio, mmio });
    timer.mark("devices");

    wait_for_setup(&setup_rx, config.vcpus)?;
    timer.mark("vCPUs configured");
    let throttle = Arc::new(Throttle::default());
    let first_run = Arc::new(OnceLock::new());
    for (v, init) in vcpus.iter().zip(inits.drain(..)) {
        // A command queued before the start is the first thing the thread does.
        if paused && !v.send(VcpuCommand::Pause) {
            return Err(BuildError::VcpuGone(v.index));
        }
        let start = VcpuStart {
            buses: buses.clone(),
            init,
            throttle: throttle.clone(),
            permit: permit.clone(),
            first_run: first_run.clone(),
        };
        if !v.start(start) {
            return Err(BuildError::VcpuGone(v.index));
        }
    }
    wait_for_setup(&setup_rx, config.vcpus)?;
    timer.mark("vCPUs started");
    if let Some(lazy) = &lazy {
        lazy.start_prefetch();
    }

    let spec = MachineSpec {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        kernel: config.kernel.to_string(),
        boot_format: format,
        disks: config.disks.clone(),
        nets: config.nets.clone(),
        rng: config.rng,
    };
    tracing::info!(vcpus = spec.vcpus, mem_mib = spec.mem_mib, kernel = %spec.kernel, format = %spec.boot_format, "VM started");
    let state = if paused { VmState::Paused } else { VmState::Running };
    Ok(Machine::new(
        spec,
        stop_events,
        vcpus,
        events_rx,
        serial,
        virtio,
        buses,
        vm,
        memory,
        Controls { throttle, permit, disk_locks, state, start: StartClock { began, first_run }, lazy },
    ))
}

/// Puts a snapshot's VM, device and serial state into a freshly built VM whose vCPUs
/// have not run. Each part checks its state before it changes anything.
fn restore_state(
    snapshot: &SavedState,
    vm: &Vm,
    virtio: &[virtio::VirtioSlot],
    serial: &Mutex<Serial>,
) -> Result<(), BuildError> {
    crate::vstate::persist::check_xsave_size(&vm.fd).map_err(BuildError::State)?;
    snapshot.vm.restore(&vm.fd).map_err(BuildError::State)?;
    if snapshot.devices.len() != virtio.len() {
        return Err(BuildError::Restore(format!(
            "{} saved devices for {} attached",
            snapshot.devices.len(),
            virtio.len()
        )));
    }
    for ((name, state), slot) in snapshot.devices.iter().zip(virtio) {
        if *name != slot.name {
            return Err(BuildError::Restore(format!("saved device {name} where {} is attached", slot.name)));
        }
        slot.lock().restore_state(state).map_err(|e| BuildError::Restore(format!("device {name}: {e}")))?;
    }
    serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .restore_state(&snapshot.serial)
        .map_err(|e| BuildError::Restore(format!("serial port: {e}")))
}

/// Waits until each of `count` vCPUs has reported one set-up step; the first error wins.
fn wait_for_setup(reports: &Receiver<SetupReport>, count: u8) -> Result<(), BuildError> {
    for _ in 0..count {
        match reports.recv() {
            Ok((_, Ok(()))) => {}
            Ok((_, Err(e))) => return Err(e.into()),
            Err(_) => return Err(BuildError::VcpuSetupLost),
        }
    }
    Ok(())
}
