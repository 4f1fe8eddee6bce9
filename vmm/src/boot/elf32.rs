//! A loader for 32-bit ELF kernels with a PVH entry note.
//!
//! QEMU boots these (`-kernel` with an ELF32 that has `XEN_ELFNOTE_PHYS32_ENTRY`);
//! linux-loader, and so Firecracker and Cloud Hypervisor, reject them. Every field comes
//! from the file and is checked before use.

use crate::arch::x86_64::layout::HIMEM_START;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const EHDR_SIZE: usize = 52;
const PHDR_SIZE: usize = 32;
/// More program headers than any kernel has; a bound on work for a hostile file.
const MAX_PHDRS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Elf32Error {
    #[error("the ELF header is truncated")]
    TruncatedHeader,
    #[error("not a little-endian x86 ELF32 executable")]
    NotX86,
    #[error("program headers are malformed ({0})")]
    BadProgramHeaders(&'static str),
    #[error("segment {index} (at {paddr:#x}, {memsz:#x} bytes) does not fit in guest RAM above 1 MiB")]
    SegmentOutOfRange { index: usize, paddr: u64, memsz: u64 },
    #[error("segment {index} points outside the file")]
    SegmentOutsideFile { index: usize },
    #[error("the 32-bit ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), so it cannot be booted")]
    NoPvhNote,
    #[error("the PVH entry {0:#x} is not inside a loaded segment")]
    EntryOutsideImage(u64),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn phdrs(image: &[u8]) -> Result<Vec<Phdr>, Elf32Error> {
    let phoff = u32_at(image, 28).ok_or(Elf32Error::TruncatedHeader)? as usize;
    let phentsize = u16_at(image, 42).ok_or(Elf32Error::TruncatedHeader)? as usize;
    let phnum = u16_at(image, 44).ok_or(Elf32Error::TruncatedHeader)? as usize;
    if phentsize != PHDR_SIZE {
        return Err(Elf32Error::BadProgramHeaders("entry size is not 32"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(Elf32Error::BadProgramHeaders("count is 0 or too large"));
    }
    (0..phnum)
        .map(|i| {
            let at = phoff.checked_add(i * PHDR_SIZE).ok_or(Elf32Error::BadProgramHeaders("offset overflows"))?;
            let h = image.get(at..at + PHDR_SIZE).ok_or(Elf32Error::BadProgramHeaders("outside the file"))?;
            let f = |o| u64::from(u32_at(h, o).unwrap_or(0));
            Ok(Phdr { kind: f(0) as u32, offset: f(4), paddr: f(12), filesz: f(16), memsz: f(20) })
        })
        .collect()
}

/// The PVH entry from a PT_NOTE segment's notes, if one is there.
fn pvh_entry(notes: &[u8]) -> Option<u64> {
    let mut p = 0usize;
    while p + 12 <= notes.len() {
        let namesz = u32_at(notes, p)? as usize;
        let descsz = u32_at(notes, p + 4)? as usize;
        let kind = u32_at(notes, p + 8)?;
        let name_at = p + 12;
        let desc_at = name_at.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let next = desc_at.checked_add(descsz.checked_next_multiple_of(4)?)?;
        let name = notes.get(name_at..name_at + namesz)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            return match descsz {
                4 => u32_at(notes, desc_at).map(u64::from),
                8 => notes.get(desc_at..desc_at + 8).map(|d| u64::from_le_bytes(d.try_into().unwrap_or_default())),
                _ => None,
            };
        }
        p = next;
    }
    None
}

pub fn is_elf32(image: &[u8]) -> bool {
    image.len() > 4 && &image[..4] == b"\x7fELF" && image[4] == 1
}

/// Loads the PT_LOAD segments at their physical addresses. Returns (PVH entry, end of image).
pub fn load(mem: &impl GuestMemoryBackend, image: &[u8]) -> Result<(u64, u64), Elf32Error> {
    if image.len() < EHDR_SIZE {
        return Err(Elf32Error::TruncatedHeader);
    }
    let machine = u16_at(image, 18).ok_or(Elf32Error::TruncatedHeader)?;
    if !is_elf32(image) || image[5] != 1 || !(machine == EM_386 || machine == EM_X86_64) {
        return Err(Elf32Error::NotX86);
    }
    let headers = phdrs(image)?;
    let mut entry = None;
    let mut loaded = Vec::new();
    for (index, h) in headers.iter().enumerate() {
        let file_range = || {
            let end = h.offset.checked_add(h.filesz)?;
            (end <= image.len() as u64).then(|| &image[h.offset as usize..end as usize])
        };
        match h.kind {
            PT_NOTE => {
                let notes = file_range().ok_or(Elf32Error::SegmentOutsideFile { index })?;
                entry = entry.or(pvh_entry(notes));
            }
            PT_LOAD if h.memsz > 0 => {
                let bytes = file_range().ok_or(Elf32Error::SegmentOutsideFile { index })?;
                let out_of_range = Elf32Error::SegmentOutOfRange { index, paddr: h.paddr, memsz: h.memsz };
                if h.filesz > h.memsz
                    || h.paddr < HIMEM_START
                    || !mem.check_range(GuestAddress(h.paddr), h.memsz as usize)
                {
                    return Err(out_of_range);
                }
                // The rest up to memsz is already zero: guest memory is freshly mapped.
                mem.write_slice(bytes, GuestAddress(h.paddr)).map_err(|_| out_of_range)?;
                loaded.push((h.paddr, h.paddr + h.memsz));
            }
            _ => {}
        }
    }
    let entry = entry.ok_or(Elf32Error::NoPvhNote)?;
    if !loaded.iter().any(|&(start, end)| (start..end).contains(&entry)) {
        return Err(Elf32Error::EntryOutsideImage(entry));
    }
    let end = loaded.iter().map(|&(_, end)| end).max().unwrap_or(HIMEM_START);
    Ok((entry, end))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// A minimal ELF32 PVH kernel: one PT_LOAD at 1 MiB holding `code`, and a PVH note.
    pub(crate) fn tiny_elf32(code: &[u8], entry: u32) -> Vec<u8> {
        let phoff = EHDR_SIZE;
        let notes_off = phoff + 2 * PHDR_SIZE;
        let mut notes = Vec::new();
        for v in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
            notes.extend_from_slice(&v.to_le_bytes());
        }
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&entry.to_le_bytes());
        let code_off = notes_off + notes.len();

        let mut f = vec![0u8; EHDR_SIZE];
        f[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&EM_386.to_le_bytes());
        f[24..28].copy_from_slice(&entry.to_le_bytes());
        f[28..32].copy_from_slice(&(phoff as u32).to_le_bytes());
        f[42..44].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[44..46].copy_from_slice(&2u16.to_le_bytes());
        for (kind, off, addr, size) in
            [(PT_LOAD, code_off, 0x100000u32, code.len()), (PT_NOTE, notes_off, 0, notes.len())]
        {
            for v in [kind, off as u32, addr, addr, size as u32, size as u32 + 0x1000, 7, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        }
        f.extend_from_slice(&notes);
        f.extend_from_slice(code);
        f
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn test_elf32_pvh_loads_segment_and_returns_note_entry() {
        let m = mem();
        let image = tiny_elf32(&[0xf4, 0xeb, 0xfd], 0x100000);

        let (entry, end) = load(&m, &image).unwrap();

        assert_eq!(entry, 0x100000);
        assert_eq!(end, 0x100000 + 3 + 0x1000);
        let mut code = [0u8; 3];
        m.read_slice(&mut code, GuestAddress(0x100000)).unwrap();
        assert_eq!(code, [0xf4, 0xeb, 0xfd]);
    }

    #[test]
    fn test_elf32_without_pvh_note_is_refused() {
        let mut image = tiny_elf32(&[0xf4], 0x100000);
        let note_type_at = EHDR_SIZE + 2 * PHDR_SIZE + 8;
        image[note_type_at] = 0x13;

        assert_eq!(load(&mem(), &image), Err(Elf32Error::NoPvhNote));
    }

    #[test]
    fn test_elf32_segment_below_1mib_or_beyond_ram_is_refused() {
        let m = mem();
        let mut low = tiny_elf32(&[0xf4], 0x100000);
        low[EHDR_SIZE + 12..EHDR_SIZE + 16].copy_from_slice(&0x7000u32.to_le_bytes());
        let mut high = tiny_elf32(&[0xf4], 0x100000);
        high[EHDR_SIZE + 20..EHDR_SIZE + 24].copy_from_slice(&0x1000_0000u32.to_le_bytes());

        assert!(matches!(load(&m, &low), Err(Elf32Error::SegmentOutOfRange { index: 0, .. })));
        assert!(matches!(load(&m, &high), Err(Elf32Error::SegmentOutOfRange { index: 0, .. })));
    }

    #[test]
    fn test_elf32_entry_outside_loaded_segments_is_refused() {
        let image = tiny_elf32(&[0xf4], 0x300000);
        assert_eq!(load(&mem(), &image), Err(Elf32Error::EntryOutsideImage(0x300000)));
    }

    #[test]
    fn test_elf32_truncated_files_are_refused_at_every_length() {
        let image = tiny_elf32(&[0xf4, 0xf4], 0x100000);
        for len in 0..image.len() {
            assert!(load(&mem(), &image[..len]).is_err(), "a file cut at {len} bytes was accepted");
        }
    }
}
