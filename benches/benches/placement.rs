//! The ClusterSupervisor's placement decisions (`novacron_actors::placement`), on one core:
//!
//! - `place` over 100 simulated hosts (four sizes, three zones) holding 1,000 VMs that were
//!   placed and committed through the same code first (mixed sizes; a quarter of them
//!   replicas of 3-VM services with anti-affinity, a fifth pinned to a zone, some
//!   preferring their service's hosts), with the spread and the binpack strategy;
//! - a whole run: 1,000 VMs placed and committed one by one onto 100 empty hosts.
//!
//!     cargo bench -p novacron-benches --bench placement [-- FILTER]
//!
//! After criterion's own lines, a summary prints decisions per second against the issue's
//! target of 10,000 (means over every timed iteration, warm-up included).

use criterion::Criterion;
use novacron_actors::Capacity;
use novacron_actors::placement::{Placement, PlacementRequest, Policy, Strategy};
use novacron_benches::tally;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

const HOSTS: u32 = 100;
const VMS: u32 = 1000;
/// Decisions per second the issue asks for.
const TARGET: f64 = 10_000.0;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// 100 hosts: 8, 16, 32 or 64 CPUs with 4 GiB per CPU, zones a, b and c in turn.
fn empty_cluster(strategy: Strategy) -> Placement {
    let policy = Policy { strategy, ..Policy::default() };
    let mut p = Placement::new(policy).expect("policy");
    for i in 0..HOSTS {
        let cpus = [8, 16, 32, 64][(splitmix(u64::from(i)) % 4) as usize];
        let labels = BTreeMap::from([("zone".to_string(), ["a", "b", "c"][(i % 3) as usize].to_string())]);
        p.add_host(format!("host-{i:03}"), Capacity { vcpus: cpus, mem_mib: u64::from(cpus) * 4096 }, labels)
            .expect("host");
    }
    p
}

/// VM number `i` of a workload (`salt` picks another workload of the same mix).
fn request(i: u32, salt: u64) -> PlacementRequest {
    let x = splitmix(u64::from(i) ^ (salt << 32));
    let vcpus = [1, 1, 2, 2, 4, 8][(x % 6) as usize];
    let mem_mib = u64::from(vcpus) * [1024, 2048, 4096][((x >> 8) % 3) as usize];
    let mut req = PlacementRequest::new(format!("vm-{salt}-{i:04}"), vcpus, mem_mib);
    // A quarter are replicas of 3-VM services that must not share a host.
    if i.is_multiple_of(4) {
        let service = format!("app=svc-{}-{}", salt, i / 12);
        req = req.group(service.clone()).anti_affinity(service);
    }
    if i.is_multiple_of(5) {
        req = req.label("zone", ["a", "b", "c"][((x >> 16) % 3) as usize]);
    }
    // Some like to sit next to a service (a cache beside its database).
    if i.is_multiple_of(7) {
        req = req.prefer(format!("app=svc-{}-{}", salt, (x >> 24) % u64::from(VMS / 12)));
    }
    req
}

/// Places and commits `VMS` VMs; returns how many found no host.
fn fill(p: &mut Placement, salt: u64) -> u32 {
    let mut refused = 0;
    for i in 0..VMS {
        let req = request(i, salt);
        match p.place(&req) {
            Ok(host) => p.commit(host, &req).expect("commit"),
            Err(_) => refused += 1,
        }
    }
    refused
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    // Fresh workloads (another salt): same mix, new names and services, never committed.
    let probes: Vec<PlacementRequest> = (0..256).map(|i| request(i, 1)).collect();
    for (name, strategy) in [
        ("place, 100 hosts / 1,000 VMs, spread", Strategy::Spread),
        ("place, 100 hosts / 1,000 VMs, binpack", Strategy::Binpack),
    ] {
        let mut p = empty_cluster(strategy);
        let refused = fill(&mut p, 0);
        let (used, limit) =
            p.hosts().fold((0u64, 0u64), |(u, l), (_, h)| (u + h.allocated().mem_mib, l + h.limit().mem_mib));
        let placed = probes.iter().filter(|r| p.place(r).is_ok()).count();
        println!(
            "{name}: {} VMs committed ({refused} refused), memory {:.0}% used; {placed} of {} probes fit",
            VMS - refused,
            100.0 * used as f64 / limit as f64,
            probes.len()
        );
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for k in 0..iters {
                    let _ = black_box(p.place(black_box(&probes[(k % probes.len() as u64) as usize])));
                }
                let t = start.elapsed();
                tally::record(name, iters, t);
                t
            })
        });
    }

    let name = "place + commit 1,000 VMs onto 100 empty hosts, spread";
    let empty = empty_cluster(Strategy::Spread);
    g.sample_size(20);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut p = empty.clone();
                let start = Instant::now();
                black_box(fill(&mut p, 0));
                total += start.elapsed();
            }
            tally::record(name, iters * u64::from(VMS), total);
            total
        })
    });
    g.finish();
}

fn summary() {
    let rates = tally::rates();
    if rates.is_empty() {
        return;
    }
    println!("\nSummary (means over every timed iteration, one core; target >= {TARGET:.0} decisions/s):");
    for (name, rate) in rates {
        let verdict = if rate >= TARGET { "met" } else { "NOT met" };
        println!(
            "  {name:<56} {:>12.0} decisions/s  {:>8.2} us each  {:>7.0}x target ({verdict})",
            rate,
            1e6 / rate,
            rate / TARGET
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
