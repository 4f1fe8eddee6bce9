//! Live migration, the VMM's side: the pre-copy engine (`novacron_migration`) moves pages
//! and decides; this module gives it a real VM to move or to receive into.
//!
//! - [`source`]: a migration thread in the VMM process that reads guest memory and KVM's
//!   dirty log directly, and asks the VMM thread (through a channel and an event fd) to
//!   pause and save, to resume, or to throttle the vCPUs.
//! - [`destination`]: `vmm receive`: takes a VM over the network into fresh memory, builds
//!   it paused, and runs it when the source commits.
//! - [`post_copy`]: the destination's side of a post-copy: the guest runs while its last
//!   pages arrive, and waits on those it touches first.

pub mod destination;
pub mod post_copy;
pub mod source;

use std::path::PathBuf;

/// The TLS directory when none is given: $NOVACRON_TLS_DIR, else ~/.novacron/tls.
pub fn default_tls_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NOVACRON_TLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".novacron").join("tls")
}

/// Resolves `host:port` (a name or an address) to the first socket address.
pub fn resolve(addr: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?} (expected HOST:PORT): {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}
