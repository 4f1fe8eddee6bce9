//! From a checked `VmConfig` to a running `Machine`: KVM, memory, kernel, firmware tables,
//! devices, vCPUs. Each step's error says which step failed.

use crate::arch::x86_64::layout::{self, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::{acpi, mptable};
use crate::boot::{self, initrd, linux, pvh};
use crate::config::{KernelSource, VmConfig};
use crate::machine::{Machine, MachineInfo, StopEvents};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::vcpu::{self, IoBuses, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use novacron_devices::legacy::{
    AcpiPower, COM1_IRQ, COM1_PORT, I8042, POWER_PORT_BASE, POWER_PORT_LEN, Serial, SerialOutput,
};
use novacron_devices::{Bus, BusError};
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
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
fn load_guest(config: &VmConfig, memory: &GuestMemory) -> Result<(BootEntry, u64, boot::KernelFormat), BuildError> {
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

    let rsdp = acpi::write(memory, config.vcpus)?;
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
        let now = std::time::Instant::now();
        tracing::debug!(phase, us = (now - self.0).as_micros() as u64, "start-up phase done");
        self.0 = now;
    }
}

/// Everything built before the first vCPU is configured.
struct Prepared {
    vm: Vm,
    memory: GuestMemory,
    boot_entry: BootEntry,
    start_info: u64,
    format: boot::KernelFormat,
    stop_events: StopEvents,
    serial: Arc<Mutex<Serial>>,
    buses: Arc<IoBuses>,
    vcpus: Vec<Vcpu>,
}

/// The VM with its memory, the guest, the devices and the vCPUs: all that needs no
/// capability check (those run meanwhile on another thread).
fn prepare(config: &VmConfig, serial_out: SerialOutput, timer: &mut PhaseTimer) -> Result<Prepared, BuildError> {
    let kvm = kvm::open()?;
    timer.mark("open KVM");
    let vm = Vm::new(&kvm)?;
    timer.mark("create VM");
    let memory = memory::create(config.mem_mib << 20)?;
    vm.register_memory(&memory)?;
    vm.create_irqchip()?;
    timer.mark("memory, irqchip");
    let (boot_entry, start_info, format) = load_guest(config, &memory)?;
    timer.mark("load guest");

    let stop_events = StopEvents { vcpu: event_fd()?, power_off: event_fd()?, reset: event_fd()? };
    let serial_irq = event_fd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT, 8)?;
    pio.insert(Arc::new(Mutex::new(I8042::new(clone_fd(&stop_events.reset)?))), I8042::PORT_BASE, I8042::PORT_LEN)?;
    let power = AcpiPower::new(clone_fd(&stop_events.power_off)?, clone_fd(&stop_events.reset)?);
    pio.insert(Arc::new(Mutex::new(power)), POWER_PORT_BASE, POWER_PORT_LEN)?;
    let buses = Arc::new(IoBuses { pio, mmio: Bus::new() });
    let vcpus = (0..config.vcpus).map(|i| Vcpu::new(&vm, i)).collect::<Result<_, _>>()?;
    timer.mark("devices, create vCPUs");
    Ok(Prepared { vm, memory, boot_entry, start_info, format, stop_events, serial, buses, vcpus })
}

/// Builds the VM and starts its vCPUs. Console output goes to `serial_out`.
pub fn build(config: &VmConfig, serial_out: SerialOutput) -> Result<Machine, BuildError> {
    let mut timer = PhaseTimer(std::time::Instant::now());
    vcpu::install_kick_handler()?;
    let checks = kvm::BackgroundCheck::start(config.vcpus);
    let prepared = prepare(config, serial_out, &mut timer);
    // A missing capability explains a failure better than the step that tripped on it.
    let supported_cpuid = checks.finish()?;
    let Prepared { vm, memory, boot_entry, start_info, format, stop_events, serial, buses, vcpus } = prepared?;
    timer.mark("capability checks");
    for v in &vcpus {
        v.configure(&supported_cpuid, config.vcpus, &memory, boot_entry, start_info)?;
    }
    timer.mark("configure vCPUs");
    let (events_tx, events_rx) = channel();
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        handles.push(v.start(buses.clone(), events_tx.clone(), clone_fd(&stop_events.vcpu)?)?);
    }
    timer.mark("start vCPU threads");
    let info = MachineInfo {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        kernel: config.kernel.to_string(),
        boot_format: format.to_string(),
    };
    tracing::info!(vcpus = config.vcpus, mem_mib = config.mem_mib, kernel = %info.kernel, format = %info.boot_format, "VM started");
    Ok(Machine::new(info, stop_events, handles, events_rx, serial, buses, vm, memory))
}
