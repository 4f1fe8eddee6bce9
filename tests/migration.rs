//! Live migration between two real VMM processes over real QUIC on loopback, with the
//! test guest running its memory workload: the destination's guest goes on where the
//! source's stopped and verifies its memory; cancels, crashes, bad certificates and bad
//! bytes leave the source running; the bandwidth limit holds; a workload that outruns the
//! link either makes the migration give up or gets throttled until it converges.

mod common;

use common::vmm::{OUTRUN, migrate, migrate_cmd, receiver, report, source};
use common::{Host, SLOW, TIMEOUT, assert_moved, assert_source_runs, certs, novacron, stderr, wait_until_going};
use novacron_guest_image::watch::kvm_or_skip;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// The destination discarded everything: it ended with status 1 and its guest never ran.
fn assert_discarded(dst: &mut Host, needle: &str) {
    let (status, err) = dst.vm.wait_exit(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
    assert!(dst.vm.seen.is_empty(), "the guest ran at the destination: {:?}", dst.vm.seen);
}

/// `transport`: `--transport`'s value; on loopback `auto` is TLS over TCP. `more` goes to
/// `vmm migrate`, `receiving` to `vmm receive`.
fn moves_and_verifies(
    vcpus: u8,
    cmdline: &str,
    transport: &str,
    more: &[&str],
    receiving: &[&str],
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let src = source(dir.path(), vcpus, 256, cmdline);
    let (mut dst, addr) = receiver(dir.path(), &tls, receiving);
    let args: Vec<&str> = ["--transport", transport].iter().chain(more).copied().collect();
    let out = migrate(&src, &addr, &tls, &args);
    let r = report(&out);
    assert_moved(src, &mut dst);
    assert_eq!(r["digests_matched"], true, "{r}");
    assert!(r["downtime_us"].as_u64().unwrap() > 0, "{r}");
    // Only the working set and the guest's own pages travel, never untouched memory.
    assert!(r["bytes_sent"].as_u64().unwrap() < 64 << 20, "{r}");
    r
}

#[test]
fn kvm_migrate_1_vcpu_idle_continues_and_verifies() {
    if kvm_or_skip("kvm_migrate_1_vcpu_idle_continues_and_verifies") {
        // One worker at each end.
        let one = ["--workers", "1"];
        let r = moves_and_verifies(1, "ws=16 rate=50 verify=300 hb=100", "auto", &one, &one);
        assert_eq!(r["transport"], "tcp", "auto on loopback: {r}");
        assert_eq!(r["workers"], 1, "{r}");
        assert_eq!(r["lanes"], 0, "TLS over TCP has one stream: {r}");
    }
}

#[test]
fn kvm_migrate_over_tls_over_tcp_continues_and_verifies() {
    if kvm_or_skip("kvm_migrate_over_tls_over_tcp_continues_and_verifies") {
        let r = moves_and_verifies(1, "ws=16 rate=50 verify=300 hb=100", "tcp", &[], &[]);
        assert_eq!(r["transport"], "tcp", "{r}");
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(r["workers"], cores, "one worker per core by default: {r}");
        assert!(r["wire_bytes"].as_u64().unwrap() > r["bytes_sent"].as_u64().unwrap(), "TLS adds bytes: {r}");
    }
}

#[test]
fn kvm_migrate_4_vcpus_high_dirty_rate_continues_and_verifies() {
    if kvm_or_skip("kvm_migrate_4_vcpus_high_dirty_rate_continues_and_verifies") {
        // More workers than cores: three shards of memory, each on its own thread, and
        // each shard's batches on a QUIC stream of its own.
        let r = moves_and_verifies(4, "ws=64 rate=20000 verify=300 hb=100", "quic", &["--workers", "3"], &[]);
        assert_eq!(r["transport"], "quic", "{r}");
        assert_eq!(r["workers"], 3, "{r}");
        assert_eq!(r["lanes"], 3, "{r}");
        let p = &r["pages"];
        assert!(p["delta"].as_u64().unwrap() + p["unchanged"].as_u64().unwrap() > 0, "re-sent pages: {r}");
    }
}

/// A source, a receiver and a slow migration between them that has sent something.
fn midway() -> (tempfile::TempDir, Host, Host, Child) {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let src = source(dir.path(), 2, 256, "ws=16 rate=500 verify=300 hb=100");
    let (dst, addr) = receiver(dir.path(), &tls, &[]);
    let child = slow_migration(&src, &addr, &tls);
    (dir, src, dst, child)
}

/// Starts a slow migration and waits until it has sent something.
fn slow_migration(src: &Host, addr: &str, tls: &Path) -> Child {
    wait_until_going(src, migrate_cmd(src, addr, tls, &SLOW).spawn().unwrap(), || true)
}

#[test]
fn kvm_migrate_cancel_midway_keeps_the_source() {
    if !kvm_or_skip("kvm_migrate_cancel_midway_keeps_the_source") {
        return;
    }
    let (_dir, mut src, mut dst, child) = midway();
    let cancel = novacron().args(["vmm", "migrate-cancel"]).arg("--api-sock").arg(&src.sock).output().unwrap();
    let out = child.wait_with_output().unwrap();

    assert!(cancel.status.success(), "{}", stderr(&cancel));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cancelled"), "{}", stderr(&out));
    assert_source_runs(&mut src);
    assert_discarded(&mut dst, "aborted");
}

#[test]
fn kvm_migrate_destination_killed_midway_keeps_the_source() {
    if !kvm_or_skip("kvm_migrate_destination_killed_midway_keeps_the_source") {
        return;
    }
    let (_dir, mut src, mut dst, child) = midway();
    dst.vm.child.kill().unwrap();
    let out = child.wait_with_output().unwrap();

    assert!(!out.status.success());
    assert!(stderr(&out).contains("the migration failed"), "{}", stderr(&out));
    assert_source_runs(&mut src);
}

#[test]
fn kvm_migrate_source_killed_midway_leaves_no_half_vm() {
    if !kvm_or_skip("kvm_migrate_source_killed_midway_leaves_no_half_vm") {
        return;
    }
    let (_dir, mut src, mut dst, child) = midway();
    src.vm.child.kill().unwrap();
    let out = child.wait_with_output().unwrap();

    assert!(!out.status.success());
    assert_discarded(&mut dst, "nothing runs here");
}

#[test]
fn kvm_migrate_refuses_a_peer_from_another_cluster_then_takes_the_right_one() {
    if !kvm_or_skip("kvm_migrate_refuses_a_peer_from_another_cluster_then_takes_the_right_one") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let other = certs(dir.path(), "other");
    let mut src = source(dir.path(), 1, 128, "ws=8 rate=200 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let refused = migrate(&src, &addr, &other, &[]);

    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("certificate"), "{}", stderr(&refused));
    assert_source_runs(&mut src);
    assert!(dst.vm.seen.is_empty());
    let r = report(&migrate(&src, &addr, &tls, &[]));
    assert_eq!(r["digests_matched"], true);
    assert_moved(src, &mut dst);
}

fn refused_with_fault(fault: &[&str], source_says: &str, destination_says: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 1, 128, "ws=8 rate=500 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let out = migrate(&src, &addr, &tls, fault);

    assert!(!out.status.success());
    assert!(stderr(&out).contains(source_says), "{source_says:?} not in {}", stderr(&out));
    assert_source_runs(&mut src);
    assert_discarded(&mut dst, destination_says);
}

#[test]
fn kvm_migrate_flipped_page_byte_is_caught_by_the_digest() {
    if kvm_or_skip("kvm_migrate_flipped_page_byte_is_caught_by_the_digest") {
        refused_with_fault(&["--fault", "flip-page"], "memory digest mismatch", "memory digest mismatch");
    }
}

#[test]
fn kvm_migrate_flipped_state_byte_is_refused() {
    if kvm_or_skip("kvm_migrate_flipped_state_byte_is_refused") {
        refused_with_fault(&["--fault", "flip-state"], "state digest mismatch", "state digest mismatch");
    }
}

#[test]
fn kvm_migrate_truncated_stream_is_refused() {
    if kvm_or_skip("kvm_migrate_truncated_stream_is_refused") {
        refused_with_fault(&["--fault-truncate-after", "20000"], "the migration failed", "truncated");
    }
}

#[test]
fn kvm_migrate_bandwidth_limit_holds_and_can_change() {
    if !kvm_or_skip("kvm_migrate_bandwidth_limit_holds_and_can_change") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    // 8 MiB of working set, sent whole: about 4 s at 2 MB/s.
    let src = source(dir.path(), 1, 128, "ws=8 rate=100 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let r = report(&migrate(&src, &addr, &tls, &["--max-bandwidth", "2M", "--compress", "none"]));
    let rate = r["bytes_sent"].as_f64().unwrap() / (r["total_ms"].as_f64().unwrap() / 1000.0);
    assert!((rate / 2e6 - 1.0).abs() < 0.10, "average {rate:.0} bytes/s for a 2 MB/s limit: {r}");
    let c = &r["compression"];
    assert!(c["raw"]["batches"].as_u64().unwrap() > 0, "{c}");
    assert_eq!((c["zstd1"]["batches"].as_u64(), c["zstd3"]["batches"].as_u64()), (Some(0), Some(0)), "off: {c}");
    assert_moved(src, &mut dst);

    // Back the other way, starting at 1 MB/s (8 s) and raised to 50 MB/s after a second.
    let dir2 = tempfile::tempdir().unwrap();
    let src = Host { vm: dst.vm, sock: dst.sock };
    let (mut back, addr) = receiver(dir2.path(), &tls, &[]);
    let started = Instant::now();
    let child = migrate_cmd(&src, &addr, &tls, &["--max-bandwidth", "1M", "--compress", "none"]).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let set = novacron()
        .args(["vmm", "migrate-set", "--max-bandwidth", "50M"])
        .arg("--api-sock")
        .arg(&src.sock)
        .output()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(set.status.success(), "{}", stderr(&set));
    report(&out);
    assert!(started.elapsed() < Duration::from_secs(5), "the raised limit did not apply: {:?}", started.elapsed());
    assert_moved(src, &mut back);
}

#[test]
fn kvm_migrate_over_a_slow_link_compresses_and_the_report_says_how() {
    if !kvm_or_skip("kvm_migrate_over_a_slow_link_compresses_and_the_report_says_how") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let src = source(dir.path(), 1, 128, "ws=8 rate=100 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    // The test guest's pages hold a few words each: zstd shrinks them far faster than
    // 2 MB/s carries them, so the batches go compressed.
    let r = report(&migrate(&src, &addr, &tls, &["--max-bandwidth", "2M"]));
    assert_moved(src, &mut dst);
    let c = &r["compression"];
    let carried = |codec: &str, field: &str| c[codec][field].as_u64().unwrap();
    let zstd_in = carried("zstd1", "bytes_in") + carried("zstd3", "bytes_in");
    assert!(zstd_in > 4 * carried("raw", "bytes_in"), "a slow link gets compressed pages: {c}");
    assert!(carried("zstd3", "bytes_out") < carried("zstd3", "bytes_in") / 4, "{c}");
    assert!(c["zstd1_speed"].as_u64().unwrap() > 2_000_000 && c["zstd3_speed"].as_u64().unwrap() > 0, "{c}");
    assert!(r["bytes_sent"].as_u64().unwrap() < 4 << 20, "8 MiB of working set sent in under 4 MiB: {r}");
}

#[test]
fn kvm_migrate_that_cannot_converge_gives_up_and_the_source_runs_on() {
    if !kvm_or_skip("kvm_migrate_that_cannot_converge_gives_up_and_the_source_runs_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 2, 128, "ws=4 rate=2000 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let out = migrate(&src, &addr, &tls, &OUTRUN);

    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr(&out).contains("does not converge"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--auto-converge"), "the message says what would help: {}", stderr(&out));
    assert_source_runs(&mut src);
    assert_discarded(&mut dst, "does not converge");
}

#[test]
fn kvm_migrate_auto_converge_throttles_a_busy_guest_until_it_converges() {
    if !kvm_or_skip("kvm_migrate_auto_converge_throttles_a_busy_guest_until_it_converges") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    // Dirties pages as fast as its vCPUs can: far more than 100 kB/s carries, even as deltas.
    let src = source(dir.path(), 2, 128, "ws=16 rate=1000000 verify=1000 hb=200");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);
    let r = report(&migrate(&src, &addr, &tls, &["--max-bandwidth", "100k", "--downtime-ms", "20"]));

    assert!(r["throttle_max"].as_u64().unwrap() >= 20, "auto-converge throttled the vCPUs: {r}");
    assert_eq!(r["digests_matched"], true);
    assert_moved(src, &mut dst);
}

/// Pages sent uncompressed.
const RAW: [&str; 2] = ["--compress", "none"];

/// `vmm migrate --dry-run --json`'s prediction.
fn dry_run(src: &Host, addr: &str, tls: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = migrate(src, addr, tls, &[&["--dry-run"], extra].concat());
    (out.status.code(), common::vmm::json_report(&out))
}

#[test]
fn kvm_dry_run_predicts_from_what_it_measured_and_the_receiver_then_takes_the_migration() {
    if !kvm_or_skip("kvm_dry_run_predicts_from_what_it_measured_and_the_receiver_then_takes_the_migration") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 1, 256, "ws=16 rate=500 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);

    // Raw pages both times: whether zstd pays depends on how busy the host is, and the
    // bytes are compared below.
    let (code, p) = dry_run(&src, &addr, &tls, &RAW);

    assert_eq!(code, Some(0), "{p}");
    assert_eq!(p["converges"], true, "{p}");
    let m = &p["measured"];
    assert_eq!(m["pages"], 65536, "{m}");
    // The 16 MiB working set and the guest's own pages are touched; most memory is not.
    let touched = m["touched_pages"].as_u64().unwrap();
    assert!((4096..32768).contains(&touched), "{m}");
    let (_, dirtied) = (m["dirty_curve"][5][0].as_u64().unwrap(), m["dirty_curve"][5][1].as_u64().unwrap());
    assert!(dirtied >= 50, "500 pages/s over 400 ms are in the curve: {m}");
    assert!(m["link_bytes_per_s"].as_u64().unwrap() > 0 && m["first_pass"]["pages"].as_u64().unwrap() > 0, "{m}");
    assert!(p["total_ms"].as_u64().unwrap() > 0 && p["bytes"].as_u64().unwrap() > 0, "{p}");
    // Nothing moved: the guest runs on here, and the receiver waits for the migration.
    assert_source_runs(&mut src);
    assert!(dst.vm.child.try_wait().unwrap().is_none(), "the receiver ended after the dry run");
    let r = report(&migrate(&src, &addr, &tls, &RAW));
    assert_moved(src, &mut dst);
    // Bytes, not speed: within a factor of two of what the migration then sent.
    let (predicted, sent) = (p["bytes"].as_u64().unwrap() as f64, r["bytes_sent"].as_u64().unwrap() as f64);
    assert!(predicted / sent > 0.5 && predicted / sent < 2.0, "predicted {predicted} bytes, sent {sent}");
}

#[test]
fn kvm_dry_run_says_when_a_migration_would_not_converge_and_what_would_make_it() {
    if !kvm_or_skip("kvm_dry_run_says_when_a_migration_would_not_converge_and_what_would_make_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path(), "tls");
    let mut src = source(dir.path(), 2, 128, "ws=4 rate=2000 verify=300 hb=100");
    let (mut dst, addr) = receiver(dir.path(), &tls, &[]);

    let (code, p) = dry_run(&src, &addr, &tls, &OUTRUN);

    assert_eq!(code, Some(4), "{p}");
    assert_eq!(p["converges"], false, "{p}");
    assert!(p["failure"].as_str().unwrap().contains("does not converge"), "{p}");
    let advice: Vec<&str> = p["advice"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(advice.iter().any(|a| a.starts_with("--auto-converge on")), "{advice:?}");
    assert!(advice.iter().any(|a| a.starts_with("no --max-bandwidth")), "{advice:?}");
    assert_eq!(p["measured"]["bandwidth_limit"], 2_000_000, "{p}");
    assert_source_runs(&mut src);
    assert!(dst.vm.child.try_wait().unwrap().is_none(), "the receiver ended after the dry run");
}
