//! The commands that talk to a daemon's control port: `vm ...`, `host list`, `events`,
//! and `daemon` itself. Human tables by default, `--output json` for scripts; every error
//! is one line that says what failed and what to do.

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use novacron_daemon::client::{Client, Connect, DEFAULT_ENDPOINT};
use novacron_daemon::pb;
use novacron_vmm::process::error_chain;
use std::path::PathBuf;
use std::time::Duration;

const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;

/// `println!` for the commands' output, without its panic: see [`out_line`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::remote::out_line(format_args!($($arg)*))
    };
}

/// Writes a line on stdout. When its reader has gone (`novacron vm list | head`) the
/// command ends quietly with status 0, as it would have by SIGPIPE; another failure (a full
/// disk) is one line on stderr and status 1. SIGPIPE itself stays ignored, so that a
/// connection the daemon closes is an error with a message, never a silent death.
pub fn out_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(line).and_then(|()| stdout.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "novacron: cannot write the output: {e}");
        std::process::exit(EXIT_FAILED);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// How to reach the daemon; every remote command takes these.
#[derive(Args, Clone)]
pub struct Remote {
    /// The daemon's control port (HOST:PORT).
    #[arg(long, global = true, value_name = "ADDR", env = "NOVACRON_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// TLS directory with the cluster's ca.pem (and node.pem/node.key to present).
    /// Default: $NOVACRON_TLS_DIR or ~/.novacron/tls.
    #[arg(long, global = true, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Prove yourself with the daemon's token (its <data dir>/token) instead of a
    /// certificate.
    #[arg(long, global = true, value_name = "FILE", env = "NOVACRON_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Human tables or JSON for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
pub struct DaemonArgs {
    /// Where the daemon keeps its state store, token, TLS directory (when --tls-dir is not
    /// given) and its VMs' sockets and logs.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// The control port's address.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ENDPOINT)]
    listen: String,
    /// The cluster's TLS directory. Default: <data dir>/tls, made with a new cluster CA
    /// on the first start.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// This host's name. Default: the machine's host name.
    #[arg(long)]
    name: Option<String>,
    /// The novacron-vmm binary. Default: $NOVACRON_VMM, or the one next to this program.
    #[arg(long, value_name = "PATH")]
    vmm_binary: Option<PathBuf>,
    /// vCPUs the VMs may have per physical CPU (memory is never overcommitted).
    #[arg(long, value_name = "RATIO", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpu_overcommit: u32,
    /// On the embedded store: join the cluster whose first daemon (which holds the store)
    /// listens at ADDR. Without it (and without --etcd) this daemon holds the store of a
    /// cluster of its own that others can join. Not highly available: see docs/ha.md.
    #[arg(long, value_name = "ADDR", conflicts_with = "etcd")]
    join: Option<String>,
    /// Keep the cluster's state in etcd (its client URLs, comma-separated; TLS with the
    /// cluster CA of --tls-dir): any daemon can then lead, and the cluster survives the
    /// loss of any machine. Give every member's URL, and run etcd with an election timeout
    /// of 500 ms or more (its default is 1000): guests run on through a loss of quorum only
    /// then (docs/ha.md).
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The host lease's time to live in seconds: a host cut off for longer is failed over
    /// (its guests pause themselves a second before). See docs/ha.md.
    #[arg(long, value_name = "SECS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=600))]
    lease_ttl: u64,
    /// A label of this host for placement rules, KEY=VALUE (repeat for more).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// On the primary: put new VMs on the least loaded host (spread) or fill hosts one by
    /// one (binpack).
    #[arg(long, value_enum, default_value = "spread")]
    placement: Strategy,
}

#[derive(Clone, Copy, ValueEnum)]
enum Strategy {
    Spread,
    Binpack,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Restart {
    Always,
    OnFailure,
    Never,
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    mem: u64,
    /// A kernel on the daemon's host. Default: the bundled test guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<String>,
    /// The kernel command line (for the test guest: its workload, e.g. "ws=8 hb=500").
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// What happens when the VMM process ends.
    #[arg(long, value_enum, default_value = "on-failure")]
    restart: Restart,
    /// on-failure: restarts allowed within --restart-window (default 3).
    #[arg(long, value_name = "N")]
    max_restarts: Option<u32>,
    /// on-failure: the window in seconds (default 60).
    #[arg(long, value_name = "SECS")]
    restart_window: Option<u64>,
    /// Define the VM without booting it (`vm start` boots it).
    #[arg(long)]
    no_start: bool,
    /// A group of this VM (e.g. app=web) that other VMs' affinity rules refer to (repeat
    /// for more).
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// Place it only on a host with this label (repeat for more).
    #[arg(long = "host-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    host_labels: Vec<(String, String)>,
    /// Place it only on a host that holds a VM of this group.
    #[arg(long = "affinity", value_name = "GROUP")]
    affinity: Vec<String>,
    /// Never place it on a host that holds a VM of this group.
    #[arg(long = "anti-affinity", value_name = "GROUP")]
    anti_affinity: Vec<String>,
}

#[derive(Args)]
pub struct MigrateArgs {
    name: String,
    /// The host to move it to (`novacron host list`).
    #[arg(long, value_name = "HOST")]
    to_host: String,
    /// Bandwidth limit: bytes/s with an optional k, M or G, or bits/s as e.g. 200Mbit.
    #[arg(long, value_name = "RATE", value_parser = crate::migrate::parse_rate)]
    max_bandwidth: Option<u64>,
    /// Longest pause of the guest allowed for the switchover.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    downtime_ms: u64,
    /// Predict instead of moving: measure the guest, the link to the target and the page
    /// pipeline for about a second, and say how long it would take, how long the guest
    /// would pause, how many bytes would go, and whether it would converge (and else what
    /// would make it). The VM stays where it is.
    #[arg(long, conflicts_with = "post_copy")]
    dry_run: bool,
    /// Switch to post-copy, as `vmm migrate --post-copy`: `after-rounds=N` or `auto`.
    /// The VM runs at the target at once and fetches its last pages from here; until they
    /// are in, a host lost on either side loses the VM.
    #[arg(long, value_name = "WHEN", value_parser = str::parse::<novacron_migration::source::PostCopy>)]
    post_copy: Option<novacron_migration::source::PostCopy>,
    /// Print the operation id and return at once instead of following it.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args)]
pub struct SnapshotArgs {
    name: String,
    /// A directory on the daemon's host (absolute).
    #[arg(long, value_name = "DIR")]
    to: String,
    /// Leave the VM paused afterwards.
    #[arg(long)]
    paused: bool,
    /// Print the operation id and return at once instead of waiting for the end.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args)]
pub struct SetLimitArgs {
    name: String,
    #[arg(long)]
    device: String,
    /// rx or tx, for a network device.
    #[arg(long)]
    direction: Option<String>,
    /// Bytes per period: B[/MS], or "off".
    #[arg(long, value_name = "RATE")]
    bw: Option<String>,
    #[arg(long, value_name = "BYTES")]
    bw_burst: Option<u64>,
    /// Requests per period: N[/MS], or "off".
    #[arg(long, value_name = "RATE")]
    ops: Option<String>,
    #[arg(long, value_name = "N")]
    ops_burst: Option<u64>,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// Define a VM on the daemon's host and boot it (unless --no-start).
    Create(CreateArgs),
    /// Boot a stopped VM.
    Start {
        name: String,
    },
    /// Shut a VM's guest down; it stays defined.
    Stop {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Stop a VM if it runs and forget it.
    Delete {
        name: String,
    },
    List,
    Show {
        name: String,
    },
    /// Write a snapshot of a running VM on the daemon's host (a long operation).
    Snapshot(SnapshotArgs),
    /// Boot a stopped VM from a snapshot of it.
    Restore {
        name: String,
        /// The snapshot directory on the daemon's host (absolute).
        #[arg(long, value_name = "DIR")]
        from: String,
    },
    /// Change a device's rate limits while the VM runs.
    SetLimit(SetLimitArgs),
    /// Move a running VM to another host of the cluster, live (pre-copy over QUIC or TLS over TCP).
    Migrate(MigrateArgs),
    /// Show a long operation (e.g. a snapshot) by its id.
    Operation {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// The cluster's hosts and what their VMs use.
    List,
    /// Take a host out of placement: no new VM and no failover goes there.
    Cordon { host: String },
    /// Put a cordoned host back into placement.
    Uncordon { host: String },
    /// Cordon a host and live-migrate every VM it holds to the others, by the placement
    /// rules; refused up front, saying which VM fits nowhere, when they cannot all go.
    Drain {
        host: String,
        /// Print the operation and return instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// The leader, the cluster store's members and health, every host with its lease and
    /// cordon, and every VM's owner and ownership epoch (from the store: no leader needed).
    Status,
    /// The cluster's event log: what its leaders decided (leading, hosts down and back,
    /// failovers and the VMs they moved), from the store.
    Events {
        /// Only events after this sequence number.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
    },
}

#[derive(Args)]
pub struct EventsArgs {
    /// Only this VM's events.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only events after this sequence number.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    after: u64,
    /// Keep watching for new events (Ctrl-C ends).
    #[arg(long)]
    follow: bool,
}

impl Remote {
    pub fn output(&self) -> Output {
        self.output
    }
}

pub fn daemon(a: DaemonArgs) -> i32 {
    let args = novacron_daemon::DaemonArgs {
        data_dir: a.data_dir,
        listen: a.listen,
        tls_dir: a.tls_dir,
        name: a.name,
        vmm_binary: a.vmm_binary,
        cpu_overcommit: a.cpu_overcommit,
        join: a.join,
        etcd: a.etcd,
        lease_ttl: a.lease_ttl,
        labels: a.labels.into_iter().collect(),
        strategy: match a.placement {
            Strategy::Spread => novacron_daemon::Strategy::Spread,
            Strategy::Binpack => novacron_daemon::Strategy::Binpack,
        },
    };
    match novacron_daemon::run::run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("novacron daemon: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

/// Runs `f` with a connected client on a small runtime; prints its error.
fn with_client<F>(remote: &Remote, what: &str, f: F) -> i32
where
    F: AsyncFnOnce(Client) -> Result<(), Failure>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: cannot start the async runtime: {e}");
            return EXIT_FAILED;
        }
    };
    let result = runtime.block_on(async {
        let token = match &remote.token_file {
            Some(path) => Some(novacron_daemon::auth::read_token(path).map_err(|e| Failure::Other(error_chain(&e)))?),
            None => None,
        };
        let connect = Connect {
            endpoint: remote.endpoint.clone(),
            tls_dir: remote.tls_dir.clone().unwrap_or_else(novacron_vmm::migrate::default_tls_dir),
            token,
        };
        let client = connect.connect().await.map_err(|e| Failure::Other(error_chain(&e)))?;
        f(client).await
    });
    match result {
        Ok(()) => 0,
        Err(Failure::Status(s)) => {
            eprintln!("novacron: cannot {what}: {}", status_text(&s));
            EXIT_FAILED
        }
        Err(Failure::Other(message)) => {
            eprintln!("novacron: cannot {what}: {message}");
            EXIT_FAILED
        }
    }
}

pub enum Failure {
    Status(tonic::Status),
    Other(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Status(s)
    }
}

/// A status's message, with a hint for the codes whose fix is on the caller's side.
fn status_text(s: &tonic::Status) -> String {
    let message = s.message().replace('\n', " ");
    match s.code() {
        tonic::Code::Unavailable if message.contains("transport") || message.is_empty() => {
            format!("the daemon is unreachable ({message}); is `novacron daemon` running at --endpoint?")
        }
        _ => message,
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    out!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn vm_table(vms: &[pb::Vm]) {
    out!(
        "{:<20} {:<9} {:>5} {:>9} {:>8} {:>8}  {:<12} LAST EXIT",
        "NAME",
        "PHASE",
        "VCPUS",
        "MEMORY",
        "PID",
        "RESTARTS",
        "HOST"
    );
    for vm in vms {
        let spec = vm.spec.clone().unwrap_or_default();
        let pid = if vm.pid == 0 { "-".to_string() } else { vm.pid.to_string() };
        let last = if vm.error.is_empty() { vm.last_exit.clone() } else { vm.error.clone() };
        out!(
            "{:<20} {:<9} {:>5} {:>9} {:>8} {:>8}  {:<12} {}",
            spec.name,
            vm.phase,
            spec.vcpus,
            format!("{} MiB", spec.mem_mib),
            pid,
            vm.restarts,
            vm.host,
            if last.is_empty() { "-" } else { &last }
        );
    }
}

fn show_vm(vm: &pb::Vm, output: Output) {
    match output {
        Output::Json => print_json(vm),
        Output::Table => {
            vm_table(std::slice::from_ref(vm));
            let spec = vm.spec.clone().unwrap_or_default();
            let restart = spec.restart.unwrap_or_default();
            out!("restart policy: {}", restart.kind);
            if !spec.cmdline.is_empty() {
                out!("command line:   {}", spec.cmdline);
            }
            out!("kernel:         {}", if spec.kernel.is_empty() { "the bundled test guest" } else { &spec.kernel });
            out!("serial log:     {}", vm.serial_log);
            out!("control socket: {}", vm.control_socket);
        }
    }
}

fn operation_line(op: &pb::Operation) -> String {
    match op.state.as_str() {
        "failed" => format!("operation {} ({} of {}) failed: {}", op.id, op.kind, op.vm, op.error),
        _ => format!("operation {} ({} of {}) {}: {}", op.id, op.kind, op.vm, op.state, op.message),
    }
}

fn print_operation(op: &pb::Operation, output: Output) {
    match output {
        Output::Json => print_json(op),
        Output::Table => out!("{}", operation_line(op)),
    }
}

/// A long operation just started: shown as it is (`no_wait`) or followed to its end.
async fn started(client: &mut Client, op: pb::Operation, no_wait: bool, output: Output) -> Result<(), Failure> {
    if no_wait {
        print_operation(&op, output);
        return Ok(());
    }
    wait_operation(client, op, output).await
}

/// Follows an operation to its end with a progress bar; fails when it fails.
async fn wait_operation(client: &mut Client, op: pb::Operation, output: Output) -> Result<(), Failure> {
    let bar = ProgressBar::new(100);
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos:>3}% {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(format!("{} of {}: {}", op.kind, op.vm, op.message));
    let mut stream = client.watch_operation(pb::OperationRef { id: op.id.clone() }).await?.into_inner();
    let mut last = op;
    while let Some(op) = stream.message().await? {
        bar.set_position(op.percent.into());
        bar.set_message(format!("{} of {}: {}", op.kind, op.vm, op.message));
        last = op;
    }
    bar.finish_and_clear();
    print_operation(&last, output);
    if last.state == "succeeded" { Ok(()) } else { Err(Failure::Other(last.error)) }
}

fn restart_policy(a: &CreateArgs) -> Result<pb::RestartPolicy, String> {
    let kind = match a.restart {
        Restart::Always => "always",
        Restart::OnFailure => "on-failure",
        Restart::Never => "never",
    };
    if a.restart != Restart::OnFailure && (a.max_restarts.is_some() || a.restart_window.is_some()) {
        return Err("--max-restarts and --restart-window apply to --restart on-failure only".into());
    }
    Ok(pb::RestartPolicy {
        kind: kind.into(),
        max_restarts: a.max_restarts.unwrap_or(0),
        window_ms: a.restart_window.map_or(0, |s| s.saturating_mul(1000)),
        ..Default::default()
    })
}

pub fn vm(remote: &Remote, cmd: VmCommand) -> i32 {
    let output = remote.output;
    let print = move |vm: pb::Vm, done: &str| match output {
        Output::Json => print_json(&vm),
        Output::Table => out!("VM {} {done} ({})", vm.spec.unwrap_or_default().name, vm.phase),
    };
    match cmd {
        VmCommand::Create(a) => {
            let restart = match restart_policy(&a) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("novacron: {e}");
                    return EXIT_USAGE;
                }
            };
            let what = format!("create VM {}", a.name);
            let request = pb::CreateVmRequest {
                spec: Some(pb::VmSpec {
                    name: a.name,
                    vcpus: a.vcpus,
                    mem_mib: a.mem,
                    kernel: a.kernel.unwrap_or_default(),
                    cmdline: a.cmdline,
                    restart: Some(restart),
                    groups: a.groups,
                    host_labels: a.host_labels.into_iter().collect(),
                    affinity: a.affinity,
                    anti_affinity: a.anti_affinity,
                }),
                start: Some(!a.no_start),
            };
            with_client(remote, &what, async move |mut c| {
                let vm = c.create_vm(request).await?.into_inner();
                print(vm, "created");
                Ok(())
            })
        }
        VmCommand::Start { name } => {
            simple(remote, "start", name, "started", print, async |mut c, r| c.start_vm(r).await)
        }
        VmCommand::Stop { name } => simple(remote, "stop", name, "stopped", print, async |mut c, r| c.stop_vm(r).await),
        VmCommand::Pause { name } => {
            simple(remote, "pause", name, "paused", print, async |mut c, r| c.pause_vm(r).await)
        }
        VmCommand::Resume { name } => {
            simple(remote, "resume", name, "resumed", print, async |mut c, r| c.resume_vm(r).await)
        }
        VmCommand::Delete { name } => {
            simple(remote, "delete", name, "deleted", print, async |mut c, r| c.delete_vm(r).await)
        }
        VmCommand::Show { name } => with_client(remote, &format!("show VM {name}"), async move |mut c| {
            let vm = c.get_vm(pb::VmRef { name }).await?.into_inner();
            show_vm(&vm, output);
            Ok(())
        }),
        VmCommand::List => with_client(remote, "list the VMs", async move |mut c| {
            let vms = c.list_vms(pb::ListVmsRequest {}).await?.into_inner();
            match output {
                Output::Json => print_json(&vms.vms),
                Output::Table => vm_table(&vms.vms),
            }
            Ok(())
        }),
        VmCommand::Snapshot(a) => with_client(remote, &format!("snapshot VM {}", a.name), async move |mut c| {
            let request = pb::SnapshotRequest { name: a.name, dir: a.to, paused: a.paused };
            let op = c.snapshot_vm(request).await?.into_inner();
            started(&mut c, op, a.no_wait, output).await
        }),
        VmCommand::Restore { name, from } => with_client(remote, &format!("restore VM {name}"), async move |mut c| {
            let vm = c.restore_vm(pb::RestoreRequest { name, dir: from }).await?.into_inner();
            print(vm, "restored");
            Ok(())
        }),
        VmCommand::SetLimit(a) => {
            with_client(remote, &format!("change the limits of VM {}", a.name), async move |mut c| {
                let request = pb::SetLimitRequest {
                    name: a.name,
                    device: a.device.clone(),
                    direction: a.direction.unwrap_or_default(),
                    bandwidth: a.bw.unwrap_or_default(),
                    bandwidth_burst: a.bw_burst.unwrap_or(0),
                    ops: a.ops.unwrap_or_default(),
                    ops_burst: a.ops_burst.unwrap_or(0),
                };
                let vm = c.set_limit(request).await?.into_inner();
                print(vm, &format!("has new limits on {}", a.device));
                Ok(())
            })
        }
        VmCommand::Migrate(a) => with_client(remote, &format!("migrate VM {}", a.name), async move |mut c| {
            let request = pb::MigrateVmRequest {
                name: a.name,
                to_host: a.to_host,
                max_bandwidth: a.max_bandwidth.unwrap_or(0),
                downtime_ms: a.downtime_ms,
                to_address: String::new(),
                dry_run: a.dry_run,
                post_copy: a.post_copy.map(|p| p.to_string()).unwrap_or_default(),
            };
            let op = c.migrate_vm(request).await?.into_inner();
            started(&mut c, op, a.no_wait, output).await
        }),
        VmCommand::Operation { id } => with_client(remote, &format!("show operation {id}"), async move |mut c| {
            let op = c.get_operation(pb::OperationRef { id }).await?.into_inner();
            print_operation(&op, output);
            Ok(())
        }),
    }
}

/// A call that takes a VM name and answers the VM.
fn simple<P, F>(remote: &Remote, verb: &str, name: String, done: &'static str, print: P, call: F) -> i32
where
    P: Fn(pb::Vm, &str),
    F: AsyncFnOnce(Client, pb::VmRef) -> Result<tonic::Response<pb::Vm>, tonic::Status>,
{
    with_client(remote, &format!("{verb} VM {name}"), async move |c| {
        let vm = call(c, pb::VmRef { name }).await?.into_inner();
        print(vm, done);
        Ok(())
    })
}

pub fn host(remote: &Remote, cmd: HostCommand) -> i32 {
    let output = remote.output;
    match cmd {
        HostCommand::List => with_client(remote, "list the hosts", async move |mut c| {
            let cluster = c.cluster_info(pb::ClusterInfoRequest {}).await?.into_inner();
            match output {
                Output::Json => print_json(&cluster.hosts),
                Output::Table => {
                    out!(
                        "{:<16} {:<22} {:<8} {:>11} {:>19} {:>5}  LABELS",
                        "NAME",
                        "ADDRESS",
                        "STATE",
                        "VCPUS USED",
                        "MEMORY USED",
                        "VMS"
                    );
                    for h in &cluster.hosts {
                        let mut labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        labels.sort();
                        out!(
                            "{:<16} {:<22} {:<8} {:>11} {:>19} {:>5}  {}{}",
                            h.name,
                            h.address,
                            h.state,
                            format!("{}/{}", h.used_vcpus, h.vcpus),
                            format!("{}/{} MiB", h.used_mem_mib, h.mem_mib),
                            h.vms,
                            labels.join(","),
                            if h.primary { " (primary)" } else { "" }
                        );
                    }
                }
            }
            Ok(())
        }),
        HostCommand::Cordon { host } => with_client(remote, "cordon the host", async move |mut c| {
            let h = c.cordon_host(pb::CordonRequest { host, cordoned: true }).await?.into_inner();
            print_host_status(&h, output);
            Ok(())
        }),
        HostCommand::Uncordon { host } => with_client(remote, "uncordon the host", async move |mut c| {
            let h = c.cordon_host(pb::CordonRequest { host, cordoned: false }).await?.into_inner();
            print_host_status(&h, output);
            Ok(())
        }),
        HostCommand::Drain { host, no_wait } => with_client(remote, "drain the host", async move |mut c| {
            let op = c.drain_host(pb::DrainRequest { host }).await?.into_inner();
            started(&mut c, op, no_wait, output).await
        }),
    }
}

fn print_host_status(h: &pb::HostStatus, output: Output) {
    match output {
        Output::Json => print_json(h),
        Output::Table => out!(
            "host {}: {}{}",
            h.name,
            if h.alive { "up" } else { "down" },
            if h.cordoned { ", cordoned (no new VMs)" } else { ", in placement" }
        ),
    }
}

pub fn cluster(remote: &Remote, cmd: ClusterCommand) -> i32 {
    let output = remote.output;
    match cmd {
        ClusterCommand::Status => with_client(remote, "read the cluster's status", async move |mut c| {
            let status = c.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
            match output {
                Output::Json => print_json(&status),
                Output::Table => print_cluster_status(&status),
            }
            Ok(())
        }),
        ClusterCommand::Events { after } => with_client(remote, "read the cluster's event log", async move |mut c| {
            let reply = c.cluster_events(pb::ClusterEventsRequest { after_seq: after }).await?.into_inner();
            for e in &reply.events {
                match output {
                    Output::Json => out!("{}", serde_json::to_string(e).unwrap_or_default()),
                    Output::Table => {
                        out!("{:>6} {} {:<12} {:<10} {:<20} {}", e.seq, time(e.at_ms), e.host, e.kind, e.vm, e.message)
                    }
                }
            }
            Ok(())
        }),
    }
}

fn print_cluster_status(s: &pb::ClusterStatus) {
    let leader = if s.leader.is_empty() { "none (an election is under way)" } else { &s.leader };
    out!("leader:   {leader}");
    out!("store:    {} at revision {}", s.store_kind, s.revision);
    for m in &s.store {
        let health = if m.healthy { "healthy" } else { "NOT ANSWERING" };
        out!("  {:<16} {:<28} {}{}", m.name, m.endpoint, health, if m.leader { ", leader" } else { "" });
    }
    out!("{:<16} {:<22} {:<6} {:<9}", "HOST", "ADDRESS", "LEASE", "PLACEMENT");
    for h in &s.hosts {
        out!(
            "{:<16} {:<22} {:<6} {:<9}{}",
            h.name,
            h.address,
            if h.alive { "held" } else { "GONE" },
            if h.cordoned { "cordoned" } else { "yes" },
            if h.leader { "  (leader)" } else { "" }
        );
    }
    out!("{:<20} {:<16} {:>6} {:<9} MIGRATING TO", "VM", "OWNER", "EPOCH", "DESIRED");
    for v in &s.vms {
        out!("{:<20} {:<16} {:>6} {:<9} {}", v.name, v.owner, v.epoch, v.desired, v.moving_to);
    }
}

pub fn events(remote: &Remote, a: EventsArgs) -> i32 {
    let output = remote.output;
    with_client(remote, "watch the events", async move |mut c| {
        let request = pb::WatchEventsRequest { after_seq: a.after, vm: a.vm.unwrap_or_default(), no_follow: !a.follow };
        let mut stream = c.watch_events(request).await?.into_inner();
        while let Some(e) = stream.message().await? {
            match output {
                Output::Json => out!("{}", serde_json::to_string(&e).unwrap_or_default()),
                Output::Table => {
                    out!("{:>6} {} {:<12} {:<10} {:<20} {}", e.seq, time(e.at_ms), e.host, e.kind, e.vm, e.message)
                }
            }
        }
        Ok(())
    })
}

/// Milliseconds since the epoch as UTC "YYYY-MM-DD HH:MM:SS".
fn time(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_dates() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00");
        assert_eq!(super::time(1_795_653_045_000), "2026-11-26 00:30:45");
        assert_eq!(super::time(951_782_400_000), "2000-02-29 00:00:00");
    }
}
