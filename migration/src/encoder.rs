//! The source's per-page work: what the destination holds of each page, and the cheapest
//! way to bring it up to date.
//!
//! Each page goes one of these ways: skipped when its content is what was sent last, a
//! reference to a page of the destination's base image, a reference to another page with
//! the same content, a word-level delta against the last sent copy, or whole. Pages
//! collect into batches whose data goes raw or through zstd, as `compression::Chooser`
//! decides from the figures measured here (each compression's time and ratio) and the
//! link's rate. The memory digest follows every page sent, so at the switchover it
//! describes what the destination holds.
//!
//! Kept apart from the engine so that the benchmarks time exactly this code.

use crate::compression::{Chooser, Codec, CompressionReport};
use crate::digest::MemoryDigest;
use crate::page::{self, DeltaCache, PAGE_SIZE, PageHash, ZERO_HASH};
use crate::protocol::{BATCH_PAGES, BatchBuilder, MAX_FRAME, PageBatch};
use crate::source::PageCounts;
use std::collections::HashMap;
use std::time::Instant;

/// A delta is used when it is at most this large; otherwise the page goes whole.
const DELTA_BUDGET: usize = PAGE_SIZE / 4;

pub struct PageEncoder {
    /// What the destination holds of each page (ZERO_HASH: zeroes).
    sent: Vec<PageHash>,
    digest: MemoryDigest,
    cache: DeltaCache,
    /// A page known to hold each content at the destination (checked against `sent`).
    seen: HashMap<PageHash, u64>,
    /// The destination's base image: content to its page index there.
    base: HashMap<PageHash, u32>,
    batch: BatchBuilder,
    /// A compressor per level of `Codec::LEVELS`.
    compressors: Vec<zstd::bulk::Compressor<'static>>,
    chooser: Chooser,
    counts: PageCounts,
    /// Test fault: flip a byte of the next page sent whole, after it was hashed.
    flip_next_full: bool,
}

impl PageEncoder {
    /// An encoder for `pages` pages the destination holds as zeroes, keeping at most
    /// `delta_cache` bytes of sent pages to make deltas against.
    pub fn new(pages: u64, delta_cache: usize, compress: bool) -> std::io::Result<Self> {
        Ok(PageEncoder {
            sent: vec![ZERO_HASH; pages as usize],
            digest: MemoryDigest::default(),
            // No larger than the VM: the cache is host memory taken for the migration.
            cache: DeltaCache::new(delta_cache.min((pages as usize).saturating_mul(PAGE_SIZE))),
            seen: HashMap::new(),
            base: HashMap::new(),
            batch: BatchBuilder::default(),
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

    /// The page hashes of the destination's base image, in its page order.
    pub fn set_base(&mut self, base: &[PageHash]) {
        self.base = base.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect();
    }

    pub fn flip_next_full_page(&mut self) {
        self.flip_next_full = true;
    }

    /// Adds page `page`, whose content is now `content`, to the batch the cheapest way
    /// (or not at all when the destination already holds that content).
    pub fn add(&mut self, page: u64, content: &[u8]) {
        let old = self.sent[page as usize];
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
            self.cache.forget(page);
        } else if let Some(&base) = self.base.get(&new) {
            self.batch.base(page, base);
            self.counts.base += 1;
            self.cache.put(page, content);
        } else if let Some(&from) = self.seen.get(&new)
            && from != page
            && self.sent[from as usize] == new
        {
            self.batch.copy(page, from);
            self.counts.copy += 1;
            self.cache.put(page, content);
        } else {
            let delta = match self.cache.get(page) {
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
            self.cache.put(page, content);
            self.seen.insert(new, page);
        }
        self.digest.replace(page, &old, &new);
        self.sent[page as usize] = new;
    }

    /// Adds page `page` whole (or as a zero entry), whatever the destination held of it:
    /// in post-copy the destination has dropped the page and runs its guest, so neither
    /// what it held nor any other page there is a base to build on.
    pub fn add_whole(&mut self, page: u64, content: &[u8]) {
        let old = self.sent[page as usize];
        let new = page::hash(content);
        if new == ZERO_HASH {
            self.batch.zero(page);
            self.counts.zero += 1;
        } else {
            self.batch.full(page, content);
            self.counts.full += 1;
        }
        self.cache.forget(page);
        self.digest.replace(page, &old, &new);
        self.sent[page as usize] = new;
    }

    /// Counts pages never touched, known to be zeroes without reading them: like the pages
    /// found empty, they cost nothing.
    pub fn skip_untouched(&mut self, pages: u64) {
        self.counts.empty += pages;
    }

    /// Whether the batch should go now (BATCH_PAGES entries or half a frame of data).
    pub fn batch_full(&self) -> bool {
        self.batch.len() >= BATCH_PAGES || self.batch.data_len() >= MAX_FRAME / 2
    }

    /// The batch collected so far and its entry count (None when empty).
    pub fn take_batch(&mut self) -> Option<(PageBatch, u64)> {
        if self.batch.is_empty() {
            return None;
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
        Some((batch, count))
    }

    /// A measured delivery rate of the link (bytes/s), and its configured limit (0: none).
    pub fn link_sample(&mut self, bytes_per_s: f64) {
        self.chooser.add_link_sample(bytes_per_s);
    }

    /// The link's configured limit (bytes/s, 0: none) and round trip.
    pub fn set_link(&mut self, limit: u64, rtt: std::time::Duration) {
        self.chooser.set_limit(limit);
        self.chooser.set_rtt(rtt);
    }

    pub fn compression(&self) -> CompressionReport {
        self.chooser.report()
    }

    /// The digest of the memory the destination holds once every batch taken arrived.
    pub fn digest(&self) -> [u8; 32] {
        self.digest.bytes()
    }

    pub fn counts(&self) -> PageCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PageEntry;

    fn page_of(v: u8) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        p[0] = v;
        p[PAGE_SIZE - 1] = v;
        p
    }

    fn entries(e: &mut PageEncoder) -> Vec<PageEntry> {
        e.take_batch().map(|(b, _)| b.entries).unwrap_or_default()
    }

    #[test]
    fn test_each_page_goes_the_cheapest_way() {
        let mut e = PageEncoder::new(8, 1 << 20, true).unwrap();
        e.set_base(&[page::hash(&page_of(9))]);
        e.add(0, &vec![0u8; PAGE_SIZE]);
        e.add(1, &page_of(1));
        e.add(2, &page_of(1));
        e.add(3, &page_of(9));
        assert_eq!(
            entries(&mut e),
            vec![
                PageEntry::Full { page: 1 },
                PageEntry::Copy { page: 2, from: 1 },
                PageEntry::Base { page: 3, base: 0 }
            ]
        );
        // Unchanged: nothing. Changed by a byte: a delta. Zeroed: a zero entry.
        e.add(1, &page_of(1));
        let mut changed = page_of(1);
        changed[64] = 7;
        e.add(2, &changed);
        e.add(3, &vec![0u8; PAGE_SIZE]);
        let got = entries(&mut e);
        assert!(matches!(got[0], PageEntry::Delta { page: 2, .. }), "{got:?}");
        assert_eq!(got[1], PageEntry::Zero { page: 3 });
        let c = e.counts();
        assert_eq!((c.empty, c.full, c.copy, c.base, c.unchanged, c.delta, c.zero), (1, 1, 1, 1, 1, 1, 1));
        assert!(e.take_batch().is_none());
    }

    #[test]
    fn test_digest_follows_what_was_sent() {
        let mut e = PageEncoder::new(4, 1 << 20, false).unwrap();
        let empty = e.digest();
        e.add(2, &page_of(5));
        assert_ne!(e.digest(), empty);
        e.add(2, &vec![0u8; PAGE_SIZE]);
        assert_eq!(e.digest(), empty);
    }

    #[test]
    fn test_batch_is_full_at_batch_pages() {
        let mut e = PageEncoder::new(BATCH_PAGES as u64 + 1, 0, false).unwrap();
        for p in 0..BATCH_PAGES as u64 {
            assert!(!e.batch_full());
            e.add(p, &page_of((p % 200) as u8 + 1));
        }
        assert!(e.batch_full());
        let (batch, count) = e.take_batch().unwrap();
        assert_eq!(count, BATCH_PAGES as u64);
        assert!(!batch.compressed);
    }
}
