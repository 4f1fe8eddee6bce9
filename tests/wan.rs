//! Live migration across an emulated WAN: real KVM, real VMM processes, each in a network
//! namespace of its own, joined to the root namespace by veth pairs shaped with `tbf` to
//! 200 Mbit/s. Between them runs a user-space UDP relay (this machine's `tc` has no
//! `netem`) that delays every datagram by 20 ms each way (40 ms RTT) and drops a share of
//! them. Across it: a migration completes and the guest goes on; the migration back, onto
//! the snapshot the first one left behind, sends only what changed; cutting the link midway
//! leaves the source running and the destination discarded.
//!
//! ```text
//!   nsA: 10.77.a.2 ──veth (tbf)── root: 10.77.a.1 ──relay── 10.77.b.1 ──veth (tbf)── nsB: 10.77.b.2
//! ```
//!
//! The tests run as root (they create namespaces and links); without `ip netns` they skip
//! loudly, or fail when NOVACRON_REQUIRE_KVM is set.

mod common;

use common::Rng;
use common::netns::{Link, run};
use common::{Host, SLOW, TIMEOUT, assert_moved, assert_source_runs, certs, novacron, stderr, wait_until_going};
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Watched, kvm_or_skip};
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const GUEST: &str = "ws=32 rate=1000 verify=300 hb=100";
const MEM_MIB: &str = "256";
const VCPUS: &str = "2";
/// One way: 40 ms round trip.
const DELAY: Duration = Duration::from_millis(20);
const LOSS: f64 = 0.005;
const SHAPE: [&str; 6] = ["rate", "200mbit", "burst", "64kb", "latency", "50ms"];

/// `novacron ...` run inside network namespace `ns`.
fn novacron_in(ns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(env!("CARGO_BIN_EXE_novacron"));
    cmd
}

// ---------------------------------------------------------------------------------------
// The topology

/// Two namespaces, A and B, each with its veth pair shaped by `tbf`. Dropping it deletes
/// both (also on panic: declare it before the processes that run in it, so that it goes
/// last).
struct Wan {
    a: Link,
    b: Link,
}

impl Wan {
    /// `slot` tells the tests of one process apart (names and subnets); the pid tells
    /// processes apart.
    fn new(slot: u32) -> Result<Wan, String> {
        let pid = std::process::id();
        let base = ((pid % 31) * 8 + slot * 2) as u8;
        let a = Link::new(&format!("{slot}a"), base)?;
        let b = Link::new(&format!("{slot}b"), base + 1)?;
        for s in [&a, &b] {
            let mut tc = vec!["netns", "exec", &s.ns, "tc", "qdisc", "add", "dev", &s.ns_if, "root", "tbf"];
            tc.extend(SHAPE);
            run("ip", &tc)?;
        }
        Ok(Wan { a, b })
    }

    /// Sets up the topology, or says why the test cannot run: skipped loudly (None), or a
    /// failure when NOVACRON_REQUIRE_KVM asks for every KVM test to really run.
    fn or_skip(test: &str, slot: u32) -> Option<Wan> {
        match Wan::new(slot) {
            Ok(wan) => Some(wan),
            Err(e) => {
                assert!(
                    std::env::var_os("NOVACRON_REQUIRE_KVM").is_none(),
                    "{test}: network namespaces are required but cannot be set up: {e}"
                );
                eprintln!(
                    "\n*** SKIPPED {test}: network namespaces are not usable here (needs root and `ip`): {e} ***\n"
                );
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The relay: delay and loss in user space

struct Datagram {
    due: Instant,
    data: Vec<u8>,
    via: Arc<UdpSocket>,
    to: SocketAddr,
}

/// A FIFO of datagrams, each sent by its own thread when its time has come: a fixed delay
/// without reordering.
#[derive(Clone)]
struct DelayLine {
    queue: Arc<(Mutex<VecDeque<Datagram>>, Condvar)>,
    /// How late the latest datagram was sent at worst, in microseconds (the relay falling
    /// behind shows here).
    max_late_us: Arc<AtomicU64>,
    /// The longest time between two datagrams sent, in microseconds.
    max_gap_us: Arc<AtomicU64>,
}

impl DelayLine {
    fn start(stop: Arc<AtomicBool>) -> (DelayLine, JoinHandle<()>) {
        let line = DelayLine {
            queue: Arc::new((Mutex::new(VecDeque::new()), Condvar::new())),
            max_late_us: Arc::new(AtomicU64::new(0)),
            max_gap_us: Arc::new(AtomicU64::new(0)),
        };
        let (queue, max_late_us, max_gap_us) = (line.queue.clone(), line.max_late_us.clone(), line.max_gap_us.clone());
        let mut last: Option<Instant> = None;
        let thread = std::thread::spawn(move || {
            let (lock, ready) = &*queue;
            let mut q = lock.lock().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                match q.front().map(|d| d.due) {
                    None => q = ready.wait_timeout(q, Duration::from_millis(50)).unwrap().0,
                    Some(due) if due > now => q = ready.wait_timeout(q, due - now).unwrap().0,
                    Some(due) => {
                        let d = q.pop_front().unwrap();
                        drop(q);
                        max_late_us.fetch_max((now - due).as_micros() as u64, Ordering::Relaxed);
                        if let Some(last) = last {
                            max_gap_us.fetch_max((now - last).as_micros() as u64, Ordering::Relaxed);
                        }
                        last = Some(now);
                        // A link that is down makes this fail: the datagram is lost, as
                        // on a real network.
                        let _ = d.via.send_to(&d.data, d.to);
                        q = lock.lock().unwrap();
                    }
                }
            }
        });
        (line, thread)
    }

    fn push(&self, d: Datagram) {
        let (lock, ready) = &*self.queue;
        let mut q = lock.lock().unwrap();
        q.push_back(d);
        // Otherwise the sender waits for an earlier datagram.
        if q.len() == 1 {
            ready.notify_one();
        }
    }
}

#[derive(Default)]
struct RelayStats {
    /// The longest silence from the client, in microseconds, once it had started.
    max_gap_us: AtomicU64,
    /// Bytes forwarded towards the target.
    onward: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    bytes: AtomicU64,
    /// Bytes received per 250 ms since the relay started: (from the client, from the target).
    timeline: Mutex<Vec<(u64, u64)>>,
}

const SLICE_MS: u128 = 250;

impl RelayStats {
    fn note(&self, started: Instant, onward: bool, n: usize) {
        let slot = (started.elapsed().as_millis() / SLICE_MS) as usize;
        let mut t = self.timeline.lock().unwrap();
        if t.len() <= slot {
            t.resize(slot + 1, (0, 0));
        }
        if onward { t[slot].0 += n as u64 } else { t[slot].1 += n as u64 }
    }

    /// The timeline in kB per slice, onward/back.
    fn timeline(&self) -> String {
        let t = self.timeline.lock().unwrap();
        t.iter().map(|(a, b)| format!("{}/{}", a / 1000, b / 1000)).collect::<Vec<_>>().join(" ")
    }
}

/// A UDP relay in the root namespace: datagrams to `addr` go on to `target` from a socket
/// of their own per client, and the answers back to the client, each `delay` late and a
/// `loss` share of them not at all. Stops when dropped.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    /// Worst lateness of each delay line (onward, back), in microseconds.
    late: [Arc<AtomicU64>; 2],
    /// Longest time between two datagrams sent by each delay line.
    gaps: [Arc<AtomicU64>; 2],
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Room for bursts while a relay thread waits for a core (8 MiB: 0.3 s at 200 Mbit/s; the
/// test processes share two cores with the VMs).
fn big_buffers(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket and an int option of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl Relay {
    fn start(listen: Ipv4Addr, target: SocketAddr, delay: Duration, loss: f64, seed: u64) -> Relay {
        let front = Arc::new(UdpSocket::bind(SocketAddrV4::new(listen, 0)).unwrap());
        front.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        big_buffers(&front);
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let started = Instant::now();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let (forward, t1) = DelayLine::start(stop.clone());
        let (backward, t2) = DelayLine::start(stop.clone());
        threads.lock().unwrap().extend([t1, t2]);
        let late = [forward.max_late_us.clone(), backward.max_late_us.clone()];
        let gaps = [forward.max_gap_us.clone(), backward.max_gap_us.clone()];

        let accept = {
            let (stop, stats, threads) = (stop.clone(), stats.clone(), threads.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed);
                let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut buf = vec![0u8; 65536];
                let mut last: Option<Instant> = None;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = front.recv_from(&mut buf) else { continue };
                    stats.note(started, true, n);
                    let now = Instant::now();
                    if let Some(last) = last {
                        stats.max_gap_us.fetch_max((now - last).as_micros() as u64, Ordering::Relaxed);
                    }
                    last = Some(now);
                    let up = upstream.entry(client).or_insert_with(|| {
                        let up = Arc::new(UdpSocket::bind("0.0.0.0:0").unwrap());
                        up.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                        big_buffers(&up);
                        let t = Self::answers(
                            up.clone(),
                            front.clone(),
                            client,
                            target,
                            backward.clone(),
                            (stop.clone(), stats.clone(), started),
                            (delay, loss, seed ^ 0x5eed),
                        );
                        threads.lock().unwrap().push(t);
                        up
                    });
                    if rng.chance(loss) {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    stats.onward.fetch_add(n as u64, Ordering::Relaxed);
                    let due = Instant::now() + delay;
                    forward.push(Datagram { due, data: buf[..n].to_vec(), via: up.clone(), to: target });
                }
            })
        };
        threads.lock().unwrap().push(accept);
        Relay { addr, stop, stats, late, gaps, threads }
    }

    /// The thread that takes `target`'s answers on `up` back to `client`.
    fn answers(
        up: Arc<UdpSocket>,
        front: Arc<UdpSocket>,
        client: SocketAddr,
        target: SocketAddr,
        backward: DelayLine,
        (stop, stats, started): (Arc<AtomicBool>, Arc<RelayStats>, Instant),
        (delay, loss, seed): (Duration, f64, u64),
    ) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = up.recv_from(&mut buf) else { continue };
                stats.note(started, false, n);
                if from != target {
                    continue;
                }
                if rng.chance(loss) {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                let due = Instant::now() + delay;
                backward.push(Datagram { due, data: buf[..n].to_vec(), via: front.clone(), to: client });
            }
        })
    }

    fn summary(&self) -> String {
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1000.0;
        format!(
            "relay {}: {} datagrams ({} bytes) forwarded, {} dropped; longest silence from the client {:.1} ms; \
             sent late by up to {:.1} ms onward, {:.1} ms back; longest pause in sending {:.1} ms onward, {:.1} ms back",
            self.addr,
            self.stats.forwarded.load(Ordering::Relaxed),
            self.stats.bytes.load(Ordering::Relaxed),
            self.stats.dropped.load(Ordering::Relaxed),
            ms(&self.stats.max_gap_us),
            ms(&self.late[0]),
            ms(&self.late[1]),
            ms(&self.gaps[0]),
            ms(&self.gaps[1]),
        )
    }

    /// The summary and the timeline, for a failure message.
    fn describe(&self) -> String {
        format!("{}\n  kB per {SLICE_MS} ms, onward/back: {}", self.summary(), self.stats.timeline())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The accept thread may still add an answer thread: take the list until it is empty.
        loop {
            let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap());
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The VMs

/// `novacron vmm run` with the test guest in namespace `ns`; waits for two verdicts.
fn source(ns: &str, dir: &Path) -> Host {
    let sock = dir.join("src.sock");
    let mut cmd = novacron_in(ns);
    cmd.args(["vmm", "run", "--vcpus", VCPUS, "--mem", MEM_MIB, "--cmdline", GUEST]).arg("--api-sock").arg(&sock);
    let mut vm = Watched::spawn(cmd).unwrap();
    vm.wait_verified(2, TIMEOUT).unwrap();
    Host { vm, sock }
}

/// `novacron vmm receive` in namespace `ns` on `listen`; returns once it listens (its
/// control socket is bound right after the listener).
fn receiver(ns: &str, listen: SocketAddr, sock: PathBuf, tls: &Path, extra: &[&str]) -> Host {
    let mut cmd = novacron_in(ns);
    cmd.args(["vmm", "receive", "--listen", &listen.to_string()])
        .arg("--tls-dir")
        .arg(tls)
        .arg("--api-sock")
        .arg(&sock);
    cmd.args(extra);
    let mut vm = Watched::spawn(cmd).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        if let Ok(Some(status)) = vm.child.try_wait() {
            let (_, err) = vm.wait_exit(TIMEOUT).unwrap_or((status, String::new()));
            panic!("the receiver ended ({status}) before it listened: {err}");
        }
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Host { vm, sock }
}

/// A switchover takes two round trips (80 ms here) and the state: the default 50 ms limit
/// cannot be met across this WAN (see `kvm_wan_downtime_below_two_round_trips_is_refused`).
const WAN_DOWNTIME: [&str; 2] = ["--downtime-ms", "300"];

fn migrate_cmd(src: &Host, to: SocketAddr, tls: &Path, extra: &[&str]) -> Command {
    let mut cmd = novacron();
    cmd.args(["vmm", "migrate", "--to", &to.to_string(), "--json"]).arg("--api-sock").arg(&src.sock);
    cmd.arg("--tls-dir").arg(tls).args(extra);
    if !extra.contains(&"--downtime-ms") {
        cmd.args(WAN_DOWNTIME);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// The JSON report of a successful `vmm migrate`; `relay` tells what crossed the WAN.
fn report(out: &Output, relay: &Relay) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate failed: {}\n{stdout}\n{}", stderr(out), relay.describe());
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not a JSON report ({e}): {stdout}"))
}

/// The migration moved the VM: the source ended on its own with status 0, the
/// destination's guest went on with the next heartbeat and verified its memory again.
fn pages(r: &serde_json::Value, kind: &str) -> u64 {
    r["pages"][kind].as_u64().unwrap_or_else(|| panic!("no pages.{kind} in {r}"))
}

fn num(r: &serde_json::Value, key: &str) -> u64 {
    r[key].as_u64().unwrap_or_else(|| panic!("no {key} in {r}"))
}

fn figures(r: &serde_json::Value) -> String {
    format!(
        "{} ms, {} rounds, downtime {} us, {} bytes on the stream, {} on the wire, pages {}, saved {} bytes",
        num(r, "total_ms"),
        num(r, "rounds"),
        num(r, "downtime_us"),
        num(r, "bytes_sent"),
        num(r, "wire_bytes"),
        r["pages"],
        num(r, "bytes_saved")
    )
}

// ---------------------------------------------------------------------------------------
// The tests

/// The tests share two cores with their VMs (and with whatever else runs here): one at a
/// time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn vm_ctl(verb: &str, host: &Host) {
    let out = novacron().args(["vmm", verb]).arg("--api-sock").arg(&host.sock).output().unwrap();
    assert!(out.status.success(), "vm {verb}: {}", stderr(&out));
}

/// A → B across the WAN, keeping a snapshot at A; then B → A onto that snapshot, which
/// sends only the pages that changed since.
#[test]
fn kvm_wan_migration_there_and_back_onto_the_kept_snapshot() {
    let test = "kvm_wan_migration_there_and_back_onto_the_kept_snapshot";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = one_at_a_time();
    let Some(wan) = Wan::or_skip(test, 0) else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let snap_a = dir.path().join("snap-a");

    let src = source(&wan.a.ns, dir.path());
    let listen_b = SocketAddr::from((wan.b.ns_ip, 4700));
    let mut dst = receiver(&wan.b.ns, listen_b, dir.path().join("dst.sock"), &tls, &[]);
    let relay = Relay::start(wan.a.root_ip, listen_b, DELAY, LOSS, 0x0a0b);
    let started = Instant::now();
    let child = migrate_cmd(&src, relay.addr, &tls, &["--keep-snapshot", snap_a.to_str().unwrap()]).spawn().unwrap();
    // A writes its snapshot after the switchover, while the guest runs on at B. In this
    // (debug) build that takes 6 to 15 s (0.6 s in release), time enough for the guest to
    // rewrite most of its working set. B is paused meanwhile, as if the snapshot had been
    // quick, so that what the way back saves does not depend on this machine's load.
    let beat = dst.vm.wait_for("a heartbeat at B", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_)));
    if let Err(e) = beat {
        let out = child.wait_with_output().unwrap();
        panic!("{e}\nvm migrate: {}: {}\n{}", out.status, stderr(&out), relay.describe());
    }
    vm_ctl("pause", &dst);
    let out = child.wait_with_output().unwrap();
    let there_took = started.elapsed();
    let there = report(&out, &relay);
    vm_ctl("resume", &dst);
    eprintln!(
        "A -> B: `vmm migrate` took {there_took:?} (with the snapshot); {}\n  {}",
        figures(&there),
        relay.summary()
    );
    let there_gap = assert_moved(src, &mut dst);
    assert_eq!(there["digests_matched"], true, "{there}");
    assert!(snap_a.join("state.bin").exists(), "no snapshot kept in {}", snap_a.display());
    drop(relay);

    // Back to A, onto the snapshot.
    let listen_a = SocketAddr::from((wan.a.ns_ip, 4701));
    let base = ["--base", snap_a.to_str().unwrap()];
    let mut back = receiver(&wan.a.ns, listen_a, dir.path().join("back.sock"), &tls, &base);
    let relay = Relay::start(wan.b.root_ip, listen_a, DELAY, LOSS, 0x0b0a);
    let src = dst;
    let started = Instant::now();
    let out = migrate_cmd(&src, relay.addr, &tls, &[]).output().unwrap();
    let back_took = started.elapsed();
    let again = report(&out, &relay);
    eprintln!("B -> A: `vmm migrate` took {back_took:?}; {}\n  {}", figures(&again), relay.summary());
    let back_gap = assert_moved(src, &mut back);
    assert_eq!(again["digests_matched"], true, "{again}");
    eprintln!("guest-visible pauses (last heartbeat here to first there): {there_gap:?} there, {back_gap:?} back");

    // The guest's pages (all sent whole the first time) are mostly at A already: found in
    // the base, not sent. What changed since travels.
    let guest_pages = pages(&there, "full");
    let from_base = pages(&again, "base");
    let sent_again = pages(&again, "full") + pages(&again, "delta") + pages(&again, "copy");
    let both = format!("there {there}\nback {again}");
    assert!(from_base * 3 >= guest_pages * 2, "only {from_base} of {guest_pages} pages from the base: {both}");
    assert!(sent_again * 3 <= guest_pages, "{sent_again} of {guest_pages} pages sent again: {both}");
    assert!(num(&again, "bytes_saved") >= from_base * 4096, "{both}");
    // The guest's pages hold two words each: compressed, one costs about 20 bytes on the
    // stream, a reference to the base about 6, and the state about 20 KiB either way. So
    // the way back costs about 45% of the way there here, not the quarter a guest with
    // less compressible memory would show.
    assert!(
        num(&again, "bytes_sent") * 3 < num(&there, "bytes_sent") * 2,
        "the way back sent {} bytes, the way there {}: {both}",
        num(&again, "bytes_sent"),
        num(&there, "bytes_sent")
    );
}

/// Starts a slow migration through `relay` and waits until it has sent something, and
/// some of it has crossed the relay (the source counts what it hands to QUIC).
fn slow_migration(src: &Host, relay: &Relay, tls: &Path) -> Child {
    let child = migrate_cmd(src, relay.addr, tls, &SLOW).spawn().unwrap();
    wait_until_going(src, child, || relay.stats.onward.load(Ordering::Relaxed) > 256 << 10)
}

/// The link to B goes down in the middle of a migration: the source notices (QUIC idle
/// timeout), resumes and runs on; B notices too and ends without having run the guest.
#[test]
fn kvm_wan_link_cut_midway_keeps_the_source() {
    let test = "kvm_wan_link_cut_midway_keeps_the_source";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = one_at_a_time();
    let Some(wan) = Wan::or_skip(test, 1) else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");

    let mut src = source(&wan.a.ns, dir.path());
    let listen_b = SocketAddr::from((wan.b.ns_ip, 4700));
    let mut dst = receiver(&wan.b.ns, listen_b, dir.path().join("dst.sock"), &tls, &[]);
    let relay = Relay::start(wan.a.root_ip, listen_b, DELAY, LOSS, 0xc0de);
    let child = slow_migration(&src, &relay, &tls);
    let cut = Instant::now();
    run("ip", &["link", "set", &wan.b.root_if, "down"]).unwrap();
    let out = child.wait_with_output().unwrap();
    let noticed = cut.elapsed();
    eprintln!(
        "link cut: `vmm migrate` ended after {noticed:?} with {}: {}\n  {}",
        out.status,
        stderr(&out).trim(),
        relay.describe()
    );

    assert!(
        !out.status.success(),
        "the migration succeeded over a dead link: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr(&out).contains("the migration failed"), "{}", stderr(&out));
    assert_source_runs(&mut src);
    let (status, err) = dst.vm.wait_exit(TIMEOUT).unwrap();
    eprintln!("destination: {status}: {}", err.trim());
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("nothing runs here"), "{err}");
    assert!(dst.vm.seen.is_empty(), "the guest ran at the destination: {:?}", dst.vm.seen);
}

/// The downtime limit across a WAN, with memory that does not compress: the source must
/// not pause the guest while most of its memory is still on the way. (It once did: it
/// measured the link where frames entered QUIC's 64 MiB send buffer, and paused the guest
/// with tens of MiB still queued. Rounds now end when the destination's receipts say the
/// pages arrived.)
#[test]
fn kvm_wan_uncompressed_migration_keeps_the_downtime_limit() {
    let test = "kvm_wan_uncompressed_migration_keeps_the_downtime_limit";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = one_at_a_time();
    let Some(wan) = Wan::or_skip(test, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");

    let src = source(&wan.a.ns, dir.path());
    let listen_b = SocketAddr::from((wan.b.ns_ip, 4700));
    let mut dst = receiver(&wan.b.ns, listen_b, dir.path().join("dst.sock"), &tls, &[]);
    let relay = Relay::start(wan.a.root_ip, listen_b, DELAY, 0.0, 0xd0d0);
    let out = migrate_cmd(&src, relay.addr, &tls, &["--compress", "none", "--downtime-ms", "300"]).output().unwrap();
    let r = report(&out, &relay);
    eprintln!("{}\n  {}", figures(&r), relay.summary());
    let gap = assert_moved(src, &mut dst);
    // 300 ms allowed; two round trips (80 ms) and the destination's work fit in it.
    assert!(num(&r, "downtime_us") < 1_000_000, "downtime {} us for a 300 ms limit: {r}", num(&r, "downtime_us"));
    assert!(gap < Duration::from_secs(1), "the guest stood still for {gap:?}: {r}");
}

/// Across a 40 ms round trip no switchover fits 50 ms: the source says so at once, with
/// the figure to ask for, and keeps its VM.
#[test]
fn kvm_wan_downtime_below_two_round_trips_is_refused() {
    let test = "kvm_wan_downtime_below_two_round_trips_is_refused";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = one_at_a_time();
    let Some(wan) = Wan::or_skip(test, 3) else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");

    let src = source(&wan.a.ns, dir.path());
    let listen_b = SocketAddr::from((wan.b.ns_ip, 4700));
    let mut dst = receiver(&wan.b.ns, listen_b, dir.path().join("dst.sock"), &tls, &[]);
    let relay = Relay::start(wan.a.root_ip, listen_b, DELAY, 0.0, 0x5050);
    let out = migrate_cmd(&src, relay.addr, &tls, &["--downtime-ms", "50"]).output().unwrap();

    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("round trip") && err.contains("allow at least"), "{err}");
    let (status, derr) = dst.vm.wait_exit(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(1), "{derr}");
    assert!(dst.vm.seen.is_empty());
    let status =
        novacron().args(["vmm", "status", "--output", "json"]).arg("--api-sock").arg(&src.sock).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"running\""));
}
