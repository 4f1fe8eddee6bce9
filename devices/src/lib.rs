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
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Guest memory as devices see it: writes through it mark vm-memory's dirty bitmap, so that
/// migration also sends the pages devices wrote (which KVM's dirty log does not see).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
