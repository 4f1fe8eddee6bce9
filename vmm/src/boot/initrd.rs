//! Where the initrd goes: as high as it can in RAM below the MMIO hole and below the
//! kernel's limit, page aligned, above the kernel.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PAGE: u64 = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InitrdError {
    #[error("the initrd ({size} bytes) does not fit between the kernel (ends at {kernel_end:#x}) and {limit:#x}")]
    DoesNotFit { size: u64, kernel_end: u64, limit: u64 },
    #[error("the initrd is empty")]
    Empty,
    #[error("could not write the initrd into guest memory")]
    Write,
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// `limit` is the first address it must not reach (the end of low RAM, or the kernel's
/// `initrd_addr_max` + 1, whichever is lower).
pub fn place(size: u64, kernel_end: u64, limit: u64) -> Result<InitrdPlacement, InitrdError> {
    if size == 0 {
        return Err(InitrdError::Empty);
    }
    let err = InitrdError::DoesNotFit { size, kernel_end, limit };
    let addr = limit.checked_sub(size).ok_or(err.clone())? & !(PAGE - 1);
    if addr < kernel_end.next_multiple_of(PAGE) {
        return Err(err);
    }
    Ok(InitrdPlacement { addr, size })
}

pub fn load(
    mem: &impl GuestMemoryBackend,
    initrd: &[u8],
    kernel_end: u64,
    limit: u64,
) -> Result<InitrdPlacement, InitrdError> {
    let p = place(initrd.len() as u64, kernel_end, limit)?;
    mem.write_slice(initrd, GuestAddress(p.addr)).map_err(|_| InitrdError::Write)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_place_initrd_at_top_page_aligned() {
        assert_eq!(place(5000, 0x200000, 0x1000_0000), Ok(InitrdPlacement { addr: 0x1000_0000 - 0x2000, size: 5000 }));
    }

    #[test]
    fn test_place_initrd_overlapping_kernel_is_refused() {
        assert!(matches!(place(0x0f00_0000, 0x0200_0000, 0x1000_0000), Err(InitrdError::DoesNotFit { .. })));
        assert!(matches!(place(u64::MAX, 0, 0x1000), Err(InitrdError::DoesNotFit { .. })));
        assert_eq!(place(0, 0, 0x1000), Err(InitrdError::Empty));
    }
}
