//! The Linux 64-bit boot protocol's zero page (Documentation/arch/x86/boot.rst).

use super::initrd::InitrdPlacement;
use crate::arch::x86_64::layout::{E820Entry, ZERO_PAGE_START};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Where the kernel may put an initrd when its header does not say (boot protocol < 2.03).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("the memory map has {0} entries; the zero page holds at most 128")]
    TooManyE820Entries(usize),
    #[error("the command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("could not write the zero page into guest memory")]
    Write(#[source] GuestMemoryError),
}

/// The highest address (exclusive) the kernel accepts for an initrd.
pub fn initrd_limit(header: Option<&setup_header>) -> u64 {
    match header {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => DEFAULT_INITRD_ADDR_MAX + 1,
    }
}

/// Fills and writes the zero page. `header` is the bzImage's; a vmlinux gets a minimal one.
pub fn write_zero_page(
    mem: &impl GuestMemoryBackend,
    header: Option<setup_header>,
    cmdline: (u64, usize),
    rsdp: u64,
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> Result<(), LinuxBootError> {
    let hdr = header.unwrap_or(setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    });
    let mut params = boot_params { hdr, ..Default::default() };
    let (cmdline_addr, cmdline_len) = cmdline;
    if params.hdr.cmdline_size != 0 && cmdline_len > params.hdr.cmdline_size as usize {
        return Err(LinuxBootError::CmdlineTooLong { len: cmdline_len, max: params.hdr.cmdline_size as usize });
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    if e820.len() > params.e820_table.len() {
        return Err(LinuxBootError::TooManyE820Entries(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START)).map_err(LinuxBootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::e820_map;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn test_zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = e820_map(1 << 30);

        write_zero_page(
            &mem,
            None,
            (0x20000, 12),
            0xe0000,
            &map,
            Some(InitrdPlacement { addr: 0x3000_0000, size: 99 }),
        )
        .unwrap();

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 99);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }

    #[test]
    fn test_zero_page_refuses_cmdline_longer_than_kernel_allows() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let header = setup_header { cmdline_size: 10, ..Default::default() };

        let err = write_zero_page(&mem, Some(header), (0x20000, 11), 0, &[], None).unwrap_err();

        assert!(matches!(err, LinuxBootError::CmdlineTooLong { len: 11, max: 10 }));
    }

    #[test]
    fn test_initrd_limit_uses_header_when_protocol_has_it() {
        let new = setup_header { version: 0x020f, initrd_addr_max: 0x7fff_ffff, ..Default::default() };
        let old = setup_header { version: 0x0202, initrd_addr_max: 0x7fff_ffff, ..Default::default() };
        assert_eq!(initrd_limit(Some(&new)), 0x8000_0000);
        assert_eq!(initrd_limit(Some(&old)), DEFAULT_INITRD_ADDR_MAX + 1);
        assert_eq!(initrd_limit(None), DEFAULT_INITRD_ADDR_MAX + 1);
    }
}
