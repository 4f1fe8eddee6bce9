//! The source's side of the protocol, without I/O: it takes events (a frame arrived, the
//! timer fired, pages were read, the VM paused and saved, a harvest of the dirty logs, a
//! cancel) with the time they happened, and queues actions (send this frame, read these
//! pages, harvest, pause and save, throttle, release the disks, resume, finish). It reads
//! no clock and owns no socket; the driver (`super::migrate`) does both.

use super::{
    Convergence, DRAIN_ALLOWANCE, DRAIN_STEP, DeliveryRate, Fault, MigrateError, Next, PageCost, PageCounts, Phase,
    PostCopy, PostCopyReport, Progress, READY_TIMEOUT, RUNNING_TIMEOUT, Report, RoundFigures, SWITCHOVER_OVERHEAD,
    SourceOptions, SwitchoverTimes, WELCOME_TIMEOUT,
};
use crate::VmFault;
use crate::digest::hex;
use crate::dirty::DirtySet;
use crate::encoder::PageEncoder;
use crate::page::PAGE_SIZE;
use crate::protocol::{self, BATCH_PAGES, Digests, Hello, Message, PROTOCOL_VERSION, PendingPages};
use crate::transport::LinkError;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A round sends at most this far ahead of the receipts (`SourceMachine::in_flight_cap`).
const IN_FLIGHT_MIN: u64 = 8 << 20;
const IN_FLIGHT_TIME: Duration = Duration::from_millis(100);
/// During post-copy the guest waits on the pages it asks for, behind what is in flight:
/// a shorter queue (10 ms and two round trips), in smaller batches (what 10 ms carries,
/// at least `POST_COPY_BATCH_MIN` pages), so that a slow link does not hold a fault behind
/// a whole batch. Until the link's rate is known the queue is at least 1 MiB.
const POST_COPY_IN_FLIGHT_MIN: u64 = 1 << 20;
const POST_COPY_IN_FLIGHT_TIME: Duration = Duration::from_millis(10);
const POST_COPY_BATCH_MIN: usize = 16;

/// What happened, for the machine to handle.
#[derive(Debug)]
pub enum SourceEvent<'a> {
    Frame(Message),
    /// The link failed (or the destination aborted: `LinkError::PeerAborted`).
    LinkFailed(LinkError),
    /// The deadline (`SourceMachine::deadline`) may have passed.
    Timer,
    Cancel,
    /// The answer to `StartDirtyLog`, with the pages the VM may have touched if it knows.
    DirtyLogStarted(Result<Option<DirtySet>, VmFault>),
    /// The answer to `ReadPages`: PAGE_SIZE bytes per page, in the order asked.
    PagesRead(Result<&'a [u8], VmFault>),
    /// The answer to `Harvest`: the pages written since the harvest before.
    Harvested(Result<DirtySet, VmFault>),
    /// The answer to `PauseAndSave`: the state stream of the paused VM.
    Saved(Result<Vec<u8>, VmFault>),
    /// The answer to `Reconnect`: a new link to the destination is up.
    Reconnected,
}

/// What the driver is to do.
#[derive(Debug)]
pub enum SourceAction {
    /// Put this frame on the link.
    Send(Vec<u8>),
    /// Put this frame of page batches on the link, on the lane of its shard (the
    /// encoder's): batches of one shard keep their order, those of different shards
    /// commute.
    SendPages {
        frame: Vec<u8>,
        shard: usize,
    },
    /// Turn the VM's dirty logging on; answer `DirtyLogStarted`.
    StartDirtyLog,
    /// Read these pages; answer `PagesRead`.
    ReadPages(Vec<u64>),
    /// Answer `Harvested`.
    Harvest,
    /// Answer `Saved`.
    PauseAndSave,
    Throttle(u8),
    /// Just before Commit: let go of the disk images' locks.
    ReleaseDisks,
    /// After a failure before Commit: end the link with this reason, the dirty log off,
    /// the VM running again if it was paused (`resume`).
    Abort {
        reason: String,
        dirty_log: bool,
        resume: bool,
    },
    /// During post-copy: the link is lost; connect to the destination again, trying until
    /// `deadline()`; answer `Reconnected` (or `Timer`, once the deadline has passed).
    Reconnect,
    /// The end; nothing follows.
    /// (Boxed: a report is large, and actions are many.)
    Finish(Box<Result<Report, MigrateError>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStep {
    Welcome,
    /// Waiting for the destination's PostCopyAnswer.
    AskingPostCopy,
    StartingLog,
    /// Reading and sending a round's pages.
    Sending,
    /// Waiting until what was sent has arrived (all but the allowance).
    Draining,
    Harvesting,
    /// Nothing of the rounds may still wait at the destination before the pause.
    FinalDrain,
    Saving,
    LastHarvest,
    SendingLast,
    Ready,
    Running,
    /// The guest runs at the destination: its pending pages go, asked-for ones first.
    PostCopy,
    /// All sent: waiting for the destination's PostCopyComplete.
    PostCopyFinishing,
    /// The link was lost during post-copy: connecting again.
    Reconnecting,
    /// Reconnected: waiting for the destination's list of the pages it still misses.
    Resuming,
    Done,
    Failed,
}

/// When the switchover's steps happened.
#[derive(Debug, Default, Clone, Copy)]
struct Switchover {
    paused: Option<Instant>,
    saved: Option<Instant>,
    sent: Option<Instant>,
    ready: Option<Instant>,
    commit: Option<Instant>,
    running: Option<Instant>,
    last_pages: u64,
}

/// A post-copy under way.
struct PostCopyRun {
    session: u64,
    /// Pages the destination misses that have not been read since the last (re)start.
    pending: DirtySet,
    /// Pages the guest waits on, oldest first (some may since have gone).
    requested: VecDeque<u64>,
    /// Where the push scans `pending`.
    scan: usize,
    report: PostCopyReport,
    /// Pages the destination missed when it last said (or at the start).
    missing_known: u64,
    /// PostCopyDone went on the current link.
    all_sent: bool,
}

pub struct SourceMachine {
    options: SourceOptions,
    step: SourceStep,
    started: Instant,
    deadline: Option<Instant>,
    actions: VecDeque<SourceAction>,
    encoder: PageEncoder,
    pages: u64,
    /// What the round (or the switchover) still has to read.
    dirty: DirtySet,
    /// Where in `dirty` reading goes on (`DirtySet::take_first`).
    scan: usize,
    reading: Vec<u64>,
    round: u32,
    round_start: Instant,
    round_queued: u64,
    round_entries: u64,
    round_pages: u64,
    cost: PageCost,
    convergence: Convergence,
    /// Frame bytes handed to the driver, and those the destination said it applied.
    queued: u64,
    acked: u64,
    delivery: DeliveryRate,
    /// The last delivery-rate sample, bytes/s.
    link_rate: Option<f64>,
    /// Reading waits until the backlog is under `in_flight_cap` again.
    link_wait: bool,
    pages_sent: u64,
    rtt: Duration,
    bandwidth_limit: u64,
    dirty_log: bool,
    paused: bool,
    committed: bool,
    state: Option<Vec<u8>>,
    ours: Option<Digests>,
    switchover: Switchover,
    progress: Progress,
    /// The rounds are over: the switchover is a post-copy one.
    post_copy_switch: bool,
    post_copy: Option<PostCopyRun>,
    /// `queued` when the current link began: the destination counts `Received` per link.
    link_base: u64,
}

impl SourceMachine {
    /// A migration of a VM of `machine` and `regions` that starts at `now` by sending Hello.
    pub fn new(
        now: Instant,
        machine: Vec<u8>,
        regions: Vec<u64>,
        options: SourceOptions,
    ) -> Result<Self, MigrateError> {
        let pages = regions.iter().map(|r| r / PAGE_SIZE as u64).sum();
        let mut encoder = PageEncoder::new(pages, options.delta_cache, options.compress, options.workers)
            .map_err(MigrateError::Compressor)?;
        if options.fault == Some(Fault::FlipPageByte) {
            encoder.flip_next_full_page();
        }
        let mut m = SourceMachine {
            convergence: Convergence::new(&options),
            options,
            step: SourceStep::Welcome,
            started: now,
            deadline: Some(now + WELCOME_TIMEOUT),
            actions: VecDeque::new(),
            encoder,
            pages,
            dirty: DirtySet::new(pages),
            scan: 0,
            reading: Vec::new(),
            round: 0,
            round_start: now,
            round_queued: 0,
            round_entries: 0,
            round_pages: 0,
            cost: PageCost::default(),
            queued: 0,
            acked: 0,
            delivery: DeliveryRate::default(),
            link_rate: None,
            link_wait: false,
            pages_sent: 0,
            rtt: Duration::ZERO,
            bandwidth_limit: 0,
            dirty_log: false,
            paused: false,
            committed: false,
            state: None,
            ours: None,
            switchover: Switchover::default(),
            progress: Progress { total_pages: pages, phase: Phase::Connecting, ..Progress::default() },
            post_copy_switch: false,
            post_copy: None,
            link_base: 0,
        };
        m.send(&Message::Hello(Hello { version: PROTOCOL_VERSION, machine, regions }))?;
        Ok(m)
    }

    pub fn step(&self) -> SourceStep {
        self.step
    }

    /// Pages of guest memory.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// When the machine wants `SourceEvent::Timer` at the latest (None: it waits for its
    /// own actions' answers, not for the destination).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The figures to show.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The link's round trip and bandwidth limit (bytes/s, 0: none) as the driver sees them.
    pub fn set_link(&mut self, rtt: Duration, bandwidth_limit: u64) {
        self.rtt = rtt;
        self.bandwidth_limit = bandwidth_limit;
        self.encoder.set_link(bandwidth_limit, rtt);
    }

    /// The next action, if any.
    pub fn poll(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// Handles `event`, which happened at `now`.
    pub fn handle(&mut self, now: Instant, event: SourceEvent<'_>) {
        if matches!(self.step, SourceStep::Done | SourceStep::Failed) {
            return;
        }
        self.progress.elapsed_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        if let Err(e) = self.next(now, event) {
            self.fail(e);
        }
    }

    fn next(&mut self, now: Instant, event: SourceEvent<'_>) -> Result<(), MigrateError> {
        use SourceEvent as E;
        use SourceStep as S;
        match (self.step, event) {
            (_, E::Timer) => match self.deadline {
                Some(deadline) if now >= deadline => Err(self.timed_out()),
                _ => Ok(()),
            },
            (_, E::Cancel) => Err(MigrateError::Cancelled),
            (S::Running | S::PostCopy | S::PostCopyFinishing | S::Reconnecting | S::Resuming, E::LinkFailed(e))
                if self.post_copy.is_some() =>
            {
                self.post_copy_link_lost(now, e)
            }
            (_, E::LinkFailed(e)) => Err(e.into()),
            (S::Reconnecting, E::Reconnected) => {
                let session = self.post_copy.as_ref().map_or(0, |p| p.session);
                self.link_base = self.queued;
                self.acked = self.queued;
                self.link_wait = false;
                self.step = S::Resuming;
                self.send(&Message::Resume(session))
            }
            (S::Resuming | S::PostCopy, E::Frame(Message::PostCopyPending(p))) => self.resumed(now, p),
            (S::Reconnecting | S::Resuming, E::Frame(_) | E::PagesRead(_)) => {
                // From the link that was lost, or pages read for it: what was read is sent
                // again if the destination still misses it.
                self.reading.clear();
                Ok(())
            }
            (_, E::Frame(Message::Received(bytes))) => {
                self.acked = self.acked.max(self.link_base + bytes);
                if let Some(rate) = self.delivery.receipt(now, self.acked, self.queued) {
                    self.encoder.link_sample(rate);
                    self.link_rate = Some(rate);
                }
                if self.link_wait && self.queued.saturating_sub(self.acked) <= self.in_flight_cap() {
                    self.link_wait = false;
                    self.deadline = None;
                    match self.step {
                        S::PostCopy => self.push(now)?,
                        _ => self.read_more(now)?,
                    }
                }
                if matches!(self.step, S::Draining | S::FinalDrain) {
                    self.deadline = Some(now + DRAIN_STEP);
                    self.check_drained(now)?;
                }
                Ok(())
            }
            (S::Welcome, E::Frame(Message::Welcome(w))) => {
                self.encoder.set_base(&w.base);
                if !w.base.is_empty() {
                    tracing::info!(pages = w.base.len(), "the destination holds a base image");
                }
                if self.options.post_copy.is_some() {
                    self.step = S::AskingPostCopy;
                    self.deadline = Some(now + WELCOME_TIMEOUT);
                    return self.send(&Message::PostCopyAsk);
                }
                self.start_dirty_log()
            }
            (S::AskingPostCopy, E::Frame(Message::PostCopyAnswer(answer))) => match answer {
                None => self.start_dirty_log(),
                Some(refusal) => Err(MigrateError::PostCopyRefused(refusal)),
            },
            (S::StartingLog, E::DirtyLogStarted(started)) => {
                let touched = started.map_err(MigrateError::StartDirtyLog)?;
                self.dirty_log = true;
                self.progress.phase = Phase::Precopy;
                self.dirty = match touched {
                    Some(touched) => {
                        self.encoder.skip_untouched(self.pages.saturating_sub(touched.count()));
                        touched
                    }
                    None => DirtySet::all(self.pages),
                };
                self.begin_round(now)
            }
            (S::PostCopy, E::PagesRead(read)) => {
                let data = read.map_err(MigrateError::ReadPages)?;
                self.post_copy_pages_read(data)?;
                self.push(now)
            }
            (S::PostCopy, E::Frame(Message::PageRequest(pages))) => {
                if let Some(run) = self.post_copy.as_mut() {
                    run.requested.extend(pages.into_iter().filter(|&p| run.pending.contains(p)));
                }
                self.push(now)
            }
            (S::PostCopyFinishing, E::Frame(Message::PageRequest(_))) => Ok(()),
            (S::PostCopyFinishing, E::Frame(Message::PostCopyComplete)) => {
                // The digests agree on all of memory now, not only on what preceded the pause.
                if let Some(ours) = self.ours.as_mut() {
                    ours.memory = self.encoder.digest();
                }
                let mut report = self.report(now);
                if let Some(run) = &self.post_copy {
                    let since = self.switchover.running.map_or(0, |r| now.saturating_duration_since(r).as_millis());
                    report.post_copy = Some(PostCopyReport { post_copy_ms: since as u64, ..run.report });
                }
                self.finish(report);
                Ok(())
            }
            (S::Sending | S::SendingLast, E::PagesRead(read)) => {
                let data = read.map_err(MigrateError::ReadPages)?;
                let pages = self.take_read(data)?;
                self.encoder.add_pages(&pages, data);
                self.progress.remaining_pages = self.progress.remaining_pages.saturating_sub(pages.len() as u64);
                self.send_ready()?;
                self.read_more(now)
            }
            (S::Harvesting, E::Harvested(harvest)) => {
                self.dirty = harvest.map_err(MigrateError::Harvest)?;
                self.after_round(now)
            }
            (S::Saving, E::Saved(saved)) => {
                let state = saved.map_err(MigrateError::PauseAndSave)?;
                self.paused = true;
                self.switchover.saved = Some(now);
                self.state = Some(state);
                self.step = S::LastHarvest;
                self.actions.push_back(SourceAction::Harvest);
                Ok(())
            }
            (S::LastHarvest, E::Harvested(harvest)) => {
                // Pages written since the last harvest, up to the pause (saving the vCPUs may
                // have completed an I/O that wrote memory, so this is after it).
                self.dirty.add_all(&harvest.map_err(MigrateError::Harvest)?);
                if self.post_copy_switch {
                    return self.switch_to_post_copy(now);
                }
                self.switchover.last_pages = self.dirty.count();
                self.step = S::SendingLast;
                self.scan = 0;
                self.read_more(now)
            }
            (S::Ready, E::Frame(Message::Ready(theirs))) => {
                self.switchover.ready = Some(now);
                let ours = self.ours.ok_or(MigrateError::Unexpected { expected: "State", got: "Ready" })?;
                if theirs.memory != ours.memory {
                    return Err(MigrateError::MemoryDigest { ours: hex(&ours.memory), theirs: hex(&theirs.memory) });
                }
                if theirs.state != ours.state {
                    return Err(MigrateError::StateDigest { ours: hex(&ours.state), theirs: hex(&theirs.state) });
                }
                // From here on the VM may run there: no cancel, no resume here.
                self.committed = true;
                self.switchover.commit = Some(now);
                self.actions.push_back(SourceAction::ReleaseDisks);
                self.send(&Message::Commit)?;
                self.step = S::Running;
                self.deadline = Some(now + RUNNING_TIMEOUT);
                Ok(())
            }
            (S::Running, E::Frame(Message::Running)) => {
                self.switchover.running = Some(now);
                if self.post_copy.is_some() {
                    tracing::info!(pages = self.dirty.count(), "post-copy: the guest runs at the destination");
                    self.step = S::PostCopy;
                    self.deadline = None;
                    self.progress.phase = Phase::Postcopy;
                    self.actions.push_back(SourceAction::Throttle(0));
                    return self.push(now);
                }
                let report = self.report(now);
                self.finish(report);
                Ok(())
            }
            (S::Running, E::Frame(other)) => {
                Err(MigrateError::CommitUnconfirmed(LinkError::Lost(format!("it answered {} to Commit", other.name()))))
            }
            (step, E::Frame(other)) => {
                let expected = match step {
                    S::Welcome => "Welcome",
                    S::AskingPostCopy => "PostCopyAnswer",
                    S::Ready => "Ready",
                    S::PostCopy => "PageRequest",
                    S::PostCopyFinishing => "PostCopyComplete",
                    _ => "Received",
                };
                Err(MigrateError::Unexpected { expected, got: other.name() })
            }
            (step, event) => Err(MigrateError::OutOfTurn { step, event: event_name(&event) }),
        }
    }

    fn timed_out(&self) -> MigrateError {
        if let (SourceStep::Reconnecting | SourceStep::Resuming, Some(run)) = (self.step, &self.post_copy) {
            if run.all_sent {
                return MigrateError::PostCopyUnconfirmed(LinkError::Timeout(self.options.resume_window));
            }
            return MigrateError::PostCopyDestinationLost {
                window: self.options.resume_window,
                missing: run.missing_known,
                cause: LinkError::Timeout(self.options.resume_window),
            };
        }
        let after = match self.step {
            SourceStep::Welcome | SourceStep::AskingPostCopy => WELCOME_TIMEOUT,
            SourceStep::Ready => READY_TIMEOUT,
            SourceStep::Running => RUNNING_TIMEOUT,
            _ => DRAIN_STEP,
        };
        MigrateError::Link(LinkError::Timeout(after))
    }

    /// Ends the migration with `e`: before the commit the VM goes on here as before.
    fn fail(&mut self, e: MigrateError) {
        let post_copy_ran = self.post_copy.is_some() && self.switchover.running.is_some();
        let e = match e {
            // The destination ran the guest and gave up on it.
            MigrateError::DestinationAborted(r) if post_copy_ran => MigrateError::PostCopyFailedThere(r),
            // After Commit, any failure leaves the end unknown.
            MigrateError::Link(l) if self.committed => MigrateError::CommitUnconfirmed(l),
            MigrateError::DestinationAborted(r) if self.committed => {
                MigrateError::CommitUnconfirmed(LinkError::PeerAborted(r))
            }
            MigrateError::Cancelled if self.committed => return,
            other => other,
        };
        self.step = SourceStep::Failed;
        self.deadline = None;
        self.progress.phase = Phase::Failed;
        self.actions.clear();
        self.actions.push_back(SourceAction::Throttle(0));
        if !e.committed() {
            self.actions.push_back(SourceAction::Abort {
                reason: e.to_string(),
                dirty_log: self.dirty_log,
                resume: self.paused,
            });
        }
        self.actions.push_back(SourceAction::Finish(Box::new(Err(e))));
    }

    fn send(&mut self, message: &Message) -> Result<(), MigrateError> {
        let frame = self.encode(message)?;
        self.actions.push_back(SourceAction::Send(frame));
        Ok(())
    }

    fn encode(&mut self, message: &Message) -> Result<Vec<u8>, MigrateError> {
        let frame = protocol::encode_frame(message).map_err(|e| MigrateError::Link(LinkError::from(e)))?;
        self.queued += frame.len() as u64;
        self.progress.bytes_sent = self.queued;
        Ok(frame)
    }

    /// Sends the batches the encoder has finished.
    fn send_ready(&mut self) -> Result<(), MigrateError> {
        while let Some((batch, count)) = self.encoder.take_batch() {
            let shard = batch.entries.first().map_or(0, |e| self.encoder.shard_of(e.page()));
            let frame = self.encode(&Message::Pages(batch))?;
            // A post-copy's pages go on the control stream: a page the guest waits on
            // then queues behind one stream's frames, not behind every lane's (its fault
            // waited twice as long at p99 on lanes, 134 against 68 ms at 2 MB/s).
            self.actions.push_back(match self.post_copy {
                Some(_) => SourceAction::Send(frame),
                None => SourceAction::SendPages { frame, shard },
            });
            self.pages_sent += count;
            self.progress.pages_sent = self.pages_sent;
        }
        Ok(())
    }

    /// Sends everything added to the encoder, batches in progress too.
    fn flush(&mut self) -> Result<(), MigrateError> {
        self.encoder.finish();
        self.send_ready()
    }

    fn begin_round(&mut self, now: Instant) -> Result<(), MigrateError> {
        self.step = SourceStep::Sending;
        self.scan = 0;
        self.round_start = now;
        self.round_queued = self.queued;
        self.round_entries = self.pages_sent;
        self.round_pages = self.dirty.count();
        self.progress.round = self.round;
        self.progress.remaining_pages = self.round_pages;
        // Reading is the driver's work: no deadline until it is done.
        self.deadline = None;
        self.read_more(now)
    }

    /// How far ahead of the receipts a round may send: 100 ms and two round trips of the
    /// link, at least IN_FLIGHT_MIN. Beyond it pages wait in guest memory, not in queues:
    /// read later they are fresher (a page written meanwhile goes once, not twice), and
    /// the compression choice follows the link sooner.
    /// During post-copy: 10 ms and two round trips, at least two push batches once the
    /// link's rate is known (else POST_COPY_IN_FLIGHT_MIN).
    fn in_flight_cap(&self) -> u64 {
        let rate = self.rate();
        match self.post_copy {
            Some(_) => {
                let min = match rate {
                    Some(_) => 2 * (self.push_batch() * PAGE_SIZE) as u64,
                    None => POST_COPY_IN_FLIGHT_MIN,
                };
                ((rate.unwrap_or(0.0) * (POST_COPY_IN_FLIGHT_TIME + self.rtt * 2).as_secs_f64()) as u64).max(min)
            }
            None => ((rate.unwrap_or(0.0) * (IN_FLIGHT_TIME + self.rtt * 2).as_secs_f64()) as u64).max(IN_FLIGHT_MIN),
        }
    }

    /// What the link carries in bytes per second: the measured rate, under the limit.
    fn rate(&self) -> Option<f64> {
        let limit = (self.bandwidth_limit > 0).then_some(self.bandwidth_limit as f64);
        match (self.link_rate, limit) {
            (Some(r), Some(l)) => Some(r.min(l)),
            (r, l) => r.or(l),
        }
    }

    /// Pages in one batch of the post-copy's push: what the link carries in 10 ms.
    fn push_batch(&self) -> usize {
        let pages =
            self.rate().map_or(BATCH_PAGES as f64, |r| r * POST_COPY_IN_FLIGHT_TIME.as_secs_f64() / PAGE_SIZE as f64);
        (pages as usize).clamp(POST_COPY_BATCH_MIN, BATCH_PAGES)
    }

    /// Asks for the next pages of the set, or goes on once it is sent.
    fn read_more(&mut self, now: Instant) -> Result<(), MigrateError> {
        if self.step == SourceStep::Sending && self.queued.saturating_sub(self.acked) > self.in_flight_cap() {
            self.link_wait = true;
            self.deadline = Some(now + DRAIN_STEP);
            return Ok(());
        }
        self.dirty.take_first(self.encoder.read_pages(), &mut self.scan, &mut self.reading);
        if !self.reading.is_empty() {
            self.actions.push_back(SourceAction::ReadPages(self.reading.clone()));
            return Ok(());
        }
        self.flush()?;
        if self.step == SourceStep::SendingLast {
            return self.send_state(now);
        }
        self.drain(now, SourceStep::Draining)
    }

    fn drain(&mut self, now: Instant, step: SourceStep) -> Result<(), MigrateError> {
        self.step = step;
        self.deadline = Some(now + DRAIN_STEP);
        self.check_drained(now)
    }

    fn check_drained(&mut self, now: Instant) -> Result<(), MigrateError> {
        let allowance = if self.step == SourceStep::FinalDrain { 0 } else { DRAIN_ALLOWANCE };
        if self.queued > self.acked + allowance {
            return Ok(());
        }
        self.deadline = None;
        match self.step {
            SourceStep::Draining => {
                let round_time = now.saturating_duration_since(self.round_start);
                self.cost.learn(round_time, self.pages_sent - self.round_entries, self.queued - self.round_queued);
                self.step = SourceStep::Harvesting;
                self.actions.push_back(SourceAction::Harvest);
            }
            SourceStep::FinalDrain => {
                self.progress.phase = Phase::Switchover;
                self.switchover.paused = Some(now);
                self.step = SourceStep::Saving;
                self.actions.push_back(SourceAction::PauseAndSave);
            }
            _ => {}
        }
        Ok(())
    }

    /// The decision after a round: another, with or without a throttle, or the switchover.
    fn after_round(&mut self, now: Instant) -> Result<(), MigrateError> {
        let round_time = now.saturating_duration_since(self.round_start).as_secs_f64().max(1e-6);
        let dirty = self.dirty.count();
        let figures = RoundFigures {
            sent_pages: self.round_pages,
            dirty_pages: dirty,
            dirty_rate: (dirty as f64 / round_time) as u64,
            bandwidth: ((self.queued - self.round_queued) as f64 / round_time) as u64,
            transfer: self.cost.estimate(dirty, self.bandwidth_limit),
            floor: self.rtt * 2 + SWITCHOVER_OVERHEAD,
        };
        let estimate = figures.transfer.saturating_add(figures.floor);
        tracing::info!(
            round = self.round,
            sent = self.round_pages,
            dirty,
            dirty_rate = figures.dirty_rate,
            bandwidth = figures.bandwidth,
            estimate_ms = estimate.as_millis() as u64,
            throttle = self.convergence.throttle,
            "round done"
        );
        self.progress.dirty_rate = figures.dirty_rate;
        self.progress.bandwidth = figures.bandwidth;
        self.progress.estimated_downtime_ms = estimate.as_millis().min(u128::from(u64::MAX)) as u64;
        self.progress.remaining_pages = dirty;
        self.round += 1;
        let rtt = self.rtt;
        let next = self.convergence.after_round(&figures, || rtt);
        let post_copy_now = match (self.options.post_copy, &next) {
            (None, _) | (_, Ok(Next::Switchover)) => false,
            (Some(PostCopy::AfterRounds(n)), _) => self.round >= n,
            (Some(PostCopy::Auto), Ok(Next::Another)) => false,
            (Some(PostCopy::Auto), Ok(Next::Throttle(_)) | Err(_)) => true,
        };
        if post_copy_now {
            tracing::info!(round = self.round, dirty, "switching to post-copy");
            self.post_copy_switch = true;
            return self.drain(now, SourceStep::FinalDrain);
        }
        match next? {
            Next::Switchover => self.drain(now, SourceStep::FinalDrain),
            Next::Another => self.begin_round(now),
            Next::Throttle(percent) => {
                tracing::info!(percent, "auto-converge: throttling the vCPUs");
                self.actions.push_back(SourceAction::Throttle(percent));
                self.progress.throttle_percent = percent;
                self.begin_round(now)
            }
        }
    }

    fn start_dirty_log(&mut self) -> Result<(), MigrateError> {
        self.deadline = None;
        self.step = SourceStep::StartingLog;
        self.actions.push_back(SourceAction::StartDirtyLog);
        Ok(())
    }

    fn finish(&mut self, report: Report) {
        self.step = SourceStep::Done;
        self.deadline = None;
        self.progress.phase = Phase::Done;
        self.actions.push_back(SourceAction::Throttle(0));
        self.actions.push_back(SourceAction::Finish(Box::new(Ok(report))));
    }

    /// Paused, the last harvest in: instead of the last pages, their list, then the
    /// state and the digests of what the destination holds now.
    fn switch_to_post_copy(&mut self, now: Instant) -> Result<(), MigrateError> {
        let pending = std::mem::replace(&mut self.dirty, DirtySet::new(self.pages));
        let count = pending.count();
        let state_hash = self.state.as_deref().map(blake3::hash).unwrap_or_else(|| blake3::hash(b""));
        let mut session = [0u8; 8];
        session.copy_from_slice(&state_hash.as_bytes()[..8]);
        let session = u64::from_le_bytes(session);
        tracing::info!(pages = count, "post-copy switchover: the guest starts at the destination before these");
        for frame in PendingPages::frames(session, &pending.runs()) {
            self.send(&frame)?;
        }
        self.switchover.last_pages = 0;
        self.progress.remaining_pages = count;
        self.post_copy = Some(PostCopyRun {
            session,
            pending,
            requested: VecDeque::new(),
            scan: 0,
            report: PostCopyReport { pages: count, ..PostCopyReport::default() },
            missing_known: count,
            all_sent: false,
        });
        self.send_state(now)
    }

    /// Sends the next pages the destination misses: asked-for ones first, then the rest
    /// in order; once none is left, PostCopyDone.
    fn push(&mut self, now: Instant) -> Result<(), MigrateError> {
        if !self.reading.is_empty() {
            return Ok(());
        }
        if self.queued.saturating_sub(self.acked) > self.in_flight_cap() {
            self.link_wait = true;
            return Ok(());
        }
        let batch = self.push_batch();
        let Some(run) = self.post_copy.as_mut() else { return Ok(()) };
        while self.reading.len() < batch
            && let Some(page) = run.requested.pop_front()
        {
            if run.pending.contains(page) {
                run.pending.remove(page);
                run.report.requested += 1;
                self.reading.push(page);
            }
        }
        if self.reading.is_empty() {
            run.pending.take_first(batch, &mut run.scan, &mut self.reading);
        }
        self.progress.remaining_pages = run.pending.count();
        if !self.reading.is_empty() {
            self.actions.push_back(SourceAction::ReadPages(self.reading.clone()));
            return Ok(());
        }
        run.all_sent = true;
        let digest = self.encoder.digest();
        self.step = SourceStep::PostCopyFinishing;
        self.deadline = Some(now + DRAIN_STEP);
        self.send(&Message::PostCopyDone(digest))
    }

    /// The pages `data` was read for, checked against its length.
    fn take_read(&mut self, data: &[u8]) -> Result<Vec<u64>, MigrateError> {
        let pages = std::mem::take(&mut self.reading);
        if data.len() != pages.len() * PAGE_SIZE {
            let short = format!("{} bytes read for {} pages", data.len(), pages.len());
            return Err(MigrateError::ReadPages(short.into()));
        }
        Ok(pages)
    }

    /// Pages read for the post-copy: whole, and sent at once (the guest may wait on them).
    fn post_copy_pages_read(&mut self, data: &[u8]) -> Result<(), MigrateError> {
        let pages = self.take_read(data)?;
        for (page, content) in pages.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            self.encoder.add_whole(*page, content);
        }
        self.flush()
    }

    /// The link is gone after the guest may have started there: connect again.
    fn post_copy_link_lost(&mut self, now: Instant, e: LinkError) -> Result<(), MigrateError> {
        let resuming = matches!(self.step, SourceStep::Reconnecting | SourceStep::Resuming);
        // An abort on a link being resumed is about that link (the destination gave up on
        // it, or another receiver took the port): connect again. On the link the post-copy
        // ran on, it is the destination's verdict on the guest.
        if let LinkError::PeerAborted(reason) = &e
            && !resuming
        {
            return Err(MigrateError::DestinationAborted(reason.clone()));
        }
        if !resuming {
            tracing::warn!("post-copy: the link is lost ({e}); connecting again");
            self.deadline = Some(now + self.options.resume_window);
        }
        // What was queued for the lost link is gone with it.
        self.actions.retain(|a| !matches!(a, SourceAction::Send(_) | SourceAction::SendPages { .. }));
        self.encoder.discard();
        self.reading.clear();
        self.link_wait = false;
        self.step = SourceStep::Reconnecting;
        self.actions.push_back(SourceAction::Reconnect);
        Ok(())
    }

    /// The destination is back and lists what it still misses: that is what goes now.
    fn resumed(&mut self, now: Instant, p: PendingPages) -> Result<(), MigrateError> {
        let pages = self.pages;
        let Some(run) = self.post_copy.as_mut() else {
            return Err(MigrateError::Unexpected { expected: "Received", got: "PostCopyPending" });
        };
        if p.session != run.session {
            return Err(MigrateError::Unexpected { expected: "this migration's pages", got: "another session's" });
        }
        // A list in several frames: the first replaces, the rest add.
        if self.step == SourceStep::Resuming {
            run.pending = DirtySet::new(pages);
            run.requested.clear();
            run.scan = 0;
            run.report.resumes += 1;
            self.step = SourceStep::PostCopy;
            self.deadline = None;
        }
        run.pending
            .add_runs(&p.runs)
            .ok_or(MigrateError::Unexpected { expected: "pages of this VM", got: "pages past its end" })?;
        run.scan = 0;
        run.missing_known = run.pending.count();
        run.all_sent = false;
        tracing::info!(missing = run.missing_known, "post-copy: resumed");
        self.push(now)
    }

    /// The last pages are out: the state and both digests follow.
    fn send_state(&mut self, now: Instant) -> Result<(), MigrateError> {
        let mut state = self
            .state
            .take()
            .ok_or(MigrateError::OutOfTurn { step: self.step, event: "the last pages before a state" })?;
        let ours = Digests { memory: self.encoder.digest(), state: *blake3::hash(&state).as_bytes() };
        if self.options.fault == Some(Fault::FlipStateByte) {
            let at = state.len() / 2;
            state[at] ^= 0x01;
            tracing::warn!("test fault: flipping a byte of the state on the way");
        }
        self.ours = Some(ours);
        self.send(&Message::State(state))?;
        self.send(&Message::Verify(ours))?;
        self.switchover.sent = Some(now);
        self.step = SourceStep::Ready;
        self.deadline = Some(now + READY_TIMEOUT);
        Ok(())
    }

    fn report(&self, now: Instant) -> Report {
        let s = self.switchover;
        let us = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_micros() as u64,
            _ => 0,
        };
        let ours = self.ours.unwrap_or(Digests { memory: [0; 32], state: [0; 32] });
        let counts: PageCounts = self.encoder.counts();
        Report {
            total_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            downtime_us: us(s.paused, s.running.or(Some(now))),
            switchover: SwitchoverTimes {
                pause_and_save_us: us(s.paused, s.saved),
                last_pages_us: us(s.saved, s.sent),
                destination_ready_us: us(s.sent, s.ready),
                commit_us: us(s.commit, s.running.or(Some(now))),
                last_pages: s.last_pages,
            },
            rounds: self.round,
            bytes_sent: self.queued,
            wire_bytes: 0,
            transport: Default::default(),
            pages: counts,
            bytes_saved: (counts.base + counts.copy) * PAGE_SIZE as u64,
            throttle_max: self.convergence.throttle_max,
            compression: self.encoder.compression(),
            workers: self.encoder.workers(),
            // The driver's to say: the link knows.
            lanes: 0,
            memory_digest: hex(&ours.memory),
            state_digest: hex(&ours.state),
            digests_matched: true,
            post_copy: None,
        }
    }
}

fn event_name(event: &SourceEvent<'_>) -> &'static str {
    match event {
        SourceEvent::Frame(m) => m.name(),
        SourceEvent::LinkFailed(_) => "a link failure",
        SourceEvent::Timer => "the timer",
        SourceEvent::Cancel => "a cancel",
        SourceEvent::DirtyLogStarted(_) => "the dirty log started",
        SourceEvent::PagesRead(_) => "pages read",
        SourceEvent::Harvested(_) => "a harvest",
        SourceEvent::Saved(_) => "the saved state",
        SourceEvent::Reconnected => "a new link",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Welcome;

    #[test]
    fn a_round_waits_for_receipts_once_it_is_the_in_flight_cap_ahead() {
        let now = Instant::now();
        let mut m = SourceMachine::new(now, vec![], vec![64 << 20], SourceOptions::default()).unwrap();
        m.handle(now, SourceEvent::Frame(Message::Welcome(Welcome { base: vec![] })));
        m.handle(now, SourceEvent::DirtyLogStarted(Ok(None)));
        let mut seed = 0;
        let mut run = |m: &mut SourceMachine| {
            while let Some(action) = m.poll() {
                if let SourceAction::ReadPages(pages) = action {
                    seed += 1;
                    let data = crate::noise(seed, pages.len() * PAGE_SIZE);
                    m.handle(now, SourceEvent::PagesRead(Ok(&data)));
                }
            }
        };
        run(&mut m);

        // No receipt yet: reading stopped one batch past the cap, 8 MiB, with a deadline.
        let ahead = m.queued - m.acked;
        assert!(m.link_wait && m.step() == SourceStep::Sending, "{:?}", m.step());
        assert!(ahead > IN_FLIGHT_MIN && ahead < IN_FLIGHT_MIN + (2 << 20), "{ahead}");
        assert!(m.deadline().is_some(), "a link that never answers times out");
        // A receipt for half of it: reading goes on up to the cap again.
        let acked = m.queued / 2;
        m.handle(now, SourceEvent::Frame(Message::Received(acked)));
        run(&mut m);
        assert!(m.link_wait && m.queued - acked > IN_FLIGHT_MIN, "{}", m.queued - acked);
        assert!(m.pages_sent < 16384, "not the whole 64 MiB: {}", m.pages_sent);
    }
}
