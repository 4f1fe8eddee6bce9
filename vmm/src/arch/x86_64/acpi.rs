//! ACPI tables for a hardware-reduced platform (as Cloud Hypervisor and Firecracker do):
//! RSDP -> XSDT -> {FADT -> DSDT, MADT}. The FADT points at the VMM's power registers
//! (`devices::legacy::AcpiPower`); the DSDT gives `_S5_` so that guests can power off.
//! Devices that need describing (virtio-mmio) add themselves to the DSDT.

use super::layout::{ACPI_END, ACPI_START, APIC_ADDR, IOAPIC_ADDR};
use acpi_tables::{Aml, aml};
use novacron_devices::legacy::{
    POWER_PORT_BASE, RESET_PORT_OFFSET, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const OEM_ID: &[u8; 6] = b"NOVACR";
const OEM_TABLE_ID: &[u8; 8] = b"NOVACRON";
const CREATOR_ID: &[u8; 4] = b"NVCR";

const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(usize),
    #[error("could not write the ACPI tables into guest memory")]
    Write(#[source] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A System Description Table being built: the 36-byte header, then the body.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(signature);
        b.extend_from_slice(&[0; 4]); // length, set by finish
        b.extend_from_slice(&[revision, 0]);
        b.extend_from_slice(OEM_ID);
        b.extend_from_slice(OEM_TABLE_ID);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(CREATOR_ID);
        b.extend_from_slice(&1u32.to_le_bytes());
        Sdt(b)
    }

    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// A Generic Address Structure for a byte-wide I/O port.
fn gas_io_byte(port: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = 8;
    g[3] = GAS_ACCESS_BYTE;
    g[4..].copy_from_slice(&port.to_le_bytes());
    g
}

/// A virtio-mmio transport as the DSDT describes it to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// `\_S5_` for power-off, and one `LNRO0005` device per virtio-mmio transport (the ID
/// Linux's virtio_mmio driver matches in ACPI, as with QEMU and Firecracker), each with
/// its register window and its edge-triggered interrupt.
pub fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    let mut children: Vec<aml::Device> = Vec::new();
    let names: Vec<String> = (0..devices.len()).map(|i| format!("V{i:03X}")).collect();
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uids: Vec<aml::Name> = (0..devices.len()).map(|i| aml::Name::new("_UID".into(), &(i as u32))).collect();
    let mems: Vec<aml::Memory32Fixed> =
        devices.iter().map(|d| aml::Memory32Fixed::new(true, d.base as u32, d.size as u32)).collect();
    let irqs: Vec<aml::Interrupt> =
        devices.iter().map(|d| aml::Interrupt::new(true, true, false, false, d.gsi)).collect();
    let crs: Vec<aml::ResourceTemplate> =
        (0..devices.len()).map(|i| aml::ResourceTemplate::new(vec![&mems[i], &irqs[i]])).collect();
    let crs_names: Vec<aml::Name> = crs.iter().map(|c| aml::Name::new("_CRS".into(), c)).collect();
    for i in 0..devices.len() {
        children.push(aml::Device::new(names[i].as_str().into(), vec![&hid, &uids[i], &crs_names[i]]));
    }
    let refs: Vec<&dyn Aml> = children.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), refs).to_aml_bytes(&mut body);
    let mut t = Sdt::new(b"DSDT", 2);
    t.put(&body);
    t.finish()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut body = [0u8; 276 - 36];
    let mut at = |offset: usize, bytes: &[u8]| body[offset - 36..offset - 36 + bytes.len()].copy_from_slice(bytes);
    at(40, &(dsdt_addr as u32).to_le_bytes());
    at(109, &(IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).to_le_bytes());
    at(112, &(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON).to_le_bytes());
    at(116, &gas_io_byte(POWER_PORT_BASE + RESET_PORT_OFFSET));
    at(128, &[RESET_VALUE]);
    at(131, &[0]); // FADT minor version
    at(140, &dsdt_addr.to_le_bytes());
    at(244, &gas_io_byte(POWER_PORT_BASE + SLEEP_CONTROL_OFFSET));
    at(256, &gas_io_byte(POWER_PORT_BASE + SLEEP_STATUS_OFFSET));
    at(268, b"NOVACRON");
    let mut t = Sdt::new(b"FACP", 6);
    t.put(&body);
    t.finish()
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 5);
    t.put(&(APIC_ADDR as u32).to_le_bytes()).put(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for cpu in 0..vcpus {
        t.put(&[0, 8, cpu, cpu]).put(&1u32.to_le_bytes());
    }
    t.put(&[1, 12, vcpus + 1, 0]).put(&(IOAPIC_ADDR as u32).to_le_bytes()).put(&0u32.to_le_bytes());
    t.put(&[4, 6, 0xff, 0, 0, 1]); // NMI on LINT1 of every processor
    t.finish()
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for addr in tables {
        t.put(&addr.to_le_bytes());
    }
    t.finish()
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Lays out all tables from `ACPI_START`, each 16-byte aligned. Returns (image, RSDP address).
pub fn build(vcpus: u8, devices: &[MmioDevice]) -> (Vec<u8>, u64) {
    let align = |n: usize| n.next_multiple_of(16);
    let rsdp_at = ACPI_START;
    let xsdt_at = rsdp_at + 48;
    let dsdt_bytes = dsdt(devices);
    let madt_bytes = madt(vcpus);
    let xsdt_len = 36 + 2 * 8;
    let dsdt_at = xsdt_at + align(xsdt_len) as u64;
    let fadt_at = dsdt_at + align(dsdt_bytes.len()) as u64;
    let fadt_bytes = fadt(dsdt_at);
    let madt_at = fadt_at + align(fadt_bytes.len()) as u64;
    let xsdt_bytes = xsdt(&[fadt_at, madt_at]);

    let mut image = vec![0u8; (madt_at - rsdp_at) as usize + madt_bytes.len()];
    for (at, bytes) in [
        (rsdp_at, rsdp(xsdt_at)),
        (xsdt_at, xsdt_bytes),
        (dsdt_at, dsdt_bytes),
        (fadt_at, fadt_bytes),
        (madt_at, madt_bytes),
    ] {
        let off = (at - rsdp_at) as usize;
        image[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    (image, rsdp_at)
}

/// Writes the tables; returns the RSDP's address for the boot protocol to pass on.
pub fn write(mem: &impl GuestMemoryBackend, vcpus: u8, devices: &[MmioDevice]) -> Result<u64, AcpiError> {
    let (image, rsdp) = build(vcpus, devices);
    if ACPI_START + image.len() as u64 > ACPI_END {
        return Err(AcpiError::TooLarge(image.len()));
    }
    mem.write_slice(&image, GuestAddress(ACPI_START)).map_err(AcpiError::Write)?;
    Ok(rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(image: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_START) as usize;
        let len = u32::from_le_bytes(image[off + 4..off + 8].try_into().unwrap()) as usize;
        &image[off..off + len]
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn test_acpi_tables_chain_from_rsdp_with_valid_checksums() {
        let (image, rsdp_at) = build(2, &[]);
        let rsdp = &image[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));

        let xsdt = table_at(&image, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<&[u8]> = xsdt[36..]
            .chunks(8)
            .map(|p| {
                let t = table_at(&image, u64::from_le_bytes(p.try_into().unwrap()));
                assert!(sums_to_zero(t));
                &t[..4]
            })
            .collect();
        assert_eq!(sigs, vec![b"FACP".as_slice(), b"APIC".as_slice()]);
        assert_eq!(rsdp_at, ACPI_START);
    }

    #[test]
    fn test_dsdt_describes_each_virtio_device_with_window_and_interrupt() {
        let devices = [
            MmioDevice { base: 0xfeb0_0000, size: 0x200, gsi: 5 },
            MmioDevice { base: 0xfeb0_0200, size: 0x200, gsi: 6 },
        ];
        let d = dsdt(&devices);
        let count = |needle: &[u8]| d.windows(needle.len()).filter(|w| *w == needle).count();

        assert_eq!(&d[..4], b"DSDT");
        assert!(sums_to_zero(&d));
        assert_eq!(count(b"LNRO0005"), 2);
        assert_eq!(count(b"V000") + count(b"V001"), 2);
        // Memory32Fixed descriptors carry the base addresses.
        assert_eq!(count(&0xfeb0_0200u32.to_le_bytes()), 1);
        assert_eq!(count(b"_S5_"), 1);
    }

    #[test]
    fn test_fadt_is_hardware_reduced_with_sleep_control_on_power_port() {
        let f = fadt(0x1234);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & FADT_HW_REDUCED_ACPI, 0);
        assert_eq!(f[244], GAS_SYSTEM_IO);
        assert_eq!(u64::from_le_bytes(f[248..256].try_into().unwrap()), POWER_PORT_BASE + SLEEP_CONTROL_OFFSET);
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), 0x1234);
        assert_eq!(f.len(), 276);
    }

    #[test]
    fn test_madt_lists_every_vcpu_enabled() {
        let m = madt(3);
        let mut p = 44;
        let mut cpus = vec![];
        while p < m.len() {
            if m[p] == 0 {
                assert_eq!(m[p + 4] & 1, 1);
                cpus.push(m[p + 3]);
            }
            p += m[p + 1] as usize;
        }
        assert_eq!(cpus, vec![0, 1, 2]);
    }
}
