//! Whatever a guest puts in a virtio-blk queue (descriptor tables, chains that loop or
//! point anywhere, any header and data): the device answers or drops it, never panics,
//! and never touches memory outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_devices::GuestMemory;
use novacron_devices::virtio::mmio::MmioTransport;
use novacron_fuzz::{block_transport, bring_up, run_queue, settle};
use std::sync::{Mutex, OnceLock};

fn rig() -> &'static Mutex<(MmioTransport, GuestMemory)> {
    static RIG: OnceLock<Mutex<(MmioTransport, GuestMemory)>> = OnceLock::new();
    RIG.get_or_init(|| Mutex::new(block_transport("blk", 64 * 1024)))
}

fuzz_target!(|data: &[u8]| {
    let mut guard = rig().lock().unwrap_or_else(|p| p.into_inner());
    let (t, mem) = &mut *guard;
    let drivers = bring_up(t, novacron_devices::virtio::block::VIRTIO_BLK_F_FLUSH, 1);
    run_queue(t, mem, &drivers, 0, data);
    std::hint::black_box(settle(t));
});
