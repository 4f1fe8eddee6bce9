//! The PVH `hvm_start_info` the loader hands us in %ebx (Xen's arch-x86/hvm/start_info.h).

const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
pub const MAX_RAM_RANGES: usize = 16;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

pub struct BootInfo {
    pub cmdline: &'static [u8],
    pub rsdp: u64,
    pub ram: [(u64, u64); MAX_RAM_RANGES],
    pub ram_ranges: usize,
    /// The first module (the initrd): its address and size.
    pub module: Option<(u64, u64)>,
}

impl BootInfo {
    pub fn ram_bytes(&self) -> u64 {
        self.ram[..self.ram_ranges].iter().map(|r| r.1).sum()
    }
}

/// Reads the start info. Returns None when the magic is wrong (not booted through PVH).
pub fn read(paddr: u64) -> Option<BootInfo> {
    if paddr == 0 {
        return None;
    }
    // SAFETY: the loader put a start_info at this identity-mapped address.
    let si = unsafe { &*(paddr as *const StartInfo) };
    if si.magic != START_INFO_MAGIC {
        return None;
    }
    let mut info =
        BootInfo { cmdline: &[], rsdp: si.rsdp_paddr, ram: [(0, 0); MAX_RAM_RANGES], ram_ranges: 0, module: None };
    if si.nr_modules > 0 && si.modlist_paddr != 0 {
        // SAFETY: the loader describes `nr_modules` entries of (paddr, size, cmdline, reserved).
        let entry = unsafe { core::slice::from_raw_parts(si.modlist_paddr as *const u64, 2) };
        info.module = Some((entry[0], entry[1]));
    }
    if si.cmdline_paddr != 0 {
        let base = si.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: the command line is a NUL-terminated string in guest memory.
        while len < 4096 && unsafe { base.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes from `base` were just read.
        info.cmdline = unsafe { core::slice::from_raw_parts(base, len) };
    }
    if si.version >= 1 && si.memmap_paddr != 0 {
        let entries = si.memmap_paddr as *const MemmapEntry;
        for i in 0..si.memmap_entries as usize {
            // SAFETY: the loader describes `memmap_entries` entries at `memmap_paddr`.
            let e = unsafe { &*entries.add(i) };
            if e.kind == E820_RAM && info.ram_ranges < MAX_RAM_RANGES {
                info.ram[info.ram_ranges] = (e.addr, e.size);
                info.ram_ranges += 1;
            }
        }
    }
    Some(info)
}
