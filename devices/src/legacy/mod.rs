//! Legacy x86 devices: COM1, the i8042 (for its reset line), and the ACPI power registers.
//!
//! Of these only the serial port has state to save (`Serial::save_state`). The i8042 model
//! keeps none (reads answer 0, a reset command is an event), nor do the ACPI power
//! registers (sleep status always reads 0); there is no RTC.

mod i8042;
mod power;
mod serial;

pub use i8042::I8042;
pub use power::{
    AcpiPower, POWER_PORT_BASE, POWER_PORT_LEN, RESET_PORT_OFFSET, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_OFFSET,
    SLEEP_STATUS_OFFSET,
};
pub use serial::{COM1_IRQ, COM1_PORT, SERIAL_STATE_VERSION, Serial, SerialOutput, SerialState, SerialStateError};

use vmm_sys_util::eventfd::EventFd;

/// An `EventFd` as a vm-superio trigger (an interrupt line or a reset line).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
