//! virtio-blk over a raw image file: read, write, flush (fdatasync), get-id, read-only
//! disks. One request queue, processed on the VMM's event-loop thread.

pub mod disk;
pub mod lock;
mod persist;
pub mod request;

pub use persist::{BLOCK_STATE_VERSION, BlockState};

use super::chain;
use super::persist::{DeviceState, PersistError};
use super::update_limiter;
use super::{
    DeviceCommon, EventSource, LimitError, LimitTarget, Served, TYPE_BLOCK, VirtioDevice, admit, limiter_fired,
    serve_queue,
};
use crate::rate_limiter::{BucketUpdate, RateLimiter, RateLimiterConfig, RateLimiterError};
use disk::Disk;
use request::{VIRTIO_BLK_S_OK, execute, read_header};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Segments per request we announce (the queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// How a disk is attached, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// GET_ID's answer, at most 20 bytes; the file name when absent.
    pub id: Option<String>,
    /// Bandwidth (bytes) and request limits; none by default.
    pub limits: RateLimiterConfig,
}

/// Event source id of the rate limiter's timer.
const EVENT_LIMITER: u32 = 0;

pub struct Block {
    common: DeviceCommon,
    disk: Disk,
    limiter: RateLimiter,
    config_space: [u8; 24],
    buffer: Vec<u8>,
}

impl Block {
    pub fn new(name: &str, config: &BlockConfig, irq: EventFd) -> Result<Self, BlockError> {
        let disk = Disk::open(&config.path, config.read_only, config.id.as_deref())?;
        let mut features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if config.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        let common = DeviceCommon::new(name, features, &[QUEUE_SIZE], irq).map_err(BlockError::Setup)?;
        // Config space (spec 5.2.4): capacity, size_max (unused), seg_max, geometry, blk_size.
        let mut config_space = [0u8; 24];
        config_space[..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config_space[20..24].copy_from_slice(&(disk::SECTOR_SIZE as u32).to_le_bytes());
        let limiter = RateLimiter::new(config.limits).map_err(BlockError::Limiter)?;
        Ok(Block { common, disk, limiter, config_space, buffer: Vec::new() })
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Handles one chain; returns the bytes written into it (the used length).
    fn handle_chain(
        disk: &Disk,
        buffer: &mut Vec<u8>,
        id: &str,
        chain: virtio_queue::DescriptorChain<&crate::GuestMemory>,
        mem: &crate::GuestMemory,
    ) -> u32 {
        let shape = match chain::check(&chain, mem) {
            Ok(shape) => shape,
            Err(e) => {
                tracing::debug!(device = %id, "virtio-blk: dropped a malformed chain: {e}");
                return 0;
            }
        };
        // Without a writable byte there is nowhere to put the status: nothing to answer.
        if shape.writable_bytes == 0 {
            return 0;
        }
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else { return 0 };
        let Ok(mut status_writer) = writer.split_at(writer.available_bytes() - 1) else { return 0 };
        let outcome =
            read_header(&mut reader).and_then(|header| execute(disk, header, &mut reader, &mut writer, buffer));
        let status = match outcome {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::debug!(device = %id, "virtio-blk: request failed: {e}");
                e.status()
            }
        };
        let written = writer.bytes_written() as u32;
        match status_writer.write_obj(status) {
            Ok(()) => written + 1,
            Err(_) => written,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("cannot set up the device's queues and event fds")]
    Setup(#[source] std::io::Error),
    #[error("invalid rate limit")]
    Limiter(#[source] RateLimiterError),
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn common(&self) -> &DeviceCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in our configuration space is writable (no writeback-cache toggle).
    }

    fn activated(&mut self) {}

    fn reset_device(&mut self) {}

    fn process_queue(&mut self, index: usize) {
        let (disk, limiter, buffer, id) = (&self.disk, &mut self.limiter, &mut self.buffer, self.common.id.clone());
        serve_queue(&mut self.common, index, |chain, mem| {
            // The request's cost: its data, in whichever direction it moves.
            let bytes = chain::check(&chain, mem).map_or(0, |s| s.readable_bytes.max(s.writable_bytes));
            if !admit(limiter, bytes) {
                return Served::Later;
            }
            Served::Used(Self::handle_chain(disk, buffer, &id, chain, mem))
        });
    }

    fn event_sources(&self) -> Vec<EventSource> {
        vec![EventSource { fd: self.limiter.as_raw_fd(), id: EVENT_LIMITER, edge: false }]
    }

    fn handle_event(&mut self, id: u32) {
        if id == EVENT_LIMITER {
            limiter_fired(&mut self.limiter, &self.common.id);
            self.process_queue(0);
        }
    }

    fn set_rate_limits(
        &mut self,
        target: LimitTarget,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), LimitError> {
        if update_limiter(&mut self.limiter, &self.common.id, target, bandwidth, ops)? {
            self.process_queue(0);
        }
        Ok(())
    }

    fn save_state(&self) -> DeviceState {
        self.save()
    }

    fn restore_state(&mut self, state: &DeviceState, mem: &crate::GuestMemory) -> Result<(), PersistError> {
        self.restore(state, mem)
    }
}

/// Copies the part of `space` at `offset` into `data`; bytes beyond it read as zero.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start < space.len() {
        let n = data.len().min(space.len() - start);
        data[..n].copy_from_slice(&space[start..start + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::request::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use super::*;
    use crate::GuestMemory;
    use crate::virtio::driver::{DESC_F_NEXT, QueueDriver, initialize, notify, register};
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::status;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x20000;
    const DATA: u64 = 0x21000;
    const STATUS: u64 = 0x30000;

    struct Rig {
        t: MmioTransport,
        q: QueueDriver,
        mem: GuestMemory,
        image: tempfile::NamedTempFile,
        irq: EventFd,
    }

    fn rig(read_only: bool) -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(64 * 1024).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let config = BlockConfig {
            path: image.path().into(),
            read_only,
            id: Some("disk-under-test".into()),
            limits: Default::default(),
        };
        let block = Block::new("disk0", &config, irq.try_clone().unwrap()).unwrap();
        let mut t = MmioTransport::new(Box::new(block), mem.clone());
        let q = QueueDriver::new(GuestAddress(0x10000), 16);
        let ro = if read_only { VIRTIO_BLK_F_RO } else { 0 };
        let status = initialize(&mut t, VIRTIO_BLK_F_FLUSH | ro, &[&q]);
        assert_eq!(status & status::DRIVER_OK, status::DRIVER_OK);
        Rig { t, q, mem, image, irq }
    }

    impl Rig {
        /// Posts header + data + status, runs the queue, returns (used length, status byte).
        fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_writable: bool) -> (u32, u8) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HDR, 16, false)];
            if data_len > 0 {
                chain.push((DATA, data_len, data_writable));
            }
            chain.push((STATUS, 1, true));
            self.q.add_chain(&self.mem, &chain);
            self.run()
        }

        fn run(&mut self) -> (u32, u8) {
            notify(&mut self.t, 0);
            self.t.device_mut().process_queue(0);
            let (_, len) = self.q.next_used(&self.mem).expect("the device used the chain");
            (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn test_block_write_reaches_the_file_and_reads_back() {
        let mut r = rig(false);
        let data = pattern(1024, 7);
        r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();

        let write = r.request(VIRTIO_BLK_T_OUT, 2, 1024, false);
        r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        let read = r.request(VIRTIO_BLK_T_IN, 2, 1024, true);
        let flush = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);

        assert_eq!(write, (1, VIRTIO_BLK_S_OK));
        assert_eq!(read, (1025, VIRTIO_BLK_S_OK));
        assert_eq!(flush, (1, VIRTIO_BLK_S_OK));
        let mut back = vec![0u8; 1024];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);
        let file = std::fs::read(r.image.path()).unwrap();
        assert_eq!(&file[1024..2048], data.as_slice());
        assert_eq!(register(&mut r.t, 0x60) & 1, 1, "used-ring interrupt pending");
        assert!(r.irq.read().unwrap() >= 1);
    }

    #[test]
    fn test_block_get_id_answers_the_configured_id() {
        let mut r = rig(false);

        let (len, status) = r.request(VIRTIO_BLK_T_GET_ID, 0, 20, true);

        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
        assert_eq!(&id[..15], b"disk-under-test");
    }

    #[test]
    fn test_block_read_only_disk_refuses_writes_and_keeps_the_file() {
        let mut r = rig(true);
        r.mem.write_slice(&pattern(512, 1), GuestAddress(DATA)).unwrap();

        let (_, status) = r.request(VIRTIO_BLK_T_OUT, 0, 512, false);

        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert!(std::fs::read(r.image.path()).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn test_block_bad_requests_get_error_statuses() {
        let mut r = rig(false);
        let capacity = 64 * 1024 / 512;

        let past_end = r.request(VIRTIO_BLK_T_IN, capacity, 512, true).1;
        let straddles = r.request(VIRTIO_BLK_T_IN, capacity - 1, 1024, true).1;
        let partial = r.request(VIRTIO_BLK_T_IN, 0, 100, true).1;
        let unknown = r.request(99, 0, 0, false).1;
        let wrong_direction = r.request(VIRTIO_BLK_T_IN, 0, 512, false);

        assert_eq!(
            [past_end, straddles, partial, unknown],
            [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP]
        );
        // Reading into a device-readable buffer: no data area to fill, so no transfer.
        assert_eq!(wrong_direction.1, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn test_block_malformed_chains_are_dropped_and_the_device_goes_on() {
        let mut r = rig(false);
        let q_size = r.q.size;
        // A descriptor that loops to itself.
        r.q.write_desc(&r.mem, 0, HDR, 16, DESC_F_NEXT, 0);
        r.q.publish(&r.mem, 0);
        let looping = r.run().0;
        // A buffer far outside guest memory.
        let outside = {
            r.q.write_desc(&r.mem, 1, HDR, 16, DESC_F_NEXT, 2);
            r.q.write_desc(&r.mem, 2, 1 << 40, 512, DESC_F_NEXT | 2, 3);
            r.q.write_desc(&r.mem, 3, STATUS, 1, 2, 0);
            r.q.publish(&r.mem, 1);
            r.run().0
        };
        // A next index beyond the queue.
        r.q.write_desc(&r.mem, 4, HDR, 16, DESC_F_NEXT, q_size + 5);
        r.q.publish(&r.mem, 4);
        let beyond = r.run().0;
        let healthy = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);

        assert_eq!([looping, outside, beyond], [0, 0, 0]);
        assert_eq!(healthy, (1, VIRTIO_BLK_S_OK));
        assert_eq!(register(&mut r.t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn test_block_runaway_available_index_needs_reset_until_reset() {
        let mut r = rig(false);
        r.mem.write_obj(1000u16, GuestAddress(r.q.avail.0 + 2)).unwrap();

        notify(&mut r.t, 0);
        r.t.device_mut().process_queue(0);
        let broken = register(&mut r.t, 0x70);
        let interrupt = register(&mut r.t, 0x60);
        crate::bus::BusDevice::write(&mut r.t, 0x70, &0u32.to_le_bytes());
        let after_reset = register(&mut r.t, 0x70);

        assert_ne!(broken & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(interrupt & crate::virtio::INT_CONFIG, crate::virtio::INT_CONFIG);
        assert_eq!(after_reset, 0);
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;
    use crate::GuestMemory;
    use crate::virtio::driver::{QueueDriver, initialize, notify};
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::persist::{DeviceState, PersistError, TransportState};
    use vm_memory::{Bytes, GuestAddress};

    fn transport(mem: &GuestMemory, image: &std::path::Path, read_only: bool) -> MmioTransport {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let config = BlockConfig { path: image.into(), read_only, id: None, limits: Default::default() };
        MmioTransport::new(Box::new(Block::new("disk0", &config, irq).unwrap()), mem.clone())
    }

    /// A running device that has completed one flush, and its saved state.
    fn saved() -> (GuestMemory, tempfile::NamedTempFile, QueueDriver, TransportState) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(8192).unwrap();
        let mut t = transport(&mem, image.path(), false);
        let mut q = QueueDriver::new(GuestAddress(0x10000), 16);
        initialize(&mut t, VIRTIO_BLK_F_FLUSH, &[&q]);
        mem.write_slice(&request::VIRTIO_BLK_T_FLUSH.to_le_bytes(), GuestAddress(0x20000)).unwrap();
        q.add_chain(&mem, &[(0x20000, 16, false), (0x30000, 1, true)]);
        notify(&mut t, 0);
        t.device_mut().process_queue(0);
        assert_eq!(q.next_used(&mem), Some((0, 1)));
        let state = t.save_state();
        (mem, image, q, state)
    }

    #[test]
    fn test_block_state_round_trips_and_the_restored_device_goes_on() {
        let (mem, image, mut q, state) = saved();
        let text = serde_json::to_string(&state).unwrap();
        let decoded: TransportState = serde_json::from_str(&text).unwrap();
        let mut fresh = transport(&mem, image.path(), false);

        fresh.restore_state(&decoded).unwrap();
        q.add_chain(&mem, &[(0x20000, 16, false), (0x30000, 1, true)]);
        fresh.device_mut().process_queue(0);

        assert_eq!(decoded, state);
        assert_eq!(fresh.save_state().registers, state.registers);
        assert!(fresh.is_running());
        assert_eq!(q.next_used(&mem).map(|(_, len)| len), Some(1), "the second request completes after restore");
    }

    #[test]
    fn test_block_restore_refuses_mismatched_or_corrupt_states_and_changes_nothing() {
        let (mem, image, _q, state) = saved();
        let other = tempfile::NamedTempFile::new().unwrap();
        other.as_file().set_len(4096).unwrap();
        let DeviceState::Block(block) = &state.device else { panic!("a block state") };
        let with = |f: &dyn Fn(&mut TransportState)| {
            let mut s = state.clone();
            f(&mut s);
            s
        };
        let corrupt = [
            with(&|s| s.version = 9),
            with(&|s| {
                s.device = DeviceState::Rng(crate::virtio::rng::RngState {
                    version: 1,
                    common: block.common.clone(),
                    limiter: block.limiter.clone(),
                })
            }),
            with(&|s| s.registers.status = 0xff00),
            with(&|s| s.registers.status = 0),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.version = 2
                }
            }),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.read_only = true
                }
            }),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.common.acked_features |= 1 << 60
                }
            }),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.common.queues.push(b.common.queues[0])
                }
            }),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.common.queues[0].size = 3
                }
            }),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.common.queues[0].used_ring = 1 << 40
                }
            }),
            with(&|s| {
                if let DeviceState::Block(b) = &mut s.device {
                    b.common.interrupt_status = 0x80
                }
            }),
        ];
        for (i, bad) in corrupt.iter().enumerate() {
            let mut fresh = transport(&mem, image.path(), false);
            let before = fresh.save_state();
            let result = fresh.restore_state(bad);
            assert!(result.is_err(), "corrupt state {i} was accepted");
            assert_eq!(fresh.save_state(), before, "corrupt state {i} changed the device");
        }
        let mut smaller = transport(&mem, other.path(), false);
        assert!(matches!(
            smaller.restore_state(&state),
            Err(PersistError::Mismatch { what: "disk size in sectors", .. })
        ));
    }
}
