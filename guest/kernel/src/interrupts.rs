//! The IDT: exceptions report and stop the CPU, the APIC timer only wakes it.

use crate::apic::{SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::console::Line;

unsafe extern "C" {
    static FAULT_STUBS: [u64; 32];
    fn isr_timer();
    fn isr_spurious();
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    kind: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const CODE64_SELECTOR: u16 = 0x18;
const EMPTY: Gate = Gate { offset_low: 0, selector: 0, ist: 0, kind: 0, offset_mid: 0, offset_high: 0, reserved: 0 };
static mut IDT: [Gate; 256] = [EMPTY; 256];

fn gate(handler: u64) -> Gate {
    Gate {
        offset_low: handler as u16,
        selector: CODE64_SELECTOR,
        ist: 0,
        kind: 0x8e, // present, DPL 0, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        reserved: 0,
    }
}

/// Fills the IDT once, on the BSP, before any AP starts.
pub fn build() {
    // SAFETY: runs once on the BSP before other CPUs exist.
    unsafe {
        let idt = &raw mut IDT;
        for (v, &stub) in (*(&raw const FAULT_STUBS)).iter().enumerate() {
            (*idt)[v] = gate(stub);
        }
        (*idt)[usize::from(TIMER_VECTOR)] = gate(isr_timer as *const () as u64);
        (*idt)[usize::from(SPURIOUS_VECTOR)] = gate(isr_spurious as *const () as u64);
    }
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn load(limit: u16, base: u64) {
    let ptr = Pointer { limit, base };
    // SAFETY: points at the static IDT (or, for a deliberate triple fault, at nothing).
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack)) }
}

/// Loads the IDT on this CPU.
pub fn load_idt() {
    load((core::mem::size_of::<[Gate; 256]>() - 1) as u16, &raw const IDT as u64);
}

/// Empties the IDT and raises an exception: the CPU cannot deliver it and shuts down.
/// (A general-protection fault from a non-canonical read: this host's instruction emulator
/// cannot emulate `int3`.)
pub fn triple_fault() -> ! {
    load(0, 0);
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { core::arch::asm!("mov rax, [{}]", in(reg) 0x8000_0000_0000_0000u64, out("rax") _, options(nostack)) };
    crate::io::halt_forever()
}

const fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Called by the exception stubs: prints what happened and stops this CPU.
#[unsafe(no_mangle)]
extern "C" fn guest_fault(vector: u64, frame: *const u64) {
    let skip = usize::from(has_error_code(vector));
    // SAFETY: the CPU pushed (error code,) RIP, CS, RFLAGS, RSP, SS onto this stack.
    let (error, rip) = unsafe { (if skip == 1 { *frame } else { 0 }, *frame.add(skip)) };
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    Line::new()
        .str("FAULT")
        .kv("vector", vector)
        .str(" rip=")
        .hex(rip)
        .str(" error=")
        .hex(error)
        .str(" cr2=")
        .hex(cr2)
        .kv("apic", u64::from(crate::apic::id()))
        .print();
}
