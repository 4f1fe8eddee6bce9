//! Snapshots and live migration: the formats, the codecs, the engines and the transport.
//!
//! - [`stream`]: the state stream: a header and checksummed, versioned sections. A
//!   snapshot's `state.bin` is one, and a migration sends one after memory.
//! - [`page`]: zero detection, content hashes, word-level deltas, the delta cache.
//! - [`digest`]: the incremental memory digest both ends of a migration keep.
//! - [`dirty`]: page sets (a round's dirty pages).
//! - [`encoder`]: the source's per-page work: the cheapest way to send each page.
//! - [`compression`]: which compression (none, zstd-1, zstd-3) each batch gets.
//! - [`protocol`]: the migration's messages and frames.
//! - [`throttle`]: the bandwidth limit.
//! - [`tls`]: the cluster CA, node certificates, mutual-TLS configurations.
//! - [`transport`]: the QUIC link the engines talk over.
//! - [`source`] and [`destination`]: the pre-copy engine's two ends, over traits the VMM
//!   implements for a real VM. The destination is a sans-I/O state machine
//!   (`destination::DestinationMachine`) with a driver around it.
//!
//! The VMM (`novacron-vmm`) captures and restores the state that goes into sections and
//! owns the VM; this crate decides what to send when and checks what arrives.

pub mod compression;
pub mod destination;
pub mod digest;
pub mod dirty;
pub mod encoder;
pub mod page;
pub mod protocol;
pub mod source;
pub mod stream;
pub mod throttle;
pub mod tls;
pub mod transport;

#[cfg(test)]
mod pair_tests;

/// Tests: `len` bytes of xorshift noise from `seed`, which zstd cannot shrink.
#[cfg(test)]
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Why the VMM could not do what an engine asked (pause, read memory, build the VM...),
/// with its causes: the engines keep it as the `#[source]` of their own errors.
pub type VmFault = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("it is not a regular file")]
    NotAFile,
}

/// Opens `path` for reading only if it is a regular file (snapshot and base images are
/// named by users). The open does not block, as it would forever on a FIFO without a
/// writer, and the check is on the opened file, not on the name.
pub fn open_regular(path: &std::path::Path) -> Result<std::fs::File, OpenError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(OpenError::NotAFile);
    }
    Ok(file)
}

/// An error and its causes on one line: "what failed: because: because".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}
