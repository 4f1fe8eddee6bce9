//! Any sequence of register reads and writes a guest can make on a virtio-mmio window, of
//! any width and offset, interleaved with queue work: the transport ignores what is out of
//! order and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_devices::BusDevice;
use novacron_devices::GuestMemory;
use novacron_devices::virtio::block::{Block, BlockConfig};
use novacron_devices::virtio::mmio::MmioTransport;
use novacron_fuzz::{event_fd, guest_memory, settle};
use std::sync::{Mutex, OnceLock};

fn rig() -> &'static Mutex<(MmioTransport, GuestMemory)> {
    static RIG: OnceLock<Mutex<(MmioTransport, GuestMemory)>> = OnceLock::new();
    RIG.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("novacron-fuzz-mmio-{}.img", std::process::id()));
        std::fs::File::create(&path).and_then(|f| f.set_len(8192)).expect("fuzz disk image");
        let config = BlockConfig { path, read_only: false, id: None, limits: Default::default() };
        let mem = guest_memory();
        let block = Block::new("disk0", &config, event_fd()).expect("block device");
        Mutex::new((MmioTransport::new(Box::new(block), mem.clone()), mem))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut guard = rig().lock().unwrap_or_else(|p| p.into_inner());
    let (t, _mem) = &mut *guard;
    // Start from reset, as a fresh driver would see the device.
    t.write(0x70, &0u32.to_le_bytes());
    // Each 8 bytes: kind, offset (2), width, value (4).
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x200;
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let value = u64::from(u32::from_le_bytes([op[4], op[5], op[6], op[7]]));
        match op[0] % 4 {
            0 => t.write(offset, &value.to_le_bytes()[..width]),
            1 => t.read(offset, &mut [0u8; 8][..width]),
            2 => t.device_mut().process_queue(usize::from(op[4] % 2)),
            _ => {
                let _ = t.save_state();
            }
        }
    }
    std::hint::black_box(settle(t));
});
