//! Guest memory as a migration fills it: the page writer, which checks every entry of a
//! batch before it writes the memory it names and keeps the memory digest, and the base
//! image a destination may offer (an earlier snapshot's memory.bin).

use super::ReceiveError;
use crate::digest::MemoryDigest;
use crate::dirty::DirtySet;
use crate::page::{self, PAGE_SIZE, PageHash, ZERO_HASH};
use crate::protocol::{PageBatch, PageEntry};
use rayon::prelude::*;
use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The guest memory a migration writes into (the VMM's fresh memory, or a test's pages).
pub trait GuestPages {
    /// Page `page` (PAGE_SIZE bytes), or None past the end of memory. Nothing runs in the
    /// guest while the engine writes pages.
    fn page(&mut self, page: u64) -> Option<&mut [u8]>;
}

/// A snapshot's memory.bin this side already holds: its non-zero pages' hashes, offered to
/// the source so that it sends references instead of those pages.
pub struct BaseImage {
    path: PathBuf,
    file: File,
    pub(super) hashes: Vec<PageHash>,
    /// The file page of each hash.
    pages: Vec<u64>,
}

impl BaseImage {
    /// Reads and hashes every page of `path` (holes and zero pages are left out).
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        let base_err = |source: std::io::Error| ReceiveError::Base { path: path.to_owned(), source };
        let file = crate::open_regular(path).map_err(|e| match e {
            crate::OpenError::Io(source) => base_err(source),
            crate::OpenError::NotAFile => base_err(std::io::Error::other("it is not a regular file")),
        })?;
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
            .map_err(|source| ReceiveError::Base { path: self.path.clone(), source })?;
        Ok(hash)
    }
}

/// Applies page batches to guest memory and keeps the digest of what it wrote. Every
/// entry is checked before the memory it names is written; an error leaves the pages of
/// earlier entries written (the receive is then abandoned as a whole).
///
/// What does not touch guest memory runs on the worker pool: decompressing several
/// batches at once and hashing their whole pages. The writes themselves go in the order
/// the batches came, so good batches leave the memory and digest that applying them one
/// by one leaves. A batch whose data does not decompress fails the call before any of
/// its run is written (the receive is abandoned either way).
pub struct PageWriter {
    pages: u64,
    hashes: Vec<PageHash>,
    digest: MemoryDigest,
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    received: u64,
    workers: usize,
    /// Started on the first call with enough work to share (a receive of a few pages, or
    /// a fuzz input, never starts one); None until then, and with one worker.
    pool: Option<rayon::ThreadPool>,
}

/// Whole pages below this many in a call are hashed on the caller's thread: handing them
/// to the pool would cost more than it saves.
const PARALLEL_MIN_PAGES: usize = 32;

/// A batch made ready away from guest memory: its data uncompressed, and the hashes of
/// its whole pages in entry order.
struct Unpacked<'b> {
    data: Cow<'b, [u8]>,
    full_hashes: Vec<PageHash>,
}

fn bad_batch(e: crate::protocol::ProtocolError) -> ReceiveError {
    ReceiveError::BadBatch(e.to_string())
}

fn page<M: GuestPages>(memory: &mut M, pages: u64, page: u64) -> Result<&mut [u8], ReceiveError> {
    match memory.page(page) {
        Some(p) if p.len() == PAGE_SIZE && page < pages => Ok(p),
        _ => Err(ReceiveError::BadBatch(format!("page {page} is outside the VM's {pages} pages"))),
    }
}

impl PageWriter {
    /// A writer for a VM of `pages` pages whose memory is all zeroes, with a worker per core.
    pub fn new(pages: u64) -> Result<Self, ReceiveError> {
        Self::with_workers(pages, 0)
    }

    /// A writer on `workers` threads (0: one per core).
    pub fn with_workers(pages: u64, workers: usize) -> Result<Self, ReceiveError> {
        Ok(PageWriter {
            pages,
            hashes: vec![ZERO_HASH; pages as usize],
            digest: MemoryDigest::default(),
            decompressor: zstd::bulk::Decompressor::new().map_err(ReceiveError::Zstd)?,
            scratch: vec![0; PAGE_SIZE],
            received: 0,
            workers: crate::encoder::workers_or_cores(workers),
            pool: None,
        })
    }

    /// The digest of everything written so far.
    pub fn digest(&self) -> MemoryDigest {
        self.digest
    }

    /// Page entries applied so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Applies a batch to `memory` (`base`: the base image offered in Welcome).
    pub fn apply<M: GuestPages>(
        &mut self,
        memory: &mut M,
        base: Option<&BaseImage>,
        batch: &PageBatch,
    ) -> Result<(), ReceiveError> {
        self.apply_all(memory, base, std::slice::from_ref(batch))
    }

    /// Applies batches to `memory` in order, as `apply` one by one would (see the type's
    /// doc for a batch that does not decompress).
    pub fn apply_all<M: GuestPages>(
        &mut self,
        memory: &mut M,
        base: Option<&BaseImage>,
        batches: &[PageBatch],
    ) -> Result<(), ReceiveError> {
        let unpacked = self.unpack(batches)?;
        for (batch, ready) in batches.iter().zip(&unpacked) {
            self.write(memory, base, batch, ready)?;
        }
        Ok(())
    }

    /// Decompresses the batches and hashes their whole pages, on the pool when there is
    /// enough to share.
    fn unpack<'b>(&mut self, batches: &'b [PageBatch]) -> Result<Vec<Unpacked<'b>>, ReceiveError> {
        let parallel = batches.len() > 1 && self.has_pool()?;
        let datas: Vec<Cow<'b, [u8]>> = match &self.pool {
            Some(pool) if parallel => pool.install(|| {
                batches
                    .par_iter()
                    .map_init(zstd::bulk::Decompressor::new, |decompressor, batch| match decompressor {
                        Ok(d) => batch.raw_data(d).map_err(bad_batch),
                        Err(e) => Err(ReceiveError::Zstd(std::io::Error::new(e.kind(), e.to_string()))),
                    })
                    .collect::<Result<_, _>>()
            })?,
            _ => batches
                .iter()
                .map(|b| b.raw_data(&mut self.decompressor).map_err(bad_batch))
                .collect::<Result<_, _>>()?,
        };
        // The whole pages of every batch, in order; then their hashes, split back per batch.
        let mut whole: Vec<&[u8]> = Vec::new();
        let mut per_batch = Vec::with_capacity(batches.len());
        for (batch, data) in batches.iter().zip(&datas) {
            let before = whole.len();
            let mut at = 0usize;
            for entry in &batch.entries {
                if let PageEntry::Full { .. } = entry {
                    whole.push(&data[at..at + PAGE_SIZE]);
                }
                at += entry.data_len();
            }
            per_batch.push(whole.len() - before);
        }
        let parallel = whole.len() >= PARALLEL_MIN_PAGES && self.has_pool()?;
        let hashes: Vec<PageHash> = match &self.pool {
            Some(pool) if parallel => pool.install(|| whole.par_iter().map(|p| page::hash(p)).collect()),
            _ => whole.iter().map(|p| page::hash(p)).collect(),
        };
        let mut hashes = hashes.into_iter();
        Ok(datas
            .into_iter()
            .zip(per_batch)
            .map(|(data, n)| Unpacked { data, full_hashes: hashes.by_ref().take(n).collect() })
            .collect())
    }

    /// Starts the worker pool the first time there is work to share; whether there is one
    /// (never with one worker).
    fn has_pool(&mut self) -> Result<bool, ReceiveError> {
        if self.pool.is_none() {
            self.pool = crate::encoder::worker_pool(self.workers, "migration-apply").map_err(ReceiveError::Workers)?;
        }
        Ok(self.pool.is_some())
    }

    /// Writes an unpacked batch's entries into `memory`, in order.
    fn write<M: GuestPages>(
        &mut self,
        memory: &mut M,
        base: Option<&BaseImage>,
        batch: &PageBatch,
        ready: &Unpacked<'_>,
    ) -> Result<(), ReceiveError> {
        let data = &ready.data;
        let mut full_hashes = ready.full_hashes.iter();
        let pages = self.pages;
        let mut at = 0usize;
        for entry in &batch.entries {
            let page_no = entry.page();
            let hash = match *entry {
                PageEntry::Zero { .. } => {
                    page(memory, pages, page_no)?.fill(0);
                    ZERO_HASH
                }
                PageEntry::Full { .. } => {
                    let bytes = &data[at..at + PAGE_SIZE];
                    at += PAGE_SIZE;
                    page(memory, pages, page_no)?.copy_from_slice(bytes);
                    *full_hashes.next().ok_or_else(|| ReceiveError::BadBatch("a whole page was not hashed".into()))?
                }
                PageEntry::Delta { len, .. } => {
                    let delta = &data[at..at + len as usize];
                    at += len as usize;
                    let target = page(memory, pages, page_no)?;
                    page::apply_delta(target, delta)
                        .map_err(|e| ReceiveError::BadBatch(format!("page {page_no}: {e}")))?;
                    page::hash(target)
                }
                PageEntry::Base { base: index, .. } => {
                    let image =
                        base.ok_or_else(|| ReceiveError::BadBatch("a base page, but this side offered none".into()))?;
                    let hash = image.read(index, &mut self.scratch)?;
                    page(memory, pages, page_no)?.copy_from_slice(&self.scratch);
                    hash
                }
                PageEntry::Copy { from, .. } => {
                    if from >= pages || from == page_no {
                        return Err(ReceiveError::BadBatch(format!("page {page_no} copies from page {from}")));
                    }
                    self.scratch.copy_from_slice(page(memory, pages, from)?);
                    page(memory, pages, page_no)?.copy_from_slice(&self.scratch);
                    self.hashes[from as usize]
                }
            };
            self.record(page_no, hash);
        }
        Ok(())
    }

    fn record(&mut self, page: u64, hash: PageHash) {
        let old = self.hashes[page as usize];
        self.digest.replace(page, &old, &hash);
        self.hashes[page as usize] = hash;
        self.received += 1;
    }

    /// Applies a post-copy batch: whole and zero pages only (the guest runs on what this
    /// side holds, so nothing here is a base for a delta or a copy), each one still in
    /// `pending`, which it leaves once `place` has put it in. Answers the pages placed.
    pub fn apply_whole(
        &mut self,
        batch: &PageBatch,
        pending: &mut DirtySet,
        mut place: impl FnMut(u64, Option<&[u8]>) -> Result<(), ReceiveError>,
    ) -> Result<u64, ReceiveError> {
        let data = batch.raw_data(&mut self.decompressor).map_err(bad_batch)?;
        let mut at = 0usize;
        for entry in &batch.entries {
            let page_no = entry.page();
            if !pending.contains(page_no) {
                return Err(ReceiveError::BadBatch(format!("page {page_no} is not missing here")));
            }
            let hash = match *entry {
                PageEntry::Zero { .. } => {
                    place(page_no, None)?;
                    ZERO_HASH
                }
                PageEntry::Full { .. } => {
                    let bytes = &data[at..at + PAGE_SIZE];
                    at += PAGE_SIZE;
                    place(page_no, Some(bytes))?;
                    page::hash(bytes)
                }
                other => {
                    return Err(ReceiveError::BadBatch(format!(
                        "page {page_no}: post-copy takes whole pages, not {other:?}"
                    )));
                }
            };
            pending.remove(page_no);
            self.record(page_no, hash);
        }
        Ok(batch.entries.len() as u64)
    }
}
