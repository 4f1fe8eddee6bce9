//! Boot benchmark: time from spawning the VMM process to the guest's first serial line, and
//! the VMM's peak RSS beyond guest memory, for NovaCron and QEMU microvm booting the same
//! test guest with the same memory, alternating, in one run. Medians and ratios.
//!
//!     cargo bench -p novacron-benches --bench boot [-- RUNS]

use novacron_benches::{Error, median, memory_of, qemu, release_binary, spawn_to_first_line, test_guest_file};
use std::process::Command;
use std::time::Duration;

const MEM_MIB: u64 = 256;
const TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the process to settle after the first line before its memory is read.
const SETTLE: Duration = Duration::from_millis(200);
/// Quiet time after a VMM ends, before the next one starts: tearing a VM down leaves the
/// kernel work to do (freeing guest memory, RCU callbacks) that would land on the next
/// boot, whichever VMM it is.
const QUIET: Duration = Duration::from_millis(150);

struct Sample {
    first_line_ms: f64,
    overhead_mib: f64,
}

fn measure(cmd: Command) -> Result<Sample, Error> {
    let run = spawn_to_first_line(cmd, TIMEOUT)?;
    if !run.line.starts_with("NOVACRON-GUEST") {
        return Err(format!("unexpected first line {:?}", run.line).into());
    }
    std::thread::sleep(SETTLE);
    let mem = memory_of(run.child.id(), MEM_MIB << 20)?;
    let first_line_ms = run.first_line.as_secs_f64() * 1e3;
    drop(run);
    std::thread::sleep(QUIET);
    Ok(Sample { first_line_ms, overhead_mib: mem.overhead_kib() as f64 / 1024.0 })
}

fn main() -> Result<(), Error> {
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(15).max(10);
    let vmm = release_binary("novacron-vmm", "novacron-vmm")?;
    let qemu = qemu()?;
    let dir = std::env::temp_dir().join(format!("novacron-boot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = test_guest_file(&dir)?;

    let ours = || {
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(&guest).args(["--mem", &MEM_MIB.to_string(), "--vcpus", "1"]);
        c
    };
    let theirs = || {
        let mut c = Command::new(&qemu);
        c.args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            &MEM_MIB.to_string(),
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel"])
        .arg(&guest);
        c
    };

    // The floor every VMM pays: spawning a process and reading its first line.
    let echo = || {
        let mut c = Command::new("/bin/echo");
        c.arg("NOVACRON-GUEST boot");
        c
    };
    // One warm-up each (page cache, first-use costs), then alternate.
    measure(ours())?;
    measure(theirs())?;
    let (mut a, mut b, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprint!("\rrun {}/{runs}", i + 1);
        a.push(measure(ours())?);
        b.push(measure(theirs())?);
        floor.push(spawn_to_first_line(echo(), TIMEOUT)?.first_line.as_secs_f64() * 1e3);
    }
    eprintln!();
    let _ = std::fs::remove_dir_all(&dir);

    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let (our_ms, qemu_ms) = (med(&a, |s| s.first_line_ms), med(&b, |s| s.first_line_ms));
    let (our_mib, qemu_mib) = (med(&a, |s| s.overhead_mib), med(&b, |s| s.overhead_mib));
    println!(
        "\nBoot: spawn to the guest's first serial line, {MEM_MIB} MiB, 1 vCPU, test guest, median of {runs} runs"
    );
    println!("{:<28} {:>12} {:>12} {:>10}", "", "NovaCron", "QEMU microvm", "ratio");
    let floor_ms = median(&mut floor);
    println!("{:<28} {:>12.2} {:>12.2} {:>9.2}x", "first line (ms)", our_ms, qemu_ms, our_ms / qemu_ms);
    println!(
        "{:<28} {:>12.2} {:>12.2} {:>9.2}x",
        "  beyond spawning /bin/echo",
        our_ms - floor_ms,
        qemu_ms - floor_ms,
        (our_ms - floor_ms) / (qemu_ms - floor_ms)
    );
    println!("{:<28} {:>12.2} {:>12.2} {:>9.2}x", "VMM overhead RSS (MiB)", our_mib, qemu_mib, our_mib / qemu_mib);
    println!("(spawning /bin/echo and reading its line: {floor_ms:.2} ms, the floor every VMM pays)");
    println!("\ntargets: first line <= 4 ms: {}; overhead < 3 MiB: {}", verdict(our_ms <= 4.0), verdict(our_mib < 3.0));
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
