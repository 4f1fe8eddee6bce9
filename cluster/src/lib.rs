//! The HA control plane on the cluster store (`docs/ha.md`): the cluster's records, the
//! lease and fencing times, and the host's keeper. The daemon's leader logic builds on these.

pub mod election;
pub mod events;
pub mod keeper;
pub mod process;
pub mod records;
pub mod steady;
pub mod timing;
