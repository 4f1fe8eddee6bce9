//! The ACPI power registers of a hardware-reduced platform (ACPI 6, 4.8.3.7), in port I/O:
//! the sleep control register (S5 means power off), the sleep status register, and the
//! reset register. The FADT that the VMM writes points at these ports.

use crate::bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

pub const POWER_PORT_BASE: u64 = 0x600;
pub const POWER_PORT_LEN: u64 = 3;
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_PORT_OFFSET: u64 = 2;
/// The value the FADT tells the guest to write into the reset register.
pub const RESET_VALUE: u8 = 0x1;
/// The sleep type of S5 in our DSDT's `_S5_` package (QEMU microvm uses 5 as well).
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;

pub struct AcpiPower {
    power_off: EventFd,
    reset: EventFd,
}

impl AcpiPower {
    pub fn new(power_off: EventFd, reset: EventFd) -> Self {
        AcpiPower { power_off, reset }
    }

    fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            tracing::error!("ACPI power device: could not signal {what}: {e}");
        }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, no wake pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            SLEEP_CONTROL_OFFSET if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                Self::signal(&self.power_off, "power-off")
            }
            RESET_PORT_OFFSET if *value == RESET_VALUE => Self::signal(&self.reset, "reset"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPower, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (AcpiPower::new(off.try_clone().unwrap(), reset.try_clone().unwrap()), off, reset)
    }

    #[test]
    fn test_power_s5_with_slp_en_powers_off() {
        let (mut dev, off, reset) = device();

        dev.write(SLEEP_CONTROL_OFFSET, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);

        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn test_power_other_sleep_states_or_missing_slp_en_do_nothing() {
        let (mut dev, off, _reset) = device();

        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]);
        dev.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        dev.write(SLEEP_CONTROL_OFFSET, &[0xff, 0xff]);

        assert!(off.read().is_err());
    }

    #[test]
    fn test_power_reset_register_with_reset_value_resets() {
        let (mut dev, off, reset) = device();

        dev.write(RESET_PORT_OFFSET, &[0x7]);
        assert!(reset.read().is_err());
        dev.write(RESET_PORT_OFFSET, &[RESET_VALUE]);

        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
