//! What a VM is made of, from the command line, checked before anything is created.

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, VIRTIO_MMIO_SLOTS};
use crate::snapshot::MachineSpec;
use crate::vstate::memory::host_memory_bytes;
use novacron_devices::rate_limiter::{RateLimiterConfig, parse_rate_limiter};
use novacron_devices::virtio::block::BlockConfig;
use novacron_devices::virtio::block::disk::ID_BYTES;
use novacron_devices::virtio::net::tap::MAX_NAME as TAP_NAME_MAX;
use novacron_devices::virtio::net::{NetConfig, TapMode, parse_mac};
use std::path::{Path, PathBuf};

pub const MIN_MEM_MIB: u64 = 8;
pub const MAX_VCPUS: u8 = 8;
/// Command line for a Linux kernel when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// The VM's shape, as `novacron vmm run` and `novacron-vmm` take it.
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
    /// A virtio disk on a raw image: path=FILE[,ro][,id=ID][,bw=BYTES[/MS]][,ops=N[/MS]]
    /// [,bw_burst=N][,ops_burst=N] (rates per second unless /MS). Repeat for more disks.
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    pub disks: Vec<BlockConfig>,
    /// A virtio network interface on an existing tap device: tap=NAME[,mac=52:54:00:12:34:56]
    /// with optional rx_bw=, rx_ops=, tx_bw=, tx_ops= (and _burst) limits, and `create` to
    /// make the tap if it does not exist. Repeat for more.
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub nets: Vec<NetArg>,
    /// A virtio entropy device, optionally limited: --rng or --rng bw=BYTES[/MS].
    #[arg(long, value_name = "LIMITS", num_args = 0..=1, default_missing_value = "", value_parser = parse_rng)]
    pub rng: Option<RateLimiterConfig>,
    /// Run the guest only under a run permit (`permit` on the control socket, from the
    /// host's keeper), and pause it when the permit runs out. Needs --api-sock.
    #[arg(long, requires = "api_sock")]
    pub require_permit: bool,
}

/// `key=value` and bare words of a device spec, in order.
fn spec_words(spec: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    spec.split(',').filter(|w| !w.is_empty()).map(|w| match w.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (w, None),
    })
}

/// Limits of a device spec: the words with `prefix` (`bw=...` for a disk, `rx_bw=...` for
/// a network interface), without it, as the rate limiter's syntax.
fn limits(spec: &str, prefix: &str) -> Result<RateLimiterConfig, String> {
    let words: Vec<String> = spec_words(spec)
        .filter_map(|(key, value)| Some(format!("{}={}", key.strip_prefix(prefix)?, value?)))
        .filter(|w| LIMIT_KEYS.iter().any(|k| w.starts_with(&format!("{k}="))))
        .collect();
    if words.is_empty() {
        return Ok(RateLimiterConfig::default());
    }
    parse_rate_limiter(&words.join(",")).map_err(|e| e.to_string())
}

const LIMIT_KEYS: [&str; 4] = ["bw", "ops", "bw_burst", "ops_burst"];

fn is_limit_key(key: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| key.strip_prefix(p).is_some_and(|k| LIMIT_KEYS.contains(&k)))
}

/// Parses the `--rng` limits (empty: no limits).
pub fn parse_rng(spec: &str) -> Result<RateLimiterConfig, String> {
    if let Some((key, _)) = spec_words(spec).find(|(key, _)| !is_limit_key(key, &[""])) {
        return Err(format!("unknown rng setting {key:?}; expected bw=, ops=, bw_burst=, ops_burst="));
    }
    limits(spec, "")
}

/// Parses `path=FILE[,ro][,id=ID]` and limits.
pub fn parse_disk(spec: &str) -> Result<BlockConfig, String> {
    let mut disk = BlockConfig { path: PathBuf::new(), read_only: false, id: None, limits: limits(spec, "")? };
    for (key, value) in spec_words(spec) {
        match (key, value) {
            (key, Some(_)) if is_limit_key(key, &[""]) => {}
            ("path", Some(p)) => disk.path = PathBuf::from(p),
            ("ro", None) => disk.read_only = true,
            ("id", Some(id)) if id.len() <= ID_BYTES => disk.id = Some(id.to_string()),
            ("id", Some(_)) => return Err(format!("a disk id is at most {ID_BYTES} bytes")),
            _ => return Err(format!("unknown disk setting {key:?}; expected path=FILE[,ro][,id=ID]")),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("a disk needs path=FILE".into());
    }
    Ok(disk)
}

/// A `--net` argument: the interface, and whether its tap may be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    pub config: NetConfig,
    pub create: bool,
}

/// Parses `tap=NAME[,mac=MAC][,create]` and rx_/tx_ limits.
pub fn parse_net(spec: &str) -> Result<NetArg, String> {
    let mut net =
        NetConfig { tap: String::new(), mac: None, rx_limits: limits(spec, "rx_")?, tx_limits: limits(spec, "tx_")? };
    let mut create = false;
    for (key, value) in spec_words(spec) {
        match (key, value) {
            ("create", None) => create = true,
            (key, Some(_)) if is_limit_key(key, &["rx_", "tx_"]) => {}
            ("tap", Some(t)) if !t.is_empty() && t.len() <= TAP_NAME_MAX => net.tap = t.to_string(),
            ("tap", Some(_)) => return Err(format!("a tap name is 1 to {TAP_NAME_MAX} bytes")),
            ("mac", Some(m)) => {
                net.mac =
                    Some(parse_mac(m).ok_or_else(|| format!("{m:?} is not a MAC address like 52:54:00:12:34:56"))?)
            }
            _ => return Err(format!("unknown net setting {key:?}; expected tap=NAME[,mac=MAC][,create]")),
        }
    }
    if net.tap.is_empty() {
        return Err("a network interface needs tap=NAME".into());
    }
    Ok(NetArg { config: net, create })
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

/// What a restored or received VM takes from this host rather than from its saved state.
#[derive(Debug, Clone, Default)]
pub struct HostSide {
    pub api_sock: Option<PathBuf>,
    pub serial_file: Option<PathBuf>,
    pub require_permit: bool,
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
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    /// Taps that may be created if missing (`--net ...,create`); none on restore.
    pub create_taps: Vec<String>,
    /// Run only under a run permit (`crate::permit`).
    pub require_permit: bool,
    /// The entropy device and its limits, if there is one.
    pub rng: Option<RateLimiterConfig>,
}

impl VmConfig {
    /// How network interface `net` opens its tap.
    pub fn tap_mode(&self, net: &NetConfig) -> TapMode {
        if self.create_taps.contains(&net.tap) { TapMode::CreateIfMissing } else { TapMode::Existing }
    }
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
    #[error("{0} virtio devices are more than the {VIRTIO_MMIO_SLOTS} this VM has slots for")]
    TooManyDevices(usize),
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

fn check_shape(vcpus: u8, mem_mib: u64) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ConfigError::Vcpus(vcpus));
    }
    if mem_mib < MIN_MEM_MIB {
        return Err(ConfigError::MemTooSmall(mem_mib));
    }
    let host_mib = host_memory_bytes().map(|b| b >> 20).unwrap_or(u64::MAX);
    if mem_mib > host_mib {
        return Err(ConfigError::MemTooLarge { wanted: mem_mib, host: host_mib });
    }
    Ok(())
}

impl VmConfig {
    /// The configuration of a VM restored from a snapshot: its saved shape and devices.
    pub fn from_spec(spec: &MachineSpec, host: HostSide) -> Self {
        VmConfig {
            kernel: KernelSource::File(PathBuf::from(&spec.kernel)),
            initrd: None,
            cmdline: String::new(),
            mem_mib: spec.mem_mib,
            vcpus: spec.vcpus,
            api_sock: host.api_sock,
            serial_file: host.serial_file,
            disks: spec.disks.clone(),
            nets: spec.nets.clone(),
            create_taps: Vec::new(),
            require_permit: host.require_permit,
            rng: spec.rng,
        }
    }

    /// Checks a saved machine (from a snapshot file or a migration: untrusted bytes) as
    /// the command line's values are checked: shape, host memory, disk images here.
    pub fn check_spec(spec: &MachineSpec) -> Result<(), ConfigError> {
        check_shape(spec.vcpus, spec.mem_mib)?;
        for disk in &spec.disks {
            check_file("disk image", &disk.path)?;
        }
        let devices = spec.disks.len() + spec.nets.len() + usize::from(spec.rng.is_some());
        if devices > VIRTIO_MMIO_SLOTS {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(())
    }

    pub fn from_args(args: &VmArgs) -> Result<Self, ConfigError> {
        check_shape(args.vcpus, args.mem)?;
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
        for disk in &args.disks {
            check_file("disk image", &disk.path)?;
        }
        let devices = args.disks.len() + args.nets.len() + usize::from(args.rng.is_some());
        if devices > VIRTIO_MMIO_SLOTS {
            return Err(ConfigError::TooManyDevices(devices));
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
            disks: args.disks.clone(),
            nets: args.nets.iter().map(|n| n.config.clone()).collect(),
            create_taps: args.nets.iter().filter(|n| n.create).map(|n| n.config.tap.clone()).collect(),
            require_permit: args.require_permit,
            rng: args.rng,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> VmArgs {
        VmArgs {
            kernel: None,
            initrd: None,
            cmdline: None,
            mem: 64,
            vcpus: 1,
            api_sock: None,
            serial_file: None,
            disks: vec![],
            nets: vec![],
            rng: None,
            require_permit: false,
        }
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
    fn test_parse_disk_and_net_specs() {
        let limited = parse_rate_limiter("bw=1048576,ops=100").unwrap();
        assert_eq!(
            parse_disk("path=/d.img,ro,id=root,bw=1048576,ops=100"),
            Ok(BlockConfig { path: "/d.img".into(), read_only: true, id: Some("root".into()), limits: limited })
        );
        assert_eq!(
            parse_net("tap=tap0,mac=52:54:00:00:00:01,tx_bw=1048576,tx_ops=100"),
            Ok(NetArg {
                config: NetConfig {
                    tap: "tap0".into(),
                    mac: Some([0x52, 0x54, 0, 0, 0, 1]),
                    rx_limits: RateLimiterConfig::default(),
                    tx_limits: limited
                },
                create: false
            })
        );
        assert_eq!(parse_net("tap=t1,create").map(|n| (n.config.tap, n.create)), Ok(("t1".into(), true)));
        assert_eq!(parse_rng(""), Ok(RateLimiterConfig::default()));
        assert_eq!(parse_rng("bw=1048576,ops=100"), Ok(limited));
        assert!(parse_rng("tap=x").is_err());
        assert!(parse_disk("path=/d,bw=fast").is_err());
        for bad in ["", "ro", "path=/d,id=123456789012345678901", "path=/d,rw", "file=/d"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        for bad in
            ["", "mac=52:54:00:00:00:01", "tap=", "tap=a-much-too-long-tap-name", "tap=t,mac=xyz", "tap=t,queues=2"]
        {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_config_rejects_more_memory_than_the_host_has() {
        let err = VmConfig::from_args(&VmArgs { mem: u64::MAX >> 21, ..args() }).unwrap_err();
        assert!(matches!(err, ConfigError::MemTooLarge { .. }), "{err}");
    }
}
