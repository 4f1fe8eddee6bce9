//! Rate limiter accuracy, through a real virtio-blk device model: 4 KiB reads are kept
//! queued while the device's limiter lets them through, waking on its timer fd exactly as
//! the VMM's event loop does. The measured steady rate (after the bucket's initial fill is
//! spent) is compared with the configured one, before and after a live `set-limit`.
//!
//!     cargo bench -p novacron-benches --bench limiter

use novacron_benches::rig::{Rig, event_fd, rig, tmpfs_image};
use novacron_devices::rate_limiter::{BucketUpdate, RateLimiterConfig, TokenBucketConfig};
use novacron_devices::virtio::LimitTarget;
use novacron_devices::virtio::block::{Block, BlockConfig};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const REQUEST: u32 = 4096;
const OUTSTANDING: u64 = 64;
const PHASE: Duration = Duration::from_secs(3);

/// Keeps the queue full for `phase`; returns (requests, seconds) counted from the first
/// time the limiter held requests back (the initial bucket spent) to the end.
fn run(r: &mut Rig, phase: Duration) -> (u64, f64) {
    let limiter_fd = r.t.device().event_sources()[0].fd;
    let start = Instant::now();
    let (mut posted, mut done, mut steady): (u64, u64, Option<(Instant, u64)>) = (0, 0, None);
    while start.elapsed() < phase {
        while posted - done < OUTSTANDING {
            let at = 0x100000 + (posted % OUTSTANDING) * 0x2000;
            r.queues[0].add_chain(&r.mem, &[(at, 16, false), (at + 0x1000, REQUEST, true), (at + 16, 1, true)]);
            posted += 1;
        }
        r.t.device_mut().process_queue(0);
        while r.queues[0].next_used(&r.mem).is_some() {
            done += 1;
        }
        if posted - done == OUTSTANDING {
            // Held back: from here on the bucket's refill rate governs.
            steady.get_or_insert((Instant::now(), done));
            let mut pfd = libc::pollfd { fd: limiter_fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: polls one fd we own for up to 100 ms, with a live pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            if pfd.revents & libc::POLLIN != 0 {
                r.t.device_mut().handle_event(0);
            }
        }
    }
    let (since, base) = steady.unwrap_or((start, 0));
    (done - base, since.elapsed().as_secs_f64())
}

fn report(what: &str, configured: f64, unit: &str, measured: f64) {
    let ratio = measured / configured;
    let verdict = if (ratio - 1.0).abs() <= 0.05 { "within 5%" } else { "OUTSIDE 5%" };
    println!(
        "{what:<44} configured {configured:>10.0} {unit}  measured {measured:>10.0} {unit}  ratio {ratio:.3} ({verdict})"
    );
}

fn main() {
    let path = tmpfs_image("limiter", 64 << 20);
    let bucket = |size| TokenBucketConfig { size, one_time_burst: 0, refill_time_ms: 1000 };
    println!(
        "Rate limiter accuracy: virtio-blk model, 4 KiB reads, {OUTSTANDING} outstanding, {} s per phase",
        PHASE.as_secs()
    );

    // Bandwidth: 8 MiB/s, then changed live to 2 MiB/s.
    let limits = RateLimiterConfig { bandwidth: Some(bucket(8 << 20)), ops: None };
    let config = BlockConfig { path: path.clone(), read_only: false, id: None, limits };
    let mut r = rig(Box::new(Block::new("disk0", &config, event_fd()).expect("block")), 0, 1, 256);
    prepare_headers(&r);
    let (n, secs) = run(&mut r, PHASE);
    report("bandwidth 8 MiB/s", (8 << 20) as f64, "B/s", n as f64 * f64::from(REQUEST) / secs);
    r.t.device_mut()
        .set_rate_limits(LimitTarget::Device, BucketUpdate::Update(bucket(2 << 20)), BucketUpdate::None)
        .expect("set-limit");
    let (n, secs) = run(&mut r, PHASE);
    report("bandwidth after set-limit to 2 MiB/s", (2 << 20) as f64, "B/s", n as f64 * f64::from(REQUEST) / secs);

    // Operations: 2000 requests/s.
    let limits = RateLimiterConfig { bandwidth: None, ops: Some(bucket(2000)) };
    let config = BlockConfig { path: path.clone(), read_only: false, id: None, limits };
    let mut r = rig(Box::new(Block::new("disk1", &config, event_fd()).expect("block")), 0, 1, 256);
    prepare_headers(&r);
    let (n, secs) = run(&mut r, PHASE);
    report("operations 2000/s", 2000.0, "op/s", n as f64 / secs);
    let _ = std::fs::remove_file(path);
}

/// Read requests (type 0) for sector i*8, one per outstanding slot.
fn prepare_headers(r: &Rig) {
    for i in 0..OUTSTANDING {
        let at = 0x100000 + i * 0x2000;
        r.mem.write_slice(&[0u8; 8], GuestAddress(at)).expect("header");
        r.mem.write_obj(i * 8, GuestAddress(at + 8)).expect("sector");
    }
}
