//! The source's per-page work: what the destination holds of each page, and the cheapest
//! way to bring it up to date, on as many worker threads as the migration is given.
//!
//! Guest memory is split into shards by range ([`Sharding`]: runs of SHARD_PAGES pages,
//! dealt out in turn). Each shard has its own encoder ([`shard`]): what was sent of its
//! pages, its delta cache, its compressors and compression choice, its memory digest.
//! A call hands every shard its share of the pages read and runs the shards on the
//! worker pool at once; the batches come out in shard order, so the frames a migration
//! sends do not depend on thread timing. Because a shard's batches name only its own
//! pages (a copy too), the destination may apply batches of different shards in any
//! order, and the memory digest, a sum over pages, is the sum of the shards' digests:
//! exact whatever the number of workers.
//!
//! Kept apart from the engine so that the benchmarks time exactly this code.

mod shard;

use crate::compression::CompressionReport;
use crate::digest::MemoryDigest;
use crate::page::{PAGE_SIZE, PageHash};
use crate::protocol::{BATCH_PAGES, PageBatch};
use crate::source::PageCounts;
use rayon::prelude::*;
use shard::ShardEncoder;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Pages per run of a shard: 256 KiB, so that a read of a few batches reaches every
/// shard, while a run is long enough for the guest's locality (and a page's copies)
/// to stay within one.
pub const SHARD_PAGES: u64 = 64;

/// Which shard each page belongs to: run `page / SHARD_PAGES` goes to shard
/// `run % shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    shards: u64,
}

impl Sharding {
    pub fn new(shards: usize) -> Self {
        Sharding { shards: shards.max(1) as u64 }
    }

    pub fn shards(&self) -> usize {
        self.shards as usize
    }

    pub fn shard(&self, page: u64) -> usize {
        ((page / SHARD_PAGES) % self.shards) as usize
    }

    /// The page's index among its shard's pages.
    fn local(&self, page: u64) -> usize {
        ((page / SHARD_PAGES / self.shards) * SHARD_PAGES + page % SHARD_PAGES) as usize
    }

    /// How many local indices a shard of a VM of `pages` pages needs, at most.
    fn local_pages(&self, pages: u64) -> usize {
        (pages.div_ceil(SHARD_PAGES * self.shards) * SHARD_PAGES) as usize
    }
}

/// The worker count a migration uses when told 0: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `workers`, or one per core for 0.
pub(crate) fn workers_or_cores(workers: usize) -> usize {
    match workers {
        0 => default_workers(),
        n => n,
    }
}

/// A pool of `workers` threads named `name-N`; None for one worker (the caller's
/// thread does the work).
pub(crate) fn worker_pool(
    workers: usize,
    name: &'static str,
) -> Result<Option<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
    if workers <= 1 {
        return Ok(None);
    }
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(workers).thread_name(move |i| format!("{name}-{i}")).build()?;
    Ok(Some(pool))
}

pub struct PageEncoder {
    sharding: Sharding,
    shards: Vec<ShardEncoder>,
    /// None with one shard: it runs on the caller's thread.
    pool: Option<rayon::ThreadPool>,
    /// Finished batches and their entry counts, in the order they go.
    ready: VecDeque<(PageBatch, u64)>,
    /// Which shard each page of the last call went to: kept to reuse its allocation.
    groups: Vec<Vec<u32>>,
}

impl PageEncoder {
    /// An encoder for `pages` pages the destination holds as zeroes, on `workers` threads
    /// (0: one per core), keeping at most `delta_cache` bytes of sent pages in all to make
    /// deltas against.
    pub fn new(pages: u64, delta_cache: usize, compress: bool, workers: usize) -> std::io::Result<Self> {
        let workers = workers_or_cores(workers);
        // No more shards than runs of memory.
        let sharding = Sharding::new(workers.min(pages.div_ceil(SHARD_PAGES).max(1) as usize));
        let n = sharding.shards();
        let mut shards = (0..n)
            .map(|_| ShardEncoder::new(sharding, sharding.local_pages(pages), delta_cache / n, compress))
            .collect::<std::io::Result<Vec<_>>>()?;
        for shard in &mut shards {
            shard.chooser().set_parallel(n as u32);
        }
        let pool = worker_pool(n, "migration-pages").map_err(std::io::Error::other)?;
        Ok(PageEncoder { sharding, shards, pool, ready: VecDeque::new(), groups: vec![Vec::new(); n] })
    }

    /// How many shards (and worker threads) the pages are split over.
    pub fn workers(&self) -> usize {
        self.shards.len()
    }

    /// The shard `page` belongs to (every entry of a batch is of one shard).
    pub fn shard_of(&self, page: u64) -> usize {
        self.sharding.shard(page)
    }

    /// Pages to read at a time: enough for a batch per shard.
    pub fn read_pages(&self) -> usize {
        BATCH_PAGES * self.shards.len()
    }

    /// The page hashes of the destination's base image, in its page order.
    pub fn set_base(&mut self, base: &[PageHash]) {
        let base: Arc<HashMap<PageHash, u32>> =
            Arc::new(base.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect());
        for shard in &mut self.shards {
            shard.set_base(base.clone());
        }
    }

    /// Test fault: flip a byte of the next page each shard sends whole, after it was hashed.
    pub fn flip_next_full_page(&mut self) {
        for shard in &mut self.shards {
            shard.flip_next_full_page();
        }
    }

    /// Adds pages `pages`, whose contents are `data` (PAGE_SIZE bytes each, in order),
    /// each the cheapest way (or not at all when the destination holds that content):
    /// every shard its own, all shards at once. Full batches are then ready to take.
    pub fn add_pages(&mut self, pages: &[u64], data: &[u8]) {
        let content = |i: usize| &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        let count = pages.len().min(data.len() / PAGE_SIZE);
        match &self.pool {
            None => {
                for (i, page) in pages[..count].iter().enumerate() {
                    self.shards[0].add(*page, content(i));
                }
            }
            Some(pool) => {
                for group in &mut self.groups {
                    group.clear();
                }
                for (i, page) in pages[..count].iter().enumerate() {
                    self.groups[self.sharding.shard(*page)].push(i as u32);
                }
                let (shards, groups) = (&mut self.shards, &self.groups);
                pool.install(|| {
                    shards.par_iter_mut().zip(groups.par_iter()).for_each(|(shard, group)| {
                        for &i in group {
                            shard.add(pages[i as usize], content(i as usize));
                        }
                    })
                });
            }
        }
        self.collect();
    }

    /// Adds page `page` whole (or as a zero entry), whatever the destination held of it:
    /// in post-copy the destination has dropped the page and runs its guest, so neither
    /// what it held nor any other page there is a base to build on.
    pub fn add_whole(&mut self, page: u64, content: &[u8]) {
        self.shards[self.sharding.shard(page)].add_whole(page, content);
        self.collect();
    }

    /// Counts pages never touched, known to be zeroes without reading them: like the pages
    /// found empty, they cost nothing.
    pub fn skip_untouched(&mut self, pages: u64) {
        self.shards[0].skip_untouched(pages);
    }

    /// Finishes every shard's batch in progress (compressing them at once), so that
    /// everything added is ready to take.
    pub fn finish(&mut self) {
        match &self.pool {
            None => self.shards[0].finish(),
            Some(pool) => {
                let shards = &mut self.shards;
                pool.install(|| shards.par_iter_mut().for_each(ShardEncoder::finish));
            }
        }
        self.collect();
    }

    /// The next finished batch and its entry count.
    pub fn take_batch(&mut self) -> Option<(PageBatch, u64)> {
        self.ready.pop_front()
    }

    /// Drops every batch not yet taken, finished or not (the link they were for is gone).
    pub fn discard(&mut self) {
        self.ready.clear();
        for shard in &mut self.shards {
            shard.discard();
        }
    }

    fn collect(&mut self) {
        for shard in &mut self.shards {
            self.ready.extend(shard.take_done());
        }
    }

    /// A measured delivery rate of the link (bytes/s).
    pub fn link_sample(&mut self, bytes_per_s: f64) {
        for shard in &mut self.shards {
            shard.chooser().add_link_sample(bytes_per_s);
        }
    }

    /// The link's configured limit (bytes/s, 0: none) and round trip.
    pub fn set_link(&mut self, limit: u64, rtt: std::time::Duration) {
        for shard in &mut self.shards {
            shard.chooser().set_limit(limit);
            shard.chooser().set_rtt(rtt);
        }
    }

    pub fn compression(&self) -> CompressionReport {
        let reports: Vec<CompressionReport> = self.shards.iter().map(ShardEncoder::compression).collect();
        CompressionReport::merged(&reports)
    }

    /// The digest of the memory the destination holds once every batch taken arrived.
    pub fn digest(&self) -> [u8; 32] {
        self.shards.iter().fold(MemoryDigest::default(), |sum, s| sum.plus(&s.digest())).bytes()
    }

    pub fn counts(&self) -> PageCounts {
        self.shards.iter().fold(PageCounts::default(), |sum, s| sum.plus(&s.counts()))
    }
}

#[cfg(test)]
mod tests;
