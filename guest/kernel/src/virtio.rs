//! virtio-mmio transports (virtio 1.2 section 4.2, version 2 registers) and split
//! virtqueues (section 2.7), polled: the guest never takes a device interrupt. Every
//! register access is an exit to the VMM, so drivers touch registers only to set up and to
//! notify, and wait by reading the used ring, which is plain memory.
//!
//! Whatever a device writes (used ring indices, ids, lengths) is untrusted: it is checked
//! before it indexes anything.

use crate::cmdline::{NetTest, Params};
use crate::console::Line;
use crate::{apic, blk, clock, net, rng};
use core::sync::atomic::{Ordering, fence};

/// Where QEMU microvm puts its transports, and NovaCron's VMM too.
const WINDOW: u64 = 0xfeb0_0000;
const STRIDE: u64 = 0x200;
const SLOTS: usize = 24;
const MAGIC: u32 = 0x7472_6976;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 64;
const FAILED: u32 = 128;

pub const F_VERSION_1: u64 = 1 << 32;

pub const ID_NET: u32 = 1;
pub const ID_BLK: u32 = 2;
pub const ID_RNG: u32 = 4;

pub const MS: u64 = 1_000_000;
/// How long a driver waits for one request before it gives the device up.
pub const REQUEST_TIMEOUT_NS: u64 = 5_000 * MS;

/// Why a driver gave a device up; printed as `reason=...`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Error {
    Timeout,
    NeedsReset,
    /// The used ring holds something the driver never offered.
    BadRing,
    Setup(&'static str),
}

impl Error {
    pub fn reason(self) -> &'static str {
        match self {
            Error::Timeout => "timeout",
            Error::NeedsReset => "device needs reset",
            Error::BadRing => "bad used ring",
            Error::Setup(why) => why,
        }
    }
}

#[derive(Clone, Copy)]
pub struct Transport {
    base: u64,
}

impl Transport {
    fn read(self, reg: u64) -> u32 {
        // SAFETY: the transport window lies below 4 GiB, identity mapped; registers are u32.
        unsafe { ((self.base + reg) as *const u32).read_volatile() }
    }

    fn write(self, reg: u64, value: u32) {
        // SAFETY: as `read`.
        unsafe { ((self.base + reg) as *mut u32).write_volatile(value) }
    }

    pub fn config_u8(self, offset: u64) -> u8 {
        // SAFETY: as `read`; the spec wants byte accesses for byte fields.
        unsafe { ((self.base + CONFIG + offset) as *const u8).read_volatile() }
    }

    /// A 64-bit config field, read as two halves under the config generation.
    pub fn config_u64(self, offset: u64) -> u64 {
        let mut value = 0;
        for _ in 0..4 {
            let generation = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            value = u64::from(low) | (u64::from(high) << 32);
            if self.read(CONFIG_GENERATION) == generation {
                break;
            }
        }
        value
    }

    /// Resets the device and negotiates features (spec 3.1.1): accepts VERSION_1, which
    /// it requires, and whichever of `wanted` the device offers. Returns what was accepted.
    pub fn start(self, wanted: u64) -> Result<u64, Error> {
        self.write(STATUS, 0);
        let mut tries = 0;
        while self.read(STATUS) != 0 {
            tries += 1;
            if tries == 100 {
                return Err(Error::Setup("reset refused"));
            }
        }
        self.write(STATUS, ACKNOWLEDGE);
        self.write(STATUS, ACKNOWLEDGE | DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let offered = u64::from(low) | (u64::from(self.read(DEVICE_FEATURES)) << 32);
        if offered & F_VERSION_1 == 0 {
            return Err(Error::Setup("no VERSION_1"));
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if self.read(STATUS) & FEATURES_OK == 0 {
            return Err(Error::Setup("features refused"));
        }
        Ok(accepted)
    }

    /// Gives queue `index` to the device (spec 4.2.3.2). The ring indices are zeroed first:
    /// after a reset the device counts from zero, and the memory may hold an earlier
    /// device's. (Descriptors and ring entries are written before they are offered.)
    pub fn setup_queue(self, index: u16, mem: *mut QueueMem) -> Result<Queue, Error> {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return Err(Error::Setup("queue in use"));
        }
        let max = self.read(QUEUE_NUM_MAX);
        if max == 0 {
            return Err(Error::Setup("no queue"));
        }
        // Split rings have a power-of-two size: the largest one within both limits.
        let mut size = QUEUE_MAX as u32;
        while size > max {
            size /= 2;
        }
        // SAFETY: `mem` is a static queue area that only this driver uses, and the device
        // does not own it yet (or was reset since). Polled: the avail flags ask the device
        // not to interrupt us (a hint it may ignore).
        unsafe {
            (&raw mut (*mem).avail.flags).write_volatile(AVAIL_F_NO_INTERRUPT);
            (&raw mut (*mem).avail.idx).write_volatile(0);
            (&raw mut (*mem).used.flags).write_volatile(0);
            (&raw mut (*mem).used.idx).write_volatile(0);
        }
        self.write(QUEUE_NUM, size);
        // SAFETY: only addresses are taken.
        let (desc, avail, used) =
            unsafe { (&raw const (*mem).desc as u64, &raw const (*mem).avail as u64, &raw const (*mem).used as u64) };
        for (reg, addr) in [(QUEUE_DESC, desc), (QUEUE_DRIVER, avail), (QUEUE_DEVICE, used)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
        Ok(Queue { mem, size: size as u16, index, next_avail: 0, last_used: 0, outstanding: 0 })
    }

    pub fn driver_ok(self) -> Result<(), Error> {
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        if self.needs_reset() {
            return Err(Error::NeedsReset);
        }
        Ok(())
    }

    pub fn notify(self, q: &Queue) {
        self.write(QUEUE_NOTIFY, u32::from(q.index));
    }

    pub fn needs_reset(self) -> bool {
        self.read(STATUS) & NEEDS_RESET != 0
    }

    /// Ends the driver's use of the device: FAILED first when it gave up, then a reset, so
    /// that the device holds no buffer of ours any more.
    pub fn stop(self, failed: bool) {
        if failed {
            self.write(STATUS, (self.read(STATUS) & !NEEDS_RESET) | FAILED);
        }
        self.write(STATUS, 0);
    }
}

/// The largest queue a driver uses: small, to keep the rings in a few hundred bytes.
pub const QUEUE_MAX: usize = 16;
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_MAX],
    used_event: u16,
}

#[repr(C)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_MAX],
    avail_event: u16,
}

/// One split virtqueue's memory: descriptor table (16-byte aligned), available ring
/// (2) and used ring (4, which `UsedElem` gives).
#[repr(C, align(16))]
pub struct QueueMem {
    desc: [Desc; QUEUE_MAX],
    avail: Avail,
    used: Used,
}

impl QueueMem {
    pub const fn new() -> Self {
        QueueMem {
            desc: [const { Desc { addr: 0, len: 0, flags: 0, next: 0 } }; QUEUE_MAX],
            avail: Avail { flags: 0, idx: 0, ring: [0; QUEUE_MAX], used_event: 0 },
            used: Used { flags: 0, idx: 0, ring: [const { UsedElem { id: 0, len: 0 } }; QUEUE_MAX], avail_event: 0 },
        }
    }
}

/// The driver's side of a split virtqueue.
pub struct Queue {
    mem: *mut QueueMem,
    /// Power of two, at most `QUEUE_MAX`.
    pub size: u16,
    index: u16,
    next_avail: u16,
    last_used: u16,
    /// Chains offered and not yet returned: the device cannot return more.
    outstanding: u16,
}

impl Queue {
    /// Writes descriptor `i` (< size, chosen by the driver).
    pub fn set(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let slot = usize::from(i % self.size);
        // SAFETY: `mem` is this queue's static area; the device only reads descriptors of
        // chains it was offered, and this one is not offered yet.
        unsafe {
            (&raw mut (*self.mem).desc[slot]).write_volatile(Desc { addr, len, flags, next });
        }
    }

    /// Offers the chain starting at descriptor `head`.
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.outstanding += 1;
        // SAFETY: as `set`; the index is published after the entry and the descriptors.
        unsafe {
            (&raw mut (*self.mem).avail.ring[slot]).write_volatile(head);
            fence(Ordering::Release);
            (&raw mut (*self.mem).avail.idx).write_volatile(self.next_avail);
        }
    }

    /// The next chain the device returned, as (head id, bytes it wrote), if any.
    pub fn pop(&mut self) -> Result<Option<(u16, u32)>, Error> {
        // SAFETY: the device writes the used ring; volatile reads see its writes.
        let idx = unsafe { (&raw const (*self.mem).used.idx).read_volatile() };
        if idx == self.last_used {
            return Ok(None);
        }
        if idx.wrapping_sub(self.last_used) > self.outstanding {
            return Err(Error::BadRing);
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: as above.
        let (id, len) = unsafe {
            let e = &raw const (*self.mem).used.ring[slot];
            ((&raw const (*e).id).read_volatile(), (&raw const (*e).len).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        self.outstanding -= 1;
        if id >= u32::from(self.size) {
            return Err(Error::BadRing);
        }
        Ok(Some((id as u16, len)))
    }

    /// Waits for the next returned chain, at most `timeout_ns`.
    pub fn wait(&mut self, t: Transport, timeout_ns: u64) -> Result<(u16, u32), Error> {
        let mut w = Waiter::new(t, timeout_ns);
        loop {
            if let Some(done) = self.pop()? {
                return Ok(done);
            }
            w.pause()?;
        }
    }
}

/// Paces a polling loop: spins for the first 200 µs (a plain read of the used ring is
/// cheap), then sleeps on the APIC timer for an eighth of the time waited so far, at most
/// 1 ms, looking at the device status after each sleep.
pub struct Waiter {
    t: Transport,
    start: u64,
    deadline: u64,
}

impl Waiter {
    pub fn new(t: Transport, timeout_ns: u64) -> Self {
        let start = clock::now_ns(0);
        Waiter { t, start, deadline: start + timeout_ns }
    }

    pub fn pause(&mut self) -> Result<(), Error> {
        let now = clock::now_ns(0);
        if now >= self.deadline {
            return Err(Error::Timeout);
        }
        let waited = now - self.start;
        if waited > MS / 5 {
            apic::sleep_ns((waited / 8).clamp(50_000, MS).min(self.deadline - now));
            if self.t.needs_reset() {
                return Err(Error::NeedsReset);
            }
        }
        Ok(())
    }
}

fn name(id: u32) -> &'static str {
    match id {
        ID_NET => "net",
        ID_BLK => "blk",
        ID_RNG => "rng",
        _ => "other",
    }
}

/// The version-2 transports found, in slot order.
pub struct Devices {
    list: [(u32, Transport); SLOTS],
    count: usize,
}

impl Devices {
    pub fn of(&self, id: u32) -> impl Iterator<Item = Transport> + '_ {
        self.list[..self.count].iter().filter(move |d| d.0 == id).map(|d| d.1)
    }
}

/// Looks at every slot and prints what it finds. DeviceID is read first: QEMU fills all
/// 24 slots with transports, mostly empty, and an empty one then costs a single exit.
fn discover() -> Devices {
    let mut found = Devices { list: [(0, Transport { base: 0 }); SLOTS], count: 0 };
    for slot in 0..SLOTS {
        let t = Transport { base: WINDOW + slot as u64 * STRIDE };
        let id = t.read(DEVICE_ID);
        if id == 0 || t.read(MAGIC_VALUE) != MAGIC {
            continue;
        }
        let version = t.read(VERSION);
        if version != 2 {
            Line::new()
                .str("VIRTIO")
                .kv("slot", slot as u64)
                .str(" unsupported")
                .kv("version", u64::from(version))
                .print();
            continue;
        }
        Line::new().str("VIRTIO").kv("slot", slot as u64).kv("id", u64::from(id)).str(" ").str(name(id)).print();
        found.list[found.count] = (id, t);
        found.count += 1;
    }
    found
}

/// The device tests the command line asks for, on the BSP before the workload starts.
/// Without device words the transport window is not touched at all.
pub fn run(p: &Params) {
    net::clear();
    if p.blk_sectors == 0 && p.rng_bytes == 0 && p.net == NetTest::Off {
        return;
    }
    let devices = discover();
    if p.blk_sectors > 0 {
        blk::test_all(devices.of(ID_BLK), p.blk_sectors);
    }
    if p.rng_bytes > 0 {
        match devices.of(ID_RNG).next() {
            Some(t) => rng::test(t, p.rng_bytes),
            None => Line::new().str("RNG FAIL reason=no device").print(),
        }
    }
    if p.net != NetTest::Off {
        match devices.of(ID_NET).next() {
            Some(t) => net::start(t, p.net),
            None => Line::new().str("NET FAIL reason=no device").print(),
        }
    }
}
