//! The PVH boot protocol's `hvm_start_info` (Xen's arch-x86/hvm/start_info.h, version 1):
//! command line, modules (the initrd), the RSDP, and the memory map.

use super::initrd::InitrdPlacement;
use crate::arch::x86_64::layout::{
    E820Entry, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    #[error("the memory map has {0} entries; PVH start info holds at most {PVH_MEMMAP_MAX_ENTRIES}")]
    TooManyMemmapEntries(usize),
    #[error("could not write the PVH start info into guest memory")]
    Write(#[source] GuestMemoryError),
}

fn push_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn push_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// Writes the start info at `PVH_INFO_START`; the entry code gets its address in %ebx.
pub fn write_start_info(
    mem: &impl GuestMemoryBackend,
    cmdline_addr: u64,
    rsdp: u64,
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> Result<u64, PvhError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::TooManyMemmapEntries(e820.len()));
    }
    let mut info = Vec::with_capacity(56);
    push_u32(&mut info, XEN_HVM_START_MAGIC);
    push_u32(&mut info, 1); // version: has the memory map
    push_u32(&mut info, 0); // flags
    push_u32(&mut info, u32::from(initrd.is_some()));
    push_u64(&mut info, if initrd.is_some() { PVH_MODLIST_START } else { 0 });
    push_u64(&mut info, cmdline_addr);
    push_u64(&mut info, rsdp);
    push_u64(&mut info, PVH_MEMMAP_START);
    push_u32(&mut info, e820.len() as u32);
    push_u32(&mut info, 0);
    mem.write_slice(&info, GuestAddress(PVH_INFO_START)).map_err(PvhError::Write)?;

    if let Some(m) = initrd {
        let mut entry = Vec::with_capacity(32);
        for v in [m.addr, m.size, 0, 0] {
            push_u64(&mut entry, v);
        }
        mem.write_slice(&entry, GuestAddress(PVH_MODLIST_START)).map_err(PvhError::Write)?;
    }
    let mut map = Vec::with_capacity(e820.len() * 24);
    for e in e820 {
        push_u64(&mut map, e.addr);
        push_u64(&mut map, e.size);
        push_u32(&mut map, e.kind);
        push_u32(&mut map, 0);
    }
    mem.write_slice(&map, GuestAddress(PVH_MEMMAP_START)).map_err(PvhError::Write)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::e820_map;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn test_start_info_layout_matches_the_pvh_abi() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = e820_map(256 << 20);

        let addr =
            write_start_info(&mem, 0x20000, 0xe0000, &map, Some(InitrdPlacement { addr: 0x800000, size: 77 })).unwrap();

        let r32 = |off: u64| mem.read_obj::<u32>(GuestAddress(addr + off)).unwrap();
        let r64 = |off: u64| mem.read_obj::<u64>(GuestAddress(addr + off)).unwrap();
        assert_eq!((r32(0), r32(4), r32(12)), (XEN_HVM_START_MAGIC, 1, 1));
        assert_eq!((r64(16), r64(24), r64(32), r64(40)), (PVH_MODLIST_START, 0x20000, 0xe0000, PVH_MEMMAP_START));
        assert_eq!(r32(48) as usize, map.len());
        let module_size: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_START + 8)).unwrap();
        assert_eq!(module_size, 77);
        let last_kind: u32 = mem.read_obj(GuestAddress(PVH_MEMMAP_START + (map.len() as u64 - 1) * 24 + 16)).unwrap();
        assert_eq!(last_kind, map.last().unwrap().kind);
    }
}
