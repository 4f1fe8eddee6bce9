//! Whole migrations between the two sans-I/O machines in one process, under simulated
//! time: a guest that keeps writing, a link with latency and a rate, and a loss of the link
//! at every frame, a cancel at every step and a VM failure at every step. Whatever
//! happens, the VM runs on exactly one side at the end, or (a commit whose answer was lost)
//! is paused at the source and runs nowhere else unconfirmed. Post-copy too: with the
//! guest asking for pages, a link lost at any frame and resumed, a source that never
//! comes back, and a destination that cannot run post-copy.

use crate::destination::{self, Action, DestinationMachine, DestinationVm, GuestPages, ReceiveError, VmFault};
use crate::dirty::DirtySet;
use crate::page::PAGE_SIZE;
use crate::protocol::{self, Hello, Message};
use crate::source::{MigrateError, PostCopy, Report, SourceAction, SourceEvent, SourceMachine, SourceOptions};
use crate::transport::LinkError;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Pages of the test VM, unless a run says otherwise (`Trouble::pages`).
const PAGES: usize = 256;
const STATE: &[u8] = b"vcpus, devices, clocks";

/// The VM at the source: its pages, and a guest that writes `rate` pages per second while
/// it runs, round-robin over the first half of memory.
struct SourceVm {
    mem: Vec<Vec<u8>>,
    pages: usize,
    rate: f64,
    written: f64,
    next: usize,
    last: Instant,
    dirty: DirtySet,
    paused: bool,
    /// Calls to the VM so far, and the one that is to fail.
    calls: usize,
    fail_at: Option<usize>,
}

impl SourceVm {
    fn new(now: Instant, rate: f64, pages: usize) -> Self {
        let mem = (0..pages).map(|i| if i % 4 == 3 { vec![0; PAGE_SIZE] } else { content(i) }).collect();
        SourceVm {
            mem,
            pages,
            rate,
            written: 0.0,
            next: 0,
            last: now,
            dirty: DirtySet::new(pages as u64),
            paused: false,
            calls: 0,
            fail_at: None,
        }
    }

    /// The guest runs until `now`.
    fn run_until(&mut self, now: Instant) {
        if !self.paused {
            self.written += now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
            while self.written >= 1.0 {
                let page = self.next % (self.pages / 2);
                self.mem[page][8..16].copy_from_slice(&(self.next as u64).to_le_bytes());
                self.dirty.set(page as u64);
                self.next += 1;
                self.written -= 1.0;
            }
        }
        self.last = now;
    }

    fn call(&mut self, what: &'static str) -> Result<(), VmFault> {
        self.calls += 1;
        match self.fail_at == Some(self.calls) {
            true => Err(Box::new(TestVmFails(what))),
            false => Ok(()),
        }
    }
}

/// The test VM's failure at the step it names.
#[derive(Debug, thiserror::Error)]
#[error("the test VM fails to {0}")]
struct TestVmFails(&'static str);

/// Page `page`'s first content: bytes no two pages share and zstd cannot shrink much.
fn content(page: usize) -> Vec<u8> {
    crate::noise((page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) + 1, PAGE_SIZE)
}

/// The VM at the destination.
#[derive(Default)]
struct DestVm {
    mem: Vec<Vec<u8>>,
    built: bool,
    running: bool,
    refuse_post_copy: bool,
    /// Post-copy: pages dropped at the start and not yet placed.
    missing: DirtySet,
    /// Pages the guest faults on once it runs, to ask the source for.
    faults: Vec<u64>,
}

impl GuestPages for DestVm {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        if self.built {
            return None;
        }
        self.mem.get_mut(usize::try_from(page).ok()?).map(|p| &mut p[..])
    }
}

impl DestinationVm for DestVm {
    fn prepare(&mut self, hello: &Hello) -> Result<(), VmFault> {
        self.mem = vec![vec![0; PAGE_SIZE]; (hello.regions.iter().sum::<u64>() / PAGE_SIZE as u64) as usize];
        Ok(())
    }

    fn build(&mut self, state: &[u8]) -> Result<(), VmFault> {
        if state != STATE {
            return Err("another state".into());
        }
        self.built = true;
        Ok(())
    }

    fn start(&mut self) -> Result<(), VmFault> {
        self.running = true;
        Ok(())
    }

    fn check_post_copy(&mut self) -> Result<(), VmFault> {
        match self.refuse_post_copy {
            true => Err("no userfaultfd here".into()),
            false => Ok(()),
        }
    }

    fn start_post_copy(&mut self, pending: &DirtySet) -> Result<(), VmFault> {
        for page in pending.iter() {
            self.mem[page as usize] = vec![0xee; PAGE_SIZE];
        }
        self.missing = pending.clone();
        // The guest touches the pages the push would reach last.
        self.faults = pending.iter().collect::<Vec<_>>().into_iter().rev().take(4).collect();
        self.running = true;
        Ok(())
    }

    fn place(&mut self, page: u64, content: Option<&[u8]>) -> Result<(), VmFault> {
        if !self.missing.contains(page) {
            return Err(format!("page {page} placed twice").into());
        }
        self.missing.remove(page);
        self.mem[page as usize] = content.map_or_else(|| vec![0; PAGE_SIZE], <[u8]>::to_vec);
        Ok(())
    }
}

/// What travels one way: frames, or the end of the connection with a reason.
enum Item {
    Frame(Vec<u8>),
    Closed(LinkError),
}

/// One direction of the link: latency plus the time to put each frame on it. With page
/// lanes (`lane_skew`), each shard's batches are late by a multiple of the skew of their
/// own, so that lanes overtake each other, and every other frame arrives as the link's
/// lanes deliver it: after each batch sent before it, before each batch sent after it.
struct Way {
    queue: VecDeque<(Instant, Item)>,
    free_at: Instant,
    latency: Duration,
    bytes_per_sec: f64,
    lane_skew: Duration,
    last_control: Instant,
    last_batch: Instant,
    /// Batches that arrive before one sent earlier.
    overtaken: usize,
}

impl Way {
    fn new(now: Instant, latency: Duration, bytes_per_sec: f64) -> Self {
        Way {
            queue: VecDeque::new(),
            free_at: now,
            latency,
            bytes_per_sec,
            lane_skew: Duration::ZERO,
            last_control: now,
            last_batch: now,
            overtaken: 0,
        }
    }

    fn with_lanes(mut self, skew: Duration) -> Self {
        self.lane_skew = skew;
        self
    }

    fn push(&mut self, now: Instant, item: Item) {
        self.push_on(now, item, None);
    }

    /// `shard`: the item is a frame of that shard's batches.
    fn push_on(&mut self, now: Instant, item: Item, shard: Option<usize>) {
        let len = match &item {
            Item::Frame(f) => f.len(),
            Item::Closed(_) => 0,
        };
        let start = self.free_at.max(now);
        self.free_at = start + Duration::from_secs_f64(len as f64 / self.bytes_per_sec);
        let mut at = self.free_at + self.latency;
        if !self.lane_skew.is_zero() {
            match shard {
                Some(shard) => {
                    at = (at + self.lane_skew * ((shard as u32 * 2 + 1) % 3)).max(self.last_control);
                    self.last_batch = self.last_batch.max(at);
                }
                None => {
                    at = at.max(self.last_batch).max(self.last_control);
                    self.last_control = at;
                }
            }
        }
        // In arrival order; among equal times, in the order sent.
        let place = self.queue.iter().rposition(|(t, _)| *t <= at).map_or(0, |i| i + 1);
        if place < self.queue.len() {
            self.overtaken += 1;
        }
        self.queue.insert(place, (at, item));
    }

    fn due(&mut self, now: Instant) -> Option<Item> {
        if self.queue.front().is_some_and(|(at, _)| *at <= now) {
            return self.queue.pop_front().map(|(_, item)| item);
        }
        None
    }

    fn next_at(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }
}

/// Where to break a run: the link after this many frames (both ways), a cancel at the
/// source after this many of its events, a VM call at the source.
#[derive(Default, Clone, Copy)]
struct Trouble {
    cut_after_frames: Option<usize>,
    cancel_after_events: Option<usize>,
    vm_fails_at_call: Option<usize>,
    /// After a cut, the source can connect again (once the destination listens).
    reconnect: bool,
    refuse_post_copy: bool,
    /// A VM of this many pages instead of PAGES.
    pages: Option<usize>,
    /// Page batches on lanes, one per shard, each shard late by multiples of this.
    lane_skew: Option<Duration>,
}

/// The destination's side of a run.
struct DestSide<'a> {
    machine: DestinationMachine<'a>,
    vm: DestVm,
    result: Option<Result<(), ReceiveError>>,
    /// It waits for the source on a new link (`Action::Relisten`).
    listening: bool,
}

struct Outcome {
    source: Result<Report, MigrateError>,
    destination: Option<Result<(), ReceiveError>>,
    source_paused: bool,
    source_mem: Vec<Vec<u8>>,
    dest: DestVm,
    /// Frames the run sent (both ways), VM calls and source events it made.
    frames: usize,
    /// Page batches that overtook one sent before them (lanes).
    overtaken: usize,
    calls: usize,
    events: usize,
}

fn run(options: SourceOptions, rate: f64, latency: Duration, trouble: Trouble) -> Outcome {
    let start = Instant::now();
    let mut now = start;
    let pages = trouble.pages.unwrap_or(PAGES);
    let mut vm = SourceVm::new(now, rate, pages);
    vm.fail_at = trouble.vm_fails_at_call;
    let regions = vec![(pages * PAGE_SIZE) as u64];
    let mut source = SourceMachine::new(now, b"machine".to_vec(), regions, options).unwrap();
    source.set_link(latency * 2, 0);
    let mut dest = DestSide {
        machine: DestinationMachine::new(now, None),
        vm: DestVm { refuse_post_copy: trouble.refuse_post_copy, ..DestVm::default() },
        result: None,
        listening: false,
    };
    let lanes = |way: Way| way.with_lanes(trouble.lane_skew.unwrap_or_default());
    let (mut to_dest, mut to_source) = (lanes(Way::new(now, latency, 100e6)), Way::new(now, latency, 100e6));
    let mut overtaken = 0;
    let (mut frames, mut events) = (0usize, 0usize);
    let mut buf = Vec::new();
    let (mut cut, mut cancelled, mut cut_once) = (false, false, false);
    let mut finished = None;
    while finished.is_none() {
        // The source's actions, each answered at once (the VM is local).
        while let Some(action) = source.poll() {
            vm.run_until(now);
            let event = match action {
                SourceAction::Send(frame) => {
                    frames += 1;
                    if !cut {
                        to_dest.push(now, Item::Frame(frame));
                    }
                    None
                }
                SourceAction::SendPages { frame, shard } => {
                    frames += 1;
                    if !cut {
                        to_dest.push_on(now, Item::Frame(frame), Some(shard));
                    }
                    None
                }
                SourceAction::StartDirtyLog => Some(SourceEvent::DirtyLogStarted(vm.call("log").map(|()| None))),
                SourceAction::ReadPages(pages) => {
                    let read = vm.call("read");
                    buf.clear();
                    for p in &pages {
                        buf.extend_from_slice(&vm.mem[*p as usize]);
                    }
                    Some(SourceEvent::PagesRead(read.map(|()| &buf[..])))
                }
                SourceAction::Harvest => {
                    let harvest =
                        vm.call("harvest").map(|()| std::mem::replace(&mut vm.dirty, DirtySet::new(pages as u64)));
                    Some(SourceEvent::Harvested(harvest))
                }
                SourceAction::PauseAndSave => {
                    let saved = vm.call("save").map(|()| STATE.to_vec());
                    vm.paused = saved.is_ok();
                    Some(SourceEvent::Saved(saved))
                }
                SourceAction::Throttle(_) | SourceAction::ReleaseDisks => None,
                SourceAction::Abort { reason, resume, .. } => {
                    to_dest.push(now, Item::Closed(LinkError::PeerAborted(reason)));
                    if resume {
                        vm.paused = false;
                    }
                    None
                }
                SourceAction::Reconnect => {
                    // The destination learns of the cut first (what is on its way to it).
                    while let Some((at, item)) = to_dest.queue.pop_front() {
                        deliver_to_dest(at.max(now), item, &mut dest, &mut to_source, &mut frames, cut);
                    }
                    if trouble.reconnect && dest.listening {
                        cut = false;
                        overtaken += to_dest.overtaken;
                        to_dest = lanes(Way::new(now, latency, 100e6));
                        to_source = Way::new(now, latency, 100e6);
                        dest.listening = false;
                        handle_dest(now, destination::Event::Relinked, &mut dest, &mut to_source, &mut frames, cut);
                        Some(SourceEvent::Reconnected)
                    } else {
                        // Nobody answers until the source gives up.
                        now = source.deadline().unwrap_or(now).max(now);
                        Some(SourceEvent::Timer)
                    }
                }
                SourceAction::Finish(result) => {
                    finished = Some(*result);
                    break;
                }
            };
            if let Some(event) = event {
                events += 1;
                source.handle(now, event);
            }
            if trouble.cancel_after_events.is_some_and(|n| events >= n) && !cancelled {
                cancelled = true;
                source.handle(now, SourceEvent::Cancel);
            }
        }
        if finished.is_some() {
            break;
        }
        if trouble.cut_after_frames.is_some_and(|n| frames >= n) && !cut && !cut_once {
            cut_once = true;
            // Nothing more arrives either way; both ends learn it at once.
            cut = true;
            to_dest.queue.clear();
            to_source.queue.clear();
            to_dest.push(now, Item::Closed(LinkError::Lost("cut".into())));
            to_source.push(now, Item::Closed(LinkError::Lost("cut".into())));
        }
        if trouble.cancel_after_events.is_some_and(|n| events >= n) && !cancelled {
            cancelled = true;
            source.handle(now, SourceEvent::Cancel);
            continue;
        }
        // What arrives now, each way.
        if let Some(item) = to_dest.due(now) {
            deliver_to_dest(now, item, &mut dest, &mut to_source, &mut frames, cut);
            continue;
        }
        if let Some(item) = to_source.due(now) {
            events += 1;
            match item {
                Item::Frame(f) => source.handle(now, SourceEvent::Frame(decode(&f))),
                Item::Closed(e) => source.handle(now, SourceEvent::LinkFailed(e)),
            }
            continue;
        }
        // Nothing to do now: time passes to the next arrival or deadline.
        let next = [
            to_dest.next_at(),
            to_source.next_at(),
            source.deadline(),
            dest.result.is_none().then(|| dest.machine.deadline()),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("a run always waits for something");
        now = next.max(now);
        source.handle(now, SourceEvent::Timer);
        if dest.result.is_none() {
            handle_dest(now, destination::Event::Timer, &mut dest, &mut to_source, &mut frames, cut);
        }
        assert!(now.duration_since(start) < Duration::from_secs(3600), "a run that never ends");
    }
    // What is still on its way to the destination reaches it (an abort, the last frames).
    while let Some((at, item)) = to_dest.queue.pop_front() {
        deliver_to_dest(at.max(now), item, &mut dest, &mut to_source, &mut frames, cut);
    }
    // A destination that waits for its source to come back waits out its window.
    if dest.listening {
        let at = dest.machine.deadline().max(now);
        handle_dest(at, destination::Event::Timer, &mut dest, &mut to_source, &mut frames, cut);
    }
    Outcome {
        source: finished.expect("the loop ends when the source has finished"),
        destination: dest.result,
        source_paused: vm.paused,
        source_mem: vm.mem,
        dest: dest.vm,
        frames,
        overtaken: overtaken + to_dest.overtaken,
        calls: vm.calls,
        events,
    }
}

fn decode(frame: &[u8]) -> Message {
    protocol::decode_message(&frame[4..]).unwrap()
}

fn deliver_to_dest(
    now: Instant,
    item: Item,
    dest: &mut DestSide<'_>,
    to_source: &mut Way,
    frames: &mut usize,
    cut: bool,
) {
    let event = match item {
        Item::Frame(f) => destination::Event::Frame { len: f.len() as u64, message: decode(&f) },
        Item::Closed(e) => destination::Event::LinkLost(e),
    };
    handle_dest(now, event, dest, to_source, frames, cut);
}

/// The destination handles `event`, and does what it asks as its driver would.
fn handle_dest(
    now: Instant,
    event: destination::Event,
    dest: &mut DestSide<'_>,
    to_source: &mut Way,
    frames: &mut usize,
    cut: bool,
) {
    if dest.result.is_some() {
        return;
    }
    let mut send = |m: &Message, to_source: &mut Way| {
        *frames += 1;
        if !cut {
            to_source.push(now, Item::Frame(protocol::encode_frame(m).unwrap()));
        }
    };
    let mut next = Some(event);
    while let Some(event) = next.take() {
        let Some(action) = dest.machine.handle(now, event, &mut dest.vm) else { continue };
        match action.run_on(&mut dest.vm) {
            Ok(event) => next = Some(event),
            Err(Action::Send(m)) => {
                send(&m, to_source);
                if matches!(m, Message::Running) && !dest.vm.faults.is_empty() {
                    send(&Message::PageRequest(std::mem::take(&mut dest.vm.faults)), to_source);
                }
                if matches!(m, Message::PostCopyComplete)
                    || (matches!(m, Message::Running) && dest.machine.step() == destination::Step::Done)
                {
                    dest.result = Some(Ok(()));
                }
            }
            Err(Action::SendAll(messages)) => messages.iter().for_each(|m| send(m, to_source)),
            Err(Action::Relisten) => dest.listening = true,
            Err(Action::Fail(e)) => {
                if matches!(e, ReceiveError::PostCopyLost { .. }) {
                    // The driver's caller stops a guest that cannot go on.
                    dest.vm.running = false;
                }
                if !cut {
                    to_source.push(now, Item::Closed(LinkError::PeerAborted(crate::error_chain(&e))));
                }
                dest.result = Some(Err(e));
            }
            Err(other) => panic!("the destination asked for {other:?}"),
        }
    }
}

/// Exactly one side runs the VM, or none runs it unconfirmed while the source holds it paused.
fn one_copy(o: &Outcome) {
    let here = !o.source_paused;
    let there = o.dest.running;
    match &o.source {
        Ok(_) => assert!(there && !here, "moved: runs there only"),
        Err(e) if e.committed() => assert!(!here, "a commit whose answer was lost stays paused here: {e}"),
        Err(e) => assert!(here && !there, "failed before the commit: runs here only: {e}"),
    }
}

fn options() -> SourceOptions {
    SourceOptions { downtime: Duration::from_millis(50), ..SourceOptions::default() }
}

#[test]
fn test_a_migration_of_a_busy_guest_moves_exactly_its_memory_at_the_pause() {
    let o = run(options(), 5000.0, Duration::from_millis(1), Trouble::default());
    let report = o.source.as_ref().unwrap();
    assert_eq!(o.destination.as_ref().map(|r| r.is_ok()), Some(true));
    one_copy(&o);
    assert!(o.dest.mem == o.source_mem, "the destination holds the memory as it was at the pause");
    assert!(report.rounds >= 2, "a guest that writes needs more than one round: {report:?}");
    assert!(report.digests_matched && report.pages.full > 0);
    // Zero pages are never sent (but those the guest wrote before round 0 read them).
    assert!(report.pages.empty > 0 && report.pages.empty <= (PAGES / 4) as u64, "{report:?}");
    assert_eq!(report.pages.zero, 0);
}

/// A migration on 3 workers whose page batches take lanes, one per shard, that
/// overtake each other; it succeeds, leaves one copy, and the destination holds exactly
/// the memory at the pause.
fn over_lanes(options: SourceOptions, rate: f64) -> Report {
    let options = SourceOptions { workers: 3, ..options };
    let lanes = Trouble { lane_skew: Some(Duration::from_millis(20)), pages: Some(4096), ..Trouble::default() };
    let o = run(options, rate, Duration::from_millis(1), lanes);
    assert_eq!(o.destination.as_ref().map(|r| r.is_ok()), Some(true));
    one_copy(&o);
    assert!(o.overtaken > 0, "the lanes did not overtake each other: {}", o.overtaken);
    assert!(o.dest.mem == o.source_mem, "the destination holds the memory as it was at the pause");
    o.source.unwrap()
}

#[test]
fn test_batches_of_different_shards_arriving_out_of_order_move_the_same_memory() {
    let report = over_lanes(options(), 5000.0);
    assert_eq!(report.workers, 3);
    assert!(report.rounds >= 2 && report.digests_matched, "{report:?}");
    let ordered = report.pages.delta + report.pages.copy;
    assert!(ordered > 0, "deltas and copies, which need their shard's order: {report:?}");
}

/// The same with post-copy: the rounds before the switch on lanes that overtake each other,
/// the pages after it on the control stream, behind every batch the lanes carried.
#[test]
fn test_post_copy_over_lanes_that_overtake_each_other_moves_the_same_memory() {
    let report = over_lanes(post_copy_options(), 20_000.0);
    assert!(report.post_copy.as_ref().is_some_and(|p| p.pages > 0), "{report:?}");
}

#[test]
fn test_a_link_lost_at_any_frame_leaves_the_vm_on_one_side() {
    let whole = run(options(), 5000.0, Duration::from_millis(1), Trouble::default());
    assert!(whole.source.is_ok());
    for cut in 0..=whole.frames {
        let o = run(
            options(),
            5000.0,
            Duration::from_millis(1),
            Trouble { cut_after_frames: Some(cut), ..Trouble::default() },
        );
        one_copy(&o);
        if let Err(e) = &o.source {
            assert!(matches!(e, MigrateError::Link(_) | MigrateError::CommitUnconfirmed(_)), "cut at {cut}: {e}");
        }
    }
}

#[test]
fn test_a_cancel_at_any_step_before_the_commit_leaves_the_vm_running_here() {
    let whole = run(options(), 5000.0, Duration::from_millis(1), Trouble::default());
    let mut cancelled = 0;
    for at in 0..whole.events {
        let o = run(
            options(),
            5000.0,
            Duration::from_millis(1),
            Trouble { cancel_after_events: Some(at), ..Trouble::default() },
        );
        one_copy(&o);
        match &o.source {
            Err(MigrateError::Cancelled) => {
                cancelled += 1;
                assert!(matches!(&o.destination, Some(Err(ReceiveError::SourceAborted(_)))), "the destination is told");
            }
            Ok(_) => {}
            Err(e) => panic!("a cancel at event {at} gave {e}"),
        }
    }
    assert!(cancelled > 0);
}

#[test]
fn test_a_vm_that_fails_at_any_call_fails_the_migration_and_runs_on_here() {
    let whole = run(options(), 5000.0, Duration::from_millis(1), Trouble::default());
    for at in 1..=whole.calls {
        let o = run(
            options(),
            5000.0,
            Duration::from_millis(1),
            Trouble { vm_fails_at_call: Some(at), ..Trouble::default() },
        );
        one_copy(&o);
        let e = o.source.as_ref().expect_err("the migration fails");
        let cause = std::error::Error::source(e).and_then(|c| c.downcast_ref::<TestVmFails>());
        assert!(cause.is_some(), "call {at}: the VM's fault is the cause: {e:?}");
        let step = match e {
            MigrateError::StartDirtyLog(_) => "log",
            MigrateError::ReadPages(_) => "read",
            MigrateError::Harvest(_) => "harvest",
            MigrateError::PauseAndSave(_) => "save",
            _ => "another step",
        };
        assert_eq!(cause.map(|c| c.0), Some(step), "call {at}: the error names the step that failed");
        assert!(
            matches!(&o.destination, Some(Err(ReceiveError::SourceAborted(_)))),
            "call {at}: the destination is told"
        );
    }
}

#[test]
fn test_a_long_link_still_converges_and_counts_its_round_trips() {
    let o = run(
        SourceOptions { downtime: Duration::from_millis(300), ..options() },
        500.0,
        Duration::from_millis(50),
        Trouble::default(),
    );
    let report = o.source.as_ref().unwrap();
    one_copy(&o);
    assert!(o.dest.mem == o.source_mem);
    // The pause spans at least the two round trips of Verify/Ready and Commit/Running.
    assert!(report.downtime_us >= 200_000, "{report:?}");
}

/// A pause of at most 10 ms: the busy guest's 128 pages and the round trips take longer.
fn post_copy_options() -> SourceOptions {
    SourceOptions {
        post_copy: Some(PostCopy::AfterRounds(1)),
        auto_converge: false,
        downtime: Duration::from_millis(10),
        // Whole pages: the busy guest's 128 take 5 ms to send.
        delta_cache: 0,
        compress: false,
        ..options()
    }
}

/// A guest that writes 20,000 pages/s, faster than the rounds could catch up with.
const BUSY: f64 = 20_000.0;

#[test]
fn test_post_copy_runs_the_guest_there_first_and_its_asked_pages_go_ahead() {
    let o = run(post_copy_options(), BUSY, Duration::from_millis(1), Trouble::default());
    let report = o.source.as_ref().unwrap();
    one_copy(&o);
    assert_eq!(o.destination.as_ref().map(|r| r.is_ok()), Some(true));
    assert!(o.dest.mem == o.source_mem, "every page arrived, as it was at the pause");
    assert_eq!(o.dest.missing.count(), 0);
    let pc = report.post_copy.expect("a post-copy report");
    assert!(pc.pages > 4 && pc.requested <= 4, "{pc:?}");
    assert_eq!((report.rounds, pc.resumes, report.switchover.last_pages), (1, 0, 0), "{report:?}");
    // The pause ends when the guest runs there, not when its last page does.
    assert!(report.downtime_us < report.total_ms * 1000, "{report:?}");
}

#[test]
fn test_post_copy_of_more_than_its_queue_waits_for_receipts_and_serves_faults_first() {
    // 16 MiB, 8 MiB of it written: the push is eight times its 1 MiB queue.
    let trouble = Trouble { pages: Some(4096), ..Trouble::default() };
    let o = run(post_copy_options(), 200_000.0, Duration::from_millis(1), trouble);
    let report = o.source.as_ref().unwrap();
    one_copy(&o);
    assert!(o.dest.mem == o.source_mem, "every page arrived, as it was at the pause");
    let pc = report.post_copy.expect("a post-copy report");
    assert!(pc.pages > 1024, "{pc:?}");
    assert_eq!(pc.requested, 4, "the pages the guest waits on overtake the push: {pc:?}");
}

#[test]
fn test_post_copy_auto_switches_when_the_rounds_stop_converging() {
    let auto = SourceOptions { post_copy: Some(PostCopy::Auto), ..post_copy_options() };
    let o = run(auto, BUSY, Duration::from_millis(1), Trouble::default());
    let report = o.source.as_ref().unwrap();
    one_copy(&o);
    assert!(o.dest.mem == o.source_mem);
    assert!(report.post_copy.is_some() && report.rounds > 1, "{report:?}");
    // Without post-copy the same migration gives up.
    let plain = run(
        SourceOptions { post_copy: None, ..post_copy_options() },
        BUSY,
        Duration::from_millis(1),
        Trouble::default(),
    );
    assert!(matches!(plain.source, Err(MigrateError::NotConverging { .. })), "{:?}", plain.source);
}

#[test]
fn test_post_copy_link_lost_at_any_frame_resumes_or_leaves_one_copy() {
    let whole = run(post_copy_options(), BUSY, Duration::from_millis(1), Trouble::default());
    let mut resumed = 0;
    for cut in 0..=whole.frames {
        let trouble = Trouble { cut_after_frames: Some(cut), reconnect: true, ..Trouble::default() };
        let o = run(post_copy_options(), BUSY, Duration::from_millis(1), trouble);
        one_copy(&o);
        match &o.source {
            Ok(report) => {
                assert!(o.dest.mem == o.source_mem, "cut at {cut}: all of memory arrived");
                resumed += report.post_copy.map_or(0, |p| p.resumes);
            }
            // Before Commit: the VM runs on here. Between Commit and Running: the
            // destination gave up before its guest ran, and this side cannot know.
            Err(e @ MigrateError::Link(_)) => assert!(!o.source_paused, "cut at {cut}: {e:?}"),
            // Only the destination's last answer was lost: it runs the guest.
            Err(MigrateError::PostCopyUnconfirmed(_)) => {
                assert!(o.dest.running && o.source_paused && o.dest.mem == o.source_mem, "cut at {cut}")
            }
            Err(MigrateError::PostCopyDestinationLost { .. }) => {
                assert!(
                    !o.dest.running && o.source_paused,
                    "cut at {cut}: {:?} {:?}",
                    o.dest.running,
                    o.destination.as_ref().map(|r| r.as_ref().err().map(|e| crate::error_chain(e)))
                )
            }
            Err(e) => panic!("cut at {cut}: {e}"),
        }
    }
    assert!(resumed > 0, "some cuts fell in the post-copy and were resumed");
}

#[test]
fn test_post_copy_whose_source_never_comes_back_says_the_guest_is_lost() {
    let whole = run(post_copy_options(), BUSY, Duration::from_millis(1), Trouble::default());
    // Cut a few frames before the end: the post-copy runs, its last pages are not in.
    // (Which frame that is depends on how the workers split the last batches.)
    let late_cut = |back: usize| {
        let trouble = Trouble { cut_after_frames: Some(whole.frames - back), ..Trouble::default() };
        run(post_copy_options(), BUSY, Duration::from_millis(1), trouble)
    };
    let o = (3..40)
        .map(late_cut)
        .inspect(one_copy)
        .find(|o| {
            matches!(&o.destination, Some(Err(ReceiveError::PostCopyLost { missing, .. })) if *missing > 0)
                && matches!(o.source, Err(MigrateError::PostCopyDestinationLost { .. }))
        })
        .expect("a cut late in the post-copy, before the source has sent everything");
    let Some(Err(ReceiveError::PostCopyLost { missing, cause, .. })) = &o.destination else {
        panic!("{:?}", o.destination.as_ref().map(|r| r.as_ref().err().map(|e| e.to_string())));
    };
    assert!(*missing > 0 && matches!(**cause, ReceiveError::SourceLost { .. }), "{cause}");
    let text = crate::error_chain(o.destination.as_ref().unwrap().as_ref().unwrap_err());
    assert!(text.contains("is lost") && text.contains("did not come back"), "{text}");
    assert!(!o.dest.running, "the guest that cannot go on is stopped");
    let e = o.source.as_ref().unwrap_err();
    assert!(matches!(e, MigrateError::PostCopyDestinationLost { .. }) && o.source_paused, "{e}");
}

#[test]
fn test_post_copy_a_destination_cannot_run_is_refused_before_anything_moves() {
    let trouble = Trouble { refuse_post_copy: true, ..Trouble::default() };
    let o = run(post_copy_options(), BUSY, Duration::from_millis(1), trouble);
    one_copy(&o);
    let e = o.source.as_ref().unwrap_err();
    assert!(matches!(e, MigrateError::PostCopyRefused(r) if r.contains("no userfaultfd")), "{e}");
    assert!(!o.source_paused && o.dest.mem.iter().all(|p| p.iter().all(|&b| b == 0)), "nothing moved");
}
