//! Device models of the NovaCron VMM.
//!
//! - [`bus`]: the port-I/O and MMIO buses that vCPU exits are dispatched on.
//! - [`legacy`]: the 8250 serial port, the i8042 controller (reset only), and the ACPI
//!   power-management registers that the FADT describes (sleep control and reset).
//!
//! Devices hold no reference to KVM: interrupts leave a device as an `EventFd` that the VMM
//! registers as an irqfd, and requests to end the VM leave it as another `EventFd`.

pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
