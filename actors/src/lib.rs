//! Supervisor actors (ractor on tokio) for NovaCron's VMM processes.
//!
//! - [`VmSupervisor`]: one per VM; owns its `novacron-vmm` process and control socket,
//!   restarts it by its [`RestartPolicy`], and can re-adopt a process that is already
//!   running.
//! - [`HostSupervisor`]: one per host; owns the VmSupervisors, the host's capacity and the
//!   admission of VMs, and restarts a failed VmSupervisor in re-adopt mode.
//! - [`store`]: the daemon's state store (redb): VM records, desired state, events.
//!
//! Every message, its reply and its errors, and what restarts what: `docs/actors.md`.

pub mod host;
pub mod placement;
pub mod process;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod vm;

pub use host::{Capacity, EventFeed, HostConfig, HostError, HostInfo, HostMsg, HostSupervisor};
pub use spec::{PlacementRules, SpecError, VmSpec};
pub use supervisor::policy::{Decision, ProcessExit, RestartPolicy, RestartTracker};
pub use vm::{Incoming, VmError, VmInfo, VmMsg, VmPhase, VmSupervisor};

/// An error and its causes on one line: "what failed: because: because".
pub use novacron_vmm::process::error_chain;
