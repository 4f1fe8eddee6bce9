//! Supervisor actors (ractor): VmSupervisor, HostSupervisor, ClusterSupervisor, and the
//! gRPC control port (the supervision issue). Empty until that issue: the VMM process and
//! its control socket (`novacron-vmm`) are what these actors will own.
