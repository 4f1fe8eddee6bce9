//! Where things live in guest-physical memory.
//!
//! ```text
//! 0x0000_0500  GDT (Linux 64-bit and PVH boot)          0x0000_9000  PML4 (Linux 64-bit boot)
//! 0x0000_0520  IDT (empty)                               0x0000_a000  PDPT
//! 0x0000_6000  PVH start_info, module list, memory map   0x0000_b000  4 page directories
//! 0x0000_7000  Linux zero page (boot_params)             0x0002_0000  kernel command line
//! 0x0000_8ff0  Linux boot stack                          0x0009_fc00  MP table (reserved to 1 MiB)
//! 0x000e_0000  ACPI tables (RSDP first)                  0x0010_0000  kernel (HIMEM_START)
//! 0xc000_0000  MMIO hole: virtio-mmio 0xfeb0_0000, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, KVM TSS
//! 0x1_0000_0000  RAM above 4 GiB, when the VM has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 32;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// The longest command line we pass (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const MPTABLE_START: u64 = 0x9fc00;
/// From the MP table to 1 MiB: reserved in the e820 map (EBDA, ACPI, BIOS area).
pub const RESERVED_LOW_START: u64 = MPTABLE_START;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// virtio-mmio transports: slot i at VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SLOT_SIZE, with
/// interrupt VIRTIO_GSI_BASE + i. The same window as QEMU's microvm, so the test guest
/// finds devices the same way on both.
pub const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x200;
pub const VIRTIO_MMIO_SLOTS: usize = 18;
/// GSIs 5..=22 (below 5: timer, keyboard, cascade, COM2, COM1; 23 is left free).
pub const VIRTIO_GSI_BASE: u32 = 5;
pub const FOUR_GIB: u64 = 1 << 32;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS and one for the identity map, out of RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The RAM ranges of a VM with `mem_bytes` of memory: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_bytes > low {
        ranges.push((GuestAddress(FOUR_GIB), mem_bytes - low));
    }
    ranges
}

/// One entry of the e820 memory map the guest is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map: low RAM below the MP table, the reserved BIOS area up to 1 MiB, RAM from
/// 1 MiB to the MMIO hole, and RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: RESERVED_LOW_START, kind: E820_RAM },
        E820Entry { addr: RESERVED_LOW_START, size: HIMEM_START - RESERVED_LOW_START, kind: E820_RESERVED },
    ];
    for (start, size) in ram_ranges(mem_bytes) {
        let start = start.0.max(HIMEM_START);
        let end = if start >= FOUR_GIB { start + size } else { size };
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820_RAM });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ram_ranges_small_vm_is_one_low_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn test_ram_ranges_large_vm_splits_around_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(FOUR_GIB), (4 << 30) - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn test_e820_map_reserves_bios_area_and_covers_all_ram_above_it() {
        let map = e820_map(5 << 30);
        let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(
            map[1],
            E820Entry { addr: RESERVED_LOW_START, size: HIMEM_START - RESERVED_LOW_START, kind: E820_RESERVED }
        );
        assert_eq!(ram, (5 << 30) - (HIMEM_START - RESERVED_LOW_START));
        assert_eq!(map.last().unwrap().addr, FOUR_GIB);
    }
}
