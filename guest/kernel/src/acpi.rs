//! Just enough ACPI: the local APIC IDs from the MADT, and the FADT's sleep control
//! register for power-off.

pub const MAX_CPUS: usize = 8;

/// Generic Address Structure (ACPI 5.2.3.2): where a register lives.
#[derive(Clone, Copy)]
pub struct Register {
    pub space: u8,
    pub address: u64,
}

pub struct AcpiInfo {
    pub apic_ids: [u32; MAX_CPUS],
    pub cpus: usize,
    /// CPUs the MADT listed beyond MAX_CPUS.
    pub ignored_cpus: usize,
    pub sleep_control: Option<Register>,
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: ACPI tables live in identity-mapped RAM below 4 GiB.
    unsafe { (addr as *const u8).read_volatile() }
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: as read_u8.
    unsafe { (addr as *const u32).read_unaligned() }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as read_u8.
    unsafe { (addr as *const u64).read_unaligned() }
}

/// Finds the RSDP: given by the loader, or searched for in the BIOS area.
fn find_rsdp(hint: u64) -> Option<u64> {
    const SIG: u64 = u64::from_le_bytes(*b"RSD PTR ");
    if hint != 0 && read_u64(hint) == SIG {
        return Some(hint);
    }
    (0xe0000u64..0x100000).step_by(16).find(|&a| read_u64(a) == SIG)
}

/// The root table's entries: XSDT (64-bit pointers) when there is one, else RSDT.
fn for_each_table(rsdp: u64, mut f: impl FnMut(u64)) {
    let revision = read_u8(rsdp + 15);
    let xsdt = if revision >= 2 { read_u64(rsdp + 24) } else { 0 };
    let (root, width) = if xsdt != 0 { (xsdt, 8) } else { (u64::from(read_u32(rsdp + 16)), 4) };
    if root == 0 {
        return;
    }
    let len = u64::from(read_u32(root + 4));
    let mut p = root + 36;
    while p + width <= root + len {
        let table = if width == 8 { read_u64(p) } else { u64::from(read_u32(p)) };
        f(table);
        p += width;
    }
}

fn parse_madt(madt: u64, info: &mut AcpiInfo) {
    let len = u64::from(read_u32(madt + 4));
    let mut p = madt + 44;
    while p + 2 <= madt + len {
        let kind = read_u8(p);
        let entry_len = u64::from(read_u8(p + 1));
        if entry_len < 2 {
            break;
        }
        let (id, flags) = match kind {
            0 => (u32::from(read_u8(p + 3)), read_u32(p + 4)),
            9 => (read_u32(p + 4), read_u32(p + 8)),
            _ => (0, 0),
        };
        // Bit 0: enabled; bit 1: online capable.
        if (kind == 0 || kind == 9) && flags & 0x3 != 0 {
            if info.cpus < MAX_CPUS {
                info.apic_ids[info.cpus] = id;
                info.cpus += 1;
            } else {
                info.ignored_cpus += 1;
            }
        }
        p += entry_len;
    }
}

fn parse_fadt(fadt: u64, info: &mut AcpiInfo) {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    let len = read_u32(fadt + 4);
    if len < 256 || read_u32(fadt + 112) & HW_REDUCED_ACPI == 0 {
        return;
    }
    let address = read_u64(fadt + 244 + 4);
    if address != 0 {
        info.sleep_control = Some(Register { space: read_u8(fadt + 244), address });
    }
}

pub fn read(rsdp_hint: u64) -> AcpiInfo {
    let mut info = AcpiInfo { apic_ids: [0; MAX_CPUS], cpus: 0, ignored_cpus: 0, sleep_control: None };
    let Some(rsdp) = find_rsdp(rsdp_hint) else {
        return info;
    };
    for_each_table(rsdp, |table| match &read_u32(table).to_le_bytes() {
        b"APIC" => parse_madt(table, &mut info),
        b"FACP" => parse_fadt(table, &mut info),
        _ => {}
    });
    info
}
