//! Whatever a guest puts in a virtio-blk queue (descriptor tables, chains that loop or
//! point anywhere, any header and data): the device answers or drops it, never panics,
//! and never touches memory outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_devices::GuestMemory;
use novacron_devices::virtio::block::{Block, BlockConfig};
use novacron_devices::virtio::mmio::MmioTransport;
use novacron_fuzz::{bring_up, event_fd, guest_memory, run_queue, settle};
use std::sync::{Mutex, OnceLock};

fn rig() -> &'static Mutex<(MmioTransport, GuestMemory)> {
    static RIG: OnceLock<Mutex<(MmioTransport, GuestMemory)>> = OnceLock::new();
    RIG.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("novacron-fuzz-blk-{}.img", std::process::id()));
        std::fs::File::create(&path).and_then(|f| f.set_len(64 * 1024)).expect("fuzz disk image");
        let config = BlockConfig { path, read_only: false, id: None, limits: Default::default() };
        let mem = guest_memory();
        let block = Block::new("disk0", &config, event_fd()).expect("block device");
        Mutex::new((MmioTransport::new(Box::new(block), mem.clone()), mem))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut guard = rig().lock().unwrap_or_else(|p| p.into_inner());
    let (t, mem) = &mut *guard;
    let drivers = bring_up(t, novacron_devices::virtio::block::VIRTIO_BLK_F_FLUSH, 1);
    run_queue(t, mem, &drivers, 0, data);
    std::hint::black_box(settle(t));
});
