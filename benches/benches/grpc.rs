//! The daemon's gRPC control port under load: a real `novacron daemon` child process
//! (release build) holding 1,000 defined VMs (1 vCPU, 16 MiB, never started: no VMM
//! process, no KVM), called over one TLS connection on loopback (real sockets, the node
//! certificate the daemon made as the caller's proof):
//!
//! - unary call latency, one call in flight, for `GetVm` (a random one of the VMs),
//!   `ListVms` (every VM in each answer) and, as the baseline through the same stack that
//!   touches no VM, `HostInfo`: p50/p90/p99/max and calls/s, with ratios to the baseline,
//!   against the issue's target of a p99 under 1 ms for get and list with 1,000 VMs. The
//!   three calls take turns in blocks of 100, so drift on the machine hits them alike;
//! - the same three calls with 8 concurrent callers (clones of the client: streams of the
//!   one HTTP/2 connection);
//! - defining the VMs (`CreateVm` with `start: false`), one at a time: VMs/s.
//!
//! Each row also gives the CPU time per call of the daemon's threads and of this process
//! (the client), from /proc/PID/task/*/schedstat: on a small or busy machine the two share
//! the CPUs, and the latency of a large answer is roughly their sum.
//!
//! ```text
//! cargo bench -p novacron-benches --bench grpc [-- CALLS] [--vms=N] [--no-fake-cpus]
//! ```
//!
//! CALLS (default 2,000) timed calls of each kind after 200 warm-up calls of each.
//!
//! The daemon's capacity is the machine's memory and its CPUs times `--cpu-overcommit`
//! (64 at most): 1,000 1-vCPU VMs need 16 CPUs. On a smaller machine, when run as root,
//! the daemon is started in a mount namespace of its own where /proc/cpuinfo lists just
//! enough processors (only the capacity check reads it, and no VM runs); otherwise (or
//! with `--no-fake-cpus`) as many VMs are defined as fit, and the run says so.

use novacron_benches::{Error, release_binary, tally};
use novacron_daemon::client::{Client, Connect};
use novacron_daemon::pb;
use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT_VMS: usize = 1000;
const DEFAULT_CALLS: usize = 2000;
const WARMUP: usize = 200;
/// Calls of one kind in a row before the next kind's turn.
const BLOCK: usize = 100;
const CONCURRENCY: usize = 8;
const VCPUS: u32 = 1;
const MEM_MIB: u64 = 16;
const CPU_OVERCOMMIT: u32 = 64;
/// The issue's target for GetVm and ListVms with 1,000 VMs.
const TARGET_P99: Duration = Duration::from_millis(1);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

struct Options {
    calls: usize,
    vms: usize,
    fake_cpus: bool,
}

fn options() -> Result<Options, Error> {
    let mut o = Options { calls: DEFAULT_CALLS, vms: DEFAULT_VMS, fake_cpus: true };
    for arg in std::env::args().skip(1) {
        if let Ok(n) = arg.parse::<usize>() {
            o.calls = n.max(CONCURRENCY);
        } else if let Some(v) = arg.strip_prefix("--vms=") {
            o.vms = v.parse::<usize>()?.max(1);
        } else if arg == "--no-fake-cpus" {
            o.fake_cpus = false;
        } else if arg != "--bench" {
            return Err(format!("unknown argument {arg:?}").into());
        }
    }
    Ok(o)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn vm_name(i: usize) -> String {
    format!("vm-{i:04}")
}

/// Processors listed in /proc/cpuinfo, as the daemon counts them.
fn cpuinfo_processors() -> Result<u32, Error> {
    let text = std::fs::read_to_string("/proc/cpuinfo")?;
    Ok(text.lines().filter(|l| l.starts_with("processor")).count() as u32)
}

/// A `novacron daemon` child process on a temporary data dir; stopped with SIGTERM (and
/// the dir removed) when dropped.
struct Daemon {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon; with `cpus`, in a mount namespace where /proc/cpuinfo lists
    /// that many processors.
    fn start(novacron: &Path, vmm: &Path, cpus: Option<u32>) -> Result<Daemon, Error> {
        let dir = tempfile::Builder::new().prefix("nc-grpc-").tempdir()?;
        let data = dir.path().join("data");
        let log = std::fs::File::create(dir.path().join("daemon.log"))?;
        let mut cmd = Command::new(novacron);
        cmd.arg("daemon")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0", "--name", "bench", "--cpu-overcommit"])
            .arg(CPU_OVERCOMMIT.to_string())
            .arg("--vmm-binary")
            .arg(vmm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let fake = match cpus {
            Some(n) => {
                let path = dir.path().join("cpuinfo");
                let text: String = (0..n).map(|i| format!("processor\t: {i}\n\n")).collect();
                std::fs::write(&path, text)?;
                Some(CString::new(path.into_os_string().into_encoded_bytes())?)
            }
            None => None,
        };
        let target = CString::new("/proc/cpuinfo")?;
        let root = CString::new("/")?;
        // The closure runs in the forked child before exec.
        // SAFETY: only async-signal-safe system calls, on C strings made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // The daemon ends with this bench, even when the bench is killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fake) = &fake {
                    let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                        && libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) == 0
                        && libc::mount(
                            fake.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) == 0;
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the first line, then drains stdout so the daemon never writes to a closed pipe.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut daemon = Daemon { child, addr: String::new(), dir };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) if !line.is_empty() => line,
            _ => {
                return Err(
                    format!("the daemon printed no line within {START_TIMEOUT:?}; {}", daemon.log_tail()).into()
                );
            }
        };
        daemon.addr = line
            .split_once(" listening on ")
            .and_then(|(_, rest)| rest.split(';').next())
            .map(|a| a.trim().to_string())
            .ok_or_else(|| format!("cannot find the address in the daemon's line {line:?}"))?;
        Ok(daemon)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() { String::new() } else { format!("the daemon's log ends:\n{tail}") }
    }

    /// SIGTERM, then SIGKILL if it has not ended within STOP_TIMEOUT. Answers how it ended
    /// and how long that took.
    fn stop(&mut self) -> (String, Duration) {
        let start = Instant::now();
        if let Ok(Some(status)) = self.child.try_wait() {
            return (format!("had already ended: {status}"), Duration::ZERO);
        }
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (try_wait above).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        while start.elapsed() < STOP_TIMEOUT {
            match self.child.try_wait() {
                Ok(Some(status)) => return (status.to_string(), start.elapsed()),
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return (format!("cannot wait for it: {e}"), start.elapsed()),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        (format!("did not end within {STOP_TIMEOUT:?} of SIGTERM: killed"), start.elapsed())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // Its host's keeper outlives it by design.
        novacron_guest_image::binaries::kill_vmms_under(self.dir.path());
    }
}

/// Latencies of one kind of call.
struct Stats {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    /// Calls per second: with one call in flight, n over the sum of the latencies; with
    /// several callers, n over the wall time.
    rate: f64,
    /// CPU time per call of the daemon's threads and of this process's (the client's).
    server_cpu: Duration,
    client_cpu: Duration,
}

impl Stats {
    fn new(mut lat: Vec<Duration>, time: Duration, cpu: Cpu) -> Stats {
        lat.sort_unstable();
        let n = lat.len();
        // Nearest rank.
        let at = |q: f64| lat[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Stats {
            n,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: lat[n - 1],
            rate: n as f64 / time.as_secs_f64(),
            server_cpu: cpu.server / n as u32,
            client_cpu: cpu.client / n as u32,
        }
    }
}

/// Nanoseconds on a CPU of every thread of process `pid`, from /proc/PID/task/*/schedstat
/// (threads that ended are not counted: the runtimes' threads live as long as they do).
fn cpu_of(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// CPU time used by the daemon and by this process.
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: Duration,
    client: Duration,
}

impl Cpu {
    fn now(daemon: u32) -> Cpu {
        Cpu { server: cpu_of(daemon), client: cpu_of(std::process::id()) }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu { server: self.server.saturating_sub(before.server), client: self.client.saturating_sub(before.client) }
    }

    fn add(&mut self, other: Cpu) {
        self.server += other.server;
        self.client += other.client;
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn header(first: &str) {
    println!(
        "  {first:<10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>11} {:>11}",
        "calls", "p50 us", "p90 us", "p99 us", "max us", "calls/s", "p50 x", "p99 x", "daemon CPU", "client CPU"
    );
}

fn row(name: &str, s: &Stats, base: &Stats) {
    println!(
        "  {name:<10} {:>6} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>7.2} {:>7.2} {:>8.0} us {:>8.0} us",
        s.n,
        us(s.p50),
        us(s.p90),
        us(s.p99),
        us(s.max),
        s.rate,
        s.p50.as_secs_f64() / base.p50.as_secs_f64(),
        s.p99.as_secs_f64() / base.p99.as_secs_f64(),
        us(s.server_cpu),
        us(s.client_cpu)
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    HostInfo,
    GetVm,
    ListVms,
}

const KINDS: [Kind; 3] = [Kind::HostInfo, Kind::GetVm, Kind::ListVms];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::HostInfo => "HostInfo",
            Kind::GetVm => "GetVm",
            Kind::ListVms => "ListVms",
        }
    }

    /// Tally names: one call in flight, and CONCURRENCY callers.
    fn tally(self, concurrent: bool) -> &'static str {
        match (self, concurrent) {
            (Kind::HostInfo, false) => "HostInfo, 1 in flight",
            (Kind::GetVm, false) => "GetVm, 1 in flight",
            (Kind::ListVms, false) => "ListVms, 1 in flight",
            (Kind::HostInfo, true) => "HostInfo, 8 callers",
            (Kind::GetVm, true) => "GetVm, 8 callers",
            (Kind::ListVms, true) => "ListVms, 8 callers",
        }
    }

    /// One call, timed, its answer checked.
    async fn call(self, client: &mut Client, vms: usize, seed: u64) -> Result<Duration, String> {
        let failed = |e: &dyn std::fmt::Display| format!("{}: {e}", self.name());
        let start = Instant::now();
        match self {
            Kind::HostInfo => {
                let host = client.host_info(pb::HostInfoRequest {}).await.map_err(|e| failed(&e))?.into_inner();
                let t = start.elapsed();
                if host.vms as usize != vms {
                    return Err(format!("HostInfo says {} VMs, not {vms}", host.vms));
                }
                Ok(t)
            }
            Kind::GetVm => {
                let name = vm_name((splitmix(seed) % vms as u64) as usize);
                let vm = client.get_vm(pb::VmRef { name: name.clone() }).await.map_err(|e| failed(&e))?.into_inner();
                let t = start.elapsed();
                if vm.spec.as_ref().map(|s| s.name.as_str()) != Some(name.as_str()) {
                    return Err(format!("GetVm {name} answered {vm:?}"));
                }
                Ok(t)
            }
            Kind::ListVms => {
                let list = client.list_vms(pb::ListVmsRequest {}).await.map_err(|e| failed(&e))?.into_inner();
                let t = start.elapsed();
                if list.vms.len() != vms {
                    return Err(format!("ListVms answered {} VMs, not {vms}", list.vms.len()));
                }
                Ok(t)
            }
        }
    }
}

/// One call in flight: the kinds take turns in blocks of BLOCK calls, CALLS each.
async fn sequential(client: &mut Client, daemon: u32, vms: usize, calls: usize) -> Result<Vec<Stats>, Error> {
    let mut seed = 0u64;
    for kind in KINDS {
        for _ in 0..WARMUP {
            seed += 1;
            kind.call(client, vms, seed).await?;
        }
    }
    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(calls); KINDS.len()];
    let mut cpu = [Cpu::default(); KINDS.len()];
    let mut round = 0;
    while lat.iter().any(|l| l.len() < calls) {
        // The order rotates so that no kind always follows the same one.
        for k in 0..KINDS.len() {
            let i = (k + round) % KINDS.len();
            let n = BLOCK.min(calls - lat[i].len());
            let before = Cpu::now(daemon);
            for _ in 0..n {
                seed += 1;
                let t = KINDS[i].call(client, vms, seed).await?;
                lat[i].push(t);
            }
            cpu[i].add(Cpu::now(daemon).since(before));
        }
        round += 1;
    }
    Ok(KINDS
        .iter()
        .zip(lat)
        .zip(cpu)
        .map(|((kind, l), cpu)| {
            let sum: Duration = l.iter().sum();
            tally::record(kind.tally(false), l.len() as u64, sum);
            Stats::new(l, sum, cpu)
        })
        .collect())
}

/// CONCURRENCY callers, each on a clone of the client, CALLS / CONCURRENCY calls each
/// after their own warm-up; they start together.
async fn concurrent(client: &Client, daemon: u32, kind: Kind, vms: usize, calls: usize) -> Result<Stats, Error> {
    let per = calls / CONCURRENCY;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CONCURRENCY + 1));
    let mut tasks = Vec::new();
    for c in 0..CONCURRENCY {
        let mut client = client.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = (c as u64 + 1) << 32;
            let mut warm = Ok(Duration::ZERO);
            for _ in 0..WARMUP / CONCURRENCY {
                seed += 1;
                warm = kind.call(&mut client, vms, seed).await;
                if warm.is_err() {
                    break;
                }
            }
            // Every caller reaches the barrier, or the others would wait for ever.
            barrier.wait().await;
            warm?;
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                seed += 1;
                lat.push(kind.call(&mut client, vms, seed).await?);
            }
            Ok::<_, String>(lat)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let before = Cpu::now(daemon);
    let mut all = Vec::with_capacity(per * CONCURRENCY);
    for task in tasks {
        all.extend(task.await??);
    }
    let wall = start.elapsed();
    let cpu = Cpu::now(daemon).since(before);
    tally::record(kind.tally(true), all.len() as u64, wall);
    Ok(Stats::new(all, wall, cpu))
}

async fn bench(daemon: &Daemon, o: &Options, vms: usize) -> Result<(), Error> {
    let connect = Connect { endpoint: daemon.addr.clone(), tls_dir: daemon.data_dir().join("tls"), token: None };
    let mut client = connect.connect().await?;

    // A daemon places VMs on the hosts of its cluster once it has polled them (itself
    // included): until then every host is "joining".
    let start = Instant::now();
    loop {
        let cluster = client.cluster_info(pb::ClusterInfoRequest {}).await?.into_inner();
        if cluster.hosts.iter().any(|h| h.state == "up") {
            break;
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(format!("no host of the daemon's cluster is up after {START_TIMEOUT:?}: {cluster:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Defining the VMs, one at a time.
    let pid = daemon.child.id();
    let mut lat = Vec::with_capacity(vms);
    let start = Instant::now();
    let before = Cpu::now(pid);
    for i in 0..vms {
        let spec = pb::VmSpec { name: vm_name(i), vcpus: VCPUS, mem_mib: MEM_MIB, ..Default::default() };
        let t = Instant::now();
        let vm = client
            .create_vm(pb::CreateVmRequest { spec: Some(spec), start: Some(false) })
            .await
            .map_err(|e| format!("defining VM {i}: {e}"))?
            .into_inner();
        lat.push(t.elapsed());
        if vm.phase != "stopped" {
            return Err(format!("VM {} is {:?} after its definition, not stopped", vm_name(i), vm.phase).into());
        }
    }
    let define_wall = start.elapsed();
    let define_cpu = Cpu::now(pid).since(before);
    tally::record("CreateVm (start: false), 1 in flight", vms as u64, define_wall);
    // Whether a definition costs more as the host fills.
    let mean = |l: &[Duration]| l.iter().sum::<Duration>() / l.len().max(1) as u32;
    let edge = (vms / 10).max(1);
    let (first, last) = (mean(&lat[..edge]), mean(&lat[vms - edge..]));
    let define = Stats::new(lat, define_wall, define_cpu);
    let host = client.host_info(pb::HostInfoRequest {}).await?.into_inner();
    let list = client.list_vms(pb::ListVmsRequest {}).await?.into_inner();
    let list_bytes = prost::Message::encoded_len(&list);
    println!(
        "\nDefined {vms} VMs ({VCPUS} vCPU, {MEM_MIB} MiB each, not started) in {:.2} s: {:.0} VMs/s \
         (per call p50 {:.0} us, p99 {:.0} us, max {:.0} us; mean of the first {edge} {:.0} us, of the last {edge} \
         {:.0} us; daemon CPU {:.0} us per VM)",
        define_wall.as_secs_f64(),
        define.rate,
        us(define.p50),
        us(define.p99),
        us(define.max),
        us(first),
        us(last),
        us(define.server_cpu)
    );
    println!(
        "Host {}: {} VMs, {}/{} vCPUs and {}/{} MiB used; a ListVms answer is {} KiB ({} bytes per VM)",
        host.name,
        host.vms,
        host.used_vcpus,
        host.vcpus,
        host.used_mem_mib,
        host.mem_mib,
        list_bytes / 1024,
        list_bytes / vms
    );

    println!(
        "\nUnary calls, one in flight on one TLS connection ({} timed calls each after {WARMUP} warm-up calls, \
         in turns of {BLOCK}); x: ratio to HostInfo; CPU: per call, all threads (load average {})",
        o.calls,
        load_average()
    );
    let seq = sequential(&mut client, pid, vms, o.calls).await?;
    header("call");
    for (kind, s) in KINDS.iter().zip(&seq) {
        row(kind.name(), s, &seq[0]);
    }

    println!(
        "\n{CONCURRENCY} concurrent callers (clones of the client: one HTTP/2 connection), {} calls each after {} \
         warm-up calls; calls/s over the wall time; x: ratio to HostInfo with {CONCURRENCY} callers (load average {})",
        o.calls / CONCURRENCY,
        WARMUP / CONCURRENCY,
        load_average()
    );
    let mut conc = Vec::new();
    for kind in KINDS {
        conc.push(concurrent(&client, pid, kind, vms, o.calls).await?);
    }
    header("call");
    for (kind, s) in KINDS.iter().zip(&conc) {
        row(kind.name(), s, &conc[0]);
    }

    println!(
        "\nTarget: p99 under {} ms for GetVm and ListVms with 1,000 VMs (one call in flight):",
        TARGET_P99.as_millis()
    );
    for (kind, s) in KINDS.iter().zip(&seq).skip(1) {
        let verdict = if s.p99 < TARGET_P99 { "met" } else { "NOT met" };
        let caveat = if vms < 1000 { format!(" (with only {vms} VMs)") } else { String::new() };
        println!("  {:<8} p99 {:>7.3} ms: {verdict}{caveat}", kind.name(), s.p99.as_secs_f64() * 1e3);
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages: the machine's other work shows in the tails.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn summary() {
    let rates = tally::rates();
    if rates.is_empty() {
        return;
    }
    println!("\nSummary (calls/s):");
    for (name, rate) in rates {
        println!("  {name:<40} {rate:>10.0} /s  {:>9.1} us each", 1e6 / rate);
    }
}

fn main() -> Result<(), Error> {
    let o = options()?;
    let novacron = release_binary("novacron", "novacron")?;
    let vmm = release_binary("novacron-vmm", "novacron-vmm")?;

    let cpus = cpuinfo_processors()?;
    let needed_cpus = (o.vms as u32 * VCPUS).div_ceil(CPU_OVERCOMMIT);
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let (fake, vms) = if cpus >= needed_cpus {
        (None, o.vms)
    } else if o.fake_cpus && root {
        println!(
            "This machine has {cpus} CPUs: {} VMs of {VCPUS} vCPU need {needed_cpus} at --cpu-overcommit \
             {CPU_OVERCOMMIT}; the daemon runs in a mount namespace whose /proc/cpuinfo lists {needed_cpus} \
             (its capacity check is all that reads it; no VM runs)",
            o.vms
        );
        (Some(needed_cpus), o.vms)
    } else {
        let fit = (cpus * CPU_OVERCOMMIT / VCPUS) as usize;
        println!(
            "This machine has {cpus} CPUs: only {fit} of {} VMs of {VCPUS} vCPU fit at --cpu-overcommit \
             {CPU_OVERCOMMIT}{}; defining {fit}",
            o.vms,
            if root { "" } else { " (run as root to present more CPUs to the daemon)" }
        );
        (None, fit)
    };

    let mut daemon = Daemon::start(&novacron, &vmm, fake)?;
    println!(
        "daemon pid {} listening on {} (data dir {})",
        daemon.child.id(),
        daemon.addr,
        daemon.data_dir().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(bench(&daemon, &o, vms));
    drop(runtime);
    let (how, took) = daemon.stop();
    println!("\ndaemon stopped with SIGTERM in {:.0} ms: {how}", took.as_secs_f64() * 1e3);
    if result.is_err() {
        eprintln!("{}", daemon.log_tail());
    }
    drop(daemon);
    result?;
    summary();
    Ok(())
}
