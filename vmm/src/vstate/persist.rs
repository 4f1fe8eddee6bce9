//! What KVM holds of a VM besides its memory: each vCPU's registers, FPU/XSAVE state,
//! XCRs, MSRs, local APIC, pending events, run state and debug registers; the VM's PICs,
//! IOAPIC, PIT and KVM clock. Captured while every vCPU is out of the guest, and put back
//! into a freshly built VM before its vCPUs first run. Nothing here needs KVM's nested
//! virtualisation state (`KVM_CAP_NESTED_STATE` is 0 on this host, and VMX/SVM are hidden
//! from guests), nor a settable TSC frequency.
//!
//! The saved structures are KVM's own, serialised byte for byte (kvm-bindings' serde).

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

pub const VCPU_STATE_VERSION: u16 = 1;
pub const VM_STATE_VERSION: u16 = 1;
/// `kvm_xsave` holds 4 KiB; larger XSAVE areas (AMX) need KVM_GET_XSAVE2.
const XSAVE_BYTES: i32 = 4096;
/// Most MSRs read or written per ioctl.
const MSR_CHUNK: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("this host's XSAVE area needs {0} bytes (AMX); saving it is not supported yet")]
    XsaveTooLarge(i32),
    #[error("KVM took {set} of {total} saved MSRs (the first it refused: {refused:#x})")]
    PartialMsrs { set: usize, total: usize, refused: u32 },
    #[error("cannot build the {0} list")]
    List(&'static str),
    #[error("a saved {what} state has version {found}; this VMM reads {expected}")]
    Version { what: &'static str, found: u16, expected: u16 },
    #[error(
        "the VM was saved on a {saved} CPU and this host's is {host}: a VM moves only between hosts of one CPU \
         vendor"
    )]
    CpuVendor { saved: String, host: String },
    #[error(
        "the saved vCPU holds XSAVE state component {0} in use, which this host's CPU does not have: restore it \
         on a host with the same CPU features"
    )]
    XsaveComponent(u32),
}

/// The CPU vendor (CPUID leaf 0: "GenuineIntel", "AuthenticAMD"), if the list has it.
fn vendor(cpuid: &[kvm_cpuid_entry2]) -> Option<String> {
    let leaf = cpuid.iter().find(|e| e.function == 0 && e.index == 0)?;
    let bytes: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The XSAVE components (XCR0 bits) a CPUID list supports (leaf 0xD's first subleaf); x87
/// and SSE when it does not say.
fn xcr0_of(cpuid: &[kvm_cpuid_entry2]) -> u64 {
    cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0b11, |e| u64::from(e.eax) | (u64::from(e.edx) << 32))
}

/// Where XSTATE_BV (the components an XSAVE area holds) sits in it, in 32-bit words.
const XSTATE_BV_WORD: usize = 512 / 4;

/// The saved XSAVE area, without the components this host's CPU lacks (`supported`:
/// its XCR0 bits) when they hold nothing (their init state, all zeroes, as PKRU at 0 on a
/// host with protection keys). A component that holds something cannot be dropped.
/// Component offsets come from the saved CPUID (leaf 0xD), as the saving host laid it out.
fn fit_xsave(xsave: &kvm_xsave, cpuid: &[kvm_cpuid_entry2], supported: u64) -> Result<kvm_xsave, StateError> {
    let mut fitted = kvm_xsave { region: xsave.region, ..Default::default() };
    let bv = u64::from(xsave.region[XSTATE_BV_WORD]) | (u64::from(xsave.region[XSTATE_BV_WORD + 1]) << 32);
    // x87 and SSE (bits 0 and 1) are on every x86-64 host.
    let foreign = bv & !supported & !0b11;
    for component in (2..64).filter(|c| foreign & (1u64 << c) != 0) {
        let layout = cpuid.iter().find(|e| e.function == 0xd && e.index == component);
        let (size, offset) = layout.map_or((0, 0), |e| (e.eax as usize, e.ebx as usize));
        let words = xsave.region.get(offset / 4..(offset + size) / 4);
        match words {
            Some(w) if size > 0 && offset % 4 == 0 && w.iter().all(|&x| x == 0) => {}
            _ => return Err(StateError::XsaveComponent(component)),
        }
    }
    let kept = bv & !foreign;
    fitted.region[XSTATE_BV_WORD] = kept as u32;
    fitted.region[XSTATE_BV_WORD + 1] = (kept >> 32) as u32;
    Ok(fitted)
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Kvm { what, source })
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub version: u16,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The MSRs worth saving: every one KVM lists for save/restore.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(ioctl("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?.as_slice().to_vec())
}

/// Checks that a plain `kvm_xsave` holds this host's XSAVE area.
pub fn check_xsave_size(vm: &VmFd) -> Result<(), StateError> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if size > XSAVE_BYTES { Err(StateError::XsaveTooLarge(size)) } else { Ok(()) }
}

/// Reads every MSR of `indices` that this vCPU will give: an MSR KVM lists but cannot read
/// (some are write-only or absent on this CPU) is left out rather than failing the save.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut start = 0;
    while start < indices.len() {
        let chunk = &indices[start..(start + MSR_CHUNK).min(indices.len())];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::List("MSR"))?;
        let read = ioctl("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
        saved.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        start += if read >= chunk.len() { chunk.len() } else { read + 1 };
    }
    Ok(saved)
}

impl VcpuState {
    /// Captures a paused vCPU's state. Call after a KVM_RUN with immediate_exit, so that
    /// any I/O the vCPU was in the middle of is complete.
    pub fn capture(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        Ok(VcpuState {
            version: VCPU_STATE_VERSION,
            cpuid: ioctl("KVM_GET_CPUID2", fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES))?.as_slice().to_vec(),
            mp_state: ioctl("KVM_GET_MP_STATE", fd.get_mp_state())?,
            regs: ioctl("KVM_GET_REGS", fd.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", fd.get_sregs())?,
            xsave: ioctl("KVM_GET_XSAVE", fd.get_xsave())?,
            xcrs: ioctl("KVM_GET_XCRS", fd.get_xcrs())?,
            debugregs: ioctl("KVM_GET_DEBUGREGS", fd.get_debug_regs())?,
            lapic: ioctl("KVM_GET_LAPIC", fd.get_lapic())?,
            msrs: read_msrs(fd, msr_indices)?,
            events: ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
        })
    }

    /// Puts the state into a fresh vCPU, in the order KVM needs: CPUID first, the LAPIC
    /// before the MSRs (the TSC deadline depends on it), pending events last.
    /// `host` is what this host's KVM supports (KVM_GET_SUPPORTED_CPUID): the CPU vendor
    /// must be the saving host's, and XSAVE components it lacks must be unused
    /// (`fit_xsave`).
    pub fn restore(&self, fd: &VcpuFd, host: &[kvm_cpuid_entry2]) -> Result<(), StateError> {
        if self.version != VCPU_STATE_VERSION {
            return Err(StateError::Version { what: "vCPU", found: self.version, expected: VCPU_STATE_VERSION });
        }
        if let (Some(saved), Some(host)) = (vendor(&self.cpuid), vendor(host))
            && saved != host
        {
            return Err(StateError::CpuVendor { saved, host });
        }
        let xsave = fit_xsave(&self.xsave, &self.cpuid, xcr0_of(host))?;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::List("CPUID"))?;
        ioctl("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
        ioctl("KVM_SET_MP_STATE", fd.set_mp_state(self.mp_state))?;
        ioctl("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        ioctl("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        // SAFETY: `check_xsave_size` made sure this host's XSAVE area fits the 4 KiB of
        // `kvm_xsave`, so KVM reads no further than the struct we pass.
        ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&xsave) })?;
        ioctl("KVM_SET_XCRS", fd.set_xcrs(&self.xcrs))?;
        ioctl("KVM_SET_DEBUGREGS", fd.set_debug_regs(&self.debugregs))?;
        ioctl("KVM_SET_LAPIC", fd.set_lapic(&self.lapic))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::List("MSR"))?;
            let set = ioctl("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
            if set != chunk.len() {
                return Err(StateError::PartialMsrs { set, total: chunk.len(), refused: chunk[set].index });
            }
        }
        ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.events))
    }
}

/// The VM's interrupt controllers, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub version: u16,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    ioctl("KVM_GET_IRQCHIP", vm.get_irqchip(&mut chip))?;
    Ok(chip)
}

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        Ok(VmState {
            version: VM_STATE_VERSION,
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: ioctl("KVM_GET_PIT2", vm.get_pit2())?,
            clock: ioctl("KVM_GET_CLOCK", vm.get_clock())?,
        })
    }

    /// Puts the state into a VM whose irqchip and PIT exist and whose vCPUs have not run.
    /// The KVM clock goes back to where it was: to the guest no time passed in between.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        if self.version != VM_STATE_VERSION {
            return Err(StateError::Version { what: "VM", found: self.version, expected: VM_STATE_VERSION });
        }
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        ioctl("KVM_SET_PIT2", vm.set_pit2(&self.pit))?;
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        ioctl("KVM_SET_CLOCK", vm.set_clock(&clock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    /// CPUID as a host with x87, SSE, AVX and PKRU (component 9: 8 bytes at 2688) says it.
    fn saved_cpuid() -> Vec<kvm_cpuid_entry2> {
        vec![leaf(0xd, 0, 0x207, 0, 0, 0), leaf(0xd, 9, 8, 2688, 0, 0)]
    }

    fn xsave_with(bv: u64) -> kvm_xsave {
        let mut x = kvm_xsave::default();
        x.region[XSTATE_BV_WORD] = bv as u32;
        x.region[XSTATE_BV_WORD + 1] = (bv >> 32) as u32;
        x
    }

    #[test]
    fn an_unused_component_the_host_lacks_is_dropped_and_a_used_one_refused() {
        let cpuid = saved_cpuid();
        // PKRU at its init value (0) on a host without protection keys: dropped.
        let fitted = fit_xsave(&xsave_with(0x207), &cpuid, 0x7).unwrap();
        assert_eq!(fitted.region[XSTATE_BV_WORD], 0x7);
        // A host that has it keeps it.
        assert_eq!(fit_xsave(&xsave_with(0x207), &cpuid, 0x207).unwrap().region[XSTATE_BV_WORD], 0x207);
        // PKRU in use cannot be dropped.
        let mut used = xsave_with(0x207);
        used.region[2688 / 4] = 0x5555_5554;
        assert!(matches!(fit_xsave(&used, &cpuid, 0x7), Err(StateError::XsaveComponent(9))));
        // A component whose layout the saved CPUID does not give is refused too.
        assert!(matches!(fit_xsave(&xsave_with(1 << 17 | 0x3), &cpuid, 0x7), Err(StateError::XsaveComponent(17))));
    }

    #[test]
    fn the_vendor_and_xcr0_come_from_the_cpuid_list() {
        // "AuthenticAMD" in EBX, EDX, ECX.
        let amd =
            leaf(0, 0, 0x10, u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"cAMD"), u32::from_le_bytes(*b"enti"));
        assert_eq!(vendor(&[amd]).as_deref(), Some("AuthenticAMD"));
        assert_eq!(vendor(&[]), None);
        assert_eq!(xcr0_of(&saved_cpuid()), 0x207);
        assert_eq!(xcr0_of(&[]), 0b11);
    }
}
