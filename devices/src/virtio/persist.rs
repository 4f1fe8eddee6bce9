//! Saving and restoring a virtio device with its transport.
//!
//! A saved state is plain data (serde), versioned, and treated as untrusted: it may come
//! from a file or over the network. Restoring goes into a device freshly built from the
//! same configuration, in two steps: every part of the state is checked against that
//! device first (versions, features it offers, queue count and sizes, queue rings inside
//! guest memory, the backing file's size), and only then is anything changed. A state
//! that does not fit gives an error naming what differs; the device stays as it was.

use super::block::BlockState;
use super::mmio::MmioRegisters;
use super::net::NetState;
use super::rng::RngState;
use super::{DeviceCommon, status};
use crate::GuestMemory;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// Version of the transport and common device sections. Readers accept exactly this
/// version for now; the N-1 window starts with the first format change.
pub const VIRTIO_STATE_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("{section} state version {found} is not the supported version {expected}")]
    Version { section: &'static str, found: u16, expected: u16 },
    #[error("the saved state is for a {saved} device, this one is a {current}")]
    WrongDevice { saved: &'static str, current: &'static str },
    #[error("saved {what} ({saved}) does not match this device ({current})")]
    Mismatch { what: &'static str, saved: String, current: String },
    #[error("saved queue {index} is invalid: {reason}")]
    BadQueue { index: usize, reason: String },
    #[error("the saved registers are inconsistent: {0}")]
    BadRegisters(&'static str),
    #[error("the saved rate limiter is invalid: {0}")]
    Limiter(String),
    #[error("the device cannot be brought back: {0}")]
    Device(String),
}

/// A queue as saved. Mirrors virtio-queue's `QueueState`, which has no serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// A live queue, through virtio-queue's validating conversion.
    fn to_queue(self, index: usize) -> Result<Queue, PersistError> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| PersistError::BadQueue { index, reason: format!("{e:?}") })
    }
}

/// What every virtio device saves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonState {
    pub acked_features: u64,
    pub queues: Vec<QueueSnapshot>,
    pub interrupt_status: u32,
    pub activated: bool,
    pub broken: bool,
}

/// The common part, checked and ready to apply.
pub struct CheckedCommon {
    state: CommonState,
    queues: Vec<Queue>,
}

impl DeviceCommon {
    pub fn save(&self) -> CommonState {
        CommonState {
            acked_features: self.acked_features,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            interrupt_status: self.interrupt.status(),
            activated: self.mem.is_some(),
            broken: self.broken,
        }
    }

    /// Checks `state` against this device without changing it.
    pub fn check_restore(&self, state: &CommonState, mem: &GuestMemory) -> Result<CheckedCommon, PersistError> {
        if state.acked_features & !self.avail_features != 0 {
            return Err(PersistError::Mismatch {
                what: "features",
                saved: format!("{:#x}", state.acked_features),
                current: format!("offered {:#x}", self.avail_features),
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(PersistError::Mismatch {
                what: "queue count",
                saved: state.queues.len().to_string(),
                current: self.queues.len().to_string(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(PersistError::BadQueue {
                    index,
                    reason: format!("maximum size {} is not {}", saved.max_size, current.max_size()),
                });
            }
            let queue = saved.to_queue(index)?;
            if state.activated && !queue.is_valid(mem) {
                return Err(PersistError::BadQueue { index, reason: "its rings are not inside guest memory".into() });
            }
            queues.push(queue);
        }
        if state.interrupt_status & !(super::INT_USED_RING | super::INT_CONFIG) != 0 {
            return Err(PersistError::BadRegisters("unknown interrupt status bits"));
        }
        Ok(CheckedCommon { state: state.clone(), queues })
    }

    pub fn apply_restore(&mut self, checked: CheckedCommon, mem: &GuestMemory) {
        self.acked_features = checked.state.acked_features;
        self.queues = checked.queues;
        self.interrupt.set_status(checked.state.interrupt_status);
        self.mem = checked.state.activated.then(|| mem.clone());
        self.broken = checked.state.broken;
    }
}

/// A device's whole state, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    Rng(RngState),
}

impl DeviceState {
    pub fn common(&self) -> &CommonState {
        match self {
            DeviceState::Block(s) => &s.common,
            DeviceState::Net(s) => &s.common,
            DeviceState::Rng(s) => &s.common,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Rng(_) => "rng",
        }
    }
}

/// A transport with its device, as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    pub version: u16,
    pub registers: MmioRegisters,
    pub device: DeviceState,
}

/// Checks that saved registers agree with the device state they come with.
pub fn check_registers(regs: &MmioRegisters, common: &CommonState) -> Result<(), PersistError> {
    const KNOWN: u32 = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK | status::FEATURES_OK | status::FAILED;
    if regs.status & !KNOWN != 0 {
        return Err(PersistError::BadRegisters("unknown status bits"));
    }
    let driver_ok = regs.status & status::DRIVER_OK != 0;
    if common.activated && !driver_ok {
        return Err(PersistError::BadRegisters("an activated device without DRIVER_OK"));
    }
    Ok(())
}

/// The error for a state of another kind of device.
pub fn wrong_device(saved: &DeviceState, current: &'static str) -> PersistError {
    PersistError::WrongDevice { saved: saved.kind(), current }
}

/// Checks a section version.
pub fn check_version(section: &'static str, found: u16, expected: u16) -> Result<(), PersistError> {
    if found == expected { Ok(()) } else { Err(PersistError::Version { section, found, expected }) }
}

/// Compares one saved property with the device's.
pub fn check_same<T: PartialEq + std::fmt::Debug>(
    what: &'static str,
    saved: &T,
    current: &T,
) -> Result<(), PersistError> {
    if saved == current {
        Ok(())
    } else {
        Err(PersistError::Mismatch { what, saved: format!("{saved:?}"), current: format!("{current:?}") })
    }
}
