//! What the virtio fuzz targets share: a device on its transport, brought up by the
//! host-side driver, and a way to lay fuzz input over its queue in guest memory.

use novacron_devices::GuestMemory;
use novacron_devices::virtio::driver::{QueueDriver, initialize, notify};
use novacron_devices::virtio::mmio::MmioTransport;
use vm_memory::{Bytes, GuestAddress};

pub const MEM_BYTES: usize = 1 << 20;
/// Queue rings start here (size 16: descriptors 256 bytes, then the available ring).
pub const QUEUE_BASE: u64 = 0x1000;
pub const QUEUE_SIZE: u16 = 16;
/// Where the rest of the input goes: the buffers descriptors are likely to point at.
pub const DATA_BASE: u64 = 0x8000;

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("map fuzz guest memory")
}

pub fn event_fd() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

/// Resets the device and brings it up again with `queues` queues of QUEUE_SIZE, one
/// after the other from QUEUE_BASE. Returns the queue drivers.
pub fn bring_up(t: &mut MmioTransport, features: u64, queues: usize) -> Vec<QueueDriver> {
    let drivers: Vec<QueueDriver> =
        (0..queues).map(|i| QueueDriver::new(GuestAddress(QUEUE_BASE + i as u64 * 0x400), QUEUE_SIZE)).collect();
    let refs: Vec<&QueueDriver> = drivers.iter().collect();
    initialize(t, features, &refs);
    drivers
}

/// Lays `data` over queue `q`'s descriptor table and available ring (the first 512 bytes:
/// descriptors, flags, idx, ring entries) and the rest over the data area, then kicks the
/// queue and lets the device work. Whatever the bytes say, it must not panic.
pub fn run_queue(t: &mut MmioTransport, mem: &GuestMemory, drivers: &[QueueDriver], q: usize, data: &[u8]) {
    let (rings, rest) = data.split_at(data.len().min(512));
    let _ = mem.write_slice(rings, drivers[q].desc);
    let _ = mem.write_slice(&rest[..rest.len().min(MEM_BYTES - DATA_BASE as usize)], GuestAddress(DATA_BASE));
    notify(t, q as u32);
    t.device_mut().process_queue(q);
}

/// The device's view after a run, touched so that nothing is optimised away.
pub fn settle(t: &mut MmioTransport) -> u64 {
    let common = t.device().common();
    common.acked_features ^ u64::from(common.broken) ^ u64::from(common.interrupt.status())
}

/// A block device on a scratch image of `bytes`, on its transport, for a fuzz target.
pub fn block_transport(tag: &str, bytes: u64) -> (MmioTransport, GuestMemory) {
    use novacron_devices::virtio::block::{Block, BlockConfig};
    let path = std::env::temp_dir().join(format!("novacron-fuzz-{tag}-{}.img", std::process::id()));
    std::fs::File::create(&path).and_then(|f| f.set_len(bytes)).expect("fuzz disk image");
    let config = BlockConfig { path, read_only: false, id: None, limits: Default::default() };
    let mem = guest_memory();
    let block = Block::new("disk0", &config, event_fd()).expect("block device");
    (MmioTransport::new(Box::new(block), mem.clone()), mem)
}
