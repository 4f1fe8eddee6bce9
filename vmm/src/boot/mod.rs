//! Loading a kernel and handing it what its boot protocol promises.
//!
//! - [`loader`]: tells a bzImage, an ELF64 (vmlinux, with or without a PVH note) and a
//!   32-bit PVH ELF apart and loads it (linux-loader for the first two, [`elf32`] for the third).
//! - [`linux`]: the Linux 64-bit boot protocol's zero page.
//! - [`pvh`]: the PVH `hvm_start_info`.
//! - [`initrd`]: where the initrd goes.

pub mod elf32;
pub mod initrd;
pub mod linux;
pub mod loader;
pub mod pvh;

pub use loader::{KernelFormat, LoadError, LoadedKernel, load_kernel};
