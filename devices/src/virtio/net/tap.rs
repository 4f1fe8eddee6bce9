//! A tap device, opened by name through /dev/net/tun: Ethernet frames in and out, without
//! packet information headers. Non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
/// IFNAMSIZ less the terminating NUL.
pub const MAX_NAME: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty, longer than {MAX_NAME} bytes, or has a NUL, a '/' or a leading '.'")]
    BadName(String),
    #[error("cannot open /dev/net/tun (is the tun module loaded, and may this user use it?)")]
    OpenTun(#[source] std::io::Error),
    #[error(
        "tap {name} does not exist: create it with `ip tuntap add dev {name} mode tap`, or add `create` to --net to have the VMM make a temporary one"
    )]
    Missing { name: String },
    #[error("network interface {name} is not a tap device (no tun_flags in /sys/class/net/{name})")]
    NotATap { name: String },
    #[error("cannot attach to tap {name} (create it with `ip tuntap add dev {name} mode tap`, or run as root)")]
    Attach {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
}

/// Whether a missing tap may be made: TUNSETIFF creates a tap that does not exist (when
/// the caller may), which for a typo would be a new, down, unattached interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapMode {
    /// The tap must exist (the default, and always on restore or migration).
    Existing,
    /// Make it if it is missing; it goes away with the VMM.
    CreateIfMissing,
}

impl Tap {
    pub fn open(name: &str, mode: TapMode) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() > MAX_NAME
            || name.contains('\0')
            || name.contains('/')
            || name.starts_with('.')
        {
            return Err(TapError::BadName(name.to_string()));
        }
        if mode == TapMode::Existing {
            let dev = std::path::Path::new("/sys/class/net").join(name);
            if !dev.exists() {
                return Err(TapError::Missing { name: name.to_string() });
            }
            if !dev.join("tun_flags").exists() {
                return Err(TapError::NotATap { name: name.to_string() });
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // struct ifreq: 16 bytes of name, then the flags (a short) in the union.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on x86-64), which
        // `ifreq` is, and the fd is the tun device we just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
        if rc < 0 {
            return Err(TapError::Attach { name: name.to_string(), source: std::io::Error::last_os_error() });
        }
        Ok(Tap { file, name: name.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One frame, or WouldBlock when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tap_bad_names_are_refused_before_any_syscall() {
        for name in ["", "a-name-longer-than-15", "nul\0name"] {
            assert!(matches!(Tap::open(name, TapMode::Existing), Err(TapError::BadName(_))), "{name:?}");
        }
    }

    #[test]
    fn test_tap_that_does_not_exist_is_refused_and_not_created() {
        let missing = Tap::open("nvc-typo0", TapMode::Existing).err().unwrap();
        let loopback = Tap::open("lo", TapMode::Existing).err().unwrap();

        assert!(matches!(&missing, TapError::Missing { name } if name == "nvc-typo0"), "{missing}");
        assert!(missing.to_string().contains("ip tuntap add dev nvc-typo0"), "{missing}");
        assert!(matches!(loopback, TapError::NotATap { .. }), "{loopback}");
        assert!(!std::path::Path::new("/sys/class/net/nvc-typo0").exists());
    }
}
