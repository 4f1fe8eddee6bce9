//! Real `novacron daemon` processes for the daemon and cluster tests, and the CLI pointed
//! at them.

use super::{TIMEOUT, novacron, stderr};
use novacron_guest_image::report::{GuestLine, parse};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// A daemon process with its data dir. Dropping it kills the daemon and every VMM it
/// started, and removes the data dir.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub name: String,
    /// More arguments of every start (labels, --join, --tls-dir, ...).
    pub extra: Vec<String>,
    /// File systems mounted on the data dir (unmounted when dropped).
    mounts: Vec<PathBuf>,
    /// The network namespace the daemon runs in (and its keeper and VMMs with it).
    pub netns: Option<String>,
}

impl Daemon {
    /// Starts a daemon named `name` on a free loopback port with a new data dir.
    pub fn start(name: &str) -> Daemon {
        Self::start_with(name, &[])
    }

    /// A daemon with more arguments (kept for its restarts).
    pub fn start_with(name: &str, extra: &[&str]) -> Daemon {
        let mut daemon = Self::new(name, extra);
        daemon.restart("127.0.0.1:0");
        daemon
    }

    /// A daemon that joins `primary`'s cluster, with a certificate of its CA.
    pub fn join(name: &str, primary: &Daemon, extra: &[&str]) -> Daemon {
        let mut daemon = Self::new(name, extra);
        let tls = daemon.tls_dir();
        super::issue_cert(name, &primary.tls_dir(), &tls);
        daemon.extra.extend([
            "--tls-dir".to_string(),
            tls.display().to_string(),
            "--join".into(),
            primary.addr.clone(),
        ]);
        daemon.restart("127.0.0.1:0");
        daemon
    }

    /// A daemon of a cluster on etcd (`etcd`: its client URLs), with a certificate of the
    /// CA in `ca_dir` (etcd's too).
    pub fn on_etcd(name: &str, ca_dir: &Path, etcd: &[String], extra: &[&str]) -> Daemon {
        let mut daemon = Self::for_etcd(name, ca_dir, etcd, extra);
        daemon.restart("127.0.0.1:0");
        daemon
    }

    /// As `on_etcd`, not started yet.
    pub fn for_etcd(name: &str, ca_dir: &Path, etcd: &[String], extra: &[&str]) -> Daemon {
        let mut daemon = Self::new(name, extra);
        let tls = daemon.tls_dir();
        super::issue_cert(name, ca_dir, &tls);
        daemon.extra.extend(["--tls-dir".to_string(), tls.display().to_string(), "--etcd".into(), etcd.join(",")]);
        daemon
    }

    /// A daemon's data dir and arguments, not started yet (`restart` starts it).
    pub fn new(name: &str, extra: &[&str]) -> Daemon {
        // Short: control socket paths must fit in 107 bytes.
        let dir = tempfile::Builder::new().prefix("ncd").tempdir_in("/tmp").unwrap();
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Daemon { child: None, dir, addr: String::new(), name: name.into(), extra, mounts: Vec::new(), netns: None }
    }

    /// Mounts a tmpfs of `size` (e.g. "16m") on the data dir, before the daemon starts.
    pub fn mount_tmpfs(&mut self, size: &str) {
        let dir = self.dir.path().to_owned();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount -t tmpfs (tests run as root): {}", stderr(&out));
        self.mounts.push(dir);
    }

    /// Starts the daemon expecting it to refuse to start; answers its exit code and its
    /// stderr. A daemon that starts instead is killed and fails the test.
    pub fn start_refused(&mut self) -> (Option<i32>, String) {
        let mut child = self.command("127.0.0.1:0").stderr(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        if line.contains("listening on") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started: {line}");
        }
        let out = child.wait_with_output().unwrap();
        (out.status.code(), stderr(&out))
    }

    /// Runs `call` with a gRPC client of this daemon (its node certificate), on a runtime
    /// of its own.
    pub fn grpc<T>(&self, call: impl AsyncFnOnce(novacron_daemon::client::Client) -> T) -> T {
        super::block_on(async {
            let connect =
                novacron_daemon::client::Connect { endpoint: self.addr.clone(), tls_dir: self.tls_dir(), token: None };
            call(connect.connect().await.unwrap()).await
        })
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The daemon's command line on this data dir, its stdout piped (the line it prints
    /// when it listens).
    fn command(&self, listen: &str) -> std::process::Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                // `ip netns exec` execs the daemon: the child's pid is the daemon's.
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(env!("CARGO_BIN_EXE_novacron"));
                cmd
            }
            None => novacron(),
        };
        cmd.args(["daemon", "--listen", listen, "--name", &self.name, "--data-dir"])
            .arg(self.dir.path())
            .arg("--vmm-binary")
            .arg(novacron_guest_image::binaries::vmm_binary())
            .args(&self.extra)
            .env("NOVACRON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        cmd
    }

    /// (Re)starts the daemon process on the same data dir, listening on `listen`.
    pub fn restart(&mut self, listen: &str) {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).unwrap();
        let mut child = self.command(listen).stderr(log).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split(" listening on ").nth(1).and_then(|rest| rest.split(';').next());
        let Some(addr) = addr else {
            let _ = child.kill();
            panic!("the daemon did not start: {line:?}; log: {}", self.log());
        };
        self.addr = addr.to_string();
        self.child = Some(child);
    }

    /// The ends of the daemon's, the keeper's and the VMMs' logs, for a failed test.
    fn print_log_tails(&self) {
        let run = self.dir.path().join("run");
        let vmm_logs = std::fs::read_dir(&run).into_iter().flatten().flatten().map(|e| e.path());
        let logs = [self.dir.path().join("daemon.log"), self.dir.path().join("keeper.log")]
            .into_iter()
            .chain(vmm_logs.filter(|p| p.extension().is_some_and(|e| e == "log")));
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} ({}), the last lines of {}:", self.name, self.addr, log.display());
            for line in &lines[lines.len().saturating_sub(25)..] {
                eprintln!("{line}");
            }
        }
    }

    /// Starts the daemon again on the address it listened on before (another port).
    pub fn start_again(&mut self) {
        let ip = self.addr.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip).to_string();
        self.restart(&format!("{ip}:0"));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERMs the daemon (not its VMMs) and waits for it to end.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory effects; the pid is this test's daemon.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(status.success(), "the daemon ended with {status}: {}", self.log());
        }
    }

    /// SIGKILLs the daemon (not its VMMs).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The whole host dies: its daemon, its keeper and its VMMs (the guests with them).
    pub fn kill_host(&mut self) {
        self.kill();
        novacron_guest_image::binaries::kill_vmms_under(self.dir.path());
    }

    pub fn keeper_pids(&self) -> Vec<u32> {
        novacron_guest_image::binaries::keeper_pids_under(self.dir.path())
    }

    /// The CLI with this daemon's endpoint and a certificate of its cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        novacron().arg("--endpoint").arg(&self.addr).arg("--tls-dir").arg(self.tls_dir()).args(args).output().unwrap()
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "novacron {args:?} failed: {}\ndaemon log: {}", stderr(&out), self.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn vm(&self, name: &str) -> serde_json::Value {
        self.json(&["vm", "show", name])
    }

    /// Waits until `vm show NAME` satisfies `ok`; returns that answer.
    pub fn wait_vm(&self, name: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            // Errors count as "not yet" (a host of the cluster may be between two polls).
            let out = self.cli(&["vm", "show", name, "--output", "json"]);
            let vm = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if out.status.success() && ok(&vm) {
                return vm;
            }
            assert!(Instant::now() < deadline, "VM {name} never {what}: {vm} {}", stderr(&out));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The names `vm list` gives, in its order.
    pub fn vm_names(&self) -> Vec<String> {
        let listed = self.json(&["vm", "list"]);
        listed.as_array().into_iter().flatten().map(|v| str_of(&v["spec"], "name").to_string()).collect()
    }

    pub fn vmm_pids(&self) -> Vec<u32> {
        novacron_guest_image::binaries::vmm_pids_under(self.dir.path())
    }

    /// The VMM processes of VM `vm` on this daemon's host (by the control socket their
    /// command line names).
    pub fn vmm_pids_of(&self, vm: &str) -> Vec<u32> {
        let socket = format!("/{vm}.sock\0");
        let serves = |pid: &u32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&socket)
        };
        self.vmm_pids().into_iter().filter(serves).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tails();
        }
        self.kill();
        novacron_guest_image::binaries::kill_vmms_under(self.dir.path());
        for dir in &self.mounts {
            // Lazily: a VMM just killed may still hold a file open for a moment.
            let _ = std::process::Command::new("umount").arg("-l").arg(dir).status();
        }
    }
}

/// CPU time a process has used (user and system), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The file descriptors a process has open now.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The heartbeat numbers and boot count in a serial log so far.
pub fn serial(path: &Path) -> (Vec<u64>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut beats = Vec::new();
    let mut boots = 0;
    for line in text.lines() {
        match parse(line) {
            GuestLine::Heartbeat(n) => beats.push(n),
            GuestLine::Boot => boots += 1,
            _ => {}
        }
    }
    (beats, boots)
}

/// Waits until the serial log shows a heartbeat above `after`; returns it.
pub fn wait_heartbeat(path: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(&n) = serial(path).0.last().filter(|n| **n > after) {
            return n;
        }
        assert!(Instant::now() < deadline, "no heartbeat above {after} in {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn str_of<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

pub fn pid_of(v: &serde_json::Value) -> u32 {
    v["pid"].as_u64().unwrap_or(0) as u32
}

/// The one line a refused daemon prints to say why (its logs aside); fails the test unless
/// there is exactly one, and on a panic.
pub fn refusal_line(err: &str) -> String {
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("novacron daemon: ")).collect();
    assert_eq!(lines.len(), 1, "one line says why: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
    lines[0].to_string()
}
