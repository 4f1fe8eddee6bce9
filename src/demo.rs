//! `novacron demo`: the story in one command, with nothing to set up. It boots the bundled
//! test guest in its own VMM process, streams what the guest reports, pauses and resumes it
//! through the control socket, shuts it down, and prints a summary with the guest's verdicts.

use clap::Args;
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::{Line, Watched};
use novacron_vmm::api::client::call;
use novacron_vmm::api::{Request, VmState};
use novacron_vmm::process::error_chain;
use std::process::Command;
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
    exit: String,
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

fn scenario(args: &DemoArgs, sock: &std::path::Path, f: &mut Findings) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the novacron binary: {e}"))?;
    let cmdline = format!("ws={} rate={} verify=1000 hb=250", args.ws, args.rate);
    step(&format!(
        "Booting the test guest in its own VMM process: {} vCPUs, {} MiB, a {} MiB working set dirtied at {} pages/s and verified every second",
        args.vcpus, args.mem, args.ws, args.rate
    ));
    let mut cmd = Command::new(exe);
    cmd.args([
        "vm",
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

    step("Shutting the VM down through its control socket");
    call(sock, Request::Shutdown, CALL_TIMEOUT).map_err(|e| error_chain(&e))?;
    let (status, _) = vm.wait_exit(TIMEOUT).map_err(|e| error_chain(&e))?;
    f.exit = status.to_string();
    if !status.success() {
        return Err(format!("the VMM ended with {status}"));
    }
    Ok(())
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
    let sequence_kept = findings.pause.is_some_and(|(_, before, after)| after == before + 1);
    match outcome {
        Ok(()) if findings.verify_fail == 0 && findings.verify_ok >= 3 && sequence_kept => {
            println!("\n  The guest verified its memory throughout and continued after the pause where it stopped.");
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
