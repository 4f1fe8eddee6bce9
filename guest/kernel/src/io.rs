//! Port I/O, MSRs, CPUID and the TSC.

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: as outb.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a whole buffer to one port with a single `rep outsb`: one exit to the VMM per
/// line instead of one per byte, which matters at ~1.3 MIPS.
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: reads `bytes.len()` bytes from a valid slice; the direction flag is clear.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(nostack, preserves_flags, readonly))
    }
}

pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only called for MSRs whose features CPUID announced.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    }
}

pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Waits for an interrupt with interrupts enabled only for the `hlt` itself (the `sti`
/// shadow makes `sti; hlt` atomic), so the timer handler is the only code that runs.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT and local APIC are set up before any CPU sleeps.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops this CPU; interrupts stay off.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

pub fn spin_hint() {
    core::hint::spin_loop();
}
