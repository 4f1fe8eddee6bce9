//! virtio-net over a tap device: one receive and one transmit queue, a MAC address, no
//! offloads. Every frame carries the 12-byte virtio_net_hdr_v1 in front (spec 5.1.6),
//! all zero here: no checksum offload, no segmentation, one buffer per frame.

mod persist;
pub mod tap;

/// Where a network device's frames go and come from: a tap in the VMM, a Unix datagram
/// socket in benchmarks and fuzzing (a real socket, with the same non-blocking semantics).
pub trait FrameBackend: AsRawFd + Send {
    /// One frame, or WouldBlock when none is waiting.
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize>;
}

impl FrameBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        Tap::read_frame(self, buf)
    }

    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        Tap::write_frame(self, frame)
    }
}

impl FrameBackend for std::os::unix::net::UnixDatagram {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.recv(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.send(frame)
    }
}

pub use persist::{NET_STATE_VERSION, NetState};

use super::chain;
use super::persist::{DeviceState, PersistError};
use super::{
    DeviceCommon, EventSource, INT_USED_RING, LimitError, LimitTarget, Served, TYPE_NET, VirtioDevice, admit,
    limiter_fired, serve_queue,
};
use crate::GuestMemory;
use crate::rate_limiter::{BucketUpdate, RateLimiter, RateLimiterConfig, RateLimiterError, TokenType};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
pub use tap::TapMode;
use tap::{Tap, TapError};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const HEADER_BYTES: usize = 12;
/// The largest frame we move: a 1500-byte MTU Ethernet frame with a VLAN tag, rounded up.
pub const MAX_FRAME: usize = 1522;
/// Event source ids: the tap, and the two rate limiters' timers.
const EVENT_TAP: u32 = 0;
const EVENT_RX_LIMITER: u32 = 1;
const EVENT_TX_LIMITER: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: String,
    /// A locally administered address derived from the tap's name when absent.
    pub mac: Option<[u8; 6]>,
    /// Limits on frames the guest receives, and on frames it sends.
    pub rx_limits: RateLimiterConfig,
    pub tx_limits: RateLimiterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot set up the device's queues and event fds")]
    Setup(#[source] std::io::Error),
    #[error("invalid rate limit")]
    Limiter(#[source] RateLimiterError),
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A stable, locally administered, unicast MAC for a tap that was given none.
fn mac_for(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = h.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

pub struct Net {
    common: DeviceCommon,
    backend: Box<dyn FrameBackend>,
    mac: [u8; 6],
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// A frame read from the tap that no receive buffer has taken yet (empty: none).
    pending_rx: Vec<u8>,
    frame: Vec<u8>,
}

impl Net {
    pub fn new(name: &str, config: &NetConfig, tap_mode: TapMode, irq: EventFd) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap, tap_mode)?;
        let mac = config.mac.unwrap_or_else(|| mac_for(&config.tap));
        Self::with_backend(name, mac, config, Box::new(tap), irq)
    }

    /// A device on any frame backend (the tap named in `config` is not opened).
    pub fn with_backend(
        name: &str,
        mac: [u8; 6],
        config: &NetConfig,
        backend: Box<dyn FrameBackend>,
        irq: EventFd,
    ) -> Result<Self, NetError> {
        let common =
            DeviceCommon::new(name, VIRTIO_NET_F_MAC, &[QUEUE_SIZE, QUEUE_SIZE], irq).map_err(NetError::Setup)?;
        let rx_limiter = RateLimiter::new(config.rx_limits).map_err(NetError::Limiter)?;
        let tx_limiter = RateLimiter::new(config.tx_limits).map_err(NetError::Limiter)?;
        Ok(Net { common, backend, mac, rx_limiter, tx_limiter, pending_rx: Vec::new(), frame: vec![0; MAX_FRAME] })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// One transmit chain: header, then the frame, all device-readable.
    fn transmit(
        backend: &dyn FrameBackend,
        limiter: &mut RateLimiter,
        frame: &mut Vec<u8>,
        id: &str,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Served {
        let shape = match chain::check(&chain, mem) {
            Ok(shape) => shape,
            Err(e) => {
                tracing::debug!(device = %id, "virtio-net: dropped a malformed transmit chain: {e}");
                return Served::Used(0);
            }
        };
        let len = shape.readable_bytes as usize;
        if !admit(limiter, len.saturating_sub(HEADER_BYTES) as u64) {
            return Served::Later;
        }
        if !(HEADER_BYTES + 14..=HEADER_BYTES + MAX_FRAME).contains(&len) {
            tracing::debug!(device = %id, "virtio-net: dropped a {len}-byte transmit buffer");
            return Served::Used(0);
        }
        let Ok(mut reader) = chain.reader(mem) else { return Served::Used(0) };
        frame.resize(len - HEADER_BYTES, 0);
        let mut header = [0u8; HEADER_BYTES];
        if reader.read_exact(&mut header).and_then(|_| reader.read_exact(frame)).is_err() {
            return Served::Used(0);
        }
        // A full tap drops the frame, as a full switch port would.
        if let Err(e) = backend.write_frame(frame) {
            tracing::debug!(device = %id, "virtio-net: tap write failed, frame dropped: {e}");
        }
        Served::Used(0)
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self) {
        let Some(mem) = self.common.mem.clone() else { return };
        if self.common.broken {
            return;
        }
        let mut delivered = false;
        loop {
            if self.pending_rx.is_empty() {
                self.frame.resize(MAX_FRAME, 0);
                match self.backend.read_frame(&mut self.frame) {
                    Ok(0) => break,
                    Ok(n) => self.pending_rx.extend_from_slice(&self.frame[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(device = %self.common.id, "virtio-net: tap read failed: {e}");
                        break;
                    }
                }
            }
            let queue = &mut self.common.queues[RX_QUEUE];
            // Limited: the frame waits in `pending_rx` until the limiter's timer fires.
            if !admit(&mut self.rx_limiter, self.pending_rx.len() as u64) {
                break;
            }
            let chain = match queue.iter(&mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => return self.common.mark_broken(&format!("the receive ring is invalid ({e})")),
            };
            // No buffer: keep the frame; the driver's next notification brings us back.
            let Some(chain) = chain else {
                self.rx_limiter.manual_replenish(1, TokenType::Ops);
                self.rx_limiter.manual_replenish(self.pending_rx.len() as u64, TokenType::Bytes);
                break;
            };
            let head = chain.head_index();
            let used = Self::fill_receive_buffer(&self.pending_rx, &self.common.id, chain, &mem);
            self.pending_rx.clear();
            if let Err(e) = self.common.queues[RX_QUEUE].add_used(&mem, head, used) {
                return self.common.mark_broken(&format!("the receive used ring cannot be written ({e})"));
            }
            delivered = true;
        }
        if delivered {
            match self.common.queues[RX_QUEUE].needs_notification(&mem) {
                Ok(true) => self.common.interrupt.raise(INT_USED_RING),
                Ok(false) => {}
                Err(e) => self.common.mark_broken(&format!("the receive used event cannot be read ({e})")),
            }
        }
    }

    /// Writes header and frame into one receive chain; returns the used length (0 when the
    /// buffer cannot hold the frame, which is then dropped).
    fn fill_receive_buffer(
        frame: &[u8],
        id: &str,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> u32 {
        let fits = match chain::check(&chain, mem) {
            Ok(shape) => shape.writable_bytes >= (HEADER_BYTES + frame.len()) as u64,
            Err(e) => {
                tracing::debug!(device = %id, "virtio-net: malformed receive chain: {e}");
                false
            }
        };
        let Some(mut writer) = fits.then(|| chain.writer(mem).ok()).flatten() else {
            tracing::debug!(device = %id, "virtio-net: a {}-byte frame did not fit a receive buffer; dropped", frame.len());
            return 0;
        };
        let mut header = [0u8; HEADER_BYTES];
        header[10] = 1; // num_buffers
        match writer.write_all(&header).and_then(|_| writer.write_all(frame)) {
            Ok(()) => (HEADER_BYTES + frame.len()) as u32,
            Err(_) => 0,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn common(&self) -> &DeviceCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::block::read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activated(&mut self) {
        // Frames may already be waiting.
        self.receive();
    }

    fn reset_device(&mut self) {
        self.pending_rx.clear();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.receive(),
            TX_QUEUE => {
                let (backend, limiter, frame, id) =
                    (self.backend.as_ref(), &mut self.tx_limiter, &mut self.frame, self.common.id.clone());
                serve_queue(&mut self.common, TX_QUEUE, |chain, mem| {
                    Self::transmit(backend, limiter, frame, &id, chain, mem)
                });
            }
            _ => {}
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        vec![
            EventSource { fd: self.backend.as_raw_fd(), id: EVENT_TAP, edge: true },
            EventSource { fd: self.rx_limiter.as_raw_fd(), id: EVENT_RX_LIMITER, edge: false },
            EventSource { fd: self.tx_limiter.as_raw_fd(), id: EVENT_TX_LIMITER, edge: false },
        ]
    }

    fn handle_event(&mut self, id: u32) {
        match id {
            EVENT_TAP => self.receive(),
            EVENT_RX_LIMITER => {
                limiter_fired(&mut self.rx_limiter, &self.common.id);
                self.receive();
            }
            EVENT_TX_LIMITER => {
                limiter_fired(&mut self.tx_limiter, &self.common.id);
                self.process_queue(TX_QUEUE);
            }
            _ => {}
        }
    }

    fn set_rate_limits(
        &mut self,
        target: LimitTarget,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), LimitError> {
        let limiter = match target {
            LimitTarget::Rx => &mut self.rx_limiter,
            LimitTarget::Tx => &mut self.tx_limiter,
            LimitTarget::Device => {
                return Err(LimitError::NoSuchLimiter { device: self.common.id.clone(), target, expected: "rx or tx" });
            }
        };
        limiter.update_buckets(bandwidth, ops)?;
        let unblocked = !limiter.is_blocked();
        if unblocked {
            match target {
                LimitTarget::Rx => self.receive(),
                _ => self.process_queue(TX_QUEUE),
            }
        }
        Ok(())
    }

    fn save_state(&self) -> DeviceState {
        self.save()
    }

    fn restore_state(&mut self, state: &DeviceState, mem: &GuestMemory) -> Result<(), PersistError> {
        self.restore(state, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mac_accepts_six_hex_pairs_only() {
        assert_eq!(parse_mac("52:54:00:ab:CD:01"), Some([0x52, 0x54, 0, 0xab, 0xcd, 1]));
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:01:02", "5:54:00:ab:cd:01", "zz:54:00:ab:cd:01"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_default_mac_is_local_unicast_and_stable() {
        let a = mac_for("tap0");
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(a, mac_for("tap0"));
        assert_ne!(a, mac_for("tap1"));
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use crate::virtio::driver::{QueueDriver, initialize, notify};
    use crate::virtio::mmio::MmioTransport;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::{Bytes, GuestAddress};

    struct Rig {
        t: MmioTransport,
        rx: QueueDriver,
        tx: QueueDriver,
        mem: GuestMemory,
        peer: UnixDatagram,
    }

    fn rig() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let config =
            NetConfig { tap: "unused".into(), mac: None, rx_limits: Default::default(), tx_limits: Default::default() };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let net = Net::with_backend("net0", [0x52, 0x54, 0, 0, 0, 1], &config, Box::new(ours), irq).unwrap();
        let mut t = MmioTransport::new(Box::new(net), mem.clone());
        let (rx, tx) = (QueueDriver::new(GuestAddress(0x10000), 16), QueueDriver::new(GuestAddress(0x11000), 16));
        initialize(&mut t, VIRTIO_NET_F_MAC, &[&rx, &tx]);
        Rig { t, rx, tx, mem, peer }
    }

    #[test]
    fn test_net_transmit_strips_the_header_and_sends_the_frame() {
        let mut r = rig();
        let frame: Vec<u8> = (0..100u8).collect();
        r.mem.write_slice(&[0u8; HEADER_BYTES], GuestAddress(0x20000)).unwrap();
        r.mem.write_slice(&frame, GuestAddress(0x20000 + HEADER_BYTES as u64)).unwrap();
        r.tx.add_chain(&r.mem, &[(0x20000, (HEADER_BYTES + frame.len()) as u32, false)]);
        // Too short to be a frame: dropped, but still given back.
        r.tx.add_chain(&r.mem, &[(0x20000, 8, false)]);

        notify(&mut r.t, 1);
        r.t.device_mut().process_queue(TX_QUEUE);

        let mut got = [0u8; 256];
        let n = r.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], frame.as_slice());
        assert_eq!(r.tx.next_used(&r.mem), Some((0, 0)));
        assert_eq!(r.tx.next_used(&r.mem), Some((1, 0)));
        r.peer.set_nonblocking(true).unwrap();
        assert!(r.peer.recv(&mut got).is_err(), "the short buffer sent nothing");
    }

    #[test]
    fn test_net_receive_fills_a_buffer_with_header_and_frame_and_waits_for_buffers() {
        let mut r = rig();
        let frame: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        r.peer.send(&frame).unwrap();
        // No receive buffer yet: the frame waits in the device.
        r.t.device_mut().handle_event(EVENT_TAP);
        let before = r.rx.next_used(&r.mem);

        r.rx.add_chain(&r.mem, &[(0x30000, 1526, true)]);
        notify(&mut r.t, 0);
        r.t.device_mut().process_queue(RX_QUEUE);

        assert_eq!(before, None);
        let (_, len) = r.rx.next_used(&r.mem).unwrap();
        assert_eq!(len as usize, HEADER_BYTES + frame.len());
        let mut got = vec![0u8; len as usize];
        r.mem.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[HEADER_BYTES..], frame.as_slice());
    }

    #[test]
    fn test_net_receive_buffer_too_small_drops_the_frame_only() {
        let mut r = rig();
        r.rx.add_chain(&r.mem, &[(0x30000, 64, true)]);
        r.rx.add_chain(&r.mem, &[(0x31000, 1526, true)]);
        r.peer.send(&[7u8; 500]).unwrap();
        r.peer.send(&[8u8; 20]).unwrap();

        r.t.device_mut().handle_event(EVENT_TAP);

        assert_eq!(r.rx.next_used(&r.mem), Some((0, 0)), "500 bytes do not fit 64");
        assert_eq!(r.rx.next_used(&r.mem), Some((1, (HEADER_BYTES + 20) as u32)));
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;
    use crate::virtio::driver::{QueueDriver, initialize};
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::persist::PersistError;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::GuestAddress;

    fn transport(mem: &GuestMemory, mac: [u8; 6]) -> (MmioTransport, UnixDatagram) {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let config =
            NetConfig { tap: "t".into(), mac: None, rx_limits: Default::default(), tx_limits: Default::default() };
        let net =
            Net::with_backend("net0", mac, &config, Box::new(ours), EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        (MmioTransport::new(Box::new(net), mem.clone()), peer)
    }

    #[test]
    fn test_net_state_round_trips_and_a_different_mac_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mac = [0x52, 0x54, 0, 0, 0, 7];
        let (mut t, _peer) = transport(&mem, mac);
        let (rx, tx) = (QueueDriver::new(GuestAddress(0x10000), 16), QueueDriver::new(GuestAddress(0x11000), 16));
        initialize(&mut t, VIRTIO_NET_F_MAC, &[&rx, &tx]);
        let state = t.save_state();
        let (mut same, _p1) = transport(&mem, mac);
        let (mut other, _p2) = transport(&mem, [0x52, 0x54, 0, 0, 0, 8]);

        same.restore_state(&state).unwrap();
        let refused = other.restore_state(&state);

        assert_eq!(same.save_state(), state);
        assert!(same.is_running());
        assert!(matches!(refused, Err(PersistError::Mismatch { what: "MAC address", .. })), "{refused:?}");
        assert!(!other.is_running());
    }
}
