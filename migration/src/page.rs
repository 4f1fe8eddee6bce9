//! Page codecs: zero detection, content hashes, and the word-level delta (XBZRLE-style)
//! between what was sent of a page before and what it holds now.
//!
//! A delta is a list of runs over the page's 512 words (8 bytes each):
//! `skip (varint) | count (varint) | count × 8 bytes`, meaning "keep `skip` words, then
//! replace the next `count` words with these". Words after the last run are kept. The
//! encoder gives up (returns `None`) once the delta would exceed its budget, so a page that
//! changed a lot is sent whole.

pub const PAGE_SIZE: usize = 4096;
const WORDS: usize = PAGE_SIZE / 8;

/// A page's content hash: BLAKE3 truncated to 128 bits. `ZERO_HASH` stands for an all-zero
/// page, which is never hashed.
pub type PageHash = [u8; 16];
pub const ZERO_HASH: PageHash = [0; 16];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta is truncated")]
    Truncated,
    #[error("delta runs past the end of the page")]
    Overrun,
    #[error("delta has a bad length field")]
    BadVarint,
}

pub fn is_zero(page: &[u8]) -> bool {
    // Word-wise OR: the compiler vectorises it, and it stops at the first non-zero chunk.
    page.chunks_exact(64)
        .all(|c| c.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]))) == 0)
}

/// The content hash of a page; `ZERO_HASH` for a page of zeroes.
pub fn hash(page: &[u8]) -> PageHash {
    if is_zero(page) {
        return ZERO_HASH;
    }
    hash_nonzero(page)
}

/// The content hash of a page known not to be all zeroes.
pub fn hash_nonzero(page: &[u8]) -> PageHash {
    let full = blake3::hash(page);
    let mut h = [0u8; 16];
    h.copy_from_slice(&full.as_bytes()[..16]);
    h
}

fn word(page: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&page[i * 8..i * 8 + 8]);
    u64::from_ne_bytes(w)
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<usize, DeltaError> {
    let mut v = 0usize;
    for shift in (0..).step_by(7).take(3) {
        let b = *bytes.get(*at).ok_or(DeltaError::Truncated)?;
        *at += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::BadVarint)
}

/// Appends the delta from `old` to `new` (both PAGE_SIZE bytes) to `out`, unless it would
/// take more than `budget` bytes: then `out` is left as it was and the answer is false.
pub fn encode_delta(old: &[u8], new: &[u8], budget: usize, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let mut i = 0;
    let mut last_end = 0;
    while i < WORDS {
        if word(old, i) == word(new, i) {
            i += 1;
            continue;
        }
        let run_start = i;
        while i < WORDS && word(old, i) != word(new, i) {
            i += 1;
        }
        put_varint(out, run_start - last_end);
        put_varint(out, i - run_start);
        out.extend_from_slice(&new[run_start * 8..i * 8]);
        last_end = i;
        if out.len() - start > budget {
            out.truncate(start);
            return false;
        }
    }
    true
}

/// Applies a delta to `page` in place. The page is only changed if the delta is valid.
pub fn apply_delta(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    check_delta(delta)?;
    let mut at = 0;
    let mut pos = 0;
    while at < delta.len() {
        pos += get_varint(delta, &mut at)?;
        let count = get_varint(delta, &mut at)?;
        let bytes = count * 8;
        page[pos * 8..pos * 8 + bytes].copy_from_slice(&delta[at..at + bytes]);
        at += bytes;
        pos += count;
    }
    Ok(())
}

fn check_delta(delta: &[u8]) -> Result<(), DeltaError> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < delta.len() {
        pos = pos.checked_add(get_varint(delta, &mut at)?).ok_or(DeltaError::Overrun)?;
        let count = get_varint(delta, &mut at)?;
        pos = pos.checked_add(count).ok_or(DeltaError::Overrun)?;
        if pos > WORDS {
            return Err(DeltaError::Overrun);
        }
        at = at.checked_add(count * 8).ok_or(DeltaError::Truncated)?;
        if at > delta.len() {
            return Err(DeltaError::Truncated);
        }
    }
    Ok(())
}

/// The pages last sent, for deltas: direct-mapped (page index modulo the number of
/// slots), so looking up and replacing costs nothing but the copy.
pub struct DeltaCache {
    tags: Vec<u64>,
    data: Vec<u8>,
}

impl DeltaCache {
    /// A cache of `bytes` (rounded down to pages; 0 turns deltas off).
    pub fn new(bytes: usize) -> Self {
        let slots = bytes / PAGE_SIZE;
        DeltaCache { tags: vec![u64::MAX; slots], data: vec![0; slots * PAGE_SIZE] }
    }

    fn slot(&self, index: u64) -> Option<usize> {
        (!self.tags.is_empty()).then(|| (index % self.tags.len() as u64) as usize)
    }

    /// What was last sent of page `index`, if the cache still holds it.
    pub fn get(&self, index: u64) -> Option<&[u8]> {
        let slot = self.slot(index)?;
        (self.tags[slot] == index).then(|| &self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE])
    }

    pub fn put(&mut self, index: u64, page: &[u8]) {
        if let Some(slot) = self.slot(index) {
            self.tags[slot] = index;
            self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(page);
        }
    }

    pub fn forget(&mut self, index: u64) {
        if let Some(slot) = self.slot(index)
            && self.tags[slot] == index
        {
            self.tags[slot] = u64::MAX;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(words: &[(usize, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        for &(i, v) in words {
            p[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        p
    }

    #[test]
    fn zero_detection_sees_a_single_bit() {
        assert!(is_zero(&[0u8; PAGE_SIZE]));
        for at in [0, 7, 8, 63, 64, 2048, PAGE_SIZE - 1] {
            let mut p = vec![0u8; PAGE_SIZE];
            p[at] = 0x10;
            assert!(!is_zero(&p), "byte {at}");
        }
        assert_eq!(hash(&[0u8; PAGE_SIZE]), ZERO_HASH);
        assert_ne!(hash(&page_with(&[(3, 1)])), hash(&page_with(&[(3, 2)])));
    }

    #[test]
    fn delta_round_trips_and_is_small_for_a_few_words() {
        let old = page_with(&[(0, 1), (511, 1), (100, 7)]);
        let new = page_with(&[(0, 2), (511, 2), (100, 7), (200, 9), (201, 9)]);
        let mut out = Vec::new();
        assert!(encode_delta(&old, &new, PAGE_SIZE / 2, &mut out));
        assert!(out.len() < 48, "{} bytes", out.len());
        let mut page = old.clone();
        apply_delta(&mut page, &out).unwrap();
        assert_eq!(page, new);
        // Identical pages: an empty delta.
        let mut empty = Vec::new();
        assert!(encode_delta(&old, &old, 16, &mut empty));
        assert!(empty.is_empty());
    }

    #[test]
    fn delta_over_budget_leaves_the_output_alone() {
        let old = vec![0u8; PAGE_SIZE];
        let new: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8 | 1).collect();
        let mut out = vec![42];
        assert!(!encode_delta(&old, &new, 1024, &mut out));
        assert_eq!(out, vec![42]);
    }

    #[test]
    fn bad_deltas_are_refused_and_change_nothing() {
        let mut page = page_with(&[(5, 5)]);
        let before = page.clone();
        for bad in [
            vec![0x80],                                  // varint cut short
            vec![0, 1, 1, 2, 3],                         // run data cut short
            vec![0xff, 0x07, 1, 0, 0, 0, 0, 0, 0, 0, 0], // skip past the end
            vec![0, 0x81, 0x04],                         // count past the end
            vec![0xff, 0xff, 0xff, 0x01],                // varint too long
        ] {
            assert!(apply_delta(&mut page, &bad).is_err(), "{bad:?}");
            assert_eq!(page, before);
        }
    }

    #[test]
    fn cache_is_direct_mapped() {
        let mut c = DeltaCache::new(2 * PAGE_SIZE);
        let a = page_with(&[(1, 1)]);
        let b = page_with(&[(1, 2)]);
        c.put(4, &a);
        assert_eq!(c.get(4), Some(&a[..]));
        c.put(6, &b); // same slot as 4
        assert_eq!(c.get(4), None);
        assert_eq!(c.get(6), Some(&b[..]));
        c.forget(6);
        assert_eq!(c.get(6), None);
        assert!(DeltaCache::new(0).get(0).is_none());
    }
}
