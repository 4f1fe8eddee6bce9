//! Command-line parsing and the `vm` commands. Every error is one line on stderr that
//! says what failed and what to do, with a non-zero status.

use crate::remote::Output;
use clap::{Args, Parser, Subcommand, ValueEnum};
use novacron_devices::virtio::LimitTarget;
use novacron_vmm::api::client::{ClientError, call};
use novacron_vmm::api::{LimitChange, Request, VmStatus};
use novacron_vmm::config::VmArgs;
use novacron_vmm::migrate::destination::{ReceiveArgs, receive_vm};
use novacron_vmm::process::{RestoreArgs, error_chain, init_logging, init_logging_at, parse_args, restore_vm, run_vm};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_FAILED: i32 = 1;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing a large VM's memory takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// NovaCron: run and manage KVM virtual machines.
#[derive(Parser)]
#[command(name = "novacron", version, about)]
struct Cli {
    #[command(flatten)]
    remote: crate::remote::Remote,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// The whole story with nothing to set up: three daemons on loopback form a cluster,
    /// boot the bundled test guest, live-migrate it between hosts while it verifies its
    /// memory, restart it after its VMM is killed, and report. Needs only /dev/kvm.
    Demo(crate::demo::DemoArgs),
    /// Run the host daemon: the supervisors of this host's VMs, their state store, and the
    /// gRPC control port the `vm`, `host` and `events` commands talk to.
    Daemon(crate::remote::DaemonArgs),
    /// The host's keeper (started by the daemon; see docs/ha.md): holds the host's lease in
    /// the cluster store and gives the VMMs of the VMs the host owns their run permits.
    Keeper(novacron_cluster::process::KeeperArgs),
    /// Create and control VMs through a daemon (--endpoint).
    #[command(subcommand)]
    Vm(crate::remote::VmCommand),
    /// The cluster's hosts: list, cordon, uncordon, drain.
    #[command(subcommand)]
    Host(crate::remote::HostCommand),
    /// The cluster as a whole: its leader, store, leases and VM ownership.
    #[command(subcommand)]
    Cluster(crate::remote::ClusterCommand),
    /// The daemon's events (VMs created, started, restarted, failed, ...).
    Events(crate::remote::EventsArgs),
    /// Run one VM in a VMM process and control it through its control socket, with no
    /// daemon.
    #[command(subcommand)]
    Vmm(VmmCommand),
    /// The cluster's TLS certificates (migration peers authenticate each other with them).
    #[command(subcommand)]
    Certs(crate::migrate::CertsCommand),
}

#[derive(Subcommand)]
enum VmmCommand {
    /// Boot a VM in this process and stream its serial console to stdout until the guest
    /// powers off or Ctrl-C. Without --kernel, boots the bundled test guest.
    Run(VmArgs),
    /// Stop every vCPU of a running VM.
    Pause(SocketArgs),
    /// Continue a paused VM exactly where it stopped.
    Resume(SocketArgs),
    /// Show a running VM's state.
    Status(StatusArgs),
    /// End a running VM (its VMM process exits with status 0).
    Shutdown(SocketArgs),
    /// Change a device's rate limits while the VM runs.
    SetLimit(SetLimitArgs),
    /// Write a snapshot of a running VM (it pauses for the writing, then goes on).
    Snapshot(SnapshotArgs),
    /// Continue a VM from a snapshot in this process, as `vmm run` does.
    Restore(RestoreArgs),
    /// Move a running VM to another host's `vmm receive`, live (pre-copy, or post-copy with --post-copy, over QUIC or TLS over TCP).
    Migrate(crate::migrate::MigrateArgs),
    /// Stop a running migration; the VM stays (or becomes again) the one running here.
    MigrateCancel(SocketArgs),
    /// Change a running migration's bandwidth limit.
    MigrateSet(crate::migrate::MigrateSetArgs),
    /// Receive a VM from a migration and run it in this process (console on stdout).
    Receive(ReceiveArgs),
}

#[derive(Args)]
struct SnapshotArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Directory to write state.bin and memory.bin into (created if needed).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Leave the VM paused after the snapshot.
    #[arg(long)]
    paused: bool,
}

fn snapshot(a: SnapshotArgs) -> i32 {
    let dir = match std::path::absolute(&a.to) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("novacron: cannot use {} as a directory: {e}", a.to.display());
            return 2;
        }
    };
    let request = Request::Snapshot { dir: dir.to_string_lossy().into_owned(), paused: a.paused };
    match call(&a.socket.api_sock, request, SNAPSHOT_TIMEOUT) {
        Ok(response) => {
            if let Some(r) = response.snapshot {
                println!("{}", r.summary(&dir));
            }
            0
        }
        Err(e) => {
            eprintln!("novacron: cannot snapshot the VM: {}", error_chain(&e));
            1
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Direction {
    Rx,
    Tx,
}

#[derive(Args)]
struct SetLimitArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// The device, by name: disk0, net0, rng0... (`vmm status` lists them).
    #[arg(long)]
    device: String,
    /// For a network interface: which direction's limiter.
    #[arg(long, value_enum)]
    direction: Option<Direction>,
    /// Bandwidth: BYTES per second, BYTES/MS per MS milliseconds, or "off".
    #[arg(long, value_name = "BYTES[/MS]|off")]
    bw: Option<String>,
    /// Requests: N per second, N/MS per MS milliseconds, or "off".
    #[arg(long, value_name = "N[/MS]|off")]
    ops: Option<String>,
    /// A one-time burst of bytes on top of the bandwidth.
    #[arg(long, value_name = "BYTES")]
    bw_burst: Option<u64>,
    /// A one-time burst of requests on top of the rate.
    #[arg(long, value_name = "N")]
    ops_burst: Option<u64>,
}

fn set_limit(a: SetLimitArgs) -> i32 {
    let changes = LimitChange::parse("bw", a.bw.as_deref(), a.bw_burst)
        .and_then(|bw| Ok((bw, LimitChange::parse("ops", a.ops.as_deref(), a.ops_burst)?)));
    let (bandwidth, ops) = match changes {
        Ok(c) => c,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 2;
        }
    };
    let target = match a.direction {
        None => LimitTarget::Device,
        Some(Direction::Rx) => LimitTarget::Rx,
        Some(Direction::Tx) => LimitTarget::Tx,
    };
    let request = Request::SetLimit { device: a.device.clone(), target, bandwidth, ops };
    match control("change the limits of", &a.socket, request) {
        Ok(_) => {
            println!("limits of {} changed", a.device);
            0
        }
        Err(code) => code,
    }
}

#[derive(Args)]
pub struct SocketArgs {
    /// The VM's control socket (the --api-sock it was started with).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArgs,
}

fn control(verb: &str, socket: &SocketArgs, request: Request) -> Result<Option<VmStatus>, i32> {
    match call(&socket.api_sock, request, CALL_TIMEOUT) {
        Ok(response) => Ok(response.status),
        Err(e) => {
            let hint = match &e {
                ClientError::Refused(_) => "",
                _ => " (check the path, and that the VM is still running)",
            };
            eprintln!("novacron: cannot {verb} the VM: {}{hint}", error_chain(&e));
            Err(EXIT_FAILED)
        }
    }
}

fn print_status(s: &VmStatus, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(s).unwrap_or_default()),
        Output::Table => {
            println!("{:<8} {:>5} {:>9} {:>10} {:>8}  KERNEL", "STATE", "VCPUS", "MEMORY", "UPTIME", "PID");
            println!(
                "{:<8} {:>5} {:>9} {:>10} {:>8}  {} ({})",
                s.state.to_string(),
                s.vcpus,
                format!("{} MiB", s.mem_mib),
                format!("{:.1} s", s.uptime_ms as f64 / 1000.0),
                s.pid,
                s.kernel,
                s.boot_format
            );
            if !s.devices.is_empty() {
                println!("devices: {}", s.devices.join(", "));
            }
        }
    }
}

/// `output`: the global --output (tables or JSON).
fn vmm_command(cmd: VmmCommand, output: Output) -> i32 {
    let done = |r: Result<Option<VmStatus>, i32>, what: &str| match r {
        Ok(_) => {
            println!("{what}");
            0
        }
        Err(code) => code,
    };
    match cmd {
        VmmCommand::Run(args) => run_vm(&args),
        VmmCommand::Pause(s) => done(control("pause", &s, Request::Pause), "paused"),
        VmmCommand::Resume(s) => done(control("resume", &s, Request::Resume), "resumed"),
        VmmCommand::Shutdown(s) => done(control("shut down", &s, Request::Shutdown), "shut down"),
        VmmCommand::SetLimit(a) => set_limit(a),
        VmmCommand::Snapshot(a) => snapshot(a),
        VmmCommand::Restore(a) => restore_vm(&a),
        VmmCommand::Migrate(a) => crate::migrate::migrate(a),
        VmmCommand::MigrateCancel(s) => crate::migrate::migrate_cancel(s.api_sock),
        VmmCommand::MigrateSet(a) => crate::migrate::migrate_set(a),
        VmmCommand::Receive(a) => receive_vm(&a),
        VmmCommand::Status(a) => match control("query", &a.socket, Request::Status) {
            Ok(Some(status)) => {
                print_status(&status, output);
                0
            }
            Ok(None) => {
                eprintln!("novacron: the VM answered without a status; is it a NovaCron VMM?");
                EXIT_FAILED
            }
            Err(code) => code,
        },
    }
}

pub fn main() -> i32 {
    let cli = match parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // A daemon tells what it does; a command says only what went wrong.
    match cli.command {
        Command::Daemon(_) | Command::Keeper(_) => init_logging_at(tracing::Level::INFO),
        _ => init_logging(),
    }
    // SIGPIPE keeps Rust's disposition (ignored) in every command: a socket the peer
    // closed is then an error the command reports in one line, not a silent death. A
    // client whose stdout reader went away (`novacron vm list | head`) still ends quietly:
    // see `remote::out_line`.
    match cli.command {
        Command::Demo(args) => crate::demo::run(&args),
        Command::Vmm(cmd) => vmm_command(cmd, cli.remote.output()),
        Command::Daemon(args) => crate::remote::daemon(args),
        Command::Keeper(args) => match novacron_cluster::process::run(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("novacron keeper: {}", novacron_vmm::process::error_chain(&e));
                1
            }
        },
        Command::Vm(cmd) => crate::remote::vm(&cli.remote, cmd),
        Command::Host(cmd) => crate::remote::host(&cli.remote, cmd),
        Command::Cluster(cmd) => crate::remote::cluster(&cli.remote, cmd),
        Command::Events(args) => crate::remote::events(&cli.remote, args),
        Command::Certs(cmd) => crate::migrate::certs(cmd),
    }
}
