//! Command-line parsing and the `vm` commands. Every error is one line on stderr that
//! says what failed and what to do, with a non-zero status.

use clap::{Args, Parser, Subcommand, ValueEnum};
use novacron_vmm::api::client::{ClientError, call};
use novacron_vmm::api::{Request, VmStatus};
use novacron_vmm::config::VmArgs;
use novacron_vmm::process::{error_chain, init_logging, parse_args, run_vm};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_FAILED: i32 = 1;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// NovaCron: run and manage KVM virtual machines.
#[derive(Parser)]
#[command(name = "novacron", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the bundled test guest with its memory workload, pause and resume it through
    /// its control socket, and report what the guest verified. Needs only /dev/kvm.
    Demo(crate::demo::DemoArgs),
    /// Run and control virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Subcommand)]
enum VmCommand {
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
}

#[derive(Args)]
struct SocketArgs {
    /// The VM's control socket (the --api-sock it was started with).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Human table or JSON for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
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

fn print_status(s: &VmStatus, output: OutputFormat) {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(s).unwrap_or_default()),
        OutputFormat::Table => {
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
        }
    }
}

fn vm_command(cmd: VmCommand) -> i32 {
    let done = |r: Result<Option<VmStatus>, i32>, what: &str| match r {
        Ok(_) => {
            println!("{what}");
            0
        }
        Err(code) => code,
    };
    match cmd {
        VmCommand::Run(args) => run_vm(&args),
        VmCommand::Pause(s) => done(control("pause", &s, Request::Pause), "paused"),
        VmCommand::Resume(s) => done(control("resume", &s, Request::Resume), "resumed"),
        VmCommand::Shutdown(s) => done(control("shut down", &s, Request::Shutdown), "shut down"),
        VmCommand::Status(a) => match control("query", &a.socket, Request::Status) {
            Ok(Some(status)) => {
                print_status(&status, a.output);
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
    init_logging();
    let cli = match parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Command::Demo(args) => crate::demo::run(&args),
        Command::Vm(cmd) => vm_command(cmd),
    }
}
