//! A network namespace joined to the root namespace by a veth pair, for the tests that cut
//! or shape a link (`wan.rs`, `ha.rs`). Dropping it deletes both (also on panic: declare it
//! before the processes that run in it, so that it goes last).

use super::stderr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Runs `prog args`, turning a failure into its stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<(), String> {
    let out =
        Command::new(prog).args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{prog} {}` failed ({}): {}", args.join(" "), out.status, stderr(&out).trim()))
    }
}

/// A namespace and its veth pair on 10.77.`octet`.0/24: the namespace's end is .2, the
/// root's .1.
pub struct Link {
    pub ns: String,
    /// The veth end in the root namespace.
    pub root_if: String,
    /// The veth end in the namespace.
    pub ns_if: String,
    pub root_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl Link {
    /// Makes it; `tag` tells the links of one process apart in their names, the pid tells
    /// processes apart.
    pub fn new(tag: &str, octet: u8) -> Result<Link, String> {
        let pid = std::process::id();
        let link = Link {
            ns: format!("novacron-{pid}-{tag}"),
            root_if: format!("nvr{pid}{tag}"),
            ns_if: format!("nvn{pid}{tag}"),
            root_ip: Ipv4Addr::new(10, 77, octet, 1),
            ns_ip: Ipv4Addr::new(10, 77, octet, 2),
        };
        // From here on, Drop cleans up whatever part was made.
        let (root_cidr, ns_cidr) = (format!("{}/24", link.root_ip), format!("{}/24", link.ns_ip));
        run("ip", &["netns", "add", &link.ns])?;
        run("ip", &["-n", &link.ns, "link", "set", "lo", "up"])?;
        run("ip", &["link", "add", &link.root_if, "type", "veth", "peer", "name", &link.ns_if, "netns", &link.ns])?;
        run("ip", &["addr", "add", &root_cidr, "dev", &link.root_if])?;
        run("ip", &["link", "set", &link.root_if, "up"])?;
        run("ip", &["-n", &link.ns, "addr", "add", &ns_cidr, "dev", &link.ns_if])?;
        run("ip", &["-n", &link.ns, "link", "set", &link.ns_if, "up"])?;
        Ok(link)
    }

    /// Cuts the link (`up` false: the root's end down) or heals it.
    pub fn set_up(&self, up: bool) -> Result<(), String> {
        run("ip", &["link", "set", &self.root_if, if up { "up" } else { "down" }])
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.ns]);
        // The kernel destroys the namespace's links asynchronously; do not leave the root's
        // end behind meanwhile.
        let _ = run("ip", &["link", "del", &self.root_if]);
    }
}
