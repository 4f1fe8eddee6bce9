//! The virtio-rng test (virtio 1.2 section 5.4): asks the entropy device for N bytes and
//! checks that exactly N arrived and that they are not all the same.

use crate::console::Line;
use crate::virtio::{DESC_WRITE, Error, QueueMem, REQUEST_TIMEOUT_NS, Transport};

pub const MAX_BYTES: u64 = 4096;
/// A device may return fewer bytes than asked for; it gets this many requests to fill the buffer.
const MAX_REQUESTS: u32 = 64;

static mut QUEUE: QueueMem = QueueMem::new();
/// Aligned for the word stores that zero it.
#[repr(C, align(8))]
struct Bytes([u8; MAX_BYTES as usize]);
static mut BUF: Bytes = Bytes([0; MAX_BYTES as usize]);

fn fetch(t: Transport, n: u64) -> Result<&'static [u8], Error> {
    t.start(0)?;
    let mut q = t.setup_queue(0, &raw mut QUEUE)?;
    t.driver_ok()?;
    let buf = &raw mut BUF as u64;
    // Zeroed, so bytes the device claims but does not write show up as all equal; a word
    // at a time (`memset` would go a byte at a time, each a step of the emulator).
    for i in 0..n.div_ceil(8) as usize {
        // SAFETY: the device does not own the buffer yet; n.div_ceil(8) words fit in it, as
        // n <= MAX_BYTES, itself a multiple of 8.
        unsafe { (buf as *mut u64).add(i).write_volatile(0) };
    }
    let mut got = 0;
    for _ in 0..MAX_REQUESTS {
        if got == n {
            break;
        }
        let want = (n - got) as u32;
        q.set(0, buf + got, want, DESC_WRITE, 0);
        q.push(0);
        t.notify(&q);
        let (id, len) = q.wait(t, REQUEST_TIMEOUT_NS)?;
        if id != 0 {
            return Err(Error::BadRing);
        }
        if len > want {
            return Err(Error::Setup("overlong"));
        }
        got += u64::from(len);
    }
    if got != n {
        return Err(Error::Setup("short"));
    }
    // SAFETY: the device returned the buffer.
    let all: &'static [u8; MAX_BYTES as usize] = unsafe { &(*(&raw const BUF)).0 };
    Ok(&all[..n as usize])
}

/// Tests the entropy device and leaves it reset; `n` is 1..=MAX_BYTES.
pub fn test(t: Transport, n: u64) {
    let n = n.clamp(1, MAX_BYTES);
    let result = fetch(t, n);
    let mut line = Line::new();
    match result {
        Ok(bytes) => {
            // A byte table: two instructions a byte, where a bitmap takes about seven.
            let mut seen = [0u8; 256];
            for &b in bytes {
                seen[usize::from(b)] = 1;
            }
            let distinct: u32 = seen.iter().map(|&s| u32::from(s)).sum();
            if n > 1 && distinct == 1 {
                line.str("RNG FAIL reason=all equal").kv("bytes", n);
            } else {
                line.str("RNG OK").kv("bytes", n).kv("distinct", u64::from(distinct));
            }
        }
        Err(e) => {
            line.str("RNG FAIL reason=").str(e.reason());
        }
    }
    t.stop(result.is_err());
    line.print();
}
