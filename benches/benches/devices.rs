//! Device models without KVM: requests per second through a prepared queue in guest
//! memory, processed the way the VMM's event loop does it.
//!
//!     cargo bench -p novacron-benches --bench devices

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use novacron_benches::rig::{event_fd, rig, tmpfs_image};
use novacron_devices::virtio::block::{Block, BlockConfig, VIRTIO_BLK_F_FLUSH};
use novacron_devices::virtio::net::{HEADER_BYTES, Net, NetConfig, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC};
use std::os::unix::net::UnixDatagram;
use vm_memory::{Bytes, GuestAddress};

/// Requests per batch: posted together, processed in one pass, as under load.
const BATCH: usize = 32;
const BLOCK: u32 = 4096;

fn block(c: &mut Criterion) {
    let path = tmpfs_image("blk", 64 << 20);
    let config = BlockConfig { path: path.clone(), read_only: false, id: None, limits: Default::default() };
    let mut r = rig(Box::new(Block::new("disk0", &config, event_fd()).expect("block")), VIRTIO_BLK_F_FLUSH, 1, 256);
    let mut group = c.benchmark_group("virtio-blk");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, kind, writable) in [("read 4 KiB", 0u32, true), ("write 4 KiB", 1, false)] {
        // Each request: header, 4 KiB of data, status, in their own pages.
        for i in 0..BATCH as u64 {
            let header = [kind.to_le_bytes(), 0u32.to_le_bytes()].concat();
            let at = 0x100000 + i * 0x2000;
            r.mem.write_slice(&header, GuestAddress(at)).expect("header");
            r.mem.write_obj(i * 8, GuestAddress(at + 8)).expect("sector");
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                for i in 0..BATCH as u64 {
                    let at = 0x100000 + i * 0x2000;
                    r.queues[0]
                        .add_chain(&r.mem, &[(at, 16, false), (at + 0x1000, BLOCK, writable), (at + 16, 1, true)]);
                }
                r.t.device_mut().process_queue(0);
                while r.queues[0].next_used(&r.mem).is_some() {}
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_file(path);
}

fn net(c: &mut Criterion) {
    let (ours, peer) = UnixDatagram::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    // Room for a whole batch of frames in each direction.
    for fd in [&ours, &peer] {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 4 << 20;
        // SAFETY: sets an int socket option on a socket we own, from a live int.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                4,
            );
        }
    }
    let config =
        NetConfig { tap: "bench".into(), mac: None, rx_limits: Default::default(), tx_limits: Default::default() };
    let net = Net::with_backend("net0", [0x52, 0x54, 0, 0, 0, 1], &config, Box::new(ours), event_fd()).expect("net");
    let mut r = rig(Box::new(net), VIRTIO_NET_F_MAC, 2, 256);
    let frame_len = 1514u32;
    let mut group = c.benchmark_group("virtio-net");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut sink = vec![0u8; 2048];
    group.bench_function("transmit 1514-byte frames", |b| {
        b.iter(|| {
            for i in 0..BATCH as u64 {
                r.queues[TX_QUEUE]
                    .add_chain(&r.mem, &[(0x400000 + i * 0x1000, HEADER_BYTES as u32 + frame_len, false)]);
            }
            r.t.device_mut().process_queue(TX_QUEUE);
            while r.queues[TX_QUEUE].next_used(&r.mem).is_some() {}
            while peer.recv(&mut sink).is_ok() {}
        })
    });
    let frame = vec![0xabu8; frame_len as usize];
    group.bench_function("receive 1514-byte frames", |b| {
        b.iter(|| {
            for i in 0..BATCH as u64 {
                r.queues[RX_QUEUE].add_chain(&r.mem, &[(0x800000 + i * 0x1000, 1526, true)]);
                let _ = peer.send(&frame);
            }
            r.t.device_mut().process_queue(RX_QUEUE);
            while r.queues[RX_QUEUE].next_used(&r.mem).is_some() {}
        })
    });
    group.finish();
}

criterion_group!(benches, block, net);
criterion_main!(benches);
