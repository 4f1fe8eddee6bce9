//! Virtio devices (spec v1.2), kept free of any transport: a [`VirtioDevice`] knows its
//! features, queues and configuration space; [`mmio::MmioTransport`] puts one on the MMIO
//! bus. Queue work happens on the VMM's event-loop thread when a queue's event fd fires
//! (written by KVM through an ioeventfd, or by the transport itself); interrupts leave
//! through [`Interrupt`], an irqfd.
//!
//! Everything a driver writes into a queue is untrusted: a malformed request gets an
//! error status (or nothing) and the device goes on; a driver that breaks the queue itself
//! gets DEVICE_NEEDS_RESET, never a crash of the VMM.

pub mod block;
pub mod chain;
#[cfg(any(test, feature = "test-driver"))]
pub mod driver;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;

use crate::GuestMemory;
use crate::rate_limiter::{BucketUpdate, RateLimiter, RateLimiterError, TokenType};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// Device status bits (spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line and its status register, shared between the device (which
/// raises it) and the transport (where the driver reads and acknowledges it).
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), irq }
    }

    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Restores the status register (snapshot restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }

    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio: cannot raise an interrupt: {e}");
        }
    }
}

/// Something besides a queue notification that a device wants polled: its tap, a rate
/// limiter's timer. `id` is the device's own name for it, given back to `handle_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSource {
    pub fd: RawFd,
    pub id: u32,
    /// Report only changes (EPOLLET): for a tap, which stays readable while the guest has
    /// no receive buffers; the device drains it whenever it can.
    pub edge: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("queue {0} is not ready or does not fit in guest memory")]
    BadQueue(usize),
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// What every virtio device has: features, queues with their event fds, the interrupt,
/// and guest memory once activated. Devices embed it; the transport works through it.
pub struct DeviceCommon {
    pub id: String,
    pub avail_features: u64,
    pub acked_features: u64,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Interrupt,
    pub mem: Option<GuestMemory>,
    /// The driver broke a queue: DEVICE_NEEDS_RESET until it resets the device.
    pub broken: bool,
}

impl DeviceCommon {
    pub fn new(id: &str, avail_features: u64, queue_sizes: &[u16], irq: EventFd) -> std::io::Result<Self> {
        let queues = queue_sizes
            .iter()
            .map(|&size| Queue::new(size).map_err(|e| std::io::Error::other(format!("queue of {size}: {e:?}"))))
            .collect::<Result<_, _>>()?;
        let queue_events = queue_sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<_, _>>()?;
        Ok(DeviceCommon {
            id: id.to_string(),
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            acked_features: 0,
            queues,
            queue_events,
            interrupt: Interrupt::new(irq),
            mem: None,
            broken: false,
        })
    }

    pub fn has_feature(&self, bit: u64) -> bool {
        self.acked_features & bit != 0
    }

    /// Checks the negotiated features and every queue, then keeps the memory.
    pub fn activate(&mut self, mem: GuestMemory) -> Result<(), ActivateError> {
        if !self.has_feature(VIRTIO_F_VERSION_1) {
            return Err(ActivateError::NoVersion1);
        }
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&mem)) {
            return Err(ActivateError::BadQueue(i));
        }
        self.mem = Some(mem);
        Ok(())
    }

    pub fn reset(&mut self) {
        self.acked_features = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.mem = None;
        self.broken = false;
        self.interrupt.set_status(0);
    }

    /// The driver broke the queue itself: stop using it and ask for a reset (spec 2.1.1).
    pub fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            tracing::warn!(device = %self.id, "virtio: {why}; the device needs a reset");
            self.broken = true;
            self.interrupt.raise(INT_CONFIG);
        }
    }
}

/// A virtio device. No method has a default body: a device that forgot one would otherwise
/// silently claim success (see STYLE.md).
pub trait VirtioDevice: Send {
    /// Device type (1 net, 2 block, 4 entropy).
    fn device_type(&self) -> u32;
    fn common(&self) -> &DeviceCommon;
    fn common_mut(&mut self) -> &mut DeviceCommon;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The common activation succeeded: start work that needs memory (net starts reading).
    fn activated(&mut self);
    /// The driver is resetting the device: drop in-flight work, before the common reset.
    fn reset_device(&mut self);
    /// Queue `index`'s event fired (its event fd has been read already).
    fn process_queue(&mut self, index: usize);
    /// The device's other event sources.
    fn event_sources(&self) -> Vec<EventSource>;
    /// An event source of `event_sources` fired.
    fn handle_event(&mut self, id: u32);
    /// Changes a rate limiter of the running device (`set-limit`).
    fn set_rate_limits(
        &mut self,
        target: LimitTarget,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), LimitError>;
    /// The device's whole state (see `persist`).
    fn save_state(&self) -> persist::DeviceState;
    /// Checks `state` completely against this device, then applies it; on an error the
    /// device is unchanged.
    fn restore_state(&mut self, state: &persist::DeviceState, mem: &GuestMemory) -> Result<(), persist::PersistError>;
}

/// Which of a device's rate limiters a `set-limit` is for: block and entropy devices have
/// one, network devices one per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitTarget {
    Device,
    Rx,
    Tx,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{device} has no {target:?} rate limiter (use {expected})")]
    NoSuchLimiter { device: String, target: LimitTarget, expected: &'static str },
    #[error(transparent)]
    Limiter(#[from] RateLimiterError),
}

/// Asks `limiter` for one request of `bytes`: an operation and its bytes, or neither.
pub fn admit(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// `set_rate_limits` of a device with a single limiter: only `LimitTarget::Device` names it.
/// Returns whether the limiter now lets requests through, so that the device resumes.
pub fn update_limiter(
    limiter: &mut RateLimiter,
    device: &str,
    target: LimitTarget,
    bandwidth: BucketUpdate,
    ops: BucketUpdate,
) -> Result<bool, LimitError> {
    if target != LimitTarget::Device {
        return Err(LimitError::NoSuchLimiter { device: device.to_string(), target, expected: "device" });
    }
    limiter.update_buckets(bandwidth, ops)?;
    Ok(!limiter.is_blocked())
}

/// The limiter's timer fired: unblock it. A spurious wake-up (an update unblocked it in
/// between) is harmless.
pub fn limiter_fired(limiter: &mut RateLimiter, device: &str) {
    match limiter.event_handler() {
        Ok(()) | Err(RateLimiterError::SpuriousEvent) => {}
        Err(e) => tracing::warn!(device, "rate limiter timer: {e}"),
    }
}

/// What a device's chain handler decided.
pub enum Served {
    /// The chain is done; this many bytes were written into it.
    Used(u32),
    /// Not now (a rate limiter said no): the chain goes back and the queue waits.
    Later,
}

/// Pops every available chain of queue `index` and hands it to `handle`, then puts it in
/// the used ring, and raises the interrupt if the driver wants one. A broken ring (an
/// available index running away, a used ring outside memory) marks the device broken.
pub fn serve_queue(
    common: &mut DeviceCommon,
    index: usize,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>, &GuestMemory) -> Served,
) {
    let Some(mem) = common.mem.clone() else { return };
    if common.broken || index >= common.queues.len() {
        return;
    }
    let mut used_any = false;
    loop {
        let chain = match virtio_queue::QueueOwnedT::iter(&mut common.queues[index], &mem) {
            Ok(mut avail) => avail.next(),
            Err(e) => return common.mark_broken(&format!("queue {index}'s available ring is invalid ({e})")),
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        match handle(chain, &mem) {
            Served::Used(len) => {
                if let Err(e) = common.queues[index].add_used(&mem, head, len) {
                    return common.mark_broken(&format!("queue {index}'s used ring cannot be written ({e})"));
                }
                used_any = true;
            }
            Served::Later => {
                virtio_queue::QueueOwnedT::go_to_previous_position(&mut common.queues[index]);
                break;
            }
        }
    }
    if used_any {
        match common.queues[index].needs_notification(&mem) {
            Ok(true) => common.interrupt.raise(INT_USED_RING),
            Ok(false) => {}
            Err(e) => common.mark_broken(&format!("queue {index}'s used event cannot be read ({e})")),
        }
    }
}
