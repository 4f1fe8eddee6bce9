//! What a VM is made of, from the command line, checked before anything is created.

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::vstate::memory::host_memory_bytes;
use std::path::{Path, PathBuf};

pub const MIN_MEM_MIB: u64 = 8;
pub const MAX_VCPUS: u8 = 8;
/// Command line for a Linux kernel when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// The VM's shape, as `novacron vm run` and `novacron-vmm` take it.
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Kernel to boot: a Linux bzImage, an ELF vmlinux, or an ELF (32- or 64-bit) with a PVH
    /// entry note. Without it, the bundled test guest boots.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Linux default: "console=ttyS0 reboot=k panic=1". The test guest
    /// takes its workload here, e.g. "ws=64 rate=2000 verify=1000 hb=500".
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub mem: u64,
    /// Number of vCPUs, 1 to 8.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_VCPUS as i64))]
    pub vcpus: u8,
    /// Control socket (status, pause, resume, shutdown).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Write the serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    TestGuest,
    File(PathBuf),
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::TestGuest => f.write_str("test-guest"),
            KernelSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub api_sock: Option<PathBuf>,
    pub serial_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} {path} cannot be read: {reason}")]
    Unreadable { what: &'static str, path: PathBuf, reason: String },
    #[error("--mem {0} is too small: a VM needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    #[error("--mem {wanted} MiB is more than this host can give ({host} MiB of RAM in all)")]
    MemTooLarge { wanted: u64, host: u64 },
    #[error("--vcpus {0} is out of range: 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("--cmdline is {0} bytes; at most {max} are allowed", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("--cmdline contains a NUL byte")]
    CmdlineNul,
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ConfigError::Missing { what, path: path.to_owned() },
        _ => ConfigError::Unreadable { what, path: path.to_owned(), reason: e.to_string() },
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile { what, path: path.to_owned() });
    }
    std::fs::File::open(path).map_err(|e| ConfigError::Unreadable {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(())
}

impl VmConfig {
    pub fn from_args(args: &VmArgs) -> Result<Self, ConfigError> {
        if args.vcpus == 0 || args.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(args.vcpus));
        }
        if args.mem < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(args.mem));
        }
        let host_mib = host_memory_bytes().map(|b| b >> 20).unwrap_or(u64::MAX);
        if args.mem > host_mib {
            return Err(ConfigError::MemTooLarge { wanted: args.mem, host: host_mib });
        }
        let kernel = match &args.kernel {
            Some(path) => {
                check_file("kernel", path)?;
                KernelSource::File(path.clone())
            }
            None => KernelSource::TestGuest,
        };
        if let Some(path) = &args.initrd {
            check_file("initrd", path)?;
        }
        let cmdline = match (&args.cmdline, &kernel) {
            (Some(c), _) => c.clone(),
            (None, KernelSource::TestGuest) => String::new(),
            (None, KernelSource::File(_)) => DEFAULT_LINUX_CMDLINE.to_string(),
        };
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        Ok(VmConfig {
            kernel,
            initrd: args.initrd.clone(),
            cmdline,
            mem_mib: args.mem,
            vcpus: args.vcpus,
            api_sock: args.api_sock.clone(),
            serial_file: args.serial_file.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> VmArgs {
        VmArgs { kernel: None, initrd: None, cmdline: None, mem: 64, vcpus: 1, api_sock: None, serial_file: None }
    }

    #[test]
    fn test_config_defaults_boot_the_test_guest_with_empty_cmdline() {
        let c = VmConfig::from_args(&args()).unwrap();
        assert_eq!((c.kernel, c.cmdline.as_str(), c.mem_mib, c.vcpus), (KernelSource::TestGuest, "", 64, 1));
    }

    #[test]
    fn test_config_linux_kernel_gets_console_cmdline() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let c = VmConfig::from_args(&VmArgs { kernel: Some(f.path().into()), ..args() }).unwrap();
        assert_eq!(c.cmdline, DEFAULT_LINUX_CMDLINE);
    }

    #[test]
    fn test_config_rejects_bad_values_with_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let cases = [
            (
                VmArgs { kernel: Some(missing.clone()), ..args() },
                ConfigError::Missing { what: "kernel", path: missing.clone() },
            ),
            (
                VmArgs { kernel: Some(dir.path().into()), ..args() },
                ConfigError::NotAFile { what: "kernel", path: dir.path().into() },
            ),
            (
                VmArgs { initrd: Some(missing.clone()), ..args() },
                ConfigError::Missing { what: "initrd", path: missing },
            ),
            (VmArgs { mem: 4, ..args() }, ConfigError::MemTooSmall(4)),
            (VmArgs { vcpus: 9, ..args() }, ConfigError::Vcpus(9)),
            (VmArgs { vcpus: 0, ..args() }, ConfigError::Vcpus(0)),
            (VmArgs { cmdline: Some("a\0b".into()), ..args() }, ConfigError::CmdlineNul),
            (
                VmArgs { cmdline: Some("x".repeat(CMDLINE_MAX_SIZE)), ..args() },
                ConfigError::CmdlineTooLong(CMDLINE_MAX_SIZE),
            ),
        ];
        for (a, want) in cases {
            assert_eq!(VmConfig::from_args(&a).unwrap_err(), want);
        }
    }

    #[test]
    fn test_config_rejects_more_memory_than_the_host_has() {
        let err = VmConfig::from_args(&VmArgs { mem: u64::MAX >> 21, ..args() }).unwrap_err();
        assert!(matches!(err, ConfigError::MemTooLarge { .. }), "{err}");
    }
}
