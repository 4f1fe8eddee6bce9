//! The KVM VM: interrupt controllers, PIT, memory slots, irqfds.

use super::memory::GuestMemory;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed")]
    Create(#[source] kvm_ioctls::Error),
    #[error("KVM setup step '{step}' failed")]
    Setup {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory slot {slot} with KVM")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub fd: VmFd,
}

fn step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { step, source }
}

impl Vm {
    /// Creates the VM. Memory goes in next, before `create_irqchip`: see there.
    pub fn new(kvm: &kvm_ioctls::Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(step("set TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(step("set identity map address"))?;
        Ok(Vm { fd })
    }

    /// The in-kernel IOAPIC/PIC/LAPICs and PIT, as Firecracker has them. Call it after
    /// `register_memory`: once the PIT exists, each memory slot change waits for a full SRCU
    /// grace period (measured here: 8 ms for the first slot instead of 0.1 ms), which would
    /// be most of the time to boot.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(step("create irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(step("create PIT"))
    }

    /// One KVM slot per guest memory region, in order.
    pub fn register_memory(&self, memory: &GuestMemory) -> Result<(), VmError> {
        self.set_memory_slots(memory, 0)
    }

    /// Turns KVM's dirty page log of every memory slot on or off (for migration).
    pub fn set_dirty_logging(&self, memory: &GuestMemory, on: bool) -> Result<(), VmError> {
        self.set_memory_slots(memory, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// The pages of slot `slot` (`bytes` long) written since the last call, one bit per
    /// page; KVM clears its log as it answers.
    pub fn dirty_log(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, VmError> {
        self.fd.get_dirty_log(slot, bytes as usize).map_err(step("get dirty log"))
    }

    fn set_memory_slots(&self, memory: &GuestMemory, flags: u32) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let mr = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `memory`,
            // which outlives the VM (the Machine drops the VM fd and vCPUs first).
            unsafe { self.fd.set_user_memory_region(mr) }.map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Makes `evt` raise interrupt line `gsi` whenever it is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(step("register irqfd"))
    }
}
