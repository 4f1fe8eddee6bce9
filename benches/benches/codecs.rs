//! The migration's per-page work and what carries it, one core each unless it says
//! workers:
//!
//! - page codecs: zero detection, the page hash, zstd levels 1 and 3 on batches of 256
//!   pages, word-level deltas (encode and apply);
//! - the whole per-page pipeline the source runs in a round (read the page out of guest
//!   memory, hash, zero check, duplicate lookup, delta against the cache or whole, the
//!   memory digest, batch, the compression chosen per batch, frame), in GB/s of guest
//!   memory, on one worker and on every core (the engine's sharded encoder);
//! - the destination's page writer (decompress, check, write, hash) on the encoder's
//!   batches, on one worker and on every core;
//! - harvesting dirty pages for 1 GiB of guest memory: KVM's dirty log (a real KVM VM, no
//!   vCPU) and the VMM's own bitmap;
//! - the migration's link on loopback, both transports (QUIC with quinn, and TLS 1.3 over
//!   TCP; mutual TLS, the real `Link` of each) against plain TCP with the same frames, in
//!   the same run.
//!
//!     cargo bench -p novacron-benches --bench codecs [-- FILTER]
//!
//! After criterion's own lines, a summary prints the pipeline against its target and the
//! QUIC/TCP and TLS-over-TCP/TCP ratios (means over every timed iteration, warm-up
//! included).

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use novacron_benches::contents::{random_page, splitmix, text_page};
use novacron_benches::tally;
use novacron_migration::destination::{GuestPages, PageWriter};
use novacron_migration::dirty::DirtySet;
use novacron_migration::encoder::{self, PageEncoder};
use novacron_migration::page::{self, PAGE_SIZE};
use novacron_migration::protocol::{self, BATCH_PAGES, BatchBuilder, Message, PageBatch};
use novacron_vmm::vstate::memory::{self, GuestMemory};
use std::hint::black_box;
use std::time::{Duration, Instant};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------
// Page contents

/// A page as the test guest's workload leaves it: zeroes, but for a value derived from
/// the page number and its generation in the first and last word.
fn guest_page(page: u64, generation: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    let v = splitmix(page ^ (generation << 40)).to_le_bytes();
    p[..8].copy_from_slice(&v);
    p[PAGE_SIZE - 8..].copy_from_slice(&v);
    p
}

/// `page` with `words` of its 512 words changed, spread over the page.
fn changed(page: &[u8], words: usize, salt: u64) -> Vec<u8> {
    let mut p = page.to_vec();
    for k in 0..words {
        let w = (k * 509 / words.max(1) + 3) % (PAGE_SIZE / 8);
        let v = splitmix(salt + k as u64).to_le_bytes();
        p[w * 8..w * 8 + 8].copy_from_slice(&v);
    }
    p
}

// ---------------------------------------------------------------------------------------
// Codecs

fn codecs(c: &mut Criterion) {
    let zero = vec![0u8; PAGE_SIZE];
    let mut last_byte = vec![0u8; PAGE_SIZE];
    last_byte[PAGE_SIZE - 1] = 1;
    let guest = guest_page(7, 3);
    let text = text_page(7);

    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("is_zero, zero page", |b| b.iter(|| page::is_zero(black_box(&zero))));
    g.bench_function("is_zero, only the last byte set", |b| b.iter(|| page::is_zero(black_box(&last_byte))));
    g.bench_function("is_zero, test-guest page (first word set)", |b| b.iter(|| page::is_zero(black_box(&guest))));
    g.bench_function("hash (BLAKE3-128), text page", |b| b.iter(|| page::hash(black_box(&text))));
    for words in [2usize, 16] {
        let new = changed(&text, words, 99);
        let mut out = Vec::with_capacity(PAGE_SIZE);
        g.bench_function(BenchmarkId::new("encode_delta, words changed", words), |b| {
            b.iter(|| {
                out.clear();
                page::encode_delta(black_box(&text), black_box(&new), PAGE_SIZE / 4, &mut out)
            })
        });
        let mut delta = Vec::new();
        assert!(page::encode_delta(&text, &new, PAGE_SIZE / 4, &mut delta));
        let mut target = text.clone();
        g.bench_function(BenchmarkId::new("apply_delta, words changed", words), |b| {
            b.iter(|| page::apply_delta(black_box(&mut target), black_box(&delta)))
        });
    }
    g.finish();

    // A batch as the source compresses it: BATCH_PAGES whole pages.
    let batches: [(&str, Vec<u8>); 3] = [
        ("test-guest pages", (0..BATCH_PAGES as u64).flat_map(|i| guest_page(i, 1)).collect()),
        ("text pages", (0..BATCH_PAGES as u64).flat_map(text_page).collect()),
        ("random pages", (0..BATCH_PAGES as u64).flat_map(random_page).collect()),
    ];
    let mut g = c.benchmark_group("zstd batch of 256 pages");
    g.throughput(Throughput::Bytes((BATCH_PAGES * PAGE_SIZE) as u64));
    for level in [1, 3] {
        let mut z = zstd::bulk::Compressor::new(level).expect("zstd");
        for (name, data) in &batches {
            let ratio = data.len() as f64 / z.compress(data).expect("zstd").len() as f64;
            g.bench_function(format!("compress level {level}, {name} (ratio {ratio:.1})"), |b| {
                b.iter(|| z.compress(black_box(data)).expect("zstd"))
            });
        }
    }
    let mut z = zstd::bulk::Compressor::new(1).expect("zstd");
    let mut d = zstd::bulk::Decompressor::new().expect("zstd");
    for (name, data) in &batches {
        let packed = z.compress(data).expect("zstd");
        g.bench_function(format!("decompress level 1, {name}"), |b| {
            b.iter(|| d.decompress(black_box(&packed), data.len()).expect("zstd"))
        });
    }
    g.finish();

    // Frames: a message's encoding (postcard) and decoding, which the link does for every
    // batch on the engine's thread and on the receiver's.
    let mut g = c.benchmark_group("frame of a batch of 256 pages");
    let mut text_batch = BatchBuilder::default();
    for p in 0..BATCH_PAGES as u64 {
        text_batch.full(p, &text_page(p));
    }
    let whole = Message::Pages(text_batch.finish(None));
    for p in 0..BATCH_PAGES as u64 {
        text_batch.full(p, &text_page(p));
    }
    let packed = Message::Pages(text_batch.finish(Some(&mut z)));
    for (name, message) in [("text pages, not compressed", &whole), ("text pages, zstd-1", &packed)] {
        let frame = protocol::encode_frame(message).expect("frame");
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("encode_frame, {name} ({} KiB)", frame.len() >> 10), |b| {
            b.iter(|| protocol::encode_frame(black_box(message)).expect("frame"))
        });
        g.bench_function(format!("decode_message, {name} ({} KiB)", frame.len() >> 10), |b| {
            b.iter(|| protocol::decode_message(black_box(&frame[4..])).expect("message"))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// The source's per-page pipeline

/// A round of the source engine's page work: read the pages out of guest memory, the
/// engine's own encoder on `workers` threads (hash, zero check, base/copy lookup, delta or
/// whole, digest, the compression choice per batch), and the frames the link sends.
struct Pipeline {
    encoder: PageEncoder,
    buf: Vec<u8>,
    pages: Vec<u64>,
    frame_bytes: u64,
}

impl Pipeline {
    fn new(pages: u64, workers: usize) -> Self {
        // The engine's default delta cache: 64 MiB.
        let encoder = PageEncoder::new(pages, 64 << 20, true, workers).expect("zstd");
        let buf = vec![0; encoder.read_pages() * PAGE_SIZE];
        Pipeline { encoder, buf, pages: Vec::new(), frame_bytes: 0 }
    }

    /// One round over every page of `mem` (a single region from address 0).
    fn round(&mut self, mem: &GuestMemory, pages: u64) {
        self.round_over(mem, DirtySet::all(pages));
    }

    /// Round 0 as the engine runs it: over the pages the process ever touched (pagemap).
    fn round_zero(&mut self, mem: &GuestMemory, pages: u64) {
        let mut touched = DirtySet::new(pages);
        let region = mem.iter().next().expect("a region");
        touched.or_bitmap(0, &memory::touched_pages(region).expect("pagemap"), pages);
        self.encoder.skip_untouched(pages - touched.count());
        self.round_over(mem, touched);
    }

    /// As the engine and its driver do it: the driver reads a few batches of pages, the
    /// encoder takes them all at once.
    fn round_over(&mut self, mem: &GuestMemory, mut pages: DirtySet) {
        let mut scan = 0;
        loop {
            pages.take_first(self.encoder.read_pages(), &mut scan, &mut self.pages);
            if self.pages.is_empty() {
                break;
            }
            for (page, into) in self.pages.iter().zip(self.buf.chunks_exact_mut(PAGE_SIZE)) {
                mem.read_slice(into, GuestAddress(page * PAGE_SIZE as u64)).expect("read page");
            }
            self.encoder.add_pages(&self.pages, &self.buf[..self.pages.len() * PAGE_SIZE]);
            self.send();
        }
        self.encoder.finish();
        self.send();
    }

    fn send(&mut self) {
        while let Some((batch, _)) = self.encoder.take_batch() {
            // The link encodes the frame on the engine's thread too.
            let frame = protocol::encode_frame(&Message::Pages(batch)).expect("frame");
            self.frame_bytes += frame.len() as u64;
            black_box(frame);
        }
    }
}

/// Guest memory of `pages` pages (fresh, untouched anonymous memory) with `fill(page)`
/// written into the pages it returns something for.
fn memory_with(pages: u64, fill: &dyn Fn(u64) -> Option<Vec<u8>>) -> GuestMemory {
    let mem = memory::create(pages * PAGE_SIZE as u64).expect("guest memory");
    for p in 0..pages {
        if let Some(content) = fill(p) {
            mem.write_slice(&content, GuestAddress(p * PAGE_SIZE as u64)).expect("write page");
        }
    }
    mem
}

/// Runs `work` on what `setup` made, `iters` times, and times only `work`.
fn timed<S>(iters: u64, mut setup: impl FnMut() -> S, mut work: impl FnMut(&mut S)) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut made = setup();
        let start = Instant::now();
        work(&mut made);
        total += start.elapsed();
    }
    total
}

/// The worker counts the pipeline is measured with: one, and one per core.
fn worker_counts() -> Vec<usize> {
    let mut counts = vec![1, encoder::default_workers()];
    counts.dedup();
    counts
}

fn on(workers: usize) -> String {
    match workers {
        1 => "1 worker".into(),
        n => format!("{n} workers"),
    }
}

/// Pages the pipeline and writer groups run over: 64 MiB, larger than any cache here, and
/// as large as the delta cache.
const PIPELINE_PAGES: u64 = 16384;

/// A group of ten samples over PIPELINE_PAGES pages of guest memory.
fn memory_group<'c>(
    c: &'c mut Criterion,
    name: &str,
    measure: Duration,
) -> criterion::BenchmarkGroup<'c, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(PIPELINE_PAGES * PAGE_SIZE as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(measure);
    g
}

fn pipeline(c: &mut Criterion) {
    const PAGES: u64 = PIPELINE_PAGES;
    const BYTES: u64 = PAGES * PAGE_SIZE as u64;
    let mut g = memory_group(c, "source pipeline, 64 MiB", Duration::from_secs(6));

    // Reading pages out of guest memory alone (vm-memory's read_slice, as the VMM does).
    let text_mem = memory_with(PAGES, &|p| Some(text_page(p)));
    g.bench_function("read_slice only, written memory", |b| {
        let mut buf = vec![0u8; PAGE_SIZE];
        b.iter(|| {
            for p in 0..PAGES {
                text_mem.read_slice(&mut buf, GuestAddress(p * PAGE_SIZE as u64)).expect("read");
                black_box(&buf);
            }
        })
    });

    // The same from memory never touched: each page's first read faults in the zero page.
    g.bench_function("read_slice only, untouched memory (page faults)", |b| {
        let mut buf = vec![0u8; PAGE_SIZE];
        b.iter_custom(|iters| {
            timed(
                iters,
                || memory_with(PAGES, &|_| None),
                |mem| {
                    for p in 0..PAGES {
                        mem.read_slice(&mut buf, GuestAddress(p * PAGE_SIZE as u64)).expect("read");
                        black_box(&buf);
                    }
                },
            )
        })
    });

    // The encoder on one worker, then on one per core, as a migration runs it.
    for workers in worker_counts() {
        // Round 0 as in the migration benchmark: the guest's working set (two words a page)
        // in the first half, never-touched memory in the second (skipped after a look at
        // pagemap, as the engine does); new memory each time.
        let name: &'static str =
            format!("round 0, test-guest memory (half working set, half untouched), {}", on(workers)).leak();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let setup = || {
                    (memory_with(PAGES, &|p| (p < PAGES / 2).then(|| guest_page(p, 1))), Pipeline::new(PAGES, workers))
                };
                let total = timed(iters, setup, |(mem, pipe)| pipe.round_zero(mem, PAGES));
                tally::record(name, iters * BYTES, total);
                total
            })
        });

        let name: &'static str = format!("round 0, text pages (all sent whole), {}", on(workers)).leak();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let total = timed(iters, || Pipeline::new(PAGES, workers), |pipe| pipe.round(&text_mem, PAGES));
                tally::record(name, iters * BYTES, total);
                total
            })
        });

        // A later round: every page changed in two words since it was sent (deltas).
        let name: &'static str =
            format!("later round, text pages with 2 words changed (deltas), {}", on(workers)).leak();
        g.bench_function(name, |b| {
            let mut generation = 0u64;
            b.iter_custom(|iters| {
                let setup = || {
                    let mut pipe = Pipeline::new(PAGES, workers);
                    pipe.round(&text_mem, PAGES);
                    generation += 1;
                    let mem = memory_with(PAGES, &|p| Some(changed(&text_page(p), 2, generation * PAGES + p)));
                    (mem, pipe)
                };
                let total = timed(iters, setup, |(mem, pipe)| pipe.round(mem, PAGES));
                tally::record(name, iters * BYTES, total);
                total
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// The destination's page writer

/// Guest memory for the writer: one flat buffer.
struct FlatMemory(Vec<u8>);

impl GuestPages for FlatMemory {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        let at = page as usize * PAGE_SIZE;
        self.0.get_mut(at..at + PAGE_SIZE)
    }
}

/// The batches a round 0 over `pages` pages of `content` gives, from the engine's own
/// encoder (the link not measured: compressed).
fn encoded(pages: u64, content: &dyn Fn(u64) -> Vec<u8>) -> Vec<PageBatch> {
    let mut encoder = PageEncoder::new(pages, 0, true, 0).expect("zstd");
    let all: Vec<u64> = (0..pages).collect();
    for chunk in all.chunks(encoder.read_pages()) {
        let data: Vec<u8> = chunk.iter().flat_map(|p| content(*p)).collect();
        encoder.add_pages(chunk, &data);
    }
    encoder.finish();
    std::iter::from_fn(|| encoder.take_batch()).map(|(b, _)| b).collect()
}

fn writer(c: &mut Criterion) {
    const PAGES: u64 = PIPELINE_PAGES;
    const BYTES: u64 = PAGES * PAGE_SIZE as u64;
    let mut g = memory_group(c, "destination writer, 64 MiB", Duration::from_secs(4));
    let cases: [(&str, Vec<PageBatch>); 2] = [
        ("round 0, test-guest pages", encoded(PAGES, &|p| guest_page(p, 1))),
        ("round 0, text pages (zstd)", encoded(PAGES, &text_page)),
    ];
    for workers in worker_counts() {
        for (case, batches) in &cases {
            let name: &'static str = format!("{case}, {}", on(workers)).leak();
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let setup = || {
                        let writer = PageWriter::with_workers(PAGES, workers).expect("writer");
                        // Memory already faulted in (a byte per page written), so that this
                        // times the writer's work, not the kernel's first touch of each page.
                        let mut memory = vec![0u8; BYTES as usize];
                        memory.iter_mut().step_by(PAGE_SIZE).for_each(|b| *b = 1);
                        (writer, FlatMemory(memory))
                    };
                    // As the driver hands them over: up to 8 waiting batches at a time.
                    let total = timed(iters, setup, |(writer, memory)| {
                        for run in batches.chunks(8) {
                            writer.apply_all(memory, None, run).expect("apply");
                        }
                    });
                    tally::record(name, iters * BYTES, total);
                    total
                })
            });
        }
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// Dirty page harvest

fn vmm_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

fn dirty_log(c: &mut Criterion) {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("\n*** dirty-log benchmarks skipped: /dev/kvm is not usable here ({e}) ***\n");
            return;
        }
    };
    let vm = novacron_vmm::vstate::vm::Vm::new(&kvm).expect("KVM VM");
    let mem = memory::create(GIB).expect("1 GiB of guest memory");
    let region = mem.iter().next().expect("a region");
    assert_eq!(region.len(), GIB, "1 GiB is one region");
    vm.register_memory(&mem).expect("memory slot");
    vm.set_dirty_logging(&mem, true).expect("dirty logging on");
    let pages = GIB / PAGE_SIZE as u64;

    let mut g = c.benchmark_group("dirty harvest, 1 GiB");
    g.throughput(Throughput::Bytes(GIB));
    g.bench_function("KVM_GET_DIRTY_LOG (no vCPU: no page dirty)", |b| {
        b.iter(|| vm.dirty_log(0, GIB).expect("dirty log"))
    });
    g.bench_function("VMM bitmap get_and_reset, clean", |b| b.iter(|| vmm_bitmap(region).get_and_reset()));
    // The host writes 1% of the pages through vm-memory, which marks them in the VMM's
    // bitmap (KVM's log does not see host writes).
    g.bench_function("VMM bitmap get_and_reset, 1% of pages written", |b| {
        b.iter_batched(
            || {
                for p in (0..pages).step_by(100) {
                    mem.write_obj(p, GuestAddress(p * PAGE_SIZE as u64)).expect("write");
                }
            },
            |()| vmm_bitmap(region).get_and_reset(),
            BatchSize::PerIteration,
        )
    });
    // What the source's harvest_dirty does per region: both logs, merged into the set.
    let mut set = DirtySet::new(pages);
    g.bench_function("harvest as the VMM does it (both logs into a DirtySet), clean", |b| {
        b.iter(|| {
            set.clear();
            let log = vm.dirty_log(0, GIB).expect("dirty log");
            set.or_bitmap(0, &log, pages);
            set.or_bitmap(0, &vmm_bitmap(region).get_and_reset(), pages);
            set.count()
        })
    });
    g.finish();
    vm.set_dirty_logging(&mem, false).expect("dirty logging off");
}

// ---------------------------------------------------------------------------------------
// The migration's link (both transports) against plain TCP on loopback

const FRAME_PAYLOAD: usize = 1 << 20;
const QUIC: &str = "QUIC (quinn, TLS 1.3), one stream";
const QUIC_LANES: &str = "QUIC (quinn, TLS 1.3), 2 page lanes";
const TLS_TCP: &str = "TLS 1.3 over TCP (rustls), the migration's link";
const TCP_FRAMES: &str = "TCP (std::net), same frames";
const TCP_BYTES: &str = "TCP (std::net), bytes only (no encoding)";

/// Sends `iters` frames with `send`, then waits for the receiver's ack of each: the time
/// from the first send to the last ack.
fn sent_and_acked(iters: u64, acks: &std::sync::mpsc::Receiver<()>, mut send: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        send();
    }
    for _ in 0..iters {
        acks.recv().expect("ack");
    }
    start.elapsed()
}

fn payload() -> Vec<u8> {
    (0..FRAME_PAYLOAD / 8).flat_map(|i| splitmix(i as u64).to_le_bytes()).collect()
}

fn transport(c: &mut Criterion) {
    use novacron_migration::throttle::Bandwidth;
    use novacron_migration::tls::{Identity, init};
    use novacron_migration::transport::{Listener, TransportChoice, connect};
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().expect("temp dir");
    init(dir.path(), "bench").expect("certificates");
    let message = Message::State(payload());
    let frame_len = protocol::encode_frame(&message).expect("frame").len() as u64;

    let mut g = c.benchmark_group("loopback, 1 MiB frames");
    g.throughput(Throughput::Bytes(frame_len));

    // The migration's own link, both ends in this process (two runtimes, one worker each,
    // as in the two VMMs), over each transport.
    // With lanes, the frames go out on two lanes by turns, as two shards' batches do.
    for (name, choice, lanes) in
        [(QUIC, TransportChoice::Quic, 0), (QUIC_LANES, TransportChoice::Quic, 2), (TLS_TCP, TransportChoice::Tcp, 0)]
    {
        let listener = Listener::bind("127.0.0.1:0".parse().expect("addr"), &Identity::load(dir.path()).expect("id"))
            .expect("listener");
        let addr = listener.local_addr().expect("local addr");
        let (ack, acks) = std::sync::mpsc::channel::<()>();
        let receiver = std::thread::spawn(move || {
            let mut link = listener.accept().expect("accept");
            while let Ok(m) = link.recv(Duration::from_secs(30)) {
                black_box(m);
                if ack.send(()).is_err() {
                    break;
                }
            }
        });
        let id = Identity::load(dir.path()).expect("id");
        let mut link = connect(addr, &id, Bandwidth::new(0), None, choice).expect("connect");
        let mut sent = 0usize;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = sent_and_acked(iters, &acks, || {
                    if lanes == 0 {
                        link.send(&message).expect("send");
                    } else {
                        let frame = protocol::encode_frame(&message).expect("frame");
                        link.send_pages(sent % lanes, frame).expect("send");
                        sent += 1;
                    }
                });
                tally::record(name, iters * frame_len, t);
                t
            })
        });
        link.close(Duration::from_secs(2));
        let _ = receiver.join();
    }

    // TCP: the same frames, encoded and decoded the same way.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("TCP listener");
    let addr = tcp.local_addr().expect("local addr");
    let (ack, acks) = std::sync::mpsc::channel::<()>();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = tcp.accept().expect("accept");
        let mut header = [0u8; 4];
        while s.read_exact(&mut header).is_ok() {
            let len = protocol::frame_len(header).expect("frame length");
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).expect("frame body");
            black_box(protocol::decode_message(&body).expect("message"));
            if ack.send(()).is_err() {
                break;
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let name = TCP_FRAMES;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = sent_and_acked(iters, &acks, || {
                let frame = protocol::encode_frame(&message).expect("frame");
                s.write_all(&frame).expect("write");
            });
            tally::record(name, iters * frame_len, t);
            t
        })
    });
    drop(s);
    let _ = receiver.join();

    // TCP carrying the bytes only: frames encoded once, read into one buffer, no decoding.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("TCP listener");
    let addr = tcp.local_addr().expect("local addr");
    let frame = protocol::encode_frame(&message).expect("frame");
    let (ack, acks) = std::sync::mpsc::channel::<()>();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = tcp.accept().expect("accept");
        let mut body = vec![0u8; frame_len as usize];
        while s.read_exact(&mut body).is_ok() {
            if ack.send(()).is_err() {
                break;
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let name = TCP_BYTES;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = sent_and_acked(iters, &acks, || {
                s.write_all(&frame).expect("write");
            });
            tally::record(name, iters * frame_len, t);
            t
        })
    });
    drop(s);
    let _ = receiver.join();
    g.finish();
}

fn summary() {
    let gbs = |v: f64| format!("{:.2} GB/s ({:.2} GiB/s)", v / 1e9, v / GIB as f64);
    let rows = tally::rates();
    if rows.is_empty() {
        return;
    }
    println!("\nSummary (means over every timed iteration; one core unless it says workers):");
    for (name, rate) in &rows {
        println!("  {name:<58} {}", gbs(*rate));
    }
    let workers = encoder::default_workers();
    let all = format!("round 0, test-guest memory (half working set, half untouched), {}", on(workers));
    if let Some(r) = tally::rate(&all) {
        println!(
            "  target: the whole page pipeline >= 2 GB/s on this machine's {workers} cores (round 0 of the migration benchmark's memory): {}",
            if r >= 2e9 { "met" } else { "NOT met" }
        );
    }
    for case in [
        "round 0, test-guest memory (half working set, half untouched)",
        "round 0, text pages (all sent whole)",
        "round 0, test-guest pages",
        "round 0, text pages (zstd)",
    ] {
        if let (Some(one), Some(n)) =
            (tally::rate(&format!("{case}, 1 worker")), tally::rate(&format!("{case}, {}", on(workers))))
            && workers > 1
        {
            println!("  {case}: {} / 1 worker: {:.2}x", on(workers), n / one);
        }
    }
    for link in [QUIC, QUIC_LANES, TLS_TCP] {
        if let (Some(l), Some(t)) = (tally::rate(link), tally::rate(TCP_FRAMES)) {
            println!("  {link} / plain TCP on loopback, the same frames: {:.2}x", l / t);
        }
        if let (Some(l), Some(t)) = (tally::rate(link), tally::rate(TCP_BYTES)) {
            println!("  {link} / plain TCP carrying the bytes only: {:.2}x", l / t);
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    codecs(&mut c);
    pipeline(&mut c);
    writer(&mut c);
    dirty_log(&mut c);
    transport(&mut c);
    c.final_summary();
    summary();
}
