//! The NovaCron micro-VMM: one KVM guest per process.
//!
//! A walk through it (see also `docs/ARCHITECTURE.md`): [`process::run_vm`] checks the
//! [`config`], [`builder::build`] creates the KVM VM ([`vstate`]), maps guest memory, loads
//! the kernel ([`boot`]), writes the firmware tables ([`arch`]), wires the legacy devices
//! and starts one thread per vCPU ([`vstate::vcpu`]); [`runtime::run`] then waits on the
//! guest's stop requests, signals and the control socket ([`api`]) until the VM ends.

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod disk_locks;
pub mod machine;
pub mod migrate;
pub mod permit;
pub mod process;
pub mod runtime;
pub mod snapshot;
pub mod virtio;
pub mod vstate;
