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

/// /proc/self/pagemap: one 64-bit entry per page of the address space.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// The pages of an anonymous guest memory region that were ever touched (present in RAM
/// or swapped out), one bit per page, from /proc/self/pagemap. The others have never been
/// written and read as zeroes, so a migration need not even read them.
///
/// None when the region maps a file (a restored snapshot: its absent pages are in the file,
/// not zeroes) or pagemap cannot be read; then every page counts as touched.
pub fn touched_pages(region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>) -> Option<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    use vm_memory::GuestMemoryRegion;
    if region.file_offset().is_some() {
        return None;
    }
    let page = 4096u64;
    let pages = region.len() / page;
    let first = region.as_ptr() as u64 / page;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
    // A chunk of entries at a time: 1 MiB of entries describes 512 MiB of memory.
    const CHUNK: u64 = 8192;
    let mut entries = vec![0u8; (CHUNK * 8) as usize];
    let mut done = 0u64;
    while done < pages {
        let n = CHUNK.min(pages - done);
        let bytes = &mut entries[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (first + done) * 8).ok()?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            if u64::from_ne_bytes(w) & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                let p = done + i as u64;
                bitmap[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        done += n;
    }
    Some(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn touched_pages_are_the_written_ones() {
        let mem = create(64 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let before = touched_pages(region).unwrap();
        assert!(before.iter().all(|w| *w == 0), "fresh memory has no touched page");
        mem.write_slice(&[1], GuestAddress(5 * 4096 + 100)).unwrap();
        mem.write_slice(&[1], GuestAddress(4000 * 4096)).unwrap();
        let after = touched_pages(region).unwrap();
        let set: Vec<u64> =
            (0..(64u64 << 20) / 4096).filter(|p| after[(p / 64) as usize] & (1 << (p % 64)) != 0).collect();
        assert_eq!(set, vec![5, 4000]);
    }
}
