//! An address bus: maps ranges of port-I/O or MMIO addresses to devices.
//!
//! A bus is built before the vCPUs start and is read-only afterwards, so lookups take no
//! lock; each device has its own mutex, held only for the access itself.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base of the range it was inserted at.
/// An access the device does not understand is ignored (writes) or reads as all ones,
/// the way real hardware answers an unclaimed cycle: a guest must never crash the VMM.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        if let Some(e) = self.entries.iter().find(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap { base, len, other: e.base });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    /// The device whose range holds the whole access, and the access's offset in it.
    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &self.entries[i];
        let offset = addr - e.base;
        (offset.checked_add(size as u64)? <= e.len).then_some((e, offset))
    }

    /// Dispatches a read. Returns false, with `data` set to all ones, when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                e.device.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                e.device.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn test_bus_dispatch_inside_range_reaches_device_with_offset() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(probe.clone(), 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert!(bus.write(0x3f8, &[0x41]));

        assert_eq!(data, [5]);
        assert_eq!(probe.lock().unwrap().last_write, Some((0, vec![0x41])));
    }

    #[test]
    fn test_bus_access_outside_or_straddling_range_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Probe::default())), 0x60, 5).unwrap();

        let mut below = [0u8; 1];
        let mut straddle = [0u8; 4];
        assert!(!bus.read(0x5f, &mut below));
        assert!(!bus.read(0x63, &mut straddle));
        assert!(!bus.write(0x65, &[1]));
        assert_eq!(below, [0xff]);
        assert_eq!(straddle, [0xff; 4]);
    }

    #[test]
    fn test_bus_insert_overlapping_or_empty_range_is_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Probe::default())), 0x100, 0x10).unwrap();

        let overlap = bus.insert(Arc::new(Mutex::new(Probe::default())), 0x10f, 2);
        let empty = bus.insert(Arc::new(Mutex::new(Probe::default())), 0x200, 0);
        let wraps = bus.insert(Arc::new(Mutex::new(Probe::default())), u64::MAX, 2);

        assert_eq!(overlap, Err(BusError::Overlap { base: 0x10f, len: 2, other: 0x100 }));
        assert_eq!(empty, Err(BusError::InvalidRange { base: 0x200, len: 0 }));
        assert_eq!(wraps, Err(BusError::InvalidRange { base: u64::MAX, len: 2 }));
    }
}
