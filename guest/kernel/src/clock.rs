//! Time in nanoseconds from the KVM paravirtual clock (kvmclock), one area per CPU.
//! Without kvmclock, the TSC at the frequency CPUID gives (or 1 GHz as a last resort).

use crate::acpi::MAX_CPUS;
use crate::io;
use core::sync::atomic::{AtomicU64, Ordering, fence};

const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut CLOCKS: [PvClock; MAX_CPUS] = [const {
    PvClock {
        version: 0,
        pad0: 0,
        tsc_timestamp: 0,
        system_time: 0,
        tsc_to_system_mul: 0,
        tsc_shift: 0,
        flags: 0,
        pad: [0; 2],
    }
}; MAX_CPUS];

/// 0 while kvmclock is in use; otherwise the TSC frequency in kHz.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

fn kvm_clock_msr() -> Option<u32> {
    let (max, b, c, d) = io::cpuid(0x4000_0000);
    let sig = [b.to_le_bytes(), c.to_le_bytes(), d.to_le_bytes()];
    if sig != [*b"KVMK", *b"VMKV", *b"M\0\0\0"] || max < 0x4000_0001 {
        return None;
    }
    let features = io::cpuid(0x4000_0001).0;
    if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        Some(MSR_KVM_SYSTEM_TIME_NEW)
    } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
        Some(MSR_KVM_SYSTEM_TIME)
    } else {
        None
    }
}

fn tsc_khz_from_cpuid() -> u64 {
    let (max, ..) = io::cpuid(0x4000_0000);
    if max >= 0x4000_0010 {
        let khz = io::cpuid(0x4000_0010).0;
        if khz != 0 {
            return u64::from(khz);
        }
    }
    1_000_000
}

/// Sets up this CPU's clock. Returns false when falling back to the TSC.
pub fn init(cpu: usize) -> bool {
    match kvm_clock_msr() {
        Some(msr) => {
            // SAFETY: each CPU registers only its own slot.
            let area = unsafe { &raw mut CLOCKS[cpu] } as u64;
            io::wrmsr(msr, area | 1);
            true
        }
        None => {
            TSC_KHZ.store(tsc_khz_from_cpuid(), Ordering::Relaxed);
            false
        }
    }
}

pub fn now_ns(cpu: usize) -> u64 {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    if khz != 0 {
        return ((u128::from(io::rdtsc()) * 1_000_000) / u128::from(khz)) as u64;
    }
    // SAFETY: only this CPU reads its slot; KVM writes it under the version protocol.
    let c = unsafe { &raw const CLOCKS[cpu] };
    loop {
        // SAFETY: `c` points to a static.
        let version = unsafe { (&raw const (*c).version).read_volatile() };
        if version & 1 != 0 {
            continue;
        }
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let (stamp, system, mul, shift) = unsafe {
            (
                (&raw const (*c).tsc_timestamp).read_volatile(),
                (&raw const (*c).system_time).read_volatile(),
                (&raw const (*c).tsc_to_system_mul).read_volatile(),
                (&raw const (*c).tsc_shift).read_volatile(),
            )
        };
        let mut delta = io::rdtsc().wrapping_sub(stamp);
        delta = if shift < 0 { delta >> -shift } else { delta << shift };
        let ns = system.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
        fence(Ordering::Acquire);
        // SAFETY: as above.
        if unsafe { (&raw const (*c).version).read_volatile() } == version {
            return ns;
        }
    }
}
