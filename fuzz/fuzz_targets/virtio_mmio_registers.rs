//! Any sequence of register reads and writes a guest can make on a virtio-mmio window, of
//! any width and offset, interleaved with queue work: the transport ignores what is out of
//! order and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_devices::BusDevice;
use novacron_devices::GuestMemory;
use novacron_devices::virtio::mmio::MmioTransport;
use novacron_fuzz::{block_transport, settle};
use std::sync::{Mutex, OnceLock};

fn rig() -> &'static Mutex<(MmioTransport, GuestMemory)> {
    static RIG: OnceLock<Mutex<(MmioTransport, GuestMemory)>> = OnceLock::new();
    RIG.get_or_init(|| Mutex::new(block_transport("mmio", 8192)))
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
