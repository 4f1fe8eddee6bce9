//! Which compression each batch of page data gets: none, zstd level 1 or level 3.
//!
//! Compressing pays only while it shortens the transfer. The engine compresses one batch
//! while the link carries the one before, so a batch of `n` bytes costs about
//! `max(n / speed, n * ratio / link)` compressed against `n / link` raw, where `speed` and
//! `ratio` are the level's measured figures on this VM's pages (the speed times the
//! number of shards compressing at once) and `link` the link's measured delivery rate.
//! On a fast LAN with pages zstd cannot shrink much, that is raw; on a WAN link, the
//! level that shrinks most for its speed. A level is tried now and then
//! even when not chosen, so its figures follow the pages' contents as they change.
//!
//! No clock here: the encoder measures each compression and the engine the link, and
//! they hand the figures in (`record`, `set_link_rate`).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a batch's data goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Raw,
    Zstd1,
    Zstd3,
}

impl Codec {
    /// The zstd levels, in the order of `Chooser`'s figures.
    pub const LEVELS: [Codec; 2] = [Codec::Zstd1, Codec::Zstd3];

    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Codec::Raw => None,
            Codec::Zstd1 => Some(1),
            Codec::Zstd3 => Some(3),
        }
    }

    fn index(self) -> Option<usize> {
        Codec::LEVELS.iter().position(|c| *c == self)
    }
}

/// A level is chosen only when it is this much cheaper than raw by the model: the time it
/// takes is time the engine's thread does not spend on the rest of the pipeline.
const MARGIN: f64 = 0.9;
/// A round trip up to this long is a LAN's: until it is measured, such a link is taken
/// to be faster than compression, a longer one to be slower (see `Chooser::best`).
const LAN_RTT: Duration = Duration::from_millis(2);
/// An unmeasured LAN is taken to carry this much (10 Gbit/s): a level that outruns it
/// costs less than raw on such a link (pages that shrink to almost nothing at GB/s).
const LAN_LINK: f64 = 1.25e9;
/// One level is tried on every PROBE_EVERY-th batch when the choice is another.
const PROBE_EVERY: u64 = 32;
/// Weight of a new sample in the moving averages.
const WEIGHT: f64 = 0.25;

/// A moving average that knows whether it has a sample yet.
#[derive(Debug, Default, Clone, Copy)]
struct Average(Option<f64>);

impl Average {
    fn add(&mut self, sample: f64) {
        self.0 = Some(match self.0 {
            Some(old) => old + WEIGHT * (sample - old),
            None => sample,
        });
    }
}

/// The measured figures of one zstd level on this VM's pages.
#[derive(Debug, Default, Clone, Copy)]
struct LevelFigures {
    /// Input bytes per second of compression.
    speed: Average,
    /// Output bytes per input byte (1.0 when it did not shrink).
    ratio: Average,
}

/// What each codec carried, for the migration's report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecUse {
    pub batches: u64,
    /// Page data bytes before compression, and on the stream.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The choices made over a migration, and the figures they were made from.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionReport {
    pub raw: CodecUse,
    pub zstd1: CodecUse,
    pub zstd3: CodecUse,
    /// The link's delivery rate as last measured, bytes/s (0: never measured).
    pub link_rate: u64,
    /// Each level's measured speed (input bytes/s) and ratio (per mille), 0: never tried.
    pub zstd1_speed: u64,
    pub zstd1_ratio_permille: u64,
    pub zstd3_speed: u64,
    pub zstd3_ratio_permille: u64,
}

impl CompressionReport {
    fn use_of(&mut self, codec: Codec) -> &mut CodecUse {
        match codec {
            Codec::Raw => &mut self.raw,
            Codec::Zstd1 => &mut self.zstd1,
            Codec::Zstd3 => &mut self.zstd3,
        }
    }

    /// The reports of several choosers (a migration's shards) as one: what each codec
    /// carried in all, and the figures averaged over the choosers that measured them.
    pub fn merged(reports: &[CompressionReport]) -> CompressionReport {
        let mut r = CompressionReport::default();
        let sum = |a: &mut CodecUse, b: &CodecUse| {
            a.batches += b.batches;
            a.bytes_in += b.bytes_in;
            a.bytes_out += b.bytes_out;
        };
        for one in reports {
            sum(&mut r.raw, &one.raw);
            sum(&mut r.zstd1, &one.zstd1);
            sum(&mut r.zstd3, &one.zstd3);
        }
        let mean = |figure: fn(&CompressionReport) -> u64| {
            let measured: Vec<u64> = reports.iter().map(figure).filter(|v| *v > 0).collect();
            measured.iter().sum::<u64>().checked_div(measured.len() as u64).unwrap_or(0)
        };
        r.link_rate = mean(|r| r.link_rate);
        r.zstd1_speed = mean(|r| r.zstd1_speed);
        r.zstd1_ratio_permille = mean(|r| r.zstd1_ratio_permille);
        r.zstd3_speed = mean(|r| r.zstd3_speed);
        r.zstd3_ratio_permille = mean(|r| r.zstd3_ratio_permille);
        r
    }

    /// The codec that carried most of the page data.
    pub fn main_codec(&self) -> Codec {
        let by = [(Codec::Raw, self.raw), (Codec::Zstd1, self.zstd1), (Codec::Zstd3, self.zstd3)];
        by.iter().max_by_key(|(_, u)| u.bytes_in).map_or(Codec::Raw, |(c, _)| *c)
    }
}

/// Chooses the codec of each batch.
#[derive(Debug, Default)]
pub struct Chooser {
    /// Off: every batch goes raw.
    enabled: bool,
    levels: [LevelFigures; 2],
    /// Bytes/s the link delivers, as measured; and the configured limit (0: none).
    link_rate: Average,
    limit: u64,
    rtt: Option<Duration>,
    /// Choosers compressing at once (a migration's shards), all sharing the link.
    parallel: u32,
    batches: u64,
    report: CompressionReport,
}

impl Chooser {
    /// A chooser that compresses only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Chooser { enabled, parallel: 1, ..Chooser::default() }
    }

    /// How many choosers compress at once over the same link: each level's throughput is
    /// that many times its measured speed.
    pub fn set_parallel(&mut self, choosers: u32) {
        self.parallel = choosers.max(1);
    }

    /// A measured delivery rate of the link, in bytes/s.
    pub fn add_link_sample(&mut self, bytes_per_s: f64) {
        if bytes_per_s.is_finite() && bytes_per_s > 0.0 {
            self.link_rate.add(bytes_per_s);
        }
    }

    /// The configured bandwidth limit in bytes/s (0: none): the link is no faster.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// The link's round trip (the transport's estimate).
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = Some(rtt);
    }

    /// The link's rate to decide with: the measured one, capped by the limit.
    fn link(&self) -> Option<f64> {
        let limit = (self.limit > 0).then_some(self.limit as f64);
        match (self.link_rate.0, limit) {
            (Some(m), Some(l)) => Some(m.min(l)),
            (m, l) => m.or(l),
        }
    }

    /// The codec for the next batch of `bytes` bytes of page data.
    pub fn choose(&mut self, bytes: usize) -> Codec {
        if !self.enabled || bytes <= 64 {
            return Codec::Raw;
        }
        self.batches += 1;
        // A level never tried is tried first: its figures are what the choice needs.
        if let Some(untried) = Codec::LEVELS.iter().zip(&self.levels).find(|(_, f)| f.speed.0.is_none()) {
            return *untried.0;
        }
        let best = self.best();
        if self.batches.is_multiple_of(PROBE_EVERY) {
            // Keep the other levels' figures current: probe them in turn.
            let others: Vec<Codec> = Codec::LEVELS.iter().copied().filter(|c| *c != best).collect();
            let turn = (self.batches / PROBE_EVERY) as usize % others.len().max(1);
            if let Some(probe) = others.get(turn) {
                return *probe;
            }
        }
        best
    }

    /// The cheapest codec by the figures so far.
    ///
    /// Until the link is measured (a backlog must wait for that), a short round trip says
    /// LAN, taken to be a fast one (LAN_LINK): raw, the fastest producer, which fills the
    /// link so that it gets measured, unless a level is cheaper even there. A long one says
    /// WAN, where a guess of "fast" would queue megabytes of raw pages behind a slow link:
    /// the level that shrinks most, until a measurement says more.
    fn best(&self) -> Codec {
        let Some(link) = self.link() else {
            if self.rtt.is_some_and(|rtt| rtt <= LAN_RTT) {
                return self.cheapest(LAN_LINK);
            }
            let ratio = |c: &(&Codec, &LevelFigures)| c.1.ratio.0.unwrap_or(1.0);
            let levels = Codec::LEVELS.iter().zip(&self.levels);
            return levels.min_by(|a, b| ratio(a).total_cmp(&ratio(b))).map_or(Codec::Zstd1, |(c, _)| *c);
        };
        self.cheapest(link)
    }

    /// The cheapest codec on a link of `link` bytes/s.
    fn cheapest(&self, link: f64) -> Codec {
        let mut best = (Codec::Raw, MARGIN / link);
        for (codec, f) in Codec::LEVELS.iter().zip(&self.levels) {
            let (Some(speed), Some(ratio)) = (f.speed.0, f.ratio.0) else { continue };
            let cost = (1.0 / (speed * f64::from(self.parallel))).max(ratio / link);
            if cost < best.1 {
                best = (*codec, cost);
            }
        }
        best.0
    }

    /// What a batch cost: `codec` took `cpu` to turn `bytes_in` bytes into `bytes_out`
    /// (`sent_as`: the codec it went with, Raw when compression did not shrink it).
    pub fn record(&mut self, codec: Codec, sent_as: Codec, bytes_in: usize, bytes_out: usize, cpu: Duration) {
        if let Some(i) = codec.index()
            && bytes_in > 0
        {
            let secs = cpu.as_secs_f64().max(1e-7);
            self.levels[i].speed.add(bytes_in as f64 / secs);
            self.levels[i].ratio.add((bytes_out as f64 / bytes_in as f64).min(1.0));
        }
        let used = self.report.use_of(sent_as);
        used.batches += 1;
        used.bytes_in += bytes_in as u64;
        used.bytes_out += bytes_out as u64;
    }

    pub fn report(&self) -> CompressionReport {
        let mut r = self.report.clone();
        r.link_rate = self.link_rate.0.unwrap_or(0.0) as u64;
        let figures =
            |f: &LevelFigures| (f.speed.0.unwrap_or(0.0) as u64, f.ratio.0.map_or(0, |r| (r * 1000.0).round() as u64));
        (r.zstd1_speed, r.zstd1_ratio_permille) = figures(&self.levels[0]);
        (r.zstd3_speed, r.zstd3_ratio_permille) = figures(&self.levels[1]);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;
    const BATCH: usize = 256 << 10;

    /// A chooser that has tried both levels: zstd-1 at `speed1` MiB/s and `ratio1`,
    /// zstd-3 at a third of that speed and a ratio a tenth better (none when zstd-1 has none).
    fn tried(speed1: f64, ratio1: f64) -> Chooser {
        let mut c = Chooser::new(true);
        let ratio3 = if ratio1 < 1.0 { ratio1 * 0.9 } else { 1.0 };
        for (codec, speed, ratio) in [(Codec::Zstd1, speed1, ratio1), (Codec::Zstd3, speed1 / 3.0, ratio3)] {
            assert_eq!(c.choose(BATCH), codec, "an untried level is tried first");
            let cpu = Duration::from_secs_f64(BATCH as f64 / (speed * MIB));
            c.record(codec, codec, BATCH, (BATCH as f64 * ratio) as usize, cpu);
        }
        c
    }

    /// The codecs of the next `n` batches.
    fn next(c: &mut Chooser, n: usize) -> Vec<Codec> {
        (0..n).map(|_| c.choose(BATCH)).collect()
    }

    fn mostly(choices: &[Codec], codec: Codec) -> bool {
        choices.iter().filter(|c| **c == codec).count() * 10 >= choices.len() * 9
    }

    #[test]
    fn off_means_raw_and_tiny_batches_go_raw() {
        let mut c = Chooser::new(false);
        assert!(next(&mut c, 100).iter().all(|x| *x == Codec::Raw));
        let mut c = Chooser::new(true);
        assert_eq!(c.choose(64), Codec::Raw);
    }

    #[test]
    fn a_link_faster_than_compression_gets_raw_pages() {
        // Real pages: zstd-1 at 240 MiB/s, ratio 0.6; loopback at 1 GiB/s.
        let mut c = tried(240.0, 0.6);
        c.add_link_sample(1024.0 * MIB);
        let choices = next(&mut c, 320);
        assert!(mostly(&choices, Codec::Raw), "{choices:?}");
        assert!(choices.contains(&Codec::Zstd1) && choices.contains(&Codec::Zstd3), "levels are probed now and then");
    }

    #[test]
    fn a_slow_link_gets_the_level_that_shrinks_most_for_its_speed() {
        // 30 MiB/s: zstd-3 at 80 MiB/s still outpaces the link and shrinks more.
        let mut c = tried(240.0, 0.6);
        c.add_link_sample(30.0 * MIB);
        assert!(mostly(&next(&mut c, 320), Codec::Zstd3));
        // 150 MiB/s: zstd-3 (80 MiB/s) would hold it back, zstd-1 (240 MiB/s) does not.
        let mut c = tried(240.0, 0.6);
        c.add_link_sample(150.0 * MIB);
        assert!(mostly(&next(&mut c, 320), Codec::Zstd1));
    }

    #[test]
    fn shards_compressing_at_once_make_a_level_pay_on_a_link_one_of_them_could_not_fill() {
        // zstd-1 at 240 MiB/s to 0.6 on a 300 MiB/s link: one compressor holds the link
        // back (raw), two at once outpace it and halve what it carries.
        let mut one = tried(240.0, 0.6);
        one.add_link_sample(300.0 * MIB);
        assert!(mostly(&next(&mut one, 320), Codec::Raw));
        let mut two = tried(240.0, 0.6);
        two.set_parallel(2);
        two.add_link_sample(300.0 * MIB);
        assert!(mostly(&next(&mut two, 320), Codec::Zstd1));
    }

    #[test]
    fn pages_zstd_cannot_shrink_go_raw_even_on_a_slow_link() {
        let mut c = tried(240.0, 1.0);
        c.add_link_sample(10.0 * MIB);
        assert!(mostly(&next(&mut c, 320), Codec::Raw));
    }

    #[test]
    fn an_unmeasured_link_is_a_lan_by_a_short_round_trip_and_a_wan_by_a_long_one() {
        let mut c = tried(240.0, 0.5);
        c.set_rtt(Duration::from_micros(300));
        assert!(mostly(&next(&mut c, 64), Codec::Raw), "a LAN: raw fills the link and gets it measured");
        c.set_rtt(Duration::from_millis(40));
        assert!(mostly(&next(&mut c, 64), Codec::Zstd3), "a WAN: the level that shrinks most");
        c.add_link_sample(1024.0 * MIB);
        assert!(mostly(&next(&mut c, 64), Codec::Raw), "a measurement decides");
        // The test guest's pages: zstd-1 at 6 GB/s to 0.3%, cheaper than raw on any LAN.
        let mut c = tried(6000.0, 0.003);
        c.set_rtt(Duration::from_micros(300));
        assert!(mostly(&next(&mut c, 64), Codec::Zstd1), "a level that outruns a fast LAN");
    }

    #[test]
    fn a_bandwidth_limit_caps_the_measured_link_and_stands_in_before_a_measurement() {
        let mut c = tried(240.0, 0.5);
        c.set_rtt(Duration::from_micros(300));
        assert!(mostly(&next(&mut c, 64), Codec::Raw), "an unmeasured LAN: raw fills it and gets it measured");
        c.set_limit((20.0 * MIB) as u64);
        assert!(mostly(&next(&mut c, 64), Codec::Zstd3), "the limit stands in for the link");
        c.add_link_sample(2048.0 * MIB);
        assert!(mostly(&next(&mut c, 64), Codec::Zstd3), "the limit caps a faster measurement");
    }

    #[test]
    fn the_choice_follows_the_pages_as_they_change() {
        // Compressible pages on a 100 MiB/s link: zstd-1. Then the guest fills its memory
        // with random data: the probes see it, and the choice turns to raw.
        let mut c = tried(400.0, 0.3);
        c.add_link_sample(100.0 * MIB);
        assert!(mostly(&next(&mut c, 64), Codec::Zstd1));
        let mut later = Vec::new();
        for _ in 0..2000 {
            let codec = c.choose(BATCH);
            let cpu = Duration::from_secs_f64(BATCH as f64 / (300.0 * MIB));
            // Nothing shrinks: every batch goes raw, whatever was tried.
            c.record(codec, Codec::Raw, BATCH, BATCH, cpu);
            later.push(codec);
        }
        assert!(mostly(&later[1000..], Codec::Raw), "{:?}", &later[1000..1100]);
    }

    #[test]
    fn the_report_counts_what_each_codec_carried_and_the_figures_behind_it() {
        let mut c = tried(240.0, 0.5);
        c.add_link_sample(100.0 * MIB);
        c.record(Codec::Raw, Codec::Raw, 1000, 1000, Duration::ZERO);
        c.record(Codec::Zstd1, Codec::Raw, BATCH, BATCH, Duration::from_millis(1));
        let r = c.report();
        assert_eq!((r.zstd1.batches, r.zstd3.batches, r.raw.batches), (1, 1, 2), "by the codec each went with");
        assert_eq!(r.zstd1.bytes_in, BATCH as u64);
        assert_eq!(r.zstd1.bytes_out, (BATCH / 2) as u64);
        assert_eq!(r.raw.bytes_in, 1000 + BATCH as u64);
        // The failed attempt moved zstd-1's averages: ratio 0.5 to 1.0, a quarter of the way.
        assert_eq!(r.zstd1_ratio_permille, 625);
        assert_eq!(r.zstd3_ratio_permille, 450);
        assert_eq!(r.link_rate, (100.0 * MIB) as u64);
        assert_eq!(r.main_codec(), Codec::Raw);
    }
}
