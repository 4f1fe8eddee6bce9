//! The NovaCron test guest.
//!
//! A tiny x86-64 kernel that boots through the PVH entry (on NovaCron's VMM and on QEMU
//! microvm alike), brings up every vCPU, and runs a self-verifying memory workload whose
//! parameters come from its command line. What it prints, line by line:
//!
//! ```text
//! NOVACRON-GUEST boot                                  (first instruction, before anything)
//! NOVACRON-GUEST v1 cpus=4 mem=512 ws=64 rate=1000 verify=1000 hb=500 exit=0 clock=kvm
//! INITRD bytes=65536 hash=0x5b1d...                    (only with an initrd; hash=skipped with initrd=skip)
//! SMP online=4
//! READY pages=16384 base=0x1000000
//! HB 1                                                 (every hb ms, sequence from 1)
//! VERIFY OK epoch=1 pages=16384 cpus=4                 (every verify ms)
//! VERIFY FAIL epoch=2 bad=1 first=0 cpus=4
//! ```
//!
//! Command line words (all optional): `ws=MiB rate=pages/s verify=ms hb=ms exit=N`
//! `exitmode=poweroff|reset|triplefault corrupt=EPOCH blk=N rng=N net=send:N|echo`
//! `initrd=hash|skip`.
//! `mem` is in MiB.
//! It is frugal in instructions: this machine's KVM emulates guests at ~1.3 MIPS.
//!
//! Device tests: polled virtio-mmio drivers (virtio 1.2, version 2 transports only) for
//! the transports at 0xfeb0_0000 + i * 0x200, i < 24 (QEMU microvm's layout and NovaCron's;
//! QEMU needs `-global virtio-mmio.force-legacy=false`). They run on the BSP after the
//! banner, before the other CPUs start and the workload runs, and only when a device word
//! asks: without one the guest does not touch the transport window at all.
//!
//! - `blk=N` (1..=256 sectors, capped at each disk's capacity): every block device, in slot
//!   order, gets sectors 0..N written (the u64 at byte 8k of sector s is
//!   `blk::blk_word(s, k)`, little-endian), a FLUSH if it offers VIRTIO_BLK_F_FLUSH, the
//!   sectors read back and compared, and a GET_ID. A read-only disk (VIRTIO_BLK_F_RO) gets
//!   instead one write of sector 0, which must fail with IOERR, and the reads.
//! - `rng=N` (1..=4096 bytes): the first entropy device must deliver exactly N bytes, not
//!   all equal.
//! - `net=send:N`: the first network device sends N numbered frames of 60 to 1514 bytes
//!   to the broadcast address (format in `net.rs`), one at a time, each waited for up to
//!   2 s until its echo returns intact. While the peer boots, seq 0 is resent every 200 ms
//!   for up to 5 s.
//! - `net=echo`: the first network device echoes every intact request frame to its
//!   sender, from the BSP's loop (which then sleeps at most 5 ms), as long as the guest runs.
//!
//! ```text
//! VIRTIO slot=23 id=2 blk                              (every transport: net/blk/rng/other)
//! VIRTIO slot=4 unsupported version=1                  (a legacy transport, left alone)
//! BLK OK disk=0 sectors=64 capacity=2048 id=disk0      (disk = index among block devices)
//! BLK RO OK disk=1 capacity=2048 id=rodisk write=refused
//! BLK FAIL disk=0 reason=data mismatch sector=5        (sector=, status= when they tell)
//! BLK FAIL reason=no device
//! RNG OK bytes=256 distinct=160                        (distinct byte values)
//! RNG FAIL reason=timeout
//! NET OK sent=20 echoed=20 mac=52:54:00:00:00:02
//! NET FAIL sent=20 echoed=17 bad=0                     (bad: echoes that came back damaged)
//! NET FAIL reason=timeout bad=0                        (the device failed; also at set-up)
//! NET ECHO mac=52:54:00:00:00:01                       (echo service ready)
//! NET ECHOED n=16                                      (every 16 echoes)
//! NET ECHO BAD n=1                                     (requests dropped, e.g. a bad hash)
//! ```
//!
//! A device that misbehaves (no answer within 5 s, DEVICE_NEEDS_RESET, a used ring entry
//! never offered) gets a FAIL line, never a hang; it is then marked FAILED and reset.
//! Devices are reset once tested, except the echoing network device.

#![no_std]
#![no_main]

mod acpi;
mod apic;
mod blk;
mod clock;
mod cmdline;
mod console;
mod interrupts;
mod intrinsics;
mod io;
mod net;
mod power;
mod pvh;
mod rng;
mod virtio;
mod workload;

use acpi::{AcpiInfo, MAX_CPUS};
use cmdline::{ExitMode, Params};
use console::Line;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use workload::{PAGE, Slice};

core::arch::global_asm!(include_str!("entry.S"), options(att_syntax));

const AP_TRAMP_BASE: u64 = 0x8000;
const AP_STACK_SIZE: usize = 16384;
const MS: u64 = 1_000_000;
/// A CPU never sleeps longer than this, so it notices a new verification epoch quickly.
const MAX_SLEEP_NS: u64 = 20 * MS;
/// Nor shorter: each wake-up costs exits, so pages are dirtied in small batches.
const MIN_SLEEP_NS: u64 = MS;
/// While the BSP echoes network frames, it looks for new ones at least this often.
const ECHO_POLL_NS: u64 = 5 * MS;

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static __image_end: u8;
    static mut pdpt: [u64; 512];
}

/// Read by `ap_long_entry` before it has a stack.
#[unsafe(no_mangle)]
static mut AP_STACK_TOP: u64 = 0;

#[repr(C, align(16))]
struct Stack([u8; AP_STACK_SIZE]);
static mut AP_STACKS: [Stack; MAX_CPUS] = [const { Stack([0; AP_STACK_SIZE]) }; MAX_CPUS];

/// What the BSP decides and every CPU reads after `GO`.
struct Shared {
    params: Params,
    ws_base: u64,
    ws_pages: u64,
}

static mut SHARED: Option<Shared> = None;
static AP_INDEX: AtomicUsize = AtomicUsize::new(0);
static ONLINE: AtomicUsize = AtomicUsize::new(1);
static GO: AtomicBool = AtomicBool::new(false);
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// One CPU's answer to a verification epoch.
struct Report {
    epoch: AtomicU64,
    bad: AtomicU64,
    first_bad: AtomicU64,
    pages: AtomicU64,
}
static REPORTS: [Report; MAX_CPUS] = [const {
    Report { epoch: AtomicU64::new(0), bad: AtomicU64::new(0), first_bad: AtomicU64::new(0), pages: AtomicU64::new(0) }
}; MAX_CPUS];

fn shared() -> &'static Shared {
    // SAFETY: written once by the BSP before GO is released; read-only afterwards.
    match unsafe { &*(&raw const SHARED) } {
        Some(s) => s,
        None => io::halt_forever(),
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    console::say("PANIC");
    io::halt_forever()
}

fn has_1g_pages() -> bool {
    io::cpuid(0x8000_0001).3 & (1 << 26) != 0
}

/// The entry code maps the first 4 GiB. Maps up to `end` with 1 GiB pages, or returns the
/// highest address that is mapped when the CPU has no 1 GiB pages.
fn map_up_to(end: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    if end <= 4 * GIB {
        return end;
    }
    if !has_1g_pages() {
        return 4 * GIB;
    }
    let end = end.min(512 * GIB);
    for i in 4..end.div_ceil(GIB) {
        // SAFETY: the BSP extends its own page tables before any AP starts.
        unsafe { (*(&raw mut pdpt))[i as usize] = (i * GIB) | 0x83 };
    }
    end
}

/// Picks the working set's place: the largest RAM range above the image, 2 MiB aligned.
fn place_working_set(info: &pvh::BootInfo, ws_bytes: u64) -> (u64, u64) {
    let image_end = &raw const __image_end as u64;
    let mut best = (0, 0);
    for &(start, size) in &info.ram[..info.ram_ranges] {
        let base = start.max(image_end).next_multiple_of(2 << 20);
        let end = start + size;
        if end > base && end - base > best.1 {
            best = (base, end - base);
        }
    }
    let (base, avail) = best;
    let end = map_up_to(base + ws_bytes.min(avail));
    (base, end.saturating_sub(base) / PAGE)
}

fn start_aps(acpi: &AcpiInfo) {
    let bsp = apic::id();
    // SAFETY: the trampoline is position-independent real-mode code; 0x8000 is free RAM
    // below 1 MiB that the loader does not use.
    unsafe {
        let start = &raw const ap_tramp_start;
        let len = (&raw const ap_tramp_end as usize) - (start as usize);
        core::ptr::copy_nonoverlapping(start, AP_TRAMP_BASE as *mut u8, len);
    }
    let mut index = 1;
    for &apic_id in &acpi.apic_ids[..acpi.cpus] {
        if apic_id == bsp {
            continue;
        }
        AP_INDEX.store(index, Ordering::Relaxed);
        // SAFETY: one AP starts at a time, so its stack slot is not in use.
        unsafe {
            AP_STACK_TOP = (&raw mut AP_STACKS[index]) as u64 + AP_STACK_SIZE as u64;
        }
        let before = ONLINE.load(Ordering::Acquire);
        apic::send_init(apic_id);
        let mut started = false;
        for _ in 0..2 {
            apic::send_sipi(apic_id, (AP_TRAMP_BASE >> 12) as u8);
            let deadline = clock::now_ns(0) + 500 * MS;
            while clock::now_ns(0) < deadline {
                if ONLINE.load(Ordering::Acquire) > before {
                    started = true;
                    break;
                }
                io::spin_hint();
            }
            if started {
                break;
            }
        }
        if started {
            index += 1;
        } else {
            Line::new().str("SMP apic=").u64(u64::from(apic_id)).str(" did not start").print();
        }
    }
}

#[unsafe(no_mangle)]
extern "C" fn kmain(start_info: u64) -> ! {
    let Some(info) = pvh::read(start_info) else {
        console::say("NOVACRON-GUEST: no PVH start info; boot me through the PVH entry");
        io::halt_forever()
    };
    let acpi = acpi::read(info.rsdp);
    let params = cmdline::parse(info.cmdline, |word| Line::new().str("CMDLINE bad word: ").bytes(word).print());
    let cpus = acpi.cpus.max(1);
    let kvm_clock = clock::init(0);
    Line::new()
        .str("NOVACRON-GUEST v1")
        .kv("cpus", cpus as u64)
        .kv("mem", info.ram_bytes() >> 20)
        .kv("ws", params.ws_mib)
        .kv("rate", params.rate)
        .kv("verify", params.verify_ms)
        .kv("hb", params.hb_ms)
        .kv("exit", params.exit_after)
        .str(if kvm_clock { " clock=kvm" } else { " clock=tsc" })
        .print();
    if let Some((addr, size)) = info.module {
        match params.hash_initrd {
            true => Line::new().str("INITRD").kv("bytes", size).str(" hash=").hex(hash_bytes(addr, size)).print(),
            false => Line::new().str("INITRD").kv("bytes", size).str(" hash=skipped").print(),
        }
    }
    if acpi.ignored_cpus > 0 {
        Line::new().str("SMP ignoring").kv("cpus", acpi.ignored_cpus as u64).print();
    }

    apic::mask_pic();
    interrupts::build();
    interrupts::load_idt();
    apic::init();
    // Before the APs start and the workload runs, so that neither is disturbed.
    virtio::run(&params);

    let (ws_base, ws_pages) = place_working_set(&info, params.ws_mib << 20);
    // SAFETY: no other CPU runs yet.
    unsafe { SHARED = Some(Shared { params, ws_base, ws_pages }) };
    if cpus > 1 {
        start_aps(&acpi);
    }
    let online = ONLINE.load(Ordering::Acquire);
    Line::new().str("SMP").kv("online", online as u64).print();
    Line::new().str("READY").kv("pages", ws_pages).str(" base=").hex(ws_base).print();
    GO.store(true, Ordering::Release);
    run(0, online)
}

/// FNV-1a over 64-bit little-endian words (a last partial word is zero-padded), so that
/// the host can check the initrd arrived intact at a few instructions per 8 bytes.
fn hash_bytes(addr: u64, size: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut at = 0;
    while at < size {
        let mut word = [0u8; 8];
        let n = (size - at).min(8) as usize;
        // SAFETY: the module lies in guest RAM the loader gave us; we read inside it.
        unsafe { core::ptr::copy_nonoverlapping((addr + at) as *const u8, word.as_mut_ptr(), n) };
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0000_0100_0000_01b3);
        at += 8;
    }
    h
}

#[unsafe(no_mangle)]
extern "C" fn ap_main() -> ! {
    let cpu = AP_INDEX.load(Ordering::Relaxed);
    interrupts::load_idt();
    apic::init();
    clock::init(cpu);
    ONLINE.fetch_add(1, Ordering::AcqRel);
    while !GO.load(Ordering::Acquire) {
        io::spin_hint();
    }
    run(cpu, ONLINE.load(Ordering::Acquire))
}

/// The BSP's duties besides its own slice: heartbeats, epochs, verdicts, exit.
struct Bsp {
    next_hb: u64,
    hb_seq: u64,
    next_verify: u64,
    pending_epoch: u64,
}

impl Bsp {
    fn tick(&mut self, now: u64, online: usize) {
        let p = &shared().params;
        if now >= self.next_hb {
            self.hb_seq += 1;
            Line::new().str("HB ").u64(self.hb_seq).print();
            // No backlog after a pause: the next beat is a period from now.
            self.next_hb = (self.next_hb + p.hb_ms * MS).max(now + MS);
            if p.exit_after != 0 && self.hb_seq >= p.exit_after {
                exit(p.exit_mode);
            }
        }
        if self.pending_epoch == 0 && now >= self.next_verify {
            self.pending_epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        }
        if self.pending_epoch != 0 && verdict_ready(self.pending_epoch, online) {
            print_verdict(self.pending_epoch, online);
            self.pending_epoch = 0;
            self.next_verify = now + p.verify_ms * MS;
        }
    }

    /// While a verdict is pending, poll for the other CPUs' reports every millisecond.
    fn next_event(&self, now: u64) -> u64 {
        if self.pending_epoch != 0 { now + MS } else { self.next_hb.min(self.next_verify) }
    }
}

fn verdict_ready(epoch: u64, online: usize) -> bool {
    REPORTS[..online].iter().all(|r| r.epoch.load(Ordering::Acquire) >= epoch)
}

fn print_verdict(epoch: u64, online: usize) {
    let (mut bad, mut pages, mut first) = (0, 0, u64::MAX);
    for r in &REPORTS[..online] {
        let b = r.bad.load(Ordering::Relaxed);
        pages += r.pages.load(Ordering::Relaxed);
        if b > 0 {
            bad += b;
            first = first.min(r.first_bad.load(Ordering::Relaxed));
        }
    }
    let mut line = Line::new();
    if bad == 0 {
        line.str("VERIFY OK").kv("epoch", epoch).kv("pages", pages);
    } else {
        line.str("VERIFY FAIL").kv("epoch", epoch).kv("bad", bad).kv("first", first);
    }
    line.kv("cpus", online as u64).print();
}

fn exit(mode: ExitMode) -> ! {
    match mode {
        ExitMode::PowerOff => power::power_off(acpi::read(0).sleep_control),
        ExitMode::Reset => power::reset(),
        ExitMode::TripleFault => interrupts::triple_fault(),
    }
}

/// Every CPU's loop: dirty its slice at its share of the rate, verify it when the epoch
/// moves, sleep on the APIC timer in between.
fn run(cpu: usize, online: usize) -> ! {
    let s = shared();
    let p = &s.params;
    let share = |total: u64| total * (cpu as u64 + 1) / online as u64 - total * cpu as u64 / online as u64;
    let first = s.ws_pages * cpu as u64 / online as u64;
    let mut slice = Slice::new(s.ws_base, first, share(s.ws_pages));
    let rate = share(p.rate);
    slice.fill();

    let mut seen_epoch = 0;
    let mut start = clock::now_ns(cpu);
    let mut done: u64 = 0;
    // At most 100 ms of pages at once: after a pause the guest does not burst.
    let max_backlog = rate / 10 + 1;
    let mut bsp =
        (cpu == 0).then(|| Bsp { next_hb: start, hb_seq: 0, next_verify: start + p.verify_ms * MS, pending_epoch: 0 });

    loop {
        let now = clock::now_ns(cpu);
        let epoch = EPOCH.load(Ordering::Acquire);
        if epoch > seen_epoch {
            if cpu == 0 && epoch == p.corrupt_epoch {
                slice.corrupt();
            }
            let v = slice.verify();
            let r = &REPORTS[cpu];
            r.bad.store(v.bad, Ordering::Relaxed);
            r.first_bad.store(v.first_bad, Ordering::Relaxed);
            r.pages.store(slice.pages(), Ordering::Relaxed);
            r.epoch.store(epoch, Ordering::Release);
            seen_epoch = epoch;
        }

        let mut next_page = u64::MAX;
        if rate > 0 {
            let due = (u128::from(now.saturating_sub(start)) * u128::from(rate) / 1_000_000_000) as u64;
            if due > done + max_backlog {
                done = due - max_backlog;
            }
            if due > done {
                slice.dirty(due - done);
                done = due;
            }
            // Keep the numbers small: move the origin a second on once a second's pages are done.
            if done >= rate {
                start += 1_000_000_000;
                done -= rate;
            }
            next_page = start + ((u128::from(done + 1) * 1_000_000_000) / u128::from(rate)) as u64;
        }

        let mut wake = next_page.min(now + MAX_SLEEP_NS);
        if let Some(b) = bsp.as_mut() {
            b.tick(now, online);
            wake = wake.min(b.next_event(now));
            if net::serve() {
                wake = wake.min(now + ECHO_POLL_NS);
            }
        }
        let now = clock::now_ns(cpu);
        if wake > now {
            apic::sleep_ns((wake - now).max(MIN_SLEEP_NS));
        }
    }
}
