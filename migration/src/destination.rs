//! The receiving end of a migration: takes pages into fresh guest memory, checks every
//! batch before it touches memory, keeps the memory digest as it goes, builds the VM
//! paused from the state, compares digests, and runs the VM only on the source's Commit.
//! Anything else (an Abort, a lost connection, a bad frame, a digest that differs) ends
//! the receive with an error, and nothing of the VM runs here.

use crate::digest::{MemoryDigest, hex};
use crate::page::{self, PAGE_SIZE, PageHash, ZERO_HASH};
use crate::protocol::{Digests, Hello, Message, PROTOCOL_VERSION, PageBatch, PageEntry, Welcome};
use crate::transport::{Link, LinkError};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the engine needs from the VM it receives. The VMM implements it.
pub trait DestinationVm {
    /// Makes guest memory for the machine in `hello` (all zeroes).
    fn prepare(&mut self, hello: &Hello) -> Result<(), String>;
    /// Page `page` of guest memory (PAGE_SIZE bytes), or None past its end. Nothing runs
    /// in the guest while the engine writes pages.
    fn page(&mut self, page: u64) -> Option<&mut [u8]>;
    /// Builds the VM from a state stream, paused.
    fn build(&mut self, state: &[u8]) -> Result<(), String>;
    /// Lets the built VM run.
    fn start(&mut self) -> Result<(), String>;
}

/// How long the source may be silent: it sends Hello at once, and pages or keep-alives
/// after (a dead source is noticed sooner, by the link's idle timeout).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(600);
/// 16 TiB of guest memory, as snapshots allow.
const MAX_PAGES: u64 = 1 << 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Link(LinkError),
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
    #[error("the source sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("the source speaks protocol version {0}; this VMM speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("bad page batch: {0}")]
    BadBatch(String),
    #[error("memory digest mismatch: received memory hashes to {ours}, the source sent {theirs}")]
    MemoryDigest { ours: String, theirs: String },
    #[error("state digest mismatch: received state hashes to {ours}, the source sent {theirs}")]
    StateDigest { ours: String, theirs: String },
    #[error("cannot build the VM: {0}")]
    Build(String),
    #[error("cannot start the VM: {0}")]
    Start(String),
    #[error("the base image: {0}")]
    Base(String),
}

impl From<LinkError> for ReceiveError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::PeerAborted(reason) => ReceiveError::SourceAborted(reason),
            other => ReceiveError::Link(other),
        }
    }
}

/// A snapshot's memory.bin this side already holds: its non-zero pages' hashes, offered to
/// the source so that it sends references instead of those pages.
pub struct BaseImage {
    path: PathBuf,
    file: File,
    hashes: Vec<PageHash>,
    /// The file page of each hash.
    pages: Vec<u64>,
}

impl BaseImage {
    /// Reads and hashes every page of `path` (holes and zero pages are left out).
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        let base_err = |e: std::io::Error| ReceiveError::Base(format!("{}: {e}", path.display()));
        let file = crate::open_regular(path).map_err(|e| ReceiveError::Base(format!("{}: {e}", path.display())))?;
        let len = file.metadata().map_err(base_err)?.len();
        let mut chunk = vec![0u8; 2 << 20];
        let (mut hashes, mut pages) = (Vec::new(), Vec::new());
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(chunk.len() as u64) as usize;
            file.read_exact_at(&mut chunk[..n], at).map_err(base_err)?;
            for (i, p) in chunk[..n].chunks_exact(PAGE_SIZE).enumerate() {
                let h = page::hash(p);
                if h != ZERO_HASH {
                    hashes.push(h);
                    pages.push(at / PAGE_SIZE as u64 + i as u64);
                }
            }
            at += n as u64;
        }
        Ok(BaseImage { path: path.to_owned(), file, hashes, pages })
    }

    pub fn pages(&self) -> usize {
        self.hashes.len()
    }

    fn read(&self, index: u32, into: &mut [u8]) -> Result<PageHash, ReceiveError> {
        let i = index as usize;
        let (Some(&page), Some(&hash)) = (self.pages.get(i), self.hashes.get(i)) else {
            return Err(ReceiveError::BadBatch(format!("base page {index} of {}", self.hashes.len())));
        };
        self.file
            .read_exact_at(into, page * PAGE_SIZE as u64)
            .map_err(|e| ReceiveError::Base(format!("{}: {e}", self.path.display())))?;
        Ok(hash)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    pub pages_received: u64,
    pub bytes_received: u64,
    pub memory_digest: String,
    /// From the first byte to Running.
    pub total_ms: u64,
}

/// Applies page batches to guest memory and keeps the digest of what it wrote. Every
/// entry is checked before the memory it names is written; an error leaves the pages of
/// earlier entries written (the receive is then abandoned as a whole).
pub struct PageWriter {
    pages: u64,
    hashes: Vec<PageHash>,
    digest: MemoryDigest,
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    received: u64,
}

/// Receives one VM over `link` into `vm` and starts it on Commit.
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    link: &mut Link,
    base: Option<&BaseImage>,
) -> Result<ReceiveReport, ReceiveError> {
    let result = receive_inner(vm, link, base);
    if let Err(e) = &result
        && !matches!(e, ReceiveError::SourceAborted(_) | ReceiveError::Link(_))
    {
        link.abort(&e.to_string());
    }
    result
}

fn receive_inner<V: DestinationVm>(
    vm: &mut V,
    link: &mut Link,
    base: Option<&BaseImage>,
) -> Result<ReceiveReport, ReceiveError> {
    let hello = match link.recv(HELLO_TIMEOUT)? {
        Message::Hello(h) => h,
        other => return Err(ReceiveError::Unexpected { expected: "Hello", got: other.name() }),
    };
    let started = Instant::now();
    if hello.version != PROTOCOL_VERSION {
        return Err(ReceiveError::Version(hello.version));
    }
    // Checked here as well as by the VM: the page tables below are sized from it.
    let pages = hello
        .regions
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r / PAGE_SIZE as u64))
        .filter(|&p| p <= MAX_PAGES)
        .ok_or_else(|| ReceiveError::Build(format!("RAM regions {:?} are too large", hello.regions)))?;
    vm.prepare(&hello).map_err(ReceiveError::Build)?;
    link.send(&Message::Welcome(Welcome { base: base.map(|b| b.hashes.clone()).unwrap_or_default() }))?;
    let mut r = PageWriter::new(pages)?;
    let mut state: Option<Vec<u8>> = None;
    let mut ready = false;
    loop {
        match link.recv(MESSAGE_TIMEOUT)? {
            Message::Pages(batch) if !ready => {
                r.apply(vm, base, &batch)?;
                // What is applied, not what was read: batches queued here are a backlog
                // the switchover would wait for.
                link.send(&Message::Received(link.consumed()))?;
            }
            Message::State(s) if !ready => state = Some(s),
            Message::Verify(theirs) if !ready => {
                let Some(s) = state.as_deref() else {
                    return Err(ReceiveError::Unexpected { expected: "State", got: "Verify" });
                };
                let ours = Digests { memory: r.digest.bytes(), state: *blake3::hash(s).as_bytes() };
                if ours.memory != theirs.memory {
                    return Err(ReceiveError::MemoryDigest { ours: hex(&ours.memory), theirs: hex(&theirs.memory) });
                }
                if ours.state != theirs.state {
                    return Err(ReceiveError::StateDigest { ours: hex(&ours.state), theirs: hex(&theirs.state) });
                }
                vm.build(s).map_err(ReceiveError::Build)?;
                link.send(&Message::Ready(ours))?;
                ready = true;
            }
            Message::Commit if ready => {
                vm.start().map_err(ReceiveError::Start)?;
                link.send(&Message::Running)?;
                return Ok(ReceiveReport {
                    pages_received: r.received,
                    bytes_received: link.stats.received.load(std::sync::atomic::Ordering::Relaxed),
                    memory_digest: hex(&r.digest.bytes()),
                    total_ms: started.elapsed().as_millis() as u64,
                });
            }
            other => {
                let expected = if ready { "Commit" } else { "Pages, State or Verify" };
                return Err(ReceiveError::Unexpected { expected, got: other.name() });
            }
        }
    }
}

fn page<V: DestinationVm>(vm: &mut V, pages: u64, page: u64) -> Result<&mut [u8], ReceiveError> {
    match vm.page(page) {
        Some(p) if p.len() == PAGE_SIZE && page < pages => Ok(p),
        _ => Err(ReceiveError::BadBatch(format!("page {page} is outside the VM's {pages} pages"))),
    }
}

impl PageWriter {
    /// A writer for a VM of `pages` pages whose memory is all zeroes.
    pub fn new(pages: u64) -> Result<Self, ReceiveError> {
        Ok(PageWriter {
            pages,
            hashes: vec![ZERO_HASH; pages as usize],
            digest: MemoryDigest::default(),
            decompressor: zstd::bulk::Decompressor::new().map_err(|e| ReceiveError::Build(format!("zstd: {e}")))?,
            scratch: vec![0; PAGE_SIZE],
            received: 0,
        })
    }

    /// The digest of everything written so far.
    pub fn digest(&self) -> MemoryDigest {
        self.digest
    }

    /// Applies a batch to `vm`'s memory (`base`: the base image offered in Welcome).
    pub fn apply<V: DestinationVm>(
        &mut self,
        vm: &mut V,
        base: Option<&BaseImage>,
        batch: &PageBatch,
    ) -> Result<(), ReceiveError> {
        let data = batch.raw_data(&mut self.decompressor).map_err(|e| ReceiveError::BadBatch(e.to_string()))?;
        let pages = self.pages;
        let mut at = 0usize;
        for entry in &batch.entries {
            let page_no = entry.page();
            let hash = match *entry {
                PageEntry::Zero { .. } => {
                    page(vm, pages, page_no)?.fill(0);
                    ZERO_HASH
                }
                PageEntry::Full { .. } => {
                    let bytes = &data[at..at + PAGE_SIZE];
                    at += PAGE_SIZE;
                    page(vm, pages, page_no)?.copy_from_slice(bytes);
                    page::hash(bytes)
                }
                PageEntry::Delta { len, .. } => {
                    let delta = &data[at..at + len as usize];
                    at += len as usize;
                    let target = page(vm, pages, page_no)?;
                    page::apply_delta(target, delta)
                        .map_err(|e| ReceiveError::BadBatch(format!("page {page_no}: {e}")))?;
                    page::hash(target)
                }
                PageEntry::Base { base: index, .. } => {
                    let image =
                        base.ok_or_else(|| ReceiveError::BadBatch("a base page, but this side offered none".into()))?;
                    let hash = image.read(index, &mut self.scratch)?;
                    page(vm, pages, page_no)?.copy_from_slice(&self.scratch);
                    hash
                }
                PageEntry::Copy { from, .. } => {
                    if from >= pages || from == page_no {
                        return Err(ReceiveError::BadBatch(format!("page {page_no} copies from page {from}")));
                    }
                    self.scratch.copy_from_slice(page(vm, pages, from)?);
                    page(vm, pages, page_no)?.copy_from_slice(&self.scratch);
                    self.hashes[from as usize]
                }
            };
            let old = self.hashes[page_no as usize];
            self.digest.replace(page_no, &old, &hash);
            self.hashes[page_no as usize] = hash;
            self.received += 1;
        }
        Ok(())
    }
}
