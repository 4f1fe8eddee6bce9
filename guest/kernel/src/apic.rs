//! The local APIC in xAPIC mode: timer wake-ups and INIT/SIPI.

const BASE: u64 = 0xfee0_0000;
const ID: u64 = 0x20;
const TPR: u64 = 0x80;
const SVR: u64 = 0xf0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_DIVIDE: u64 = 0x3e0;

pub const TIMER_VECTOR: u8 = 0x40;
pub const SPURIOUS_VECTOR: u8 = 0xff;

fn write(reg: u64, value: u32) {
    // SAFETY: the local APIC page is identity mapped (first 4 GiB) and each register is a u32.
    unsafe { ((BASE + reg) as *mut u32).write_volatile(value) }
}

fn read(reg: u64) -> u32 {
    // SAFETY: as write.
    unsafe { ((BASE + reg) as *const u32).read_volatile() }
}

pub fn id() -> u32 {
    read(ID) >> 24
}

/// Enables this CPU's APIC with a one-shot timer that counts at the bus clock (KVM's
/// is 1 GHz, so a count is a nanosecond), divided by one.
pub fn init() {
    write(SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(TPR, 0);
    write(TIMER_DIVIDE, 0xb);
    write(LVT_TIMER, u32::from(TIMER_VECTOR));
}

/// Sleeps until the timer fires after about `ns`, or any other interrupt.
pub fn sleep_ns(ns: u64) {
    let count = ns.clamp(1_000, u64::from(u32::MAX)) as u32;
    write(TIMER_INITIAL, count);
    crate::io::wait_for_interrupt();
    write(TIMER_INITIAL, 0);
}

fn send_ipi(apic_id: u32, command: u32) {
    write(ICR_HIGH, apic_id << 24);
    write(ICR_LOW, command);
    // Wait for the delivery-status bit to clear.
    while read(ICR_LOW) & (1 << 12) != 0 {
        crate::io::spin_hint();
    }
}

pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x0000_4500);
}

pub fn send_sipi(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x0000_4600 | u32::from(vector));
}

/// Masks both 8259 PICs: nothing should arrive through ExtINT.
pub fn mask_pic() {
    crate::io::outb(0x21, 0xff);
    crate::io::outb(0xa1, 0xff);
}
