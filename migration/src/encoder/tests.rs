use super::*;
use crate::destination::{GuestPages, PageWriter};
use crate::page::{self, PAGE_SIZE};
use crate::protocol::PageEntry;

fn page_of(v: u8) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[0] = v;
    p[PAGE_SIZE - 1] = v;
    p
}

fn add(e: &mut PageEncoder, page: u64, content: &[u8]) {
    e.add_pages(&[page], content);
}

fn entries(e: &mut PageEncoder) -> Vec<PageEntry> {
    e.finish();
    std::iter::from_fn(|| e.take_batch()).flat_map(|(b, _)| b.entries).collect()
}

#[test]
fn test_each_page_goes_the_cheapest_way() {
    let mut e = PageEncoder::new(8, 1 << 20, true, 1).unwrap();
    e.set_base(&[page::hash(&page_of(9))]);
    add(&mut e, 0, &[0u8; PAGE_SIZE]);
    add(&mut e, 1, &page_of(1));
    add(&mut e, 2, &page_of(1));
    add(&mut e, 3, &page_of(9));
    assert_eq!(
        entries(&mut e),
        vec![PageEntry::Full { page: 1 }, PageEntry::Copy { page: 2, from: 1 }, PageEntry::Base { page: 3, base: 0 }]
    );
    // Unchanged: nothing. Changed by a byte: a delta. Zeroed: a zero entry.
    add(&mut e, 1, &page_of(1));
    let mut changed = page_of(1);
    changed[64] = 7;
    add(&mut e, 2, &changed);
    add(&mut e, 3, &[0u8; PAGE_SIZE]);
    let got = entries(&mut e);
    assert!(matches!(got[0], PageEntry::Delta { page: 2, .. }), "{got:?}");
    assert_eq!(got[1], PageEntry::Zero { page: 3 });
    let c = e.counts();
    assert_eq!((c.empty, c.full, c.copy, c.base, c.unchanged, c.delta, c.zero), (1, 1, 1, 1, 1, 1, 1));
    assert!(e.take_batch().is_none());
}

#[test]
fn test_digest_follows_what_was_sent() {
    let mut e = PageEncoder::new(4, 1 << 20, false, 1).unwrap();
    let empty = e.digest();
    add(&mut e, 2, &page_of(5));
    assert_ne!(e.digest(), empty);
    add(&mut e, 2, &[0u8; PAGE_SIZE]);
    assert_eq!(e.digest(), empty);
}

#[test]
fn test_a_batch_is_ready_at_batch_pages() {
    let mut e = PageEncoder::new(BATCH_PAGES as u64 + 1, 0, false, 1).unwrap();
    let pages: Vec<u64> = (0..BATCH_PAGES as u64 - 1).collect();
    let data: Vec<u8> = pages.iter().flat_map(|p| page_of((p % 200) as u8 + 1)).collect();
    e.add_pages(&pages, &data);
    assert!(e.take_batch().is_none(), "one entry short of a batch");
    add(&mut e, BATCH_PAGES as u64 - 1, &page_of(201));
    let (batch, count) = e.take_batch().unwrap();
    assert_eq!(count, BATCH_PAGES as u64);
    assert!(!batch.compressed);
}

#[test]
fn test_sharding_deals_out_runs_and_gives_each_page_its_own_local_index() {
    let s = Sharding::new(3);
    assert_eq!((s.shard(0), s.shard(SHARD_PAGES - 1), s.shard(SHARD_PAGES), s.shard(3 * SHARD_PAGES)), (0, 0, 1, 0));
    let pages = 10 * SHARD_PAGES + 5;
    let mut seen = vec![std::collections::HashSet::new(); 3];
    for p in 0..pages {
        let local = s.local(p);
        assert!(local < s.local_pages(pages), "page {p}");
        assert!(seen[s.shard(p)].insert(local), "page {p} shares a local index");
    }
}

/// A guest memory of `pages` pages for the tests' writer.
struct Memory(Vec<u8>);

impl GuestPages for Memory {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        let at = page as usize * PAGE_SIZE;
        self.0.get_mut(at..at + PAGE_SIZE)
    }
}

/// Contents with every kind of entry: zero pages, duplicates within and across runs,
/// pages that change by a word between rounds, noise zstd cannot shrink.
fn round_contents(pages: u64, round: u64) -> Vec<u8> {
    (0..pages)
        .flat_map(|p| match p % 7 {
            0 => vec![0u8; PAGE_SIZE],
            1 => page_of((p % 5) as u8 + 1),
            2 => crate::noise(p * 31 + 1, PAGE_SIZE),
            _ => {
                let mut c = page_of((p % 251) as u8);
                c[8..16].copy_from_slice(&(p * 1000 + round).to_le_bytes());
                c
            }
        })
        .collect()
}

/// Encodes three rounds over `pages` pages on `workers` workers, applies each batch as
/// it comes, and answers the encoder's digest, the writer's, the memory and the batches.
fn migrate_rounds(pages: u64, workers: usize) -> ([u8; 32], [u8; 32], Vec<u8>, Vec<PageBatch>) {
    let mut e = PageEncoder::new(pages, 1 << 20, true, workers).unwrap();
    let mut writer = PageWriter::new(pages).unwrap();
    let mut memory = Memory(vec![0; pages as usize * PAGE_SIZE]);
    let mut sent = Vec::new();
    let all: Vec<u64> = (0..pages).collect();
    for round in 0..3 {
        let data = round_contents(pages, round);
        for (chunk, bytes) in all.chunks(e.read_pages()).zip(data.chunks(e.read_pages() * PAGE_SIZE)) {
            e.add_pages(chunk, bytes);
        }
        e.finish();
        while let Some((batch, _)) = e.take_batch() {
            writer.apply(&mut memory, None, &batch).unwrap();
            sent.push(batch);
        }
    }
    (e.digest(), writer.digest().bytes(), memory.0, sent)
}

#[test]
fn test_any_number_of_workers_brings_the_same_memory_and_digest() {
    let pages = 20 * SHARD_PAGES + 3;
    let (one_digest, one_written, one_memory, _) = migrate_rounds(pages, 1);
    assert_eq!(one_digest, one_written);
    assert_eq!(one_memory, round_contents(pages, 2), "the last round's contents arrived");
    for workers in [2, 3] {
        let (digest, written, memory, batches) = migrate_rounds(pages, workers);
        assert_eq!(digest, one_digest, "{workers} workers: the digest does not depend on the sharding");
        assert_eq!(written, digest, "{workers} workers: the destination's digest matches");
        assert!(memory == one_memory, "{workers} workers: the memory differs");
        // Each batch names the pages of one shard only, copies included: batches of
        // different shards can be applied in any order.
        let sharding = Sharding::new(workers);
        for batch in &batches {
            let shard = sharding.shard(batch.entries[0].page());
            for entry in &batch.entries {
                assert_eq!(sharding.shard(entry.page()), shard, "{entry:?}");
                if let PageEntry::Copy { from, .. } = entry {
                    assert_eq!(sharding.shard(*from), shard, "{entry:?}");
                }
            }
        }
        // The same pages give the same frames, whatever the threads' timing.
        let (_, _, _, again) = migrate_rounds(pages, workers);
        let entries = |b: &[PageBatch]| b.iter().map(|b| b.entries.clone()).collect::<Vec<_>>();
        assert_eq!(entries(&again), entries(&batches), "{workers} workers");
    }
}

#[test]
fn test_a_small_vm_gets_no_more_workers_than_runs_and_discard_drops_everything() {
    let e = PageEncoder::new(SHARD_PAGES, 0, false, 8).unwrap();
    assert_eq!(e.workers(), 1);
    let mut e = PageEncoder::new(4 * SHARD_PAGES, 0, false, 8).unwrap();
    assert_eq!(e.workers(), 4);
    let data: Vec<u8> = (0..4).flat_map(|v| page_of(v + 1)).collect();
    e.add_pages(&[0, SHARD_PAGES, 2 * SHARD_PAGES, 3 * SHARD_PAGES], &data);
    e.discard();
    e.finish();
    assert!(e.take_batch().is_none());
    assert_eq!(e.counts().full, 4, "the pages were counted as sent");
}
