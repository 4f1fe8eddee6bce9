//! The NovaCron test guest, built from `guest/kernel` and embedded here, and the host side
//! of talking to it: parsing what it prints ([`report`]) and watching a VM process's
//! console line by line ([`watch`]).
//!
//! `novacron vmm run` boots it when no `--kernel` is given; tests, benchmarks and the demo
//! run it everywhere. What it prints and which command-line words it takes is described in
//! `docs/test-guest.md`.

pub mod binaries;
pub mod report;
pub mod tmpfs;
pub mod watch;

/// The test guest: an ELF64 with a PVH entry note, loaded at 1 MiB.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

#[cfg(test)]
mod tests {
    #[test]
    fn test_elf_is_elf64_with_pvh_note_owner() {
        let elf = super::ELF;
        assert_eq!(&elf[..5], b"\x7fELF\x02");
        assert!(elf.windows(4).any(|w| w == b"Xen\0"));
    }
}
