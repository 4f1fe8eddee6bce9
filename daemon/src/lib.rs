//! The NovaCron host daemon: a [`HostSupervisor`](novacron_actors::HostSupervisor) with its
//! state store, served on a gRPC control port (`proto/novacron.proto`) over TLS.
//!
//! - [`auth`]: the port's TLS (the cluster CA) and who may call it (a client certificate
//!   of the cluster CA, or the daemon's token).
//! - [`client`]: connecting to a daemon (the CLI, tests and benches use it).
//! - [`convert`]: requests checked and turned into the actors' types (fuzzed).
//! - [`listen`]: the port's connections until they authenticate (limited and timed out).
//! - [`run`]: the daemon itself.
//!
//! `docs/daemon.md` describes every call, its errors and the files of a data dir.

pub mod auth;
pub mod client;
mod cluster;
pub mod convert;
mod drain;
pub mod ha;
pub mod listen;
mod migrate;
mod operations;
pub mod run;
mod service;

/// The generated gRPC messages, client and server.
pub mod pb {
    tonic::include_proto!("novacron.v1");
}

pub use novacron_actors::placement::Strategy;
pub use run::{DaemonArgs, DaemonError};
