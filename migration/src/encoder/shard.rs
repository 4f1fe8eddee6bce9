//! One shard's encoder: the pages of one set of memory ranges (`Sharding`), what the
//! destination holds of each, and the cheapest way to bring each up to date.
//!
//! Each page goes one of these ways: skipped when its content is what was sent last, a
//! reference to a page of the destination's base image, a reference to another page of
//! this shard with the same content, a word-level delta against the last sent copy, or
//! whole. Pages collect into batches whose data goes raw or through zstd, as
//! `compression::Chooser` decides from the figures measured here (each compression's time
//! and ratio) and the link's rate. The shard's memory digest follows every page sent.
//!
//! A shard touches only its own pages, and its copies name only its own pages, so shards
//! run on separate threads and their batches may be applied in any order between shards.

use crate::compression::{Chooser, Codec, CompressionReport};
use crate::digest::MemoryDigest;
use crate::page::{self, DeltaCache, PAGE_SIZE, PageHash, ZERO_HASH};
use crate::protocol::{BATCH_PAGES, BatchBuilder, MAX_FRAME, PageBatch};
use crate::source::PageCounts;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::Sharding;

/// A delta is used when it is at most this large; otherwise the page goes whole.
const DELTA_BUDGET: usize = PAGE_SIZE / 4;

pub(super) struct ShardEncoder {
    sharding: Sharding,
    /// What the destination holds of each of this shard's pages (ZERO_HASH: zeroes), by
    /// `Sharding::local` index.
    sent: Vec<PageHash>,
    digest: MemoryDigest,
    cache: DeltaCache,
    /// A page of this shard known to hold each content at the destination (checked
    /// against `sent`).
    seen: HashMap<PageHash, u64>,
    /// The destination's base image: content to its page index there.
    base: Arc<HashMap<PageHash, u32>>,
    batch: BatchBuilder,
    /// Batches finished and not yet taken, in order.
    done: Vec<(PageBatch, u64)>,
    /// A compressor per level of `Codec::LEVELS`.
    compressors: Vec<zstd::bulk::Compressor<'static>>,
    chooser: Chooser,
    counts: PageCounts,
    /// Test fault: flip a byte of the next page sent whole, after it was hashed.
    flip_next_full: bool,
}

impl ShardEncoder {
    /// An encoder for the pages of `sharding`'s shard (at most `local_pages` of them) that
    /// the destination holds as zeroes, keeping at most `delta_cache` bytes of sent pages
    /// to make deltas against.
    pub(super) fn new(
        sharding: Sharding,
        local_pages: usize,
        delta_cache: usize,
        compress: bool,
    ) -> std::io::Result<Self> {
        Ok(ShardEncoder {
            sharding,
            sent: vec![ZERO_HASH; local_pages],
            digest: MemoryDigest::default(),
            // No larger than the shard: the cache is host memory taken for the migration.
            cache: DeltaCache::new(delta_cache.min(local_pages.saturating_mul(PAGE_SIZE))),
            seen: HashMap::new(),
            base: Arc::default(),
            batch: BatchBuilder::default(),
            done: Vec::new(),
            compressors: Codec::LEVELS
                .iter()
                .filter_map(|c| c.zstd_level())
                .map(zstd::bulk::Compressor::new)
                .collect::<std::io::Result<_>>()?,
            chooser: Chooser::new(compress),
            counts: PageCounts::default(),
            flip_next_full: false,
        })
    }

    pub(super) fn set_base(&mut self, base: Arc<HashMap<PageHash, u32>>) {
        self.base = base;
    }

    pub(super) fn flip_next_full_page(&mut self) {
        self.flip_next_full = true;
    }

    /// Adds page `page` (of this shard), whose content is now `content`, the cheapest
    /// way (or not at all when the destination already holds that content). A batch that
    /// fills up is finished.
    pub(super) fn add(&mut self, page: u64, content: &[u8]) {
        let local = self.sharding.local(page);
        let old = self.sent[local];
        let new = page::hash(content);
        if new == old {
            if new == ZERO_HASH {
                self.counts.empty += 1;
            } else {
                self.counts.unchanged += 1;
            }
            return;
        }
        if new == ZERO_HASH {
            self.batch.zero(page);
            self.counts.zero += 1;
            self.cache.forget(local as u64);
        } else if let Some(&base) = self.base.get(&new) {
            self.batch.base(page, base);
            self.counts.base += 1;
            self.cache.put(local as u64, content);
        } else if let Some(&from) = self.seen.get(&new)
            && from != page
            && self.sent[self.sharding.local(from)] == new
        {
            self.batch.copy(page, from);
            self.counts.copy += 1;
            self.cache.put(local as u64, content);
        } else {
            let delta = match self.cache.get(local as u64) {
                Some(previous) => self.batch.delta(page, previous, content, DELTA_BUDGET),
                None => false,
            };
            if delta {
                self.counts.delta += 1;
            } else {
                self.counts.full += 1;
                if std::mem::take(&mut self.flip_next_full) {
                    let mut flipped = content.to_vec();
                    flipped[100] ^= 0x40;
                    tracing::warn!(page, "test fault: flipping a byte of a page on the way");
                    self.batch.full(page, &flipped);
                } else {
                    self.batch.full(page, content);
                }
            }
            self.cache.put(local as u64, content);
            self.seen.insert(new, page);
        }
        self.digest.replace(page, &old, &new);
        self.sent[local] = new;
        self.finish_if_full();
    }

    /// Adds page `page` whole (or as a zero entry), whatever the destination held of it:
    /// in post-copy the destination has dropped the page and runs its guest, so neither
    /// what it held nor any other page there is a base to build on.
    pub(super) fn add_whole(&mut self, page: u64, content: &[u8]) {
        let local = self.sharding.local(page);
        let old = self.sent[local];
        let new = page::hash(content);
        if new == ZERO_HASH {
            self.batch.zero(page);
            self.counts.zero += 1;
        } else {
            self.batch.full(page, content);
            self.counts.full += 1;
        }
        self.cache.forget(local as u64);
        self.digest.replace(page, &old, &new);
        self.sent[local] = new;
        self.finish_if_full();
    }

    pub(super) fn skip_untouched(&mut self, pages: u64) {
        self.counts.empty += pages;
    }

    /// Finishes the batch once it holds BATCH_PAGES entries or half a frame of data.
    fn finish_if_full(&mut self) {
        if self.batch.len() >= BATCH_PAGES || self.batch.data_len() >= MAX_FRAME / 2 {
            self.finish();
        }
    }

    /// Finishes the batch collected so far (compressed as the chooser says), if any.
    pub(super) fn finish(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let count = self.batch.len() as u64;
        let raw_len = self.batch.data_len();
        let codec = self.chooser.choose(raw_len);
        let compressor = match codec {
            Codec::Raw => None,
            Codec::Zstd1 => self.compressors.get_mut(0),
            Codec::Zstd3 => self.compressors.get_mut(1),
        };
        // The compression's own time, measured here: the chooser weighs it against the link.
        let started = Instant::now();
        let batch = self.batch.finish(compressor);
        let sent_as = if batch.compressed { codec } else { Codec::Raw };
        self.chooser.record(codec, sent_as, raw_len, batch.data.len(), started.elapsed());
        self.done.push((batch, count));
    }

    /// The batches finished so far, in order.
    pub(super) fn take_done(&mut self) -> std::vec::Drain<'_, (PageBatch, u64)> {
        self.done.drain(..)
    }

    /// Drops the batch being collected and those finished (their link is gone).
    pub(super) fn discard(&mut self) {
        self.done.clear();
        self.batch = BatchBuilder::default();
    }

    pub(super) fn chooser(&mut self) -> &mut Chooser {
        &mut self.chooser
    }

    pub(super) fn compression(&self) -> CompressionReport {
        self.chooser.report()
    }

    pub(super) fn digest(&self) -> MemoryDigest {
        self.digest
    }

    pub(super) fn counts(&self) -> PageCounts {
        self.counts
    }
}
