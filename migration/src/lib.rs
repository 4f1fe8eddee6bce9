//! Snapshots and live migration.
//!
//! - [`stream`]: the state stream format: a header and checksummed, versioned sections.
//!   A snapshot's `state.bin` is one; a migration will send the same sections after memory.
//!
//! The VMM (`novacron-vmm`) captures and restores the state that goes into sections; this
//! crate owns the formats and (next) the pre-copy engine and its QUIC transport.

pub mod stream;
