//! CPUID for a vCPU: what KVM supports, filtered and normalised the way Firecracker and
//! Cloud Hypervisor do it.
//!
//! - Topology: `n` vCPUs are `n` cores of one socket with one thread each; APIC ID = index.
//!   Leaves 0x1, 0x4, 0xB/0x1F, 0x80000008 say so consistently.
//! - Hidden: nested virtualisation (VMX/SVM: this host cannot save nested state, so such a
//!   VM could not be snapshotted or migrated), the PMU (leaf 0xA: its MSRs are not saved),
//!   AMD's TOPOEXT (its leaves 0x8000001D/1E would have to describe the topology again),
//!   and power-management features the VMM does not emulate (turbo, EPB).
//! - Added: the hypervisor bit, so that guests know they run in a VM.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_THERMAL: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_SVM: u32 = 1 << 2;
const ECX_CMP_LEGACY: u32 = 1 << 1;
const ECX_TOPOEXT: u32 = 1 << 22;
const EAX_TURBO: u32 = 1 << 1;
const ECX_EPB: u32 = 1 << 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM reported no CPUID leaf 0: cannot tell the CPU vendor")]
    NoVendorLeaf,
    #[error("could not build the CPUID table: {0}")]
    Build(String),
}

fn vendor_of(entries: &[kvm_cpuid_entry2]) -> Result<Vendor, CpuidError> {
    let e = entries.iter().find(|e| e.function == LEAF_VENDOR).ok_or(CpuidError::NoVendorLeaf)?;
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&e.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&e.edx.to_le_bytes());
    name[8..].copy_from_slice(&e.ecx.to_le_bytes());
    Ok(match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    })
}

/// Bits needed to number `count` things (the APIC-ID shift of a topology level).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

fn topology_entry(function: u32, index: u32, cpu_index: u32, cpu_count: u32) -> kvm_cpuid_entry2 {
    // Level 0: SMT, one thread per core. Level 1: cores in the package. Then: none.
    let (eax, ebx, level_type) = match index {
        0 => (0, 1, 1),
        1 => (id_bits(cpu_count), cpu_count, 2),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: cpu_index,
        ..Default::default()
    }
}

/// The CPUID table of vCPU `cpu_index` out of `cpu_count`, from KVM's supported table.
pub fn vcpu_cpuid(supported: &CpuId, cpu_index: u8, cpu_count: u8) -> Result<CpuId, CpuidError> {
    let (index, count) = (u32::from(cpu_index), u32::from(cpu_count));
    let vendor = vendor_of(supported.as_slice())?;
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 4);
    let mut has_topology_v2 = false;

    for &entry in supported.as_slice() {
        let mut e = entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (count << 16) | (index << 24);
                e.ecx = (e.ecx & !ECX_VMX) | ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL if vendor == Vendor::Intel => {
                let cache_level = (e.eax >> 5) & 0x7;
                // Cores per package - 1 in [31:26]; threads sharing this cache - 1 in [25:14]:
                // each core's own L1/L2, the whole package's L3.
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            LEAF_THERMAL => {
                e.eax &= !EAX_TURBO;
                e.ecx &= !ECX_EPB;
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY => continue,
            LEAF_TOPOLOGY_V2 => {
                has_topology_v2 = true;
                continue;
            }
            LEAF_EXT_FEATURES => {
                e.ecx &= !(ECX_SVM | ECX_TOPOEXT);
                if vendor == Vendor::Amd && count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDR_SIZES if vendor == Vendor::Amd => {
                // NC = cores - 1 in [7:0]; ApicIdCoreIdSize in [15:12].
                e.ecx = (e.ecx & !0xf0ff) | (count - 1) | (id_bits(count) << 12);
            }
            LEAF_AMD_CACHE_TOPOLOGY | LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => continue,
            _ => {}
        }
        out.push(e);
    }
    for i in 0..3 {
        out.push(topology_entry(LEAF_TOPOLOGY, i, index, count));
        if has_topology_v2 {
            out.push(topology_entry(LEAF_TOPOLOGY_V2, i, index, count));
        }
    }
    CpuId::from_entries(&out).map_err(|e| CpuidError::Build(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    fn amd_supported() -> CpuId {
        let vendor =
            entry(0, 0, 0x10, u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"cAMD"), u32::from_le_bytes(*b"enti"));
        CpuId::from_entries(&[
            vendor,
            entry(LEAF_FEATURES, 0, 0, 0x0000_0800, ECX_VMX, 0),
            entry(LEAF_PMU, 0, 0x0703_0402, 0, 0, 0x603),
            entry(LEAF_EXT_FEATURES, 0, 0, 0, ECX_SVM | ECX_TOPOEXT, 0),
            entry(LEAF_EXT_ADDR_SIZES, 0, 0x3030, 0, 0x0000_7007, 0),
            entry(LEAF_AMD_EXT_APIC_ID, 0, 5, 0, 0, 0),
        ])
        .unwrap()
    }

    #[test]
    fn test_vcpu_cpuid_sets_apic_id_count_and_hypervisor_bit() {
        let c = vcpu_cpuid(&amd_supported(), 3, 4).unwrap();

        let leaf1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn test_vcpu_cpuid_hides_nested_virtualisation_pmu_and_topoext() {
        let c = vcpu_cpuid(&amd_supported(), 0, 2).unwrap();

        assert_eq!(find(&c, LEAF_FEATURES, 0).ecx & ECX_VMX, 0);
        assert_eq!(find(&c, LEAF_EXT_FEATURES, 0).ecx & (ECX_SVM | ECX_TOPOEXT), 0);
        assert_eq!(find(&c, LEAF_PMU, 0).eax, 0);
        assert!(!c.as_slice().iter().any(|e| e.function == LEAF_AMD_EXT_APIC_ID));
    }

    #[test]
    fn test_vcpu_cpuid_topology_leaves_describe_cores_of_one_package() {
        let c = vcpu_cpuid(&amd_supported(), 5, 6).unwrap();

        let smt = find(&c, LEAF_TOPOLOGY, 0);
        let core = find(&c, LEAF_TOPOLOGY, 1);
        let end = find(&c, LEAF_TOPOLOGY, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 5));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 6, 2, 5));
        assert_eq!(end.ecx >> 8, 0);
        let amd = find(&c, LEAF_EXT_ADDR_SIZES, 0);
        assert_eq!((amd.ecx & 0xff, (amd.ecx >> 12) & 0xf), (5, 3));
    }

    #[test]
    fn test_vcpu_cpuid_without_vendor_leaf_is_an_error() {
        let supported = CpuId::from_entries(&[entry(LEAF_FEATURES, 0, 0, 0, 0, 0)]).unwrap();
        assert!(matches!(vcpu_cpuid(&supported, 0, 1), Err(CpuidError::NoVendorLeaf)));
    }
}
