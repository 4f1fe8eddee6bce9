//! Whatever a guest puts in virtio-net's transmit and receive queues: frames are sent or
//! dropped, receive buffers filled or skipped, and the device never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_devices::GuestMemory;
use novacron_devices::virtio::mmio::MmioTransport;
use novacron_devices::virtio::net::{Net, NetConfig, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC};
use novacron_fuzz::{bring_up, event_fd, guest_memory, run_queue, settle};
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock};

struct Rig {
    t: MmioTransport,
    mem: GuestMemory,
    peer: UnixDatagram,
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let (ours, peer) = UnixDatagram::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        peer.set_nonblocking(true).expect("non-blocking");
        let config =
            NetConfig { tap: "fuzz".into(), mac: None, rx_limits: Default::default(), tx_limits: Default::default() };
        let mem = guest_memory();
        let net = Net::with_backend("net0", [0x52, 0x54, 0, 0, 0, 1], &config, Box::new(ours), event_fd())
            .expect("net device");
        Mutex::new(Rig { t: MmioTransport::new(Box::new(net), mem.clone()), mem, peer })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut guard = rig().lock().unwrap_or_else(|p| p.into_inner());
    let Rig { t, mem, peer } = &mut *guard;
    let drivers = bring_up(t, VIRTIO_NET_F_MAC, 2);
    // A frame waiting on the wire, sized by the input, so that receive fills buffers too.
    let frame_len = data.first().map_or(60, |&b| 14 + usize::from(b) * 6);
    let _ = peer.send(&vec![0xab; frame_len]);
    let (tx, rx) = data.split_at(data.len() / 2);
    run_queue(t, mem, &drivers, TX_QUEUE, tx);
    run_queue(t, mem, &drivers, RX_QUEUE, rx);
    let mut sink = [0u8; 2048];
    while peer.recv(&mut sink).is_ok() {}
    std::hint::black_box(settle(t));
});
