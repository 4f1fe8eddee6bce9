//! x86-64: the guest-physical layout, CPUID and MSRs, boot registers, and the firmware
//! tables (MP table, ACPI) that describe the machine to the guest.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
