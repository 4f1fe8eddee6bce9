//! A set of guest pages, one bit each: the pages to send in a round.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    words: Vec<u64>,
    pages: u64,
}

impl DirtySet {
    pub fn new(pages: u64) -> Self {
        DirtySet { words: vec![0; pages.div_ceil(64) as usize], pages }
    }

    pub fn all(pages: u64) -> Self {
        let mut s = Self::new(pages);
        for p in 0..pages {
            s.set(p);
        }
        s
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// ORs in a bitmap of `bits` pages that starts at page `first` (a KVM dirty log or a
    /// VMM bitmap of one memory region; `first` is the region's first page). Bits past
    /// the set's end are ignored.
    pub fn or_bitmap(&mut self, first: u64, bitmap: &[u64], bits: u64) {
        for (i, &w) in bitmap.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let offset = i as u64 * 64 + bit;
                if offset < bits {
                    self.set(first + offset);
                }
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds every page of `other` (of the same memory).
    pub fn add_all(&mut self, other: &DirtySet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    /// Moves the lowest `n` pages (fewer if the set has fewer) out of the set into `into`,
    /// which it empties first. `scan` is where to look from (a word index, 0 at first): the
    /// set is taken apart in order without looking at the words it emptied again.
    pub fn take_first(&mut self, n: usize, scan: &mut usize, into: &mut Vec<u64>) {
        into.clear();
        while let Some(word) = self.words.get_mut(*scan) {
            while *word != 0 && into.len() < n {
                let bit = word.trailing_zeros() as u64;
                *word &= *word - 1;
                into.push(*scan as u64 * 64 + bit);
            }
            if into.len() == n {
                return;
            }
            *scan += 1;
        }
    }

    /// The set as runs of (first page, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in self.iter() {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }

    /// Adds runs of (first page, count); None if one reaches past the set's end.
    pub fn add_runs(&mut self, runs: &[(u64, u64)]) -> Option<()> {
        for &(first, count) in runs {
            if first.checked_add(count)? > self.pages {
                return None;
            }
        }
        for &(first, count) in runs {
            for page in first..first + count {
                self.set(page);
            }
        }
        Some(())
    }

    pub fn remove(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_runs_round_trip_and_runs_past_the_end_are_refused() {
        let mut set = DirtySet::new(300);
        for p in [0, 1, 2, 63, 64, 65, 200, 299] {
            set.set(p);
        }
        assert_eq!(set.runs(), vec![(0, 3), (63, 3), (200, 1), (299, 1)]);
        let mut back = DirtySet::new(300);
        assert_eq!(back.add_runs(&set.runs()), Some(()));
        assert_eq!(back, set);
        back.remove(64);
        assert_eq!(back.runs()[1], (63, 1));
        // Nothing is added when one run is bad, and an overflowing run is bad too.
        let mut other = DirtySet::new(300);
        assert_eq!(other.add_runs(&[(5, 1), (299, 2)]), None);
        assert_eq!(other.add_runs(&[(u64::MAX, 2)]), None);
        assert_eq!(other.count(), 0);
    }

    #[test]
    fn test_take_first_moves_pages_out_in_order_and_add_all_joins_sets() {
        let mut set = DirtySet::new(200);
        for p in [3, 64, 65, 130, 199] {
            set.set(p);
        }
        let mut other = DirtySet::new(200);
        other.set(0);
        other.set(65);
        set.add_all(&other);
        let (mut scan, mut taken, mut all) = (0, Vec::new(), Vec::new());
        loop {
            set.take_first(2, &mut scan, &mut taken);
            if taken.is_empty() {
                break;
            }
            all.extend_from_slice(&taken);
        }
        assert_eq!(all, [0, 3, 64, 65, 130, 199]);
        assert_eq!(set.count(), 0);
    }

    #[test]
    fn bitmaps_merge_at_their_region_offset() {
        let mut s = DirtySet::new(200);
        s.or_bitmap(100, &[0b101, 1 << 63], 70);
        // Bit 127 of the region is past its 70 pages: ignored.
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![100, 102]);
        s.set(199);
        s.set(200); // out of range: ignored
        assert_eq!(s.count(), 3);
        assert!(s.contains(199) && !s.contains(200));
        s.clear();
        assert_eq!(s.count(), 0);
        assert_eq!(DirtySet::all(130).count(), 130);
    }
}
