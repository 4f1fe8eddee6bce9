//! The VM's virtio devices: created from the configuration, each on a virtio-mmio
//! transport in its own slot, wired to KVM (an irqfd for its interrupt, an ioeventfd per
//! queue so that a queue notification does not even leave the kernel), and served by the
//! VMM thread's event loop (`runtime::run`).

use crate::arch::x86_64::acpi::MmioDevice;
use crate::arch::x86_64::layout::{VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOT_SIZE};
use crate::config::VmConfig;
use crate::vstate::vm::Vm;
use kvm_ioctls::IoEventAddress;
use novacron_devices::virtio::block::{Block, BlockError};
use novacron_devices::virtio::mmio::MmioTransport;
use novacron_devices::virtio::net::{Net, NetError};
use novacron_devices::virtio::rng::Rng;
use novacron_devices::virtio::{EventSource, VirtioDevice};
use novacron_devices::{Bus, BusError, GuestMemory};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// QueueNotify's offset in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot attach disk {name}")]
    Block {
        name: String,
        #[source]
        source: BlockError,
    },
    #[error("cannot attach network interface {name}")]
    Net {
        name: String,
        #[source]
        source: NetError,
    },
    #[error("cannot create the entropy device")]
    Rng(#[source] novacron_devices::virtio::rng::RngError),
    #[error("cannot create {name}'s interrupt event fd")]
    EventFd {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wire {name} to KVM ({what})")]
    Kvm {
        name: String,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {name} on the MMIO bus")]
    Bus {
        name: String,
        #[source]
        source: BusError,
    },
}

/// One virtio device on its transport.
pub struct VirtioSlot {
    pub name: String,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub mmio: MmioDevice,
}

impl VirtioSlot {
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A queue's event fired: read the event fd, and let a running device do the work.
    pub fn queue_event(&self, queue: usize) {
        let mut t = self.lock();
        if let Some(evt) = t.device().common().queue_events.get(queue) {
            let _ = evt.read();
        }
        if t.is_running() {
            t.device_mut().process_queue(queue);
        }
    }

    /// One of the device's own event sources fired.
    pub fn device_event(&self, id: u32) {
        self.lock().device_mut().handle_event(id);
    }

    pub fn event_sources(&self) -> Vec<EventSource> {
        self.lock().device().event_sources()
    }

    /// The fds of the queue events, by queue index.
    pub fn queue_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.lock().device().common().queue_events.iter().map(|e| e.as_raw_fd()).collect()
    }
}

fn new_device(config: &VmConfig, index: usize, irq: EventFd) -> Result<(String, Box<dyn VirtioDevice>), VirtioError> {
    let (disks, nets) = (config.disks.len(), config.nets.len());
    if index < disks {
        let name = format!("disk{index}");
        let dev = Block::new(&name, &config.disks[index], irq)
            .map_err(|source| VirtioError::Block { name: name.clone(), source })?;
        return Ok((name, Box::new(dev)));
    }
    if index < disks + nets {
        let name = format!("net{}", index - disks);
        let net = &config.nets[index - disks];
        let dev = Net::new(&name, net, config.tap_mode(net), irq)
            .map_err(|source| VirtioError::Net { name: name.clone(), source })?;
        return Ok((name, Box::new(dev)));
    }
    let limits = config.rng.unwrap_or_default();
    Ok(("rng0".to_string(), Box::new(Rng::new("rng0", limits, irq).map_err(VirtioError::Rng)?)))
}

/// Creates every virtio device of `config` in slot order (disks, network interfaces, the
/// entropy device), wires it to KVM and puts it on `mmio`.
pub fn attach(
    config: &VmConfig,
    vm: &Vm,
    memory: &GuestMemory,
    mmio: &mut Bus,
) -> Result<Vec<VirtioSlot>, VirtioError> {
    let count = config.disks.len() + config.nets.len() + usize::from(config.rng.is_some());
    let mut slots = Vec::with_capacity(count);
    for index in 0..count {
        let base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SLOT_SIZE;
        let gsi = VIRTIO_GSI_BASE + index as u32;
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|source| VirtioError::EventFd { name: format!("virtio slot {index}"), source })?;
        let (name, device) = new_device(config, index, irq)?;
        let kvm_err = |what| {
            let name = name.clone();
            move |source| VirtioError::Kvm { name, what, source }
        };
        vm.fd.register_irqfd(device.common().interrupt.irq_fd(), gsi).map_err(kvm_err("irqfd"))?;
        for (queue, evt) in device.common().queue_events.iter().enumerate() {
            vm.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), queue as u32)
                .map_err(kvm_err("ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(device, memory.clone())));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SLOT_SIZE)
            .map_err(|source| VirtioError::Bus { name: name.clone(), source })?;
        tracing::info!(device = %name, base = format_args!("{base:#x}"), gsi, "virtio device attached");
        slots.push(VirtioSlot { name, transport, mmio: MmioDevice { base, size: VIRTIO_MMIO_SLOT_SIZE, gsi } });
    }
    Ok(slots)
}
