//! The bytes a destination VMM takes from the network during a live migration: any bytes
//! must give messages or an error, and page batches must be applied or refused, never a
//! panic. Besides "no panic", the target checks what the destination relies on: the memory
//! digest it keeps always matches the memory it wrote, and a refused delta leaves its page
//! as it was.
//!
//! The input's first byte picks how it is read:
//!
//! - `BATCH_MARKER`: the rest is a page batch built directly (see `batch_from_pieces`), so
//!   that mutations reach `PageBatch::raw_data` (both its raw and its zstd path) and
//!   `PageWriter::apply` past postcard's decoding (onto memory where every fourth page
//!   already holds something, so that deltas and copies meet content), and every delta in
//!   it also goes to `page::apply_delta` on its own;
//! - `DELTA_MARKER`: the rest is one delta, applied to a page;
//! - anything else: a stream of frames (`length (u32 LE) | postcard Message`), read as
//!   `transport::pump::read_frames` reads them (MAX_FRAME, stop at the first error), each given
//!   to the real `DestinationMachine` a millisecond after the one before (page batches in a
//!   row together, as the driver gathers them), with its actions
//!   done on the fuzz VM as `destination::receive` does them; then its timer fires after
//!   the message timeout. A receive that fails stays failed, one that ends has started the
//!   VM it built, and the digest matches memory after every frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_migration::destination::{
    Action, BaseImage, DestinationMachine, DestinationVm, Event, GATHER_BATCHES, GuestPages, MESSAGE_TIMEOUT,
    PageWriter, Step, VmFault,
};
use novacron_migration::digest::MemoryDigest;
use novacron_migration::page::{self, PAGE_SIZE, ZERO_HASH};
use novacron_migration::protocol::{self, Hello, MAX_FRAME, Message, PageBatch, PageEntry};
use novacron_migration::stream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BATCH_MARKER: u8 = 0xfe;
const DELTA_MARKER: u8 = 0xfd;
/// The fuzz VM's memory.
const VM_PAGES: usize = 64;
/// Pages of the base image (`base_image`), some of them zero.
const BASE_PAGES: usize = 8;
const MAX_PIECES: usize = 512;

/// Guest memory as the destination sees it: VM_PAGES pages, all zeroes at first.
struct FuzzVm {
    mem: Vec<Vec<u8>>,
    prepared: bool,
    built: bool,
    started: bool,
}

impl FuzzVm {
    fn new() -> Self {
        FuzzVm { mem: vec![vec![0u8; PAGE_SIZE]; VM_PAGES], prepared: false, built: false, started: false }
    }
}

impl GuestPages for FuzzVm {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        if self.built {
            return None;
        }
        self.mem.get_mut(usize::try_from(page).ok()?).map(|p| &mut p[..])
    }
}

impl DestinationVm for FuzzVm {
    fn prepare(&mut self, hello: &Hello) -> Result<(), VmFault> {
        let bytes = hello.regions.iter().try_fold(0u64, |sum, r| sum.checked_add(*r)).ok_or("regions overflow")?;
        if bytes > (VM_PAGES * PAGE_SIZE) as u64 {
            return Err(format!("{bytes} bytes of RAM, the fuzz VM has {}", VM_PAGES * PAGE_SIZE).into());
        }
        self.prepared = true;
        Ok(())
    }

    fn build(&mut self, state: &[u8]) -> Result<(), VmFault> {
        stream::decode(state)?;
        self.built = true;
        Ok(())
    }

    fn check_post_copy(&mut self) -> Result<(), VmFault> {
        Ok(())
    }

    fn start_post_copy(&mut self, _pending: &novacron_migration::dirty::DirtySet) -> Result<(), VmFault> {
        self.started = true;
        Ok(())
    }

    /// The pages the post-copy brings, where the digest check below reads them.
    fn place(&mut self, page: u64, content: Option<&[u8]>) -> Result<(), VmFault> {
        let slot = self.mem.get_mut(usize::try_from(page)?).ok_or("page outside the fuzz VM")?;
        match content {
            Some(c) => slot.copy_from_slice(c),
            None => slot.fill(0),
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), VmFault> {
        if !self.built {
            return Err("not built".into());
        }
        self.started = true;
        Ok(())
    }
}

/// The content of base page `i` (0-based in the file), for i < VM_PAGES: every third one
/// is zero, so the image's hashes skip it, as they skip holes. Made once: the fuzzer's
/// instrumentation makes byte loops in the target slow.
fn base_page(i: usize) -> &'static [u8] {
    static PAGES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let pages = PAGES.get_or_init(|| {
        (0..VM_PAGES)
            .map(|i| {
                if i % 3 == 1 {
                    return vec![0u8; PAGE_SIZE];
                }
                (0..PAGE_SIZE).map(|b| (b * (i + 3) + i) as u8 | 1).collect()
            })
            .collect()
    });
    &pages[i % VM_PAGES]
}

/// A memory.bin this side "holds", opened once (the file is unlinked at once: the open
/// file stays readable).
fn base_image() -> &'static BaseImage {
    static BASE: OnceLock<BaseImage> = OnceLock::new();
    BASE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("novacron-fuzz-base-{}.bin", std::process::id()));
        let bytes: Vec<u8> = (0..BASE_PAGES).flat_map(|i| base_page(i).iter().copied()).collect();
        std::fs::write(&path, &bytes).expect("write the base image");
        let image = BaseImage::open(&path).expect("open the base image");
        let _ = std::fs::remove_file(&path);
        image
    })
}

/// The digest must stand for exactly what memory holds: every non-zero page, by its
/// number and hash, and nothing the writer did not write.
fn check_digest(vm: &FuzzVm, digest: MemoryDigest) {
    let mut expected = MemoryDigest::default();
    for (i, p) in vm.mem.iter().enumerate() {
        let h = page::hash(p);
        if h != ZERO_HASH {
            expected.replace(i as u64, &ZERO_HASH, &h);
        }
    }
    assert_eq!(expected, digest, "the memory digest differs from the memory written");
}

/// Applies `delta` to a copy of `old` on its own: refused, the page is as it was;
/// accepted, re-encoding old -> new and applying that gives new again.
fn check_delta(old: &[u8], delta: &[u8]) {
    let mut new = old.to_vec();
    if page::apply_delta(&mut new, delta).is_err() {
        assert_eq!(new, old, "a refused delta changed its page");
        return;
    }
    let mut again = Vec::new();
    // The largest delta of a page: 256 one-word runs of 10 bytes, or one run of 4099.
    assert!(page::encode_delta(old, &new, 2 * PAGE_SIZE, &mut again), "a page's delta is over two pages");
    let mut back = old.to_vec();
    page::apply_delta(&mut back, &again).expect("a delta the encoder made is refused");
    assert_eq!(back, new, "a re-encoded delta gives another page");
}

/// The input as frames, as `transport::pump::read_frames` reads them.
fn frames(mut data: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    while data.len() >= 4 {
        let Ok(len) = protocol::frame_len([data[0], data[1], data[2], data[3]]) else { break };
        debug_assert!(len <= MAX_FRAME);
        let Some(body) = data.get(4..4 + len) else { break }; // truncated inside a frame
        let Ok(message) = protocol::decode_message(body) else { break };
        messages.push(message);
        data = &data[4 + len..];
    }
    messages
}

/// Gives the messages to the real destination machine, a millisecond apart, doing its
/// actions on the fuzz VM as the driver does; then lets its timer fire.
fn receive(messages: Vec<Message>) {
    let mut vm = FuzzVm::new();
    let start = Instant::now();
    let mut machine = DestinationMachine::new(start, Some(base_image()));
    let mut now = start;
    let mut messages = messages.into_iter().peekable();
    loop {
        // Page batches one after another go together while receiving, as the driver
        // gathers them (`Event::Pages`); the rest one by one; then the timer.
        let event = match messages.next() {
            Some(Message::Pages(first)) if machine.step() == Step::Receiving => {
                let mut batches = vec![first];
                while batches.len() < GATHER_BATCHES
                    && let Some(Message::Pages(batch)) = messages.next_if(|m| matches!(m, Message::Pages(_)))
                {
                    batches.push(batch);
                }
                Event::Pages { len: batches.len() as u64, batches }
            }
            Some(message) => Event::Frame { len: 1, message },
            None => Event::Timer,
        };
        let last = matches!(event, Event::Timer);
        if last {
            now += MESSAGE_TIMEOUT + Duration::from_secs(1);
        } else {
            now += Duration::from_millis(1);
        }
        let was = machine.step();
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let Some(action) = machine.handle(now, event, &mut vm) else { continue };
            match action.run_on(&mut vm) {
                Ok(event) => next = Some(event),
                Err(Action::Fail(e)) => {
                    std::hint::black_box(e.to_string());
                    assert_eq!(machine.step(), Step::Failed, "a failed receive says so");
                }
                // A post-copy whose link was lost: the next frames come on a new one.
                Err(Action::Relisten) => next = Some(Event::Relinked),
                Err(_) => {}
            }
        }
        if let Some(digest) = machine.digest() {
            check_digest(&vm, digest);
        }
        if matches!(was, Step::Done | Step::Failed | Step::Probed) {
            assert_eq!(machine.step(), was, "a receive that ended took another event");
        }
        if last {
            break;
        }
    }
    match machine.step() {
        Step::Done => assert!(vm.built && vm.started && machine.report().is_some(), "done without a running VM"),
        Step::Probed => assert!(!vm.prepared && !vm.built, "a probe prepared or built a VM"),
        step => assert!(step == Step::Failed && !vm.started, "{step:?} after the timeout, or a VM started"),
    }
}

/// Takes `n` bytes (fewer if the input ends).
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *rest = tail;
    head
}

fn byte(rest: &mut &[u8]) -> u8 {
    take(rest, 1).first().copied().unwrap_or(0)
}

/// A page batch from pieces:
///
/// `flags (u8) | piece…`, flags: bit 0 compress the data (zstd), bit 1 offer the base image,
/// bit 2 make raw_len lie by one, bit 3 drop the data's last byte, bits 4-7 the writer's
/// pages (0: VM_PAGES, else ×8).
///
/// A piece is `tag (u8) | page (u8) | …`; tag % 5 is the entry's kind, tag bit 7 turns the
/// page number into u64::MAX - page:
/// 0 Zero; 1 Full `len (u8) | len bytes`, repeated to fill the page; 2 Delta
/// `len (u16 LE) | len bytes`; 3 Base `index (u8)`; 4 Copy `from (u8)`.
///
/// Returns the batch, the deltas in it, whether to offer the base, and the writer's pages.
fn batch_from_pieces(mut rest: &[u8]) -> (PageBatch, Vec<Vec<u8>>, bool, u64) {
    let flags = byte(&mut rest);
    let mut entries = Vec::new();
    let mut data = Vec::new();
    let mut deltas = Vec::new();
    while !rest.is_empty() && entries.len() < MAX_PIECES {
        let tag = byte(&mut rest);
        let mut page = u64::from(byte(&mut rest));
        if tag & 0x80 != 0 {
            page = u64::MAX - page;
        }
        match tag % 5 {
            0 => entries.push(PageEntry::Zero { page }),
            1 => {
                let len = usize::from(byte(&mut rest));
                let pattern = take(&mut rest, len);
                let start = data.len();
                if pattern.is_empty() {
                    data.resize(start + PAGE_SIZE, 0);
                } else {
                    // The pattern, doubled until it fills the page.
                    data.extend_from_slice(pattern);
                    while data.len() - start < PAGE_SIZE {
                        let have = (data.len() - start).min(PAGE_SIZE - (data.len() - start));
                        data.extend_from_within(start..start + have);
                    }
                }
                entries.push(PageEntry::Full { page });
            }
            2 => {
                let len = u16::from_le_bytes([byte(&mut rest), byte(&mut rest)]);
                let delta = take(&mut rest, usize::from(len));
                data.extend_from_slice(delta);
                deltas.push(delta.to_vec());
                entries.push(PageEntry::Delta { page, len: delta.len() as u32 });
            }
            3 => entries.push(PageEntry::Base { page, base: u32::from(byte(&mut rest)) }),
            _ => entries.push(PageEntry::Copy { page, from: u64::from(byte(&mut rest)) }),
        }
    }
    let mut raw_len = data.len() as u32;
    if flags & 4 != 0 {
        raw_len = raw_len.wrapping_add(1);
    }
    let compressed = flags & 1 != 0;
    if compressed {
        data = zstd::bulk::compress(&data, 1).expect("zstd compress");
    }
    if flags & 8 != 0 {
        data.pop();
    }
    let pages = match flags >> 4 {
        0 => VM_PAGES as u64,
        n => u64::from(n) * 8,
    };
    (PageBatch { entries, raw_len, compressed, data }, deltas, flags & 2 != 0, pages)
}

fn apply_pieces(rest: &[u8]) {
    let (batch, deltas, offer_base, pages) = batch_from_pieces(rest);
    let mut vm = FuzzVm::new();
    let mut writer = PageWriter::new(pages).expect("page writer");
    // Something in memory first, so that deltas and copies meet non-zero pages.
    let mut warm = protocol::BatchBuilder::default();
    for p in (0..pages.min(VM_PAGES as u64)).step_by(4) {
        warm.full(p, base_page(p as usize));
    }
    writer.apply(&mut vm, None, &warm.finish(None)).expect("a batch the encoder made is refused");
    let _ = writer.apply(&mut vm, offer_base.then(base_image), &batch);
    check_digest(&vm, writer.digest());
    for (i, delta) in deltas.iter().enumerate() {
        check_delta(&vm.mem[i % VM_PAGES], delta);
    }
}

fuzz_target!(|data: &[u8]| {
    match data.first() {
        Some(&BATCH_MARKER) => apply_pieces(&data[1..]),
        Some(&DELTA_MARKER) => {
            check_delta(&[0u8; PAGE_SIZE], &data[1..]);
            check_delta(base_page(0), &data[1..]);
        }
        _ => receive(frames(data)),
    }
});
