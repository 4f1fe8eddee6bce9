//! `novacron demo`: the whole story in one command, with nothing to set up. It starts a
//! cluster of three hosts (`novacron daemon` processes on loopback, with a cluster CA made
//! on the spot), creates a VM of the bundled test guest through the gRPC control port,
//! live-migrates it to another host while the guest keeps verifying its memory, SIGKILLs
//! its VMM to show the supervisor booting it again, and prints a summary with the guest's
//! verdicts. Everything lives in a temporary directory that is gone afterwards (kept, for
//! its logs, when something failed).

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_daemon::client::{Client, Connect};
use novacron_daemon::pb;
use novacron_guest_image::binaries::{kill_vmms_under, vmm_pids_under};
use novacron_guest_image::report::{BOOT_LINE, GuestLine};
use novacron_guest_image::watch::SerialTail;
use novacron_vmm::process::error_chain;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const VM: &str = "demo";
/// The guest's heartbeat period (its `hb=` word).
const HB_MS: u64 = 250;
const TIMEOUT: Duration = Duration::from_secs(120);
/// How often the serial logs are read: the resolution of the guest-side timings.
const POLL: Duration = Duration::from_millis(10);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// vCPUs of the demo VM.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Memory of the demo VM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// The guest's working set in MiB, dirtied and verified continuously.
    #[arg(long, default_value_t = 32)]
    ws: u64,
    /// Pages the guest dirties per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
}

/// What the demo measured: the summary's rows as they were found, and the guest's verdicts.
#[derive(Default)]
struct Findings {
    rows: Vec<(&'static str, String)>,
    verify_ok: u64,
    verify_fail: u64,
    pages_verified: u64,
}

impl Findings {
    fn row(&mut self, label: &'static str, value: String) {
        self.rows.push((label, value));
    }

    fn note(&mut self, line: &GuestLine) {
        match *line {
            GuestLine::VerifyOk { pages, .. } => {
                self.verify_ok += 1;
                self.pages_verified = pages;
            }
            GuestLine::VerifyFail { .. } => self.verify_fail += 1,
            _ => {}
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C ends the demo through its usual clean-up, so that no host or VM is left behind.
fn interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::Relaxed) { Err("interrupted (Ctrl-C)".into()) } else { Ok(()) }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn failed(what: &str) -> impl Fn(tonic::Status) -> String {
    move |s| format!("cannot {what}: {}", s.message().replace('\n', " "))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Asks `probe` every POLL until it answers; fails with `what` after TIMEOUT.
async fn wait<T>(what: &str, mut probe: impl AsyncFnMut() -> Result<Option<T>, String>) -> Result<T, String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(answer) = probe().await? {
            return Ok(answer);
        }
        interrupted()?;
        if Instant::now() > deadline {
            return Err(format!("{what} within {} s", TIMEOUT.as_secs()));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A daemon process started by the demo.
struct Daemon {
    name: String,
    addr: String,
    child: Child,
    /// Kept open: the daemon would die of SIGPIPE if it wrote to a closed stdout.
    _stdout: BufReader<ChildStdout>,
}

/// The demo's hosts, with their data dirs and logs under `root`. Dropping it kills what
/// still runs: the daemons, then their VMMs (which run in sessions of their own).
struct Cluster {
    root: PathBuf,
    daemons: Vec<Daemon>,
}

impl Cluster {
    fn tls_dir(&self) -> PathBuf {
        self.root.join(HOSTS[0]).join("tls")
    }

    fn log(&self, host: &str) -> String {
        self.root.join(format!("{host}.log")).display().to_string()
    }

    /// Starts host `name`: the first one is the primary and makes the cluster's CA, the
    /// others get a certificate of that CA and join it.
    fn start_host(&mut self, name: &str, exe: &Path, vmm: &Path) -> Result<(), String> {
        let data = self.root.join(name);
        let mut cmd = Command::new(exe);
        cmd.args(["daemon", "--listen", "127.0.0.1:0", "--name", name, "--data-dir"]).arg(&data);
        cmd.arg("--vmm-binary").arg(vmm);
        if let Some(primary) = self.daemons.first() {
            let tls = data.join("tls");
            novacron_migration::tls::issue(&self.tls_dir(), &tls, name)
                .map_err(|e| format!("cannot issue the certificate of {name}: {}", error_chain(&e)))?;
            cmd.arg("--tls-dir").arg(&tls).arg("--join").arg(&primary.addr);
        }
        let log_path = self.log(name);
        let log = std::fs::File::create(&log_path).map_err(|e| format!("cannot create {log_path}: {e}"))?;
        // A process group of its own: Ctrl-C reaches only the demo, which stops everything.
        cmd.process_group(0).env("NOVACRON_LOG", "info");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start the daemon of {name}: {e}"))?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("the daemon's stdout is not a pipe")?);
        // The one line it prints: "novacron daemon: host NAME listening on ADDR; data dir ...".
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let Some(addr) = line.split(" listening on ").nth(1).and_then(|rest| rest.split(';').next()) else {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = text.lines().last().unwrap_or("it said nothing");
            return Err(format!("the daemon of {name} did not start: {last} (see {log_path})"));
        };
        let role = if self.daemons.is_empty() { "the primary; it made the cluster's CA" } else { "joined h1" };
        println!("    {name} listening on {addr} ({role})");
        self.daemons.push(Daemon { name: name.into(), addr: addr.into(), child, _stdout: stdout });
        Ok(())
    }

    /// Stops the daemons with SIGTERM, the primary first (so that it does not take the
    /// others' going for host failures), and checks that nothing is left running.
    fn stop(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for d in &mut self.daemons {
            // SAFETY: kill has no memory effects; the pid is our child, not yet waited for.
            unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
            while !matches!(d.child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let log = self.root.join(format!("{}.log", d.name));
                    return Err(format!("the daemon of {} did not stop on SIGTERM; see {}", d.name, log.display()));
                }
                std::thread::sleep(POLL);
            }
        }
        match vmm_pids_under(&self.root) {
            left if left.is_empty() => Ok(()),
            left => Err(format!("VMM processes {left:?} outlived their VM; see {}", self.log(HOSTS[0]))),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            if let Ok(None) = d.child.try_wait() {
                let _ = d.child.kill();
                let _ = d.child.wait();
            }
        }
        kill_vmms_under(&self.root);
    }
}

/// A VM's serial log, one line at a time as the guest writes it, each with the moment it
/// was read: what the guest-side timings measure.
struct Console {
    host: String,
    tail: SerialTail,
    /// Lines of the current file handed out so far.
    seen: usize,
    replaced: u32,
}

impl Console {
    fn new(host: &str, path: &str) -> Console {
        Console { host: host.into(), tail: SerialTail::new(Path::new(path)), seen: 0, replaced: 0 }
    }

    fn next(&mut self) -> Option<(Instant, GuestLine)> {
        if self.seen == self.tail.lines.len() {
            self.tail.poll();
        }
        // A restarted VMM writes a new file (the old one becomes NAME.serial.prev).
        if self.tail.replaced != self.replaced {
            (self.replaced, self.seen) = (self.tail.replaced, 0);
        }
        let line = self.tail.lines.get(self.seen).cloned()?;
        self.seen += 1;
        Some(line)
    }

    /// Echoes and notes every line so far (around the progress bar, if one is shown).
    fn drain(&mut self, f: &mut Findings, bar: &ProgressBar) {
        while let Some((_, line)) = self.next() {
            f.note(&line);
            bar.suspend(|| echo(&self.host, &line));
        }
    }

    /// Reads until a line satisfies `done`, echoing and noting every line.
    async fn until(
        &mut self,
        f: &mut Findings,
        what: &str,
        mut done: impl FnMut(&GuestLine) -> bool,
    ) -> Result<Instant, String> {
        let missing = format!("no {what} in {}", self.tail.path().display());
        wait(&missing, async || {
            while let Some((at, line)) = self.next() {
                f.note(&line);
                echo(&self.host, &line);
                if done(&line) {
                    return Ok(Some(at));
                }
            }
            Ok(None)
        })
        .await
    }
}

/// Prints what the guest reported, in the words of its serial log (docs/test-guest.md),
/// heartbeats once a second.
fn echo(host: &str, line: &GuestLine) {
    let text = match line {
        GuestLine::Heartbeat(n) if n % (1000 / HB_MS) != 0 => return,
        GuestLine::Heartbeat(n) => format!("HB {n}"),
        GuestLine::Boot => BOOT_LINE.into(),
        GuestLine::Banner { cpus, mem_mib } => format!("NOVACRON-GUEST v1 cpus={cpus} mem={mem_mib}"),
        GuestLine::Online(n) => format!("SMP online={n}"),
        GuestLine::Ready { pages } => format!("READY pages={pages}"),
        GuestLine::VerifyOk { epoch, pages, cpus } => format!("VERIFY OK epoch={epoch} pages={pages} cpus={cpus}"),
        GuestLine::VerifyFail { epoch, bad } => format!("VERIFY FAIL epoch={epoch} bad={bad}"),
        GuestLine::Trouble(text) | GuestLine::Other(text) => text.clone(),
    };
    println!("    {host} guest | {text}");
}

fn is_heartbeat(line: &GuestLine) -> bool {
    matches!(line, GuestLine::Heartbeat(_))
}

fn is_verdict(line: &GuestLine) -> bool {
    matches!(line, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
}

async fn get_vm(api: &mut Client) -> Result<pb::Vm, String> {
    Ok(api.get_vm(pb::VmRef { name: VM.into() }).await.map_err(failed("get VM demo"))?.into_inner())
}

async fn scenario(args: &DemoArgs, cluster: &Cluster, f: &mut Findings) -> Result<(), String> {
    step("Waiting until the primary sees every host up");
    let connect = |endpoint: &str| Connect { endpoint: endpoint.into(), tls_dir: cluster.tls_dir(), token: None };
    let mut api = connect(&cluster.daemons[0].addr).connect().await.map_err(|e| error_chain(&e))?;
    let hosts = wait(&format!("the hosts were not all up (see {})", cluster.log(HOSTS[0])), async || {
        let hosts = api.cluster_info(pb::ClusterInfoRequest {}).await.map_err(failed("list the hosts"))?;
        let hosts = hosts.into_inner().hosts;
        Ok(Some(hosts).filter(|hosts| hosts.iter().filter(|h| h.state == "up").count() == HOSTS.len()))
    })
    .await?;
    println!("    {:<4} {:<22} {:<6} {:>7} {:>12}", "HOST", "ADDRESS", "STATE", "VCPUS", "MEMORY");
    for h in &hosts {
        let (mem, role) = (format!("{} MiB", h.mem_mib), if h.primary { "  primary" } else { "" });
        println!("    {:<4} {:<22} {:<6} {:>7} {:>12}{role}", h.name, h.address, h.state, h.vcpus, mem);
    }
    f.row("hosts", format!("{} daemons on loopback, one cluster", hosts.len()));

    step(&format!(
        "Creating VM {VM} of the test guest: {} vCPUs, {} MiB, a {} MiB working set dirtied at {} pages/s and verified every second; restart policy \"always\"",
        args.vcpus, args.mem, args.ws, args.rate
    ));
    let spec = pb::VmSpec {
        name: VM.into(),
        vcpus: args.vcpus.into(),
        mem_mib: args.mem,
        cmdline: format!("ws={} rate={} verify=1000 hb={HB_MS}", args.ws, args.rate),
        restart: Some(pb::RestartPolicy { kind: "always".into(), ..Default::default() }),
        ..Default::default()
    };
    let created = Instant::now();
    let vm = api.create_vm(pb::CreateVmRequest { spec: Some(spec), start: Some(true) }).await;
    let vm = vm.map_err(failed("create VM demo"))?.into_inner();
    println!("    placed on {}; its console: {}", vm.host, vm.serial_log);
    let mut console = Console::new(&vm.host, &vm.serial_log);
    let first = console.until(f, "heartbeat", is_heartbeat).await?;
    println!("    the first heartbeat came {} after CreateVm", ms(first - created));
    f.row("boot", format!("{} from CreateVm to the first heartbeat", ms(first - created)));
    console.until(f, "second memory verification", |l| matches!(l, GuestLine::VerifyOk { epoch: 2, .. })).await?;

    let mut console = migrate(&mut api, cluster, &hosts, console, f).await?;
    restart(&mut api, cluster, &mut console, f).await?;

    step("Deleting the VM and stopping the hosts");
    api.delete_vm(pb::VmRef { name: VM.into() }).await.map_err(failed("delete VM demo"))?;
    if f.verify_fail > 0 {
        return Err(format!("the guest found its memory corrupted {} times (see above)", f.verify_fail));
    }
    Ok(())
}

/// Moves the VM to a host that is neither its own nor the primary (a member answers GetVm
/// about a VM it receives itself, with its new serial log); returns that log's console.
async fn migrate(
    api: &mut Client,
    cluster: &Cluster,
    hosts: &[pb::Host],
    mut src: Console,
    f: &mut Findings,
) -> Result<Console, String> {
    let to = hosts.iter().find(|h| !h.primary && h.name != src.host).ok_or("no host to migrate to")?;
    step(&format!(
        "Live-migrating VM {VM} from {} to {} (QUIC, mutual TLS) while the guest keeps dirtying and verifying its memory",
        src.host, to.name
    ));
    let request = pb::MigrateVmRequest { name: VM.into(), to_host: to.name.clone(), ..Default::default() };
    let op = api.migrate_vm(request).await.map_err(failed("start the migration"))?.into_inner();
    let connect = Connect { endpoint: to.address.clone(), tls_dir: cluster.tls_dir(), token: None };
    let mut member = connect.connect().await.map_err(|e| error_chain(&e))?;
    let arriving = member.get_vm(pb::VmRef { name: VM.into() }).await.map_err(failed("find the arriving VM"))?;
    let mut dst = Console::new(&to.name, &arriving.into_inner().serial_log);

    let bar = ProgressBar::new(100);
    if let Ok(style) = ProgressStyle::with_template("    {spinner} {bar:30} {pos:>3}% {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let end = follow(api, op, &bar, [&mut src, &mut dst], f).await;
    bar.finish_and_clear();
    // The source's last lines, written just before it stopped.
    src.drain(f, &bar);
    let end = end?;
    if end.state != "succeeded" {
        return Err(format!("the migration failed: {}; see {}", end.error, cluster.log(&src.host)));
    }
    println!("    {}", end.message);

    // The destination's console was read during the move: its first heartbeat may be in.
    if dst.tail.last_heartbeat().is_none() {
        dst.until(f, "heartbeat at the destination", is_heartbeat).await?;
    }
    let (Some(&(last_at, before)), Some(&(first_at, after))) =
        (src.tail.heartbeats().last(), dst.tail.heartbeats().first())
    else {
        return Err(format!("no heartbeat at the source in {}", src.tail.path().display()));
    };
    if after != before + 1 {
        return Err(format!("the guest's heartbeats jumped from HB {before} to HB {after} across the migration"));
    }
    // The primary learns where the VM went just after the operation ends.
    let vm = wait(&format!("the primary did not place VM {VM} on {}", to.name), async || {
        match api.get_vm(pb::VmRef { name: VM.into() }).await {
            Ok(vm) => Ok(Some(vm.into_inner()).filter(|vm| vm.host == to.name)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(failed("get VM demo")(s)),
        }
    })
    .await?;
    if Path::new(&vm.serial_log) != dst.tail.path() {
        return Err(format!(
            "VM {VM}'s console is {}, not {} as the host said",
            vm.serial_log,
            dst.tail.path().display()
        ));
    }
    dst.until(f, "memory verification at the destination", is_verdict).await?;

    let (m, route) = (&end.message, format!("{} -> {}", src.host, to.name));
    let (total, rounds) = (number_near(m, "in", 1), number_near(m, "rounds", -1));
    f.row("live migration", format!("{route}: {total} ms in all, {rounds} rounds"));
    f.row("downtime", format!("{} ms (the VM paused for the switchover)", number_near(m, "downtime", 1)));
    f.row("memory sent", format!("{} MiB", number_near(m, "MiB", -1)));
    let gap = ms(first_at.saturating_duration_since(last_at));
    f.row("pause the guest saw", format!("{gap} from HB {before} to HB {after} (one every {HB_MS} ms)"));
    Ok(dst)
}

/// The number `offset` words away from `word` in the migration's result, "moved in N ms,
/// N rounds, downtime N ms, N MiB sent, memory verified (DIGEST)"; "?" if there is none.
fn number_near<'a>(text: &'a str, word: &str, offset: isize) -> &'a str {
    let words: Vec<&str> = text.split_whitespace().map(|w| w.trim_end_matches(',')).collect();
    let at = words.iter().position(|w| *w == word).and_then(|i| i.checked_add_signed(offset));
    at.and_then(|i| words.get(i)).copied().filter(|w| w.parse::<f64>().is_ok()).unwrap_or("?")
}

/// Follows the migration to its end with a progress bar, echoing both consoles meanwhile.
async fn follow(
    api: &mut Client,
    op: pb::Operation,
    bar: &ProgressBar,
    mut consoles: [&mut Console; 2],
    f: &mut Findings,
) -> Result<pb::Operation, String> {
    let stream = api.watch_operation(pb::OperationRef { id: op.id.clone() }).await;
    let mut stream = stream.map_err(failed("follow the migration"))?.into_inner();
    let (mut last, deadline) = (op, Instant::now() + TIMEOUT);
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            next = stream.message() => match next.map_err(failed("follow the migration"))? {
                Some(op) => {
                    bar.set_position(op.percent.into());
                    bar.set_message(op.message.clone());
                    last = op;
                }
                None => return Ok(last),
            },
            _ = tick.tick() => {
                for c in consoles.iter_mut() {
                    c.drain(f, bar);
                }
                interrupted()?;
                if Instant::now() > deadline {
                    return Err(format!("the migration did not end within {} s: {}", TIMEOUT.as_secs(), last.message));
                }
            }
        }
    }
}

/// SIGKILLs the VM's VMM and waits for its supervisor to boot it again.
async fn restart(api: &mut Client, cluster: &Cluster, console: &mut Console, f: &mut Findings) -> Result<(), String> {
    let vm = get_vm(api).await?;
    if vm.pid == 0 || !vmm_pids_under(&cluster.root).contains(&vm.pid) {
        return Err(format!("the VMM of VM {VM} (pid {}) is not a process of this demo", vm.pid));
    }
    step(&format!("Killing the VM's VMM (pid {}) with SIGKILL: its supervisor on {} boots it again", vm.pid, vm.host));
    // SAFETY: kill has no memory effects; the pid is a VMM of this demo's hosts.
    if unsafe { libc::kill(vm.pid as i32, libc::SIGKILL) } != 0 {
        return Err(format!("cannot SIGKILL pid {}: {}", vm.pid, std::io::Error::last_os_error()));
    }
    let killed = Instant::now();
    let mut booted = false;
    let first = console
        .until(f, "heartbeat after the restart", |l| {
            booted |= *l == GuestLine::Boot;
            booted && is_heartbeat(l)
        })
        .await?;
    let log = cluster.log(&vm.host);
    let vm = wait(&format!("VM {VM} was not running again (see {log})"), async || {
        let vm = get_vm(api).await?;
        Ok(Some(vm).filter(|vm| vm.restarts >= 1 && vm.phase == "running"))
    })
    .await?;
    println!("    restarts: {}; the last VMM ended: {}; the new one is pid {}", vm.restarts, vm.last_exit, vm.pid);
    f.row("restarts", format!("{} (the VMM was killed with SIGKILL)", vm.restarts));
    f.row("SIGKILL -> heartbeat", ms(first - killed));
    if vm.restarts != 1 {
        return Err(format!("VM {VM} was restarted {} times, once expected; see {log}", vm.restarts));
    }
    console.until(f, "memory verification after the restart", is_verdict).await?;
    Ok(())
}

/// The VMM binary the daemons run: $NOVACRON_VMM, or `novacron-vmm` next to this program.
fn vmm_binary(exe: &Path) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("NOVACRON_VMM") {
        return Ok(path.into());
    }
    let dir = exe.parent().ok_or("the novacron binary has no directory")?;
    let vmm = dir.join("novacron-vmm");
    let release = if dir.ends_with("release") { " --release" } else { "" };
    // Under `cargo run` (the README's first command) the VMM is built here too, so that
    // the demo needs nothing but that command; a fresh build is a no-op.
    if let (Some(cargo), Some(manifest)) = (std::env::var_os("CARGO"), std::env::var_os("CARGO_MANIFEST_DIR")) {
        step(&format!("Building the per-VM process: cargo build{release} -p novacron-vmm"));
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "novacron-vmm", "--bin", "novacron-vmm", "--manifest-path"]);
        build.arg(Path::new(&manifest).join("Cargo.toml"));
        if !release.is_empty() {
            build.arg("--release");
        }
        let built = build.status().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !built.success() {
            return Err(format!("cargo build{release} -p novacron-vmm failed"));
        }
    }
    if vmm.is_file() {
        return Ok(vmm);
    }
    Err(format!("{} is missing: build it with `cargo build{release} -p novacron-vmm`", vmm.display()))
}

/// Starts the hosts, tells the story, and stops them.
fn story(args: &DemoArgs, cluster: &mut Cluster, exe: &Path, vmm: &Path, f: &mut Findings) -> Result<(), String> {
    for name in HOSTS {
        cluster.start_host(name, exe, vmm)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let runtime = runtime.map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(scenario(args, cluster, f));
    // Its connections close with it: the daemons' graceful stop waits for them.
    drop(runtime);
    result?;
    cluster.stop()
}

/// The whole demo; every process it started is gone when it returns. Its directory goes
/// too, unless something failed: then it stays, for its logs.
fn demo(args: &DemoArgs, f: &mut Findings) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the novacron binary: {e}"))?;
    let vmm = vmm_binary(&exe)?;
    // Short: the VMs' control sockets under it must fit in 107 bytes.
    let dir = tempfile::Builder::new().prefix("ncdemo").tempdir_in("/tmp");
    let dir = dir.map_err(|e| format!("cannot create a temporary directory in /tmp: {e}"))?;
    step(&format!(
        "Starting three hosts: `novacron daemon` processes on loopback, data dirs in {}",
        dir.path().display()
    ));
    let mut cluster = Cluster { root: dir.path().to_owned(), daemons: Vec::new() };
    let result = story(args, &mut cluster, &exe, &vmm, f);
    // Before the directory goes: the hosts run from it.
    drop(cluster);
    match result {
        // Asked to stop: nothing to look into.
        Err(e) if INTERRUPTED.load(Ordering::Relaxed) => Err(e),
        Err(e) => Err(format!("{e} (the hosts' logs are kept in {})", dir.keep().display())),
        Ok(()) => Ok(()),
    }
}

pub fn run(args: &DemoArgs) -> i32 {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    let started = Instant::now();
    let mut f = Findings::default();
    let outcome = demo(args, &mut f);
    if !f.rows.is_empty() {
        println!("\n  NovaCron demo summary");
        f.row("VERIFY OK", format!("{} ({} pages each)", f.verify_ok, f.pages_verified));
        f.row("VERIFY FAIL", f.verify_fail.to_string());
        for (label, value) in &f.rows {
            println!("  {label:<22} {value}");
        }
    }
    match outcome {
        Ok(()) => {
            println!(
                "\n  Done in {:.1} s: the guest verified its memory throughout, went on with the next heartbeat on another host, and was booted again after its VMM was killed.",
                started.elapsed().as_secs_f64()
            );
            0
        }
        Err(e) => {
            eprintln!("novacron: demo failed: {e}");
            1
        }
    }
}
