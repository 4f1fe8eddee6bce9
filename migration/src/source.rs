//! The sending end of a pre-copy migration.
//!
//! 1. Hello/Welcome: the destination learns the machine, the source learns which pages
//!    the destination already holds (an earlier snapshot: WAN delta sync).
//! 2. Dirty logging on; round 0 sends every page that is not zero (memory the guest never
//!    touched is not even read); each later round sends the pages written during the one
//!    before. Each page goes the cheapest way (`crate::encoder`).
//! 3. After each round: measure the bandwidth and the dirty rate, estimate the downtime;
//!    stop when it fits the limit (or go on while rounds halve). When rounds stop
//!    shrinking, throttle the vCPUs (auto-converge) in steps, or give up with a message
//!    that says what would help.
//! 4. Switchover: pause, save the state, send the last pages, the state and both digests;
//!    the destination builds the VM and answers with its digests; if they match, Commit;
//!    the destination answers Running and this side is done.
//!
//! Any failure or cancel before Commit resumes the VM here as if nothing happened. A
//! failure after Commit (the destination's answer is lost) leaves it paused: it may be
//! running there, and two running copies are worse than a paused one.

use crate::digest::hex;
use crate::dirty::DirtySet;
use crate::encoder::PageEncoder;
use crate::page::PAGE_SIZE;
use crate::protocol::{Digests, Hello, Message, PROTOCOL_VERSION};
use crate::transport::{Link, LinkError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the engine needs from the VM it moves. The VMM implements it for a real VM.
pub trait SourceVm {
    /// The VM's shape, encoded by the VMM for the destination.
    fn machine(&self) -> Vec<u8>;
    /// RAM region sizes in bytes; pages are numbered across them in order.
    fn regions(&self) -> Vec<u64>;
    /// Copies page `page` into `buf` (PAGE_SIZE bytes).
    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), String>;
    fn start_dirty_log(&mut self) -> Result<(), String>;
    /// Adds the pages written since the last call (by the guest and by the VMM's devices)
    /// to `dirty`, and clears the logs.
    fn harvest_dirty(&mut self, dirty: &mut DirtySet) -> Result<(), String>;
    fn stop_dirty_log(&mut self);
    /// Pages that may hold something other than zeroes, when the VM knows (memory the
    /// guest never touched is zeroes and need not even be read). Called after
    /// `start_dirty_log`, so that a page touched after the answer is in the next harvest.
    fn touched_pages(&self) -> Option<DirtySet> {
        None
    }
    /// Pauses the VM and returns its state as a state stream. On error the VM runs on.
    fn pause_and_save(&mut self) -> Result<Vec<u8>, String>;
    fn resume(&mut self) -> Result<(), String>;
    /// Keeps the vCPUs out of the guest for this share of the time (0 = off).
    fn set_throttle(&mut self, percent: u8);
    /// Lets go of what only the side that runs the VM may hold (its disk images' locks),
    /// just before Commit: the destination takes them when Commit arrives. A VM that
    /// stays here after a failed commit must take them again before it runs.
    fn release_disks(&mut self);
}

/// Faults a test can inject to see the destination refuse bad data. Never set otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Flip a byte of the first page sent whole, after it was hashed.
    FlipPageByte,
    /// Flip a byte of the state stream after its digest was taken.
    FlipStateByte,
    /// Cut the stream after this many bytes.
    TruncateAfter(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceOptions {
    /// The longest pause allowed for the switchover.
    pub downtime: Duration,
    pub auto_converge: bool,
    /// zstd level 1 on page data.
    pub compress: bool,
    /// Bytes of last-sent pages kept for deltas (0: no deltas).
    pub delta_cache: usize,
    /// Give up (without auto-converge) after this many rounds that do not shrink.
    pub max_stuck_rounds: u32,
    pub fault: Option<Fault>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            downtime: Duration::from_millis(50),
            auto_converge: true,
            compress: true,
            delta_cache: 64 << 20,
            max_stuck_rounds: 5,
            fault: None,
        }
    }
}

/// Throttle steps, as QEMU's auto-converge: start at 20%, add 10% per step, up to 99%.
pub const THROTTLE_FIRST: u8 = 20;
pub const THROTTLE_STEP: u8 = 10;
pub const THROTTLE_MAX: u8 = 99;
/// Rounds at the highest throttle without convergence before giving up anyway.
const STUCK_AT_MAX: u32 = 5;
/// A round "shrinks" when it has at most this share of the previous round's dirty pages.
const SHRINK: f64 = 0.9;
/// Once the downtime fits, rounds go on while each leaves less than this share of its
/// own work and the pages left would take longer than ROUND_WORTH to send (at most
/// MAX_ROUNDS rounds in all).
const HALVING: f64 = 0.5;
const ROUND_WORTH: Duration = Duration::from_millis(1);
const MAX_ROUNDS: u32 = 30;
const WELCOME_TIMEOUT: Duration = Duration::from_secs(120);
/// The destination builds the VM before it answers Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const RUNNING_TIMEOUT: Duration = Duration::from_secs(10);
/// State, vCPU restore and handshakes cost this much beyond the last pages (an estimate
/// for the downtime decision; measured on this host).
const SWITCHOVER_OVERHEAD: Duration = Duration::from_millis(5);
/// Rounds in a row in which only the round trips keep the downtime over its limit before
/// the migration gives up.
const FLOOR_ROUNDS: u32 = 3;
/// A round may end with this much still on its way to the destination.
const DRAIN_ALLOWANCE: u64 = 64 << 10;
/// How long one wait for a receipt may take before the link is considered stuck (the
/// link's own idle timeout notices a dead peer sooner).
const DRAIN_STEP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Connecting,
    Precopy,
    Switchover,
    Done,
    Failed,
}

/// Live figures for the progress display.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub round: u32,
    pub total_pages: u64,
    /// Pages of the current round still to go.
    pub remaining_pages: u64,
    pub pages_sent: u64,
    /// Frame bytes handed to the link so far.
    pub bytes_sent: u64,
    /// Pages written per second during the last round.
    pub dirty_rate: u64,
    /// Bytes per second over the last round.
    pub bandwidth: u64,
    pub estimated_downtime_ms: u64,
    pub throttle_percent: u8,
    pub elapsed_ms: u64,
}

/// How pages travelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    /// Sent whole.
    pub full: u64,
    pub delta: u64,
    pub zero: u64,
    /// Found in the destination's base image.
    pub base: u64,
    /// Same content as another page already there.
    pub copy: u64,
    /// Dirty but unchanged since last sent.
    pub unchanged: u64,
    /// All zeroes and never sent: memory the guest has not used costs nothing.
    pub empty: u64,
}

/// The switchover's steps, in microseconds, as the source saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverTimes {
    /// Pausing the vCPUs and saving the state (the VMM thread).
    pub pause_and_save_us: u64,
    /// Harvesting the dirty logs and sending the last pages, the state and the digests.
    pub last_pages_us: u64,
    /// Until Ready: the destination applied everything, checked the digests, built the VM.
    pub destination_ready_us: u64,
    /// From Commit to Running.
    pub commit_us: u64,
    /// Pages sent while paused.
    pub last_pages: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub total_ms: u64,
    /// From pause to the destination's Running, as this side saw it, in microseconds.
    pub downtime_us: u64,
    /// Where the downtime went.
    pub switchover: SwitchoverTimes,
    pub rounds: u32,
    /// Frame bytes sent, and UDP bytes (with all QUIC and TLS overheads).
    pub bytes_sent: u64,
    pub wire_bytes: u64,
    pub pages: PageCounts,
    /// Page bytes that base and copy references kept off the wire.
    pub bytes_saved: u64,
    pub throttle_max: u8,
    pub memory_digest: String,
    pub state_digest: String,
    /// Both sides computed the same digests (a report is only made when they did).
    pub digests_matched: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Link(LinkError),
    #[error("the destination refused: {0}")]
    DestinationAborted(String),
    #[error("the destination answered {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("the VM: {0}")]
    Vm(String),
    #[error("cancelled")]
    Cancelled,
    #[error(
        "the migration does not converge: the guest dirties {dirty_rate} pages/s, which at {bandwidth} bytes/s \
         needs about {estimate_ms} ms of downtime, more than the {limit_ms} ms allowed; allow more downtime \
         (--downtime-ms), more bandwidth (--max-bandwidth), or turn on --auto-converge"
    )]
    NotConverging { dirty_rate: u64, bandwidth: u64, estimate_ms: u64, limit_ms: u64 },
    #[error(
        "the round trip to the destination takes {rtt_us} µs, so a switchover (two round trips and the state) \
         pauses the guest for at least {floor_ms} ms, more than --downtime-ms allows; allow at least that much"
    )]
    DowntimeBelowFloor { rtt_us: u64, floor_ms: u64 },
    #[error("the migration does not converge even with the vCPUs throttled to {0}%")]
    NotConvergingThrottled(u8),
    #[error(
        "memory digest mismatch: the destination holds {theirs}, this side sent {ours}; the data was altered on \
         the way"
    )]
    MemoryDigest { ours: String, theirs: String },
    #[error("state digest mismatch: the destination received {theirs}, this side sent {ours}")]
    StateDigest { ours: String, theirs: String },
    #[error(
        "the destination did not confirm that it runs the VM ({0}); it may be running there. This VM stays \
         paused here: check the destination, then resume or shut down this one"
    )]
    CommitUnconfirmed(LinkError),
}

impl From<LinkError> for MigrateError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::PeerAborted(reason) => MigrateError::DestinationAborted(reason),
            other => MigrateError::Link(other),
        }
    }
}

impl MigrateError {
    /// Whether the VM was handed over (or may have been), so that it must not resume here.
    pub fn committed(&self) -> bool {
        matches!(self, MigrateError::CommitUnconfirmed(_))
    }
}

/// What controls a running migration from outside: cancel, and the figures to show.
#[derive(Clone, Default)]
pub struct Control {
    pub cancel: Arc<AtomicBool>,
    pub progress: Arc<Mutex<Progress>>,
}

impl Control {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn snapshot(&self) -> Progress {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What sending a page costs, learnt from the rounds: the time per page that went out
/// (reading, hashing, encoding and the link's pace, whichever bounds it) and the bytes it
/// took. A round of a few pages says little, so only rounds of at least LEARN_PAGES
/// teach (round 0 always does).
#[derive(Debug, Default)]
struct PageCost {
    per_page: Option<Duration>,
    bytes_per_page: f64,
}

const LEARN_PAGES: u64 = 256;

impl PageCost {
    fn learn(&mut self, round: Duration, pages: u64, bytes: u64) {
        if pages == 0 || (pages < LEARN_PAGES && self.per_page.is_some()) {
            return;
        }
        self.per_page = Some(round / pages.min(u64::from(u32::MAX)) as u32);
        self.bytes_per_page = bytes as f64 / pages as f64;
    }

    /// How long sending `pages` would take, at most `limit` bytes/s (0: no limit).
    fn estimate(&self, pages: u64, limit: u64) -> Duration {
        let Some(per_page) = self.per_page else { return Duration::MAX };
        let work = per_page.saturating_mul(pages.min(u64::from(u32::MAX)) as u32);
        if limit == 0 {
            return work;
        }
        work.max(Duration::from_secs_f64(pages as f64 * self.bytes_per_page / limit as f64))
    }
}

/// What a round showed, for the decision after it.
#[derive(Debug, Clone, Copy)]
struct RoundFigures {
    /// Pages the round sent.
    sent_pages: u64,
    /// Pages written during the round: the next round's work.
    dirty_pages: u64,
    dirty_rate: u64,
    bandwidth: u64,
    /// How long sending the dirty pages would take.
    transfer: Duration,
    /// What a switchover costs beyond the pages (round trips, state, build).
    floor: Duration,
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Switchover,
    Another,
    /// Another round, with the vCPUs throttled to this percentage.
    Throttle(u8),
}

/// The decision after each round: switch over, go on, throttle, or give up.
struct Convergence {
    limit: Duration,
    auto_converge: bool,
    max_stuck_rounds: u32,
    rounds: u32,
    previous_dirty: u64,
    /// Rounds in a row that did not shrink.
    stuck: u32,
    /// Rounds in a row in which only the switchover's floor kept the estimate over.
    floor_rounds: u32,
    throttle: u8,
    throttle_max: u8,
}

impl Convergence {
    fn new(options: &SourceOptions) -> Self {
        Convergence {
            limit: options.downtime,
            auto_converge: options.auto_converge,
            max_stuck_rounds: options.max_stuck_rounds,
            rounds: 0,
            previous_dirty: u64::MAX,
            stuck: 0,
            floor_rounds: 0,
            throttle: 0,
            throttle_max: 0,
        }
    }

    fn after_round(&mut self, f: &RoundFigures, rtt: impl FnOnce() -> Duration) -> Result<Next, MigrateError> {
        self.rounds += 1;
        let estimate = f.transfer.saturating_add(f.floor);
        if estimate <= self.limit {
            // It fits; but while each round leaves less than half the work of the one
            // before, another round is short and makes the pause shorter still.
            let halving = (f.dirty_pages as f64) < f.sent_pages as f64 * HALVING;
            if halving && f.transfer > ROUND_WORTH && self.rounds < MAX_ROUNDS {
                return Ok(Next::Another);
            }
            return Ok(Next::Switchover);
        }
        // The pages would fit, the round trips do not: no throttle helps with that. (Over
        // a few rounds, so that one slow round-trip sample does not decide.)
        if f.transfer.saturating_add(SWITCHOVER_OVERHEAD) <= self.limit {
            self.floor_rounds += 1;
            if self.floor_rounds >= FLOOR_ROUNDS {
                return Err(MigrateError::DowntimeBelowFloor {
                    rtt_us: rtt().as_micros() as u64,
                    floor_ms: f.floor.as_millis() as u64 + 1,
                });
            }
            return Ok(Next::Another);
        }
        self.floor_rounds = 0;
        if self.rounds >= 2 && f.dirty_pages as f64 > self.previous_dirty as f64 * SHRINK {
            self.stuck += 1;
        } else {
            self.stuck = 0;
        }
        self.previous_dirty = f.dirty_pages;
        if !self.auto_converge {
            if self.stuck >= self.max_stuck_rounds {
                return Err(MigrateError::NotConverging {
                    dirty_rate: f.dirty_rate,
                    bandwidth: f.bandwidth,
                    estimate_ms: estimate.as_millis().min(u128::from(u64::MAX)) as u64,
                    limit_ms: self.limit.as_millis() as u64,
                });
            }
            return Ok(Next::Another);
        }
        if self.stuck >= 2 && self.throttle < THROTTLE_MAX {
            self.throttle =
                if self.throttle == 0 { THROTTLE_FIRST } else { (self.throttle + THROTTLE_STEP).min(THROTTLE_MAX) };
            self.throttle_max = self.throttle_max.max(self.throttle);
            self.stuck = 0;
            return Ok(Next::Throttle(self.throttle));
        }
        if self.throttle == THROTTLE_MAX && self.stuck >= STUCK_AT_MAX {
            return Err(MigrateError::NotConvergingThrottled(self.throttle));
        }
        Ok(Next::Another)
    }
}

struct Engine<'a, V: SourceVm> {
    vm: &'a mut V,
    link: &'a mut Link,
    options: SourceOptions,
    control: Control,
    started: Instant,
    pages: u64,
    encoder: PageEncoder,
    buf: Vec<u8>,
    pages_sent: u64,
    /// Frame bytes the destination said it has received.
    acked: u64,
    fault: Option<Fault>,
}

/// Migrates the VM over `link`. On success the VM is paused here and runs there; on a
/// failure that is not `committed()`, it runs here as before.
pub fn migrate<V: SourceVm>(
    vm: &mut V,
    link: &mut Link,
    options: SourceOptions,
    control: Control,
) -> Result<Report, MigrateError> {
    let regions = vm.regions();
    let pages = regions.iter().map(|r| r / PAGE_SIZE as u64).sum();
    control.update(|p| {
        p.total_pages = pages;
        p.phase = Phase::Connecting;
    });
    let mut encoder = PageEncoder::new(pages, options.delta_cache, options.compress)
        .map_err(|e| MigrateError::Vm(format!("zstd: {e}")))?;
    if options.fault == Some(Fault::FlipPageByte) {
        encoder.flip_next_full_page();
    }
    let mut engine = Engine {
        encoder,
        fault: options.fault,
        vm,
        link,
        options,
        control: control.clone(),
        started: Instant::now(),
        pages,
        buf: vec![0; PAGE_SIZE],
        pages_sent: 0,
        acked: 0,
    };
    let mut paused = false;
    let result = engine.run(regions, &mut paused);
    engine.vm.set_throttle(0);
    match &result {
        Ok(_) => control.update(|p| p.phase = Phase::Done),
        Err(e) => {
            control.update(|p| p.phase = Phase::Failed);
            if !e.committed() {
                // Tell the destination (it may already know), then give the VM back.
                engine.link.abort(&e.to_string());
                engine.vm.stop_dirty_log();
                if paused && let Err(r) = engine.vm.resume() {
                    tracing::error!("cannot resume the VM after a failed migration: {r}");
                }
            }
        }
    }
    result
}

impl<V: SourceVm> Engine<'_, V> {
    fn run(&mut self, regions: Vec<u64>, paused: &mut bool) -> Result<Report, MigrateError> {
        self.link.send(&Message::Hello(Hello { version: PROTOCOL_VERSION, machine: self.vm.machine(), regions }))?;
        match self.link.recv(WELCOME_TIMEOUT)? {
            Message::Welcome(w) => {
                self.encoder.set_base(&w.base);
                if !w.base.is_empty() {
                    tracing::info!(pages = w.base.len(), "the destination holds a base image");
                }
            }
            other => return Err(MigrateError::Unexpected { expected: "Welcome", got: other.name() }),
        }
        self.vm.start_dirty_log().map_err(MigrateError::Vm)?;
        self.control.update(|p| p.phase = Phase::Precopy);

        let mut dirty = match self.vm.touched_pages() {
            Some(touched) => {
                self.encoder.skip_untouched(self.pages.saturating_sub(touched.count()));
                touched
            }
            None => DirtySet::all(self.pages),
        };
        let mut round = 0u32;
        let mut cost = PageCost::default();
        let mut convergence = Convergence::new(&self.options);
        loop {
            let round_start = Instant::now();
            let bytes_before = self.link.queued();
            let entries_before = self.pages_sent;
            let to_send = dirty.count();
            self.control.update(|p| {
                p.round = round;
                p.remaining_pages = to_send;
            });
            self.send_pages(&dirty)?;
            // The round ends when its pages have arrived, not when they were queued.
            self.drain(DRAIN_ALLOWANCE)?;
            let round_time = round_start.elapsed();
            let round_bytes = self.link.queued() - bytes_before;
            cost.learn(round_time, self.pages_sent - entries_before, round_bytes);

            dirty.clear();
            self.vm.harvest_dirty(&mut dirty).map_err(MigrateError::Vm)?;
            let figures = RoundFigures {
                sent_pages: to_send,
                dirty_pages: dirty.count(),
                dirty_rate: (dirty.count() as f64 / round_time.as_secs_f64().max(1e-6)) as u64,
                bandwidth: (round_bytes as f64 / round_time.as_secs_f64().max(1e-6)) as u64,
                transfer: cost.estimate(dirty.count(), self.link.bandwidth_limit()),
                floor: self.switchover_floor(),
            };
            let estimate = figures.transfer.saturating_add(figures.floor);
            tracing::info!(
                round,
                sent = to_send,
                dirty = figures.dirty_pages,
                dirty_rate = figures.dirty_rate,
                bandwidth = figures.bandwidth,
                estimate_ms = estimate.as_millis() as u64,
                throttle = convergence.throttle,
                "round done"
            );
            self.control.update(|p| {
                p.dirty_rate = figures.dirty_rate;
                p.bandwidth = figures.bandwidth;
                p.estimated_downtime_ms = estimate.as_millis().min(u128::from(u64::MAX)) as u64;
                p.remaining_pages = figures.dirty_pages;
            });
            round += 1;
            match convergence.after_round(&figures, || self.link.rtt())? {
                Next::Switchover => break,
                Next::Another => {}
                Next::Throttle(percent) => {
                    tracing::info!(percent, "auto-converge: throttling the vCPUs");
                    self.vm.set_throttle(percent);
                    self.control.update(|p| p.throttle_percent = percent);
                }
            }
        }
        let throttle_max = convergence.throttle_max;
        self.switchover(dirty, round, throttle_max, paused)
    }

    fn check_peer_and_cancel(&mut self) -> Result<(), MigrateError> {
        if self.control.cancel.load(Ordering::Relaxed) {
            return Err(MigrateError::Cancelled);
        }
        while let Some(message) = self.link.try_recv() {
            self.take(message?, "nothing")?;
        }
        Ok(())
    }

    /// Takes a message that may arrive at any time (a receipt); anything else is an error.
    fn take(&mut self, message: Message, expected: &'static str) -> Result<(), MigrateError> {
        match message {
            Message::Received(bytes) => {
                self.acked = self.acked.max(bytes);
                Ok(())
            }
            other => Err(MigrateError::Unexpected { expected, got: other.name() }),
        }
    }

    /// The next message that is not a receipt.
    fn recv(&mut self, timeout: Duration) -> Result<Message, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.recv(left)? {
                Message::Received(bytes) => self.acked = self.acked.max(bytes),
                other => return Ok(other),
            }
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
        }
    }

    /// Waits until the destination has received all but `allowance` bytes of what was
    /// sent: what sits in buffers along the way has not arrived yet.
    fn drain(&mut self, allowance: u64) -> Result<(), MigrateError> {
        self.check_peer_and_cancel()?;
        while self.link.queued() > self.acked + allowance {
            let message = self.link.recv(DRAIN_STEP)?;
            self.take(message, "Received")?;
            if self.control.cancel.load(Ordering::Relaxed) {
                return Err(MigrateError::Cancelled);
            }
        }
        Ok(())
    }

    fn send_pages(&mut self, dirty: &DirtySet) -> Result<(), MigrateError> {
        let mut left = dirty.count();
        for page in dirty.iter() {
            self.vm.read_page(page, &mut self.buf).map_err(MigrateError::Vm)?;
            self.encoder.add(page, &self.buf);
            left -= 1;
            if self.encoder.batch_full() {
                self.flush(left)?;
            }
        }
        self.flush(0)
    }

    fn flush(&mut self, left: u64) -> Result<(), MigrateError> {
        self.check_peer_and_cancel()?;
        let Some((batch, count)) = self.encoder.take_batch() else { return Ok(()) };
        self.link.send(&Message::Pages(batch))?;
        self.pages_sent += count;
        let (pages_sent, bytes, elapsed) =
            (self.pages_sent, self.link.stats.sent.load(Ordering::Relaxed), self.started.elapsed());
        self.control.update(|p| {
            p.pages_sent = pages_sent;
            p.bytes_sent = bytes;
            p.remaining_pages = left;
            p.elapsed_ms = elapsed.as_millis() as u64;
        });
        Ok(())
    }

    /// What a switchover costs beyond sending pages: two round trips (Verify/Ready,
    /// Commit/Running) and the state and build work.
    fn switchover_floor(&self) -> Duration {
        self.link.rtt() * 2 + SWITCHOVER_OVERHEAD
    }

    fn switchover(
        &mut self,
        mut dirty: DirtySet,
        rounds: u32,
        throttle_max: u8,
        paused: &mut bool,
    ) -> Result<Report, MigrateError> {
        // Nothing of the rounds may still wait at the destination: applying it would add
        // to the pause (64 KiB of well-compressed batches are thousands of pages).
        self.drain(0)?;
        self.control.update(|p| p.phase = Phase::Switchover);
        let pause_start = Instant::now();
        let mut state = self.vm.pause_and_save().map_err(MigrateError::Vm)?;
        *paused = true;
        let saved = Instant::now();
        // Pages written since the last harvest, up to the pause (saving the vCPUs may have
        // completed an I/O that wrote memory, so harvest after it).
        self.vm.harvest_dirty(&mut dirty).map_err(MigrateError::Vm)?;
        let last_pages = dirty.count();
        self.send_pages(&dirty)?;
        let ours = Digests { memory: self.encoder.digest(), state: *blake3::hash(&state).as_bytes() };
        if self.fault == Some(Fault::FlipStateByte) {
            let at = state.len() / 2;
            state[at] ^= 0x01;
            tracing::warn!("test fault: flipping a byte of the state on the way");
        }
        self.link.send(&Message::State(state))?;
        self.link.send(&Message::Verify(ours))?;
        let sent = Instant::now();
        let theirs = match self.recv(READY_TIMEOUT)? {
            Message::Ready(d) => d,
            other => return Err(MigrateError::Unexpected { expected: "Ready", got: other.name() }),
        };
        let ready = Instant::now();
        if theirs.memory != ours.memory {
            return Err(MigrateError::MemoryDigest { ours: hex(&ours.memory), theirs: hex(&theirs.memory) });
        }
        if theirs.state != ours.state {
            return Err(MigrateError::StateDigest { ours: hex(&ours.state), theirs: hex(&theirs.state) });
        }
        // The last moment a cancel can win.
        if self.control.cancel.load(Ordering::Relaxed) {
            return Err(MigrateError::Cancelled);
        }
        let commit = Instant::now();
        self.vm.release_disks();
        self.link.send(&Message::Commit).map_err(MigrateError::CommitUnconfirmed)?;
        match self.recv(RUNNING_TIMEOUT) {
            Ok(Message::Running) => {}
            Ok(other) => {
                let e = LinkError::Lost(format!("it answered {} to Commit", other.name()));
                return Err(MigrateError::CommitUnconfirmed(e));
            }
            Err(e) => return Err(MigrateError::CommitUnconfirmed(e)),
        }
        let us = |d: Duration| d.as_micros() as u64;
        let switchover = SwitchoverTimes {
            pause_and_save_us: us(saved - pause_start),
            last_pages_us: us(sent - saved),
            destination_ready_us: us(ready - sent),
            commit_us: us(commit.elapsed()),
            last_pages,
        };
        let downtime = pause_start.elapsed();
        let stats = &self.link.stats;
        Ok(Report {
            total_ms: self.started.elapsed().as_millis() as u64,
            downtime_us: downtime.as_micros() as u64,
            switchover,
            rounds,
            bytes_sent: stats.sent.load(Ordering::Relaxed),
            wire_bytes: self.link.wire_bytes(),
            pages: self.encoder.counts(),
            bytes_saved: (self.encoder.counts().base + self.encoder.counts().copy) * PAGE_SIZE as u64,
            throttle_max,
            memory_digest: hex(&ours.memory),
            state_digest: hex(&ours.state),
            digests_matched: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(dirty_pages: u64, transfer_ms: u64, floor_ms: u64) -> RoundFigures {
        RoundFigures {
            sent_pages: dirty_pages,
            dirty_pages,
            dirty_rate: dirty_pages * 10,
            bandwidth: 1_000_000,
            transfer: Duration::from_millis(transfer_ms),
            floor: Duration::from_millis(floor_ms),
        }
    }

    fn options(auto_converge: bool) -> SourceOptions {
        SourceOptions { downtime: Duration::from_millis(50), auto_converge, ..SourceOptions::default() }
    }

    const RTT: fn() -> Duration = || Duration::from_millis(40);

    #[test]
    fn a_round_that_fits_switches_over() {
        let mut c = Convergence::new(&options(false));
        assert_eq!(c.after_round(&round(10, 40, 6), RTT), Ok(Next::Switchover));
    }

    #[test]
    fn rounds_that_fit_go_on_while_they_halve_and_are_worth_a_round() {
        let mut c = Convergence::new(&options(false));
        let halving = |sent, dirty, transfer_ms| RoundFigures { sent_pages: sent, ..round(dirty, transfer_ms, 6) };
        assert_eq!(c.after_round(&halving(8000, 700, 12), RTT), Ok(Next::Another));
        // Under a millisecond of pages left: not worth another round.
        assert_eq!(c.after_round(&halving(700, 60, 0), RTT), Ok(Next::Switchover));
        // Not halving: switch over now.
        let mut c = Convergence::new(&options(false));
        assert_eq!(c.after_round(&halving(700, 400, 12), RTT), Ok(Next::Switchover));
    }

    #[test]
    fn shrinking_rounds_go_on_and_rounds_that_do_not_shrink_give_up_without_auto_converge() {
        let mut c = Convergence::new(&options(false));
        for dirty in [10_000, 5_000, 2_500] {
            assert_eq!(c.after_round(&round(dirty, 500, 6), RTT), Ok(Next::Another));
        }
        for _ in 0..4 {
            assert_eq!(c.after_round(&round(2_500, 500, 6), RTT), Ok(Next::Another));
        }
        let err = c.after_round(&round(2_500, 500, 6), RTT).unwrap_err();
        assert!(matches!(err, MigrateError::NotConverging { limit_ms: 50, .. }), "{err}");
    }

    #[test]
    fn auto_converge_steps_the_throttle_up_to_its_bound_then_gives_up() {
        let mut c = Convergence::new(&options(true));
        let mut throttles = Vec::new();
        let err = loop {
            match c.after_round(&round(2_500, 500, 6), RTT) {
                Ok(Next::Throttle(p)) => throttles.push(p),
                Ok(Next::Another) => {}
                Ok(Next::Switchover) => panic!("it cannot fit"),
                Err(e) => break e,
            }
            assert!(c.rounds < 100, "it never gives up");
        };
        assert_eq!(throttles, vec![20, 30, 40, 50, 60, 70, 80, 90, 99]);
        assert_eq!(err, MigrateError::NotConvergingThrottled(99));
        assert_eq!(c.throttle_max, 99);
    }

    #[test]
    fn round_trips_longer_than_the_limit_stop_the_migration_with_the_figure() {
        let mut c = Convergence::new(&options(true));
        // The pages would take 10 ms; two 40 ms round trips do not fit 50 ms.
        assert_eq!(c.after_round(&round(100, 10, 85), RTT), Ok(Next::Another));
        assert_eq!(c.after_round(&round(100, 10, 85), RTT), Ok(Next::Another));
        let err = c.after_round(&round(100, 10, 85), RTT).unwrap_err();
        assert_eq!(err, MigrateError::DowntimeBelowFloor { rtt_us: 40_000, floor_ms: 86 });
        assert!(err.to_string().contains("at least 86 ms"), "{err}");
    }

    #[test]
    fn page_costs_come_from_rounds_large_enough_to_tell() {
        let mut cost = PageCost::default();
        assert_eq!(cost.estimate(10, 0), Duration::MAX);
        cost.learn(Duration::from_millis(100), 1000, 4_000_000);
        assert_eq!(cost.estimate(500, 0), Duration::from_millis(50));
        // A round of three pages does not overrule a thousand.
        cost.learn(Duration::from_millis(100), 3, 12_000);
        assert_eq!(cost.estimate(500, 0), Duration::from_millis(50));
        // A bandwidth limit slower than the measured pace wins: 500 pages × 4000 B at 1 MB/s.
        assert_eq!(cost.estimate(500, 1_000_000), Duration::from_secs(2));
    }
}
