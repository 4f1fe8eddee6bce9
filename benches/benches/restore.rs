//! Restore benchmark: a snapshot of the test guest (256 MiB VM, 1 vCPU, a 128 MiB working
//! set) restored eagerly and lazily, alternating, RUNS times each: the VMM's own time from
//! the start of the restore to the guest's first instruction (the status's
//! `first_instruction_us`), p50 and p99; for lazy restores also the time until the loader
//! has all of memory in, and that the guest goes on (its next heartbeat and verdict).
//! Eager restore (check every chunk, then map the file) is the baseline, in the same run.
//!
//!     cargo bench -p novacron-benches --bench restore [-- RUNS]

use novacron_benches::{Error, release_binary, test_guest_file};
use novacron_guest_image::report::GuestLine;
use novacron_guest_image::watch::Watched;
use novacron_vmm::api::client::call;
use novacron_vmm::api::{Request, VmStatus};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MEM_MIB: u64 = 256;
const WS_MIB: u64 = 128;
const TIMEOUT: Duration = Duration::from_secs(120);
const CALL: Duration = Duration::from_secs(10);
/// Quiet time after a VMM ends, before the next one starts (its teardown is the kernel's
/// work, which would land on the next restore).
const QUIET: Duration = Duration::from_millis(150);

#[derive(Default)]
struct Samples {
    first_instruction_us: Vec<f64>,
    loaded_ms: Vec<f64>,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn status(sock: &Path) -> Result<VmStatus, Error> {
    call(sock, Request::Status, CALL)?.status.ok_or_else(|| "no status in the answer".into())
}

/// Boots the test guest, lets it write its working set and verify once, and snapshots it
/// paused into `dir`/snap. Returns the last heartbeat before the snapshot.
fn make_snapshot(vmm: &Path, guest: &Path, dir: &Path) -> Result<u64, Error> {
    let sock = dir.join("boot.sock");
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(guest).args(["--mem", &MEM_MIB.to_string(), "--vcpus", "1"]);
    cmd.args(["--cmdline", &format!("ws={WS_MIB} rate=2000 verify=300 hb=100")]).arg("--api-sock").arg(&sock);
    let mut vm = Watched::spawn(cmd)?;
    vm.wait_verified(2, TIMEOUT)?;
    let snap = dir.join("snap");
    call(&sock, Request::Snapshot { dir: snap.to_string_lossy().into(), paused: true }, TIMEOUT)?;
    while let Ok(Some(_)) = vm.next_line(Duration::from_millis(300)) {}
    let last = vm.heartbeats().last().copied().ok_or("no heartbeat before the snapshot")?;
    call(&sock, Request::Shutdown, CALL)?;
    vm.wait_exit(TIMEOUT)?;
    Ok(last)
}

/// One restore with `--restore-memory how`; for a lazy one, waits until all memory is in
/// and checks that the guest went on from `last`.
fn restore(vmm: &Path, dir: &Path, how: &str, last: u64, samples: &mut Samples) -> Result<(), Error> {
    let sock = dir.join(format!("{how}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(vmm);
    cmd.arg("--restore-from").arg(dir.join("snap")).args(["--restore-memory", how]).arg("--api-sock").arg(&sock);
    let mut vm = Watched::spawn(cmd)?;
    let deadline = Instant::now() + TIMEOUT;
    let first = loop {
        if let Ok(s) = status(&sock)
            && let Some(us) = s.first_instruction_us
        {
            break us;
        }
        if Instant::now() > deadline {
            return Err(format!("the {how} restore never ran the guest").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    samples.first_instruction_us.push(first as f64);
    let heartbeat = vm.wait_for("a heartbeat", TIMEOUT, |l| matches!(l.parsed, GuestLine::Heartbeat(_)))?;
    if heartbeat.parsed != GuestLine::Heartbeat(last + 1) {
        return Err(format!("the restored guest printed {:?}, not heartbeat {}", heartbeat.text, last + 1).into());
    }
    if how == "lazy" {
        loop {
            let s = status(&sock)?;
            let load = s.memory_load.ok_or("a lazy restore without its loader's status")?;
            if load.done {
                samples.loaded_ms.push(load.elapsed_ms as f64);
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the memory never came in: {load:?}").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let verdict = vm.wait_for("a verdict", TIMEOUT, |l| {
            matches!(l.parsed, GuestLine::VerifyOk { .. } | GuestLine::VerifyFail { .. })
        })?;
        if !matches!(verdict.parsed, GuestLine::VerifyOk { .. }) {
            return Err(format!("the lazily restored guest's memory does not verify: {}", verdict.text).into());
        }
    }
    call(&sock, Request::Shutdown, CALL)?;
    vm.wait_exit(TIMEOUT)?;
    std::thread::sleep(QUIET);
    Ok(())
}

fn main() -> Result<(), Error> {
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(50).max(5);
    let vmm = release_binary("novacron-vmm", "novacron-vmm")?;
    let dir = tempfile::tempdir()?;
    let guest = test_guest_file(dir.path())?;
    eprintln!("snapshotting a {MEM_MIB} MiB test guest with a {WS_MIB} MiB working set...");
    let last = make_snapshot(&vmm, &guest, dir.path())?;
    let mut eager = Samples::default();
    let mut lazy = Samples::default();
    for run in 0..runs {
        eprint!("\rrun {}/{runs}", run + 1);
        restore(&vmm, dir.path(), "eager", last, &mut eager)?;
        restore(&vmm, dir.path(), "lazy", last, &mut lazy)?;
    }
    eprintln!();

    let (e50, e99) =
        (percentile(&mut eager.first_instruction_us, 50.0), percentile(&mut eager.first_instruction_us, 99.0));
    let (l50, l99) =
        (percentile(&mut lazy.first_instruction_us, 50.0), percentile(&mut lazy.first_instruction_us, 99.0));
    let loaded50 = percentile(&mut lazy.loaded_ms, 50.0);
    println!(
        "\nRestore of a {MEM_MIB} MiB snapshot (test guest, {WS_MIB} MiB working set), {runs} runs each, alternating:"
    );
    println!("| restore to the guest's first instruction | p50 | p99 |");
    println!("|---|---|---|");
    println!("| eager (every chunk checked, then the file mapped) | {:.2} ms | {:.2} ms |", e50 / 1e3, e99 / 1e3);
    println!("| lazy (userfaultfd, loaded behind the guest) | {:.2} ms | {:.2} ms |", l50 / 1e3, l99 / 1e3);
    println!("| ratio lazy / eager | {:.3}x | {:.3}x |", l50 / e50, l99 / e99);
    println!("lazy: all memory in after {loaded50:.0} ms (p50); every lazily restored guest went on and verified");
    println!(
        "target: lazy restore to the first instruction under 2 ms p99: {}",
        if l99 < 2000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
