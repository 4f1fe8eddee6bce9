//! Ending the guest: ACPI power-off through the FADT's sleep control register (hardware-
//! reduced ACPI, S5 = 5 as both NovaCron and QEMU microvm define it), i8042 reset, or a
//! deliberate triple fault.

use crate::acpi::Register;
use crate::io;

const SLP_EN: u8 = 1 << 5;
const S5: u8 = 5;

pub fn power_off(sleep_control: Option<Register>) -> ! {
    let value = (S5 << 2) | SLP_EN;
    match sleep_control {
        Some(Register { space: 1, address }) => io::outb(address as u16, value),
        // SAFETY: the FADT names this MMIO register; it is below 4 GiB and identity mapped.
        Some(Register { space: 0, address }) if address < (4 << 30) => unsafe {
            (address as *mut u8).write_volatile(value)
        },
        _ => {}
    }
    // The VMM takes a moment to stop us; only then try QEMU's PC machines (PM1a at 0x604).
    grace();
    io::outw(0x604, 0x2000);
    grace();
    crate::console::say("POWEROFF FAILED");
    io::halt_forever()
}

pub fn reset() -> ! {
    io::outb(0x64, 0xfe);
    grace();
    crate::console::say("RESET FAILED");
    io::halt_forever()
}

/// Half a second for the VMM to act on what we asked.
fn grace() {
    let until = crate::clock::now_ns(0) + 500_000_000;
    while crate::clock::now_ns(0) < until {
        crate::apic::sleep_ns(10_000_000);
    }
}
