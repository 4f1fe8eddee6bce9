//! Live migration, NovaCron against QEMU, side by side in one run: the same test-guest ELF
//! file, the same machine (512 MiB, 2 vCPUs), a 256 MiB working set dirtied at several
//! rates, on loopback. Per configuration, medians over RUNS runs (the VMMs alternate):
//!
//! - total time as the VMM reports it, and from the migrate command to the destination
//!   guest's first heartbeat as seen from here;
//! - the pause the guest sees: the gap between the last heartbeat line read from the
//!   source process and the first one from the destination (the downtime of record);
//! - the downtime the VMM reports;
//! - bytes on the wire: IP packets on `lo` of a network namespace of this run's own, both
//!   ways with headers, for both VMMs alike; and the bytes the VMM says it sent;
//! - whether the destination's guest verified its memory (VERIFY OK) afterwards;
//! - the largest heartbeat gap in the second after the destination runs: what a
//!   post-copy's faults on missing pages cost the guest.
//!
//! `--memory=image` puts a realistic memory image (192 MiB of text, machine code,
//! random/compressed data, zero and sparse pages, in runs: `contents::realistic_image`)
//! into guest memory as an initrd, which both VMMs load at the top of RAM, clear of the
//! working set; the guest never touches it, so it moves in the first pass, as a real
//! guest's page cache and code would, at no cost to the emulated guest.
//!
//! Before each NovaCron pre-copy run, `vmm migrate --dry-run` predicts it (to the same
//! receiver, which waits on); rows compare the prediction with the run (`--no-dry-run`
//! leaves it out).
//!
//! `--tuned=` takes one QEMU configuration or several, comma-separated: each becomes a
//! column next to QEMU's defaults. `--tuned=postcopy` compares post-copy: NovaCron with `--post-copy after-rounds=1`
//! (first), NovaCron pre-copy, QEMU's defaults, and QEMU with postcopy-ram switched over
//! with `migrate-start-postcopy` once its first pass is done, bandwidth uncapped.
//!
//! `--max-bandwidth=MIB` caps every configuration's link at MIB MiB/s: NovaCron's
//! `--max-bandwidth`, QEMU's `max-bandwidth` (and `max-postcopy-bandwidth` for its
//! post-copy), in place of each one's own limit. `--rates=20000 --max-bandwidth=32
//! --tuned=postcopy` is the case where a guest dirties faster than its link can carry:
//! pre-copy alone never converges.
//!
//! ```text
//! cargo bench -p novacron-benches --bench migration [-- RUNS] [--rates=0,2000,10000]
//!     [--hb=MS] [--tuned=multifd|multifd-zstd|xbzrle|uncapped|postcopy[,...]] [--max-bandwidth=MIB]
//!     [--only=novacron|qemu|tuned] [--memory=guest|image] [--no-dry-run] [--no-netns] [--verbose]
//! ```
//!
//! The guest verifies its whole working set every `verify` ms, and prints no heartbeat
//! while it does (about 2 s for 256 MiB here): a run must switch over before that, so the
//! verify period is set per configuration from the slowest migration seen so far, and a
//! run whose switchover met a verification pass is repeated with a longer period.

use novacron_benches::contents::realistic_image;
use novacron_benches::netns::{NetNs, lo_bytes};
use novacron_benches::qmp::Qmp;
use novacron_benches::{Error, median, qemu, release_binary, test_guest_file};
use novacron_guest_image::report::{GuestLine, parse};
use novacron_guest_image::watch::{Line, Watched};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEM_MIB: u64 = 512;
const VCPUS: u8 = 2;
const WS_MIB: u64 = 256;
/// The realistic image's size (`--memory=image`): with the working set, 448 of the 512 MiB.
const IMAGE_MIB: u64 = 192;
/// From the guest's first heartbeat to the migration's start: the workload is in its
/// steady state (the working set written, dirtying at its rate).
const SETTLE: Duration = Duration::from_millis(500);
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(90);
/// The verify period of a configuration's first run, and the longest.
const FIRST_VERIFY_MS: u64 = 10_000;
const MAX_VERIFY_MS: u64 = 30_000;
/// After the destination's first heartbeat: its verification, at most the verify period
/// plus the pass itself.
const VERIFY_SLACK: Duration = Duration::from_secs(20);
/// The window after the destination's first heartbeat whose largest gap is its stall.
const STALL_WINDOW: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
enum Vmm {
    /// `extra`: more `vmm migrate` options.
    NovaCron { extra: Vec<&'static str> },
    /// `post_copy`: switch with migrate-start-postcopy once the first pass is done.
    Qemu { caps: Vec<&'static str>, params: Value, post_copy: bool },
}

#[derive(Clone, Debug)]
struct Variant {
    name: String,
    vmm: Vmm,
}

/// QEMU tuned as `tuned` names it: its capabilities, parameters and a label.
fn qemu_tuned(tuned: &str) -> Result<(Vec<&'static str>, Value, &'static str), Error> {
    let uncapped = json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 50 });
    Ok(match tuned {
        "uncapped" => (vec![], uncapped, "uncapped, downtime-limit 50 ms"),
        "multifd" => (
            vec!["multifd"],
            json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 50, "multifd-channels": 2 }),
            "uncapped, multifd x2, downtime-limit 50 ms",
        ),
        "multifd-zstd" => (
            vec!["multifd"],
            json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 50, "multifd-channels": 2,
                    "multifd-compression": "zstd", "multifd-zstd-level": 1 }),
            "uncapped, multifd x2 zstd-1, downtime-limit 50 ms",
        ),
        "xbzrle" => (
            vec!["xbzrle"],
            json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 50, "xbzrle-cache-size": 64u64 << 20 }),
            "uncapped, xbzrle 64 MiB, downtime-limit 50 ms",
        ),
        "postcopy" => {
            (vec!["postcopy-ram"], uncapped, "uncapped, postcopy-ram after the first pass, downtime-limit 50 ms")
        }
        other => {
            return Err(format!("--tuned={other}: choose multifd, multifd-zstd, xbzrle, uncapped or postcopy").into());
        }
    })
}

/// NovaCron (and NovaCron post-copy when QEMU's post-copy is among them), QEMU's
/// defaults, and QEMU tuned each way `tuned` lists.
fn variants(tuned: &str) -> Result<Vec<Variant>, Error> {
    let mut list = Vec::new();
    let names: Vec<&str> = tuned.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
    if names.contains(&"postcopy") {
        let extra = vec!["--post-copy", "after-rounds=1"];
        list.push(Variant { name: "NovaCron post-copy (after-rounds=1)".into(), vmm: Vmm::NovaCron { extra } });
    }
    list.push(Variant { name: "NovaCron".into(), vmm: Vmm::NovaCron { extra: vec![] } });
    list.push(Variant {
        name: "QEMU default".into(),
        vmm: Vmm::Qemu { caps: vec![], params: Value::Null, post_copy: false },
    });
    for name in names {
        let (caps, params, label) = qemu_tuned(name)?;
        let post_copy = name == "postcopy";
        list.push(Variant { name: format!("QEMU {name} ({label})"), vmm: Vmm::Qemu { caps, params, post_copy } });
    }
    Ok(list)
}

struct Options {
    runs: usize,
    rates: Vec<u64>,
    hb_ms: u64,
    tuned: String,
    only: Option<String>,
    /// Put the realistic image into guest memory.
    image: bool,
    /// Every configuration's bandwidth limit, bytes/s.
    cap: Option<u64>,
    dry_run: bool,
    netns: bool,
    verbose: bool,
}

fn options() -> Result<Options, Error> {
    let mut o = Options {
        runs: 5,
        rates: vec![0, 2000, 10_000],
        hb_ms: 2,
        tuned: "multifd".into(),
        only: None,
        image: false,
        cap: None,
        dry_run: true,
        netns: true,
        verbose: false,
    };
    for arg in std::env::args().skip(1) {
        if let Ok(n) = arg.parse::<usize>() {
            o.runs = n.max(1);
        } else if let Some(v) = arg.strip_prefix("--rates=") {
            o.rates = v.split(',').map(|r| r.trim().parse()).collect::<Result<_, _>>()?;
        } else if let Some(v) = arg.strip_prefix("--hb=") {
            o.hb_ms = v.parse::<u64>()?.max(1);
        } else if let Some(v) = arg.strip_prefix("--tuned=") {
            o.tuned = v.into();
        } else if let Some(v) = arg.strip_prefix("--only=") {
            o.only = Some(v.to_lowercase());
        } else if let Some(v) = arg.strip_prefix("--memory=") {
            o.image = match v {
                "guest" => false,
                "image" => true,
                other => return Err(format!("--memory={other}: choose guest or image").into()),
            };
        } else if let Some(v) = arg.strip_prefix("--max-bandwidth=") {
            let mib: u64 = v.parse().map_err(|e| format!("--max-bandwidth={v}: MiB/s, a whole number ({e})"))?;
            o.cap = Some(mib.max(1) << 20);
        } else if arg == "--no-dry-run" {
            o.dry_run = false;
        } else if arg == "--no-netns" {
            o.netns = false;
        } else if arg == "--verbose" {
            o.verbose = true;
        } else if arg != "--bench" {
            return Err(format!("unknown argument {arg:?}").into());
        }
    }
    Ok(o)
}

/// What one migration measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Total time as the VMM reports it.
    vmm_total_ms: f64,
    /// From the migrate command to the destination guest's first heartbeat, seen here.
    to_running_ms: f64,
    /// Last heartbeat from the source to the first from the destination.
    pause_ms: f64,
    vmm_downtime_ms: f64,
    /// IP bytes on the namespace's loopback, both ways.
    wire_bytes: Option<u64>,
    /// What the VMM says it sent: NovaCron's UDP payloads, QEMU's ram "transferred".
    vmm_bytes: u64,
    /// NovaCron's frame bytes (what a dry run predicts).
    frame_bytes: Option<f64>,
    /// The dry run's prediction of total time and frame bytes, and how long it took.
    predicted_ms: Option<f64>,
    predicted_bytes: Option<f64>,
    dry_run_ms: f64,
    /// NovaCron's rounds; QEMU's dirty-sync-count.
    rounds: u64,
    verify_ok: bool,
    /// The destination's first heartbeat follows the source's last.
    continuous: bool,
    /// The largest heartbeat gap at the destination in STALL_WINDOW after its first.
    stall_ms: f64,
    /// The largest heartbeat gap in the settle window before the migration: the noise.
    jitter_ms: f64,
    /// NovaCron only, from its log: round 0, the later rounds, pages in round 0.
    round0_ms: Option<f64>,
    later_ms: Option<f64>,
    round_log: Vec<String>,
}

/// A run whose switchover met one of the guest's verification passes: its heartbeat gap
/// would measure the pass, not the pause.
struct Overlap;

struct Bench {
    novacron: PathBuf,
    qemu: PathBuf,
    guest: PathBuf,
    /// The realistic image, loaded as an initrd (`--memory=image`).
    initrd: Option<PathBuf>,
    /// Every configuration's bandwidth limit, bytes/s (`--max-bandwidth`).
    cap: Option<u64>,
    dry_run: bool,
    tls: PathBuf,
    dir: PathBuf,
    netns: Option<NetNs>,
    hb_ms: u64,
    next_port: u16,
}

impl Bench {
    fn port(&mut self) -> Result<String, Error> {
        if self.netns.is_some() {
            // A namespace of our own: any port is free.
            self.next_port += 1;
            return Ok(format!("127.0.0.1:{}", self.next_port));
        }
        // Free for TCP and UDP on the host's loopback, bound right after.
        for _ in 0..100 {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = tcp.local_addr()?;
            if std::net::UdpSocket::bind(addr).is_ok() {
                return Ok(addr.to_string());
            }
        }
        Err("no free port".into())
    }

    fn cmdline(&self, rate: u64, verify_ms: u64) -> String {
        // The image is not the guest's to read: hashing 192 MiB would take it minutes.
        let initrd = if self.initrd.is_some() { " initrd=skip" } else { "" };
        format!("ws={WS_MIB} rate={rate} verify={verify_ms} hb={}{initrd}", self.hb_ms)
    }

    /// `vmm migrate`'s options for the bandwidth cap.
    fn cap_args(&self) -> Vec<String> {
        self.cap.map(|bytes| vec!["--max-bandwidth".to_string(), bytes.to_string()]).unwrap_or_default()
    }

    /// QEMU's parameters with the bandwidth cap in place of their own limit.
    fn capped(&self, params: &Value, post_copy: bool) -> Value {
        let Some(bytes) = self.cap else { return params.clone() };
        let mut params = match params {
            Value::Object(_) => params.clone(),
            _ => json!({}),
        };
        params["max-bandwidth"] = json!(bytes);
        if post_copy {
            params["max-postcopy-bandwidth"] = json!(bytes);
        }
        params
    }

    fn spawn(&self, mut cmd: Command) -> Result<Watched, Error> {
        if let Some(ns) = &self.netns {
            ns.enter(&mut cmd);
        }
        Ok(Watched::spawn(cmd)?)
    }

    fn qemu_cmd(&self, cmdline: &str, qmp: &Path, incoming: bool) -> Command {
        let mut c = Command::new(&self.qemu);
        c.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-m", &MEM_MIB.to_string(), "-smp", &VCPUS.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel"])
            .arg(&self.guest)
            .args(["-append", cmdline, "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(initrd) = &self.initrd {
            c.arg("-initrd").arg(initrd);
        }
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        c
    }

    fn run(&mut self, variant: &Variant, rate: u64, verify_ms: u64) -> Result<Result<Sample, Overlap>, Error> {
        let run_dir = tempfile::tempdir_in(&self.dir)?;
        match &variant.vmm {
            Vmm::NovaCron { extra } => self.run_novacron(run_dir.path(), extra, rate, verify_ms),
            Vmm::Qemu { caps, params, post_copy } => {
                self.run_qemu(run_dir.path(), (caps, params, *post_copy), rate, verify_ms)
            }
        }
    }

    fn run_novacron(
        &mut self,
        dir: &Path,
        extra: &[&str],
        rate: u64,
        verify_ms: u64,
    ) -> Result<Result<Sample, Overlap>, Error> {
        let addr = self.port()?;
        let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
        let mut cmd = Command::new(&self.novacron);
        cmd.args(["vmm", "receive", "--listen", &addr])
            .arg("--api-sock")
            .arg(&dst_sock)
            .arg("--tls-dir")
            .arg(&self.tls);
        let mut dst = self.spawn(cmd)?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !dst_sock.exists() {
            if Instant::now() > deadline {
                return Err("the receiving VMM never listened".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut cmd = Command::new(&self.novacron);
        cmd.args(["vmm", "run", "--kernel"])
            .arg(&self.guest)
            .args(["--mem", &MEM_MIB.to_string(), "--vcpus", &VCPUS.to_string()])
            .args(["--cmdline", &self.cmdline(rate, verify_ms)])
            .arg("--api-sock")
            .arg(&src_sock)
            .env("NOVACRON_LOG", "info");
        if let Some(initrd) = &self.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        let mut src = self.spawn(cmd)?;
        let jitter_ms = settle(&mut src)?;
        // The prediction first (post-copy has none): the receiver takes the probe and
        // waits on for the migration itself.
        let dry_started = Instant::now();
        let prediction = match self.dry_run && extra.is_empty() {
            true => Some(self.dry_run(&src_sock, &addr)?),
            false => None,
        };
        let dry_run_ms = dry_started.elapsed().as_secs_f64() * 1e3;
        let wire_before = lo_bytes(dst.child.id());

        let t0 = Instant::now();
        let mut migrate = Command::new(&self.novacron);
        migrate
            .args(["vmm", "migrate", "--to", &addr, "--json"])
            .arg("--api-sock")
            .arg(&src_sock)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(self.cap_args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = output_within(migrate, MIGRATE_TIMEOUT)?;
        if !out.status.success() {
            return Err(format!(
                "novacron vmm migrate failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            )
            .into());
        }
        let report: Value = serde_json::from_slice(&out.stdout)?;
        let (status, log) = src.wait_exit(BOOT_TIMEOUT)?;
        if !status.success() {
            return Err(format!("the source VMM ended with {status}: {log}").into());
        }
        let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        let mut s = Sample {
            vmm_total_ms: f("total_ms"),
            vmm_downtime_ms: f("downtime_us") / 1000.0,
            vmm_bytes: report["wire_bytes"].as_u64().unwrap_or(0),
            frame_bytes: Some(f("bytes_sent")),
            predicted_ms: prediction.as_ref().and_then(|p| p["total_ms"].as_f64()),
            predicted_bytes: prediction.as_ref().and_then(|p| p["bytes"].as_f64()),
            dry_run_ms,
            rounds: report["rounds"].as_u64().unwrap_or(0),
            jitter_ms,
            ..Sample::default()
        };
        rounds_from_log(&log, &mut s);
        let sw = &report["switchover"];
        s.round_log.push(format!(
            "switchover (µs): pause and save {}, last {} pages {}, destination ready {}, commit {}",
            sw["pause_and_save_us"], sw["last_pages"], sw["last_pages_us"], sw["destination_ready_us"], sw["commit_us"]
        ));
        let c = &report["compression"];
        s.round_log.push(format!(
            "compression: raw {} / zstd-1 {} / zstd-3 {} batches; link {} MiB/s, zstd-1 {} MiB/s at {}‰, zstd-3 {} MiB/s at {}‰",
            c["raw"]["batches"],
            c["zstd1"]["batches"],
            c["zstd3"]["batches"],
            c["link_rate"].as_u64().unwrap_or(0) >> 20,
            c["zstd1_speed"].as_u64().unwrap_or(0) >> 20,
            c["zstd1_ratio_permille"],
            c["zstd3_speed"].as_u64().unwrap_or(0) >> 20,
            c["zstd3_ratio_permille"]
        ));
        finish(&mut s, &src, &mut dst, t0, wire_before, verify_ms)
    }

    /// `vmm migrate --dry-run` of the source at `sock` to `addr`: its prediction.
    fn dry_run(&self, sock: &Path, addr: &str) -> Result<Value, Error> {
        let mut cmd = Command::new(&self.novacron);
        cmd.args(["vmm", "migrate", "--dry-run", "--to", addr, "--json"])
            .arg("--api-sock")
            .arg(sock)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(self.cap_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = output_within(cmd, MIGRATE_TIMEOUT)?;
        // Exit 4: it would not converge; the prediction says so and is still a prediction.
        if !out.status.success() && out.status.code() != Some(4) {
            return Err(format!(
                "novacron vmm migrate --dry-run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn run_qemu(
        &mut self,
        dir: &Path,
        (caps, params, post_copy): (&[&'static str], &Value, bool),
        rate: u64,
        verify_ms: u64,
    ) -> Result<Result<Sample, Overlap>, Error> {
        let addr = self.port()?;
        let cmdline = self.cmdline(rate, verify_ms);
        let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
        let mut dst = self.spawn(self.qemu_cmd(&cmdline, &dst_qmp, true))?;
        let mut dq = Qmp::connect(&dst_qmp, BOOT_TIMEOUT)?;
        let mut src = self.spawn(self.qemu_cmd(&cmdline, &src_qmp, false))?;
        let mut sq = Qmp::connect(&src_qmp, BOOT_TIMEOUT)?;
        let params = self.capped(params, post_copy);
        for q in [&mut sq, &mut dq] {
            if !caps.is_empty() {
                let caps: Vec<Value> = caps.iter().map(|c| json!({ "capability": c, "state": true })).collect();
                q.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
            }
            if !params.is_null() {
                q.execute("migrate-set-parameters", params.clone())?;
            }
        }
        dq.execute("migrate-incoming", json!({ "uri": format!("tcp:{addr}") }))?;
        let jitter_ms = settle(&mut src)?;
        let wire_before = lo_bytes(dst.child.id());

        let t0 = Instant::now();
        sq.execute("migrate", json!({ "uri": format!("tcp:{addr}") }))?;
        let mut switched = !post_copy;
        let info = loop {
            let info = sq.execute("query-migrate", Value::Null)?;
            // The first pass is done once memory was synced a second time.
            if !switched && info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
                sq.execute("migrate-start-postcopy", Value::Null)?;
                switched = true;
            }
            match info["status"].as_str() {
                Some("completed") => break info,
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(format!("QEMU's migration {s}: {}", info["error-desc"]).into());
                }
                _ if t0.elapsed() > MIGRATE_TIMEOUT => {
                    let _ = sq.execute("migrate_cancel", Value::Null);
                    return Err(format!("QEMU's migration did not complete within {MIGRATE_TIMEOUT:?}").into());
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let _ = sq.execute("quit", Value::Null);
        src.wait_exit(BOOT_TIMEOUT)?;
        let f = |k: &str| info[k].as_f64().unwrap_or(f64::NAN);
        let mut s = Sample {
            vmm_total_ms: f("total-time"),
            vmm_downtime_ms: f("downtime"),
            vmm_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
            rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            jitter_ms,
            ..Sample::default()
        };
        finish(&mut s, &src, &mut dst, t0, wire_before, verify_ms)
    }
}

/// Waits for the guest's first heartbeat, then SETTLE; returns the largest heartbeat gap
/// in that window.
fn settle(src: &mut Watched) -> Result<f64, Error> {
    let first = src.wait_for("the first heartbeat", BOOT_TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_)))?;
    let end = first.at + SETTLE;
    src.wait_for("the settle time", BOOT_TIMEOUT, |l| l.at >= end)?;
    let beats: Vec<Instant> =
        src.seen.iter().filter(|l| matches!(l.parsed, GuestLine::Heartbeat(_))).map(|l| l.at).collect();
    Ok(beats.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).fold(0.0, f64::max))
}

/// The guest-side figures, once the source is done: the pause, the continuity of the
/// heartbeats, the destination's verdict, and the bytes on the wire.
fn finish(
    s: &mut Sample,
    src: &Watched,
    dst: &mut Watched,
    t0: Instant,
    wire_before: Option<u64>,
    verify_ms: u64,
) -> Result<Result<Sample, Overlap>, Error> {
    let heartbeat = |l: &Line| if let GuestLine::Heartbeat(n) = l.parsed { Some((n, l.at)) } else { None };
    let is_verdict = |l: &Line| matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. });
    // The switchover may cut a line in two: the source printed its start ("H", "HB 8"),
    // the destination the rest ("B 839", "39"), which is no line of its own. Then the
    // source's last line is a fragment, and the whole line counts as the destination's,
    // when its rest was read (at most one heartbeat period late).
    let mut first = dst.wait_for("the destination's first line", MIGRATE_TIMEOUT, |_| true)?;
    let cut = matches!(first.parsed, GuestLine::Other(_)) && !src.seen.is_empty();
    let src_lines = if cut { &src.seen[..src.seen.len() - 1] } else { &src.seen[..] };
    if cut && let Some(start) = src.seen.last() {
        first.text = format!("{}{}", start.text, first.text);
        first.parsed = parse(&first.text);
    }
    let mut overlap = is_verdict(&first);
    let (last_seq, last_at) = src_lines.iter().rev().find_map(heartbeat).ok_or("no heartbeat from the source")?;
    if !matches!(first.parsed, GuestLine::Heartbeat(_)) {
        first = dst.wait_for("the first heartbeat at the destination", MIGRATE_TIMEOUT, |l| {
            matches!(l.parsed, GuestLine::Heartbeat(_))
        })?;
    }
    let (first_seq, first_at) = heartbeat(&first).ok_or("not a heartbeat")?;
    // A post-copy's guest waits on the pages it touches that have not come yet.
    let window_end = first_at + STALL_WINDOW;
    dst.wait_for("the stall window", MIGRATE_TIMEOUT, |l| l.at >= window_end)?;
    let later = dst.seen.iter().filter_map(heartbeat).map(|(_, at)| at).filter(|&at| at > first_at && at <= window_end);
    let beats: Vec<Instant> = std::iter::once(first_at).chain(later).collect();
    let last_beat = beats.last().copied().unwrap_or(first_at);
    s.stall_ms = beats
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .fold((window_end - last_beat).as_secs_f64() * 1e3, f64::max);
    overlap |= dst.seen.iter().any(is_verdict) || src_lines.iter().any(|l| l.at > t0 && is_verdict(l));
    s.wire_bytes = wire_before.zip(lo_bytes(dst.child.id())).map(|(a, b)| b.saturating_sub(a));
    s.pause_ms = (first_at - last_at).as_secs_f64() * 1e3;
    s.to_running_ms = (first_at - t0).as_secs_f64() * 1e3;
    s.continuous = first_seq == last_seq + 1;
    if !s.continuous {
        let tail: Vec<&str> = src.seen.iter().rev().take(3).map(|l| l.text.as_str()).collect();
        let head: Vec<&str> = dst.seen.iter().take(3).map(|l| l.text.as_str()).collect();
        s.round_log
            .push(format!("heartbeats: source ended with {tail:?} (last first), destination began with {head:?}"));
    }
    if overlap {
        return Ok(Err(Overlap));
    }
    let verdict =
        dst.wait_for("the destination's verdict", Duration::from_millis(verify_ms) + VERIFY_SLACK, is_verdict)?;
    s.verify_ok = matches!(verdict.parsed, GuestLine::VerifyOk { .. });
    Ok(Ok(s.clone()))
}

/// Runs `cmd` to its end, at most `limit` (killed after that).
fn output_within(mut cmd: Command, limit: Duration) -> Result<std::process::Output, Error> {
    let child = cmd.spawn()?;
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // The child spawned above has not been reaped yet: its waiting thread has not returned.
            // SAFETY: kill(2) on that child's pid, which no other process can have yet.
            unsafe { libc::kill(id as libc::pid_t, libc::SIGKILL) };
            Err(format!("{cmd:?} did not finish within {limit:?}").into())
        }
    }
}

/// Seconds since midnight of a tracing timestamp (`2026-01-01T01:02:03.456789Z`).
fn log_time(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Where NovaCron's time went, from the source's log (NOVACRON_LOG=info): "migration
/// started", one "round done" per round, "VM paused".
fn rounds_from_log(log: &str, s: &mut Sample) {
    let clean: String = {
        // Drop ANSI colour sequences, should the log have them.
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let mut started = None;
    let mut previous = None;
    let mut later = 0.0;
    for line in clean.lines() {
        let Some(t) = log_time(line) else { continue };
        if line.contains("migration started") {
            started = Some(t);
            previous = Some(t);
        } else if line.contains("round done") {
            let (Some(p), Some(round)) = (previous, field(line, "round")) else { continue };
            let ms = (t - p) * 1e3;
            if round == "0" {
                s.round0_ms = Some(ms);
            } else {
                later += ms;
            }
            s.round_log.push(format!(
                "round {round}: {} pages in {ms:.0} ms, {} dirty meanwhile ({} pages/s), estimate {} ms",
                field(line, "sent").unwrap_or("?"),
                field(line, "dirty").unwrap_or("?"),
                field(line, "dirty_rate").unwrap_or("?"),
                field(line, "estimate_ms").unwrap_or("?"),
            ));
            previous = Some(t);
        } else if line.contains("VM paused")
            && let Some(p) = previous
        {
            s.round_log.push(format!("pause requested {:.1} ms after the last round", (t - p) * 1e3));
        } else if line.contains("auto-converge") {
            s.round_log.push(format!("auto-converge: {}", field(line, "percent").unwrap_or("?")));
        }
    }
    if started.is_some() {
        s.later_ms = Some(later);
    }
}

fn main() -> Result<(), Error> {
    let o = options()?;
    let all = variants(&o.tuned)?;
    let chosen: Vec<Variant> =
        all.into_iter().filter(|v| o.only.as_deref().is_none_or(|only| v.name.to_lowercase().contains(only))).collect();
    let novacron = release_binary("novacron", "novacron")?;
    let qemu_path = qemu()?;
    let qemu_version = Command::new(&qemu_path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("novacron-migration-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = test_guest_file(&dir)?;
    let initrd = match o.image {
        true => {
            let path = dir.join("memory-image.bin");
            let mix = realistic_image(&path, IMAGE_MIB << 20, &novacron)?;
            eprintln!("memory image: {mix}");
            Some((path, mix))
        }
        false => None,
    };
    let tls = dir.join("tls");
    let out = Command::new(&novacron).args(["certs", "init", "--dir"]).arg(&tls).output()?;
    if !out.status.success() {
        return Err(format!("novacron certs init: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let netns = if o.netns {
        match NetNs::new(&format!("novacron-mig-{}", std::process::id())) {
            Ok(ns) => Some(ns),
            Err(e) => {
                eprintln!("no network namespace ({e}): bytes on the wire are not counted, only the VMMs' own figures");
                None
            }
        }
    } else {
        None
    };
    let mut bench = Bench {
        novacron,
        qemu: qemu_path,
        guest,
        initrd: initrd.as_ref().map(|(p, _)| p.clone()),
        cap: o.cap,
        dry_run: o.dry_run,
        tls,
        dir: dir.clone(),
        netns,
        hb_ms: o.hb_ms,
        next_port: 4700,
    };
    eprintln!("{qemu_version}; {} runs of each of {} configurations", o.runs, o.rates.len() * chosen.len());

    let started = Instant::now();
    let mut samples: HashMap<(usize, u64), Vec<Sample>> = HashMap::new();
    let mut failures: HashMap<(usize, u64), Vec<String>> = HashMap::new();
    let mut overlaps: HashMap<(usize, u64), usize> = HashMap::new();
    let mut slowest: HashMap<(usize, u64), f64> = HashMap::new();
    for run in 0..o.runs {
        for &rate in &o.rates {
            for (vi, v) in chosen.iter().enumerate() {
                let key = (vi, rate);
                let mut verify_ms = slowest.get(&key).map_or(FIRST_VERIFY_MS, |ms| {
                    (SETTLE.as_millis() as u64 + (ms * 1.5) as u64 + 1500).clamp(4000, MAX_VERIFY_MS)
                });
                let result = loop {
                    let r = bench.run(v, rate, verify_ms);
                    match r {
                        Ok(Err(Overlap)) if verify_ms < MAX_VERIFY_MS => {
                            *overlaps.entry(key).or_default() += 1;
                            eprintln!("  (the switchover met a verification pass at verify={verify_ms}: again)");
                            verify_ms = MAX_VERIFY_MS;
                        }
                        Ok(Err(Overlap)) => break Err("the switchover met a verification pass".into()),
                        Ok(Ok(s)) => break Ok(s),
                        Err(e) => break Err(e),
                    }
                };
                let label = format!("run {}/{} rate={rate:<5} {:<12}", run + 1, o.runs, short(&v.name));
                match result {
                    Ok(s) => {
                        eprintln!(
                            "{label} total {:>6.0} ms (VMM) {:>6.0} ms (to running), pause {:>6.1} ms, downtime {:>6.1} ms, \
                             wire {}, {}{}",
                            s.vmm_total_ms,
                            s.to_running_ms,
                            s.pause_ms,
                            s.vmm_downtime_ms,
                            s.wire_bytes.map_or("n/a".into(), mib),
                            if s.verify_ok { "VERIFY OK" } else { "VERIFY FAIL" },
                            if s.continuous { "" } else { ", heartbeats NOT continuous" }
                        );
                        if o.verbose {
                            for l in &s.round_log {
                                eprintln!("      {l}");
                            }
                        }
                        let e = slowest.entry(key).or_default();
                        *e = e.max(s.to_running_ms + s.dry_run_ms);
                        samples.entry(key).or_default().push(s);
                    }
                    Err(e) => {
                        eprintln!("{label} FAILED: {e}");
                        failures.entry(key).or_default().push(e.to_string());
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();
    drop(bench);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nLive migration: {MEM_MIB} MiB VM, {VCPUS} vCPUs, test guest ws={WS_MIB} MiB hb={} ms, loopback, \
         median of {} runs ({:.0} s in all)",
        o.hb_ms,
        o.runs,
        elapsed.as_secs_f64()
    );
    let tuned: Vec<&str> = chosen
        .iter()
        .filter(|v| v.name.starts_with("QEMU ") && v.name != "QEMU default")
        .map(|v| v.name.as_str())
        .collect();
    println!("QEMU: {qemu_version}, -M microvm; tuned: {}", tuned.join("; "));
    if let Some(bytes) = o.cap {
        println!("every configuration's link capped at {} MiB/s, in place of its own limit", bytes >> 20);
    }
    match &initrd {
        Some((_, mix)) => println!("guest memory: the working set, and a {IMAGE_MIB} MiB image as initrd: {mix}"),
        None => println!("guest memory: the test guest's own pages (two words each in the working set)"),
    }
    for &rate in &o.rates {
        print_table(rate, &chosen, &samples, &failures, &overlaps);
    }
    if let Some(ni) = chosen.iter().position(|v| matches!(v.vmm, Vmm::NovaCron { .. })) {
        println!("\nWhere NovaCron's time goes (source log, medians):");
        for &rate in &o.rates {
            let Some(v) = samples.get(&(ni, rate)) else { continue };
            let med = |f: &dyn Fn(&Sample) -> Option<f64>| median(&mut v.iter().filter_map(f).collect::<Vec<_>>());
            println!(
                "  rate={rate:<5}: round 0 (all {} pages) {:.0} ms, later rounds {:.0} ms, pause to destination running \
                 {:.1} ms (VMM), {:.1} ms (guest)",
                MEM_MIB << 8,
                med(&|s| s.round0_ms),
                med(&|s| s.later_ms),
                med(&|s| Some(s.vmm_downtime_ms)),
                med(&|s| Some(s.pause_ms)),
            );
            if let Some(last) = v.last() {
                for l in &last.round_log {
                    println!("      last run: {l}");
                }
            }
        }
    }
    let pause_10k = chosen
        .iter()
        .position(|v| matches!(v.vmm, Vmm::NovaCron { .. }))
        .and_then(|ni| samples.get(&(ni, 10_000)))
        .map(|v| median(&mut v.iter().map(|s| s.pause_ms).collect::<Vec<_>>()));
    if let Some(p) = pause_10k {
        println!(
            "\ntarget: guest-seen pause < 10 ms at 10000 pages/s: {} ({p:.1} ms; the heartbeat period is {} ms)",
            if p < 10.0 { "met" } else { "NOT met" },
            o.hb_ms
        );
    }
    Ok(())
}

fn short(name: &str) -> &str {
    name.split(" (").next().unwrap_or(name)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn print_table(
    rate: u64,
    variants: &[Variant],
    samples: &HashMap<(usize, u64), Vec<Sample>>,
    failures: &HashMap<(usize, u64), Vec<String>>,
    overlaps: &HashMap<(usize, u64), usize>,
) {
    let title = if rate == 0 { "idle guest (rate=0)".to_string() } else { format!("rate={rate} pages/s") };
    println!("\n{title}");
    let ours = variants.iter().position(|v| matches!(v.vmm, Vmm::NovaCron { .. }));
    let theirs: Vec<usize> = (0..variants.len()).filter(|&i| Some(i) != ours).collect();
    let mut header = format!("| {:<40} |", "");
    for v in variants {
        header.push_str(&format!(" {:>14} |", short(&v.name)));
    }
    if ours.is_some() {
        for &t in &theirs {
            header.push_str(&format!(" {:>14} |", format!("÷ {}", short(&variants[t].name).replace("QEMU ", ""))));
        }
    }
    println!("{header}");
    println!("|{}|", vec!["---"; 1 + variants.len() + if ours.is_some() { theirs.len() } else { 0 }].join("|"));
    let get = |vi: usize| samples.get(&(vi, rate)).map(Vec::as_slice).unwrap_or(&[]);
    type Metric<'a> = (&'a str, &'a dyn Fn(&Sample) -> Option<f64>, &'a dyn Fn(f64) -> String);
    let ms = |v: f64| format!("{v:.1} ms");
    let ms0 = |v: f64| format!("{v:.0} ms");
    let mb = |v: f64| format!("{:.1} MiB", v / (1u64 << 20) as f64);
    let n = |v: f64| format!("{v:.0}");
    let x = |v: f64| format!("{v:.2}x");
    let metrics: [Metric; 12] = [
        ("total, as the VMM reports it", &|s| Some(s.vmm_total_ms), &ms0),
        ("migrate command to destination running", &|s| Some(s.to_running_ms), &ms0),
        ("guest-seen pause (heartbeat gap)", &|s| Some(s.pause_ms), &ms),
        ("downtime, as the VMM reports it", &|s| Some(s.vmm_downtime_ms), &ms),
        ("bytes on the wire (lo, both ways)", &|s| s.wire_bytes.map(|b| b as f64), &mb),
        ("bytes sent, as the VMM reports it", &|s| Some(s.vmm_bytes as f64), &mb),
        ("rounds (QEMU: dirty syncs)", &|s| Some(s.rounds as f64), &n),
        ("heartbeat jitter before (largest gap)", &|s| Some(s.jitter_ms), &ms),
        ("largest heartbeat gap, 1 s after running", &|s| Some(s.stall_ms), &ms),
        ("dry run: predicted total", &|s| s.predicted_ms, &ms0),
        ("dry run ÷ real: total time", &|s| s.predicted_ms.map(|p| p / s.vmm_total_ms), &x),
        ("dry run ÷ real: bytes sent", &|s| s.predicted_bytes.zip(s.frame_bytes).map(|(p, f)| p / f), &x),
    ];
    for (name, f, fmt) in metrics {
        let meds: Vec<f64> =
            (0..variants.len()).map(|vi| median(&mut get(vi).iter().filter_map(f).collect::<Vec<_>>())).collect();
        let mut row = format!("| {name:<40} |");
        for m in &meds {
            row.push_str(&format!(" {:>14} |", if m.is_nan() { "n/a".into() } else { fmt(*m) }));
        }
        if let Some(o) = ours {
            for &t in &theirs {
                let r = meds[o] / meds[t];
                let ratio = match r {
                    r if !r.is_finite() => "n/a".into(),
                    r if r < 0.01 => format!("{r:.4}x"),
                    r => format!("{r:.2}x"),
                };
                row.push_str(&format!(" {ratio:>14} |"));
            }
        }
        println!("{row}");
    }
    let mut row = format!("| {:<40} |", "destination VERIFY OK afterwards");
    for vi in 0..variants.len() {
        let s = get(vi);
        let failed = failures.get(&(vi, rate)).map_or(0, Vec::len);
        row.push_str(&format!(
            " {:>14} |",
            format!("{}/{}", s.iter().filter(|s| s.verify_ok && s.continuous).count(), s.len() + failed)
        ));
    }
    println!("{row}");
    for (vi, v) in variants.iter().enumerate() {
        if let Some(n) = overlaps.get(&(vi, rate)) {
            println!("  {}: {n} run(s) met a verification pass and were repeated with a longer period", v.name);
        }
        for e in failures.get(&(vi, rate)).into_iter().flatten() {
            println!("  {} FAILED: {e}", v.name);
        }
    }
}
