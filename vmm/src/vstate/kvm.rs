//! Opening /dev/kvm and checking, once at start, that it offers everything a VM needs.

use kvm_ioctls::{Cap, Kvm};

/// What a NovaCron VM needs from KVM, with what each is for.
const REQUIRED: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel interrupt controller"),
    (Cap::UserMemory, "guest memory slots"),
    (Cap::SetTssAddr, "real-mode TSS"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::PitState2, "PIT state save/restore"),
    (Cap::Irqfd, "interrupts from device event fds"),
    (Cap::Ioeventfd, "device notifications"),
    (Cap::ExtCpuid, "CPUID configuration"),
    (Cap::MpState, "vCPU run state save/restore"),
    (Cap::ImmediateExit, "pausing vCPUs without races"),
    (Cap::AdjustClock, "KVM clock save/restore"),
    (Cap::VcpuEvents, "pending exception/interrupt save/restore"),
    (Cap::Xsave, "FPU/AVX state save/restore"),
    (Cap::Xcrs, "XCR0 save/restore"),
    (Cap::SetIdentityMapAddr, "identity-map page placement"),
];

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled in the kernel, and may this user open /dev/kvm?)")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("this KVM lacks {what} (capability {cap:?}); NovaCron needs it")]
    MissingCapability { cap: Cap, what: &'static str },
    #[error("KVM cannot run {wanted} vCPUs (at most {max} here)")]
    TooManyVcpus { wanted: u8, max: usize },
}

/// Opens /dev/kvm and checks the API version.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    Ok(kvm)
}

/// Checks every capability a VM of `vcpus` needs (cheap: a few microseconds in all).
pub fn check_capabilities(kvm: &Kvm, vcpus: u8) -> Result<(), KvmError> {
    if let Some(&(cap, what)) = REQUIRED.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
        return Err(KvmError::MissingCapability { cap, what });
    }
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(KvmError::TooManyVcpus { wanted: vcpus, max });
    }
    Ok(())
}
