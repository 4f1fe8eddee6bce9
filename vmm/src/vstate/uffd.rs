//! userfaultfd(2): a thread of this process fills the pages of a memory range the first
//! time anything touches them (a vCPU through KVM, or the VMM itself), instead of the
//! kernel filling them with zeroes. Lazy snapshot restore serves faults from the memory
//! file with it (`crate::snapshot::lazy`).
//!
//! Only the missing-page mode is used: a fault reports an address, the server copies
//! (or maps zeroes into) the page range, and the faulting thread goes on. The kernel
//! fills only pages that were never populated, inside ranges registered with this fd, so
//! none of these calls can change memory anyone has seen.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

pub const PAGE: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One message read from the fd (`struct uffd_msg`): the event, then for a page fault
/// its flags and address.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    extra: u64,
}

const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
// Bits of `ioctls` in the answer to a registration, by ioctl number.
const IOCTL_WAKE: u64 = 1 << 0x02;
const IOCTL_COPY: u64 = 1 << 0x03;
const IOCTL_ZEROPAGE: u64 = 1 << 0x04;

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
// On /dev/userfaultfd: a new userfaultfd whose flags are the argument.
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "cannot create a userfaultfd (it needs root, access to /dev/userfaultfd, or sysctl \
         vm.unprivileged_userfaultfd=1, and Linux 4.11 or later)"
    )]
    Create(#[source] std::io::Error),
    #[error("the kernel refused the userfaultfd API handshake")]
    Api(#[source] std::io::Error),
    #[error("cannot register {len} bytes at {start:#x} for missing-page faults")]
    Register {
        start: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel cannot fill pages of this memory with a userfaultfd (no copy, zero-page or wake)")]
    Unsupported,
    #[error("cannot fill {len} bytes at {start:#x}")]
    Fill {
        start: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wake the threads waiting on {start:#x}")]
    Wake {
        start: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read page faults from the userfaultfd")]
    Read(#[source] std::io::Error),
}

/// A userfaultfd in missing-page mode, non-blocking.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Userfault {
    /// Opens a userfaultfd that also sees faults taken inside the kernel (KVM's), through
    /// /dev/userfaultfd where it exists, else the system call.
    pub fn new() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match std::fs::File::options().read(true).write(true).open("/dev/userfaultfd") {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd
                // (or -1); no memory is passed.
                let fd = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as _) };
                if fd < 0 {
                    return Err(UffdError::Create(std::io::Error::last_os_error()));
                }
                fd
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // SAFETY: the system call takes its flags by value and returns a new fd (or -1).
                let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
                if fd < 0 {
                    return Err(UffdError::Create(std::io::Error::last_os_error()));
                }
                fd as i32
            }
            Err(e) => return Err(UffdError::Create(e)),
        };
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let uffd = Userfault { fd };
        let mut api = UffdioApi { api: UFFD_API, ..UffdioApi::default() };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        if unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) } < 0 {
            return Err(UffdError::Api(std::io::Error::last_os_error()));
        }
        Ok(uffd)
    }

    /// Faults on pages of `[start, start + len)` that were never populated now wait for
    /// this fd's server instead of being filled with zeroes.
    pub fn register(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: start as u64, len: len as u64 },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the kernel
        // checks the range is mapped memory of this process.
        if unsafe { ioctl_with_mut_ref(self, UFFDIO_REGISTER(), &mut reg) } < 0 {
            let source = std::io::Error::last_os_error();
            return Err(UffdError::Register { start: start as u64, len: len as u64, source });
        }
        if reg.ioctls & (IOCTL_WAKE | IOCTL_COPY | IOCTL_ZEROPAGE) != IOCTL_WAKE | IOCTL_COPY | IOCTL_ZEROPAGE {
            let _ = self.unregister(start, len);
            return Err(UffdError::Unsupported);
        }
        Ok(())
    }

    /// Faults on the range are the kernel's again (missing pages read as zeroes).
    pub fn unregister(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut range = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`.
        if unsafe { ioctl_with_mut_ref(self, UFFDIO_UNREGISTER(), &mut range) } < 0 {
            let source = std::io::Error::last_os_error();
            return Err(UffdError::Register { start: start as u64, len: len as u64, source });
        }
        Ok(())
    }

    /// Fills the missing pages of `[dst, dst + src.len())` with `src` and wakes the threads
    /// waiting on them. Pages already there are left as they are.
    pub fn copy(&self, dst: *mut u8, src: &[u8]) -> Result<(), UffdError> {
        self.fill(dst as u64, src.len() as u64, |at, len| {
            let mut copy = UffdioCopy { dst: at, src: src.as_ptr() as u64 + (at - dst as u64), len, mode: 0, copy: 0 };
            // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy`; the kernel reads
            // `len` bytes at `src` (inside the slice) and fills only missing pages of a
            // range registered with this fd.
            let ret = unsafe { ioctl_with_mut_ref(self, UFFDIO_COPY(), &mut copy) };
            (ret, copy.copy)
        })
    }

    /// Maps the zero page at the missing pages of `[dst, dst + len)` and wakes the threads
    /// waiting on them (a write later gets its own page, as for untouched memory).
    pub fn zero(&self, dst: *mut u8, len: usize) -> Result<(), UffdError> {
        self.fill(dst as u64, len as u64, |at, len| {
            let mut zero = UffdioZeropage { range: UffdioRange { start: at, len }, mode: 0, zeropage: 0 };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`; the kernel
            // fills only missing pages of a range registered with this fd.
            let ret = unsafe { ioctl_with_mut_ref(self, UFFDIO_ZEROPAGE(), &mut zero) };
            (ret, zero.zeropage)
        })
    }

    /// Runs one fill ioctl until the whole range is done: `op(at, len)` answers the
    /// ioctl's return and the bytes it filled (or -errno). A partial fill (EAGAIN) goes on
    /// after what was filled; a page that is already there (EEXIST) is stepped over; a
    /// range the kernel will not fill in one go (ENOENT: it spans two mappings, as after
    /// a split) goes page by page.
    fn fill(&self, start: u64, len: u64, mut op: impl FnMut(u64, u64) -> (i32, i64)) -> Result<(), UffdError> {
        let end = start + len;
        let mut at = start;
        let mut step = len;
        while at < end {
            let n = (end - at).min(step);
            let (ret, filled) = op(at, n);
            if ret >= 0 {
                at += n;
                continue;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) if filled > 0 => at += filled as u64,
                Some(libc::EAGAIN) => {}
                Some(libc::EEXIST) => {
                    // The page at `at` is there already: wake whoever waits on it.
                    self.wake(at as *mut u8, PAGE)?;
                    at += PAGE as u64;
                }
                Some(libc::ENOENT) if step > PAGE as u64 => step = PAGE as u64,
                _ => return Err(UffdError::Fill { start: at, len: n, source: err }),
            }
        }
        Ok(())
    }

    /// Wakes the threads waiting on `[start, start + len)` (its pages were filled).
    pub fn wake(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut range = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`.
        if unsafe { ioctl_with_mut_ref(self, UFFDIO_WAKE(), &mut range) } < 0 {
            return Err(UffdError::Wake { start: start as u64, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Appends the addresses of the page faults waiting now to `faults`; reads nothing
    /// and returns at once when none waits.
    pub fn read_faults(&self, faults: &mut Vec<u64>) -> Result<(), UffdError> {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            let size = std::mem::size_of_val(&msgs);
            // SAFETY: the kernel writes at most `size` bytes of whole `uffd_msg`s into `msgs`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), size) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Read(err)),
                };
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            faults.extend(msgs[..count].iter().filter(|m| m.event == UFFD_EVENT_PAGEFAULT).map(|m| m.address));
            if count < msgs.len() {
                return Ok(());
            }
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) for a fault; whether one waits.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool, UffdError> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd it is given.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return if err.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(UffdError::Read(err)) };
        }
        Ok(n > 0)
    }
}

// The kernel's sizes: a wrong one would make every ioctl number wrong.
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

/// An anonymous mapping of `pages` pages, unmapped on drop (for tests).
#[cfg(test)]
pub(crate) struct Mapping(pub *mut u8, pub usize);

#[cfg(test)]
impl Mapping {
    pub fn new(pages: usize) -> Self {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p.cast(), len)
    }
}

#[cfg(test)]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_wait_for_the_server_which_fills_them_from_its_buffer() {
        let uffd = match Userfault::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("skipped: {}", crate::process::error_chain(&e));
                return;
            }
        };
        let map = Mapping::new(4);
        uffd.register(map.0, map.1).unwrap();
        let base = map.0 as usize;
        // A reader of page 2 waits until the server fills it.
        let reader = std::thread::spawn(move || {
            // SAFETY: page 2 of the live mapping; the read waits for the fault's server.
            unsafe { std::ptr::read_volatile((base + 2 * PAGE + 8) as *const u64) }
        });
        assert!(uffd.wait(10_000).unwrap(), "the reader's fault arrives");
        let mut faults = Vec::new();
        uffd.read_faults(&mut faults).unwrap();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0] as usize & !(PAGE - 1), base + 2 * PAGE);
        let mut page = vec![0u8; 2 * PAGE];
        page[8..16].copy_from_slice(&0x1234_5678u64.to_ne_bytes());
        uffd.copy((base + 2 * PAGE) as *mut u8, &page).unwrap();
        assert_eq!(reader.join().unwrap(), 0x1234_5678);
        // Filling again steps over what is there; zero pages fill the rest.
        uffd.copy((base + 2 * PAGE) as *mut u8, &page).unwrap();
        uffd.zero(map.0, 2 * PAGE).unwrap();
        // SAFETY: pages of the live mapping, all filled now.
        unsafe {
            assert_eq!(std::ptr::read_volatile((base + 2 * PAGE + 8) as *const u64), 0x1234_5678, "not overwritten");
            assert_eq!(std::ptr::read_volatile(base as *const u64), 0);
        }
        faults.clear();
        uffd.read_faults(&mut faults).unwrap();
        assert!(faults.is_empty(), "no fault is waiting: {faults:?}");
        uffd.unregister(map.0, map.1).unwrap();
        // SAFETY: page 3 of the live mapping, no longer registered: the kernel fills it.
        assert_eq!(unsafe { std::ptr::read_volatile((base + 3 * PAGE) as *const u64) }, 0);
    }

    #[test]
    fn a_range_that_is_not_mapped_is_refused_with_its_address() {
        let Ok(uffd) = Userfault::new() else { return };
        let err = uffd.register(std::ptr::null_mut::<u8>().wrapping_add(PAGE), PAGE).unwrap_err();
        assert!(matches!(err, UffdError::Register { start: 4096, .. }), "{err}");
    }
}
