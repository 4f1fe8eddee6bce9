//! Snapshots and pre-copy live migration over QUIC (the snapshot/migration issue).
//!
//! This crate's place in the layout is fixed by `docs/ARCHITECTURE.md`; its first code
//! (the state stream format, the pre-copy engine, the QUIC transport) lands with that issue.
