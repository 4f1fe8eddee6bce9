//! The boot state of the first vCPU: general registers, segments, control registers,
//! page tables and FPU, for each boot protocol; and the local APIC's LINT pins.

use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the first vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, %ebx = the start_info.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, %rsi = the zero page.
    Linux64 { entry: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("could not write the boot GDT/IDT/page tables into guest memory")]
    WriteTables(#[source] GuestMemoryError),
}

/// A GDT descriptor from its access flags (bits 40..56 of the descriptor), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// The KVM view of the segment that GDT entry `index` describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base,
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_gdt_idt(mem: &impl GuestMemoryBackend, gdt: &[u64]) -> Result<(), RegsError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(GDT_START)).map_err(RegsError::WriteTables)?;
    mem.write_obj(0u64, GuestAddress(IDT_START)).map_err(RegsError::WriteTables)
}

/// Identity-maps the first 4 GiB with 2 MiB pages for the Linux 64-bit entry.
fn write_page_tables(mem: &impl GuestMemoryBackend) -> Result<(), RegsError> {
    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).map_err(RegsError::WriteTables);
    w(PDPTE_START | 0x03, PML4_START)?;
    for dir in 0..4u64 {
        w((PDE_START + dir * 0x1000) | 0x03, PDPTE_START + dir * 8)?;
    }
    let pdes: Vec<u8> = (0..2048u64).flat_map(|i| ((i << 21) | 0x83).to_le_bytes()).collect();
    mem.write_slice(&pdes, GuestAddress(PDE_START)).map_err(RegsError::WriteTables)
}

fn boot_gdt(boot: BootEntry) -> [u64; 4] {
    match boot {
        BootEntry::Pvh { .. } => {
            [0, gdt_entry(0xc09b, 0, 0xffff_ffff), gdt_entry(0xc093, 0, 0xffff_ffff), gdt_entry(0x008b, 0, 0x67)]
        }
        BootEntry::Linux64 { .. } => {
            [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
        }
    }
}

/// Writes what the boot state points into guest memory: the GDT, an empty IDT, and for
/// Linux the identity-mapping page tables. Done once, before the first vCPU starts.
pub fn write_boot_tables(mem: &impl GuestMemoryBackend, boot: BootEntry) -> Result<(), RegsError> {
    write_gdt_idt(mem, &boot_gdt(boot))?;
    match boot {
        BootEntry::Pvh { .. } => Ok(()),
        BootEntry::Linux64 { .. } => write_page_tables(mem),
    }
}

/// Sets segments and control registers for `boot` (the tables are `write_boot_tables`').
pub fn setup_sregs(sregs: &mut kvm_sregs, boot: BootEntry) {
    let gdt = boot_gdt(boot);
    let (code, data, tss) = (segment(gdt[1], 1), segment(gdt[2], 2), segment(gdt[3], 3));
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match boot {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

/// General registers at the kernel's entry; `start_info` is the PVH start_info address.
pub fn boot_regs(boot: BootEntry, start_info: u64) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match boot {
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    regs
}

/// x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = b as i8;
    }
}

/// LINT0 receives the 8259's ExtINT and LINT1 the NMI, as on a PC.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    set_delivery_mode(lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_delivery_mode(lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn test_segment_decodes_flat_64bit_code_descriptor() {
        let s = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, 8));
        assert_eq!((s.type_, s.present, s.s, s.l, s.db, s.g, s.unusable), (0xb, 1, 1, 1, 0, 1, 0));
    }

    #[test]
    fn test_segment_decodes_pvh_tss_descriptor_byte_granular() {
        let s = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((s.limit, s.selector, s.type_, s.g, s.s), (0x67, 24, 0xb, 0, 0));
    }

    #[test]
    fn test_setup_sregs_linux64_maps_4gib_and_enables_long_mode() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();

        write_boot_tables(&mem, BootEntry::Linux64 { entry: 0x100200 }).unwrap();
        setup_sregs(&mut sregs, BootEntry::Linux64 { entry: 0x100200 });

        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 2047 * 8)).unwrap();
        assert_eq!(last, (2047 << 21) | 0x83);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 0x03);
    }

    #[test]
    fn test_set_lint_sets_extint_and_nmi_keeping_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT_LINT0 + 2] = 0x01; // mask bit (16)

        set_lint(&mut lapic);

        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1] as u8 & 0x7, 0x7);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2], 0x01);
        assert_eq!(lapic.regs[APIC_LVT_LINT1 + 1] as u8 & 0x7, 0x4);
    }
}
