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
//! [`SourceMachine`] is this protocol without I/O (events with their time in, actions out);
//! [`migrate`] drives it over a QUIC link and a [`SourceVm`].
//!
//! Any failure or cancel before Commit resumes the VM here as if nothing happened. A
//! failure after Commit (the destination's answer is lost) leaves it paused: it may be
//! running there, and two running copies are worse than a paused one.
//!
//! Post-copy (`SourceOptions::post_copy`): after some rounds, or when the rounds would
//! not converge, the switchover sends the state before the last pages, naming them
//! (`PostCopyPending`); the destination runs the guest at once and asks for the pages it
//! faults on (`PageRequest`), which go ahead of a push of the rest. The VM stays paused
//! here, holding the only copy of those pages: a lost link is reconnected
//! (`SourceAction::Reconnect`) and resumed where it stopped for `resume_window`; if the
//! destination never comes back, the guest is lost (`PostCopyDestinationLost`), and this
//! copy, which the guest has run past there, stays paused.

mod driver;
mod dry_run;
mod machine;

pub use driver::{Reconnect, migrate};
pub use dry_run::{Measured, PassCost, Prediction, dry_run, predict};
pub use machine::{SourceAction, SourceEvent, SourceMachine, SourceStep};

use crate::VmFault;
use crate::compression::CompressionReport;
use crate::dirty::DirtySet;
use crate::transport::LinkError;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the engine needs from the VM it moves. The VMM implements it for a real VM.
pub trait SourceVm {
    /// The VM's shape, encoded by the VMM for the destination.
    fn machine(&self) -> Vec<u8>;
    /// RAM region sizes in bytes; pages are numbered across them in order.
    fn regions(&self) -> Vec<u64>;
    /// Copies page `page` into `buf` (PAGE_SIZE bytes).
    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), VmFault>;
    fn start_dirty_log(&mut self) -> Result<(), VmFault>;
    /// Adds the pages written since the last call (by the guest and by the VMM's devices)
    /// to `dirty`, and clears the logs.
    fn harvest_dirty(&mut self, dirty: &mut DirtySet) -> Result<(), VmFault>;
    fn stop_dirty_log(&mut self);
    /// Pages that may hold something other than zeroes, when the VM knows (memory the
    /// guest never touched is zeroes and need not even be read). Called after
    /// `start_dirty_log`, so that a page touched after the answer is in the next harvest.
    fn touched_pages(&self) -> Option<DirtySet> {
        None
    }
    /// Pauses the VM and returns its state as a state stream. On error the VM runs on.
    fn pause_and_save(&mut self) -> Result<Vec<u8>, VmFault>;
    fn resume(&mut self) -> Result<(), VmFault>;
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
    /// Compress page data where that shortens the transfer (`compression::Chooser`).
    pub compress: bool,
    /// Bytes of last-sent pages kept for deltas (0: no deltas).
    pub delta_cache: usize,
    /// Give up (without auto-converge) after this many rounds that do not shrink.
    pub max_stuck_rounds: u32,
    pub fault: Option<Fault>,
    /// When to switch to post-copy (None: never).
    #[serde(default)]
    pub post_copy: Option<PostCopy>,
    /// During post-copy, how long a lost link is tried again.
    #[serde(default = "default_resume_window")]
    pub resume_window: Duration,
    /// Threads for the page work (hashing, deltas, compression), each over its own
    /// ranges of memory (`encoder::Sharding`); 0: one per core.
    #[serde(default)]
    pub workers: usize,
}

fn default_resume_window() -> Duration {
    crate::destination::RESUME_WINDOW
}

/// When a migration switches to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostCopy {
    /// After this many pre-copy rounds (1: after the first pass over memory).
    AfterRounds(u32),
    /// When the rounds stop converging: instead of throttling the guest or giving up.
    Auto,
}

/// As `vmm migrate --post-copy` takes it: `auto` or `after-rounds=N` (N at least 1).
impl std::str::FromStr for PostCopy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(PostCopy::Auto);
        }
        let rounds = s
            .strip_prefix("after-rounds=")
            .ok_or_else(|| format!("post-copy {s:?}: expected auto or after-rounds=N"))?;
        match rounds.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(PostCopy::AfterRounds(n)),
            _ => Err(format!(
                "post-copy after-rounds={rounds}: give a number of rounds, at least 1 (round 0 is the first pass over memory)"
            )),
        }
    }
}

impl std::fmt::Display for PostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostCopy::Auto => f.write_str("auto"),
            PostCopy::AfterRounds(n) => write!(f, "after-rounds={n}"),
        }
    }
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
            post_copy: None,
            resume_window: default_resume_window(),
            workers: 0,
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
/// No migration takes more rounds than this, whatever its figures: a downtime limit under
/// SWITCHOVER_OVERHEAD with rounds that come out empty would otherwise never be "stuck".
const ROUND_CAP: u32 = 1000;
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
    /// A dry run measures the guest, the pipeline and the link.
    Measuring,
    Precopy,
    Switchover,
    /// The guest runs at the destination; its last pages go.
    Postcopy,
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

impl PageCounts {
    pub fn plus(&self, o: &PageCounts) -> PageCounts {
        PageCounts {
            full: self.full + o.full,
            delta: self.delta + o.delta,
            zero: self.zero + o.zero,
            base: self.base + o.base,
            copy: self.copy + o.copy,
            unchanged: self.unchanged + o.unchanged,
            empty: self.empty + o.empty,
        }
    }
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
    /// Frame bytes sent, and bytes on the wire (UDP payloads with all QUIC and TLS
    /// overheads, or TLS records on TCP).
    pub bytes_sent: u64,
    pub wire_bytes: u64,
    /// What carried the migration.
    #[serde(default)]
    pub transport: crate::transport::Transport,
    pub pages: PageCounts,
    /// Page bytes that base and copy references kept off the wire.
    pub bytes_saved: u64,
    pub throttle_max: u8,
    /// Which compression each batch got, and the figures behind the choices.
    #[serde(default)]
    pub compression: CompressionReport,
    /// Threads the page work ran on (0 in a report from a VMM before they came).
    #[serde(default)]
    pub workers: usize,
    /// QUIC streams of their own the page batches took, one per shard ("page lanes"); 0
    /// when they shared the control stream (TLS over TCP, or an older destination).
    #[serde(default)]
    pub lanes: usize,
    pub memory_digest: String,
    pub state_digest: String,
    /// Both sides computed the same digests (a report is only made when they did).
    pub digests_matched: bool,
    /// When the migration switched to post-copy.
    #[serde(default)]
    pub post_copy: Option<PostCopyReport>,
}

/// What a post-copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCopyReport {
    /// Pages out of date at the destination when its guest started.
    pub pages: u64,
    /// Of them, sent because the guest waited on them (the rest were pushed).
    pub requested: u64,
    /// Times the link was lost and resumed.
    pub resumes: u32,
    /// From the destination's Running until it had every page.
    pub post_copy_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Link(LinkError),
    #[error("the destination refused: {0}")]
    DestinationAborted(String),
    #[error("the destination answered {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("cannot turn the VM's dirty log on")]
    StartDirtyLog(#[source] VmFault),
    #[error("cannot read the VM's memory")]
    ReadPages(#[source] VmFault),
    #[error("cannot read the VM's dirty log")]
    Harvest(#[source] VmFault),
    #[error("cannot pause the VM and save its state")]
    PauseAndSave(#[source] VmFault),
    #[error("cannot set up the page encoder (its compressors and worker threads)")]
    Compressor(#[source] std::io::Error),
    /// The driver answered what the machine did not ask: a bug in the driver.
    #[error("the migration engine got {event} at step {step:?}, which it did not ask for")]
    OutOfTurn { step: SourceStep, event: &'static str },
    #[error("cancelled")]
    Cancelled,
    #[error(
        "the destination did not take the dry run's link probe ({0}); a VMM older than dry runs refuses it: \
         upgrade it, or migrate without --dry-run"
    )]
    ProbeRefused(String),
    #[error("the dry run's sample of pages did not go through the destination's page writer")]
    DryRunApply(#[source] crate::destination::ReceiveError),
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
    #[error("post-copy cannot work at the destination, so the migration did not start: {0}")]
    PostCopyRefused(String),
    #[error(
        "post-copy: the destination did not come back within {window:?} ({cause}) with {missing} pages of its \
         guest still here; the guest ran there, so this paused copy is out of date and is not resumed: the guest \
         is lost unless the destination comes back"
    )]
    PostCopyDestinationLost { window: Duration, missing: u64, cause: LinkError },
    #[error(
        "post-copy: every page was sent, but the destination's confirmation was lost ({0}); the guest most likely \
         runs there: check it. This paused copy is out of date and is not resumed"
    )]
    PostCopyUnconfirmed(LinkError),
    #[error("post-copy: the destination lost the guest: {0}")]
    PostCopyFailedThere(String),
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
        matches!(
            self,
            MigrateError::CommitUnconfirmed(_)
                | MigrateError::PostCopyDestinationLost { .. }
                | MigrateError::PostCopyUnconfirmed(_)
                | MigrateError::PostCopyFailedThere(_)
        )
    }
}

/// What controls a running migration from outside: cancel, and the figures to show.
#[derive(Clone, Default)]
pub struct Control {
    pub cancel: Arc<AtomicBool>,
    pub progress: Arc<Mutex<Progress>>,
}

impl Control {
    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn snapshot(&self) -> Progress {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A backlog of at least this many bytes keeps the link busy, so that the receipts
/// measure the link and not how fast this side produces.
const RATE_BACKLOG: u64 = 1 << 20;
/// A delivery-rate sample spans at least this many bytes and this long: receipts come in
/// bursts when the link's thread gets the CPU late, and a span inside a burst would
/// measure the burst.
const RATE_SAMPLE: u64 = 1 << 20;
const RATE_SPAN: Duration = Duration::from_millis(5);

/// The link's delivery rate, from the destination's receipts (what it applied, so the
/// destination's own speed is in it), over spans during which a backlog waited.
#[derive(Debug, Default)]
struct DeliveryRate {
    /// Where the current span began: the time and the bytes acknowledged then.
    mark: Option<(std::time::Instant, u64)>,
}

impl DeliveryRate {
    /// A receipt for `acked` bytes at `now`, with `queued` bytes handed to the link so
    /// far; a sample in bytes/s when a span is complete.
    fn receipt(&mut self, now: std::time::Instant, acked: u64, queued: u64) -> Option<f64> {
        if queued.saturating_sub(acked) < RATE_BACKLOG {
            // The link waited for this side: the span would measure the source.
            self.mark = None;
            return None;
        }
        match self.mark {
            Some((at, from)) if acked >= from + RATE_SAMPLE && now.saturating_duration_since(at) >= RATE_SPAN => {
                self.mark = Some((now, acked));
                Some((acked - from) as f64 / now.saturating_duration_since(at).as_secs_f64())
            }
            Some(_) => None,
            None => {
                self.mark = Some((now, acked));
                None
            }
        }
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

    fn not_converging(&self, f: &RoundFigures, estimate: Duration) -> MigrateError {
        MigrateError::NotConverging {
            dirty_rate: f.dirty_rate,
            bandwidth: f.bandwidth,
            estimate_ms: estimate.as_millis().min(u128::from(u64::MAX)) as u64,
            limit_ms: self.limit.as_millis() as u64,
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
        if self.rounds >= ROUND_CAP {
            return Err(self.not_converging(f, estimate));
        }
        if self.rounds >= 2 && f.dirty_pages as f64 > self.previous_dirty as f64 * SHRINK {
            self.stuck += 1;
        } else {
            self.stuck = 0;
        }
        self.previous_dirty = f.dirty_pages;
        if !self.auto_converge {
            if self.stuck >= self.max_stuck_rounds {
                return Err(self.not_converging(f, estimate));
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
    fn a_limit_under_the_switchover_overhead_gives_up_even_when_rounds_are_empty() {
        let mut c = Convergence::new(&SourceOptions { downtime: Duration::from_millis(1), ..options(false) });
        let rtt = || Duration::ZERO;
        let ended = (0..2 * ROUND_CAP).find_map(|_| c.after_round(&round(0, 0, 7), rtt).err());
        assert!(matches!(ended, Some(MigrateError::NotConverging { limit_ms: 1, .. })), "{ended:?}");
    }

    #[test]
    fn the_delivery_rate_is_sampled_only_while_a_backlog_waits() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut d = DeliveryRate::default();
        // 8 MiB queued, acknowledged at 1 MiB per 10 ms: 100 MiB/s.
        let queued = 8 << 20;
        assert_eq!(d.receipt(at(0), 0, queued), None, "the first receipt marks the span");
        assert_eq!(d.receipt(at(5), 512 << 10, queued), None, "half a sample is not one");
        let rate = d.receipt(at(10), 1 << 20, queued).unwrap();
        assert!((rate / (100.0 * 1048576.0) - 1.0).abs() < 1e-9, "{rate}");
        // A burst: 3 MiB of receipts within a millisecond is no sample by itself.
        assert_eq!(d.receipt(at(11), 4 << 20, queued), None);
        let rate = d.receipt(at(40), 4 << 20, queued).unwrap();
        assert!((rate / (100.0 * 1048576.0) - 1.0).abs() < 1e-9, "{rate}");
        // The backlog runs dry: the link waited for this side, no sample spans that.
        assert_eq!(d.receipt(at(50), 5 << 20, (5 << 20) + 1000), None);
        assert_eq!(d.receipt(at(1000), 6 << 20, 12 << 20), None, "a new span starts after the gap");
        let rate = d.receipt(at(1010), 7 << 20, 12 << 20).unwrap();
        assert!((rate / (100.0 * 1048576.0) - 1.0).abs() < 1e-9, "the gap is not in the sample: {rate}");
    }

    #[test]
    fn a_round_that_fits_switches_over() {
        let mut c = Convergence::new(&options(false));
        assert!(matches!(c.after_round(&round(10, 40, 6), RTT), Ok(Next::Switchover)));
    }

    #[test]
    fn rounds_that_fit_go_on_while_they_halve_and_are_worth_a_round() {
        let mut c = Convergence::new(&options(false));
        let halving = |sent, dirty, transfer_ms| RoundFigures { sent_pages: sent, ..round(dirty, transfer_ms, 6) };
        assert!(matches!(c.after_round(&halving(8000, 700, 12), RTT), Ok(Next::Another)));
        // Under a millisecond of pages left: not worth another round.
        assert!(matches!(c.after_round(&halving(700, 60, 0), RTT), Ok(Next::Switchover)));
        // Not halving: switch over now.
        let mut c = Convergence::new(&options(false));
        assert!(matches!(c.after_round(&halving(700, 400, 12), RTT), Ok(Next::Switchover)));
    }

    #[test]
    fn shrinking_rounds_go_on_and_rounds_that_do_not_shrink_give_up_without_auto_converge() {
        let mut c = Convergence::new(&options(false));
        for dirty in [10_000, 5_000, 2_500] {
            assert!(matches!(c.after_round(&round(dirty, 500, 6), RTT), Ok(Next::Another)));
        }
        for _ in 0..4 {
            assert!(matches!(c.after_round(&round(2_500, 500, 6), RTT), Ok(Next::Another)));
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
        assert!(matches!(err, MigrateError::NotConvergingThrottled(99)), "{err}");
        assert_eq!(c.throttle_max, 99);
    }

    #[test]
    fn round_trips_longer_than_the_limit_stop_the_migration_with_the_figure() {
        let mut c = Convergence::new(&options(true));
        // The pages would take 10 ms; two 40 ms round trips do not fit 50 ms.
        assert!(matches!(c.after_round(&round(100, 10, 85), RTT), Ok(Next::Another)));
        assert!(matches!(c.after_round(&round(100, 10, 85), RTT), Ok(Next::Another)));
        let err = c.after_round(&round(100, 10, 85), RTT).unwrap_err();
        assert!(matches!(err, MigrateError::DowntimeBelowFloor { rtt_us: 40_000, floor_ms: 86 }), "{err}");
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
