//! Shared by the comparison benchmarks: finding (and building) our binaries, installing
//! QEMU, timing a VM process to its first console line, its memory, and printing results.
//!
//! Figures are medians over repeated runs, with our VMM and QEMU alternating in one run of
//! the harness, and reported as ratios: never as pass/fail timings in tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type Error = Box<dyn std::error::Error>;

/// Builds `bin` of `package` in release mode (cargo does not hold its lock while a bench
/// runs) and returns its path.
pub fn release_binary(package: &str, bin: &str) -> Result<PathBuf, Error> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building {bin} (release)...");
    let status = Command::new(cargo).args(["build", "--release", "--quiet", "-p", package, "--bin", bin]).status()?;
    if !status.success() {
        return Err(format!("cargo build of {bin} failed").into());
    }
    // This harness runs from target/release/deps.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or("cannot find target/release")?;
    let path = dir.join(bin);
    if !path.exists() {
        return Err(format!("{} was not built", path.display()).into());
    }
    Ok(path)
}

/// Finds qemu-system-x86_64, installing Debian's qemu-system-x86 when it is missing.
pub fn qemu() -> Result<PathBuf, Error> {
    let find = || {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("qemu-system-x86_64 is missing: installing qemu-system-x86 with apt-get...");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?
        .success()
        || (Command::new("apt-get").args(["update", "-qq"]).status()?.success()
            && Command::new("apt-get")
                .args(["install", "-y", "-qq", "qemu-system-x86"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?
                .success());
    if !ok {
        return Err("apt-get could not install qemu-system-x86".into());
    }
    find().ok_or_else(|| "qemu-system-x86_64 is still not on PATH after installing qemu-system-x86".into())
}

/// Writes the test guest's ELF to `dir` so that both VMMs boot the very same file.
pub fn test_guest_file(dir: &Path) -> Result<PathBuf, Error> {
    let path = dir.join("novacron-test-guest.elf");
    std::fs::write(&path, novacron_guest_image::ELF)?;
    Ok(path)
}

/// A VM process started for measurement; killed when dropped.
pub struct Run {
    pub child: Child,
    /// Spawn to the first complete line on stdout.
    pub first_line: Duration,
    pub line: String,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` and waits for its first stdout line.
pub fn spawn_to_first_line(mut cmd: Command, timeout: Duration) -> Result<Run, Error> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send((Instant::now(), line));
    });
    match rx.recv_timeout(timeout) {
        Ok((at, line)) if !line.is_empty() => {
            Ok(Run { child, first_line: at - start, line: line.trim_end().to_string() })
        }
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{cmd:?} printed no line within {timeout:?}").into())
        }
    }
}

/// Memory of a process: peak RSS, and what its guest-memory mapping has resident.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub peak_rss_kib: u64,
    pub guest_rss_kib: u64,
}

impl Memory {
    /// The VMM's own memory: its peak resident set beyond the guest's pages.
    pub fn overhead_kib(&self) -> u64 {
        self.peak_rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

/// Reads VmHWM from /proc/PID/status, and the RSS of the largest anonymous mapping at least
/// `guest_bytes` long from /proc/PID/smaps (guest RAM, in any VMM).
pub fn memory_of(pid: u32, guest_bytes: u64) -> Result<Memory, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |text: &str, key: &str| -> Option<u64> {
        text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
    };
    let peak_rss_kib = kib(&status, "VmHWM:").ok_or("no VmHWM")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut guest_rss_kib = 0;
    let mut size_bytes = 0u64;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
            size_bytes =
                u64::from_str_radix(b, 16).unwrap_or(0).saturating_sub(u64::from_str_radix(a, 16).unwrap_or(0));
        } else if first == "Rss:" && size_bytes >= guest_bytes {
            guest_rss_kib = guest_rss_kib.max(words.next().and_then(|v| v.parse().ok()).unwrap_or(0));
        }
    }
    Ok(Memory { peak_rss_kib, guest_rss_kib })
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_median_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn test_memory_of_this_process_finds_a_large_mapping() {
        let block = vec![1u8; 64 << 20];
        let m = memory_of(std::process::id(), 32 << 20).unwrap();
        assert!(m.guest_rss_kib >= 60 << 10, "{m:?}");
        assert!(m.peak_rss_kib >= m.guest_rss_kib);
        drop(block);
    }
}

/// Device models without KVM: a device on its transport with the host-side driver, in
/// guest memory of its own, for the device benchmarks.
pub mod rig {
    use novacron_devices::GuestMemory;
    use novacron_devices::virtio::VirtioDevice;
    use novacron_devices::virtio::driver::{QueueDriver, initialize};
    use novacron_devices::virtio::mmio::MmioTransport;
    use vm_memory::GuestAddress;

    pub const MEM_BYTES: usize = 64 << 20;

    pub fn event_fd() -> vmm_sys_util::eventfd::EventFd {
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
    }

    pub struct Rig {
        pub t: MmioTransport,
        pub mem: GuestMemory,
        pub queues: Vec<QueueDriver>,
    }

    /// Brings `device` up with `queues` queues of `size` entries.
    pub fn rig(device: Box<dyn VirtioDevice>, features: u64, queues: usize, size: u16) -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory");
        let mut t = MmioTransport::new(device, mem.clone());
        let drivers: Vec<QueueDriver> =
            (0..queues).map(|i| QueueDriver::new(GuestAddress(0x10000 + i as u64 * 0x10000), size)).collect();
        initialize(&mut t, features, &drivers.iter().collect::<Vec<_>>());
        Rig { t, mem, queues: drivers }
    }

    /// A scratch file of `bytes` on tmpfs, so that device benchmarks measure the device
    /// model, not a disk.
    pub fn tmpfs_image(name: &str, bytes: u64) -> std::path::PathBuf {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("novacron-bench-{name}-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).expect("bench image");
        f.set_len(bytes).expect("bench image size");
        path
    }
}

/// A client for QEMU's machine protocol (QMP): JSON commands over a Unix socket.
pub mod qmp {
    use super::Error;
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    pub struct Qmp {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Qmp {
        /// Connects to the socket QEMU creates with `-qmp unix:PATH,server=on,wait=off`
        /// (retrying until it exists, at most `timeout`), reads the greeting and leaves
        /// capabilities negotiation mode.
        pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
            let deadline = Instant::now() + timeout;
            let stream = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(format!("cannot connect to QMP at {}: {e}", path.display()).into());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut qmp = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream };
            let greeting = qmp.read()?;
            if greeting.get("QMP").is_none() {
                return Err(format!("not a QMP greeting: {greeting}").into());
            }
            qmp.execute("qmp_capabilities", Value::Null)?;
            Ok(qmp)
        }

        fn read(&mut self) -> Result<Value, Error> {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err("QMP connection closed".into());
            }
            Ok(serde_json::from_str(&line)?)
        }

        /// Runs `command` (with `arguments` unless they are null) and returns its
        /// "return" value; an "error" answer is an error. Events in between are skipped.
        pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
            let mut request = serde_json::json!({ "execute": command });
            if !arguments.is_null() {
                request["arguments"] = arguments;
            }
            writeln!(self.writer, "{request}")?;
            loop {
                let mut answer = self.read()?;
                if let Some(r) = answer.get_mut("return") {
                    return Ok(r.take());
                }
                if let Some(e) = answer.get("error") {
                    return Err(format!("QMP {command}: {}", e["desc"].as_str().unwrap_or("error")).into());
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::os::unix::net::UnixListener;

        #[test]
        fn test_qmp_negotiates_skips_events_and_reports_errors() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let server = std::thread::spawn(move || {
                let (s, _) = listener.accept().unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
                let mut requests = Vec::new();
                for answer in [
                    r#"{"return": {}}"#,
                    "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"completed\"}}",
                    r#"{"error": {"class": "GenericError", "desc": "no such capability"}}"#,
                ] {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    requests.push(line);
                    writeln!(w, "{answer}").unwrap();
                }
                requests
            });
            let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
            let r = q.execute("query-migrate", Value::Null).unwrap();
            assert_eq!(r["status"], "completed");
            let e = q.execute("migrate-set-capabilities", serde_json::json!({"capabilities": []})).unwrap_err();
            assert!(e.to_string().contains("no such capability"), "{e}");
            let requests = server.join().unwrap();
            assert!(requests[0].contains("qmp_capabilities") && !requests[0].contains("arguments"));
            assert!(requests[2].contains(r#""arguments":{"capabilities":[]}"#), "{}", requests[2]);
        }
    }
}

/// A network namespace of the benchmark's own, so that the loopback traffic of one
/// migration can be counted on its `lo` (IP packets both ways, headers included) whatever
/// else runs on the machine.
pub mod netns {
    use super::Error;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    pub struct NetNs {
        name: String,
        file: File,
    }

    impl NetNs {
        /// `ip netns add NAME` with its loopback up (needs root and iproute2).
        pub fn new(name: &str) -> Result<Self, Error> {
            let ip = |args: &[&str]| -> Result<(), Error> {
                let out = Command::new("ip").args(args).output()?;
                if !out.status.success() {
                    return Err(
                        format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()).into()
                    );
                }
                Ok(())
            };
            ip(&["netns", "add", name])?;
            let made = NetNs { name: name.to_string(), file: File::open(format!("/run/netns/{name}"))? };
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            Ok(made)
        }

        /// Makes `cmd` start inside this namespace.
        pub fn enter(&self, cmd: &mut Command) {
            let fd = self.file.as_raw_fd();
            // The closure runs in the forked child before exec; `self.file` outlives the spawn.
            // SAFETY: only setns (async-signal-safe), on a descriptor the child inherited open.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    impl Drop for NetNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        }
    }

    /// Bytes sent on `lo` in the network namespace of process `pid`.
    pub fn lo_bytes(pid: u32) -> Option<u64> {
        parse_lo_tx_bytes(&std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?)
    }

    /// The transmit byte count of `lo` in a /proc/net/dev table.
    pub fn parse_lo_tx_bytes(table: &str) -> Option<u64> {
        let line = table.lines().find(|l| l.trim_start().starts_with("lo:"))?;
        line.split_once(':')?.1.split_whitespace().nth(8)?.parse().ok()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn test_parse_lo_tx_bytes_reads_the_ninth_number() {
            let table = "Inter-|   Receive                                                |  Transmit\n \
                 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                 lo: 1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0\n  \
                 eth0: 5 1 0 0 0 0 0 0 6 1 0 0 0 0 0 0\n";
            assert_eq!(super::parse_lo_tx_bytes(table), Some(2000));
            assert_eq!(super::parse_lo_tx_bytes("nothing"), None);
        }
    }
}

/// Work and time of every timed iteration, by benchmark name, for the summary a criterion
/// bench prints after its own lines (criterion keeps its estimates to itself).
/// Page contents for the benchmarks: a guest's text, code and compressed data, and a
/// realistic memory image made of them in runs.
pub mod contents {
    use std::io::Write;
    use std::path::Path;

    pub const PAGE: usize = 4096;

    pub fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A page of random-ish text: words from a small vocabulary (zstd-1 makes it about a
    /// third of its size, like logs, configuration and source in a real guest's page cache).
    pub fn text_page(page: u64) -> Vec<u8> {
        const WORDS: [&str; 24] = [
            "the",
            "migration",
            "page",
            "of",
            "memory",
            "kernel",
            "and",
            "a",
            "dirty",
            "vcpu",
            "round",
            "to",
            "send",
            "guest",
            "host",
            "in",
            "zero",
            "delta",
            "batch",
            "stream",
            "quic",
            "state",
            "ok",
            "error:",
        ];
        let mut p = Vec::with_capacity(PAGE + 16);
        let mut x = page.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        while p.len() < PAGE {
            x = splitmix(x);
            p.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
            p.push(if x >> 60 == 0 { b'\n' } else { b' ' });
            if x >> 56 == 1 {
                p.extend_from_slice(format!("{}", x >> 40).as_bytes());
            }
        }
        p.truncate(PAGE);
        p
    }

    /// Noise no compressor shrinks: compressed files, encrypted data, media.
    pub fn random_page(page: u64) -> Vec<u8> {
        (0..PAGE / 8).flat_map(|i| splitmix(page * 512 + i as u64).to_le_bytes()).collect()
    }

    /// What a realistic image holds, in pages of each kind.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Mix {
        pub text: u64,
        pub code: u64,
        pub random: u64,
        pub zero: u64,
        pub sparse: u64,
    }

    impl std::fmt::Display for Mix {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mib = |pages: u64| pages as f64 * PAGE as f64 / f64::from(1u32 << 20);
            write!(
                f,
                "{:.0} MiB text, {:.0} MiB code, {:.0} MiB random/compressed, {:.0} MiB zero, {:.0} MiB sparse pages",
                mib(self.text),
                mib(self.code),
                mib(self.random),
                mib(self.zero),
                mib(self.sparse)
            )
        }
    }

    /// Writes `bytes` of a guest's memory as it looks after a while, to `path`: runs of 1
    /// to 64 pages of text (30%), machine code (25%, pages of the ELF file `code`, in
    /// order), random or compressed data (20%), zero pages (15%) and sparse pages (10%, a
    /// few words set in a zero page), the kinds and lengths drawn from a fixed seed.
    pub fn realistic_image(path: &Path, bytes: u64, code: &Path) -> std::io::Result<Mix> {
        let code = std::fs::read(code)?;
        let code_pages = (code.len() / PAGE).max(1) as u64;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        let pages = bytes / PAGE as u64;
        let (mut mix, mut page, mut x, mut code_at) = (Mix::default(), 0u64, 0x5eed_u64, 0u64);
        while page < pages {
            x = splitmix(x);
            let run = (1 + (x >> 58)).min(pages - page);
            let kind = (x % 100) as u32;
            for p in page..page + run {
                let content = match kind {
                    0..30 => {
                        mix.text += 1;
                        text_page(p)
                    }
                    30..55 => {
                        mix.code += 1;
                        let at = (code_at % code_pages) as usize * PAGE;
                        code_at += 1;
                        let mut c = code.get(at..at + PAGE).map_or_else(|| vec![0xcc; PAGE], <[u8]>::to_vec);
                        c.resize(PAGE, 0xcc);
                        c
                    }
                    55..75 => {
                        mix.random += 1;
                        random_page(p)
                    }
                    75..90 => {
                        mix.zero += 1;
                        vec![0; PAGE]
                    }
                    _ => {
                        mix.sparse += 1;
                        let mut c = vec![0u8; PAGE];
                        for k in 0..1 + splitmix(p) % 8 {
                            let w = (splitmix(p + k) % (PAGE as u64 / 8)) as usize * 8;
                            c[w..w + 8].copy_from_slice(&splitmix(p ^ k).to_le_bytes());
                        }
                        c
                    }
                };
                out.write_all(&content)?;
            }
            page += run;
        }
        out.flush()?;
        Ok(mix)
    }
}

pub mod tally {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;

    static TALLY: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

    /// Adds `amount` units of work (bytes, decisions) done in `time` to `name`.
    pub fn record(name: &'static str, amount: u64, time: Duration) {
        let mut t = TALLY.lock().unwrap_or_else(|p| p.into_inner());
        let e = t.entry(name).or_default();
        e.0 += amount;
        e.1 += time;
    }

    /// Units per second of every benchmark recorded, by name.
    pub fn rates() -> Vec<(&'static str, f64)> {
        let t = TALLY.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().filter(|(_, (_, d))| !d.is_zero()).map(|(k, (n, d))| (*k, *n as f64 / d.as_secs_f64())).collect()
    }

    /// Units per second of `name`, if it was recorded.
    pub fn rate(name: &str) -> Option<f64> {
        rates().into_iter().find(|(k, _)| *k == name).map(|(_, r)| r)
    }
}

/// A bench's arguments: a count (`default` when absent) and `--NAME=N` (`named_default`).
pub fn count_args(default: usize, name: &str, named_default: usize) -> (usize, usize) {
    let (mut count, mut named) = (default, named_default);
    let flag = format!("--{name}=");
    for arg in std::env::args().skip(1) {
        if let Some(n) = arg.strip_prefix(&flag) {
            named = n.parse().unwrap_or(named_default);
        } else if let Ok(n) = arg.parse() {
            count = n;
        }
    }
    (count, named)
}

/// Runs a bench's async body on two worker threads; a failure ends the process with
/// `what: error` and exit code 1.
pub fn run_async<F: std::future::Future<Output = Result<(), Error>>>(what: &str, body: impl FnOnce() -> F) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let result = match runtime {
        Ok(rt) => rt.block_on(body()),
        Err(e) => Err(Error::from(e.to_string())),
    };
    if let Err(e) = result {
        eprintln!("{what}: {e}");
        std::process::exit(1);
    }
}
