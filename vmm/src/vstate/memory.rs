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

/// A range of guest memory that could not be dropped.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop the {len} bytes of guest memory at {addr:#x}")]
pub struct DiscardError {
    pub addr: usize,
    pub len: usize,
    #[source]
    pub source: std::io::Error,
}

/// Ranges one process_madvise(2) call takes at most (the kernel's UIO_MAXIOV).
const DISCARD_BATCH: usize = 1024;

/// Ranges at least this long are moved away rather than dropped in place.
const MOVE_AWAY_BYTES: usize = 64 * 4096;

/// Ranges moved away in one call at most: each one splits the mapping, and a process has
/// at most `vm.max_map_count` (65,530 by default) mappings.
const MOVE_AWAY_MAX: usize = 4096;

/// Drops the pages of `ranges` (host address and length, page-aligned): anonymous memory
/// reads as zeroes after, or as missing where a userfaultfd is registered.
///
/// Freeing the pages is what costs (256 MiB: 20-30 ms here), so long ranges are moved
/// away instead with mremap(2)'s MREMAP_DONTUNMAP, which leaves the range mapped and empty
/// (and registered with its userfaultfd) in well under a millisecond, and a thread of its
/// own frees the moved pages. Scattered pages are dropped with process_madvise(2), up to
/// 1024 ranges a call: Linux 6.13 and later take MADV_DONTNEED there and flush the TLB
/// once a call, where one madvise(2) a range flushes it every time (32,768 scattered
/// pages: 35 against 105 ms here). A kernel that refuses either gets one madvise(2) a range.
///
/// # Safety
/// Every range must lie in a private anonymous mapping of this process whose contents no
/// one relies on from now on (no vCPU runs and no device touches guest memory).
pub unsafe fn discard(ranges: &[(usize, usize)]) -> Result<(), DiscardError> {
    let mut moved = Vec::new();
    let mut in_place = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        if len >= MOVE_AWAY_BYTES && moved.len() < MOVE_AWAY_MAX {
            // The pages go to a new mapping the kernel places where nothing is; the range stays
            // mapped, empty. The variadic new address is given (null: no hint), or the kernel
            // reads garbage and refuses.
            // SAFETY: the caller promises private anonymous memory of ours that nothing relies on.
            let to = unsafe {
                libc::mremap(
                    addr as *mut libc::c_void,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            if to != libc::MAP_FAILED {
                moved.push((to as usize, len));
                continue;
            }
            tracing::debug!("mremap refused ({}): the range is dropped in place", std::io::Error::last_os_error());
        }
        in_place.push((addr, len));
    }
    free_in_background(moved);
    // process_madvise names its process by a pidfd: this one's, opened once.
    let mut pidfd = if in_place.is_empty() { None } else { own_pidfd().ok() };
    for batch in in_place.chunks(DISCARD_BATCH) {
        if let Some(fd) = &pidfd {
            match process_madvise_dontneed(fd, batch) {
                Ok(()) => continue,
                // Not this kernel's (old, or MADV_DONTNEED not taken there): range by range.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)) => {
                    tracing::debug!("process_madvise refused ({e}): one madvise a range");
                    pidfd = None
                }
                // Any other failure is found, and named, range by range.
                Err(_) => {}
            }
        }
        for &(addr, len) in batch {
            // SAFETY: the caller promises private anonymous memory of ours that nothing relies on.
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
                return Err(DiscardError { addr, len, source: std::io::Error::last_os_error() });
            }
        }
    }
    Ok(())
}

/// Unmaps the mappings `discard` moved pages to, on a thread of its own (here if none can
/// start).
fn free_in_background(moved: Vec<(usize, usize)>) {
    if moved.is_empty() {
        return;
    }
    let free = |moved: &[(usize, usize)]| {
        for &(addr, len) in moved {
            // SAFETY: the mapping was made by mremap in `discard` and nothing else knows it.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    };
    let shared = std::sync::Arc::new(moved);
    let theirs = shared.clone();
    if std::thread::Builder::new().name("discard".into()).spawn(move || free(&theirs)).is_err() {
        free(&shared);
    }
}

/// A pidfd of this process, for process_madvise(2).
fn own_pidfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// One process_madvise(2) call with MADV_DONTNEED on this process (`pidfd`); an error also
/// when the kernel advised less than all of `batch`.
fn process_madvise_dontneed(pidfd: &std::os::fd::OwnedFd, batch: &[(usize, usize)]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let iov: Vec<libc::iovec> =
        batch.iter().map(|&(addr, len)| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len }).collect();
    let (fd, iovs, n) = (pidfd.as_raw_fd(), iov.as_ptr(), iov.len());
    // SAFETY: the kernel reads `n` iovecs at `iovs` (alive across the call); `discard`'s caller answers for the ranges.
    let advised = unsafe { libc::syscall(libc::SYS_process_madvise, fd, iovs, n, libc::MADV_DONTNEED, 0) };
    let wanted: usize = batch.iter().map(|&(_, len)| len).sum();
    match advised {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n if n as usize == wanted => Ok(()),
        n => Err(std::io::Error::other(format!("process_madvise dropped {n} of {wanted} bytes"))),
    }
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

    #[test]
    fn discarded_pages_read_zeroes_and_the_others_keep_their_contents() {
        let mem = create(16 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let pages = (16u64 << 20) / 4096;
        for p in 0..pages {
            mem.write_obj(p + 1, GuestAddress(p * 4096)).unwrap();
        }
        // Every third page, and one run of 8: more ranges than one batch takes.
        let mut dropped: Vec<u64> = (0..pages).filter(|p| p % 3 == 0).collect();
        dropped.retain(|p| !(100..108).contains(p));
        let mut ranges: Vec<(usize, usize)> =
            dropped.iter().map(|&p| (region.as_ptr() as usize + (p * 4096) as usize, 4096)).collect();
        ranges.push((region.as_ptr() as usize + 100 * 4096, 8 * 4096));
        dropped.extend(100..108);
        // A long run, moved away, and the page after it, which stays.
        dropped.retain(|p| !(1000..1601).contains(p));
        ranges.push((region.as_ptr() as usize + 1000 * 4096, 600 * 4096));
        dropped.extend(1000..1600);
        assert!(ranges.len() > DISCARD_BATCH);
        // SAFETY: the ranges lie in `mem`, which this test alone uses.
        unsafe { discard(&ranges) }.unwrap();
        for p in 0..pages {
            let word: u64 = mem.read_obj(GuestAddress(p * 4096)).unwrap();
            assert_eq!(word, if dropped.contains(&p) { 0 } else { p + 1 }, "page {p}");
        }
        // The dropped ranges are still guest memory: written again, they keep it.
        mem.write_obj(7u64, GuestAddress(1200 * 4096)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(1200 * 4096)).unwrap(), 7);
    }

    #[test]
    fn a_range_that_is_not_mapped_is_named() {
        // SAFETY: a fresh mapping of this test's, unmapped at once, so that nothing is there.
        let addr = unsafe {
            let a = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(a, libc::MAP_FAILED);
            assert_eq!(libc::munmap(a, 4096), 0);
            a as usize
        };
        // SAFETY: nothing is mapped there, so nothing can be relied on.
        let e = unsafe { discard(&[(addr, 4096)]) }.unwrap_err();
        assert_eq!((e.addr, e.len), (addr, 4096));
        assert_eq!(e.source.raw_os_error(), Some(libc::ENOMEM), "{e}");
    }
}
