//! Snapshots: a VM's complete state in a directory.
//!
//! ```text
//! DIR/state.bin   a state stream (novacron_migration::stream) with these sections:
//!                   1 machine   the VM's shape and devices (MachineSpec)
//!                   2 vcpu      one per vCPU, in index order (VcpuState)
//!                   3 vm        PICs, IOAPIC, PIT, KVM clock (VmState)
//!                   4 devices   every virtio transport with its device (by name, slot order)
//!                   5 serial    the 8250's registers and FIFO
//!                   6 memory    the RAM regions' sizes, a CRC-32 per 2 MiB of memory, and
//!                               the name of the memory file (version 2)
//!                   7 run       whether the VM ran when it was saved (optional)
//! DIR/memory.bin  guest RAM, region after region; all-zero pages are left as holes
//!   or memory.1.bin (the memory section says which)
//! ```
//!
//! Every section is versioned and checksummed by the stream; memory by its chunk CRCs. A
//! restore checks all of it before it builds anything, and maps the memory file privately
//! (copy-on-write) rather than reading it: untouched guest pages stay in the page cache.
//!
//! A directory always holds one whole snapshot. A new one never writes into a file that
//! exists: its memory goes to whichever of the two memory names the current state.bin
//! does not use, its state to state.bin.partial; both are synced, and renaming the state
//! over state.bin is the moment the new snapshot replaces the old. Only then is the old
//! memory file removed (unlinked: a VM restored from it keeps its mapping). A failure
//! before that removes what this write created and leaves the old snapshot as it was.

pub mod lazy;

use crate::vstate::memory::GuestMemory;
use crate::vstate::persist::{VcpuState, VmState};
use novacron_devices::legacy::SerialState;
use novacron_devices::rate_limiter::RateLimiterConfig;
use novacron_devices::virtio::block::BlockConfig;
use novacron_devices::virtio::net::NetConfig;
use novacron_devices::virtio::persist::TransportState;
use novacron_migration::stream::{self, Section, StreamError};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

pub const STATE_FILE: &str = "state.bin";
/// The memory file's two names: a new snapshot takes the one the old does not use.
pub const MEMORY_FILES: [&str; 2] = ["memory.bin", "memory.1.bin"];
const PARTIAL_STATE_FILE: &str = "state.bin.partial";

pub const SECTION_MACHINE: u16 = 1;
pub const SECTION_VCPU: u16 = 2;
pub const SECTION_VM: u16 = 3;
pub const SECTION_DEVICES: u16 = 4;
pub const SECTION_SERIAL: u16 = 5;
pub const SECTION_MEMORY: u16 = 6;
pub const SECTION_RUN: u16 = 7;

/// Payload versions of this build (the stream checks that sections carry them).
const MACHINE_VERSION: u16 = 1;
const DEVICES_VERSION: u16 = 1;
/// Version 2 names the memory file; version 1 (no name: memory.bin) is still read.
const MEMORY_VERSION: u16 = 2;
const STATE_VERSION: u16 = 1;
const RUN_VERSION: u16 = 1;
/// A state.bin is tens of KiB; a reader refuses one larger than this before reading it.
const MAX_STATE_BYTES: u64 = 256 << 20;

const PAGE: usize = 4096;
/// No snapshot describes more memory than this (16 TiB): the bound keeps size arithmetic
/// on a damaged file from overflowing.
const MAX_MEM_MIB: u64 = 16 << 20;
/// Memory is checksummed in chunks of this size.
pub const CHUNK_BYTES: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid snapshot")]
    Stream {
        path: PathBuf,
        #[source]
        source: StreamError,
    },
    #[error("bad state section")]
    Section(#[source] StreamError),
    #[error("the snapshot has no {0} section")]
    Missing(&'static str),
    #[error("section {what} has version {found}; this VMM reads {expected}")]
    SectionVersion { what: &'static str, found: u16, expected: u16 },
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error("{file} chunk {chunk} fails its checksum: the memory image was altered or damaged")]
    MemoryChecksum { file: String, chunk: usize },
    #[error("cannot map the memory image")]
    Map(String),
    #[error("cannot serve the guest's memory lazily (restore with --memory eager instead)")]
    Userfault(#[source] crate::vstate::uffd::UffdError),
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is {bytes} bytes, more than a state file can be")]
    StateTooLarge { path: PathBuf, bytes: u64 },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { what, path, source }
}

/// What the VM is made of: enough to build the same machine again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// For status and logs: the kernel the VM booted first.
    pub kernel: String,
    pub boot_format: String,
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub region_sizes: Vec<u64>,
    pub chunk_crcs: Vec<u32>,
    /// The memory file in the snapshot's directory: one of MEMORY_FILES.
    pub file: String,
}

/// The memory section as version 1 wrote it: the file was always memory.bin.
#[derive(Deserialize)]
struct MemoryInfoV1 {
    region_sizes: Vec<u64>,
    chunk_crcs: Vec<u32>,
}

/// Whether the VM ran when its state was saved (the save itself pauses it). A migration's
/// destination leaves a VM paused that was paused at the source. States without this
/// section come from builds that did not record it, and count as running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub paused: bool,
}

/// A paused VM's state without its memory: what a snapshot's state.bin and a migration's
/// state message carry.
pub struct SavedState {
    pub spec: MachineSpec,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: Vec<(String, TransportState)>,
    pub serial: SerialState,
    pub run: RunState,
}

impl SavedState {
    /// The state as sections of a state stream (memory's section is added by the caller).
    pub fn to_sections(&self) -> Result<Vec<Section>, StreamError> {
        let mut sections = vec![Section::new(SECTION_MACHINE, MACHINE_VERSION, "machine", &self.spec)?];
        for v in &self.vcpus {
            sections.push(Section::new(SECTION_VCPU, STATE_VERSION, "vcpu", v)?);
        }
        sections.push(Section::new(SECTION_VM, STATE_VERSION, "vm", &self.vm)?);
        sections.push(Section::new(SECTION_DEVICES, DEVICES_VERSION, "devices", &self.devices)?);
        sections.push(Section::new(SECTION_SERIAL, STATE_VERSION, "serial", &self.serial)?);
        sections.push(Section::new(SECTION_RUN, RUN_VERSION, "run", &self.run)?);
        Ok(sections)
    }

    /// Reads the state back from sections, checking versions and that the parts agree.
    pub fn from_sections(sections: &[Section]) -> Result<Self, SnapshotError> {
        let spec: MachineSpec = one(sections, SECTION_MACHINE, MACHINE_VERSION, "machine")?;
        let mut vcpus = Vec::new();
        for s in sections.iter().filter(|s| s.kind == SECTION_VCPU) {
            if s.version != STATE_VERSION {
                return Err(SnapshotError::SectionVersion { what: "vcpu", found: s.version, expected: STATE_VERSION });
            }
            vcpus.push(s.decode("vcpu").map_err(SnapshotError::Section)?);
        }
        if vcpus.len() != usize::from(spec.vcpus) || vcpus.is_empty() {
            return Err(SnapshotError::Inconsistent(format!("{} vCPU sections for {} vCPUs", vcpus.len(), spec.vcpus)));
        }
        Ok(SavedState {
            spec,
            vcpus,
            vm: one(sections, SECTION_VM, STATE_VERSION, "vm")?,
            devices: one(sections, SECTION_DEVICES, DEVICES_VERSION, "devices")?,
            serial: one(sections, SECTION_SERIAL, STATE_VERSION, "serial")?,
            run: match sections.iter().any(|s| s.kind == SECTION_RUN) {
                true => one(sections, SECTION_RUN, RUN_VERSION, "run")?,
                false => RunState { paused: false },
            },
        })
    }
}

/// A snapshot's state, read and checked; its memory is checked when it is mapped.
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: SavedState,
    pub memory: MemoryInfo,
}

impl Snapshot {
    /// The file holding the snapshot's guest memory.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.memory.file)
    }
}

/// What a snapshot cost, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    /// Pages written (the rest were zero and left as holes).
    pub pages_written: u64,
}

/// Creates `path`, which must not exist, readable by this user only (it holds a guest's
/// memory or state).
fn create_new(path: &Path) -> Result<File, SnapshotError> {
    File::options().write(true).create_new(true).mode(0o600).open(path).map_err(io("create", path))
}

/// Writes guest memory to a new file `path`: zero pages are skipped (holes), and a CRC is
/// kept per chunk of CHUNK_BYTES (holes count as zeros).
fn write_memory(memory: &GuestMemory, path: &Path, name: &str) -> Result<(MemoryInfo, u64), SnapshotError> {
    let file = create_new(path)?;
    let mut info = MemoryInfo { region_sizes: Vec::new(), chunk_crcs: Vec::new(), file: name.to_string() };
    let mut offset = 0u64;
    let mut pages_written = 0u64;
    let mut crc = crc32fast::Hasher::new();
    let mut page = [0u8; PAGE];
    for region in memory.iter() {
        let len = region.len();
        info.region_sizes.push(len);
        for at in (0..len).step_by(PAGE) {
            let n = (len - at).min(PAGE as u64) as usize;
            let buf = &mut page[..n];
            region
                .read_slice(buf, vm_memory::MemoryRegionAddress(at))
                .map_err(|e| SnapshotError::Map(format!("reading guest memory: {e}")))?;
            if buf.iter().any(|&b| b != 0) {
                file.write_all_at(buf, offset + at).map_err(io("write", path))?;
                pages_written += 1;
            }
            crc.update(buf);
            if (offset + at + n as u64).is_multiple_of(CHUNK_BYTES) {
                info.chunk_crcs.push(std::mem::replace(&mut crc, crc32fast::Hasher::new()).finalize());
            }
        }
        offset += len;
    }
    if !offset.is_multiple_of(CHUNK_BYTES) {
        info.chunk_crcs.push(crc.finalize());
    }
    file.set_len(offset).map_err(io("size", path))?;
    file.sync_all().map_err(io("sync", path))?;
    Ok((info, pages_written))
}

/// The memory file that the snapshot in `dir` uses, if `dir` holds a readable one.
fn memory_file_in_use(dir: &Path) -> Option<String> {
    read(dir).ok().map(|s| s.memory.file)
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync", dir))
}

fn remove_if_there(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Writes a snapshot of a paused VM into `dir` (created if needed), replacing the one
/// that is there only once the new one is complete and synced (see the module doc).
pub fn write(dir: &Path, state: &SavedState, memory: &GuestMemory) -> Result<SnapshotStats, SnapshotError> {
    let created_dir = !dir.exists();
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let old = memory_file_in_use(dir);
    let name = MEMORY_FILES.iter().find(|n| old.as_deref() != Some(**n)).copied().unwrap_or(MEMORY_FILES[0]);
    let memory_path = dir.join(name);
    let partial = dir.join(PARTIAL_STATE_FILE);
    // Neither is part of the snapshot in `dir`: leftovers of a write that did not finish.
    remove_if_there(&memory_path)?;
    remove_if_there(&partial)?;
    let written = write_new(dir, state, memory, name);
    let stats = match written {
        Ok(stats) => stats,
        Err(e) => {
            let _ = std::fs::remove_file(&memory_path);
            let _ = std::fs::remove_file(&partial);
            if created_dir {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    // The new snapshot is in place; the old memory file is no longer part of it.
    if let Some(old) = old.filter(|o| o != name) {
        remove_if_there(&dir.join(old))?;
    }
    sync_dir(dir)?;
    Ok(stats)
}

/// Writes the memory file `name` and the state, and renames the state into place.
fn write_new(dir: &Path, state: &SavedState, memory: &GuestMemory, name: &str) -> Result<SnapshotStats, SnapshotError> {
    let (memory_info, pages_written) = write_memory(memory, &dir.join(name), name)?;
    let state_path = dir.join(STATE_FILE);
    let enc = |e: StreamError| SnapshotError::Stream { path: state_path.clone(), source: e };
    let mut sections = state.to_sections().map_err(enc)?;
    sections.push(Section::new(SECTION_MEMORY, MEMORY_VERSION, "memory", &memory_info).map_err(enc)?);
    let bytes = stream::encode(&sections);
    let partial = dir.join(PARTIAL_STATE_FILE);
    let mut f = create_new(&partial)?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io("write", &partial))?;
    std::fs::rename(&partial, &state_path).map_err(io("rename", &state_path))?;
    let memory_bytes = memory.iter().map(|r| r.len()).sum();
    Ok(SnapshotStats { state_bytes: bytes.len() as u64, memory_bytes, pages_written })
}

/// Opens `path` for reading if it is a regular file (never blocking on a FIFO).
pub fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    novacron_migration::open_regular(path).map_err(|e| match e {
        novacron_migration::OpenError::Io(source) => SnapshotError::Io { what: "open", path: path.to_owned(), source },
        novacron_migration::OpenError::NotAFile => SnapshotError::NotAFile { path: path.to_owned() },
    })
}

fn one<T: serde::de::DeserializeOwned>(
    sections: &[Section],
    kind: u16,
    version: u16,
    what: &'static str,
) -> Result<T, SnapshotError> {
    let s = sections.iter().find(|s| s.kind == kind).ok_or(SnapshotError::Missing(what))?;
    if s.version != version {
        return Err(SnapshotError::SectionVersion { what, found: s.version, expected: version });
    }
    s.decode(what).map_err(SnapshotError::Section)
}

/// The memory section, of this version or the one before (whose file was memory.bin).
fn memory_section(sections: &[Section]) -> Result<MemoryInfo, SnapshotError> {
    let s = sections.iter().find(|s| s.kind == SECTION_MEMORY).ok_or(SnapshotError::Missing("memory"))?;
    let memory = match s.version {
        MEMORY_VERSION => s.decode::<MemoryInfo>("memory").map_err(SnapshotError::Section)?,
        1 => {
            let v1: MemoryInfoV1 = s.decode("memory").map_err(SnapshotError::Section)?;
            MemoryInfo { region_sizes: v1.region_sizes, chunk_crcs: v1.chunk_crcs, file: MEMORY_FILES[0].to_string() }
        }
        found => return Err(SnapshotError::SectionVersion { what: "memory", found, expected: MEMORY_VERSION }),
    };
    if !MEMORY_FILES.contains(&memory.file.as_str()) {
        return Err(SnapshotError::Inconsistent(format!(
            "memory file {:?} is not one of {MEMORY_FILES:?}",
            memory.file
        )));
    }
    Ok(memory)
}

/// Parses and checks the bytes of a state.bin: the VM's state and the memory image's shape.
pub fn parse_state(bytes: &[u8]) -> Result<(SavedState, MemoryInfo), SnapshotError> {
    let sections = stream::decode(bytes).map_err(SnapshotError::Section)?;
    let state = SavedState::from_sections(&sections)?;
    if state.spec.mem_mib > MAX_MEM_MIB {
        return Err(SnapshotError::Inconsistent(format!("{} MiB of memory", state.spec.mem_mib)));
    }
    let memory = memory_section(&sections)?;
    let expected: Vec<u64> =
        crate::arch::x86_64::layout::ram_ranges(state.spec.mem_mib << 20).iter().map(|r| r.1).collect();
    if memory.region_sizes != expected {
        return Err(SnapshotError::Inconsistent(format!(
            "memory regions {:?} for {} MiB",
            memory.region_sizes, state.spec.mem_mib
        )));
    }
    let total: u64 = memory.region_sizes.iter().sum();
    if memory.chunk_crcs.len() as u64 != total.div_ceil(CHUNK_BYTES) {
        return Err(SnapshotError::Inconsistent(format!(
            "{} memory checksums for {total} bytes",
            memory.chunk_crcs.len()
        )));
    }
    Ok((state, memory))
}

/// Reads and checks a snapshot's state (memory is checked when it is mapped).
pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let mut file = open_regular(&state_path)?;
    let len = file.metadata().map_err(io("read", &state_path))?.len();
    if len > MAX_STATE_BYTES {
        return Err(SnapshotError::StateTooLarge { path: state_path, bytes: len });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes).map_err(io("read", &state_path))?;
    let (state, memory) = parse_state(&bytes).map_err(|e| match e {
        SnapshotError::Section(source) => SnapshotError::Stream { path: state_path.clone(), source },
        other => other,
    })?;
    Ok(Snapshot { dir: dir.to_owned(), state, memory })
}

/// Opens the memory file that `info` (in `dir`) describes, if it is a regular file of the
/// size the snapshot says; returns it with that size.
fn open_memory(dir: &Path, info: &MemoryInfo) -> Result<(File, u64), SnapshotError> {
    let path = dir.join(&info.file);
    let file = open_regular(&path)?;
    let total: u64 = info.region_sizes.iter().sum();
    let len = file.metadata().map_err(io("read", &path))?.len();
    if len != total {
        return Err(SnapshotError::Inconsistent(format!("{} has {len} bytes, the snapshot says {total}", info.file)));
    }
    Ok((file, total))
}

/// Maps the memory file as the guest's RAM, privately: the guest's writes never reach the
/// file. Every chunk is checked against its CRC first.
pub fn map_memory(snapshot: &Snapshot) -> Result<GuestMemory, SnapshotError> {
    let (file, total) = open_memory(&snapshot.dir, &snapshot.memory)?;
    let path = snapshot.memory_path();
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    for (chunk, expected) in snapshot.memory.chunk_crcs.iter().enumerate() {
        let at = chunk as u64 * CHUNK_BYTES;
        let n = (total - at).min(CHUNK_BYTES) as usize;
        file.read_exact_at(&mut buf[..n], at).map_err(io("read", &path))?;
        if crc32fast::hash(&buf[..n]) != *expected {
            return Err(SnapshotError::MemoryChecksum { file: snapshot.memory.file.clone(), chunk });
        }
    }
    let ranges = crate::arch::x86_64::layout::ram_ranges(total);
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (start, size) in ranges {
        let mapping = MmapRegionBuilder::new_with_bitmap(size as usize, AtomicBitmap::with_len(size as usize))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start.0))
            .ok_or_else(|| SnapshotError::Map(format!("region at {:#x} overflows", start.0)))?;
        regions.push(region);
        offset += size;
    }
    GuestMemory::from_regions(regions).map_err(|e| SnapshotError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct V1 {
        region_sizes: Vec<u64>,
        chunk_crcs: Vec<u32>,
    }

    #[test]
    fn test_memory_section_of_the_previous_version_names_memory_bin() {
        let v1 = V1 { region_sizes: vec![64 << 20], chunk_crcs: vec![7; 32] };
        let section = Section::new(SECTION_MEMORY, 1, "memory", &v1).unwrap();

        let memory = memory_section(&[section]).unwrap();

        assert_eq!(memory.file, "memory.bin");
        assert_eq!((memory.region_sizes, memory.chunk_crcs.len()), (vec![64 << 20], 32));
    }

    #[test]
    fn test_memory_section_naming_another_file_or_of_a_newer_version_is_refused() {
        let info = |file: &str| MemoryInfo { region_sizes: vec![1 << 20], chunk_crcs: vec![0], file: file.into() };
        let escape = Section::new(SECTION_MEMORY, MEMORY_VERSION, "memory", &info("../../etc/shadow")).unwrap();
        let newer = Section::new(SECTION_MEMORY, MEMORY_VERSION + 1, "memory", &info("memory.bin")).unwrap();
        let alternate = Section::new(SECTION_MEMORY, MEMORY_VERSION, "memory", &info("memory.1.bin")).unwrap();

        assert!(matches!(memory_section(&[escape]), Err(SnapshotError::Inconsistent(_))));
        assert!(matches!(
            memory_section(&[newer]),
            Err(SnapshotError::SectionVersion { what: "memory", found: 3, expected: 2 })
        ));
        assert_eq!(memory_section(&[alternate]).unwrap().file, "memory.1.bin");
    }
}
