//! Post-copy between two real VMM processes on loopback, with the test guest writing
//! faster than the link carries: the guest runs at the destination before its last pages
//! are there, fetches those it touches, and verifies its memory; a link cut in the middle
//! is resumed; a source killed in the middle leaves a destination that says what was lost
//! and stops, and never a second copy of the guest.

mod common;

use common::vmm::{OUTRUN, migrate, migrate_cmd, receiver, report, source};
use common::{Host, TIMEOUT, assert_moved, certs, stderr};
use novacron_guest_image::watch::kvm_or_skip;
use novacron_migration::source::Phase;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Writes 2000 pages/s over a 1024-page working set: more than `OUTRUN` carries, so
/// pre-copy alone gives up (`kvm_migrate_that_cannot_converge_...`).
const BUSY: &str = "ws=4 rate=2000 verify=300 hb=100";
/// Waits until the migration from `src` runs post-copy.
fn wait_for_post_copy(src: &Host, child: &mut std::process::Child) {
    let deadline = Instant::now() + TIMEOUT;
    while common::migration_progress(&src.sock).map(|p| p.phase) != Some(Phase::Postcopy) {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the migration never reached post-copy");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kvm_post_copy_moves_a_guest_that_outruns_the_link_and_it_verifies() {
    if !kvm_or_skip("kvm_post_copy_moves_a_guest_that_outruns_the_link_and_it_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let src = source(dir.path(), 2, 128, BUSY);
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    // Over QUIC (the link-cut test below takes TLS over TCP).
    let extra = [&OUTRUN[..], &["--post-copy", "auto", "--transport", "quic"]].concat();
    let r = report(&migrate(&src, &addr, &tls, &extra));

    assert_eq!(r["transport"], "quic", "{r}");
    let p = &r["post_copy"];
    assert!(p["pages"].as_u64().unwrap() > 0, "pages went after the switchover: {r}");
    assert!(p["requested"].as_u64().unwrap() > 0, "the guest waited on pages and asked for them: {r}");
    assert!(p["requested"].as_u64() <= p["pages"].as_u64(), "{r}");
    assert_eq!(p["resumes"], 0, "{r}");
    assert_eq!(r["digests_matched"], true, "{r}");
    assert_moved(src, &mut dst);
    // The received VM answers on its control socket (its event loop ran on a thread of
    // its own during the post-copy) and its VMM says how long the guest waited.
    let shutdown = common::novacron().args(["vmm", "shutdown", "--api-sock"]).arg(&dst.sock).output().unwrap();
    assert!(shutdown.status.success(), "{}", stderr(&shutdown));
    let (status, err) = dst.vm.wait_exit(TIMEOUT).unwrap();
    assert!(status.success(), "{err}");
    let waited =
        err.lines().find(|l| l.contains("post-copy done: the guest waited on")).unwrap_or_else(|| panic!("{err}"));
    eprintln!("{waited}\n{}", r["post_copy"]);
    assert!(!waited.contains("waited on 0 pages"), "{waited}");
}

#[test]
fn kvm_post_copy_refuses_after_rounds_0_and_a_dry_run_changes_nothing() {
    if !kvm_or_skip("kvm_post_copy_refuses_after_rounds_0_and_a_dry_run_changes_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 1, 64, "ws=1 rate=50 verify=300 hb=100");
    let (_dst, addr) = receiver(dir.path(), &tls, &[]);
    let zero = migrate(&src, &addr, &tls, &["--post-copy", "after-rounds=0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", stderr(&zero));
    assert!(stderr(&zero).contains("at least 1"), "{}", stderr(&zero));
    let dry = migrate(&src, &addr, &tls, &["--post-copy", "auto", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{}", stderr(&dry));
    assert!(stderr(&dry).contains("--post-copy"), "{}", stderr(&dry));
    common::assert_source_runs(&mut src);
}

/// A TCP forwarder to `to` whose connections the test can cut, as a network failure
/// would: both ends see the stream end.
struct Cutter {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cutter {
    fn start(to: SocketAddr) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(Mutex::new(Vec::new()));
        let streams = open.clone();
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                // Refused while the receiver listens again: the source tries once more.
                let Ok(up) = TcpStream::connect(to) else { continue };
                let mut open = streams.lock().unwrap();
                open.extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
                pump(down.try_clone().unwrap(), up.try_clone().unwrap());
                pump(up, down);
            }
        });
        Cutter { addr, open }
    }

    /// Ends every connection open now, in both directions.
    fn cut(&self) -> usize {
        let mut open = self.open.lock().unwrap();
        for s in open.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let cut = open.len() / 2;
        open.clear();
        cut
    }
}

/// Copies `from` to `to` on a thread until either ends.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

#[test]
fn kvm_post_copy_link_cut_in_the_middle_resumes_and_the_guest_verifies() {
    if !kvm_or_skip("kvm_post_copy_link_cut_in_the_middle_resumes_and_the_guest_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let src = source(dir.path(), 2, 128, BUSY);
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let cutter = Cutter::start(addr.parse().unwrap());
    let extra = [&OUTRUN[..], &["--post-copy", "after-rounds=1", "--transport", "tcp"]].concat();
    let mut child = migrate_cmd(&src, &cutter.addr.to_string(), &tls, &extra).spawn().unwrap();
    wait_for_post_copy(&src, &mut child);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cutter.cut(), 1, "one connection carried the migration");
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let _ = dst.vm.child.kill();
        let (_, err) = dst.vm.wait_exit(TIMEOUT).unwrap();
        panic!("the migration failed: {}\nthe destination said: {err}", stderr(&out));
    }
    let r = report(&out);

    let p = &r["post_copy"];
    assert!(p["resumes"].as_u64().unwrap() >= 1, "the post-copy resumed on a new link: {r}");
    assert!(p["pages"].as_u64().unwrap() > 0, "{r}");
    // Both links count on the wire (the stream counts too what the cut lost in queues:
    // at most the in-flight window, 1 MiB here, and the socket buffers).
    let (wire, sent) = (r["wire_bytes"].as_u64().unwrap(), r["bytes_sent"].as_u64().unwrap());
    assert!(wire * 4 > sent * 3, "{r}");
    assert_eq!(r["digests_matched"], true, "{r}");
    assert_moved(src, &mut dst);
}

#[test]
fn kvm_post_copy_source_killed_in_the_middle_the_destination_says_what_is_lost_and_stops() {
    if !kvm_or_skip("kvm_post_copy_source_killed_in_the_middle_the_destination_says_what_is_lost_and_stops") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 2, 128, BUSY);
    let (mut dst, addr) = receiver(dir.path(), &tls, &["--resume-window", "2"]);
    let extra = [&OUTRUN[..], &["--post-copy", "after-rounds=1"]].concat();
    let mut child = migrate_cmd(&src, &addr, &tls, &extra).spawn().unwrap();
    wait_for_post_copy(&src, &mut child);
    // Until its last pages are in, the destination's VM can be neither moved on nor
    // snapshotted (either would wait on the source).
    let again = migrate(&dst, &addr, &tls, &[]);
    assert!(!again.status.success() && stderr(&again).contains("still arriving"), "{}", stderr(&again));
    let snap = dir.path().join("snap");
    let snapshot = common::novacron()
        .args(["vmm", "snapshot", "--api-sock"])
        .arg(&dst.sock)
        .arg("--to")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(stderr(&snapshot).contains("still arriving"), "{}", stderr(&snapshot));
    assert!(!snap.exists(), "nothing was written");
    src.vm.child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the migrate call lost its VMM");

    let (status, err) = dst.vm.wait_exit(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(3), "the destination ends as on a VMM fault: {err}");
    assert!(err.contains("did not come back within 2s"), "{err}");
    assert!(err.contains("pages") && err.contains("never received") && err.contains("lost"), "{err}");
    // The source was killed and the destination has stopped: no copy runs, and none
    // runs twice.
    assert!(src.vm.child.try_wait().unwrap().is_some(), "the source is gone");
}
