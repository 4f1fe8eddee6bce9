//! What a VM is, as the actors take it: checked before anything is started.

use crate::supervisor::policy::RestartPolicy;
use novacron_vmm::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use novacron_vmm::boot::loader::MAX_KERNEL_SIZE;
use novacron_vmm::boot::{LoadError, load_kernel};
use novacron_vmm::config::{MAX_VCPUS, MIN_MEM_MIB};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Longest VM name: a DNS label, so names can become host names and file names as they are.
pub const MAX_NAME_LEN: usize = 63;
/// Largest guest memory accepted (1 TiB); the host's own capacity is checked on admission.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most groups, host labels, affinity or anti-affinity entries a VM may carry (each).
pub const MAX_RULES: usize = 16;

/// Where a cluster may put the VM; the rules are explained in `placement.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PlacementRules {
    /// The VM's own groups (`app=web`), which other VMs' (anti-)affinity refers to.
    pub groups: Vec<String>,
    /// Labels its host must carry (`zone=a`).
    pub host_labels: BTreeMap<String, String>,
    /// Groups its host must already hold a VM of.
    pub affinity: Vec<String>,
    /// Groups its host must hold no VM of.
    pub anti_affinity: Vec<String>,
}

impl PlacementRules {
    fn validate(&self) -> Result<(), SpecError> {
        let labels = self.host_labels.iter().flat_map(|(k, v)| [k, v]);
        let all = self.groups.iter().chain(&self.affinity).chain(&self.anti_affinity).chain(labels);
        for word in all {
            validate_word(word)?;
        }
        for (what, n) in [
            ("groups", self.groups.len()),
            ("host labels", self.host_labels.len()),
            ("affinity groups", self.affinity.len()),
            ("anti-affinity groups", self.anti_affinity.len()),
        ] {
            if n > MAX_RULES {
                return Err(SpecError::TooManyRules { what, n });
            }
        }
        Ok(())
    }
}

/// A group, label key or label value: 1 to 63 of `a-z 0-9 - _ . / =`.
fn validate_word(word: &str) -> Result<(), SpecError> {
    let ok = (1..=MAX_NAME_LEN).contains(&word.len())
        && word.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./=".contains(&b));
    if ok { Ok(()) } else { Err(SpecError::Rule(word.to_string())) }
}

/// One VM as its supervisor runs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`.
    pub name: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// A kernel to boot; `None` boots the bundled test guest.
    pub kernel: Option<PathBuf>,
    /// The kernel command line (for the test guest: its workload); empty for none.
    pub cmdline: String,
    /// Where the serial console goes; `None`: `<runtime dir>/<name>.serial`.
    pub serial_log: Option<PathBuf>,
    pub restart: RestartPolicy,
    pub placement: PlacementRules,
}

impl VmSpec {
    /// A test-guest VM with the on-failure defaults and no command line.
    pub fn new(name: impl Into<String>, vcpus: u8, mem_mib: u64) -> Self {
        VmSpec {
            name: name.into(),
            vcpus,
            mem_mib,
            kernel: None,
            cmdline: String::new(),
            serial_log: None,
            restart: RestartPolicy::on_failure(),
            placement: PlacementRules::default(),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(SpecError::Vcpus { vcpus: self.vcpus, max: MAX_VCPUS });
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(SpecError::Memory { mem_mib: self.mem_mib, min: MIN_MEM_MIB, max: MAX_MEM_MIB });
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(SpecError::Cmdline { len: self.cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
        }
        if let Some(at) = self.cmdline.bytes().position(|b| b == 0) {
            return Err(SpecError::CmdlineNul { at });
        }
        if let Some(kernel) = &self.kernel
            && !kernel.is_file()
        {
            return Err(SpecError::Kernel(kernel.clone()));
        }
        if let RestartPolicy::OnFailure { max_restarts, window, .. } = self.restart
            && (max_restarts == 0 || window.is_zero())
        {
            return Err(SpecError::Policy);
        }
        self.placement.validate()
    }

    /// Checks that the kernel file is one the VMM can boot in this VM, by loading it as the
    /// VMM would (into a scratch guest memory of the VM's size: pages are only touched
    /// where the kernel goes). It reads the whole file: call it off the async threads. The
    /// error says what kind of file it is not, never its bytes (the daemon may read files
    /// the caller cannot).
    pub fn check_kernel(&self) -> Result<(), SpecError> {
        let Some(path) = &self.kernel else { return Ok(()) };
        let unusable = |reason: String| SpecError::KernelUnusable { path: path.clone(), reason };
        let len = std::fs::metadata(path).map_err(|e| unusable(e.to_string()))?.len();
        if len > MAX_KERNEL_SIZE {
            return Err(unusable(format!(
                "it is {} MiB, more than the {} MiB a kernel may be",
                len >> 20,
                MAX_KERNEL_SIZE >> 20
            )));
        }
        let image = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
        let memory =
            novacron_vmm::vstate::memory::create(self.mem_mib << 20).map_err(|e| unusable(crate::error_chain(&e)))?;
        match load_kernel(&memory, &image) {
            Ok(_) => Ok(()),
            Err(LoadError::NotAKernel(_)) => Err(SpecError::NotAKernel(path.clone())),
            Err(e) => Err(unusable(e.to_string())),
        }
    }
}

/// Checks a VM name (see [`VmSpec::name`]).
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let bad = |why: &'static str| SpecError::Name { name: name.to_string(), why };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad("it must be 1 to 63 characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(bad("only a-z, 0-9 and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("it must not start or end with '-'"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid VM name {name:?}: {why}")]
    Name { name: String, why: &'static str },
    #[error("a VM has 1 to {max} vCPUs, not {vcpus}")]
    Vcpus { vcpus: u8, max: u8 },
    #[error("a VM has {min} to {max} MiB of memory, not {mem_mib}")]
    Memory { mem_mib: u64, min: u64, max: u64 },
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    Cmdline { len: usize, max: usize },
    #[error("the kernel command line has a NUL byte (at byte {at}); the kernel would see only what comes before it")]
    CmdlineNul { at: usize },
    #[error("kernel {0} is not a file; give an existing kernel path or none for the test guest")]
    Kernel(PathBuf),
    #[error("kernel {0} is not a kernel: give an ELF (vmlinux or PVH) or a Linux bzImage, or none for the test guest")]
    NotAKernel(PathBuf),
    #[error("kernel {path} cannot be booted: {reason}")]
    KernelUnusable { path: PathBuf, reason: String },
    #[error(
        "an on-failure restart policy needs max_restarts of at least 1 and a window longer than 0 (use `never` for no restarts)"
    )]
    Policy,
    #[error("placement rule {0:?} is not valid: use 1 to 63 of a-z, 0-9, '-', '_', '.', '/', '=' (e.g. app=web)")]
    Rule(String),
    #[error("a VM may have at most 16 {what}, not {n}")]
    TooManyRules { what: &'static str, n: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_good_spec_passes() {
        assert_eq!(VmSpec::new("web-1", 2, 128).validate(), Ok(()));
        assert_eq!(VmSpec::new("a".repeat(63), 1, MIN_MEM_MIB).validate(), Ok(()));
    }

    #[test]
    fn test_validate_bad_names_are_refused() {
        for name in ["", "Web", "web_1", "-web", "web-", "wéb", "a b", &"a".repeat(64)] {
            let err = VmSpec::new(name, 1, 64).validate();
            assert!(matches!(err, Err(SpecError::Name { .. })), "{name:?}: {err:?}");
        }
    }

    #[test]
    fn test_validate_sizes_out_of_range_are_refused() {
        assert!(matches!(VmSpec::new("vm", 0, 64).validate(), Err(SpecError::Vcpus { .. })));
        assert!(matches!(VmSpec::new("vm", MAX_VCPUS + 1, 64).validate(), Err(SpecError::Vcpus { .. })));
        assert!(matches!(VmSpec::new("vm", 1, MIN_MEM_MIB - 1).validate(), Err(SpecError::Memory { .. })));
        assert!(matches!(VmSpec::new("vm", 1, MAX_MEM_MIB + 1).validate(), Err(SpecError::Memory { .. })));
    }

    #[test]
    fn test_validate_missing_kernel_and_long_cmdline_are_refused() {
        let mut spec = VmSpec::new("vm", 1, 64);
        spec.kernel = Some(PathBuf::from("/nonexistent/vmlinux"));
        let missing = spec.validate();
        let mut spec = VmSpec::new("vm", 1, 64);
        spec.cmdline = "x".repeat(CMDLINE_MAX_SIZE);
        let long = spec.validate();

        assert!(matches!(missing, Err(SpecError::Kernel(_))));
        assert!(matches!(long, Err(SpecError::Cmdline { .. })));
    }

    #[test]
    fn test_validate_placement_rules_are_words_and_bounded() {
        let mut spec = VmSpec::new("vm", 1, 64);
        spec.placement.groups = vec!["app=web".into()];
        spec.placement.host_labels.insert("zone".into(), "a".into());
        assert_eq!(spec.validate(), Ok(()));
        spec.placement.anti_affinity = vec!["App Web".into()];
        assert_eq!(spec.validate(), Err(SpecError::Rule("App Web".into())));
        spec.placement.anti_affinity = (0..17).map(|i| format!("g{i}")).collect();
        assert!(matches!(spec.validate(), Err(SpecError::TooManyRules { n: 17, .. })));
    }

    #[test]
    fn test_validate_nul_in_cmdline_is_refused_with_its_place() {
        let mut spec = VmSpec::new("vm", 1, 64);
        spec.cmdline = "console=ttyS0\0init=/evil".into();
        assert_eq!(spec.validate(), Err(SpecError::CmdlineNul { at: 13 }));
    }

    #[test]
    fn test_check_kernel_accepts_the_test_guest_and_refuses_other_files_without_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("guest.elf");
        std::fs::write(&guest, novacron_guest_image::ELF).unwrap();
        let text = dir.path().join("secret.txt");
        std::fs::write(&text, "hello world, a secret").unwrap();
        let mut spec = VmSpec::new("vm", 1, 32);

        spec.kernel = Some(guest);
        let good = spec.check_kernel();
        spec.kernel = Some(text.clone());
        let bad = spec.check_kernel().unwrap_err();

        assert_eq!(good, Ok(()));
        assert_eq!(bad, SpecError::NotAKernel(text));
        assert!(!bad.to_string().contains("68 65"), "no bytes of the file: {bad}");
        assert_eq!(VmSpec::new("vm", 1, 32).check_kernel(), Ok(()), "the bundled test guest");
    }
}
