//! The memory digest both sides keep during a migration: a sum, over every page that is
//! not all zeroes, of BLAKE3(page number, content hash). A sum can be updated in O(1) when
//! one page changes (subtract its old term, add the new), so the digest is always current
//! and costs nothing extra at switchover; each side computes it from what it sent or
//! received, and comparing them proves the destination holds exactly what was sent.

use crate::page::{PageHash, ZERO_HASH};
use crate::protocol::Digest;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryDigest {
    lanes: [u64; 4],
}

fn term(page: u64, hash: &PageHash) -> [u64; 4] {
    let mut h = blake3::Hasher::new();
    h.update(&page.to_le_bytes());
    h.update(hash);
    let bytes = h.finalize();
    let mut lanes = [0u64; 4];
    for (lane, chunk) in lanes.iter_mut().zip(bytes.as_bytes().chunks_exact(8)) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        *lane = u64::from_le_bytes(w);
    }
    lanes
}

impl MemoryDigest {
    /// Page `page`'s content changes from hash `old` to hash `new`.
    pub fn replace(&mut self, page: u64, old: &PageHash, new: &PageHash) {
        if old == new {
            return;
        }
        if *old != ZERO_HASH {
            for (lane, t) in self.lanes.iter_mut().zip(term(page, old)) {
                *lane = lane.wrapping_sub(t);
            }
        }
        if *new != ZERO_HASH {
            for (lane, t) in self.lanes.iter_mut().zip(term(page, new)) {
                *lane = lane.wrapping_add(t);
            }
        }
    }

    /// The digest of two disjoint sets of pages together (a sum, like each one).
    pub fn plus(&self, other: &MemoryDigest) -> MemoryDigest {
        let mut lanes = self.lanes;
        for (lane, o) in lanes.iter_mut().zip(other.lanes) {
            *lane = lane.wrapping_add(o);
        }
        MemoryDigest { lanes }
    }

    pub fn bytes(&self) -> Digest {
        let mut out = [0u8; 32];
        for (chunk, lane) in out.chunks_exact_mut(8).zip(self.lanes) {
            chunk.copy_from_slice(&lane.to_le_bytes());
        }
        out
    }
}

/// A digest as hex, for reports and errors.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_and_updates_cancel() {
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let mut x = MemoryDigest::default();
        x.replace(1, &ZERO_HASH, &a);
        x.replace(2, &ZERO_HASH, &b);
        let mut y = MemoryDigest::default();
        y.replace(2, &ZERO_HASH, &c);
        y.replace(1, &ZERO_HASH, &a);
        y.replace(2, &c, &b);
        assert_eq!(x, y);
        // The same content at another page is another digest.
        let mut z = MemoryDigest::default();
        z.replace(3, &ZERO_HASH, &a);
        z.replace(2, &ZERO_HASH, &b);
        assert_ne!(x, z);
        // Back to zero.
        x.replace(1, &a, &ZERO_HASH);
        x.replace(2, &b, &ZERO_HASH);
        assert_eq!(x, MemoryDigest::default());
        assert_eq!(hex(&x.bytes()).len(), 64);
    }
}
