//! The receiving end of a migration: takes pages into fresh guest memory, checks every
//! entry of a batch before it writes the page it names, keeps the memory digest as it goes, builds the VM
//! paused from the state, compares digests, and runs the VM only on the source's Commit.
//! Anything else (an Abort, a lost connection, a bad frame, a digest that differs) ends
//! the receive with an error, and nothing of the VM runs here.
//!
//! [`DestinationMachine`] is the protocol, without I/O: it takes events (a frame arrived,
//! the timer fired, a VM step finished, the link was lost) with the time they happened
//! and answers with at most one action (send a frame, prepare, build or start the VM,
//! listen again, fail). It reads no clock and owns no socket; it writes pages into the
//! memory it is handed. [`receive`] drives it over a [`Link`](crate::transport::Link)
//! and a [`DestinationVm`].
//!
//! Post-copy: the source may switch over before its last pages are sent. It names the
//! pages whose content here is out of date (`PostCopyPending`) before the state; on
//! Commit the VM drops them and runs at once (`start_post_copy`: a userfaultfd makes
//! the guest wait on a missing page), and the pages arrive whole, those the guest waits
//! on first, until `PostCopyDone` proves with the memory digest that all of them came.
//! From the start on, the guest lives only here and needs the source: a lost link waits
//! `resume_window` for the source to connect again (`Resume`) and goes on where it
//! stopped; a failure (the source never came back, a bad batch, a digest that differs)
//! loses the guest, and says so (`ReceiveError::PostCopyLost`).

mod driver;
mod writer;

pub use driver::{GATHER_BATCHES, ReceiveOptions, Relisten, receive};
pub use writer::{BaseImage, GuestPages, PageWriter};

use crate::digest::{MemoryDigest, hex};
use crate::dirty::DirtySet;
use crate::page::PAGE_SIZE;
use crate::protocol::{Digests, Hello, Message, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION, PendingPages, Welcome};
use crate::transport::{Link, LinkError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use crate::VmFault;

/// What the engine needs from the VM it receives. The VMM implements it.
pub trait DestinationVm: GuestPages {
    /// Makes guest memory for the machine in `hello` (all zeroes).
    fn prepare(&mut self, hello: &Hello) -> Result<(), VmFault>;
    /// Builds the VM from a state stream, paused. From then on `page` says None.
    fn build(&mut self, state: &[u8]) -> Result<(), VmFault>;
    /// Lets the built VM run.
    fn start(&mut self) -> Result<(), VmFault>;
    /// Whether this side could run the guest before its memory is in (post-copy): makes
    /// what that needs (a userfaultfd) now, so that a refusal comes before pre-copy.
    fn check_post_copy(&mut self) -> Result<(), VmFault> {
        Err("this VMM cannot run a guest before its memory is in".into())
    }
    /// Drops the `pending` pages (their content here is out of date), makes the guest wait
    /// on any page it touches that is missing, and lets the built VM run.
    fn start_post_copy(&mut self, _pending: &DirtySet) -> Result<(), VmFault> {
        Err("this VMM cannot run a guest before its memory is in".into())
    }
    /// During post-copy: puts page `page` in place at once (`content`, or zeroes when
    /// None) and wakes whatever waits on it. The guest runs: the page is never seen half
    /// written.
    fn place(&mut self, _page: u64, _content: Option<&[u8]>) -> Result<(), VmFault> {
        Err("this VMM cannot run a guest before its memory is in".into())
    }
    /// During post-copy, from the start and after each resume: the link on which to ask
    /// the source for the pages the guest waits on (`Link::requester`).
    fn request_pages_over(&mut self, _link: &Link) {}
}

/// How long the source may be silent: it sends Hello at once, and pages or keep-alives
/// after (a dead source is noticed sooner, by the link's idle timeout).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(600);
/// 16 TiB of guest memory, as snapshots allow.
const MAX_PAGES: u64 = 1 << 32;
/// A dry run's link probe is at most this long (it sends a few hundred milliseconds' worth).
pub const MAX_PROBE_BYTES: u64 = 1 << 30;
/// During post-copy, how long a lost link waits for the source to come back.
pub const RESUME_WINDOW: Duration = Duration::from_secs(60);
/// How long a new link during post-copy may take to say `Resume`: a connection the
/// source itself gave up on (it timed out there, and it connects again) must not hold the
/// port for the whole window.
pub const RESUME_HELLO: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Link(LinkError),
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
    #[error("the source sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error(
        "the source speaks protocol version {0}; this VMM speaks versions {OLDEST_PROTOCOL_VERSION} to \
         {PROTOCOL_VERSION}: upgrade the older of the two"
    )]
    Version(u16),
    #[error("the source sent nothing for {after:?} while {waiting} was due")]
    Timeout { waiting: &'static str, after: Duration },
    #[error("bad page batch: {0}")]
    BadBatch(String),
    #[error("memory digest mismatch: received memory hashes to {ours}, the source sent {theirs}")]
    MemoryDigest { ours: String, theirs: String },
    #[error("state digest mismatch: received state hashes to {ours}, the source sent {theirs}")]
    StateDigest { ours: String, theirs: String },
    #[error("RAM regions {0:?} are larger than 16 TiB")]
    Regions(Vec<u64>),
    #[error("cannot make the VM's memory")]
    Prepare(#[source] VmFault),
    #[error("cannot build the VM")]
    Build(#[source] VmFault),
    #[error("cannot start the VM")]
    Start(#[source] VmFault),
    #[error("the base image {path}")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start zstd")]
    Zstd(#[source] std::io::Error),
    #[error("cannot start the threads that apply pages")]
    Workers(#[source] rayon::ThreadPoolBuildError),
    #[error("the source's link probe ran past {MAX_PROBE_BYTES} bytes")]
    ProbeTooLong,
    #[error("cannot run a guest here before its memory is in")]
    PostCopyUnavailable(#[source] VmFault),
    #[error("cannot put a page in place under the running guest")]
    Place(#[source] VmFault),
    #[error("the source did not come back within {window:?} ({link})")]
    SourceLost { window: Duration, link: String },
    #[error(
        "post-copy failed after the guest started here, with {missing} of its pages ({missing_mib} MiB) never \
         received: the guest cannot go on and is stopped; it is lost (the paused copy at the source is out of \
         date): restore it from a backup or snapshot"
    )]
    PostCopyLost {
        missing: u64,
        missing_mib: u64,
        #[source]
        cause: Box<ReceiveError>,
    },
}

impl From<LinkError> for ReceiveError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::PeerAborted(reason) => ReceiveError::SourceAborted(reason),
            other => ReceiveError::Link(other),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    pub pages_received: u64,
    /// Pages that came after the VM started here (post-copy), and how often the link was
    /// lost and resumed meanwhile.
    #[serde(default)]
    pub post_copy_pages: u64,
    #[serde(default)]
    pub resumes: u32,
    /// Frame bytes taken from the source.
    pub bytes_received: u64,
    pub memory_digest: String,
    /// From Hello to Running.
    pub total_ms: u64,
}

/// How a receive ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A VM arrived and runs here.
    Vm(ReceiveReport),
    /// A dry run measured the link with this many frame bytes; no VM came.
    Probe { bytes: u64 },
}

/// What happened, for the machine to handle.
#[derive(Debug)]
pub enum Event {
    /// A message arrived in a frame of `len` bytes.
    Frame {
        message: Message,
        len: u64,
    },
    /// Page batches that arrived one after another, in frames of `len` bytes in all:
    /// applied together (`PageWriter::apply_all`, on the writer's workers).
    Pages {
        batches: Vec<crate::protocol::PageBatch>,
        len: u64,
    },
    /// The deadline (`DestinationMachine::deadline`) may have passed.
    Timer,
    /// The VM steps the machine asked for, done.
    Prepared(Result<(), VmFault>),
    Built(Result<(), VmFault>),
    Started(Result<(), VmFault>),
    PostCopyChecked(Result<(), VmFault>),
    /// The link failed (or the source aborted: `LinkError::PeerAborted`).
    LinkLost(LinkError),
    /// The answer to `Relisten`: a new link, from a source not yet known.
    Relinked,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Frame { message, .. } => message.name(),
            Event::Pages { .. } => "Pages",
            Event::Timer => "nothing",
            Event::Prepared(_) => "the end of prepare",
            Event::Built(_) => "the end of build",
            Event::Started(_) => "the end of start",
            Event::PostCopyChecked(_) => "the end of the post-copy check",
            Event::LinkLost(_) => "a lost link",
            Event::Relinked => "a new link",
        }
    }
}

/// What the driver is to do.
#[derive(Debug)]
pub enum Action {
    Send(Message),
    /// Make the memory for this machine; answer with `Event::Prepared`.
    Prepare(Hello),
    /// Build the VM, paused, from this state stream; answer with `Event::Built`.
    Build(Vec<u8>),
    /// Run the VM; answer with `Event::Started`.
    Start,
    /// Answer with `Event::PostCopyChecked` (`DestinationVm::check_post_copy`).
    CheckPostCopy,
    /// Drop these pages and run the VM (`DestinationVm::start_post_copy`); answer with
    /// `Event::Started`.
    StartPostCopy(DirtySet),
    /// Send these, in order.
    SendAll(Vec<Message>),
    /// The link is gone during post-copy: wait for the source on a new one until
    /// `deadline()`; answer with `Event::Relinked`, or `Event::Timer`.
    Relisten,
    /// The new link is not the source of this migration: end it (with this reason) and
    /// listen again.
    Reject(String),
    /// Give up: tell the source why (an abort), discard everything. After a post-copy
    /// start (`ReceiveError::PostCopyLost`) the guest is lost: stop it.
    Fail(ReceiveError),
}

impl Action {
    /// Does a VM step on `vm` and answers its event; every other action comes back.
    pub fn run_on<V: DestinationVm>(self, vm: &mut V) -> Result<Event, Action> {
        match self {
            Action::Prepare(hello) => Ok(Event::Prepared(vm.prepare(&hello))),
            Action::Build(state) => Ok(Event::Built(vm.build(&state))),
            Action::Start => Ok(Event::Started(vm.start())),
            Action::CheckPostCopy => Ok(Event::PostCopyChecked(vm.check_post_copy())),
            Action::StartPostCopy(pending) => Ok(Event::Started(vm.start_post_copy(&pending))),
            other => Err(other),
        }
    }
}

/// Where the receive is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Hello,
    /// A dry run's link probe: filler in, receipts out.
    Probing,
    /// The probe is over; nothing was built.
    Probed,
    Preparing,
    /// Pages, the state, then Verify.
    Receiving,
    CheckingPostCopy,
    Building,
    /// Built and verified, paused: waiting for the source's Commit.
    Commit,
    Starting,
    /// The guest runs here; its missing pages come.
    PostCopy,
    /// The link was lost during post-copy: waiting for the source on a new one.
    AwaitingResume,
    /// A new link: its first message must be the source's Resume.
    Resuming,
    Done,
    Failed,
}

impl Step {
    fn due(self) -> &'static str {
        match self {
            Step::Hello => "Hello",
            Step::Probing => "Probe or ProbeDone",
            Step::Preparing => "the end of prepare",
            Step::Receiving => "Pages, State or Verify",
            Step::CheckingPostCopy => "the end of the post-copy check",
            Step::Building => "the end of build",
            Step::Commit => "Commit",
            Step::Starting => "the end of start",
            Step::PostCopy => "Pages or PostCopyDone",
            Step::AwaitingResume => "the source's new link",
            Step::Resuming => "Resume",
            Step::Done | Step::Failed | Step::Probed => "nothing",
        }
    }
}

/// The destination's side of the protocol, without I/O.
pub struct DestinationMachine<'b> {
    base: Option<&'b BaseImage>,
    step: Step,
    deadline: Instant,
    /// When Hello arrived.
    started: Option<Instant>,
    finished: Option<Instant>,
    /// Frame bytes handled so far.
    consumed: u64,
    pages: u64,
    writer: Option<PageWriter>,
    state: Option<Vec<u8>>,
    ours: Option<Digests>,
    post_copy: PostCopy,
    resume_window: Duration,
    /// For the page writer (0: one per core).
    workers: usize,
    /// In `Resuming`: when the new link's `Resume` is due.
    resume_due: Option<Instant>,
}

/// What this side knows of a post-copy.
#[derive(Default)]
struct PostCopy {
    /// This side answered PostCopyAsk with yes.
    offered: bool,
    session: Option<u64>,
    /// Pages out of date here, until they arrive (None: no post-copy).
    pending: Option<DirtySet>,
    /// The guest started here before all of its memory was in.
    started: bool,
    pages: u64,
    resumes: u32,
    /// Frame bytes handled on the current link (`Received` counts per link).
    consumed_on_link: u64,
}

impl<'b> DestinationMachine<'b> {
    /// A receive that starts at `now`, offering `base` to the source.
    pub fn new(now: Instant, base: Option<&'b BaseImage>) -> Self {
        DestinationMachine {
            base,
            step: Step::Hello,
            deadline: now + HELLO_TIMEOUT,
            started: None,
            finished: None,
            consumed: 0,
            pages: 0,
            writer: None,
            state: None,
            ours: None,
            post_copy: PostCopy::default(),
            resume_window: RESUME_WINDOW,
            workers: 0,
            resume_due: None,
        }
    }

    /// How long a link lost during post-copy waits for the source (RESUME_WINDOW unless
    /// set).
    /// Threads the page writer decompresses and hashes on (0: one per core).
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers;
    }

    pub fn set_resume_window(&mut self, window: Duration) {
        self.resume_window = window;
    }

    /// Pages still missing during post-copy (0 otherwise).
    pub fn missing_pages(&self) -> u64 {
        self.post_copy.pending.as_ref().map_or(0, DirtySet::count)
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// When the machine wants `Event::Timer` at the latest, unless a frame comes first.
    pub fn deadline(&self) -> Instant {
        match (self.step, self.resume_due) {
            (Step::Resuming, Some(due)) => due.min(self.deadline),
            _ => self.deadline,
        }
    }

    /// The digest of the memory written so far (from the first Pages on).
    pub fn digest(&self) -> Option<MemoryDigest> {
        self.writer.as_ref().map(PageWriter::digest)
    }

    /// How the receive ended, once it has ended well.
    pub fn outcome(&self) -> Option<Received> {
        match self.step {
            Step::Probed => Some(Received::Probe { bytes: self.consumed }),
            _ => self.report().map(Received::Vm),
        }
    }

    /// The figures of a finished receive.
    pub fn report(&self) -> Option<ReceiveReport> {
        let (Some(started), Some(finished), Some(writer)) = (self.started, self.finished, &self.writer) else {
            return None;
        };
        Some(ReceiveReport {
            pages_received: writer.received(),
            post_copy_pages: self.post_copy.pages,
            resumes: self.post_copy.resumes,
            bytes_received: self.consumed,
            memory_digest: hex(&writer.digest().bytes()),
            total_ms: finished.saturating_duration_since(started).as_millis() as u64,
        })
    }

    /// Handles `event`, which happened at `now`; pages go into `memory`.
    pub fn handle<M: DestinationVm>(&mut self, now: Instant, event: Event, memory: &mut M) -> Option<Action> {
        if matches!(self.step, Step::Done | Step::Failed | Step::Probed) {
            return None;
        }
        match self.next(now, event, memory) {
            Ok(action) => action,
            Err(e) => {
                let e = match self.post_copy.started {
                    true => {
                        let missing = self.missing_pages();
                        let missing_mib = (missing * PAGE_SIZE as u64).div_ceil(1 << 20);
                        ReceiveError::PostCopyLost { missing, missing_mib, cause: Box::new(e) }
                    }
                    false => e,
                };
                self.step = Step::Failed;
                self.writer = None;
                self.state = None;
                Some(Action::Fail(e))
            }
        }
    }

    fn next<M: DestinationVm>(
        &mut self,
        now: Instant,
        event: Event,
        memory: &mut M,
    ) -> Result<Option<Action>, ReceiveError> {
        let unexpected =
            |step: Step, event: &Event| ReceiveError::Unexpected { expected: step.due(), got: event.name() };
        if let Event::Timer = event {
            if self.step == Step::Resuming && now < self.deadline && self.resume_due.is_some_and(|due| now >= due) {
                self.step = Step::AwaitingResume;
                return Ok(Some(Action::Reject(format!(
                    "no Resume within {RESUME_HELLO:?} on a new link: listening for the source again"
                ))));
            }
            if now < self.deadline {
                return Ok(None);
            }
            return Err(match self.step {
                Step::AwaitingResume | Step::Resuming => {
                    ReceiveError::SourceLost { window: self.resume_window, link: "no Resume from the source".into() }
                }
                Step::Hello => ReceiveError::Timeout { waiting: self.step.due(), after: HELLO_TIMEOUT },
                _ => ReceiveError::Timeout { waiting: self.step.due(), after: MESSAGE_TIMEOUT },
            });
        }
        if let Event::LinkLost(e) = event {
            return self.link_lost(now, e);
        }
        if matches!(self.step, Step::AwaitingResume | Step::Resuming) {
            return Ok(self.resuming(now, event));
        }
        self.deadline = now + MESSAGE_TIMEOUT;
        if let Event::Frame { len, .. } | Event::Pages { len, .. } = &event {
            self.consumed += len;
            self.post_copy.consumed_on_link += len;
        }
        match (self.step, event) {
            (Step::Hello, Event::Frame { message: Message::Hello(hello), .. }) => {
                if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
                    return Err(ReceiveError::Version(hello.version));
                }
                // Checked here as well as by the VM: the page tables are sized from it.
                self.pages = hello
                    .regions
                    .iter()
                    .try_fold(0u64, |sum, r| sum.checked_add(r / PAGE_SIZE as u64))
                    .filter(|&p| p <= MAX_PAGES)
                    .ok_or_else(|| ReceiveError::Regions(hello.regions.clone()))?;
                self.started = Some(now);
                self.step = Step::Preparing;
                Ok(Some(Action::Prepare(hello)))
            }
            (Step::Hello | Step::Probing, Event::Frame { message: Message::Probe(_), .. }) => {
                if self.consumed > MAX_PROBE_BYTES {
                    return Err(ReceiveError::ProbeTooLong);
                }
                self.step = Step::Probing;
                Ok(Some(Action::Send(Message::Received(self.consumed))))
            }
            (Step::Probing, Event::Frame { message: Message::ProbeDone, .. }) => {
                self.step = Step::Probed;
                Ok(None)
            }
            (Step::Preparing, Event::Prepared(done)) => {
                done.map_err(ReceiveError::Prepare)?;
                self.writer = Some(PageWriter::with_workers(self.pages, self.workers)?);
                self.step = Step::Receiving;
                let base = self.base.map(|b| b.hashes.clone()).unwrap_or_default();
                Ok(Some(Action::Send(Message::Welcome(Welcome { base }))))
            }
            (Step::Receiving, Event::Frame { message: Message::Pages(batch), .. }) => {
                let writer =
                    self.writer.as_mut().ok_or(ReceiveError::Unexpected { expected: "Hello", got: "Pages" })?;
                writer.apply(memory, self.base, &batch)?;
                // What is applied, not what was read: batches queued here are a backlog
                // the switchover would wait for.
                Ok(Some(Action::Send(Message::Received(self.consumed))))
            }
            (Step::Receiving, Event::Pages { batches, .. }) => {
                let writer =
                    self.writer.as_mut().ok_or(ReceiveError::Unexpected { expected: "Hello", got: "Pages" })?;
                writer.apply_all(memory, self.base, &batches)?;
                Ok(Some(Action::Send(Message::Received(self.consumed))))
            }
            (Step::Receiving, Event::Frame { message: Message::PostCopyAsk, .. }) => {
                self.step = Step::CheckingPostCopy;
                Ok(Some(Action::CheckPostCopy))
            }
            (Step::CheckingPostCopy, Event::PostCopyChecked(checked)) => {
                self.step = Step::Receiving;
                self.post_copy.offered = checked.is_ok();
                let refusal = checked.err().map(|e| crate::error_chain(&ReceiveError::PostCopyUnavailable(e)));
                Ok(Some(Action::Send(Message::PostCopyAnswer(refusal))))
            }
            (Step::Receiving, Event::Frame { message: Message::PostCopyPending(p), .. }) if self.post_copy.offered => {
                if self.post_copy.session.is_some_and(|s| s != p.session) {
                    return Err(ReceiveError::BadBatch("pending pages of two post-copy sessions".into()));
                }
                self.post_copy.session = Some(p.session);
                let pending = self.post_copy.pending.get_or_insert_with(|| DirtySet::new(self.pages));
                pending.add_runs(&p.runs).ok_or_else(|| {
                    ReceiveError::BadBatch(format!("pending pages past the VM's {} pages", self.pages))
                })?;
                Ok(None)
            }
            (Step::Receiving, Event::Frame { message: Message::State(state), .. }) => {
                self.state = Some(state);
                Ok(None)
            }
            (Step::Receiving, Event::Frame { message: Message::Verify(theirs), .. }) => {
                let (Some(state), Some(writer)) = (self.state.take(), &self.writer) else {
                    return Err(ReceiveError::Unexpected { expected: "State", got: "Verify" });
                };
                let ours = Digests { memory: writer.digest().bytes(), state: *blake3::hash(&state).as_bytes() };
                if ours.memory != theirs.memory {
                    return Err(ReceiveError::MemoryDigest { ours: hex(&ours.memory), theirs: hex(&theirs.memory) });
                }
                if ours.state != theirs.state {
                    return Err(ReceiveError::StateDigest { ours: hex(&ours.state), theirs: hex(&theirs.state) });
                }
                self.ours = Some(ours);
                self.step = Step::Building;
                Ok(Some(Action::Build(state)))
            }
            (Step::Building, Event::Built(done)) => {
                done.map_err(ReceiveError::Build)?;
                self.step = Step::Commit;
                let ours = self.ours.ok_or(ReceiveError::Unexpected { expected: "Verify", got: "Ready" })?;
                Ok(Some(Action::Send(Message::Ready(ours))))
            }
            (Step::Commit, Event::Frame { message: Message::Commit, .. }) => {
                self.step = Step::Starting;
                match &self.post_copy.pending {
                    Some(pending) => Ok(Some(Action::StartPostCopy(pending.clone()))),
                    None => Ok(Some(Action::Start)),
                }
            }
            (Step::Starting, Event::Started(done)) => {
                done.map_err(ReceiveError::Start)?;
                if self.post_copy.pending.is_some() {
                    self.post_copy.started = true;
                    self.step = Step::PostCopy;
                } else {
                    self.step = Step::Done;
                    self.finished = Some(now);
                }
                Ok(Some(Action::Send(Message::Running)))
            }
            (Step::PostCopy, Event::Frame { message: Message::Pages(batch), .. }) => {
                let (Some(writer), Some(pending)) = (self.writer.as_mut(), self.post_copy.pending.as_mut()) else {
                    return Err(ReceiveError::Unexpected { expected: "Hello", got: "Pages" });
                };
                let placed = writer.apply_whole(&batch, pending, |page, content| {
                    memory.place(page, content).map_err(ReceiveError::Place)
                })?;
                self.post_copy.pages += placed;
                Ok(Some(Action::Send(Message::Received(self.post_copy.consumed_on_link))))
            }
            (Step::PostCopy, Event::Frame { message: Message::PostCopyDone(theirs), .. }) => {
                let missing = self.missing_pages();
                if missing > 0 {
                    return Err(ReceiveError::BadBatch(format!("the source is done with {missing} pages missing")));
                }
                let ours = self.writer.as_ref().map(|w| w.digest().bytes()).unwrap_or_default();
                if ours != theirs {
                    return Err(ReceiveError::MemoryDigest { ours: hex(&ours), theirs: hex(&theirs) });
                }
                self.step = Step::Done;
                self.finished = Some(now);
                Ok(Some(Action::Send(Message::PostCopyComplete)))
            }
            (step, event) => Err(unexpected(step, &event)),
        }
    }

    /// The link is gone: the end of the receive, unless the guest already runs here.
    fn link_lost(&mut self, now: Instant, e: LinkError) -> Result<Option<Action>, ReceiveError> {
        match self.step {
            Step::PostCopy | Step::Resuming => {
                tracing::warn!(
                    missing = self.missing_pages(),
                    "post-copy: the link is lost ({e}); waiting for the source"
                );
                if self.step == Step::PostCopy {
                    self.deadline = now + self.resume_window;
                }
                self.step = Step::AwaitingResume;
                Ok(Some(Action::Relisten))
            }
            Step::AwaitingResume => Ok(Some(Action::Relisten)),
            _ => Err(e.into()),
        }
    }

    /// During a resume: only the source's Resume, with this migration's session, is taken.
    fn resuming(&mut self, now: Instant, event: Event) -> Option<Action> {
        match (self.step, event) {
            (Step::AwaitingResume, Event::Relinked) => {
                self.step = Step::Resuming;
                self.resume_due = Some(now + RESUME_HELLO);
                None
            }
            (Step::Resuming, Event::Frame { message: Message::Resume(session), len })
                if Some(session) == self.post_copy.session =>
            {
                self.consumed += len;
                self.post_copy.consumed_on_link = len;
                self.post_copy.resumes += 1;
                self.step = Step::PostCopy;
                let runs = self.post_copy.pending.as_ref().map(DirtySet::runs).unwrap_or_default();
                tracing::info!(missing = self.missing_pages(), "post-copy: the source is back; resuming");
                Some(Action::SendAll(PendingPages::frames(session, &runs)))
            }
            (Step::Resuming, event) => {
                self.step = Step::AwaitingResume;
                Some(Action::Reject(format!(
                    "this VMM runs a guest in post-copy and waits for its source's Resume, not {}",
                    event.name()
                )))
            }
            (_, _) => None,
        }
    }
}

#[cfg(test)]
mod tests;
