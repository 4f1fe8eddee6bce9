//! The receiving end of a migration: takes pages into fresh guest memory, checks every
//! entry of a batch before it writes the page it names, keeps the memory digest as it goes, builds the VM
//! paused from the state, compares digests, and runs the VM only on the source's Commit.
//! Anything else (an Abort, a lost connection, a bad frame, a digest that differs) ends
//! the receive with an error, and nothing of the VM runs here.
//!
//! [`DestinationMachine`] is the protocol, without I/O: it takes events (a frame arrived,
//! the timer fired, a VM step finished) with the time they happened and answers with at
//! most one action (send a frame, prepare, build or start the VM, fail). It reads no
//! clock and owns no socket; it writes pages into the memory it is handed. [`receive`]
//! drives it over a QUIC [`Link`](crate::transport::Link) and a [`DestinationVm`].

mod driver;
mod writer;

pub use driver::receive;
pub use writer::{BaseImage, GuestPages, PageWriter};

use crate::digest::{MemoryDigest, hex};
use crate::page::PAGE_SIZE;
use crate::protocol::{Digests, Hello, Message, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION, Welcome};
use crate::transport::LinkError;
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
}

/// How long the source may be silent: it sends Hello at once, and pages or keep-alives
/// after (a dead source is noticed sooner, by the link's idle timeout).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(600);
/// 16 TiB of guest memory, as snapshots allow.
const MAX_PAGES: u64 = 1 << 32;
/// A dry run's link probe is at most this long (it sends a few hundred milliseconds' worth).
pub const MAX_PROBE_BYTES: u64 = 1 << 30;

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
    #[error("the source's link probe ran past {MAX_PROBE_BYTES} bytes")]
    ProbeTooLong,
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
    /// The deadline (`DestinationMachine::deadline`) may have passed.
    Timer,
    /// The VM steps the machine asked for, done.
    Prepared(Result<(), VmFault>),
    Built(Result<(), VmFault>),
    Started(Result<(), VmFault>),
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Frame { message, .. } => message.name(),
            Event::Timer => "nothing",
            Event::Prepared(_) => "the end of prepare",
            Event::Built(_) => "the end of build",
            Event::Started(_) => "the end of start",
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
    /// Give up: tell the source why (an abort), discard everything.
    Fail(ReceiveError),
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
    Building,
    /// Built and verified, paused: waiting for the source's Commit.
    Commit,
    Starting,
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
            Step::Building => "the end of build",
            Step::Commit => "Commit",
            Step::Starting => "the end of start",
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
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// When the machine wants `Event::Timer` at the latest, unless a frame comes first.
    pub fn deadline(&self) -> Instant {
        self.deadline
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
            bytes_received: self.consumed,
            memory_digest: hex(&writer.digest().bytes()),
            total_ms: finished.saturating_duration_since(started).as_millis() as u64,
        })
    }

    /// Handles `event`, which happened at `now`; pages go into `memory`.
    pub fn handle<M: GuestPages>(&mut self, now: Instant, event: Event, memory: &mut M) -> Option<Action> {
        if matches!(self.step, Step::Done | Step::Failed | Step::Probed) {
            return None;
        }
        match self.next(now, event, memory) {
            Ok(action) => action,
            Err(e) => {
                self.step = Step::Failed;
                self.writer = None;
                self.state = None;
                Some(Action::Fail(e))
            }
        }
    }

    fn next<M: GuestPages>(
        &mut self,
        now: Instant,
        event: Event,
        memory: &mut M,
    ) -> Result<Option<Action>, ReceiveError> {
        let unexpected =
            |step: Step, event: &Event| ReceiveError::Unexpected { expected: step.due(), got: event.name() };
        if let Event::Timer = event {
            if now < self.deadline {
                return Ok(None);
            }
            let after = if self.step == Step::Hello { HELLO_TIMEOUT } else { MESSAGE_TIMEOUT };
            return Err(ReceiveError::Timeout { waiting: self.step.due(), after });
        }
        self.deadline = now + MESSAGE_TIMEOUT;
        if let Event::Frame { len, .. } = &event {
            self.consumed += len;
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
                self.writer = Some(PageWriter::new(self.pages)?);
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
                Ok(Some(Action::Start))
            }
            (Step::Starting, Event::Started(done)) => {
                done.map_err(ReceiveError::Start)?;
                self.step = Step::Done;
                self.finished = Some(now);
                Ok(Some(Action::Send(Message::Running)))
            }
            (step, event) => Err(unexpected(step, &event)),
        }
    }
}

#[cfg(test)]
mod tests;
