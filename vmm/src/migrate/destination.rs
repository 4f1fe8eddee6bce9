//! `vmm receive`: the destination of a live migration, as a process.
//!
//! It listens (QUIC, mutual TLS), takes the VM's memory into fresh guest memory, builds the
//! VM paused from the state, and lets it run when the source commits; from then on it is an
//! ordinary VMM process (console on stdout, control socket, exit status). If the migration
//! fails before the commit, nothing of the VM has run here and the process exits with 1.
//! With post-copy the VM runs from the commit on while its last pages arrive
//! (`super::post_copy`), its event loop on a thread of its own; if they cannot all come,
//! the process ends with status 3 and says how many are missing.

use super::post_copy::{PostCopyError, PostCopyMemory, RamLayout};
use crate::api::server::ApiServer;
use crate::builder::{self, Source};
use crate::config::{HostSide, VmConfig};
use crate::machine::Machine;
use crate::snapshot::{MachineSpec, RunState, SavedState};
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::uffd::Userfault;
use novacron_migration::destination::{self, BaseImage, DestinationVm, GuestPages, ReceiveError, Received, VmFault};
use novacron_migration::dirty::DirtySet;
use novacron_migration::page::PAGE_SIZE;
use novacron_migration::protocol::Hello;
use novacron_migration::stream;
use novacron_migration::tls::Identity;
use novacron_migration::transport::{Link, Listener};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// How long the keeper may take to claim an arriving VM (a store transaction).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to listen and what to run the received VM with.
#[derive(clap::Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// Address to listen on for the source (QUIC over UDP), e.g. 0.0.0.0:4700.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Control socket of the received VM.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// TLS directory: ca.pem, node.pem, node.key (`novacron certs init`). Default:
    /// $NOVACRON_TLS_DIR or ~/.novacron/tls.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// A snapshot directory of an earlier state of this VM: pages it already holds are not
    /// sent again (WAN delta sync).
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// Write the serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_file: Option<PathBuf>,
    /// Run the received guest only under a run permit (as `vmm run --require-permit`):
    /// after the commit it waits, paused, for its host's keeper.
    #[arg(long, requires = "api_sock")]
    pub require_permit: bool,
    /// With --require-permit: at the commit, ask the keeper listening on this socket to
    /// claim the VM for this host; the VM runs with the permit it gives, and the commit
    /// fails (the source keeps the VM) if it refuses.
    #[arg(long, value_name = "PATH", requires = "require_permit")]
    pub claim_from: Option<PathBuf>,
    /// During a post-copy, how long a lost link waits for the source to come back before
    /// the guest is given up as lost.
    #[arg(long, value_name = "SECS", default_value_t = destination::RESUME_WINDOW.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub resume_window: u64,
    /// Threads that decompress and hash the arriving pages. Default: one per core of
    /// this host.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
}

/// The VM being received.
struct Incoming {
    host: HostSide,
    claim_from: Option<PathBuf>,
    spec: Option<MachineSpec>,
    memory: Option<GuestMemory>,
    /// Where each RAM region is, for writing pages.
    ram: RamLayout,
    machine: Option<Machine>,
    /// Whether the VM ran at the source: it runs here only if it did.
    run: RunState,
    /// The control socket, for the received VM's event loop.
    api: Option<ApiServer>,
    /// Made when the source asks whether this side can run post-copy.
    userfault: Option<Userfault>,
    /// While a post-copy runs: the guest's faults on missing pages.
    post_copy: Option<PostCopyMemory>,
    /// During post-copy the VM's event loop runs on this thread, while the receive goes on
    /// here; it answers the process exit status.
    running: Option<JoinHandle<i32>>,
    /// The running VM's `Machine::memory_arriving_flag`, cleared when the post-copy ends.
    memory_arriving: Option<Arc<AtomicBool>>,
}

/// Why the VMM could not take the VM in (the engine keeps it as the source of its
/// `ReceiveError::{Prepare, Build, Start}`).
#[derive(Debug, thiserror::Error)]
enum IncomingError {
    #[error("the machine description is not valid")]
    Machine(#[source] postcard::Error),
    #[error("the machine cannot run here")]
    Spec(#[source] crate::config::ConfigError),
    #[error("RAM regions {regions:?} do not fit {mem_mib} MiB")]
    Regions { regions: Vec<u64>, mem_mib: u64 },
    #[error("cannot make guest memory")]
    Memory(#[source] memory::MemoryError),
    #[error("the VM state")]
    State(#[source] stream::StreamError),
    #[error("the VM state")]
    Saved(#[source] crate::snapshot::SnapshotError),
    #[error("the VM state describes another machine than the Hello did")]
    OtherMachine,
    #[error("no memory was prepared")]
    NotPrepared,
    #[error("the serial console file")]
    Serial(#[source] std::io::Error),
    #[error("cannot route stop signals to the event loop")]
    Signals(#[source] crate::runtime::RuntimeError),
    #[error("cannot build the machine")]
    Build(#[source] crate::builder::BuildError),
    #[error("the VM was not built")]
    NotBuilt,
    #[error("the disk images")]
    DiskLocks(#[source] crate::api::ApiError),
    #[error("the keeper's claim")]
    Claim(#[source] crate::permit::ClaimError),
    #[error("the run permit")]
    Permit(#[source] crate::api::ApiError),
    #[error("cannot resume the VM")]
    Resume(#[source] crate::api::ApiError),
    #[error("this VMM cannot catch the guest's faults on missing pages")]
    Userfault(#[source] crate::vstate::uffd::UffdError),
    #[error("the post-copy check was not made")]
    NotChecked,
    #[error("post-copy")]
    PostCopy(#[source] PostCopyError),
    #[error("the post-copy has not started")]
    NoPostCopy,
    #[error("cannot start the VM's event loop thread")]
    Thread(#[source] std::io::Error),
}

impl GuestPages for Incoming {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        if self.machine.is_some() {
            return None; // the VM exists: its memory is no longer ours to write
        }
        let at = self.ram.host(page)?;
        // SAFETY: the page lies inside a live mapping owned by `self.memory` (it is
        // unmapped only when that is dropped, which needs `&mut self`), and no vCPU or
        // device uses the memory before `build`, after which this returns None. The
        // `&mut self` borrow makes the slice the only access.
        Some(unsafe { std::slice::from_raw_parts_mut(at as *mut u8, PAGE_SIZE) })
    }
}

impl DestinationVm for Incoming {
    fn prepare(&mut self, hello: &Hello) -> Result<(), VmFault> {
        Ok(self.prepare_memory(hello)?)
    }

    fn build(&mut self, state: &[u8]) -> Result<(), VmFault> {
        Ok(self.build_machine(state)?)
    }

    fn start(&mut self) -> Result<(), VmFault> {
        Ok(self.start_machine()?)
    }

    fn check_post_copy(&mut self) -> Result<(), VmFault> {
        self.userfault = Some(Userfault::new().map_err(IncomingError::Userfault)?);
        Ok(())
    }

    fn start_post_copy(&mut self, pending: &DirtySet) -> Result<(), VmFault> {
        Ok(self.start_post_copy_machine(pending)?)
    }

    fn place(&mut self, page: u64, content: Option<&[u8]>) -> Result<(), VmFault> {
        let post_copy = self.post_copy.as_ref().ok_or(IncomingError::NoPostCopy)?;
        Ok(post_copy.place(page, content).map_err(IncomingError::PostCopy)?)
    }

    fn request_pages_over(&mut self, link: &Link) {
        if let Some(post_copy) = &self.post_copy {
            post_copy.set_link(link.requester());
        }
    }
}

impl Incoming {
    fn prepare_memory(&mut self, hello: &Hello) -> Result<(), IncomingError> {
        let spec: MachineSpec = postcard::from_bytes(&hello.machine).map_err(IncomingError::Machine)?;
        VmConfig::check_spec(&spec).map_err(IncomingError::Spec)?;
        let expected: Vec<u64> =
            crate::arch::x86_64::layout::ram_ranges(spec.mem_mib << 20).iter().map(|r| r.1).collect();
        if hello.regions != expected {
            return Err(IncomingError::Regions { regions: hello.regions.clone(), mem_mib: spec.mem_mib });
        }
        let memory = memory::create(spec.mem_mib << 20).map_err(IncomingError::Memory)?;
        self.ram = RamLayout::new(memory.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)));
        self.memory = Some(memory);
        tracing::info!(vcpus = spec.vcpus, mem_mib = spec.mem_mib, "receiving a VM");
        self.spec = Some(spec);
        Ok(())
    }

    fn build_machine(&mut self, state: &[u8]) -> Result<(), IncomingError> {
        let sections = stream::decode(state).map_err(IncomingError::State)?;
        let saved = SavedState::from_sections(&sections).map_err(IncomingError::Saved)?;
        if Some(&saved.spec) != self.spec.as_ref() {
            return Err(IncomingError::OtherMachine);
        }
        let memory = self.memory.clone().ok_or(IncomingError::NotPrepared)?;
        self.run = saved.run;
        let config = VmConfig::from_spec(&saved.spec, self.host.clone());
        let serial = crate::process::serial_output(&config).map_err(IncomingError::Serial)?;
        // From here on threads inherit the mask: stop signals reach the event loop only.
        crate::runtime::block_stop_signals().map_err(IncomingError::Signals)?;
        let source = Source::Migration { state: Box::new(saved), memory };
        let machine =
            builder::build(&config, serial, source, std::time::Instant::now()).map_err(IncomingError::Build)?;
        self.machine = Some(machine);
        Ok(())
    }

    /// The source has committed and let go of the disk images: take them, then run the
    /// VM, unless it was paused at the source.
    fn start_machine(&mut self) -> Result<(), IncomingError> {
        let machine = self.machine.as_mut().ok_or(IncomingError::NotBuilt)?;
        machine.take_disk_locks().map_err(IncomingError::DiskLocks)?;
        if machine.fenced() {
            // Under a permit: it runs when its host's keeper permits the new epoch.
            machine.set_run_when_permitted(!self.run.paused);
            let (Some(keeper), Some(api_sock)) = (&self.claim_from, &self.host.api_sock) else {
                tracing::info!("the VM has arrived; it waits for a run permit");
                return Ok(());
            };
            let (epoch, until_ms) =
                crate::permit::claim(keeper, api_sock, CLAIM_TIMEOUT).map_err(IncomingError::Claim)?;
            tracing::info!(epoch, "the keeper claimed the VM for this host");
            return machine.grant_permit(epoch, until_ms).map_err(IncomingError::Permit);
        }
        if self.run.paused {
            tracing::info!("the VM was paused at the source: it stays paused here");
            return Ok(());
        }
        machine.resume().map_err(IncomingError::Resume)
    }

    /// The source committed with `pending` pages still to send: drop them, catch the
    /// guest's faults on them, start the VM as `start_machine` does, and run its event loop
    /// on a thread of its own, since the receive goes on here until the last page is in.
    fn start_post_copy_machine(&mut self, pending: &DirtySet) -> Result<(), IncomingError> {
        let userfault = self.userfault.take().ok_or(IncomingError::NotChecked)?;
        let post_copy = PostCopyMemory::start(userfault, self.ram.clone(), pending).map_err(IncomingError::PostCopy)?;
        self.post_copy = Some(post_copy);
        let machine = self.machine.as_ref().ok_or(IncomingError::NotBuilt)?;
        let arriving = machine.memory_arriving_flag();
        arriving.store(true, Ordering::Release);
        self.memory_arriving = Some(arriving);
        self.start_machine()?;
        let mut machine = self.machine.take().ok_or(IncomingError::NotBuilt)?;
        let api = self.api.take();
        let running = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || crate::process::run_machine(&mut machine, api))
            .map_err(IncomingError::Thread)?;
        tracing::info!(pending = pending.count(), "post-copy: the VM runs here; its last pages follow");
        self.running = Some(running);
        Ok(())
    }

    /// The end of a post-copy that completed: every page is in.
    fn finish_post_copy(&mut self) {
        let Some(post_copy) = self.post_copy.take() else { return };
        if let Some(arriving) = self.memory_arriving.take() {
            arriving.store(false, Ordering::Release);
        }
        match post_copy.finish() {
            Ok(f) => crate::process::say(format_args!(
                "novacron: post-copy done: the guest waited on {} pages, {:.1} ms at the median, {:.1} ms at p99, {:.1} ms at most",
                f.pages,
                f.p50_us as f64 / 1000.0,
                f.p99_us as f64 / 1000.0,
                f.max_us as f64 / 1000.0
            )),
            Err(e) => tracing::warn!("post-copy done, but: {}", crate::process::error_chain(&e)),
        }
    }
}

/// During post-copy, after the link was lost: listens again on the receive's port until
/// `deadline`, for the source to come back.
fn listen_again(addr: SocketAddr, identity: &Identity, deadline: Instant) -> Option<Link> {
    crate::process::say(format_args!("novacron: post-copy: the link is lost; waiting for the source on {addr}"));
    let listener = match Listener::bind(addr, identity) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("post-copy: cannot listen again: {e}");
            // The port may still be closing; the receive asks again, until its deadline.
            std::thread::sleep(Duration::from_millis(200));
            return None;
        }
    };
    match listener.accept_until(Some(deadline)) {
        Ok(link) => {
            crate::process::say(format_args!("novacron: post-copy: the source is back from {}", link.peer()));
            Some(link)
        }
        Err(e) => {
            tracing::warn!("post-copy: no source came back: {e}");
            None
        }
    }
}

/// Receives one VM and runs it; returns the process exit status.
pub fn receive_vm(args: &ReceiveArgs) -> i32 {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        crate::process::say(format_args!("novacron: {what}: {e}"));
        crate::process::EXIT_BUILD_FAILED
    };
    let addr = match super::resolve(&args.listen) {
        Ok(a) => a,
        Err(e) => return fail("cannot listen", &e),
    };
    let tls_dir = args.tls_dir.clone().unwrap_or_else(super::default_tls_dir);
    let identity = match Identity::load(&tls_dir) {
        Ok(i) => i,
        Err(e) => return fail("TLS", &crate::process::error_chain(&e)),
    };
    let base = match &args.base {
        Some(dir) => match crate::snapshot::read(dir).map(|s| s.memory_path()) {
            Ok(path) => match BaseImage::open(&path) {
                Ok(b) => {
                    crate::process::say(format_args!(
                        "novacron: base image {} holds {} pages",
                        path.display(),
                        b.pages()
                    ));
                    Some(b)
                }
                Err(e) => return fail("cannot use the base snapshot", &e),
            },
            Err(e) => return fail("cannot use the base snapshot", &crate::process::error_chain(&e)),
        },
        None => None,
    };
    let mut listener = match Listener::bind(addr, &identity) {
        Ok(l) => l,
        Err(e) => return fail("cannot listen", &e),
    };
    // Bound after the listener: once the socket exists, the source can connect.
    let mut api = match args.api_sock.as_deref().map(ApiServer::bind).transpose() {
        Ok(a) => a,
        Err(e) => return fail("cannot open the control socket", &crate::process::error_chain(&e)),
    };
    // A dry run's probe takes the listener as a migration would: listen again on the same
    // port (the one the kernel chose, if the request said port 0); so does a post-copy
    // whose link was lost.
    let bound = listener.local_addr().unwrap_or(addr);
    let options = destination::ReceiveOptions {
        resume_window: Duration::from_secs(args.resume_window),
        workers: args.workers.map_or(0, usize::from),
    };
    crate::process::say(format_args!("novacron: waiting for a migration on {bound}"));
    let (link, mut incoming, report) = loop {
        let link = match listener.accept() {
            Ok(l) => l,
            Err(e) => return fail("no migration arrived", &e),
        };
        let peer = link.peer();
        crate::process::say(format_args!("novacron: receiving from {peer}"));
        let mut incoming = Incoming {
            claim_from: args.claim_from.clone(),
            host: HostSide {
                api_sock: args.api_sock.clone(),
                serial_file: args.serial_file.clone(),
                require_permit: args.require_permit,
            },
            spec: None,
            memory: None,
            ram: RamLayout::new([]),
            machine: None,
            run: RunState { paused: false },
            api: api.take(),
            userfault: None,
            post_copy: None,
            running: None,
            memory_arriving: None,
        };
        let mut relisten = |deadline| listen_again(bound, &identity, deadline);
        let (result, link) = destination::receive(&mut incoming, link, base.as_ref(), options, &mut relisten);
        match result {
            Ok(Received::Vm(report)) => break (link, incoming, report),
            Ok(Received::Probe { bytes }) => {
                crate::process::say(format_args!(
                    "novacron: a dry run from {peer} measured the link with {} KiB; waiting for the migration again",
                    bytes >> 10
                ));
                if let Some(link) = link {
                    link.close(Duration::from_millis(300));
                }
                api = incoming.api.take();
                listener = match Listener::bind(bound, &identity) {
                    Ok(l) => l,
                    Err(e) => return fail("cannot listen again after a dry run", &e),
                };
            }
            Err(e) => {
                if let Some(link) = link {
                    link.close(Duration::from_millis(300));
                }
                if incoming.running.is_some() {
                    // The guest ran here and cannot go on: end it with the process.
                    crate::process::say(format_args!("novacron: VM stopped: {}", crate::process::error_chain(&e)));
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                    std::process::exit(crate::process::EXIT_VMM_FAULT);
                }
                let what = match e {
                    ReceiveError::PostCopyUnavailable(_) => "the migration asked for post-copy; nothing runs here",
                    _ => "the migration failed; nothing runs here",
                };
                return fail(what, &crate::process::error_chain(&e));
            }
        }
    };
    incoming.finish_post_copy();
    crate::process::say(format_args!(
        "novacron: VM received from {} ({} pages, {} KiB on the stream, memory digest {}{}); {}",
        link.as_ref().map_or_else(|| "its source".to_string(), |l| l.peer().to_string()),
        report.pages_received,
        report.bytes_received >> 10,
        &report.memory_digest[..16],
        if incoming.running.is_some() {
            format!("; post-copy: {} pages after the start, {} resumes", report.post_copy_pages, report.resumes)
        } else {
            String::new()
        },
        if incoming.run.paused { "paused, as it was at the source (resume it to run)" } else { "running" }
    ));
    // The source closes the connection once it has read Running (or PostCopyComplete).
    if let Some(link) = link {
        std::thread::spawn(move || link.wait_closed(Duration::from_secs(2)));
    }
    if let Some(running) = incoming.running.take() {
        return running.join().unwrap_or(crate::process::EXIT_VMM_FAULT);
    }
    let Some(mut machine) = incoming.machine.take() else {
        return fail("the migration ended without a VM", &"internal error");
    };
    crate::process::run_machine(&mut machine, incoming.api.take())
}
