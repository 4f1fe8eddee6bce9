//! A migration's dry run: what migrating this VM over this link would take, said before
//! anything moves. No peer VMM has one.
//!
//! It measures what bounds a migration, each as the engine meets it:
//! - **the link:** the round trip, and the delivery rate of a probe of filler frames that
//!   the destination answers with receipts as it answers pages (`Message::Probe`);
//! - **the guest:** the dirty log on for a sampling window, harvested at steps into one
//!   set, so that the curve is of distinct pages by time (a hot page written a thousand
//!   times costs a round once);
//! - **the pipeline:** a sample of the touched pages through the engine's own encoder
//!   (hashes, deltas, the compression choice at the measured link rate), and the
//!   destination's own page writer, each timed; then the pages the window dirtied, as a
//!   later round sends them.
//!
//! [`predict`] then runs the engine's own round logic (`Convergence`, `PageCost`) over
//! simulated rounds, so the prediction switches over, throttles or gives up where the
//! engine would. When it would not converge, it tries the options that could help and
//! says which would. The VM runs on throughout; nothing is sent but filler.

use super::{
    Convergence, MigrateError, Next, PageCost, RATE_BACKLOG, RATE_SAMPLE, RATE_SPAN, RoundFigures, SWITCHOVER_OVERHEAD,
    SourceOptions, SourceVm,
};
use crate::destination::{GuestPages, PageWriter};
use crate::dirty::DirtySet;
use crate::encoder::PageEncoder;
use crate::page::PAGE_SIZE;
use crate::protocol::{self, BATCH_PAGES, Message};
use crate::transport::{Link, LinkError, Transport};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// When the dirty log is harvested during the sampling window (from when it went on).
const DIRTY_STEPS_MS: [u64; 6] = [25, 50, 100, 200, 300, 400];
/// The probe: frames of this size, for at most PROBE_TIME or PROBE_BYTES.
const PROBE_FRAME: usize = 1 << 20;
const PROBE_TIME: Duration = Duration::from_millis(250);
const PROBE_BYTES: u64 = 64 << 20;
const PROBE_DRAIN: Duration = Duration::from_secs(10);
/// Pages of the touched memory and of the dirtied pages put through the pipeline.
const SAMPLE_PAGES: u64 = 8192;
const SAMPLE_DIRTY_PAGES: u64 = 2048;
/// A later pass of fewer sampled pages than this says too little.
const MIN_LATER_SAMPLE: u64 = 32;
/// Rounds beyond this end the simulation (the engine's own bound is lower).
const MAX_SIMULATED_ROUNDS: u32 = 200;

/// A pass of sampled pages through the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassCost {
    pub pages: u64,
    /// Frame bytes the pages took.
    pub bytes: u64,
    /// The source's time: reading, hashing, encoding, compressing.
    pub source_us: u64,
    /// The destination's time: decompressing, checking, writing, hashing.
    pub destination_us: u64,
}

impl PassCost {
    fn bytes_per_page(&self) -> f64 {
        self.bytes as f64 / self.pages.max(1) as f64
    }

    /// The slower end's time per page: the two run side by side.
    fn per_page(&self) -> Duration {
        Duration::from_secs_f64(self.source_us.max(self.destination_us) as f64 / 1e6 / self.pages.max(1) as f64)
    }
}

/// What the dry run measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measured {
    pub transport: Transport,
    pub rtt_us: u64,
    /// The probe's delivery rate, bytes/s.
    pub link_bytes_per_s: u64,
    /// The configured limit, bytes/s (0: none).
    pub bandwidth_limit: u64,
    pub pages: u64,
    /// Pages round 0 reads (memory the guest never touched is not read).
    pub touched_pages: u64,
    /// Distinct pages written since the dirty log went on, by milliseconds.
    pub dirty_curve: Vec<(u64, u64)>,
    /// Round 0's pages, and a later round's (the pages the window dirtied, sent again).
    pub first_pass: PassCost,
    pub later_pass: PassCost,
    /// Round 0's pages as the engine sends them until it has measured the link (raw on a
    /// LAN, unless a level outruns even a fast one: `compression::Chooser`).
    #[serde(default)]
    pub unmeasured_pass: PassCost,
}

/// What the migration would take, and whether it would converge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    pub converges: bool,
    /// Until the destination runs the VM (or until the engine would give up).
    pub total_ms: u64,
    /// The guest's pause at the switchover.
    pub downtime_ms: u64,
    /// Frame bytes sent.
    pub bytes: u64,
    pub rounds: u32,
    pub throttle_max: u8,
    /// What the engine would say when it gives up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// For a migration that would not converge: the options that would make it, each with
    /// its prediction (`--auto-converge on: 2.1 s, throttled to 40%`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advice: Vec<String>,
    pub measured: Measured,
}

/// Measures the VM and the link (a fresh link to a receiving VMM, without a bandwidth
/// limit: the probe runs at the link's full rate for at most PROBE_TIME), and predicts a
/// migration under `options` and `bandwidth_limit` (bytes/s, 0: none).
pub fn dry_run<V: SourceVm>(
    vm: &mut V,
    link: &mut Link,
    options: &SourceOptions,
    bandwidth_limit: u64,
    cancelled: &dyn Fn() -> bool,
) -> Result<Prediction, MigrateError> {
    let check = || if cancelled() { Err(MigrateError::Cancelled) } else { Ok(()) };
    let link_bytes_per_s = probe(link)?;
    check()?;
    let pages = vm.regions().iter().map(|r| r / PAGE_SIZE as u64).sum::<u64>();
    let mut pipeline = Pipeline::new(pages, options, Some(link_bytes_per_s), bandwidth_limit, link.rtt())?;
    vm.start_dirty_log().map_err(MigrateError::StartDirtyLog)?;
    let sampled = (|| {
        let touched = vm.touched_pages().unwrap_or_else(|| DirtySet::all(pages));
        let first_sample = stride(touched.iter(), touched.count(), SAMPLE_PAGES);
        let first_pass = pipeline.pass(vm, &first_sample)?;
        let unmeasured_pass = match options.compress {
            true => Pipeline::new(pages, options, None, bandwidth_limit, link.rtt())?.pass(vm, &first_sample)?,
            false => first_pass,
        };
        let (dirtied, dirty_curve) = sample_dirty(vm, pages, cancelled)?;
        // A later round sends what changed since it was sent: the sampled pages written
        // in the window. (Too few of those, and pages never sent stand in, as whole pages.)
        let mut again: Vec<u64> = first_sample.iter().copied().filter(|&p| dirtied.contains(p)).collect();
        if (again.len() as u64) < MIN_LATER_SAMPLE && dirtied.count() > again.len() as u64 {
            again = stride(dirtied.iter(), dirtied.count(), SAMPLE_DIRTY_PAGES);
        }
        let later_pass = pipeline.pass(vm, &again)?;
        Ok::<_, MigrateError>((touched.count(), dirty_curve, [first_pass, later_pass, unmeasured_pass]))
    })();
    vm.stop_dirty_log();
    let (touched_pages, dirty_curve, [first_pass, later_pass, unmeasured_pass]) = sampled?;
    let measured = Measured {
        transport: link.transport(),
        rtt_us: link.rtt().as_micros() as u64,
        link_bytes_per_s,
        bandwidth_limit,
        pages,
        touched_pages,
        dirty_curve,
        first_pass,
        later_pass,
        unmeasured_pass,
    };
    let prediction = predict(&measured, options);
    tracing::info!(
        converges = prediction.converges,
        total_ms = prediction.total_ms,
        downtime_ms = prediction.downtime_ms,
        bytes = prediction.bytes,
        "dry run done"
    );
    Ok(prediction)
}

/// Sends filler for PROBE_TIME (or PROBE_BYTES), waits for the last receipt, and answers
/// the delivery rate between the first receipt and the last.
fn probe(link: &mut Link) -> Result<u64, MigrateError> {
    let frame = protocol::encode_frame(&Message::Probe(vec![0x5a; PROBE_FRAME - 16]))
        .map_err(|e| MigrateError::Link(LinkError::Protocol(e)))?;
    let started = Instant::now();
    let mut receipts: Vec<(Instant, u64)> = Vec::new();
    while started.elapsed() < PROBE_TIME && link.queued() < PROBE_BYTES {
        link.send_frame(frame.clone())?;
        while let Some(read) = link.try_recv() {
            receipts.push((Instant::now(), received(read)?));
        }
    }
    let deadline = Instant::now() + PROBE_DRAIN;
    while receipts.last().is_none_or(|r| r.1 < link.queued()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrateError::Link(LinkError::Timeout(PROBE_DRAIN)));
        }
        let receipt = received(link.recv(left))?;
        receipts.push((Instant::now(), receipt));
    }
    link.send(&Message::ProbeDone)?;
    // The first receipt comes a round trip after the first frame: the rate spans receipts.
    let whole = link.queued() as f64 / started.elapsed().as_secs_f64().max(1e-6);
    let rate = match (receipts.first(), receipts.last()) {
        (Some(first), Some(last)) if receipts.len() >= 3 && last.0 > first.0 => {
            last.1.saturating_sub(first.1) as f64 / last.0.duration_since(first.0).as_secs_f64()
        }
        _ => whole,
    };
    Ok(rate as u64)
}

/// A receipt's byte count, or why the destination did not answer with one.
fn received(read: Result<Message, LinkError>) -> Result<u64, MigrateError> {
    match read {
        Ok(Message::Received(n)) => Ok(n),
        Ok(other) => Err(MigrateError::Unexpected { expected: "Received", got: other.name() }),
        // A VMM older than dry runs cannot decode Probe and aborts.
        Err(LinkError::PeerAborted(reason)) => Err(MigrateError::ProbeRefused(reason)),
        Err(e) => Err(e.into()),
    }
}

/// Harvests the dirty log (which is on) at the window's steps: the pages the window
/// dirtied, and the curve of distinct dirtied pages by time.
fn sample_dirty<V: SourceVm>(
    vm: &mut V,
    pages: u64,
    cancelled: &dyn Fn() -> bool,
) -> Result<(DirtySet, Vec<(u64, u64)>), MigrateError> {
    // What was written before now is the first pass's, not the window's.
    vm.harvest_dirty(&mut DirtySet::new(pages)).map_err(MigrateError::Harvest)?;
    let mut dirtied = DirtySet::new(pages);
    let started = Instant::now();
    let mut curve = Vec::new();
    for ms in DIRTY_STEPS_MS {
        if cancelled() {
            return Err(MigrateError::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(ms).saturating_sub(started.elapsed()));
        vm.harvest_dirty(&mut dirtied).map_err(MigrateError::Harvest)?;
        curve.push((started.elapsed().as_millis() as u64, dirtied.count()));
    }
    Ok((dirtied, curve))
}

/// About `n` of `count` pages, in runs of a batch, the runs evenly spread: a batch of
/// neighbours compresses as the engine's batches do, and reads memory as they do.
fn stride(pages: impl Iterator<Item = u64>, count: u64, n: u64) -> Vec<u64> {
    let run = BATCH_PAGES as u64;
    let step = count.div_ceil(run).div_ceil(n.div_ceil(run)).max(1);
    pages.enumerate().filter(|(i, _)| (*i as u64 / run).is_multiple_of(step)).map(|(_, p)| p).collect()
}

/// The engine's encoder and the destination's writer, timed on sampled pages.
struct Pipeline {
    encoder: PageEncoder,
    writer: PageWriter,
    memory: ScratchPages,
}

impl Pipeline {
    /// A pipeline whose encoder knows the link's rate (`link`), or, as the engine's at
    /// first, only its limit and round trip.
    fn new(
        pages: u64,
        options: &SourceOptions,
        link: Option<u64>,
        limit: u64,
        rtt: Duration,
    ) -> Result<Self, MigrateError> {
        let mut encoder = PageEncoder::new(pages, options.delta_cache, options.compress, options.workers)
            .map_err(MigrateError::Compressor)?;
        encoder.set_link(limit, rtt);
        if let Some(link) = link {
            encoder.link_sample(link as f64);
        }
        Ok(Pipeline {
            encoder,
            writer: PageWriter::new(pages).map_err(MigrateError::DryRunApply)?,
            memory: ScratchPages::default(),
        })
    }

    /// Sends `pages` through both ends, as a round would.
    fn pass<V: SourceVm>(&mut self, vm: &V, pages: &[u64]) -> Result<PassCost, MigrateError> {
        let mut cost = PassCost { pages: pages.len() as u64, ..PassCost::default() };
        let mut buf = vec![0u8; self.encoder.read_pages() * PAGE_SIZE];
        let mut batches = Vec::new();
        let started = Instant::now();
        for chunk in pages.chunks(self.encoder.read_pages()) {
            for (&page, into) in chunk.iter().zip(buf.chunks_exact_mut(PAGE_SIZE)) {
                vm.read_page(page, into).map_err(MigrateError::ReadPages)?;
            }
            self.encoder.add_pages(chunk, &buf[..chunk.len() * PAGE_SIZE]);
            batches.extend(std::iter::from_fn(|| self.encoder.take_batch()).map(|(b, _)| b));
        }
        self.encoder.finish();
        batches.extend(std::iter::from_fn(|| self.encoder.take_batch()).map(|(b, _)| b));
        let frames: Vec<Vec<u8>> = batches
            .into_iter()
            .map(|b| protocol::encode_frame(&Message::Pages(b)))
            .collect::<Result<_, _>>()
            .map_err(|e| MigrateError::Link(LinkError::Protocol(e)))?;
        cost.source_us = started.elapsed().as_micros() as u64;
        cost.bytes = frames.iter().map(|f| f.len() as u64).sum();
        let started = Instant::now();
        for frame in &frames {
            let message =
                protocol::decode_message(&frame[4..]).map_err(|e| MigrateError::Link(LinkError::Protocol(e)))?;
            if let Message::Pages(batch) = message {
                self.writer.apply(&mut self.memory, None, &batch).map_err(MigrateError::DryRunApply)?;
            }
        }
        cost.destination_us = started.elapsed().as_micros() as u64;
        Ok(cost)
    }
}

/// The destination's memory for the sampled pages only.
#[derive(Default)]
struct ScratchPages(HashMap<u64, Vec<u8>>);

impl GuestPages for ScratchPages {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        Some(self.0.entry(page).or_insert_with(|| vec![0; PAGE_SIZE]))
    }
}

/// Distinct pages written within `span` of the log going on: the measured curve, and past
/// its end the rate of its last step, up to `pages` (the memory the guest has touched: a
/// working set that the window did not see wrap is taken to lie within it).
fn dirtied_within(curve: &[(u64, u64)], span: Duration, pages: u64) -> u64 {
    let ms = span.as_secs_f64() * 1e3;
    let mut before = (0.0, 0.0);
    for &(t, n) in curve {
        let (t, n) = (t as f64, n as f64);
        if ms <= t {
            let share = if t > before.0 { (ms - before.0) / (t - before.0) } else { 1.0 };
            return (before.1 + share * (n - before.1)).round() as u64;
        }
        before = (t, n);
    }
    // Beyond the window: on at the last step's rate.
    let slope = match curve {
        [.., a, b] if b.0 > a.0 => (b.1 as f64 - a.1 as f64) / (b.0 - a.0) as f64,
        [only] if only.0 > 0 => only.1 as f64 / only.0 as f64,
        _ => 0.0,
    };
    ((before.1 + slope * (ms - before.0)).round() as u64).min(pages)
}

/// The migration `measured` says this VM and link would make, under `options`.
pub fn predict(measured: &Measured, options: &SourceOptions) -> Prediction {
    let mut prediction = simulate(measured, options);
    if !prediction.converges {
        prediction.advice = advise(measured, options);
    }
    prediction
}

/// The rounds the engine would run, with its own decisions.
fn simulate(m: &Measured, options: &SourceOptions) -> Prediction {
    let link = match m.bandwidth_limit {
        0 => m.link_bytes_per_s,
        limit => limit.min(m.link_bytes_per_s),
    }
    .max(1) as f64;
    let rtt = Duration::from_micros(m.rtt_us);
    // A round's pages go at the slower of the pipeline and the link, then the last
    // receipt comes back a round trip later.
    let round_time = |pages: u64, pass: &PassCost| {
        let work = pass.per_page().mul_f64(pages as f64);
        let wire = Duration::from_secs_f64(pages as f64 * pass.bytes_per_page() / link);
        work.max(wire) + rtt
    };
    let mut convergence = Convergence::new(options);
    let mut cost = PageCost::default();
    let mut throttle = 0u8;
    let mut sent = m.touched_pages;
    // Until its first link sample the engine chooses without the link's rate.
    let early = if options.compress { warm_up_pages(m, link, rtt) } else { 0 };
    let (before, after) = (&m.unmeasured_pass, &m.first_pass);
    let mut last = round_time(early, before) + round_time(sent - early, after) - rtt;
    let mut bytes = (early as f64 * before.bytes_per_page() + (sent - early) as f64 * after.bytes_per_page()) as u64;
    // Connecting and Hello/Welcome: about two round trips.
    let mut elapsed = rtt * 2 + last;
    cost.learn(last, sent, bytes);
    let mut prediction = Prediction { measured: m.clone(), ..Prediction::default() };
    for _ in 0..MAX_SIMULATED_ROUNDS {
        // The guest runs (1 - throttle) of the time.
        let running = last.mul_f64(1.0 - f64::from(throttle) / 100.0);
        let dirty = dirtied_within(&m.dirty_curve, running, m.touched_pages);
        let figures = RoundFigures {
            sent_pages: sent,
            dirty_pages: dirty,
            dirty_rate: (dirty as f64 / last.as_secs_f64().max(1e-6)) as u64,
            bandwidth: link as u64,
            transfer: cost.estimate(dirty, m.bandwidth_limit),
            floor: rtt * 2 + SWITCHOVER_OVERHEAD,
        };
        match convergence.after_round(&figures, || rtt) {
            Ok(Next::Switchover) => {
                let downtime = round_time(dirty, &m.later_pass) - rtt + figures.floor;
                prediction.converges = true;
                prediction.downtime_ms = downtime.as_millis() as u64;
                elapsed += downtime;
                bytes += (dirty as f64 * m.later_pass.bytes_per_page()) as u64;
                break;
            }
            Ok(next) => {
                if let Next::Throttle(p) = next {
                    throttle = p;
                }
                last = round_time(dirty, &m.later_pass);
                let round_bytes = (dirty as f64 * m.later_pass.bytes_per_page()) as u64;
                cost.learn(last, dirty, round_bytes);
                elapsed += last;
                bytes += round_bytes;
                sent = dirty;
            }
            Err(e) => {
                prediction.failure = Some(crate::error_chain(&e));
                break;
            }
        }
    }
    prediction.total_ms = elapsed.as_millis() as u64;
    prediction.bytes = bytes;
    prediction.rounds = convergence.rounds;
    prediction.throttle_max = convergence.throttle_max;
    prediction
}

/// Pages round 0 sends before the first sample of the link's delivery rate: what the
/// pipeline makes (or the link takes) until a backlog, a sample and a span of receipts
/// are in (`DeliveryRate`).
fn warm_up_pages(m: &Measured, link: f64, rtt: Duration) -> u64 {
    let pass = &m.unmeasured_pass;
    if pass.pages == 0 {
        return 0;
    }
    let per_page = pass.per_page().as_secs_f64().max(1e-9);
    let pages_per_s = (1.0 / per_page).min(link / pass.bytes_per_page().max(1.0));
    let wait = RATE_SPAN + rtt + Duration::from_secs_f64((RATE_BACKLOG + RATE_SAMPLE) as f64 / link);
    ((pages_per_s * wait.as_secs_f64()) as u64).min(m.touched_pages)
}

/// The options that would make a migration converge, tried one at a time.
fn advise(m: &Measured, options: &SourceOptions) -> Vec<String> {
    let mut advice = Vec::new();
    let mut try_option = |what: String, m: &Measured, o: &SourceOptions| {
        let p = simulate(m, o);
        if p.converges {
            let throttle =
                if p.throttle_max > 0 { format!(", vCPUs throttled up to {}%", p.throttle_max) } else { String::new() };
            advice.push(format!("{what}: {} ms in all, {} ms of downtime{throttle}", p.total_ms, p.downtime_ms));
        }
    };
    if !options.auto_converge {
        try_option("--auto-converge on".into(), m, &SourceOptions { auto_converge: true, ..options.clone() });
    }
    if m.bandwidth_limit != 0 && m.bandwidth_limit < m.link_bytes_per_s {
        let unlimited = Measured { bandwidth_limit: 0, ..m.clone() };
        try_option(
            format!("no --max-bandwidth (the link carries {} MiB/s)", m.link_bytes_per_s >> 20),
            &unlimited,
            options,
        );
    }
    // The shortest downtime limit that would do, in steps.
    let mut limit = options.downtime.as_millis() as u64;
    for _ in 0..12 {
        limit *= 2;
        let longer = SourceOptions { downtime: Duration::from_millis(limit), ..options.clone() };
        if simulate(m, &longer).converges {
            try_option(format!("--downtime-ms {limit}"), m, &longer);
            break;
        }
    }
    advice
}

#[cfg(test)]
mod tests;
