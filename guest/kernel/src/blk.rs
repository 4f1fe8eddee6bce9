//! The virtio-blk test (virtio 1.2 section 5.2): writes a known pattern, flushes, reads it
//! back and compares; on a read-only disk, checks that a write is refused. One request at
//! a time, each a chain of header, data and status descriptors.

use crate::cmdline::MAX_BLK_SECTORS;
use crate::console::Line;
use crate::virtio::{DESC_NEXT, DESC_WRITE, Error, Queue, QueueMem, REQUEST_TIMEOUT_NS, Transport};

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR_WORDS: usize = 64;
/// Sectors per request: 32 KiB.
const CHUNK: u64 = 64;
const ID_BYTES: usize = 20;
const MAX_WORDS: usize = MAX_BLK_SECTORS as usize * SECTOR_WORDS;

#[repr(C)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(4096))]
struct Sectors<const N: usize>([u64; N]);

static mut QUEUE: QueueMem = QueueMem::new();
static mut HEADER: Header = Header { kind: 0, reserved: 0, sector: 0 };
static mut STATUS: u8 = 0;
static mut ID: [u8; ID_BYTES] = [0; ID_BYTES];
/// The whole pattern, written once: the read-back compares against it with `repe cmpsq`,
/// a few times cheaper here than computing each word again.
static mut WRITE_BUF: Sectors<MAX_WORDS> = Sectors([0; MAX_WORDS]);
/// One request's worth of sectors read back.
static mut READ_BUF: Sectors<{ CHUNK as usize * SECTOR_WORDS }> = Sectors([0; CHUNK as usize * SECTOR_WORDS]);

/// The u64 at byte 8*k of sector s; the host test checks the disk image for exactly this.
pub fn blk_word(s: u64, k: u64) -> u64 {
    s.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ 0xb10c
}

/// The k multiplier of `blk_word`.
const K_STEP: u64 = 0xc2b2_ae3d_27d4_eb4f;

fn buf<const N: usize>(b: *mut Sectors<N>) -> &'static mut [u64] {
    // SAFETY: the buffers are statics that only this module uses, on the BSP alone, and
    // never while the device owns them.
    unsafe { &mut (*b).0 }
}

/// Fills `count` sectors from `first` with their pattern; k * K_STEP is kept as a running
/// sum, so a word costs a few instructions.
fn fill(words: &mut [u64], first: u64, count: u64) {
    for (i, sector) in words.chunks_exact_mut(SECTOR_WORDS).take(count as usize).enumerate() {
        let base = blk_word(first + i as u64, 0);
        let mut k_part = 0u64;
        for w in sector {
            *w = base ^ k_part;
            k_part = k_part.wrapping_add(K_STEP);
        }
    }
}

/// The index of the first word of `a` that `b` does not match.
fn first_difference(a: &[u64], b: &[u64]) -> Option<usize> {
    if a.is_empty() {
        return None;
    }
    if b.len() < a.len() {
        return Some(b.len());
    }
    let left: usize;
    let differ: u8;
    // SAFETY: reads a.len() words from each slice; the direction flag is clear (ABI).
    unsafe {
        core::arch::asm!("repe cmpsq", "setne {differ}", differ = out(reg_byte) differ,
             inout("rcx") a.len() => left, inout("rsi") a.as_ptr() => _, inout("rdi") b.as_ptr() => _,
             options(nostack, readonly));
    }
    // The differing word is the last one compared.
    (differ != 0).then(|| a.len() - left - 1)
}

/// Why a disk failed, with the request's sector and status when they tell something.
struct Fail {
    reason: &'static str,
    sector: Option<u64>,
    status: Option<u8>,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail { reason: e.reason(), sector: None, status: None }
    }
}

fn fail(reason: &'static str, sector: u64, status: Option<u8>) -> Fail {
    Fail { reason, sector: Some(sector), status }
}

struct Disk {
    t: Transport,
    q: Queue,
}

enum Data {
    None,
    /// The device reads `len` bytes at the address.
    Out(u64, u32),
    /// The device writes them.
    In(u64, u32),
}

impl Disk {
    /// One request, waited for; returns the status byte the device wrote.
    fn request(&mut self, kind: u32, sector: u64, data: Data) -> Result<u8, Error> {
        // SAFETY: the header and status are this module's statics; the device does not own
        // them between requests.
        unsafe {
            (&raw mut HEADER).write_volatile(Header { kind, reserved: 0, sector });
            // Not a status the device can write: a request it "completes" without writing one fails.
            (&raw mut STATUS).write_volatile(0xff);
        }
        let status_addr = &raw const STATUS as u64;
        self.q.set(0, &raw const HEADER as u64, 16, DESC_NEXT, 1);
        match data {
            Data::None => self.q.set(1, status_addr, 1, DESC_WRITE, 0),
            Data::Out(addr, len) | Data::In(addr, len) => {
                let flags = if matches!(data, Data::In(..)) { DESC_NEXT | DESC_WRITE } else { DESC_NEXT };
                self.q.set(1, addr, len, flags, 2);
                self.q.set(2, status_addr, 1, DESC_WRITE, 0);
            }
        }
        self.q.push(0);
        self.t.notify(&self.q);
        let (id, _) = self.q.wait(self.t, REQUEST_TIMEOUT_NS)?;
        if id != 0 {
            return Err(Error::BadRing);
        }
        // SAFETY: the device returned the chain; the status byte is ours again.
        Ok(unsafe { (&raw const STATUS).read_volatile() })
    }

    /// Transfers `count` sectors from `first` between the disk and memory at `addr`.
    fn transfer(&mut self, kind: u32, first: u64, count: u64, addr: u64) -> Result<(), Fail> {
        let data = if kind == T_OUT { Data::Out } else { Data::In };
        let status =
            self.request(kind, first, data(addr, (count * 512) as u32)).map_err(|e| fail(e.reason(), first, None))?;
        if status != S_OK {
            let reason = if kind == T_OUT { "write error" } else { "read error" };
            return Err(fail(reason, first, Some(status)));
        }
        Ok(())
    }

    /// The device's ID string; empty when it does not support GET_ID.
    fn get_id(&mut self) -> Result<[u8; ID_BYTES], Fail> {
        // SAFETY: as in `request`.
        unsafe { (&raw mut ID).write_volatile([0; ID_BYTES]) };
        let status = self.request(T_GET_ID, 0, Data::In(&raw const ID as u64, ID_BYTES as u32))?;
        match status {
            // SAFETY: as in `request`.
            S_OK => Ok(unsafe { (&raw const ID).read_volatile() }),
            S_UNSUPP => Ok([0; ID_BYTES]),
            s => Err(fail("get id error", 0, Some(s))),
        }
    }
}

enum Outcome {
    ReadWrite { sectors: u64, capacity: u64, id: [u8; ID_BYTES] },
    ReadOnly { capacity: u64, id: [u8; ID_BYTES] },
}

fn test_disk(t: Transport, wanted: u64) -> Result<Outcome, Fail> {
    let features = t.start(F_RO | F_FLUSH)?;
    let q = t.setup_queue(0, &raw mut QUEUE)?;
    t.driver_ok()?;
    let mut disk = Disk { t, q };
    let capacity = t.config_u64(0);
    if capacity == 0 {
        return Err(Fail { reason: "no capacity", sector: None, status: None });
    }
    let sectors = wanted.min(capacity);
    let written = &mut buf(&raw mut WRITE_BUF)[..sectors as usize * SECTOR_WORDS];
    let (w, r) = (written.as_ptr() as u64, &raw mut READ_BUF);

    if features & F_RO != 0 {
        fill(written, 0, 1);
        let status = disk.request(T_OUT, 0, Data::Out(w, 512))?;
        if status != S_IOERR {
            return Err(fail("ro write not refused", 0, Some(status)));
        }
        let mut first = 0;
        while first < sectors {
            let count = (sectors - first).min(CHUNK);
            disk.transfer(T_IN, first, count, r as u64)?;
            first += count;
        }
        return Ok(Outcome::ReadOnly { capacity, id: disk.get_id()? });
    }

    fill(written, 0, sectors);
    let written: &[u64] = written;
    let mut first = 0;
    while first < sectors {
        let count = (sectors - first).min(CHUNK);
        disk.transfer(T_OUT, first, count, w + first * 512)?;
        first += count;
    }
    if features & F_FLUSH != 0 {
        let status = disk.request(T_FLUSH, 0, Data::None)?;
        if status != S_OK {
            return Err(fail("flush error", 0, Some(status)));
        }
    }
    first = 0;
    while first < sectors {
        let count = (sectors - first).min(CHUNK);
        let expected = &written[first as usize * SECTOR_WORDS..(first + count) as usize * SECTOR_WORDS];
        // Spoil each sector's first word, so a read that moves no data cannot pass.
        for (g, e) in buf(r).chunks_exact_mut(SECTOR_WORDS).zip(expected.chunks_exact(SECTOR_WORDS)) {
            g[0] = !e[0];
        }
        disk.transfer(T_IN, first, count, r as u64)?;
        // Borrowed only now that the device has written it.
        if let Some(word) = first_difference(&buf(r)[..expected.len()], expected) {
            return Err(fail("data mismatch", first + (word / SECTOR_WORDS) as u64, None));
        }
        first += count;
    }
    Ok(Outcome::ReadWrite { sectors, capacity, id: disk.get_id()? })
}

/// The ID as printable ASCII up to its first NUL; anything else shows as `?`.
fn id_str<'a>(line: &'a mut Line, id: &[u8; ID_BYTES]) -> &'a mut Line {
    line.str(" id=");
    for &c in id {
        if c == 0 {
            break;
        }
        line.bytes(&[if c.is_ascii_graphic() { c } else { b'?' }]);
    }
    line
}

/// Tests every block device, in slot order, and leaves each reset.
pub fn test_all(disks: impl Iterator<Item = Transport>, wanted: u64) {
    let mut count = 0;
    for (d, t) in disks.enumerate() {
        count += 1;
        let mut line = Line::new();
        let result = test_disk(t, wanted);
        match &result {
            Ok(Outcome::ReadWrite { sectors, capacity, id }) => {
                line.str("BLK OK").kv("disk", d as u64).kv("sectors", *sectors).kv("capacity", *capacity);
                id_str(&mut line, id);
            }
            Ok(Outcome::ReadOnly { capacity, id }) => {
                line.str("BLK RO OK").kv("disk", d as u64).kv("capacity", *capacity);
                id_str(&mut line, id).str(" write=refused");
            }
            Err(f) => {
                line.str("BLK FAIL").kv("disk", d as u64).str(" reason=").str(f.reason);
                if let Some(s) = f.sector {
                    line.kv("sector", s);
                }
                if let Some(s) = f.status {
                    line.kv("status", u64::from(s));
                }
            }
        }
        t.stop(result.is_err());
        line.print();
    }
    if count == 0 {
        Line::new().str("BLK FAIL reason=no device").print();
    }
}
