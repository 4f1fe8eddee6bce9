//! The NovaCron test guest, built from `guest/kernel` and embedded here.
//!
//! `novacron vm run` boots it when no `--kernel` is given; tests and benchmarks run it
//! everywhere. What it prints and which command-line words it takes is documented in
//! `guest/kernel/src/main.rs` and `docs/test-guest.md`.

/// The test guest: an ELF64 with a PVH entry note, loaded at 1 MiB.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// The first line the guest prints, from its entry stub, before anything else.
pub const BOOT_LINE: &str = "NOVACRON-GUEST boot";

/// The banner that follows, with `cpus=` and `mem=` (MiB).
pub const BANNER_PREFIX: &str = "NOVACRON-GUEST v1";

#[cfg(test)]
mod tests {
    #[test]
    fn test_elf_has_pvh_note() {
        let elf = super::ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        // The Xen PVH note's owner name must be present for PVH loaders to find the entry.
        assert!(elf.windows(4).any(|w| w == b"Xen\0"));
    }
}
