//! The prediction model on measured figures made up for each case.

use super::*;

/// A 512 MiB VM with 256 MiB touched; pages at 1 µs and 100 bytes each; a 1 GB/s link
/// with a 100 µs round trip; a guest that writes `rate` distinct pages/s.
fn measured(rate: u64) -> Measured {
    let pass = PassCost { pages: 1000, bytes: 100_000, source_us: 1000, destination_us: 500 };
    Measured {
        transport: Transport::Tcp,
        rtt_us: 100,
        link_bytes_per_s: 1_000_000_000,
        bandwidth_limit: 0,
        pages: 131_072,
        touched_pages: 65_536,
        dirty_curve: DIRTY_STEPS_MS.iter().map(|&ms| (ms, rate * ms / 1000)).collect(),
        first_pass: pass,
        later_pass: pass,
        unmeasured_pass: PassCost::default(),
    }
}

fn options(auto_converge: bool) -> SourceOptions {
    SourceOptions { auto_converge, ..SourceOptions::default() }
}

#[test]
fn the_dirty_curve_is_interpolated_then_extended_at_its_last_rate_up_to_all_pages() {
    let curve = [(100, 1000), (200, 1500), (400, 2500)];
    assert_eq!(dirtied_within(&curve, Duration::from_millis(50), 10_000), 500);
    assert_eq!(dirtied_within(&curve, Duration::from_millis(150), 10_000), 1250);
    // Past the window at the last step's 5 pages/ms.
    assert_eq!(dirtied_within(&curve, Duration::from_millis(600), 10_000), 3500);
    assert_eq!(dirtied_within(&curve, Duration::from_secs(60), 10_000), 10_000);
    assert_eq!(dirtied_within(&[], Duration::from_secs(1), 10_000), 0, "no curve: an idle guest");
}

#[test]
fn an_idle_vm_is_predicted_to_move_in_its_first_round_at_the_pipelines_pace() {
    let p = predict(&measured(0), &options(true));

    assert!(p.converges && p.failure.is_none() && p.advice.is_empty(), "{p:?}");
    // 65,536 pages at 1 µs (the source is the slower end; the link takes 6.6 ms), four
    // round trips: 66 ms; then a switchover of nothing but its floor.
    assert_eq!(p.total_ms, 65 + 6);
    assert_eq!(p.downtime_ms, 5);
    assert_eq!(p.bytes, 6_553_600);
    assert_eq!((p.rounds, p.throttle_max), (1, 0));
}

#[test]
fn a_slow_link_bounds_the_rounds_and_the_limit_is_what_the_advice_lifts() {
    let mut m = measured(2000);
    m.later_pass = PassCost { bytes: 4_100_000, ..m.first_pass };
    m.bandwidth_limit = 4_000_000;
    let p = predict(&m, &options(false));

    // Round 0: 6.5 MB at 4 MB/s, 1.6 s, dirtying 3,300 pages that take 3.4 s at 4,100
    // bytes each: the rounds grow and the engine gives up without auto-converge.
    assert!(!p.converges, "{p:?}");
    assert!(p.failure.as_deref().is_some_and(|f| f.contains("does not converge")), "{p:?}");
    assert!(
        p.advice.iter().any(|a| a.starts_with("no --max-bandwidth (the link carries 953 MiB/s)")),
        "{:?}",
        p.advice
    );
    assert!(p.advice.iter().any(|a| a.starts_with("--auto-converge on")), "{:?}", p.advice);
}

#[test]
fn auto_converge_is_predicted_to_throttle_a_guest_that_outruns_the_link() {
    let mut m = measured(20_000);
    m.later_pass = PassCost { bytes: 4_100_000, ..m.first_pass };
    m.bandwidth_limit = 32 << 20;

    let without = predict(&m, &options(false));
    let with = predict(&m, &options(true));

    assert!(!without.converges && without.advice.iter().any(|a| a.contains("--auto-converge on")), "{without:?}");
    assert!(with.converges, "{with:?}");
    assert!(with.throttle_max >= 20, "{with:?}");
    assert!(with.downtime_ms <= 50, "{with:?}");
    // Round 0 alone takes 6.5 MB at 32 MiB/s: 195 ms; then throttled rounds.
    assert!(with.rounds > 2 && with.total_ms > 195, "{with:?}");
}

#[test]
fn round_trips_longer_than_the_downtime_limit_are_predicted_with_the_engines_words() {
    let mut m = measured(100);
    m.rtt_us = 40_000;
    let p = predict(&m, &options(true));

    assert!(!p.converges, "{p:?}");
    assert!(p.failure.as_deref().is_some_and(|f| f.contains("round trip to the destination takes 40000 µs")), "{p:?}");
    assert!(p.advice.iter().any(|a| a.starts_with("--downtime-ms 100")), "{:?}", p.advice);
}

#[test]
fn the_sample_is_runs_of_a_batch_spread_over_all_the_pages() {
    // Ten runs of a batch, three wanted: every fourth run.
    let pages = stride(0..2560, 2560, 3 * 256);
    assert_eq!(pages.len(), 3 * 256);
    assert_eq!((pages[0], pages[255], pages[256], pages[512]), (0, 255, 1024, 2048));
    assert_eq!(stride(0..3, 3, 10), vec![0, 1, 2]);
    assert_eq!(stride(0..0, 0, 10), Vec::<u64>::new());
}

#[test]
fn round_0_is_predicted_as_the_engine_sends_it_until_it_has_measured_the_link() {
    let mut m = measured(0);
    // Raw: 0.5 µs and 4,100 bytes a page, 240,000 pages/s at 1 GB/s: the link bounds it.
    m.unmeasured_pass = PassCost { pages: 1000, bytes: 4_100_000, source_us: 500, destination_us: 200 };
    let p = predict(&m, &options(true));

    // The first sample waits 5 ms, a round trip and 2 MiB: 7.197 ms at 243,902 pages/s.
    let raw = 1755;
    assert_eq!(p.bytes, raw * 4100 + (65_536 - raw) * 100);
    let without = predict(&m, &SourceOptions { compress: false, ..options(true) });
    assert_eq!(without.bytes, 65_536 * 100, "nothing compresses: the first pass is the raw pass then");
}
