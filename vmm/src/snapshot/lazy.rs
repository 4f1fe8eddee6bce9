//! Lazy restore: the guest runs before its memory has been read.
//!
//! Guest memory is anonymous and registered with a userfaultfd (`crate::vstate::uffd`).
//! A loader thread fills it from the snapshot's memory file a chunk (2 MiB) at a time, and
//! checks each chunk against its CRC before any of it is mapped: first the chunks that
//! something faults on (a vCPU through KVM, a device, the VMM), and between faults the next
//! chunk in order, until all are in. A chunk that is a hole in the file gets zero pages.
//! Then the ranges go back to the kernel and the thread ends; the VM no longer needs the
//! file.
//!
//! A chunk that fails its CRC, or cannot be read, is never mapped, so the guest cannot see
//! it; but the VM cannot go on without it. The loader hands the error to `on_lost`, which
//! ends the process (`crate::process`): the VM stops as on a host crash, with the chunk
//! named. An eager restore (`snapshot::map_memory`) finds the same damage before the guest
//! runs, at the cost of reading the whole file first.

use super::{CHUNK_BYTES, MemoryInfo, SnapshotError, io, open_memory};
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::uffd::{PAGE, UffdError, Userfault};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {file} chunk {chunk}")]
    Read {
        file: String,
        chunk: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} chunk {chunk} fails its checksum: the memory image was altered or damaged")]
    Checksum { file: String, chunk: usize },
    #[error("a page fault at {0:#x} is outside guest memory")]
    Outside(u64),
    #[error("cannot fill guest memory")]
    Fill(#[source] UffdError),
}

/// How far the loader is, for status and logs.
#[derive(Debug)]
pub struct LoadProgress {
    pub total_bytes: u64,
    loaded_bytes: AtomicU64,
    /// Chunks loaded because something faulted on them (the rest were prefetched).
    on_demand: AtomicU64,
    done_us: AtomicU64,
    done: AtomicBool,
    started: Instant,
}

/// A snapshot of `LoadProgress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadFigures {
    pub loaded_bytes: u64,
    pub total_bytes: u64,
    pub on_demand_chunks: u64,
    /// Milliseconds until everything was in (or so far).
    pub elapsed_ms: u64,
    pub done: bool,
}

impl LoadProgress {
    pub fn figures(&self) -> LoadFigures {
        let done = self.done.load(Ordering::Acquire);
        LoadFigures {
            loaded_bytes: self.loaded_bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes,
            on_demand_chunks: self.on_demand.load(Ordering::Relaxed),
            elapsed_ms: if done {
                self.done_us.load(Ordering::Relaxed) / 1000
            } else {
                self.started.elapsed().as_millis() as u64
            },
            done,
        }
    }
}

/// The loader of a lazily restored VM's memory. Dropping it stops the loader and gives
/// the memory back to the kernel (what was not loaded then reads as zeroes): drop it only
/// once nothing runs on that memory any more.
pub struct LazyMemory {
    progress: Arc<LoadProgress>,
    stop: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LazyMemory {
    pub fn progress(&self) -> LoadFigures {
        self.progress.figures()
    }

    /// Lets the prefetch begin. Until then only faults are served: the VM is being built,
    /// and a loader reading ahead would take the CPU its build needs.
    pub fn start_prefetch(&self) {
        self.go.store(true, Ordering::Release);
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One guest memory region's place in the memory file.
#[derive(Debug, Clone, Copy)]
struct Piece {
    file_offset: u64,
    host: usize,
    len: u64,
}

/// What the loader does between faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// Loads the next chunk in order, until all are in.
    InOrder,
    /// Nothing: only what is touched is loaded (the loader runs until dropped).
    None,
}

/// KVM's paravirtual MSRs that hold a guest-physical address (low bits are flags): the
/// clock, steal time, async page faults, PV EOI. Restoring them makes KVM write there.
const GPA_MSRS: [u32; 5] = [0x12, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04];

/// Guest-physical addresses a restored VM touches first: the pages KVM's paravirtual
/// MSRs name (KVM writes them while the vCPU state goes in), and each vCPU's instruction
/// and stack pointers taken as physical addresses (right for an identity-mapped kernel; a
/// chunk loaded a little early otherwise, or none when they are outside guest memory).
pub fn first_touched(state: &super::SavedState) -> Vec<u64> {
    let mut addresses = Vec::new();
    for vcpu in &state.vcpus {
        addresses.extend(
            vcpu.msrs.iter().filter(|m| GPA_MSRS.contains(&m.index) && m.data & 1 != 0).map(|m| m.data & !0x3f),
        );
        addresses.extend([vcpu.regs.rip, vcpu.regs.rsp]);
    }
    addresses
}

/// Maps fresh guest memory for the snapshot memory `info` (in directory `dir`) and starts
/// the loader that fills it. Nothing is read here: the guest can start at once. The
/// chunks holding the guest-physical addresses `first` load first, while the VM is built;
/// the rest as `prefetch` says. `on_lost` gets the error that makes the memory impossible
/// to complete, and must end the process.
pub fn map_lazily(
    dir: &std::path::Path,
    info: &MemoryInfo,
    prefetch: Prefetch,
    first: &[u64],
    on_lost: impl FnOnce(&LoadError) + Send + 'static,
) -> Result<(GuestMemory, LazyMemory), SnapshotError> {
    let (file, total) = open_memory(dir, info)?;
    let path = dir.join(&info.file);
    let memory = memory::create(total).map_err(|e| SnapshotError::Map(crate::process::error_chain(&e)))?;
    let mut pieces = Vec::new();
    let mut first_chunks = Vec::new();
    let mut offset = 0;
    for region in memory.iter() {
        pieces.push(Piece { file_offset: offset, host: region.as_ptr() as usize, len: region.len() });
        let gpa = region.start_addr().0;
        for &a in first.iter().filter(|&&a| a >= gpa && a - gpa < region.len()) {
            first_chunks.push(((offset + a - gpa) / CHUNK_BYTES) as usize);
        }
        offset += region.len();
    }
    first_chunks.sort_unstable();
    first_chunks.dedup();
    if offset != total {
        return Err(SnapshotError::Inconsistent(format!("{offset} bytes of guest memory for {total} in the snapshot")));
    }
    let uffd = Userfault::new().map_err(SnapshotError::Userfault)?;
    for p in &pieces {
        uffd.register(p.host as *mut u8, p.len as usize).map_err(SnapshotError::Userfault)?;
    }
    let progress = Arc::new(LoadProgress {
        total_bytes: total,
        loaded_bytes: AtomicU64::new(0),
        on_demand: AtomicU64::new(0),
        done_us: AtomicU64::new(0),
        done: AtomicBool::new(false),
        started: Instant::now(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let loader = Loader {
        uffd,
        file,
        name: info.file.clone(),
        pieces,
        crcs: info.chunk_crcs.clone(),
        loaded: vec![false; info.chunk_crcs.len()],
        prefetch,
        first: first_chunks,
        _memory: memory.clone(),
        total,
        buf: Vec::new(),
        zero_crc: None,
        progress: progress.clone(),
        stop: stop.clone(),
        go: go.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("memory-loader".into())
        .spawn(move || loader.run(on_lost))
        .map_err(io("start the memory loader for", &path))?;
    Ok((memory, LazyMemory { progress, stop, go, thread: Some(thread) }))
}

/// How long a loader without prefetching waits on the fd between looks at its stop flag.
const STOP_POLL_MS: i32 = 50;

struct Loader {
    uffd: Userfault,
    file: File,
    /// The memory file's name, for errors.
    name: String,
    pieces: Vec<Piece>,
    crcs: Vec<u32>,
    loaded: Vec<bool>,
    prefetch: Prefetch,
    /// Chunks to load before the others (`first_touched`), as soon as no fault waits.
    first: Vec<usize>,
    /// The memory it fills: its mappings last as long as the loader.
    _memory: GuestMemory,
    total: u64,
    buf: Vec<u8>,
    /// The CRC of a whole chunk of zeroes, once needed.
    zero_crc: Option<u32>,
    progress: Arc<LoadProgress>,
    stop: Arc<AtomicBool>,
    /// Set once the prefetch may begin (`LazyMemory::start_prefetch`).
    go: Arc<AtomicBool>,
}

/// How long a loader waits for a fault before it looks at its flags again, until the
/// prefetch begins.
const GO_POLL_MS: i32 = 1;

impl Loader {
    fn run(mut self, on_lost: impl FnOnce(&LoadError)) {
        match self.serve() {
            Ok(()) => {
                // Everything is in, or the VM is gone: the memory is the kernel's again.
                for p in &self.pieces {
                    if let Err(e) = self.uffd.unregister(p.host as *mut u8, p.len as usize) {
                        tracing::warn!("lazy restore: {}", crate::process::error_chain(&e));
                    }
                }
            }
            Err(e) => {
                on_lost(&e);
                // The fd stays open, the ranges registered, until the VM is gone: whatever
                // faults on what is missing waits, rather than reading zeroes.
                while !self.stop.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(STOP_POLL_MS as u64));
                }
            }
        }
    }

    fn serve(&mut self) -> Result<(), LoadError> {
        // Touched now, while the VM is built, so that the first fault does not pay for it.
        self.buf = vec![0xff; CHUNK_BYTES as usize];
        let mut faults = Vec::new();
        let mut next = 0;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            faults.clear();
            self.uffd.read_faults(&mut faults).map_err(LoadError::Fill)?;
            for &address in &faults {
                let chunk = self.chunk_of(address).ok_or(LoadError::Outside(address))?;
                if self.loaded[chunk] {
                    // Filled after the fault was raised; wake its thread if it still waits.
                    let page = address & !(PAGE as u64 - 1);
                    self.uffd.wake(page as *mut u8, PAGE).map_err(LoadError::Fill)?;
                } else {
                    self.load(chunk, Some(address))?;
                    self.progress.on_demand.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !faults.is_empty() {
                continue;
            }
            if let Some(chunk) = self.first.pop() {
                if !self.loaded[chunk] {
                    self.load(chunk, None)?;
                }
                continue;
            }
            if self.prefetch == Prefetch::None {
                // Only faults give work: wait for one, looking at the stop flag now and then.
                self.uffd.wait(STOP_POLL_MS).map_err(LoadError::Fill)?;
                continue;
            }
            if !self.go.load(Ordering::Acquire) {
                self.uffd.wait(GO_POLL_MS).map_err(LoadError::Fill)?;
                continue;
            }
            while next < self.loaded.len() && self.loaded[next] {
                next += 1;
            }
            if next == self.loaded.len() {
                self.progress.done_us.store(self.progress.started.elapsed().as_micros() as u64, Ordering::Relaxed);
                self.progress.done.store(true, Ordering::Release);
                let figures = self.progress.figures();
                tracing::info!(
                    mib = self.total >> 20,
                    ms = figures.elapsed_ms,
                    on_demand_chunks = figures.on_demand_chunks,
                    chunks = self.loaded.len(),
                    "lazy restore: all of the snapshot's memory is in"
                );
                return Ok(());
            }
            // One chunk, then the faults that came meanwhile go first.
            self.load(next, None)?;
        }
    }

    /// Where in the memory file the byte at host address `address` of guest memory is.
    fn file_offset_of(&self, address: u64) -> Option<u64> {
        let a = address as usize;
        let p = self.pieces.iter().find(|p| a >= p.host && ((a - p.host) as u64) < p.len)?;
        Some(p.file_offset + (a - p.host) as u64)
    }

    /// The chunk of the memory file that holds host address `address` of guest memory.
    fn chunk_of(&self, address: u64) -> Option<usize> {
        let chunk = (self.file_offset_of(address)? / CHUNK_BYTES) as usize;
        (chunk < self.loaded.len()).then_some(chunk)
    }

    /// Reads `chunk`, checks its CRC, and fills the guest pages it holds; the page at
    /// `fault` (a guest address that waits) first, so that its thread goes on before the
    /// rest of the chunk is copied.
    fn load(&mut self, chunk: usize, fault: Option<u64>) -> Result<(), LoadError> {
        let at = chunk as u64 * CHUNK_BYTES;
        let n = (self.total - at).min(CHUNK_BYTES);
        let expected = self.crcs[chunk];
        let hole = self.is_hole(at, n);
        if hole {
            if self.zero_crc(n) != expected {
                return Err(LoadError::Checksum { file: self.name.clone(), chunk });
            }
        } else {
            let buf = &mut self.buf[..n as usize];
            self.file.read_exact_at(buf, at).map_err(|source| LoadError::Read {
                file: self.name.clone(),
                chunk,
                source,
            })?;
            if crc32fast::hash(buf) != expected {
                return Err(LoadError::Checksum { file: self.name.clone(), chunk });
            }
            if let Some(address) = fault {
                let page = address & !(PAGE as u64 - 1);
                if let Some(offset) = self.file_offset_of(page).filter(|o| (at..at + n).contains(o)) {
                    let from = (offset - at) as usize;
                    self.uffd.copy(page as *mut u8, &self.buf[from..from + PAGE]).map_err(LoadError::Fill)?;
                }
            }
        }
        for p in &self.pieces {
            let start = at.max(p.file_offset);
            let end = (at + n).min(p.file_offset + p.len);
            if start >= end {
                continue;
            }
            let host = (p.host + (start - p.file_offset) as usize) as *mut u8;
            let filled = if hole {
                self.uffd.zero(host, (end - start) as usize)
            } else {
                self.uffd.copy(host, &self.buf[(start - at) as usize..(end - at) as usize])
            };
            filled.map_err(LoadError::Fill)?;
        }
        self.loaded[chunk] = true;
        self.progress.loaded_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the file has no data in `[at, at + n)` (a hole reads as zeroes).
    fn is_hole(&self, at: u64, n: u64) -> bool {
        // SAFETY: lseek on the file this loader owns; it changes only the file's offset,
        // which nothing here uses (reads are positioned).
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `at`. Anything else: read it to be sure.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= at + n
    }

    fn zero_crc(&mut self, n: u64) -> u32 {
        if n == CHUNK_BYTES
            && let Some(crc) = self.zero_crc
        {
            return crc;
        }
        let crc = crc32fast::hash(&vec![0u8; n as usize]);
        if n == CHUNK_BYTES {
            self.zero_crc = Some(crc);
        }
        crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Receiver, channel};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    const CHUNKS: u64 = 4;
    const HOLE: u64 = 1;

    /// A memory file of four chunks, the second a hole; each other chunk holds its number
    /// in every word.
    fn memory_file(dir: &std::path::Path) -> MemoryInfo {
        let file = File::create(dir.join("memory.bin")).unwrap();
        file.set_len(CHUNKS * CHUNK_BYTES).unwrap();
        let mut crcs = Vec::new();
        for chunk in 0..CHUNKS {
            let bytes: Vec<u8> = if chunk == HOLE {
                vec![0; CHUNK_BYTES as usize]
            } else {
                std::iter::repeat_n((chunk + 1).to_le_bytes(), CHUNK_BYTES as usize / 8).flatten().collect()
            };
            if chunk != HOLE {
                file.write_all_at(&bytes, chunk * CHUNK_BYTES).unwrap();
            }
            crcs.push(crc32fast::hash(&bytes));
        }
        MemoryInfo { region_sizes: vec![CHUNKS * CHUNK_BYTES], chunk_crcs: crcs, file: "memory.bin".into() }
    }

    fn word_of(memory: &GuestMemory, chunk: u64) -> u64 {
        memory.read_obj(GuestAddress(chunk * CHUNK_BYTES + 4096 + 8)).unwrap()
    }

    fn lost_channel() -> (impl FnOnce(&LoadError) + Send + 'static, Receiver<String>) {
        let (tx, rx) = channel();
        (move |e: &LoadError| drop(tx.send(crate::process::error_chain(e))), rx)
    }

    fn map(
        dir: &std::path::Path,
        info: &MemoryInfo,
        prefetch: Prefetch,
    ) -> Option<(GuestMemory, LazyMemory, Receiver<String>)> {
        let (lost, errors) = lost_channel();
        match map_lazily(dir, info, prefetch, &[], lost) {
            Ok((memory, lazy)) => Some((memory, lazy, errors)),
            Err(SnapshotError::Userfault(e)) => {
                eprintln!("skipped: {}", crate::process::error_chain(&e));
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The loader's figures once `ready` holds of them (or after a second, as they are).
    fn settled(lazy: &LazyMemory, ready: impl Fn(&LoadFigures) -> bool) -> LoadFigures {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let p = lazy.progress();
            if ready(&p) || Instant::now() > deadline {
                return p;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn touched_chunks_are_loaded_on_demand_and_only_they() {
        let dir = tempfile::tempdir().unwrap();
        let info = memory_file(dir.path());
        let Some((memory, lazy, errors)) = map(dir.path(), &info, Prefetch::None) else { return };
        assert_eq!(lazy.progress().loaded_bytes, 0, "nothing is read up front");
        assert_eq!(word_of(&memory, 2), 3);
        // The faulting page comes first; the counts follow once the chunk is all in.
        let p = settled(&lazy, |p| p.loaded_bytes == CHUNK_BYTES);
        assert_eq!((p.loaded_bytes, p.on_demand_chunks, p.done), (CHUNK_BYTES, 1, false));
        assert_eq!(word_of(&memory, HOLE), 0, "a hole reads as zeroes");
        assert_eq!(word_of(&memory, 2), 3, "a loaded chunk is not loaded again");
        let p = settled(&lazy, |p| p.loaded_bytes == 2 * CHUNK_BYTES);
        assert_eq!((p.loaded_bytes, p.on_demand_chunks), (2 * CHUNK_BYTES, 2));
        memory.write_obj(7u64, GuestAddress(8)).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(8)).unwrap(), 7, "a write to an unloaded chunk lands");
        assert_eq!(word_of(&memory, 0), 1, "after the chunk's own contents came in");
        assert!(errors.try_recv().is_err());
        drop(lazy);
    }

    #[test]
    fn prefetch_loads_every_chunk_then_gives_the_memory_back() {
        let dir = tempfile::tempdir().unwrap();
        let info = memory_file(dir.path());
        let Some((memory, lazy, errors)) = map(dir.path(), &info, Prefetch::InOrder) else { return };
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(lazy.progress().loaded_bytes, 0, "no prefetch before it is let go");
        lazy.start_prefetch();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lazy.progress().done {
            assert!(Instant::now() < deadline, "not loaded: {:?}", lazy.progress());
            std::thread::sleep(Duration::from_millis(5));
        }
        let p = lazy.progress();
        assert_eq!((p.loaded_bytes, p.total_bytes), (CHUNKS * CHUNK_BYTES, CHUNKS * CHUNK_BYTES));
        for chunk in 0..CHUNKS {
            assert_eq!(word_of(&memory, chunk), if chunk == HOLE { 0 } else { chunk + 1 });
        }
        // The file is no longer needed.
        std::fs::remove_file(dir.path().join("memory.bin")).unwrap();
        memory.write_obj(9u64, GuestAddress(CHUNK_BYTES * 3)).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(CHUNK_BYTES * 3)).unwrap(), 9);
        assert!(errors.try_recv().is_err());
    }

    #[test]
    fn a_damaged_chunk_is_never_mapped_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let info = memory_file(dir.path());
        let file = File::options().write(true).open(dir.path().join("memory.bin")).unwrap();
        file.write_all_at(&[0xff], 2 * CHUNK_BYTES + 100).unwrap();
        let Some((memory, lazy, errors)) = map(dir.path(), &info, Prefetch::None) else { return };
        assert_eq!(word_of(&memory, 0), 1, "good chunks load");
        let memory = Arc::new(memory);
        let reader = {
            let memory = memory.clone();
            std::thread::spawn(move || word_of(&memory, 2))
        };
        let error = errors.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(error.contains("memory.bin chunk 2 fails its checksum"), "{error}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!reader.is_finished(), "the damaged chunk's reader waits: it must never read it");
        // Once the VM is gone the loader goes; the waiting reader then gets zeroes.
        drop(lazy);
        assert_eq!(reader.join().unwrap(), 0);
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused_before_anything_is_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let mut info = memory_file(dir.path());
        info.region_sizes = vec![(CHUNKS + 1) * CHUNK_BYTES];
        let err = map_lazily(dir.path(), &info, Prefetch::None, &[], |_| {}).err().unwrap();
        assert!(matches!(err, SnapshotError::Inconsistent(_)), "{err}");
    }
}
