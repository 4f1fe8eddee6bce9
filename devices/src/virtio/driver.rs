//! A minimal virtio driver that runs on the host, for tests, benchmarks and fuzzing: it
//! sets a device up through its MMIO registers exactly as a guest would, lays out split
//! queues in guest memory, posts chains and reads the used ring. Not part of the VMM.

use super::mmio::MmioTransport;
use super::status;
use crate::GuestMemory;
use crate::bus::BusDevice;
use vm_memory::{Bytes, GuestAddress};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// One split queue's rings in guest memory, from the driver's side.
pub struct QueueDriver {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl QueueDriver {
    /// Rings for `size` entries starting at `base` (which must be 16-byte aligned).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size)).next_multiple_of(4));
        QueueDriver { size, desc, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// First address after the rings.
    pub fn end(&self) -> u64 {
        self.used.0 + 6 + 8 * u64::from(self.size)
    }

    /// Writes one descriptor table entry.
    pub fn write_desc(&self, mem: &GuestMemory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.0 + 16 * u64::from(index);
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&addr.to_le_bytes());
        entry[8..12].copy_from_slice(&len.to_le_bytes());
        entry[12..14].copy_from_slice(&flags.to_le_bytes());
        entry[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&entry, GuestAddress(at));
    }

    /// Makes `head` available to the device.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2));
    }

    /// Posts a chain of (address, length, device-writable) buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemory, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == buffers.len();
            let flags = if writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.write_desc(mem, index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + buffers.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// The next used element (head, length), if the device has put one.
    pub fn next_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used.0 + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        let at = self.used.0 + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).ok()?;
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }
}

fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Brings a device to DRIVER_OK through its registers, accepting `features` (VERSION_1 is
/// added), with one `QueueDriver` per queue. Returns the final status register.
pub fn initialize(t: &mut MmioTransport, features: u64, queues: &[&QueueDriver]) -> u32 {
    let features = features | super::VIRTIO_F_VERSION_1;
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, status::ACKNOWLEDGE);
    write_reg(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    for (sel, half) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
        write_reg(t, 0x24, sel);
        write_reg(t, 0x20, half);
    }
    let before_queues = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(t, 0x70, before_queues);
    for (index, q) in queues.iter().enumerate() {
        write_reg(t, 0x30, index as u32);
        write_reg(t, 0x38, u32::from(q.size));
        for (low, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
            write_reg(t, low, addr.0 as u32);
            write_reg(t, low + 4, (addr.0 >> 32) as u32);
        }
        write_reg(t, 0x44, 1);
    }
    write_reg(t, 0x70, before_queues | status::DRIVER_OK);
    read_reg(t, 0x70)
}

/// Writes QueueNotify, as a guest kicks a queue.
pub fn notify(t: &mut MmioTransport, queue: u32) {
    write_reg(t, 0x50, queue);
}

/// Reads a register by offset.
pub fn register(t: &mut MmioTransport, offset: u64) -> u32 {
    read_reg(t, offset)
}
