//! Post-copy at the destination: the guest runs before all of its memory is here.
//!
//! The pages the source named as out of date are dropped (MADV_DONTNEED) and guest memory
//! is registered with a userfaultfd (`crate::vstate::uffd`), so a touch of a missing page
//! waits instead of reading zeroes. A fault thread serves those waits:
//! - a page still pending is asked of the source (`PageRequest`, on the link the receive
//!   hands over with `set_link`), again every `REQUEST_AGAIN` while it is still missing
//!   (a request may go down with a link, and a resumed link needs them again);
//! - any other missing page was never written at the source either: it gets zeroes.
//!
//! The receive puts arriving pages in place (`place`), which wakes whoever waits on them.
//! When the last one is in, `finish` stops the thread and gives the memory back to the
//! kernel.

use crate::vstate::memory;
use crate::vstate::uffd::{PAGE, UffdError, Userfault};
use novacron_migration::dirty::DirtySet;
use novacron_migration::protocol::Message;
use novacron_migration::transport::Requester;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a requested page may stay missing before it is asked for again.
const REQUEST_AGAIN: Duration = Duration::from_millis(200);
/// At most this many pages in one `PageRequest`.
const REQUEST_PAGES: usize = 256;
/// How often the fault thread looks at its stop flag and its old requests.
const POLL_MS: i32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    #[error("cannot drop page {page} for post-copy")]
    Drop {
        page: u64,
        #[source]
        source: memory::DiscardError,
    },
    #[error("page {0} is outside guest RAM")]
    NotInRam(u64),
    #[error(transparent)]
    Userfault(#[from] UffdError),
    #[error("cannot start the post-copy fault thread")]
    Thread(#[source] std::io::Error),
}

/// Guest RAM as host ranges, in the engine's page numbering (regions back to back).
#[derive(Debug, Clone)]
pub struct RamLayout(Vec<(usize, usize)>);

impl RamLayout {
    /// `ram`: host address and length of each region, in guest order.
    pub fn new(ram: impl IntoIterator<Item = (usize, usize)>) -> Self {
        RamLayout(ram.into_iter().collect())
    }

    /// The host address of page `page`.
    pub fn host(&self, page: u64) -> Option<usize> {
        let mut offset = page.checked_mul(PAGE as u64)?;
        for &(start, len) in &self.0 {
            if offset < len as u64 {
                return Some(start + offset as usize);
            }
            offset -= len as u64;
        }
        None
    }

    /// Adds to `ranges` the host ranges of pages `first..first + count`: one for each
    /// region the run touches (regions are back to back in page numbers, not in the host's
    /// address space).
    fn host_ranges(&self, first: u64, count: u64, ranges: &mut Vec<(usize, usize)>) -> Result<(), PostCopyError> {
        let end = first.checked_add(count).ok_or(PostCopyError::NotInRam(first))?;
        let mut region_first = 0u64;
        let mut at = first;
        for &(start, len) in &self.0 {
            let region_end = region_first + (len / PAGE) as u64;
            if at < region_end && at < end {
                let stop = end.min(region_end);
                ranges.push((start + ((at - region_first) as usize) * PAGE, ((stop - at) as usize) * PAGE));
                at = stop;
            }
            region_first = region_end;
        }
        if at < end { Err(PostCopyError::NotInRam(at)) } else { Ok(()) }
    }

    /// The page a host address lies in.
    fn page(&self, addr: usize) -> Option<u64> {
        let mut first = 0u64;
        for &(start, len) in &self.0 {
            if addr >= start && addr < start + len {
                return Some(first + ((addr - start) / PAGE) as u64);
            }
            first += (len / PAGE) as u64;
        }
        None
    }

    fn pages(&self) -> u64 {
        self.0.iter().map(|&(_, len)| (len / PAGE) as u64).sum()
    }
}

/// Pages still missing, shared by the receive (which clears them) and the fault thread.
struct Missing(Vec<AtomicU64>);

impl Missing {
    fn new(pending: &DirtySet, pages: u64) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        for page in pending.iter() {
            words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
        Missing(words)
    }

    fn contains(&self, page: u64) -> bool {
        self.0.get((page / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn clear(&self, page: u64) {
        if let Some(w) = self.0.get((page / 64) as usize) {
            w.fetch_and(!(1 << (page % 64)), Ordering::Release);
        }
    }
}

/// What the receive and the fault thread share.
struct Shared {
    uffd: Userfault,
    layout: RamLayout,
    missing: Missing,
    /// Where to ask the source for pages (None between links).
    link: Mutex<Option<Requester>>,
    /// Pages the guest waited on (each counted once).
    faulted: AtomicU64,
    waits: Mutex<Waits>,
    stop: AtomicBool,
}

/// How long the guest waited on each page it touched while missing.
#[derive(Default)]
struct Waits {
    /// Missing pages something waits on, since their first fault.
    since: HashMap<u64, Instant>,
    /// Each wait that ended, in microseconds.
    waited_us: Vec<u64>,
}

/// How long the guest waited on the pages it touched before they arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultFigures {
    pub pages: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// The fault side of a running post-copy. Dropping it without `finish` stops the thread
/// and leaves the memory registered: the guest waits on missing pages forever, which is
/// what must happen to a guest whose memory cannot be completed (the caller ends it).
pub struct PostCopyMemory {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl PostCopyMemory {
    /// Drops the `pending` pages, makes faults on missing pages wait, and starts the
    /// fault thread. Call it while nothing runs on the memory (the VM is built, paused).
    pub fn start(uffd: Userfault, layout: RamLayout, pending: &DirtySet) -> Result<Self, PostCopyError> {
        for &(start, len) in &layout.0 {
            uffd.register(start as *mut u8, len)?;
        }
        let mut ranges = Vec::new();
        for (first, count) in pending.runs() {
            layout.host_ranges(first, count, &mut ranges)?;
        }
        // Dropped pages are missing: the userfaultfd registered above makes a later touch wait.
        // SAFETY: each range is in one region of our private anonymous guest RAM; the VM is paused.
        unsafe { memory::discard(&ranges) }
            .map_err(|e| PostCopyError::Drop { page: layout.page(e.addr).unwrap_or_default(), source: e })?;
        let shared = Arc::new(Shared {
            uffd,
            missing: Missing::new(pending, layout.pages()),
            layout,
            link: Mutex::new(None),
            faulted: AtomicU64::new(0),
            waits: Mutex::new(Waits::default()),
            stop: AtomicBool::new(false),
        });
        let server = FaultServer { shared: shared.clone(), requested: HashMap::new() };
        let thread = std::thread::Builder::new()
            .name("post-copy-faults".into())
            .spawn(move || server.run())
            .map_err(PostCopyError::Thread)?;
        Ok(PostCopyMemory { shared, thread: Some(thread) })
    }

    /// The link to ask the source on, from now on.
    pub fn set_link(&self, requester: Option<Requester>) {
        if let Ok(mut link) = self.shared.link.lock() {
            *link = requester;
        }
    }

    /// Puts page `page` in place (`content`, or zeroes) and wakes whoever waits on it.
    pub fn place(&self, page: u64, content: Option<&[u8]>) -> Result<(), PostCopyError> {
        let shared = &self.shared;
        let addr = shared.layout.host(page).ok_or(PostCopyError::NotInRam(page))?;
        match content {
            Some(bytes) => shared.uffd.copy(addr as *mut u8, bytes)?,
            None => shared.uffd.zero(addr as *mut u8, PAGE)?,
        }
        shared.missing.clear(page);
        if let Ok(mut waits) = shared.waits.lock()
            && let Some(since) = waits.since.remove(&page)
        {
            waits.waited_us.push(since.elapsed().as_micros() as u64);
        }
        Ok(())
    }

    /// How many pages the guest waited on.
    pub fn faulted(&self) -> u64 {
        self.shared.faulted.load(Ordering::Relaxed)
    }

    /// Every page is in: stops the fault thread and gives the memory back to the kernel.
    /// Answers how long the guest waited on pages.
    pub fn finish(mut self) -> Result<FaultFigures, PostCopyError> {
        self.stop_thread();
        for &(start, len) in &self.shared.layout.0 {
            self.shared.uffd.unregister(start as *mut u8, len)?;
        }
        let mut waited = self.shared.waits.lock().map(|w| w.waited_us.clone()).unwrap_or_default();
        waited.sort_unstable();
        let at = |q: usize| waited.get((waited.len() * q / 100).min(waited.len().saturating_sub(1))).copied();
        Ok(FaultFigures {
            pages: self.faulted(),
            p50_us: at(50).unwrap_or(0),
            p99_us: at(99).unwrap_or(0),
            max_us: waited.last().copied().unwrap_or(0),
        })
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PostCopyMemory {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The fault thread's side.
struct FaultServer {
    shared: Arc<Shared>,
    /// Pages asked for and not yet in, with when they were last asked for.
    requested: HashMap<u64, Instant>,
}

impl FaultServer {
    fn run(mut self) {
        let mut faults = Vec::new();
        while !self.shared.stop.load(Ordering::Acquire) {
            if let Err(e) = self.serve(&mut faults) {
                // The guest's faults can no longer be served: it waits, and the receive's
                // end (a digest, a lost source) says what became of it.
                tracing::error!("post-copy: {}", crate::process::error_chain(&e));
                return;
            }
        }
    }

    fn serve(&mut self, faults: &mut Vec<u64>) -> Result<(), UffdError> {
        let shared = &*self.shared;
        faults.clear();
        if shared.uffd.wait(POLL_MS)? {
            shared.uffd.read_faults(faults)?;
        }
        let now = Instant::now();
        let mut ask = Vec::new();
        for &addr in faults.iter() {
            let Some(page) = shared.layout.page(addr as usize) else {
                tracing::error!(addr, "post-copy: a fault outside guest RAM");
                continue;
            };
            if shared.missing.contains(page) {
                if self.requested.insert(page, now).is_none() {
                    shared.faulted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut waits) = shared.waits.lock() {
                        waits.since.entry(page).or_insert(now);
                    }
                }
                ask.push(page);
            } else if let Some(host) = shared.layout.host(page) {
                // Never written at the source (or just put in place: then this only wakes).
                shared.uffd.zero(host as *mut u8, PAGE)?;
            }
        }
        self.requested.retain(|&page, _| shared.missing.contains(page));
        for (&page, asked) in self.requested.iter_mut() {
            if now.duration_since(*asked) >= REQUEST_AGAIN && !ask.contains(&page) {
                *asked = now;
                ask.push(page);
            }
        }
        if !ask.is_empty() {
            let requester = shared.link.lock().ok().and_then(|l| l.clone());
            for chunk in ask.chunks(REQUEST_PAGES) {
                // A request lost with its link is asked again after REQUEST_AGAIN.
                if requester.as_ref().is_none_or(|r| r.send(&Message::PageRequest(chunk.to_vec())).is_err()) {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_host_addresses_map_both_ways_across_regions() {
        let layout = RamLayout::new([(0x10_0000, 2 * PAGE), (0x80_0000, 3 * PAGE)]);
        assert_eq!(layout.pages(), 5);
        assert_eq!(layout.host(1), Some(0x10_0000 + PAGE));
        assert_eq!(layout.host(2), Some(0x80_0000));
        assert_eq!(layout.host(5), None);
        assert_eq!(layout.page(0x80_0000 + 2 * PAGE + 17), Some(4));
        assert_eq!(layout.page(0x10_0000 + 2 * PAGE), None, "the gap between regions");
    }

    #[test]
    fn a_run_across_two_regions_is_split_where_the_regions_are() {
        let layout = RamLayout::new([(0x10_0000, 4 * PAGE), (0x90_0000, 8 * PAGE)]);
        let mut ranges = Vec::new();
        layout.host_ranges(2, 5, &mut ranges).unwrap();
        assert_eq!(ranges, vec![(0x10_0000 + 2 * PAGE, 2 * PAGE), (0x90_0000, 3 * PAGE)]);
        ranges.clear();
        layout.host_ranges(5, 2, &mut ranges).unwrap();
        assert_eq!(ranges, vec![(0x90_0000 + PAGE, 2 * PAGE)], "a run inside the second region");
        assert!(matches!(layout.host_ranges(10, 3, &mut ranges), Err(PostCopyError::NotInRam(12))), "past the end");
        assert!(matches!(layout.host_ranges(u64::MAX, 2, &mut ranges), Err(PostCopyError::NotInRam(_))));
    }

    #[test]
    fn missing_pages_clear_one_by_one() {
        let mut pending = DirtySet::new(130);
        pending.set(3);
        pending.set(129);
        let missing = Missing::new(&pending, 130);
        assert!(missing.contains(3) && missing.contains(129) && !missing.contains(4));
        missing.clear(129);
        assert!(!missing.contains(129) && missing.contains(3));
        assert!(!missing.contains(1 << 40), "out of range is not missing");
    }

    /// `reader` reads the first word of `page`, which is missing: its fault reaches the
    /// server and it waits, until the page placed here wakes it with the source's content.
    fn reader_waits_until_placed(memory: &PostCopyMemory, page: u64, reader: JoinHandle<u64>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while memory.faulted() == 0 {
            assert!(Instant::now() < deadline, "the missing page's fault reaches the server");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!reader.is_finished(), "the reader waits for the page, not for the stale copy");
        let mut content = vec![0u8; PAGE];
        content[..8].copy_from_slice(&0x5eu64.to_ne_bytes());
        memory.place(page, Some(&content)).unwrap();
        assert_eq!(reader.join().unwrap(), 0x5e, "the reader gets the source's page");
    }

    #[test]
    fn a_pending_page_waits_until_placed_and_an_untouched_one_reads_zeroes() {
        let Ok(uffd) = Userfault::new() else {
            eprintln!("skipped: no userfaultfd here");
            return;
        };
        let map = crate::vstate::uffd::Mapping::new(4);
        let (base, len) = (map.0 as usize, map.1);
        // Pages 0 and 1 were received in pre-copy; page 1 is stale, page 3 was never sent.
        for page in 0..2 {
            // SAFETY: pages of the live mapping, before anything else uses it.
            unsafe { std::ptr::write_volatile((base + page * PAGE) as *mut u64, 0xaa + page as u64) };
        }
        let mut pending = DirtySet::new(4);
        pending.set(1);
        let memory = PostCopyMemory::start(uffd, RamLayout::new([(base, len)]), &pending).unwrap();
        // SAFETY (both reads): pages of the live mapping; a missing one waits for the server.
        let read = move |page: usize| unsafe { std::ptr::read_volatile((base + page * PAGE) as *const u64) };
        assert_eq!(read(0), 0xaa, "a page received before stays");
        assert_eq!(read(3), 0, "a page never written reads zeroes");
        reader_waits_until_placed(&memory, 1, std::thread::spawn(move || read(1)));
        let figures = memory.finish().unwrap();
        assert_eq!(figures.pages, 1);
        assert!(figures.max_us > 0 && figures.p50_us == figures.max_us, "one wait, measured: {figures:?}");
        let err = PostCopyMemory::start(Userfault::new().unwrap(), RamLayout::new([(base, len)]), &{
            let mut far = DirtySet::new(8);
            far.set(6);
            far
        });
        assert!(matches!(err, Err(PostCopyError::NotInRam(6))), "{:?}", err.err());
    }

    #[test]
    fn a_long_run_of_pending_pages_moved_away_waits_as_a_dropped_page_does() {
        let Ok(uffd) = Userfault::new() else {
            eprintln!("skipped: no userfaultfd here");
            return;
        };
        let map = crate::vstate::uffd::Mapping::new(512);
        let (base, len) = (map.0 as usize, map.1);
        let write = |page: usize| {
            // SAFETY: a page of the live mapping, before the post-copy starts.
            unsafe { std::ptr::write_volatile((base + page * PAGE) as *mut u64, page as u64 + 1) }
        };
        // SAFETY: a page of the live mapping; a missing one waits for the server.
        let read = move |page: usize| unsafe { std::ptr::read_volatile((base + page * PAGE) as *const u64) };
        (0..512).for_each(write);
        // Pages 10..400 are stale: long enough to be moved away rather than dropped.
        let mut pending = DirtySet::new(512);
        (10..400).for_each(|p| pending.set(p));
        let memory = PostCopyMemory::start(uffd, RamLayout::new([(base, len)]), &pending).unwrap();
        assert_eq!((read(9), read(400)), (10, 401), "the pages around the run stay");
        reader_waits_until_placed(&memory, 200, std::thread::spawn(move || read(200)));
        for p in (10..400).filter(|&p| p != 200) {
            memory.place(p as u64, None).unwrap();
        }
        memory.finish().unwrap();
        assert_eq!((read(10), read(200), read(399)), (0, 0x5e, 0), "placed pages read what was placed");
    }
}
