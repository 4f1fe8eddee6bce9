//! The migration commands: `vmm migrate` (with its progress display and report),
//! `vmm migrate-cancel`, `vmm migrate-set`, and `certs init` / `certs issue`.

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use novacron_migration::compression::CompressionReport;
use novacron_migration::source::{Fault, PassCost, Phase, PostCopy, Prediction, Progress, Report};
use novacron_migration::transport::TransportChoice;
use novacron_vmm::api::client::{ClientError, call};
use novacron_vmm::api::{MigrateRequest, MigrationStatus, Request, VmState};
use novacron_vmm::migrate::default_tls_dir;
use novacron_vmm::process::error_chain;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;
/// The VM moved, but --keep-snapshot could not be written.
const EXIT_SNAPSHOT_NOT_KEPT: i32 = 3;
/// A dry run predicts that the migration would not converge.
const EXIT_WOULD_NOT_CONVERGE: i32 = 4;
/// The migrate call waits for the whole migration.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const POLL: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compress {
    /// Per batch: raw, zstd-1 or zstd-3, whichever the measured link and compression
    /// rates say is quickest.
    #[value(alias = "zstd")]
    Auto,
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// TLS over TCP when the receiver's TCP handshake answers within 10 ms (loopback, a
    /// LAN), QUIC otherwise.
    Auto,
    /// QUIC (quinn): for long or lossy links.
    Quic,
    /// TLS 1.3 over TCP: for loopback and LANs.
    Tcp,
}

impl From<TransportArg> for TransportChoice {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => TransportChoice::Auto,
            TransportArg::Quic => TransportChoice::Quic,
            TransportArg::Tcp => TransportChoice::Tcp,
        }
    }
}

/// Test-only faults, hidden from --help.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaultArg {
    FlipPage,
    FlipState,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The receiving VMM (`vmm receive --listen`): HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    to: String,
    /// TLS directory (ca.pem, node.pem, node.key). Default: $NOVACRON_TLS_DIR or
    /// ~/.novacron/tls.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Bandwidth limit: bytes/s with an optional k, M or G (powers of 1000), or bits/s as
    /// e.g. 200Mbit. Default: none. Change it during the migration with `vmm migrate-set`.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_bandwidth: Option<u64>,
    /// Longest pause of the guest allowed for the switchover.
    #[arg(long, value_name = "N", default_value_t = 50)]
    downtime_ms: u64,
    /// Throttle the vCPUs when the migration does not converge (else give up).
    #[arg(long, value_enum, default_value = "on")]
    auto_converge: OnOff,
    /// Compress page data where that shortens the transfer.
    #[arg(long, value_enum, default_value = "auto")]
    compress: Compress,
    /// What carries the migration (the receiver takes either on its port).
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportArg,
    /// MiB of sent pages kept to send changes as deltas.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    delta_cache: u64,
    /// Threads for the page work (hashing, deltas, compression), each over its own ranges
    /// of guest memory. Default: one per core of this host.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// After the VM has moved, keep a snapshot of it in DIR: a later migration back to
    /// this host (`vmm receive --base DIR`) sends only what changed.
    #[arg(long, value_name = "DIR")]
    keep_snapshot: Option<PathBuf>,
    /// Measure the guest's dirty rate, the link and the page pipeline for about a
    /// second, and predict the migration's total time, downtime and bytes, and whether
    /// it converges (and else what would make it): nothing moves, the VM runs on, and the
    /// receiver waits on. Exits 4 when it would not converge.
    #[arg(long, conflicts_with_all = ["keep_snapshot", "post_copy"])]
    dry_run: bool,
    /// Switch to post-copy: the VM runs at the destination before its last pages are
    /// there, which fetches each page it touches first. `after-rounds=N` switches after N
    /// pre-copy rounds (1: after the first pass over memory) unless they converge first;
    /// `auto` only where pre-copy would throttle the guest or give up. The guest then depends on both hosts and the link until the
    /// last page is in: a link lost meanwhile is resumed for 60 s, and if either side dies
    /// the guest is lost. Default: pre-copy only.
    #[arg(long, value_name = "WHEN", value_parser = str::parse::<PostCopy>)]
    post_copy: Option<PostCopy>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum, hide = true)]
    fault: Option<FaultArg>,
    #[arg(long, value_name = "BYTES", hide = true)]
    fault_truncate_after: Option<u64>,
}

#[derive(Args)]
pub struct MigrateSetArgs {
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// New bandwidth limit (as for `vmm migrate`), or "off".
    #[arg(long, value_name = "RATE")]
    max_bandwidth: String,
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a TLS directory with a new cluster CA and this node's certificate.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The node's name (goes into its certificate).
        #[arg(long, default_value = "node")]
        name: String,
    },
    /// Make another node's TLS directory, signed by the CA of an existing one.
    Issue {
        /// A directory made by `certs init` (it holds ca.key).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        name: String,
    },
}

/// "25M" → 25_000_000 bytes/s; "200Mbit" → 25_000_000; "1G" → 10^9; "off"/"0" → none.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let (t, bits) = match t.strip_suffix("bit").or_else(|| t.strip_suffix("bps")) {
        Some(rest) => (rest, true),
        None => (t.trim_end_matches("B/s").trim_end_matches('B'), false),
    };
    let (digits, scale) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000f64),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1f64),
    };
    let value: f64 =
        digits.trim().parse().map_err(|_| format!("{text:?} is not a rate (examples: 50M, 1.5G, 200Mbit, off)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a rate"));
    }
    let bytes = value * scale / if bits { 8.0 } else { 1.0 };
    Ok(bytes.round() as u64)
}

fn absolute(path: &std::path::Path) -> Result<String, i32> {
    std::path::absolute(path).map(|p| p.to_string_lossy().into_owned()).map_err(|e| {
        eprintln!("novacron: cannot use {}: {e}", path.display());
        EXIT_USAGE
    })
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn progress_line(p: &Progress) -> String {
    format!(
        "round {} | sent {} | {} pages left | dirty {} pages/s | {}/s | est. downtime {} ms{}",
        p.round,
        human_bytes(p.bytes_sent),
        p.remaining_pages,
        p.dirty_rate,
        human_bytes(p.bandwidth),
        p.estimated_downtime_ms,
        if p.throttle_percent > 0 { format!(" | throttle {}%", p.throttle_percent) } else { String::new() }
    )
}

/// A name for one migration request, so that its progress display shows only its own
/// (another client's migration may be the one running).
fn migration_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}

/// Polls the progress of migration `id` on a second connection and draws it on stderr:
/// a bar on a terminal, a line per round otherwise.
pub fn watch_progress(socket: PathBuf, id: String, done: Arc<AtomicBool>) {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} pages  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let on_terminal = !bar.is_hidden();
    let mut last_round = u32::MAX;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(POLL);
        let Ok(response) = call(&socket, Request::MigrateStatus, Duration::from_secs(5)) else { continue };
        let Some(status) = response.migration.filter(|m| m.id.as_deref() == Some(id.as_str())) else { continue };
        if done.load(Ordering::Relaxed) {
            break;
        }
        let p = status.progress;
        if p.phase == Phase::Precopy || p.phase == Phase::Switchover {
            let round_pages = p.remaining_pages.max(1) + p.pages_sent;
            bar.set_length(round_pages);
            bar.set_position(p.pages_sent);
            bar.set_message(progress_line(&p));
            if !on_terminal && p.round != last_round {
                eprintln!("novacron: migrating: {}", progress_line(&p));
                last_round = p.round;
            }
        }
    }
    bar.finish_and_clear();
}

/// What each codec carried, and the rates the choices were made from.
fn compression_line(c: &CompressionReport) -> String {
    let used = [("raw", c.raw), ("zstd-1", c.zstd1), ("zstd-3", c.zstd3)];
    let mut parts: Vec<String> = used
        .iter()
        .filter(|(_, u)| u.batches > 0)
        .map(|(name, u)| {
            format!("{name} {} batches, {} to {}", u.batches, human_bytes(u.bytes_in), human_bytes(u.bytes_out))
        })
        .collect();
    if parts.is_empty() {
        parts.push("no page data".into());
    }
    let rate = |r: u64| if r == 0 { "not measured".to_string() } else { format!("{}/s", human_bytes(r)) };
    format!(
        "{}; link {}, zstd-1 {} at {:.2}, zstd-3 {} at {:.2}",
        parts.join(", "),
        rate(c.link_rate),
        rate(c.zstd1_speed),
        c.zstd1_ratio_permille as f64 / 1000.0,
        rate(c.zstd3_speed),
        c.zstd3_ratio_permille as f64 / 1000.0
    )
}

fn print_report(r: &Report, to: &str) {
    let pause = r.downtime_us as f64 / 1000.0;
    println!("migrated to {to} in {} ms", r.total_ms);
    let t = &r.switchover;
    let ms = |us: u64| us as f64 / 1000.0;
    println!("  downtime        {pause:.2} ms (pause to destination running, measured here)");
    println!(
        "                  pause+save {:.2}, last {} pages {:.2}, destination ready {:.2}, commit {:.2} ms",
        ms(t.pause_and_save_us),
        t.last_pages,
        ms(t.last_pages_us),
        ms(t.destination_ready_us),
        ms(t.commit_us)
    );
    println!("  rounds          {}", r.rounds);
    println!(
        "  on the stream   {} ({} on the wire with {})",
        human_bytes(r.bytes_sent),
        human_bytes(r.wire_bytes),
        r.transport
    );
    println!(
        "  pages           {} whole, {} delta, {} zeroed, {} from the base, {} duplicates; {} unchanged, {} never used",
        r.pages.full, r.pages.delta, r.pages.zero, r.pages.base, r.pages.copy, r.pages.unchanged, r.pages.empty
    );
    if r.bytes_saved > 0 {
        println!("  saved           {} not sent (the destination had those pages)", human_bytes(r.bytes_saved));
    }
    println!("  compression     {}", compression_line(&r.compression));
    if r.workers > 0 {
        let lanes = match r.lanes {
            0 => String::new(),
            1 => ", its batches on a QUIC stream of their own".to_string(),
            n => format!(", its batches on {n} QUIC streams, one per range of memory"),
        };
        println!("  page work       on {} worker thread{}{lanes}", r.workers, if r.workers == 1 { "" } else { "s" });
    }
    if r.throttle_max > 0 {
        println!("  throttle        vCPUs throttled up to {}% (auto-converge)", r.throttle_max);
    }
    if let Some(p) = &r.post_copy {
        println!(
            "  post-copy       {} pages after the switchover in {} ms, {} of them asked for by the guest; {} resumes",
            p.pages, p.post_copy_ms, p.requested, p.resumes
        );
    }
    println!(
        "  verified        memory digest {} {}",
        &r.memory_digest[..16],
        if r.digests_matched { "matched on both sides" } else { "NOT CHECKED" }
    );
}

fn print_prediction(p: &Prediction, to: &str) {
    let m = &p.measured;
    match &p.failure {
        None => println!("dry run to {to}: the migration would converge in {} rounds", p.rounds),
        Some(f) => println!("dry run to {to}: the migration would NOT converge: {f}"),
    }
    println!("  total           {} ms (predicted)", p.total_ms);
    if p.converges {
        println!("  downtime        {} ms", p.downtime_ms);
    }
    println!("  on the stream   {}", human_bytes(p.bytes));
    if p.throttle_max > 0 {
        println!("  throttle        vCPUs throttled up to {}% (auto-converge)", p.throttle_max);
    }
    let limit =
        if m.bandwidth_limit == 0 { "no limit".into() } else { format!("limit {}/s", human_bytes(m.bandwidth_limit)) };
    println!(
        "  link            {}/s with {}, round trip {:.2} ms ({limit})",
        human_bytes(m.link_bytes_per_s),
        m.transport,
        m.rtt_us as f64 / 1000.0
    );
    let (window_ms, dirtied) = m.dirty_curve.last().copied().unwrap_or_default();
    println!(
        "  guest           {} of {} pages touched; {dirtied} distinct pages written in {window_ms} ms",
        m.touched_pages, m.pages
    );
    let pass = |c: &PassCost| {
        let rate = |us: u64| human_bytes((c.pages * 4096 * 1_000_000).checked_div(us).unwrap_or(0));
        format!(
            "{}/s here, {}/s there, {:.0} B/page on the stream",
            rate(c.source_us),
            rate(c.destination_us),
            c.bytes as f64 / c.pages.max(1) as f64
        )
    };
    println!("  pipeline        round 0: {}", pass(&m.first_pass));
    println!("                  later rounds: {}", pass(&m.later_pass));
    if !p.advice.is_empty() {
        println!("  would converge with:");
        for a in &p.advice {
            println!("    {a}");
        }
    }
}

pub fn migrate(a: MigrateArgs) -> i32 {
    let tls_dir = match absolute(&a.tls_dir.clone().unwrap_or_else(default_tls_dir)) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let keep_snapshot = match a.keep_snapshot.as_deref().map(absolute).transpose() {
        Ok(k) => k,
        Err(code) => return code,
    };
    let fault = match (a.fault, a.fault_truncate_after) {
        (Some(FaultArg::FlipPage), _) => Some(Fault::FlipPageByte),
        (Some(FaultArg::FlipState), _) => Some(Fault::FlipStateByte),
        (None, Some(n)) => Some(Fault::TruncateAfter(n)),
        (None, None) => None,
    };
    let id = migration_id();
    let request = Request::Migrate(MigrateRequest {
        to: a.to.clone(),
        tls_dir,
        max_bandwidth: a.max_bandwidth.unwrap_or(0),
        downtime_ms: a.downtime_ms,
        auto_converge: a.auto_converge == OnOff::On,
        compress: a.compress == Compress::Auto,
        delta_cache_mib: a.delta_cache,
        workers: a.workers.map_or(0, usize::from),
        keep_snapshot,
        transport: a.transport.into(),
        dry_run: a.dry_run,
        fault,
        post_copy: a.post_copy,
        id: Some(id.clone()),
    });
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (socket, done) = (a.api_sock.clone(), done.clone());
        std::thread::spawn(move || watch_progress(socket, id, done))
    };
    let result = call(&a.api_sock, request, MIGRATE_TIMEOUT);
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    match result {
        Ok(response) => match response.migration {
            Some(MigrationStatus { prediction: Some(prediction), .. }) => {
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&prediction).unwrap_or_default());
                } else {
                    print_prediction(&prediction, &a.to);
                }
                if prediction.converges { 0 } else { EXIT_WOULD_NOT_CONVERGE }
            }
            Some(MigrationStatus { report: Some(report), arrived, keep_snapshot_error, .. }) => {
                let paused = arrived == Some(VmState::Paused);
                if a.json {
                    let mut value = serde_json::to_value(&report).unwrap_or_default();
                    value["arrived"] = serde_json::json!(arrived.map(|s| s.to_string()));
                    value["keep_snapshot_error"] = serde_json::json!(keep_snapshot_error);
                    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
                } else {
                    print_report(&report, &a.to);
                    if paused {
                        println!("  run state       paused, as it was here (resume it at the destination to run)");
                    }
                }
                match keep_snapshot_error {
                    Some(e) => {
                        eprintln!("novacron: the VM moved to {}, but {e}", a.to);
                        EXIT_SNAPSHOT_NOT_KEPT
                    }
                    None => 0,
                }
            }
            _ => {
                eprintln!("novacron: the VMM answered without a migration report");
                EXIT_FAILED
            }
        },
        Err(ClientError::Refused(e)) => {
            eprintln!("novacron: {}", e.message);
            EXIT_FAILED
        }
        Err(e) => {
            eprintln!("novacron: cannot migrate the VM: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

pub fn migrate_cancel(socket: PathBuf) -> i32 {
    match call(&socket, Request::MigrateCancel, Duration::from_secs(30)) {
        Ok(_) => {
            println!("cancel requested: the VM stays here");
            0
        }
        Err(e) => {
            eprintln!("novacron: cannot cancel the migration: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

pub fn migrate_set(a: MigrateSetArgs) -> i32 {
    let rate = match parse_rate(&a.max_bandwidth) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: --max-bandwidth: {e}");
            return EXIT_USAGE;
        }
    };
    match call(&a.api_sock, Request::MigrateSet { max_bandwidth: rate }, Duration::from_secs(30)) {
        Ok(_) => {
            println!(
                "migration bandwidth limit set to {}",
                if rate == 0 { "none".into() } else { format!("{rate} bytes/s") }
            );
            0
        }
        Err(e) => {
            eprintln!("novacron: cannot change the migration: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

pub fn certs(cmd: CertsCommand) -> i32 {
    let (result, dir) = match cmd {
        CertsCommand::Init { dir, name } => {
            let dir = dir.unwrap_or_else(default_tls_dir);
            (novacron_migration::tls::init(&dir, &name), dir)
        }
        CertsCommand::Issue { ca_dir, out, name } => (novacron_migration::tls::issue(&ca_dir, &out, &name), out),
    };
    match result {
        Ok(()) => {
            println!("TLS directory ready: {}", dir.display());
            0
        }
        Err(e) => {
            eprintln!("novacron: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_bytes_and_bits() {
        assert_eq!(parse_rate("25M"), Ok(25_000_000));
        assert_eq!(parse_rate("200Mbit"), Ok(25_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("64k"), Ok(64_000));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("10MB/s"), Ok(10_000_000));
        assert_eq!(parse_rate("off"), Ok(0));
        for bad in ["", "fast", "-5M", "M", "NaN"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
