//! VMM processes for the migration tests: a VM with a control socket, a receiver, and
//! `vmm migrate` between them.

use super::{Host, TIMEOUT, novacron};
use novacron_guest_image::watch::Watched;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A port on loopback free for both UDP and TCP (the receiver binds both right after).
pub fn free_addr() -> String {
    let ip = std::net::Ipv4Addr::LOCALHOST.into();
    format!("127.0.0.1:{}", novacron_migration::transport::free_port(ip).unwrap())
}

/// `novacron vmm run ARGS` with the test guest and control socket `dir/NAME.sock`; waits
/// for two verdicts.
pub fn vm(dir: &Path, name: &str, args: &[&str], cmdline: &str) -> Host {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = novacron();
    cmd.args(["vmm", "run"]).args(args).args(["--cmdline", cmdline]).arg("--api-sock").arg(&sock);
    let mut vm = Watched::spawn(cmd).unwrap();
    vm.wait_verified(2, TIMEOUT).unwrap();
    Host { vm, sock }
}

/// A source VM of `vcpus` and `mem` MiB, with control socket `dir/src.sock`.
pub fn source(dir: &Path, vcpus: u8, mem: u64, cmdline: &str) -> Host {
    vm(dir, "src", &["--vcpus", &vcpus.to_string(), "--mem", &mem.to_string()], cmdline)
}

/// `novacron vmm receive` on a free port with control socket `dir/dst.sock`.
pub fn receiver(dir: &Path, tls: &Path, extra: &[&str]) -> (Host, String) {
    receiver_named(dir, "dst", tls, extra)
}

/// `novacron vmm receive` on a free port; returns once it listens (its control socket,
/// `dir/NAME.sock`, is bound right after the listener). The port is chosen free, but
/// another test's connection may take it meanwhile: then it tries another.
pub fn receiver_named(dir: &Path, name: &str, tls: &Path, extra: &[&str]) -> (Host, String) {
    let sock = dir.join(format!("{name}.sock"));
    for _ in 0..5 {
        let addr = free_addr();
        let mut cmd = novacron();
        cmd.args(["vmm", "receive", "--listen", &addr]).arg("--tls-dir").arg(tls).arg("--api-sock").arg(&sock);
        cmd.args(extra);
        let mut vm = Watched::spawn(cmd).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !sock.exists() {
            if vm.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "the receiver never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        if sock.exists() {
            return (Host { vm, sock }, addr);
        }
        let (status, err) = vm.wait_exit(TIMEOUT).unwrap();
        assert!(err.contains("cannot listen"), "the receiver ended with {status}: {err}");
    }
    panic!("no free port for the receiver in 5 tries");
}

pub fn migrate_cmd(src: &Host, addr: &str, tls: &Path, extra: &[&str]) -> Command {
    let mut cmd = novacron();
    cmd.args(["vmm", "migrate", "--to", addr, "--json"]).arg("--api-sock").arg(&src.sock).arg("--tls-dir").arg(tls);
    cmd.args(extra);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

pub fn migrate(src: &Host, addr: &str, tls: &Path, extra: &[&str]) -> Output {
    migrate_cmd(src, addr, tls, extra).output().unwrap()
}

/// The JSON report of a migration that moved the VM.
pub fn report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    json_report(out)
}

/// The JSON report printed on stdout, whatever the exit status.
pub fn json_report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not a JSON report ({e}): {stdout}"))
}

/// A link too slow for the guest's writes: pages go whole (no compression, no deltas) at
/// 2 MB/s, about 500 pages/s, while the guest writes 2000 pages/s of a 1024-page working
/// set; no round can shrink below the whole working set.
pub const OUTRUN: [&str; 10] = [
    "--max-bandwidth",
    "2M",
    "--downtime-ms",
    "20",
    "--compress",
    "none",
    "--delta-cache",
    "0",
    "--auto-converge",
    "off",
];
