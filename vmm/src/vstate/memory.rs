//! Guest memory: anonymous mappings with a dirty bitmap (vm-memory's `AtomicBitmap`), so
//! that migration can combine KVM's dirty log with the VMM's own writes into the guest.

use crate::arch::x86_64::layout::ram_ranges;
pub use novacron_devices::GuestMemory;
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Total RAM of the host in bytes, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Maps `bytes` of guest memory laid out around the MMIO hole. The mapping reserves no
/// memory up front (pages come on first touch); the configuration refuses a VM larger than
/// the host beforehand, so that it is not killed by the OOM killer later.
pub fn create(bytes: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<_> = ram_ranges(bytes).into_iter().map(|(a, s)| (a, s as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib: bytes >> 20, source })
}
