//! The supervision tree's costs (issue 5), in one process, each against a baseline run the
//! same way in the same run:
//!
//! 1. Messages. `ractor::call!` round trips to a VmSupervisor (`VmMsg::GetInfo`) and to a
//!    HostSupervisor (`HostMsg::HostInfo`): latency (p50/p99 over CALLS sequential calls),
//!    calls per second with 1 caller and with 8 concurrent callers, and casts per second
//!    (a cast of the same message with a reply port nobody waits on, until the last is
//!    handled). Then `ListVms`, `GetVm` and `HostInfo` with 1,000 VMs defined. The VMs are
//!    defined, not started (`HostMsg::DefineVm`: phase `Stopped`, no VMM process), so this
//!    part needs neither KVM nor the VMM. The baseline is a tokio task serving an unbounded
//!    mpsc channel with a oneshot reply (the primitives ractor's mailbox and reply ports are
//!    made of), answering the same value (a clone of the same `VmInfo`, `HostInfo` or list);
//!    `GetVm`'s baseline relays through a second such task, as the host asks the VM's
//!    supervisor.
//! 2. Restart. A VM of the test guest under a HostSupervisor with the real `novacron-vmm`:
//!    from SIGKILL of its VMM to the first heartbeat of the new boot in its serial log, which
//!    the supervisor restarts by the VM's policy (on-failure, with a fixed RESTART_BACKOFF).
//!    Baseline: from `CreateVm` to the first heartbeat of a fresh VM (a cold boot through
//!    the supervisor), measured the same way. Each run creates a VM (cold boot), kills it
//!    once (restart) and deletes it, so only one guest runs at a time. Skipped, saying so,
//!    when /dev/kvm cannot be used.
//!
//! ```text
//! cargo bench -p novacron-benches --bench actors [-- RUNS] [--calls=N] [--only=messages|restart]
//! ```
//!
//! RUNS (default 10) is the number of restart and cold-boot runs (after one warm-up run);
//! `--calls` the sequential calls per latency figure (default 100,000). The VMM is
//! `$NOVACRON_VMM`, else target/release/novacron-vmm, built first (a no-op when fresh).

use novacron_actors::supervisor::policy::ALWAYS_DELAY;
use novacron_actors::{
    Capacity, HostConfig, HostError, HostInfo, HostMsg, HostSupervisor, RestartPolicy, VmInfo, VmMsg, VmPhase, VmSpec,
};
use novacron_benches::{Error, release_binary};
use novacron_guest_image::watch::SerialTail;
use ractor::{Actor, ActorRef};
use std::future::Future;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Sequential calls per latency figure (and calls per throughput figure).
const CALLS: usize = 100_000;
const WARM_UP: usize = 10_000;
const CALLERS: usize = 8;
/// VMs defined for `ListVms` and `GetVm`.
const DEFINED: usize = 1000;
/// `ListVms` copies every VM's info: fewer calls.
const LIST_CALLS: usize = 5_000;

/// The restart policy's delay in part 2: on-failure, the backoff pinned to this.
const RESTART_BACKOFF: Duration = Duration::from_millis(1);
/// The tests' workload: 1 MiB working set, a heartbeat every 100 ms (the first at once).
const WORKLOAD: &str = "ws=1 rate=50 verify=1000 hb=100";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the serial log is read while waiting for a line.
const POLL: Duration = Duration::from_micros(250);
/// Heartbeats the guest prints before its VMM is killed.
const HEARTBEATS_BEFORE_KILL: u64 = 3;

// ---------------------------------------------------------------------------------------
// Part 1: message round trips

/// Something to call and cast, cheap to clone into a task.
trait Rpc: Clone + Send + Sync + 'static {
    /// One request and its reply; `i` picks among targets where there are several.
    fn call(&self, i: usize) -> impl Future<Output = ()> + Send;
    /// The same request, its reply port dropped on arrival.
    fn cast(&self);
}

#[derive(Clone)]
struct VmGetInfo(ActorRef<VmMsg>);

impl Rpc for VmGetInfo {
    async fn call(&self, _: usize) {
        black_box(ractor::call!(self.0, VmMsg::GetInfo).expect("GetInfo"));
    }
    fn cast(&self) {
        let (tx, _) = oneshot::channel();
        self.0.cast(VmMsg::GetInfo(tx.into())).expect("cast GetInfo");
    }
}

#[derive(Clone)]
struct HostInfoRpc(ActorRef<HostMsg>);

impl Rpc for HostInfoRpc {
    async fn call(&self, _: usize) {
        black_box(ractor::call!(self.0, HostMsg::HostInfo).expect("HostInfo"));
    }
    fn cast(&self) {
        let (tx, _) = oneshot::channel();
        self.0.cast(HostMsg::HostInfo(tx.into())).expect("cast HostInfo");
    }
}

#[derive(Clone)]
struct ListVms(ActorRef<HostMsg>);

impl Rpc for ListVms {
    async fn call(&self, _: usize) {
        black_box(ractor::call!(self.0, HostMsg::ListVms).expect("ListVms"));
    }
    fn cast(&self) {
        let (tx, _) = oneshot::channel();
        self.0.cast(HostMsg::ListVms(tx.into())).expect("cast ListVms");
    }
}

#[derive(Clone)]
struct GetVm(ActorRef<HostMsg>, Arc<Vec<String>>);

impl Rpc for GetVm {
    async fn call(&self, i: usize) {
        let name = self.1[i % self.1.len()].clone();
        black_box(ractor::call!(self.0, HostMsg::GetVm, name).expect("GetVm").expect("GetVm answer"));
    }
    fn cast(&self) {
        let (tx, _) = oneshot::channel();
        self.0.cast(HostMsg::GetVm(self.1[0].clone(), tx.into())).expect("cast GetVm");
    }
}

/// The baseline: a task answering requests on an unbounded mpsc channel through a oneshot,
/// with a clone of `T` (what the actor answers).
struct Baseline<T>(mpsc::UnboundedSender<oneshot::Sender<T>>);

impl<T> Clone for Baseline<T> {
    fn clone(&self) -> Self {
        Baseline(self.0.clone())
    }
}

impl<T: Clone + Send + Sync + 'static> Baseline<T> {
    fn serve(value: T) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<T>>();
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(value.clone());
            }
        });
        Baseline(tx)
    }

    /// A task that asks `inner` for every request it gets, one at a time, and answers
    /// with its reply: the host relaying `GetVm` to a VM's supervisor.
    fn relay(inner: Baseline<T>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<T>>();
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let (itx, irx) = oneshot::channel();
                if inner.0.send(itx).is_err() {
                    break;
                }
                if let Ok(v) = irx.await {
                    let _ = reply.send(v);
                }
            }
        });
        Baseline(tx)
    }
}

impl<T: Clone + Send + Sync + 'static> Rpc for Baseline<T> {
    async fn call(&self, _: usize) {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).expect("baseline send");
        black_box(rx.await.expect("baseline reply"));
    }
    fn cast(&self) {
        let (tx, _) = oneshot::channel();
        self.0.send(tx).expect("baseline cast");
    }
}

/// Latencies of `n` sequential calls, in nanoseconds, sorted.
#[derive(Default)]
struct Latency {
    ns: Vec<u64>,
}

impl Latency {
    fn pct(&self, p: f64) -> f64 {
        percentile(&self.ns, p) as f64 / 1e3
    }
    fn mean_us(&self) -> f64 {
        self.ns.iter().sum::<u64>() as f64 / self.ns.len().max(1) as f64 / 1e3
    }
}

/// Nearest rank of a sorted slice.
fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// On a worker of the runtime, as a request handler of the daemon would call.
async fn latency<R: Rpc>(r: &R, warm_up: usize, n: usize) -> Latency {
    let r = r.clone();
    tokio::spawn(async move {
        for i in 0..warm_up {
            r.call(i).await;
        }
        let mut ns = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            r.call(i).await;
            ns.push(t.elapsed().as_nanos() as u64);
        }
        ns.sort_unstable();
        Latency { ns }
    })
    .await
    .expect("latency task")
}

/// Calls per second: `n` calls in all, shared by `callers` concurrent tasks.
async fn throughput<R: Rpc>(r: &R, callers: usize, n: usize) -> f64 {
    let per = n / callers;
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let r = r.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    r.call(c * per + i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("caller task");
    }
    (per * callers) as f64 / start.elapsed().as_secs_f64()
}

/// Casts per second: `n` casts, then one call, which is answered after all of them.
async fn casts<R: Rpc>(r: &R, n: usize) -> f64 {
    let r = r.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        for _ in 0..n {
            r.cast();
        }
        r.call(0).await;
        n as f64 / start.elapsed().as_secs_f64()
    })
    .await
    .expect("cast task")
}

struct Row {
    name: String,
    calls: usize,
    actor: Latency,
    base: Latency,
}

struct Rates {
    name: &'static str,
    /// 1 caller, 8 callers, casts; actor then baseline.
    actor: [f64; 3],
    base: [f64; 3],
}

async fn rates<A: Rpc, B: Rpc>(name: &'static str, a: &A, b: &B, calls: usize) -> Rates {
    let mut r = Rates { name, actor: [0.0; 3], base: [0.0; 3] };
    // Alternating, so that neither gets the quieter moments.
    r.actor[0] = throughput(a, 1, calls).await;
    r.base[0] = throughput(b, 1, calls).await;
    r.actor[1] = throughput(a, CALLERS, calls).await;
    r.base[1] = throughput(b, CALLERS, calls).await;
    r.actor[2] = casts(a, calls).await;
    r.base[2] = casts(b, calls).await;
    r
}

async fn row<A: Rpc, B: Rpc>(name: impl Into<String>, a: &A, b: &B, calls: usize) -> Row {
    let warm = (calls / 10).min(WARM_UP);
    let actor = latency(a, warm, calls).await;
    let base = latency(b, warm, calls).await;
    Row { name: name.into(), calls, actor, base }
}

/// Calls the host with a request whose reply is a `Result<T, HostError>`.
async fn call_host<T: Send + 'static>(
    host: &ActorRef<HostMsg>,
    msg: impl FnOnce(ractor::RpcReplyPort<Result<T, HostError>>) -> HostMsg,
) -> Result<T, Error> {
    match host.call(msg, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Ok(r?),
        Ok(_) => Err("the host dropped the reply port".into()),
        Err(e) => Err(format!("cannot send to the host: {e}").into()),
    }
}

async fn messages(calls: usize) -> Result<(Vec<Row>, Vec<Rates>, Duration), Error> {
    let dir = tempfile::Builder::new().prefix("ncbm").tempdir_in("/tmp")?;
    // No VMM is started: any existing file will do.
    let mut config = HostConfig::new(dir.path(), std::env::current_exe()?);
    config.capacity = Some(Capacity { vcpus: 10_000, mem_mib: 10_000_000 });
    let (host, host_handle) = Actor::spawn(None, HostSupervisor, config).await?;
    let first = call_host(&host, |r| HostMsg::DefineVm(VmSpec::new("vm-0000", 1, 64), r)).await?;
    if first.phase != VmPhase::Stopped || first.pid.is_some() {
        return Err(format!("a defined VM should be stopped, without a process: {first:?}").into());
    }
    let vm = call_host(&host, |r| HostMsg::VmActor("vm-0000".into(), r)).await?;
    let info: VmInfo = ractor::call!(vm, VmMsg::GetInfo).map_err(|e| e.to_string())?;
    let host_info: HostInfo = ractor::call!(host, HostMsg::HostInfo).map_err(|e| e.to_string())?;

    let mut rows = Vec::new();
    let mut rates_rows = Vec::new();
    eprintln!("part 1: round trips to a VmSupervisor and a HostSupervisor with one VM...");
    let (a, b) = (VmGetInfo(vm.clone()), Baseline::serve(info.clone()));
    rows.push(row("VmSupervisor GetInfo", &a, &b, calls).await);
    rates_rows.push(rates("VmSupervisor GetInfo", &a, &b, calls).await);
    let (a, b) = (HostInfoRpc(host.clone()), Baseline::serve(host_info));
    rows.push(row("HostSupervisor HostInfo (1 VM)", &a, &b, calls).await);
    rates_rows.push(rates("HostSupervisor HostInfo (1 VM)", &a, &b, calls).await);

    eprintln!("part 1: defining {DEFINED} VMs...");
    let start = Instant::now();
    let mut names = vec!["vm-0000".to_string()];
    for i in 1..DEFINED {
        let name = format!("vm-{i:04}");
        call_host(&host, |r| HostMsg::DefineVm(VmSpec::new(name.clone(), 1, 64), r)).await?;
        names.push(name);
    }
    let define = start.elapsed();
    let list: Vec<VmInfo> = ractor::call!(host, HostMsg::ListVms).map_err(|e| e.to_string())?;
    if list.len() != DEFINED {
        return Err(format!("ListVms answered {} VMs, not {DEFINED}", list.len()).into());
    }
    let host_info: HostInfo = ractor::call!(host, HostMsg::HostInfo).map_err(|e| e.to_string())?;
    eprintln!("part 1: ListVms, GetVm, HostInfo with {DEFINED} VMs...");
    let list_calls = LIST_CALLS.min(calls);
    rows.push(
        row(
            format!("HostSupervisor ListVms ({DEFINED} VMs)"),
            &ListVms(host.clone()),
            &Baseline::serve(list),
            list_calls,
        )
        .await,
    );
    let (a, b) = (GetVm(host.clone(), Arc::new(names)), Baseline::relay(Baseline::serve(info)));
    rows.push(row(format!("HostSupervisor GetVm ({DEFINED} VMs)"), &a, &b, calls / 5).await);
    rows.push(
        row(
            format!("HostSupervisor HostInfo ({DEFINED} VMs)"),
            &HostInfoRpc(host.clone()),
            &Baseline::serve(host_info),
            calls / 5,
        )
        .await,
    );

    host.stop(None);
    host_handle.await?;
    Ok((rows, rates_rows, define))
}

fn print_messages(rows: &[Row], rates: &[Rates], define: Duration) {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    println!(
        "\nActor messages: ractor 0.16 (ractor::call!) on a tokio multi-thread runtime ({workers} workers); \
         baseline: tokio mpsc (unbounded) + oneshot, the same reply value, in the same run"
    );
    println!("\nLatency of one call, sequential, from a runtime task (µs; ratio = actor ÷ baseline)");
    println!(
        "| {:<36} | {:>7} | {:>8} | {:>8} | {:>9} | {:>8} | {:>8} | {:>9} | {:>9} |",
        "call", "calls", "p50", "p99", "mean", "base p50", "base p99", "ratio p50", "ratio p99"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {:<36} | {:>7} | {:>8.2} | {:>8.2} | {:>9.2} | {:>8.2} | {:>8.2} | {:>8.2}x | {:>8.2}x |",
            r.name,
            r.calls,
            r.actor.pct(50.0),
            r.actor.pct(99.0),
            r.actor.mean_us(),
            r.base.pct(50.0),
            r.base.pct(99.0),
            r.actor.pct(50.0) / r.base.pct(50.0),
            r.actor.pct(99.0) / r.base.pct(99.0),
        );
    }
    println!("  GetVm's baseline relays through a second task (the host asks the VM's supervisor).");
    println!("\nThroughput (per second; ratio = actor ÷ baseline)");
    println!(
        "| {:<36} | {:>11} | {:>11} | {:>6} | {:>11} | {:>11} | {:>6} | {:>11} | {:>11} | {:>6} |",
        "call", "1 caller", "base", "ratio", "8 callers", "base", "ratio", "casts", "base", "ratio"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rates {
        let mut line = format!("| {:<36} |", r.name);
        for k in 0..3 {
            line.push_str(&format!(" {:>11.0} | {:>11.0} | {:>5.2}x |", r.actor[k], r.base[k], r.actor[k] / r.base[k]));
        }
        println!("{line}");
    }
    println!("  casts: the same request with a reply port nobody waits on, timed until the last is handled.");
    println!(
        "\nDefining {DEFINED} VMs (DefineVm, one after another; a VmSupervisor each, no process): {:.0} ms, {:.0} µs each",
        define.as_secs_f64() * 1e3,
        define.as_secs_f64() * 1e6 / DEFINED as f64
    );
}

// ---------------------------------------------------------------------------------------
// Part 2: restart after SIGKILL, against a cold boot

/// When this boot printed its first line and its first heartbeat.
fn boot_times(tail: &SerialTail) -> Option<(Instant, Instant)> {
    Some((tail.lines.first()?.0, tail.heartbeats().first()?.0))
}

/// Polls `tail` (on a blocking thread) until it has seen `replaced` replacements and, in
/// the current file, a heartbeat of at least `seq`.
async fn wait_heartbeat(mut tail: SerialTail, replaced: u32, seq: u64) -> Result<SerialTail, Error> {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            tail.poll();
            if tail.replaced >= replaced && tail.heartbeats().iter().any(|(_, s)| *s >= seq) {
                return Ok(tail);
            }
            if Instant::now() > deadline {
                let last: Vec<_> = tail.lines.iter().rev().take(5).map(|(_, l)| l.clone()).collect();
                return Err(format!(
                    "no heartbeat {seq} in {} after {BOOT_TIMEOUT:?} (replaced {} times; last lines {last:?})",
                    tail.path().display(),
                    tail.replaced
                ));
            }
            std::thread::sleep(POLL);
        }
    })
    .await?
    .map_err(Error::from)
}

/// SIGKILLs every VMM whose control socket is in `dir` (its pid from `status`, checked
/// against its command line), then removes `dir`.
struct VmmGuard(tempfile::TempDir);

impl Drop for VmmGuard {
    fn drop(&mut self) {
        novacron_guest_image::binaries::kill_vmms_under(self.0.path());
    }
}

/// One run: times from the start of the event (CreateVm sent, SIGKILL sent) to the boot's
/// first serial line and first heartbeat.
#[derive(Clone, Copy)]
struct Boot {
    first_line: Duration,
    heartbeat: Duration,
}

struct RestartRun {
    cold: Boot,
    /// SIGKILL sent to the old VMM's end (its pidfd polls readable: the kernel has torn
    /// the process down, and the supervisor's watch can see it).
    exited: Duration,
    /// CreateVm sent to its reply (the VMM answers its control socket).
    create_reply: Duration,
    restart: Boot,
}

async fn restart_run(host: &ActorRef<HostMsg>, dir: &Path, i: usize) -> Result<RestartRun, Error> {
    let name = format!("hb-{i:03}");
    let mut spec = VmSpec::new(name.clone(), 1, 64);
    spec.cmdline = WORKLOAD.to_string();
    spec.restart = RestartPolicy::OnFailure {
        max_restarts: 3,
        window: Duration::from_secs(60),
        backoff_initial: RESTART_BACKOFF,
        backoff_max: RESTART_BACKOFF,
    };
    let serial = dir.join(format!("{name}.serial"));
    spec.serial_log = Some(serial.clone());
    let tail = SerialTail::new(&serial);

    // Cold boot: CreateVm to the first heartbeat.
    let t0 = Instant::now();
    let info = call_host(host, |r| HostMsg::CreateVm(spec, r)).await?;
    let create_reply = t0.elapsed();
    let tail = wait_heartbeat(tail, 0, HEARTBEATS_BEFORE_KILL).await?;
    let (line, hb) = boot_times(&tail).ok_or("no boot lines")?;
    let cold = Boot { first_line: line - t0, heartbeat: hb - t0 };

    // Restart: SIGKILL to the new boot's first heartbeat.
    let pid = info.pid.ok_or("the created VM has no pid")?;
    let now = call_host(host, |r| HostMsg::GetVm(name.clone(), r)).await?;
    if now.pid != Some(pid) || now.phase != VmPhase::Running {
        return Err(format!("the VM should run its first VMM (pid {pid}): {now:?}").into());
    }
    if !novacron_actors::process::VmmProcess::is_vmm_of(pid, &info.socket) {
        return Err(format!("pid {pid} is not the VMM of {}", info.socket.display()).into());
    }
    let replaced = tail.replaced;
    let ended = watch_end(pid)?;
    let t1 = Instant::now();
    // SAFETY: kill has no memory effects; the pid is this VM's VMM (checked just above),
    // alive and not reaped (its supervisor holds a pidfd on it).
    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
        return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()).into());
    }
    let tail = wait_heartbeat(tail, replaced + 1, 1).await?;
    let (line, hb) = boot_times(&tail).ok_or("no boot lines after the restart")?;
    let restart = Boot { first_line: line - t1, heartbeat: hb - t1 };
    let exited = ended.await??.saturating_duration_since(t1);
    let after = call_host(host, |r| HostMsg::GetVm(name.clone(), r)).await?;
    if after.restarts != 1 || after.pid.is_none() || after.pid == Some(pid) {
        return Err(format!("the VM should have been restarted once with a new VMM: {after:?}").into());
    }

    call_host(host, |r| HostMsg::DeleteVm(name.clone(), r)).await?;
    Ok(RestartRun { cold, exited, create_reply, restart })
}

/// The instant process `pid` ends, seen through a pidfd opened now (on a blocking thread).
fn watch_end(pid: u32) -> Result<tokio::task::JoinHandle<Result<Instant, String>>, Error> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(format!("pidfd_open {pid}: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    Ok(tokio::task::spawn_blocking(move || {
        let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, BOOT_TIMEOUT.as_millis() as i32) };
        match n {
            1 => Ok(Instant::now()),
            0 => Err(format!("VMM {pid} did not end within {BOOT_TIMEOUT:?} of its SIGKILL")),
            _ => Err(format!("poll on the pidfd of {pid}: {}", std::io::Error::last_os_error())),
        }
    }))
}

/// Whether /dev/kvm can run a guest here; why not if it cannot.
fn kvm_usable() -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    kvm.create_vm().map(drop).map_err(|e| format!("/dev/kvm cannot create a VM: {e}"))
}

/// The runs, and the time spent building the VMM first.
async fn restarts(runs: usize) -> Result<(Vec<RestartRun>, Duration), Error> {
    let build = Instant::now();
    let vmm = match std::env::var_os("NOVACRON_VMM") {
        Some(p) => PathBuf::from(p),
        None => {
            tokio::task::spawn_blocking(|| release_binary("novacron-vmm", "novacron-vmm").map_err(|e| e.to_string()))
                .await??
        }
    };
    let build = build.elapsed();
    // Short: a control socket path must fit in 107 bytes.
    let guard = VmmGuard(tempfile::Builder::new().prefix("ncbr").tempdir_in("/tmp")?);
    let mut config = HostConfig::new(guard.0.path(), &vmm);
    config.stop_timeout = Duration::from_secs(1);
    let (host, host_handle) = Actor::spawn(None, HostSupervisor, config).await?;
    let mut out = Vec::new();
    let mut result = Ok(());
    for i in 0..=runs {
        match restart_run(&host, guard.0.path(), i).await {
            // Run 0 warms up (page cache, first spawn).
            Ok(_) if i == 0 => eprintln!("part 2: warm-up run done"),
            Ok(r) => {
                eprintln!(
                    "part 2: run {i}/{runs}: cold boot {:>6.0} ms, restart after SIGKILL {:>6.0} ms (to the first heartbeat)",
                    ms(r.cold.heartbeat),
                    ms(r.restart.heartbeat)
                );
                out.push(r);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    host.stop(None);
    let _ = host_handle.await;
    drop(guard);
    result.map(|()| (out, build))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_restarts(runs: &[RestartRun]) {
    let stats = |f: &dyn Fn(&RestartRun) -> Duration| {
        let mut v: Vec<f64> = runs.iter().map(|r| ms(f(r))).collect();
        v.sort_by(f64::total_cmp);
        [novacron_benches::median(&mut v.clone()), percentile(&v, 90.0), v.last().copied().unwrap_or(f64::NAN)]
    };
    println!(
        "\nRestart after SIGKILL of the VMM, against a cold boot (CreateVm), test guest 1 vCPU 64 MiB `{WORKLOAD}`, \
         {} runs (ms: median / p90 / max)",
        runs.len()
    );
    println!(
        "| {:<44} | {:>26} | {:>26} | {:>13} |",
        "from the event to", "restart (from SIGKILL)", "cold boot (from CreateVm)", "ratio median"
    );
    println!("|---|---|---|---|");
    let fmt = |s: [f64; 3]| format!("{:>7.1} / {:>7.1} / {:>7.1}", s[0], s[1], s[2]);
    type Metric<'a> = (&'a str, &'a dyn Fn(&RestartRun) -> Duration, &'a dyn Fn(&RestartRun) -> Duration);
    let ended = stats(&|r| r.exited);
    println!(
        "| {:<44} | {:>26} | {:>26} | {:>13} |",
        "the old VMM's end (its pidfd is readable)",
        fmt(ended),
        "–",
        "–"
    );
    let reaction = stats(&|r| r.restart.first_line.saturating_sub(r.exited));
    println!(
        "| {:<44} | {:>26} | {:>26} | {:>13} |",
        "(its end to the new boot's first line)",
        fmt(reaction),
        "–",
        "–"
    );
    let metrics: [Metric; 3] = [
        ("the boot's first serial line", &|r| r.restart.first_line, &|r| r.cold.first_line),
        ("the boot's first heartbeat", &|r| r.restart.heartbeat, &|r| r.cold.heartbeat),
        ("(first line to first heartbeat: the guest)", &|r| r.restart.heartbeat - r.restart.first_line, &|r| {
            r.cold.heartbeat - r.cold.first_line
        }),
    ];
    for (name, restart, cold) in metrics {
        let (a, b) = (stats(restart), stats(cold));
        println!("| {name:<44} | {:>26} | {:>26} | {:>12.2}x |", fmt(a), fmt(b), a[0] / b[0]);
    }
    let reply = stats(&|r| r.create_reply);
    println!("| {:<44} | {:>26} | {:>26} | {:>13} |", "(CreateVm's reply: the VMM answers)", "–", fmt(reply), "–");
    println!(
        "  The restart includes the policy's delay: on-failure with its backoff pinned to {} ms \
         (`RestartPolicy::Always` waits {} ms; the on-failure default starts at 100 ms).",
        ms(RESTART_BACKOFF),
        ms(ALWAYS_DELAY)
    );
    println!(
        "  Restart minus cold boot (median, to the first heartbeat): {:+.1} ms. Serial log read every {} µs.",
        stats(&|r| r.restart.heartbeat)[0] - stats(&|r| r.cold.heartbeat)[0],
        POLL.as_micros()
    );
}

// ---------------------------------------------------------------------------------------

struct Options {
    runs: usize,
    calls: usize,
    only: Option<String>,
}

fn options() -> Result<Options, Error> {
    let mut o = Options { runs: 10, calls: CALLS, only: None };
    for arg in std::env::args().skip(1) {
        if let Ok(n) = arg.parse::<usize>() {
            o.runs = n.max(1);
        } else if let Some(v) = arg.strip_prefix("--calls=") {
            o.calls = v.parse::<usize>()?.max(CALLERS * 10);
        } else if let Some(v) = arg.strip_prefix("--only=") {
            if v != "messages" && v != "restart" {
                return Err(format!("--only={v}: choose messages or restart").into());
            }
            o.only = Some(v.to_string());
        } else if arg != "--bench" {
            return Err(format!("unknown argument {arg:?}").into());
        }
    }
    Ok(o)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let o = options()?;
    let mut report = None;
    let mut took = Vec::new();
    if o.only.as_deref() != Some("restart") {
        let start = Instant::now();
        report = Some(messages(o.calls).await?);
        took.push(format!("part 1 {:.0} s", start.elapsed().as_secs_f64()));
    }
    let mut restart = None;
    if o.only.as_deref() != Some("messages") {
        match kvm_usable() {
            Ok(()) => {
                let start = Instant::now();
                let (runs, build) = restarts(o.runs).await?;
                took.push(format!(
                    "part 2 {:.0} s, of which {:.0} s building novacron-vmm",
                    start.elapsed().as_secs_f64(),
                    build.as_secs_f64()
                ));
                restart = Some(runs);
            }
            Err(e) => {
                eprintln!("\n*** part 2 (restart after SIGKILL) SKIPPED: /dev/kvm is not usable here: {e} ***\n");
                took.push(format!("part 2 SKIPPED: {e}"));
            }
        }
    }
    if let Some((rows, rates, define)) = &report {
        print_messages(rows, rates, *define);
    }
    if let Some(runs) = &restart {
        print_restarts(runs);
    }
    println!("\n({})", took.join("; "));
    Ok(())
}
