//! The self-verifying memory workload. Each CPU owns a slice of the working set and sweeps
//! a cursor through it; every write stores `value(page, generation)` in the first and last
//! word of the page. The generation of any page follows from the cursor and the pass count
//! alone, so verification needs no bookkeeping per page and costs a few instructions each.

pub const PAGE: u64 = 4096;
const LAST_WORD: u64 = PAGE - 8;

pub fn value(page: u64, generation: u64) -> u64 {
    page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ 0x5eed
}

pub struct Slice {
    /// Guest-physical address of page 0 of the whole working set.
    base: u64,
    /// Index of this slice's first page in the working set.
    first: u64,
    count: u64,
    cursor: u64,
    pass: u64,
}

#[derive(Clone, Copy)]
pub struct Verdict {
    pub bad: u64,
    pub first_bad: u64,
}

impl Slice {
    pub fn new(base: u64, first: u64, count: u64) -> Self {
        Slice { base, first, count, cursor: 0, pass: 0 }
    }

    pub fn pages(&self) -> u64 {
        self.count
    }

    fn write(&self, index: u64, generation: u64) {
        let page = self.first + index;
        let addr = self.base + page * PAGE;
        let v = value(page, generation);
        // SAFETY: the slice lies in RAM that the memory map gave us and nothing else uses.
        unsafe {
            (addr as *mut u64).write_volatile(v);
            ((addr + LAST_WORD) as *mut u64).write_volatile(v);
        }
    }

    /// First pass: every page gets generation 1.
    pub fn fill(&mut self) {
        for i in 0..self.count {
            self.write(i, 1);
        }
        self.pass = 1;
        self.cursor = 0;
    }

    /// Dirties the next `n` pages, moving each to its next generation.
    pub fn dirty(&mut self, n: u64) {
        if self.count == 0 {
            return;
        }
        for _ in 0..n {
            self.write(self.cursor, self.pass + 1);
            self.cursor += 1;
            if self.cursor == self.count {
                self.cursor = 0;
                self.pass += 1;
            }
        }
    }

    pub fn verify(&self) -> Verdict {
        let mut verdict = Verdict { bad: 0, first_bad: 0 };
        for i in 0..self.count {
            let generation = if i < self.cursor { self.pass + 1 } else { self.pass };
            let page = self.first + i;
            let addr = self.base + page * PAGE;
            let v = value(page, generation);
            // SAFETY: as in `write`.
            let (a, b) =
                unsafe { ((addr as *const u64).read_volatile(), ((addr + LAST_WORD) as *const u64).read_volatile()) };
            if a != v || b != v {
                if verdict.bad == 0 {
                    verdict.first_bad = page;
                }
                verdict.bad += 1;
            }
        }
        verdict
    }

    /// Breaks one page on purpose (the `corrupt=` knob), to show that verification can fail.
    pub fn corrupt(&self) {
        if self.count > 0 {
            // SAFETY: as in `write`.
            unsafe {
                let p = (self.base + self.first * PAGE) as *mut u64;
                p.write_volatile(p.read_volatile() ^ 1);
            }
        }
    }
}
