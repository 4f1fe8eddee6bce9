//! Snapshots: a VM's complete state in a directory.
//!
//! ```text
//! DIR/state.bin   a state stream (novacron_migration::stream) with these sections:
//!                   1 machine   the VM's shape and devices (MachineSpec)
//!                   2 vcpu      one per vCPU, in index order (VcpuState)
//!                   3 vm        PICs, IOAPIC, PIT, KVM clock (VmState)
//!                   4 devices   every virtio transport with its device (by name, slot order)
//!                   5 serial    the 8250's registers and FIFO
//!                   6 memory    the RAM regions' sizes and a CRC-32 per 2 MiB of memory.bin
//! DIR/memory.bin  guest RAM, region after region; all-zero pages are left as holes
//! ```
//!
//! Every section is versioned and checksummed by the stream; memory by its chunk CRCs. A
//! restore checks all of it before it builds anything, and maps memory.bin privately
//! (copy-on-write) rather than reading it: untouched guest pages stay in the page cache.

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
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

pub const SECTION_MACHINE: u16 = 1;
pub const SECTION_VCPU: u16 = 2;
pub const SECTION_VM: u16 = 3;
pub const SECTION_DEVICES: u16 = 4;
pub const SECTION_SERIAL: u16 = 5;
pub const SECTION_MEMORY: u16 = 6;

/// Payload versions of this build (the stream checks that sections carry them).
const MACHINE_VERSION: u16 = 1;
const DEVICES_VERSION: u16 = 1;
const MEMORY_VERSION: u16 = 1;
const STATE_VERSION: u16 = 1;

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
    #[error("memory.bin chunk {chunk} fails its checksum: the memory image was altered or damaged")]
    MemoryChecksum { chunk: usize },
    #[error("cannot map the memory image")]
    Map(String),
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
}

/// A paused VM's state without its memory: what a snapshot's state.bin and a migration's
/// state message carry.
pub struct SavedState {
    pub spec: MachineSpec,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: Vec<(String, TransportState)>,
    pub serial: SerialState,
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
        })
    }
}

/// A snapshot's state, read and checked; its memory is checked when it is mapped.
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: SavedState,
    pub memory: MemoryInfo,
}

/// What a snapshot cost, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    /// Pages written (the rest were zero and left as holes).
    pub pages_written: u64,
}

/// Writes guest memory to `path`: zero pages are skipped (holes), and a CRC is kept per
/// chunk of CHUNK_BYTES (holes count as zeros).
fn write_memory(memory: &GuestMemory, path: &Path) -> Result<(MemoryInfo, u64), SnapshotError> {
    let file = File::create(path).map_err(io("create", path))?;
    let mut info = MemoryInfo { region_sizes: Vec::new(), chunk_crcs: Vec::new() };
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

/// Writes a snapshot of a paused VM into `dir` (created if needed).
pub fn write(dir: &Path, state: &SavedState, memory: &GuestMemory) -> Result<SnapshotStats, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let memory_path = dir.join(MEMORY_FILE);
    let (memory_info, pages_written) = write_memory(memory, &memory_path)?;
    let enc = |e: StreamError| SnapshotError::Stream { path: dir.join(STATE_FILE), source: e };
    let mut sections = state.to_sections().map_err(enc)?;
    sections.push(Section::new(SECTION_MEMORY, MEMORY_VERSION, "memory", &memory_info).map_err(enc)?);
    let bytes = stream::encode(&sections);
    // Written aside and renamed: a crash never leaves a half-written state file.
    let state_path = dir.join(STATE_FILE);
    let partial = dir.join(format!("{STATE_FILE}.partial"));
    let mut f = File::create(&partial).map_err(io("create", &partial))?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io("write", &partial))?;
    std::fs::rename(&partial, &state_path).map_err(io("rename", &state_path))?;
    let memory_bytes = memory.iter().map(|r| r.len()).sum();
    Ok(SnapshotStats { state_bytes: bytes.len() as u64, memory_bytes, pages_written })
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

/// Parses and checks the bytes of a state.bin: the VM's state and the memory image's shape.
pub fn parse_state(bytes: &[u8]) -> Result<(SavedState, MemoryInfo), SnapshotError> {
    let sections = stream::decode(bytes).map_err(SnapshotError::Section)?;
    let state = SavedState::from_sections(&sections)?;
    if state.spec.mem_mib > MAX_MEM_MIB {
        return Err(SnapshotError::Inconsistent(format!("{} MiB of memory", state.spec.mem_mib)));
    }
    let memory: MemoryInfo = one(&sections, SECTION_MEMORY, MEMORY_VERSION, "memory")?;
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
    let bytes = std::fs::read(&state_path).map_err(io("read", &state_path))?;
    let (state, memory) = parse_state(&bytes).map_err(|e| match e {
        SnapshotError::Section(source) => SnapshotError::Stream { path: state_path.clone(), source },
        other => other,
    })?;
    Ok(Snapshot { dir: dir.to_owned(), state, memory })
}

/// Maps memory.bin as the guest's RAM, privately: the guest's writes never reach the file.
/// Every chunk is checked against its CRC first.
pub fn map_memory(snapshot: &Snapshot) -> Result<GuestMemory, SnapshotError> {
    let path = snapshot.dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io("open", &path))?;
    let total: u64 = snapshot.memory.region_sizes.iter().sum();
    let len = file.metadata().map_err(io("read", &path))?.len();
    if len != total {
        return Err(SnapshotError::Inconsistent(format!("memory.bin has {len} bytes, the snapshot says {total}")));
    }
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    for (chunk, expected) in snapshot.memory.chunk_crcs.iter().enumerate() {
        let at = chunk as u64 * CHUNK_BYTES;
        let n = (total - at).min(CHUNK_BYTES) as usize;
        file.read_exact_at(&mut buf[..n], at).map_err(io("read", &path))?;
        if crc32fast::hash(&buf[..n]) != *expected {
            return Err(SnapshotError::MemoryChecksum { chunk });
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
