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

/// Three namespaces for three etcd members, each with two links: one to the root
/// namespace, where the members' clients reach them (`Link`), and one to a bridge in a
/// namespace of its own, where the members reach each other on 10.78.0.0/24. Cutting a
/// member's bridge port cuts it off from its peers and leaves it to its clients.
pub struct EtcdApart {
    pub clients: Vec<Link>,
    hub: String,
    /// The bridge's port of each member.
    ports: Vec<String>,
}

impl EtcdApart {
    /// `first_octet`: the client links are on 10.77.`first_octet + i`.0/24.
    pub fn new(first_octet: u8) -> Result<EtcdApart, String> {
        let pid = std::process::id();
        let hub = format!("novacron-{pid}-eh");
        run("ip", &["netns", "add", &hub])?;
        let mut apart = EtcdApart { clients: Vec::new(), hub: hub.clone(), ports: Vec::new() };
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..3u8 {
            let link = Link::new(&format!("e{i}"), first_octet + i)?;
            let (member_if, port) = (format!("nvp{pid}e{i}"), format!("nvb{pid}e{i}"));
            let ns = link.ns.clone();
            apart.clients.push(link);
            run(
                "ip",
                &["link", "add", &member_if, "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &hub],
            )?;
            apart.ports.push(port.clone());
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", Self::peer_ip(i)), "dev", &member_if])?;
            run("ip", &["-n", &ns, "link", "set", &member_if, "up"])?;
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0"])?;
            run("ip", &["-n", &hub, "link", "set", &port, "up"])?;
        }
        Ok(apart)
    }

    fn peer_ip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, 0, 2 + i)
    }

    pub fn places(&self) -> Vec<novacron_store::testing::MemberPlace> {
        (0..self.clients.len())
            .map(|i| novacron_store::testing::MemberPlace {
                netns: self.clients[i].ns.clone(),
                client_ip: self.clients[i].ns_ip,
                peer_ip: Self::peer_ip(i as u8),
            })
            .collect()
    }

    /// Cuts member `i` off from its peers (`cut`) or joins it to them again.
    pub fn cut_peers(&self, i: usize, cut: bool) -> Result<(), String> {
        run("ip", &["-n", &self.hub, "link", "set", &self.ports[i], if cut { "down" } else { "up" }])
    }
}

impl Drop for EtcdApart {
    fn drop(&mut self) {
        // The bridge's ports go with it, and their peers in the members' namespaces.
        let _ = run("ip", &["netns", "del", &self.hub]);
    }
}
