//! The VMM process: one VM, from arguments to exit status.
//!
//! `novacron vmm run` and the standalone `novacron-vmm` binary both end up in [`run_vm`].
//! Exit status: 0 when the guest powers off or resets or the control socket says
//! `shutdown`; 128+n after signal n; 1 when the VM cannot be built (bad arguments, no KVM,
//! not a kernel); 2 when the guest crashes (triple fault); 3 on a KVM or VMM fault.

use crate::api::server::ApiServer;
use crate::builder::{self, Source};
use crate::config::{HostSide, VmArgs, VmConfig};
use crate::runtime::{self, VmExit};
use crate::snapshot::lazy::{LazyMemory, LoadError, Prefetch};
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::vstate::memory::GuestMemory;
use novacron_devices::legacy::SerialOutput;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub const EXIT_BUILD_FAILED: i32 = 1;
/// A KVM or VMM fault stopped the VM (as `VmExit::code` says for a vCPU's).
pub const EXIT_VMM_FAULT: i32 = 3;

/// Exit status for a bad command line (as clap uses).
pub const EXIT_USAGE: i32 = 2;

/// Parses the command line. A usage error becomes one line on stderr (clap's first) and
/// the exit status to use; help and version print as clap prints them.
pub fn parse_args<T: clap::Parser>() -> Result<T, i32> {
    T::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        let shown =
            [ErrorKind::DisplayHelp, ErrorKind::DisplayVersion, ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand];
        if shown.contains(&e.kind()) {
            let _ = e.print();
            return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { EXIT_USAGE } else { 0 };
        }
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
        eprintln!("novacron: {first} (see --help)");
        EXIT_USAGE
    })
}

/// An error and its causes on one line: "what failed: because: because".
pub use novacron_migration::error_chain;

pub(crate) fn serial_output(config: &VmConfig) -> std::io::Result<SerialOutput> {
    Ok(match &config.serial_file {
        Some(path) => Box::new(std::fs::File::create(path)?),
        None => Box::new(std::io::stdout()),
    })
}

/// Logs go to stderr, so that stdout carries only the guest's console. The level comes
/// from NOVACRON_LOG (error, warn, info, debug, trace; default warn). A plain level rather
/// than an env-filter: the filter's regex engine would double the code this process pages
/// in at start-up, and a VMM process logs little.
pub fn init_logging() {
    init_logging_at(tracing::Level::WARN);
}

/// Logging to stderr at `$NOVACRON_LOG` (error, warn, info, debug, trace), else `default`.
/// A log line that cannot be written (stderr is a file on a full disk) is dropped and
/// counted, never a panic: `eprintln!` panics on a failed write, and tracing-subscriber
/// reports its own write errors with `eprintln!`, so neither may end a guest.
pub fn init_logging_at(default: tracing::Level) {
    let level = std::env::var("NOVACRON_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(|| LossyStderr)
        .with_target(false)
        .log_internal_errors(false)
        .try_init();
}

/// Writes to the log that failed since the process started (their lines are lost).
pub static LOST_LOG_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Stderr that swallows (and counts) its write errors.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            LOST_LOG_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line on stderr, as `eprintln!` but without its panic when stderr cannot be written.
pub fn say(line: std::fmt::Arguments) {
    let _ = writeln!(LossyStderr, "{line}");
}

/// Builds and runs one VM; returns the process exit status.
fn fail(what: &str, e: &dyn std::error::Error) -> i32 {
    say(format_args!("novacron: {what}: {}", error_chain(e)));
    EXIT_BUILD_FAILED
}

/// Builds and runs one VM; returns the process exit status.
pub fn run_vm(args: &VmArgs) -> i32 {
    let began = Instant::now();
    match VmConfig::from_args(args) {
        Ok(config) => run(&config, Source::Boot, began),
        Err(e) => fail("invalid VM configuration", &e),
    }
}

/// Where a restored VM's console and control socket go (the rest is in the snapshot).
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory (`vmm snapshot --to DIR`).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// Control socket of the restored VM.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Write the serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_file: Option<PathBuf>,
    /// Run the restored guest only under a run permit (as `vmm run --require-permit`).
    #[arg(long, requires = "api_sock")]
    pub require_permit: bool,
    /// How the snapshot's memory comes in: `lazy` runs the guest at once and loads the
    /// memory behind it, checking each 2 MiB as it comes (a damaged chunk then stops the
    /// VM); `eager` checks all of it before the guest runs; `auto` is lazy where this host
    /// allows a userfaultfd, else eager.
    #[arg(long, value_enum, default_value_t = RestoreMemory::Auto)]
    pub memory: RestoreMemory,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMemory {
    Auto,
    Lazy,
    Eager,
    /// Tests: lazy, but only what is touched comes in (no prefetch), so that the memory
    /// stays incomplete for as long as a test needs.
    #[value(hide = true)]
    OnDemand,
}

/// Restores a snapshot in this process and runs it; returns the process exit status.
pub fn restore_vm(args: &RestoreArgs) -> i32 {
    let began = Instant::now();
    let snapshot = match snapshot::read(&args.from) {
        Ok(s) => s,
        Err(e) => return fail("cannot restore", &e),
    };
    if let Err(e) = VmConfig::check_spec(&snapshot.state.spec) {
        return fail("cannot restore this snapshot here", &e);
    }
    let (memory, lazy) = match map_snapshot_memory(&snapshot, args.memory) {
        Ok(m) => m,
        Err(e) => return fail("cannot restore", &e),
    };
    let host = HostSide {
        api_sock: args.api_sock.clone(),
        serial_file: args.serial_file.clone(),
        require_permit: args.require_permit,
    };
    let config = VmConfig::from_spec(&snapshot.state.spec, host);
    run(&config, Source::Restore { state: Box::new(snapshot.state), memory, lazy }, began)
}

/// The guest memory of a restore, mapped as `how` says.
fn map_snapshot_memory(
    snapshot: &Snapshot,
    how: RestoreMemory,
) -> Result<(GuestMemory, Option<LazyMemory>), SnapshotError> {
    if how == RestoreMemory::Eager {
        return Ok((snapshot::map_memory(snapshot)?, None));
    }
    let first = snapshot::lazy::first_touched(&snapshot.state);
    let prefetch = if how == RestoreMemory::OnDemand { Prefetch::None } else { Prefetch::InOrder };
    match snapshot::lazy::map_lazily(&snapshot.dir, &snapshot.memory, prefetch, &first, memory_lost) {
        Ok((memory, lazy)) => Ok((memory, Some(lazy))),
        Err(e @ SnapshotError::Userfault(_)) if how == RestoreMemory::Auto => {
            tracing::warn!("{}; restoring eagerly", error_chain(&e));
            Ok((snapshot::map_memory(snapshot)?, None))
        }
        Err(e) => Err(e),
    }
}

/// A lazy restore cannot complete the guest's memory: the VM cannot go on, and the pages
/// it waits for never come, so the process ends here.
fn memory_lost(e: &LoadError) {
    say(format_args!("novacron: VM stopped: its memory cannot be restored: {}", error_chain(e)));
    let _ = std::io::stdout().flush();
    std::process::exit(EXIT_VMM_FAULT);
}

fn run(config: &VmConfig, source: Source, began: Instant) -> i32 {
    let serial = match serial_output(config) {
        Ok(s) => s,
        Err(e) => return fail("cannot open the serial console file", &e),
    };
    if let Err(e) = runtime::block_stop_signals() {
        return fail("cannot start", &e);
    }
    let api = match config.api_sock.as_deref().map(ApiServer::bind).transpose() {
        Ok(a) => a,
        Err(e) => return fail("cannot open the control socket", &e),
    };
    let mut machine = match builder::build(config, serial, source, began) {
        Ok(m) => m,
        Err(e) => return fail("cannot start the VM", &e),
    };
    run_machine(&mut machine, api)
}

/// Runs a built VM's event loop until the VM ends; returns the process exit status.
pub(crate) fn run_machine(machine: &mut crate::machine::Machine, api: Option<ApiServer>) -> i32 {
    let exit = match runtime::run(machine, api) {
        Ok(exit) => exit,
        Err(e) => return fail("the VMM's event loop failed", &e),
    };
    machine.shut_down();
    let _ = std::io::stdout().flush();
    match &exit {
        VmExit::PowerOff | VmExit::Reset | VmExit::Shutdown => tracing::info!("{exit}"),
        VmExit::Evicted(_) => tracing::warn!("{exit}"),
        VmExit::Migrated(_) => say(format_args!("novacron: {exit}")),
        _ => say(format_args!("novacron: VM stopped: {exit}")),
    }
    exit.code()
}
