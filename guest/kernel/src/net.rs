//! The virtio-net test (virtio 1.2 section 5.1) between two guests: one sends numbered
//! frames of varying size (`net=send:N`), the other echoes them back (`net=echo`).
//!
//! Frame (Ethernet II, ethertype 0x88b5), fields little-endian after the Ethernet header:
//! dst MAC, src MAC, ethertype, u32 magic, u32 seq, u16 pattern length P, u16 flag (0
//! request, 1 echo), P pattern bytes `(seq * 31 + j * 7) as u8`, u64 FNV-1a of the pattern.
//! Every buffer starts with the 12-byte virtio_net_hdr_v1 (all zero on transmit).
//!
//! Queue 0 receives into `NBUF` buffers, queue 1 transmits. The echo side turns each
//! request around in its receive buffer and transmits that buffer, so nothing is copied;
//! the buffer goes back to the receive queue once the transmission is done.

use crate::cmdline::NetTest;
use crate::console::Line;
use crate::virtio::{DESC_WRITE, Error, MS, Queue, QueueMem, Transport, Waiter};

const F_MAC: u64 = 1 << 5;

const HDR: usize = 12;
/// Receive buffers hold 12 + 1522 bytes and more (a VLAN-tagged frame; ours are at most 1514).
const BUF_LEN: usize = 1536;
const NBUF: usize = 8;

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const FRAME_MAGIC: u32 = 0x4e43_4e54;
/// Ethernet header (14) + magic, seq, length, flag (12).
const PATTERN_AT: usize = 26;
/// Frame bytes besides the pattern: headers and the hash.
const OVERHEAD: usize = PATTERN_AT + 8;
const FLAG_REQUEST: u16 = 0;
const FLAG_ECHO: u16 = 1;

const ECHO_TIMEOUT_NS: u64 = 2_000 * MS;
const PEER_WAIT_NS: u64 = 5_000 * MS;
const RETRY_NS: u64 = 200 * MS;
const TX_TIMEOUT_NS: u64 = 1_000 * MS;

#[repr(C, align(64))]
struct Buf([u8; BUF_LEN]);

static mut RX_QUEUE: QueueMem = QueueMem::new();
static mut TX_QUEUE: QueueMem = QueueMem::new();
static mut RX_BUFS: [Buf; NBUF] = [const { Buf([0; BUF_LEN]) }; NBUF];
static mut TX_BUF: Buf = Buf([0; BUF_LEN]);
/// The echo service, once `net=echo` set it up. Only the BSP touches it.
static mut ECHO: Option<Net> = None;

fn rx_buf(i: usize) -> &'static mut [u8; BUF_LEN] {
    // SAFETY: only the BSP uses the buffers, and only those the device returned.
    unsafe { &mut (*(&raw mut RX_BUFS))[i].0 }
}

fn rx_addr(i: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { &raw const (*(&raw const RX_BUFS))[i] as u64 }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// FNV-1a over bytes, taken eight at a time from a word.
fn fnv1a(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = data.chunks_exact(8);
    for c in &mut words {
        let mut w = le64(c);
        for _ in 0..8 {
            h = (h ^ (w & 0xff)).wrapping_mul(PRIME);
            w >>= 8;
        }
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

/// Writes pattern bytes `(seq * 31 + j * 7) as u8` over `out`, eight lanes at a time: the
/// next word adds 56 to every byte, without carries between bytes.
fn pattern(out: &mut [u8], seq: u32) {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const STEP: u64 = 0x3838_3838_3838_3838;
    let b0 = (seq as u8).wrapping_mul(31);
    let mut first = [0u8; 8];
    for (t, b) in first.iter_mut().enumerate() {
        *b = b0.wrapping_add(7 * t as u8);
    }
    let mut w = u64::from_le_bytes(first);
    let mut words = out.chunks_exact_mut(8);
    for c in &mut words {
        c.copy_from_slice(&w.to_le_bytes());
        w = ((w & LOW7) + STEP) ^ (w & !LOW7);
    }
    let rest = words.into_remainder();
    let last = w.to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// Whether two byte strings of the same length are equal, a word at a time.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails_equal = wa.remainder().iter().zip(wb.remainder()).all(|(x, y)| x == y);
    a.len() == b.len() && tails_equal && wa.zip(wb).all(|(x, y)| le64(x) == le64(y))
}

fn frame_len(seq: u32) -> usize {
    60 + (seq as usize * 97) % 1455
}

/// One of our frames, as far as its header goes.
struct Frame {
    seq: u32,
    flag: u16,
    len: usize,
}

enum Rx {
    /// Another ethertype or magic: someone else's.
    Foreign,
    /// Ours, but its length field does not fit the frame.
    Malformed,
    Ours(Frame),
}

fn classify(frame: &[u8]) -> Rx {
    if frame.len() < OVERHEAD || frame[12..14] != ETHERTYPE || le32(&frame[14..]) != FRAME_MAGIC {
        return Rx::Foreign;
    }
    let len = usize::from(le16(&frame[22..]));
    if OVERHEAD + len > frame.len() {
        return Rx::Malformed;
    }
    Rx::Ours(Frame { seq: le32(&frame[18..]), flag: le16(&frame[24..]), len })
}

fn fnv_ok(frame: &[u8], f: &Frame) -> bool {
    let end = PATTERN_AT + f.len;
    fnv1a(&frame[PATTERN_AT..end]) == le64(&frame[end..])
}

fn print_mac(line: &mut Line, mac: &[u8; 6]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    line.str(" mac=");
    for (i, &b) in mac.iter().enumerate() {
        if i > 0 {
            line.str(":");
        }
        line.bytes(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
    }
}

const IN_RX: u8 = 0;
const IN_TX: u8 = 1;

struct Net {
    t: Transport,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    /// Receive buffers in use: min(NBUF, both queue sizes), so a buffer's index is also its
    /// descriptor in either queue.
    nbuf: usize,
    state: [u8; NBUF],
    echoed: u64,
    bad: u64,
}

impl Net {
    fn open(t: Transport) -> Result<Net, Error> {
        let features = t.start(F_MAC)?;
        if features & F_MAC == 0 {
            return Err(Error::Setup("no mac"));
        }
        let rx = t.setup_queue(0, &raw mut RX_QUEUE)?;
        let tx = t.setup_queue(1, &raw mut TX_QUEUE)?;
        t.driver_ok()?;
        let mut mac = [0; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = t.config_u8(i as u64);
        }
        let nbuf = NBUF.min(usize::from(rx.size)).min(usize::from(tx.size));
        let mut net = Net { t, rx, tx, mac, nbuf, state: [IN_RX; NBUF], echoed: 0, bad: 0 };
        for i in 0..nbuf {
            net.rx.set(i as u16, rx_addr(i), BUF_LEN as u32, DESC_WRITE, 0);
            net.rx.push(i as u16);
        }
        t.notify(&net.rx);
        Ok(net)
    }

    /// The next received frame: its buffer index and the frame's length (after the
    /// virtio header, clamped to the buffer).
    fn receive(&mut self) -> Result<Option<(usize, usize)>, Error> {
        let Some((id, len)) = self.rx.pop()? else {
            return Ok(None);
        };
        let i = usize::from(id);
        if i >= self.nbuf || self.state[i] != IN_RX {
            return Err(Error::BadRing);
        }
        Ok(Some((i, (len as usize).min(BUF_LEN).saturating_sub(HDR))))
    }

    /// Gives buffer `i` back to the receive queue (the caller notifies).
    fn recycle(&mut self, i: usize) {
        self.state[i] = IN_RX;
        self.rx.push(i as u16);
    }

    /// Sends the frame in `TX_BUF` and waits until the device is done with it.
    fn send(&mut self, len: usize) -> Result<(), Error> {
        self.tx.set(0, &raw const TX_BUF as u64, (HDR + len) as u32, 0, 0);
        self.tx.push(0);
        self.t.notify(&self.tx);
        if self.tx.wait(self.t, TX_TIMEOUT_NS)?.0 != 0 {
            return Err(Error::BadRing);
        }
        Ok(())
    }

    /// Writes request `seq` into `TX_BUF`; returns the frame's length.
    fn build(&self, seq: u32) -> usize {
        // SAFETY: only the BSP uses TX_BUF, and the device is done with it between sends.
        let tx = unsafe { &mut (*(&raw mut TX_BUF)).0 };
        let len = frame_len(seq);
        let plen = len - OVERHEAD;
        tx[..HDR].fill(0);
        let frame = &mut tx[HDR..];
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&self.mac);
        frame[12..14].copy_from_slice(&ETHERTYPE);
        frame[14..18].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame[18..22].copy_from_slice(&seq.to_le_bytes());
        frame[22..24].copy_from_slice(&(plen as u16).to_le_bytes());
        frame[24..26].copy_from_slice(&FLAG_REQUEST.to_le_bytes());
        pattern(&mut frame[PATTERN_AT..PATTERN_AT + plen], seq);
        let hash = fnv1a(&frame[PATTERN_AT..PATTERN_AT + plen]);
        frame[PATTERN_AT + plen..len].copy_from_slice(&hash.to_le_bytes());
        len
    }

    /// Sends `count` requests, each waited for (up to 2 s) before the next. Returns echoes.
    fn send_test(&mut self, count: u32) -> Result<u64, Error> {
        let mut echoed = 0;
        for seq in 0..count {
            let len = self.build(seq);
            // SAFETY: as in `build`; from here on the frame is only read.
            let tx: &[u8; BUF_LEN] = unsafe { &(*(&raw const TX_BUF)).0 };
            let sent = &tx[HDR..HDR + len];
            // The peer may still be booting: seq 0 is resent every 200 ms for up to 5 s.
            let (timeout, retry) = if seq == 0 { (PEER_WAIT_NS, RETRY_NS) } else { (ECHO_TIMEOUT_NS, u64::MAX) };
            let mut w = Waiter::new(self.t, timeout);
            let mut next_send = 0;
            loop {
                let now = crate::clock::now_ns(0);
                if now >= next_send {
                    self.send(len)?;
                    next_send = now.saturating_add(retry);
                }
                if self.await_echo(seq, sent)? {
                    echoed += 1;
                    break;
                }
                match w.pause() {
                    Err(Error::Timeout) => break,
                    r => r?,
                }
            }
        }
        Ok(echoed)
    }

    /// Looks at every frame received so far; true if one is a good echo of `sent`. Echoes
    /// of this seq that do not match count as bad; anything else is ignored.
    fn await_echo(&mut self, seq: u32, sent: &[u8]) -> Result<bool, Error> {
        let mut good = false;
        let mut recycled = false;
        while let Some((i, len)) = self.receive()? {
            let frame = &rx_buf(i)[HDR..HDR + len];
            match classify(frame) {
                Rx::Ours(f) if f.flag == FLAG_ECHO && f.seq == seq => {
                    // Same pattern and hash as sent: then the hash also matches the pattern.
                    let end = OVERHEAD + f.len;
                    if end == sent.len() && same(&frame[PATTERN_AT..end], &sent[PATTERN_AT..]) {
                        good = true;
                    } else {
                        self.bad += 1;
                    }
                }
                Rx::Malformed => self.bad += 1,
                _ => {}
            }
            self.recycle(i);
            recycled = true;
        }
        if recycled {
            self.t.notify(&self.rx);
        }
        Ok(good)
    }

    /// One round of the echo service: buffers whose echo went out return to the receive
    /// queue; each good request received is turned around and transmitted.
    fn serve(&mut self) -> Result<(), Error> {
        let (mut recycled, mut sent) = (false, false);
        while let Some((id, _)) = self.tx.pop()? {
            let i = usize::from(id);
            if i >= self.nbuf || self.state[i] != IN_TX {
                return Err(Error::BadRing);
            }
            self.recycle(i);
            recycled = true;
        }
        let bad_before = self.bad;
        while let Some((i, len)) = self.receive()? {
            let buf = rx_buf(i);
            match classify(&buf[HDR..HDR + len]) {
                Rx::Ours(f) if f.flag == FLAG_REQUEST => {
                    if !fnv_ok(&buf[HDR..HDR + len], &f) {
                        self.bad += 1;
                    } else {
                        buf[..HDR].fill(0);
                        buf.copy_within(HDR + 6..HDR + 12, HDR);
                        buf[HDR + 6..HDR + 12].copy_from_slice(&self.mac);
                        buf[HDR + 24..HDR + 26].copy_from_slice(&FLAG_ECHO.to_le_bytes());
                        self.state[i] = IN_TX;
                        self.tx.set(i as u16, rx_addr(i), (HDR + len) as u32, 0, 0);
                        self.tx.push(i as u16);
                        sent = true;
                        self.echoed += 1;
                        if self.echoed.is_multiple_of(16) {
                            Line::new().str("NET ECHOED").kv("n", self.echoed).print();
                        }
                        continue;
                    }
                }
                Rx::Malformed => self.bad += 1,
                _ => {}
            }
            self.recycle(i);
            recycled = true;
        }
        if sent {
            self.t.notify(&self.tx);
        }
        if recycled {
            self.t.notify(&self.rx);
        }
        if self.bad != bad_before {
            Line::new().str("NET ECHO BAD").kv("n", self.bad).print();
        }
        Ok(())
    }
}

/// Forgets any echo service (memory is not promised clean after a reset).
pub fn clear() {
    // SAFETY: the BSP alone, before any other CPU runs.
    unsafe { *(&raw mut ECHO) = None };
}

/// Runs `net=send:N` to its end, or sets up the echo service for `serve`.
pub fn start(t: Transport, mode: NetTest) {
    let mut net = match Net::open(t) {
        Ok(net) => net,
        Err(e) => {
            t.stop(true);
            Line::new().str("NET FAIL reason=").str(e.reason()).print();
            return;
        }
    };
    match mode {
        NetTest::Send(count) => {
            let count = count.min(u64::from(u32::MAX)) as u32;
            let result = net.send_test(count);
            t.stop(result.is_err());
            let mut line = Line::new();
            match result {
                Ok(echoed) if echoed == u64::from(count) => {
                    line.str("NET OK").kv("sent", u64::from(count)).kv("echoed", echoed);
                    print_mac(&mut line, &net.mac);
                }
                Ok(echoed) => {
                    line.str("NET FAIL").kv("sent", u64::from(count)).kv("echoed", echoed).kv("bad", net.bad);
                }
                Err(e) => {
                    line.str("NET FAIL reason=").str(e.reason()).kv("bad", net.bad);
                }
            }
            line.print();
        }
        NetTest::Echo => {
            let mut line = Line::new();
            line.str("NET ECHO");
            print_mac(&mut line, &net.mac);
            line.print();
            // SAFETY: the BSP alone, before any other CPU runs.
            unsafe { *(&raw mut ECHO) = Some(net) };
        }
        NetTest::Off => t.stop(false),
    }
}

/// The echo service's hook in the BSP's loop. Returns whether it is running, so that the
/// loop keeps its sleeps short.
pub fn serve() -> bool {
    // SAFETY: only the BSP calls this, and nothing else holds a reference to ECHO.
    let echo = unsafe { &mut *(&raw mut ECHO) };
    let Some(net) = echo.as_mut() else {
        return false;
    };
    if let Err(e) = net.serve() {
        net.t.stop(true);
        Line::new().str("NET FAIL reason=").str(e.reason()).print();
        *echo = None;
        return false;
    }
    true
}
