//! KVM state: the system handle and its capabilities, guest memory, the VM, the vCPUs,
//! and userfaultfd (memory filled on first touch).

pub mod kvm;
pub mod memory;
pub mod persist;
pub mod uffd;
pub mod vcpu;
pub mod vm;
