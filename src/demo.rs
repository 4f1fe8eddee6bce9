//! `novacron demo`: the story in one command, with nothing to set up. It boots the bundled
//! test guest in its own VMM process, streams what the guest reports, pauses and resumes it
//! through the control socket, live-migrates it to a second VMM process (QUIC with mutual
//! TLS on loopback, certificates made on the spot) while it keeps verifying its memory,
//! shuts it down, and prints a summary with the guest's verdicts.

use clap::Args;
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Line, Watched};
use novacron_migration::source::Report;
use novacron_vmm::api::client::call;
use novacron_vmm::api::{MigrateRequest, Request, VmState};
use novacron_vmm::process::error_chain;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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

/// What the demo measured, for the summary.
#[derive(Default)]
struct Findings {
    first_line: Option<Duration>,
    cpus_online: u64,
    mem_seen: u64,
    verify_ok: u64,
    verify_fail: u64,
    pages_verified: u64,
    pause: Option<(Duration, u64, u64)>,
    migration: Option<Migrated>,
    exit: String,
}

/// What the live migration showed.
struct Migrated {
    report: Report,
    /// From the last heartbeat at the source to the first at the destination.
    guest_gap: Duration,
    last_before: u64,
    first_after: u64,
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Prints the guest's lines as they come, heartbeats once a second.
fn echo(line: &Line, hb_every: u64) {
    let show = match line.parsed {
        GuestLine::Heartbeat(s) => s % hb_every == 0,
        _ => true,
    };
    if show {
        println!("    guest | {}", line.text);
    }
}

fn note(f: &mut Findings, line: &Line) {
    match line.parsed {
        GuestLine::Banner { mem_mib, .. } => f.mem_seen = mem_mib,
        GuestLine::Online(n) => f.cpus_online = n,
        GuestLine::VerifyOk { pages, .. } => {
            f.verify_ok += 1;
            f.pages_verified = pages;
        }
        GuestLine::VerifyFail { .. } => f.verify_fail += 1,
        _ => {}
    }
}

fn until(vm: &mut Watched, f: &mut Findings, what: &str, mut done: impl FnMut(&Line) -> bool) -> Result<Line, String> {
    vm.wait_for(what, TIMEOUT, |l| {
        note(f, l);
        echo(l, 4);
        done(l)
    })
    .map_err(|e| error_chain(&e))
}

fn scenario(args: &DemoArgs, sock: &Path, f: &mut Findings) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the novacron binary: {e}"))?;
    let cmdline = format!("ws={} rate={} verify=1000 hb=250", args.ws, args.rate);
    step(&format!(
        "Booting the test guest in its own VMM process: {} vCPUs, {} MiB, a {} MiB working set dirtied at {} pages/s and verified every second",
        args.vcpus, args.mem, args.ws, args.rate
    ));
    let mut cmd = Command::new(exe);
    cmd.args([
        "vmm",
        "run",
        "--vcpus",
        &args.vcpus.to_string(),
        "--mem",
        &args.mem.to_string(),
        "--cmdline",
        &cmdline,
        "--api-sock",
    ])
    .arg(sock);
    let mut vm = Watched::spawn(cmd).map_err(|e| error_chain(&e))?;

    let boot = until(&mut vm, f, "the guest's first line", |l| l.parsed == GuestLine::Boot)?;
    f.first_line = Some(boot.at - vm.spawned_at);
    until(&mut vm, f, "two verifications", |l| matches!(l.parsed, GuestLine::VerifyOk { epoch: 2, .. }))?;

    step("Pausing the VM for one second through its control socket: every vCPU leaves the guest");
    call(sock, Request::Pause, CALL_TIMEOUT).map_err(|e| error_chain(&e))?;
    let paused_at = Instant::now();
    let state = call(sock, Request::Status, CALL_TIMEOUT).map_err(|e| error_chain(&e))?.status.map(|s| s.state);
    println!("    status: {}", state.map(|s| s.to_string()).unwrap_or_else(|| "?".into()));
    if state != Some(VmState::Paused) {
        return Err("the VM did not report itself paused".into());
    }
    // Lines already on their way may still arrive; then the console is silent.
    while paused_at.elapsed() < Duration::from_secs(1) {
        if let Ok(Some(line)) = vm.next_line(Duration::from_millis(50)) {
            note(f, &line);
            echo(&line, 1);
        }
    }
    let last = vm.heartbeats().last().copied().unwrap_or(0);
    call(sock, Request::Resume, CALL_TIMEOUT).map_err(|e| error_chain(&e))?;
    step("Resumed: the guest goes on from the same heartbeat");
    let next = until(&mut vm, f, "a heartbeat after resume", |l| matches!(l.parsed, GuestLine::Heartbeat(_)))?;
    let GuestLine::Heartbeat(next_seq) = next.parsed else { unreachable!() };
    f.pause = Some((next.at - paused_at, last, next_seq));
    until(&mut vm, f, "a verification after resume", |l| {
        matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
    })?;

    let (mut vm, sock) = migrate(vm, sock, f)?;

    step("Shutting the VM down through its control socket");
    call(&sock, Request::Shutdown, CALL_TIMEOUT).map_err(|e| error_chain(&e))?;
    let (status, _) = vm.wait_exit(TIMEOUT).map_err(|e| error_chain(&e))?;
    f.exit = status.to_string();
    if !status.success() {
        return Err(format!("the VMM ended with {status}"));
    }
    Ok(())
}

/// Moves the VM to a second VMM process by live migration; returns that process and its
/// control socket.
fn migrate(mut vm: Watched, sock: &Path, f: &mut Findings) -> Result<(Watched, PathBuf), String> {
    let dir = sock.parent().ok_or("no directory for the sockets")?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the novacron binary: {e}"))?;
    let tls = dir.join("tls");
    novacron_migration::tls::init(&tls, "demo").map_err(|e| error_chain(&e))?;
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no free port on loopback: {e}"))?;
    let dst_sock = dir.join("demo-dst.sock");
    step(&format!("Live-migrating the running VM to a second VMM process on {addr} (QUIC, mutual TLS)"));
    let mut cmd = Command::new(exe);
    cmd.args(["vmm", "receive", "--listen", &addr.to_string()]).arg("--api-sock").arg(&dst_sock);
    cmd.arg("--tls-dir").arg(&tls);
    let mut dst = Watched::spawn(cmd).map_err(|e| error_chain(&e))?;
    let deadline = Instant::now() + TIMEOUT;
    while !dst_sock.exists() {
        if Instant::now() > deadline {
            return Err("the receiving VMM never listened".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let request = Request::Migrate(MigrateRequest {
        to: addr.to_string(),
        tls_dir: tls.to_string_lossy().into_owned(),
        max_bandwidth: 0,
        downtime_ms: 50,
        auto_converge: true,
        compress: true,
        delta_cache_mib: 64,
        keep_snapshot: None,
        fault: None,
    });
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (sock, done) = (sock.to_owned(), done.clone());
        std::thread::spawn(move || crate::migrate::watch_progress(sock, done))
    };
    let answer = call(sock, request, TIMEOUT);
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let report = answer
        .map_err(|e| error_chain(&e))?
        .migration
        .and_then(|m| m.report)
        .ok_or("the migration ended without a report")?;
    // The source VMM ends by itself once the VM runs at the destination.
    let already = vm.seen.len();
    let (status, _) = vm.wait_exit(TIMEOUT).map_err(|e| error_chain(&e))?;
    for line in &vm.seen[already..] {
        note(f, line);
        echo(line, 4);
    }
    let last = vm.seen.iter().rev().find(|l| matches!(l.parsed, GuestLine::Heartbeat(_))).cloned();
    let (Some(last), true) = (last, status.success()) else {
        return Err(format!("the source VMM ended with {status}"));
    };
    step("The source VMM has exited; the guest goes on in the destination process");
    let first = until(&mut dst, f, "a heartbeat at the destination", |l| matches!(l.parsed, GuestLine::Heartbeat(_)))?;
    until(&mut dst, f, "a verification at the destination", |l| {
        matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
    })?;
    let (GuestLine::Heartbeat(before), GuestLine::Heartbeat(after)) = (last.parsed, first.parsed) else {
        return Err("no heartbeats around the migration".into());
    };
    f.migration = Some(Migrated { report, guest_gap: first.at - last.at, last_before: before, first_after: after });
    Ok((dst, dst_sock))
}

fn summary(args: &DemoArgs, f: &Findings) {
    println!("\n  NovaCron demo summary");
    println!(
        "  {:<28} {}",
        "first guest line",
        f.first_line
            .map(|d| format!("{:.1} ms after the VMM process was spawned", d.as_secs_f64() * 1e3))
            .unwrap_or("-".into())
    );
    println!("  {:<28} {} of {}", "vCPUs online in the guest", f.cpus_online, args.vcpus);
    println!("  {:<28} {} MiB of {}", "memory seen by the guest", f.mem_seen, args.mem);
    println!(
        "  {:<28} {} OK, {} FAIL ({} pages each)",
        "memory verifications", f.verify_ok, f.verify_fail, f.pages_verified
    );
    if let Some((gap, before, after)) = f.pause {
        println!(
            "  {:<28} {:.2} s without a heartbeat; HB {before} -> HB {after}",
            "pause and resume",
            gap.as_secs_f64()
        );
    }
    if let Some(m) = &f.migration {
        let r = &m.report;
        println!(
            "  {:<28} {} ms in all, {} rounds, {} KiB sent; VMM downtime {:.1} ms",
            "live migration",
            r.total_ms,
            r.rounds,
            r.bytes_sent >> 10,
            r.downtime_us as f64 / 1000.0
        );
        println!(
            "  {:<28} {:.0} ms between heartbeats (period 250 ms); HB {} -> HB {}",
            "  as the guest saw it",
            m.guest_gap.as_secs_f64() * 1e3,
            m.last_before,
            m.first_after
        );
        println!(
            "  {:<28} {} ({})",
            "  memory digest",
            &r.memory_digest[..16],
            if r.digests_matched { "the same on both sides" } else { "NOT compared" }
        );
    }
    println!("  {:<28} {}", "VMM process", f.exit);
}

pub fn run(args: &DemoArgs) -> i32 {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("novacron: demo: cannot create a temporary directory: {e}");
            return 1;
        }
    };
    let mut findings = Findings::default();
    let outcome = scenario(args, &dir.path().join("demo-vm.sock"), &mut findings);
    summary(args, &findings);
    let sequence_kept = findings.pause.is_some_and(|(_, before, after)| after == before + 1)
        && findings.migration.as_ref().is_some_and(|m| m.first_after == m.last_before + 1);
    match outcome {
        Ok(()) if findings.verify_fail == 0 && findings.verify_ok >= 3 && sequence_kept => {
            println!(
                "\n  The guest verified its memory throughout and continued where it stopped, after the pause and after moving to another process."
            );
            0
        }
        Ok(()) => {
            eprintln!("novacron: demo: the guest did not verify cleanly or lost its sequence (see above)");
            1
        }
        Err(e) => {
            eprintln!("novacron: demo failed: {e}");
            1
        }
    }
}
