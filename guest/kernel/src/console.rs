//! Serial output on the 8250 at 0x3f8, one line per `rep outsb`. No `core::fmt`: it costs
//! thousands of instructions per line, which is milliseconds here.

use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
static LOCK: AtomicBool = AtomicBool::new(false);

pub struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line { buf: [0; 192], len: 0 }
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if self.len < self.buf.len() - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn u64(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.bytes(&[digits[n]]);
        }
        self
    }

    pub fn hex(&mut self, v: u64) -> &mut Self {
        self.str("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((v >> (shift * 4)) & 0xf) as u8;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.bytes(&[if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 }]);
            }
        }
        self
    }

    /// Key-value pair ` key=value`.
    pub fn kv(&mut self, key: &str, v: u64) -> &mut Self {
        self.str(" ").str(key).str("=").u64(v)
    }

    pub fn print(&mut self) {
        self.buf[self.len] = b'\n';
        while LOCK.swap(true, Ordering::Acquire) {
            crate::io::spin_hint();
        }
        crate::io::outsb(COM1, &self.buf[..=self.len]);
        LOCK.store(false, Ordering::Release);
        self.len = 0;
    }
}

pub fn say(s: &str) {
    Line::new().str(s).print();
}
