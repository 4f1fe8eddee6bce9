//! Which kernel is this, and load it.

use super::elf32::{self, Elf32Error};
use crate::arch::x86_64::layout::HIMEM_START;
use crate::arch::x86_64::regs::BootEntry;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use std::io::Cursor;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// The bzImage's 64-bit entry is this far into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Largest kernel file we read: a bound for a hostile or mistaken path.
pub const MAX_KERNEL_SIZE: u64 = 512 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Linux bzImage, booted through the 64-bit boot protocol.
    BzImage,
    /// ELF64 without a PVH note (a vmlinux), booted through the 64-bit boot protocol.
    Elf64,
    /// ELF64 with a PVH note, booted through PVH.
    Elf64Pvh,
    /// ELF32 with a PVH note, booted through PVH.
    Elf32Pvh,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::BzImage => "bzImage (Linux 64-bit boot protocol)",
            KernelFormat::Elf64 => "ELF64 vmlinux (Linux 64-bit boot protocol)",
            KernelFormat::Elf64Pvh => "ELF64 (PVH)",
            KernelFormat::Elf32Pvh => "ELF32 (PVH)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a kernel: expected an ELF (vmlinux or PVH) or a Linux bzImage, but the file {0}")]
    NotAKernel(String),
    #[error("the kernel is larger than {} MiB", MAX_KERNEL_SIZE >> 20)]
    TooLarge,
    #[error("malformed ELF64 kernel: {0}")]
    Elf64(linux_loader::loader::Error),
    #[error("malformed 32-bit PVH kernel")]
    Elf32(#[from] Elf32Error),
    #[error("malformed bzImage: {0}")]
    BzImage(linux_loader::loader::Error),
    #[error("the kernel does not fit in guest memory (it ends at {0:#x})")]
    DoesNotFit(u64),
}

#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub boot: BootEntry,
    /// First byte after the kernel image in guest memory.
    pub end: u64,
    /// The bzImage's setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

fn describe(image: &[u8]) -> String {
    match image {
        [] => "is empty".into(),
        [0x1f, 0x8b, ..] => "is gzip-compressed (decompress it first)".into(),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "is zstd-compressed (decompress it first)".into(),
        [b'#', b'!', ..] => "is a script".into(),
        [0x7f, b'E', b'L', b'F', ..] => "is an ELF of an unsupported class or byte order".into(),
        _ => {
            let head: Vec<String> = image.iter().take(4).map(|b| format!("{b:02x}")).collect();
            format!("starts with bytes {}", head.join(" "))
        }
    }
}

fn is_bzimage(image: &[u8]) -> bool {
    image.get(0x202..0x206) == Some(b"HdrS".as_slice())
}

fn is_elf64_le(image: &[u8]) -> bool {
    image.len() > 5 && &image[..4] == b"\x7fELF" && image[4] == 2 && image[5] == 1
}

/// Loads `image` into `mem`, choosing the loader by the file's format.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, image: &[u8]) -> Result<LoadedKernel, LoadError> {
    if image.len() as u64 > MAX_KERNEL_SIZE {
        return Err(LoadError::TooLarge);
    }
    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded = if elf32::is_elf32(image) {
        let (entry, end) = elf32::load(mem, image)?;
        LoadedKernel { format: KernelFormat::Elf32Pvh, boot: BootEntry::Pvh { entry }, end, setup_header: None }
    } else if is_elf64_le(image) {
        let r = Elf::load(mem, None, &mut Cursor::new(image), highmem).map_err(LoadError::Elf64)?;
        let (format, boot) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (KernelFormat::Elf64Pvh, BootEntry::Pvh { entry: entry.0 }),
            _ => (KernelFormat::Elf64, BootEntry::Linux64 { entry: r.kernel_load.0 }),
        };
        LoadedKernel { format, boot, end: r.kernel_end, setup_header: None }
    } else if is_bzimage(image) {
        let r = BzImage::load(mem, None, &mut Cursor::new(image), highmem).map_err(LoadError::BzImage)?;
        let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
        LoadedKernel {
            format: KernelFormat::BzImage,
            boot: BootEntry::Linux64 { entry },
            end: r.kernel_end,
            setup_header: r.setup_header,
        }
    } else {
        return Err(LoadError::NotAKernel(describe(image)));
    };
    if loaded.end > mem.last_addr().0 {
        return Err(LoadError::DoesNotFit(loaded.end));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    #[test]
    fn test_load_kernel_test_guest_is_elf64_pvh_with_its_entry() {
        let m = mem();
        let loaded = load_kernel(&m, novacron_guest_image::ELF).unwrap();

        assert_eq!(loaded.format, KernelFormat::Elf64Pvh);
        let BootEntry::Pvh { entry } = loaded.boot else { panic!("expected a PVH entry, got {:?}", loaded.boot) };
        assert!((HIMEM_START..loaded.end).contains(&entry));
        let mut first = [0u8; 1];
        m.read_slice(&mut first, GuestAddress(entry)).unwrap();
        assert_eq!(first[0], 0xfa, "the PVH entry starts with cli");
    }

    #[test]
    fn test_load_kernel_elf32_pvh_goes_through_own_loader() {
        let image = super::elf32::tests::tiny_elf32(&[0xf4], 0x100000);
        let loaded = load_kernel(&mem(), &image).unwrap();
        assert_eq!((loaded.format, loaded.boot), (KernelFormat::Elf32Pvh, BootEntry::Pvh { entry: 0x100000 }));
    }

    #[test]
    fn test_load_kernel_text_and_compressed_files_are_not_kernels() {
        for (bytes, expect) in [
            (&b"hello world"[..], "starts with bytes 68 65 6c 6c"),
            (&[0x1f, 0x8b, 8, 0][..], "gzip"),
            (&[][..], "empty"),
        ] {
            let err = load_kernel(&mem(), bytes).unwrap_err();
            assert!(matches!(err, LoadError::NotAKernel(_)), "{err}");
            assert!(err.to_string().contains(expect), "{err}");
        }
    }

    #[test]
    fn test_load_kernel_bzimage_magic_with_garbage_is_an_error() {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(matches!(load_kernel(&mem(), &image), Err(LoadError::BzImage(_))));
    }

    #[test]
    fn test_load_kernel_test_guest_into_too_little_memory_is_an_error() {
        let tiny: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(load_kernel(&tiny, novacron_guest_image::ELF).is_err());
    }
}
