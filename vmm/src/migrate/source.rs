//! The source of a live migration inside the VMM process.
//!
//! `start` checks the request, then runs the engine on a thread of its own: it connects,
//! reads pages and the dirty log itself (guest memory and the VM fd are shared), and sends
//! `EngineRequest`s to the VMM thread for what only that thread may do (pause and save the
//! state, resume, throttle). The VMM thread answers them in its event loop
//! (`runtime::run`), and learns the outcome from `EngineRequest::Finished`.

use crate::api::{ApiError, ErrorKind, MigrateRequest, MigrationStatus};
use crate::disk_locks::DiskLocks;
use crate::machine::Machine;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::Vm;
use novacron_migration::VmFault;
use novacron_migration::dirty::DirtySet;
use novacron_migration::page::PAGE_SIZE;
use novacron_migration::source::{
    self, Control, Fault, MigrateError, Phase, PostCopy, Prediction, Report, SourceOptions, SourceVm,
};
use novacron_migration::throttle::Bandwidth;
use novacron_migration::tls::Identity;
use novacron_migration::transport::{self, TransportChoice, TruncateAfter};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// How long the engine waits for the VMM thread to pause and save, or to resume.
const VMM_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the engine asks of the VMM thread.
pub enum EngineRequest {
    /// Pause the VM (if it runs), stop device work, and answer with the state stream.
    PauseAndSave(Sender<Result<Vec<u8>, ApiError>>),
    /// Undo PauseAndSave: the migration failed before its commit.
    Resume(Sender<Result<(), ApiError>>),
    Throttle(u8),
    /// The engine is done; the link is closed.
    Finished(Box<Outcome>),
}

/// How the engine's thread ended.
pub enum Outcome {
    Migrated(Result<Report, MigrateError>),
    /// A dry run: the VM never stopped running here.
    Predicted(Result<Prediction, MigrateError>),
}

/// A running migration, as the VMM thread holds it.
pub struct Migration {
    /// The id its client gave it, so that a client's progress display shows only its own.
    pub id: Option<String>,
    pub to: String,
    pub dry_run: bool,
    pub control: Control,
    pub bandwidth: Bandwidth,
    pub requests: Receiver<EngineRequest>,
    pub notify: EventFd,
    pub keep_snapshot: Option<PathBuf>,
    /// The control connection waiting for the final answer.
    pub waiting: Option<u64>,
    /// Whether the VM ran when the engine paused it (so that a rollback resumes it).
    pub was_running: bool,
    thread: Option<JoinHandle<()>>,
}

impl Migration {
    /// What `migrate_status` shows while it runs.
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus {
            id: self.id.clone(),
            to: self.to.clone(),
            dry_run: self.dry_run,
            progress: self.control.snapshot(),
            prediction: None,
            report: None,
            error: None,
            arrived: None,
            keep_snapshot_error: None,
        }
    }

    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why the VM could not do what the engine asked (the engine keeps it as the source of its
/// `MigrateError`).
#[derive(Debug, thiserror::Error)]
enum VmSideError {
    #[error("the VM has ended")]
    Ended,
    #[error("the VMM did not {what} within {timeout:?}")]
    NoAnswer { what: &'static str, timeout: Duration },
    #[error("the VMM could not {what}")]
    Refused {
        what: &'static str,
        #[source]
        source: ApiError,
    },
    #[error("page {0} is not in guest RAM")]
    NotInRam(u64),
    #[error("reading page {page}")]
    ReadPage {
        page: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM's dirty log")]
    DirtyLog(#[source] crate::vstate::vm::VmError),
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, msg)
}

/// Checks the request and starts the migration thread.
pub fn start(machine: &Machine, request: &MigrateRequest) -> Result<Migration, ApiError> {
    let addr = super::resolve(&request.to).map_err(bad)?;
    let identity = Identity::load(std::path::Path::new(&request.tls_dir))
        .map_err(|e| bad(format!("TLS: {}", crate::process::error_chain(&e))))?;
    if request.downtime_ms == 0 {
        return Err(bad("downtime_ms must be at least 1"));
    }
    if let Some(dir) = &request.keep_snapshot {
        crate::api::check_snapshot_dir("keep_snapshot", dir)?;
    }
    if request.dry_run && (request.keep_snapshot.is_some() || request.fault.is_some()) {
        return Err(bad("a dry run moves nothing: it takes neither keep_snapshot nor a fault"));
    }
    if request.dry_run && request.post_copy.is_some() {
        return Err(bad("a dry run predicts a pre-copy migration only: leave post_copy out"));
    }
    if request.post_copy == Some(PostCopy::AfterRounds(0)) {
        return Err(bad("post_copy after_rounds must be at least 1 (round 0 is the first pass over memory)"));
    }
    let machine_bytes = postcard::to_stdvec(&machine.spec).map_err(|e| bad(format!("machine spec: {e}")))?;
    let (memory, vm) = machine.memory_and_vm();
    let notify = EventFd::new(EFD_NONBLOCK).map_err(|e| bad(format!("event fd: {e}")))?;
    let engine_notify = notify.try_clone().map_err(|e| bad(format!("event fd: {e}")))?;
    let (tx, requests) = channel();
    let control = Control::default();
    let bandwidth = Bandwidth::new(request.max_bandwidth);
    let options = SourceOptions {
        downtime: Duration::from_millis(request.downtime_ms),
        auto_converge: request.auto_converge,
        compress: request.compress,
        delta_cache: (request.delta_cache_mib << 20) as usize,
        fault: request.fault,
        post_copy: request.post_copy,
        workers: request.workers,
        ..SourceOptions::default()
    };
    let truncate = match request.fault {
        Some(Fault::TruncateAfter(n)) => Some(TruncateAfter(n)),
        _ => None,
    };
    let complete = machine.memory_complete();
    let (choice, dry_run) = (request.transport, request.dry_run);
    let side = VmSide::new(memory, vm, machine_bytes, (tx, engine_notify), machine.disk_locks(), complete);
    let (engine_control, engine_bandwidth) = (control.clone(), bandwidth.clone());
    let thread = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let link = LinkArgs { addr, identity, bandwidth: engine_bandwidth, truncate, choice };
            if dry_run {
                run_dry_run(side, link, options, engine_control)
            } else {
                run_engine(side, link, options, engine_control)
            }
        })
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("cannot start the migration thread: {e}")))?;
    tracing::info!(to = %request.to, dry_run, "migration started");
    Ok(Migration {
        id: request.id.clone(),
        to: request.to.clone(),
        dry_run,
        control,
        bandwidth,
        requests,
        notify,
        keep_snapshot: request.keep_snapshot.as_ref().map(PathBuf::from),
        waiting: None,
        was_running: false,
        thread: Some(thread),
    })
}

/// Where and how the engine connects.
struct LinkArgs {
    addr: std::net::SocketAddr,
    identity: Identity,
    bandwidth: Bandwidth,
    truncate: Option<TruncateAfter>,
    choice: TransportChoice,
}

fn run_engine(mut side: VmSide, link: LinkArgs, options: SourceOptions, control: Control) {
    let LinkArgs { addr, identity, bandwidth, truncate, choice } = link;
    let result = match transport::connect(addr, &identity, bandwidth.clone(), truncate, choice) {
        Ok(mut link) => {
            let mut reconnect = || transport::connect(addr, &identity, bandwidth.clone(), None, choice);
            let result = source::migrate(&mut side, &mut link, options, control, &mut reconnect);
            // After success the destination closes; after a failure give the Abort a moment.
            let grace = if result.is_ok() { Duration::from_secs(1) } else { Duration::from_millis(300) };
            link.close(grace);
            result
        }
        Err(e) => Err(MigrateError::Link(e)),
    };
    match &result {
        Ok(r) => tracing::info!(
            downtime_us = r.downtime_us,
            total_ms = r.total_ms,
            transport = %r.transport,
            "migration done"
        ),
        Err(e) => tracing::warn!("migration failed: {}", novacron_migration::error_chain(e)),
    }
    side.ask(EngineRequest::Finished(Box::new(Outcome::Migrated(result))));
}

fn run_dry_run(mut side: VmSide, link: LinkArgs, options: SourceOptions, control: Control) {
    let LinkArgs { addr, identity, bandwidth, truncate, choice } = link;
    control.update(|p| p.phase = Phase::Measuring);
    let cancelled = || control.cancel.load(std::sync::atomic::Ordering::Relaxed);
    // The probe measures what the link carries; the limit goes into the prediction.
    let result = match transport::connect(addr, &identity, Bandwidth::new(0), truncate, choice) {
        Ok(mut link) => {
            let result = source::dry_run(&mut side, &mut link, &options, bandwidth.get(), &cancelled);
            link.close(Duration::from_millis(300));
            result
        }
        Err(e) => Err(MigrateError::Link(e)),
    };
    control.update(|p| p.phase = if result.is_ok() { Phase::Done } else { Phase::Failed });
    if let Err(e) = &result {
        tracing::warn!("dry run failed: {}", novacron_migration::error_chain(e));
    }
    side.ask(EngineRequest::Finished(Box::new(Outcome::Predicted(result))));
}

/// The pages of a region that the VMM itself wrote (vm-memory marks them).
fn vmm_writes(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// One RAM region as the engine numbers pages.
struct Region {
    start: GuestAddress,
    bytes: u64,
    first_page: u64,
}

/// The VM as the engine sees it.
struct VmSide {
    memory: GuestMemory,
    vm: Arc<Vm>,
    regions: Vec<Region>,
    machine: Vec<u8>,
    requests: Sender<EngineRequest>,
    notify: EventFd,
    disk_locks: Arc<DiskLocks>,
    /// False while a lazy restore still loads the memory: pages it has not put in yet
    /// look untouched, but hold the snapshot's contents.
    memory_complete: bool,
}

impl VmSide {
    fn new(
        memory: GuestMemory,
        vm: Arc<Vm>,
        machine: Vec<u8>,
        (requests, notify): (Sender<EngineRequest>, EventFd),
        disk_locks: Arc<DiskLocks>,
        memory_complete: bool,
    ) -> Self {
        let mut regions = Vec::new();
        let mut first_page = 0;
        for r in memory.iter() {
            regions.push(Region { start: r.start_addr(), bytes: r.len(), first_page });
            first_page += r.len() / PAGE_SIZE as u64;
        }
        VmSide { memory, vm, regions, machine, requests, notify, disk_locks, memory_complete }
    }

    fn ask(&self, request: EngineRequest) -> bool {
        let sent = self.requests.send(request).is_ok();
        let _ = self.notify.write(1);
        sent
    }

    fn ask_and_wait<T>(
        &self,
        make: impl FnOnce(Sender<Result<T, ApiError>>) -> EngineRequest,
        what: &'static str,
    ) -> Result<T, VmFault> {
        let (tx, rx) = channel();
        if !self.ask(make(tx)) {
            return Err(VmSideError::Ended.into());
        }
        let answer = rx.recv_timeout(VMM_ANSWER_TIMEOUT);
        let answer = answer.map_err(|_| VmSideError::NoAnswer { what, timeout: VMM_ANSWER_TIMEOUT })?;
        Ok(answer.map_err(|source| VmSideError::Refused { what, source })?)
    }
}

impl SourceVm for VmSide {
    fn machine(&self) -> Vec<u8> {
        self.machine.clone()
    }

    fn regions(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.bytes).collect()
    }

    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), VmFault> {
        let region = self
            .regions
            .iter()
            .rev()
            .find(|r| r.first_page <= page)
            .filter(|r| (page - r.first_page) * (PAGE_SIZE as u64) < r.bytes)
            .ok_or(VmSideError::NotInRam(page))?;
        let addr = region.start.0 + (page - region.first_page) * PAGE_SIZE as u64;
        Ok(self.memory.read_slice(buf, GuestAddress(addr)).map_err(|source| VmSideError::ReadPage { page, source })?)
    }

    fn start_dirty_log(&mut self) -> Result<(), VmFault> {
        self.vm.set_dirty_logging(&self.memory, true).map_err(VmSideError::DirtyLog)?;
        // Round 0 sends everything: what the VMM wrote before now does not matter.
        for r in self.memory.iter() {
            let _ = vmm_writes(r).get_and_reset();
        }
        Ok(())
    }

    fn harvest_dirty(&mut self, dirty: &mut DirtySet) -> Result<(), VmFault> {
        for (slot, (region, mem)) in self.regions.iter().zip(self.memory.iter()).enumerate() {
            let pages = region.bytes / PAGE_SIZE as u64;
            let log = self.vm.dirty_log(slot as u32, region.bytes).map_err(VmSideError::DirtyLog)?;
            dirty.or_bitmap(region.first_page, &log, pages);
            // The devices' own writes (virtio rings, disk reads, received frames).
            dirty.or_bitmap(region.first_page, &vmm_writes(mem).get_and_reset(), pages);
        }
        Ok(())
    }

    fn touched_pages(&self) -> Option<DirtySet> {
        if !self.memory_complete {
            return None;
        }
        let total = self.regions.iter().map(|r| r.bytes / PAGE_SIZE as u64).sum();
        let mut touched = DirtySet::new(total);
        for (region, mem) in self.regions.iter().zip(self.memory.iter()) {
            let pages = region.bytes / PAGE_SIZE as u64;
            match crate::vstate::memory::touched_pages(mem) {
                Some(bitmap) => touched.or_bitmap(region.first_page, &bitmap, pages),
                None => (region.first_page..region.first_page + pages).for_each(|p| touched.set(p)),
            }
        }
        Some(touched)
    }

    fn stop_dirty_log(&mut self) {
        if let Err(e) = self.vm.set_dirty_logging(&self.memory, false) {
            tracing::warn!("cannot turn KVM's dirty log off: {}", crate::process::error_chain(&e));
        }
    }

    fn pause_and_save(&mut self) -> Result<Vec<u8>, VmFault> {
        self.ask_and_wait(EngineRequest::PauseAndSave, "pause and save the VM")
    }

    fn resume(&mut self) -> Result<(), VmFault> {
        self.ask_and_wait(EngineRequest::Resume, "resume the VM")
    }

    fn set_throttle(&mut self, percent: u8) {
        self.ask(EngineRequest::Throttle(percent));
    }

    fn release_disks(&mut self) {
        self.disk_locks.release();
    }
}
