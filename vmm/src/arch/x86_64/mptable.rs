//! The Intel MultiProcessor table (MP spec 1.4): the CPUs, one ISA bus, the IOAPIC and the
//! interrupt routing, for guests that boot without ACPI (`acpi=off`).

use super::layout::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_START, RESERVED_LOW_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6, and the FPU and APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const IRQ_COUNT: u8 = 24;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table for {0} vCPUs does not fit below the BIOS area")]
    TooLarge(u8),
    #[error("could not write the MP table into guest memory")]
    Write(#[source] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and the configuration table, as they sit at `MPTABLE_START`.
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 2;
    for irq in 0..IRQ_COUNT {
        // type, interrupt type, flags (conforming), source bus, source IRQ, IOAPIC, pin
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // revision, checksum
    table.extend_from_slice(b"NOVACRON");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

pub fn write(mem: &impl GuestMemoryBackend, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus);
    // It must stay inside the EBDA page, below the ACPI tables.
    if MPTABLE_START + bytes.len() as u64 > RESERVED_LOW_START + 0x400 {
        return Err(MptableError::TooLarge(vcpus));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mptable_checksums_and_counts_are_consistent() {
        let bytes = build(4);
        let (fp, table) = bytes.split_at(16);

        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(u16::from_le_bytes([table[4], table[5]]) as usize, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // 4 CPUs + bus + IOAPIC + 24 interrupts + 2 local interrupts.
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 4 + 2 + 24 + 2);
    }

    #[test]
    fn test_mptable_for_eight_vcpus_fits_in_the_ebda_page() {
        assert!(build(8).len() <= 0x400);
    }
}
