//! Checks a descriptor chain's shape before a device reads it. virtio-queue's iterator
//! stops quietly on a loop (its time-to-live runs out), an index beyond the queue, or a
//! bad indirect table; a chain cut short that way would look like a shorter valid one. So
//! the chain is walked once here: it must end on a descriptor without NEXT, put every
//! device-readable descriptor before the device-writable ones (spec 2.7.4.2), stay inside
//! guest memory, and not be longer than the device accepts.

use crate::GuestMemory;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

/// The longest chain any of our devices takes, in descriptors.
pub const MAX_DESCRIPTORS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is empty")]
    Empty,
    #[error("the chain loops, points past the queue, or has a bad indirect table")]
    Truncated,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("a descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// What the walk found: byte totals of each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainShape {
    pub readable_bytes: u64,
    pub writable_bytes: u64,
    pub descriptors: usize,
}

pub fn check<'a>(chain: &DescriptorChain<&'a GuestMemory>, mem: &'a GuestMemory) -> Result<ChainShape, ChainError> {
    let mut shape = ChainShape { readable_bytes: 0, writable_bytes: 0, descriptors: 0 };
    let mut last_has_next = false;
    let mut seen_writable = false;
    for desc in chain.clone() {
        shape.descriptors += 1;
        if shape.descriptors > MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len > 0 && !mem.check_range(addr, len as usize) {
            return Err(ChainError::OutsideMemory { addr: addr.0, len });
        }
        if desc.is_write_only() {
            seen_writable = true;
            shape.writable_bytes += u64::from(len);
        } else if seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            shape.readable_bytes += u64::from(len);
        }
        last_has_next = desc.has_next();
    }
    match (shape.descriptors, last_has_next) {
        (0, _) => Err(ChainError::Empty),
        (_, true) => Err(ChainError::Truncated),
        _ => Ok(shape),
    }
}
