//! KVM state: the system handle and its capabilities, guest memory, the VM, the vCPUs.

pub mod kvm;
pub mod memory;
pub mod persist;
pub mod uffd;
pub mod vcpu;
pub mod vm;
