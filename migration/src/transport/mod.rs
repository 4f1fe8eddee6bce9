//! The link a migration runs over: one ordered stream of framed messages each way, mutual
//! TLS 1.3 with the cluster's certificates, and a bandwidth limit on what this side sends.
//! Two transports carry it ("Transports" in `docs/migration.md`):
//!
//! - [`Transport::Quic`] ([`quic`]): quinn, one bidirectional stream for control and the
//!   source's page lanes beside it ([`lanes`]: one stream per shard of memory). Its own
//!   congestion control and loss recovery in user space, no head-of-line blocking by the
//!   kernel's buffers nor between lanes, an abort that overtakes everything queued: for
//!   long or lossy links.
//! - [`Transport::Tcp`] ([`tcp`]): rustls over a kernel TCP socket. The kernel does the
//!   segmentation, acknowledgements and retransmissions, so a core carries several times
//!   QUIC's rate: for loopback and LANs.
//!
//! A [`Listener`] takes either on the same port number (UDP for QUIC, TCP for TLS), so a
//! receiver needs no choice; [`connect`] takes one, or [`TransportChoice::Auto`], which picks
//! per link by [`AUTO_TCP_MAX_RTT`].
//!
//! The engines on both ends are plain threads; a `Link` hides the async side. It owns a
//! one-worker tokio runtime whose two tasks pump frames ([`pump`]): the writer takes encoded
//! frames from a small bounded queue (so the engine is paced by the network), waits on the
//! token bucket and writes them; the reader splits the peer's bytes into frames, decodes
//! them and queues the messages. A failure on either side ends the link, and the engine's
//! next call returns the error.

#[cfg(test)]
mod lane_tests;
mod lanes;
mod pump;
mod quic;
mod tcp;
#[cfg(test)]
mod tests;

use crate::protocol::{self, Message, ProtocolError};
use crate::throttle::Bandwidth;
use crate::tls::{Identity, TlsError};
pub use lanes::{CONNECTION_WINDOW, LANES_ALPN, MAX_LANES, STREAM_WINDOW};
use pump::{Outgoing, SharedBucket, WireReader, WireWriter};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Frames queued for the writer: enough to keep the link busy while the engine encodes.
const QUEUE_FRAMES: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an abort may take to leave before the connection is dropped.
const ABORT_GRACE: Duration = Duration::from_millis(300);
/// After the last frame, how long to wait for the peer's side of the close.
const CLOSE_LINGER: Duration = Duration::from_millis(200);
/// An abort's reason is cut to this many bytes (a QUIC close frame must fit a packet).
const MAX_REASON: usize = 900;

/// `Auto` takes TLS over TCP to a peer whose TCP handshake answers within this (loopback,
/// a LAN, a data centre), QUIC beyond, or when no TCP answer comes within
/// [`AUTO_PROBE_TIMEOUT`] (a lost SYN: a lossy link, or TCP filtered). The figures behind
/// it are in `docs/migration.md`, "Transports".
pub const AUTO_TCP_MAX_RTT: Duration = Duration::from_millis(10);
/// How long `Auto` waits for the TCP handshake (the kernel resends a lost SYN after 1 s).
pub const AUTO_PROBE_TIMEOUT: Duration = Duration::from_millis(900);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("the connection to the peer was lost: {0}")]
    Lost(String),
    #[error("the peer sent a bad frame: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the peer closed the stream")]
    Closed,
    /// The peer gave up and said why (its engine's error).
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
    #[error("no message from the peer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start the network runtime: {0}")]
    Runtime(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<TlsError> for LinkError {
    fn from(e: TlsError) -> Self {
        LinkError::Tls(crate::error_chain(&e))
    }
}

/// What a connect says when the receiver already takes another migration.
const BUSY: &str = "the receiver is busy with another migration (a `vmm receive` takes one VM): start another one";
/// What a TLS failure adds, on both transports.
const CA_HINT: &str = "the two sides' certificates are not from the same cluster CA: check --tls-dir on both";

/// What carries a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Quic,
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Quic => "QUIC",
            Transport::Tcp => "TLS over TCP",
        })
    }
}

/// What a source asks for (`vmm migrate --transport`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// TLS over TCP to a near peer, QUIC to a far one ([`AUTO_TCP_MAX_RTT`]).
    #[default]
    Auto,
    Quic,
    Tcp,
}

/// What went over the link, for reports.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Frame bytes written to the stream and read from it.
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// A test fault the writer injects (never set outside tests): stop after this many bytes,
/// in the middle of a frame, and close the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TruncateAfter(pub u64);

/// The connection under the frame pump, for what only it knows (RTT, wire bytes, closing).
enum Backend {
    Quic(quic::Conn),
    Tcp(tcp::Conn),
}

/// Which end of page lanes a link is (`lanes`): the source sends on them, the
/// destination reads them; `None` when a peer does not speak them, or over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneRole {
    None,
    Send,
    Receive,
}

/// Queues messages on a link from another thread (`Link::requester`).
#[derive(Clone)]
pub struct Requester(mpsc::Sender<Outgoing>);

impl Requester {
    /// Queues `message`; blocks while the queue is full. Not for a runtime's thread.
    pub fn send(&self, message: &Message) -> Result<(), LinkError> {
        let frame = protocol::encode_frame(message)?;
        self.0.blocking_send(Outgoing::bare(frame)).map_err(|_| LinkError::Closed)
    }
}

/// The source's page lanes: what heads each frame, and each lane's writer once it is open.
struct SendLanes {
    counter: lanes::LaneCounter,
    writers: Vec<Option<lanes::LaneWriter>>,
    connection: quinn::Connection,
    bucket: SharedBucket,
    fault: Option<TruncateAfter>,
}

pub struct Link {
    runtime: tokio::runtime::Runtime,
    out: Option<mpsc::Sender<Outgoing>>,
    /// Messages read by the reader task, with their frame sizes.
    incoming: mpsc::Receiver<Result<(Message, u64), LinkError>>,
    writer: Option<tokio::task::JoinHandle<Result<(), LinkError>>>,
    /// Ends when the peer's stream does.
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Tells the writer to drop what is queued and send an abort.
    abort: Option<oneshot::Sender<String>>,
    pub stats: Arc<LinkStats>,
    backend: Backend,
    peer: SocketAddr,
    bandwidth: Bandwidth,
    /// Where this end sends page lanes (a source over QUIC to a peer that speaks them).
    lanes: Option<SendLanes>,
    /// Frame bytes handed to `send`, written or still queued for the writer.
    queued: u64,
    consumed: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime, LinkError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("migration-io")
        .enable_all()
        .build()
        .map_err(|e| LinkError::Runtime(e.to_string()))
}

fn lost(e: impl std::fmt::Display) -> LinkError {
    LinkError::Lost(e.to_string())
}

/// Cuts `reason` to at most `MAX_REASON` bytes, on a character boundary.
fn short_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A connection made, before its pump starts.
struct Connected {
    backend: Backend,
    writer: WireWriter,
    reader: WireReader,
    peer: SocketAddr,
    lanes: LaneRole,
}

/// Connects to a receiving VMM at `addr` over the transport `choice` names.
pub fn connect(
    addr: SocketAddr,
    identity: &Identity,
    bandwidth: Bandwidth,
    fault: Option<TruncateAfter>,
    choice: TransportChoice,
) -> Result<Link, LinkError> {
    let runtime = runtime()?;
    let connected = match choice {
        TransportChoice::Quic => quic::connect(&runtime, addr, identity)?,
        TransportChoice::Tcp => tcp::connect(&runtime, tcp::dial(addr, CONNECT_TIMEOUT)?, addr, identity)?,
        TransportChoice::Auto => match tcp::dial_near(addr) {
            Some(socket) => tcp::connect(&runtime, socket, addr, identity)?,
            None => quic::connect(&runtime, addr, identity)?,
        },
    };
    let transport = connected.backend.transport();
    tracing::info!(%addr, %transport, ?choice, "migration link up");
    Ok(Link::start(runtime, connected, bandwidth, fault))
}

/// A port on `ip` free for both transports right now (a receiver binds it for UDP and
/// TCP): one a TCP listener got from the kernel, kept only if UDP takes it too. A port
/// free for UDP alone may be an outgoing TCP connection's, and the receiver would then
/// fail to listen.
pub fn free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    const TRIES: usize = 64;
    for _ in 0..TRIES {
        let tcp = std::net::TcpListener::bind((ip, 0))?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no port free for both TCP and UDP in {TRIES} tries"),
    ))
}

/// A bound receiver waiting for the migration's source: a QUIC endpoint on UDP and a TLS
/// listener on TCP, on the same port number.
pub struct Listener {
    runtime: tokio::runtime::Runtime,
    quic: quinn::Endpoint,
    tcp: tcp::Acceptor,
}

impl Listener {
    /// Binds both. With port 0, the kernel's choice of a UDP port is taken for TCP too (or
    /// another is tried, if that one is taken for TCP).
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<Self, LinkError> {
        const TRIES: usize = 16;
        let runtime = runtime()?;
        let listen_err = |reason: String| LinkError::Listen { addr, reason };
        let mut tries = 0;
        let (udp, tcp) = loop {
            let udp = std::net::UdpSocket::bind(addr).map_err(|e| listen_err(format!("UDP: {e}")))?;
            let port = udp.local_addr().map_err(|e| listen_err(e.to_string()))?.port();
            match std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)) {
                Ok(tcp) => break (udp, tcp),
                Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse && tries < TRIES => tries += 1,
                Err(e) => return Err(listen_err(format!("TCP: {e}"))),
            }
        };
        let quic = quic::endpoint(&runtime, udp, Some(identity.server_config()?)).map_err(listen_err)?;
        let tcp = tcp::Acceptor::new(&runtime, tcp, identity).map_err(listen_err)?;
        Ok(Listener { runtime, quic, tcp })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.quic.local_addr().ok()
    }

    /// Waits for a source with a valid certificate, on either transport. Peers that fail
    /// the TLS handshake are logged and refused; the listener goes on waiting for the right
    /// one. Once one is taken, every further source hears at once that this receiver is
    /// busy.
    pub fn accept(self) -> Result<Link, LinkError> {
        self.accept_until(None)
    }

    /// `accept`, giving up at `deadline` (`LinkError::Timeout`): a post-copy waits only so
    /// long for its source to come back.
    pub fn accept_until(self, deadline: Option<std::time::Instant>) -> Result<Link, LinkError> {
        let Listener { runtime, quic, tcp } = self;
        let mut candidates = tcp.start(&runtime);
        let limit = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let connected = runtime.block_on(async {
            let mut tcp_open = true;
            let expired = async {
                match limit {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                tokio::select! {
                    () = &mut expired => break Err(LinkError::Timeout(limit.unwrap_or_default())),
                    q = quic::accept(&quic) => break q,
                    t = candidates.recv(), if tcp_open => match t {
                        Some(t) => match tcp::accepted(t).await {
                            Ok(c) => break Ok(c),
                            Err(e) => tracing::warn!("migration peer left before it started: {e}"),
                        },
                        None => tcp_open = false,
                    },
                }
            }
        })?;
        runtime.spawn(quic::refuse_others(quic));
        runtime.spawn(tcp::refuse_others(candidates));
        let transport = connected.backend.transport();
        tracing::info!(peer = %connected.peer, %transport, "migration source connected");
        Ok(Link::start(runtime, connected, Bandwidth::default(), None))
    }
}

impl Backend {
    fn transport(&self) -> Transport {
        match self {
            Backend::Quic(_) => Transport::Quic,
            Backend::Tcp(_) => Transport::Tcp,
        }
    }
}

impl Link {
    fn start(
        runtime: tokio::runtime::Runtime,
        connected: Connected,
        bandwidth: Bandwidth,
        fault: Option<TruncateAfter>,
    ) -> Link {
        let Connected { backend, writer, reader, peer, lanes } = connected;
        let stats = Arc::new(LinkStats::default());
        let (out, frames) = mpsc::channel(QUEUE_FRAMES);
        let (messages, incoming) = mpsc::channel(QUEUE_FRAMES * 4);
        let (abort, aborted) = oneshot::channel();
        let bucket = pump::shared_bucket();
        let pump = pump::Writer {
            wire: writer,
            frames,
            aborted,
            bandwidth: bandwidth.clone(),
            bucket: bucket.clone(),
            stats: stats.clone(),
            fault,
        };
        let writer = runtime.spawn(pump.run());
        let connection = match &backend {
            Backend::Quic(c) => Some(c.connection.clone()),
            Backend::Tcp(_) => None,
        };
        let (reader, lanes) = match (lanes, connection) {
            (LaneRole::Receive, Some(connection)) => {
                let gate = Arc::new(lanes::Gate::default());
                runtime.spawn(lanes::accept_lanes(connection, gate.clone(), messages.clone(), stats.clone()));
                (runtime.spawn(lanes::read_control(reader, gate, messages, stats.clone())), None)
            }
            (LaneRole::Send, Some(connection)) => {
                let writers = (0..MAX_LANES).map(|_| None).collect();
                let lanes = SendLanes { counter: lanes::LaneCounter::default(), writers, connection, bucket, fault };
                (runtime.spawn(pump::read_frames(reader, messages, stats.clone())), Some(lanes))
            }
            _ => (runtime.spawn(pump::read_frames(reader, messages, stats.clone())), None),
        };
        Link {
            runtime,
            out: Some(out),
            incoming,
            writer: Some(writer),
            reader: Some(reader),
            abort: Some(abort),
            stats,
            backend,
            peer,
            bandwidth,
            lanes,
            queued: 0,
            consumed: 0,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// What carries this link.
    pub fn transport(&self) -> Transport {
        self.backend.transport()
    }

    /// The connection's smoothed round-trip time (QUIC's estimate, or the kernel's for TCP).
    pub fn rtt(&self) -> Duration {
        match &self.backend {
            Backend::Quic(c) => c.connection.rtt(),
            Backend::Tcp(c) => c.rtt(),
        }
    }

    /// The bandwidth limit in bytes per second (0: none).
    pub fn bandwidth_limit(&self) -> u64 {
        self.bandwidth.get()
    }

    /// Queues a message; blocks while the queue is full (the network sets the pace).
    /// Returns the frame's size.
    pub fn send(&mut self, message: &Message) -> Result<usize, LinkError> {
        let frame = protocol::encode_frame(message)?;
        let len = frame.len();
        self.send_frame(frame)?;
        Ok(len)
    }

    /// Queues a frame (`protocol::encode_frame`'s); blocks while the queue is full.
    pub fn send_frame(&mut self, frame: Vec<u8>) -> Result<(), LinkError> {
        let len = frame.len();
        let head = self.lanes.as_mut().map(|l| l.counter.control_head()).unwrap_or_default();
        let sent = match &self.out {
            Some(out) => out.blocking_send(Outgoing { head, frame }).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.writer_error());
        }
        self.queued += len as u64;
        Ok(())
    }

    /// How many page lanes have carried frames on this link: 0 when pages share the
    /// control stream (TLS over TCP, a receiver without lanes, the receiving end).
    pub fn lanes_opened(&self) -> usize {
        self.lanes.as_ref().map_or(0, |l| l.writers.iter().flatten().count())
    }

    /// Queues a frame of page batches of shard `shard` (of the source's page pipeline) on
    /// that shard's lane, or on the control stream when the link has no lanes. Every
    /// batch of one shard must go through here, so that they keep their order.
    pub fn send_pages(&mut self, shard: usize, frame: Vec<u8>) -> Result<(), LinkError> {
        let Some(lanes) = self.lanes.as_mut() else { return self.send_frame(frame) };
        // The destination takes the link by its control stream's first frame, so that one
        // goes there (in a migration it is the Hello).
        if !lanes.counter.control_sent() {
            return self.send_frame(frame);
        }
        let lane = shard % MAX_LANES;
        let first = lanes.writers[lane].is_none();
        if first {
            let wire = self.runtime.block_on(quic::open_lane(&lanes.connection))?;
            let (out, frames) = mpsc::channel(QUEUE_FRAMES);
            // A lane has no abort of its own: QUIC's abort closes the whole connection.
            let (_, aborted) = oneshot::channel();
            let pump = pump::Writer {
                wire,
                frames,
                aborted,
                bandwidth: self.bandwidth.clone(),
                bucket: lanes.bucket.clone(),
                stats: self.stats.clone(),
                fault: lanes.fault,
            };
            lanes.writers[lane] = Some(lanes::LaneWriter { out, task: self.runtime.spawn(pump.run()) });
        }
        let len = frame.len();
        let head = lanes.counter.lane_head(lane, first);
        let Some(writer) = lanes.writers[lane].as_mut() else { return Err(LinkError::Closed) };
        if writer.out.blocking_send(Outgoing { head, frame }).is_err() {
            let failed = lanes.writers[lane].take().map(|w| w.task);
            return Err(self.task_error(failed));
        }
        self.queued += len as u64;
        Ok(())
    }

    /// A handle that queues frames on this link from another thread (a post-copy's page
    /// requests, sent by the thread that catches the guest's faults). It fails once the
    /// link is gone. None on a link that sends on lanes: its control frames are counted
    /// in the engine's order.
    pub fn requester(&self) -> Option<Requester> {
        if self.lanes.is_some() {
            return None;
        }
        self.out.clone().map(Requester)
    }

    /// Frame bytes handed to `send` so far; `stats.sent` counts those the writer has
    /// written (behind the bandwidth limit, a queue of frames may wait between the two).
    pub fn queued(&self) -> u64 {
        self.queued
    }

    /// Why the writer stopped.
    fn writer_error(&mut self) -> LinkError {
        self.out = None;
        let writer = self.writer.take();
        self.task_error(writer)
    }

    /// Why a writer task stopped.
    fn task_error(&self, task: Option<tokio::task::JoinHandle<Result<(), LinkError>>>) -> LinkError {
        match task {
            Some(w) => match self.runtime.block_on(w) {
                Ok(Err(e)) => e,
                Ok(Ok(())) => LinkError::Closed,
                Err(e) => LinkError::Lost(format!("the writer task failed: {e}")),
            },
            None => LinkError::Closed,
        }
    }

    /// The next message from the peer, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, LinkError> {
        let incoming = &mut self.incoming;
        match self.runtime.block_on(async { tokio::time::timeout(timeout, incoming.recv()).await }) {
            Ok(Some(result)) => self.consume(result),
            Ok(None) => Err(LinkError::Closed),
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    fn consume(&mut self, read: Result<(Message, u64), LinkError>) -> Result<Message, LinkError> {
        let (message, frame) = read?;
        self.consumed += frame;
        Ok(message)
    }

    /// Frame bytes of the messages taken with `recv`/`try_recv`; the reader task may have
    /// read (and `stats.received` counted) more, still waiting in its queue.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// A message from the peer if one is waiting.
    pub fn try_recv(&mut self) -> Option<Result<Message, LinkError>> {
        match self.incoming.try_recv() {
            Ok(m) => Some(self.consume(m)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(LinkError::Closed)),
        }
    }

    /// Bytes the connection put on the wire: UDP payloads with all QUIC and TLS overheads,
    /// or the TLS records written to the TCP socket.
    pub fn wire_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Quic(c) => c.connection.stats().udp_tx.bytes,
            Backend::Tcp(c) => c.wire_bytes(),
        }
    }

    /// Ends the link: waits up to `grace` for what was queued to reach the peer, then
    /// closes the connection.
    pub fn close(mut self, grace: Duration) {
        self.out = None;
        self.abort = None;
        let mut writers: Vec<_> = self.writer.take().into_iter().collect();
        if let Some(lanes) = self.lanes.take() {
            writers.extend(lanes.writers.into_iter().flatten().map(|w| w.task));
        }
        let reader = self.reader.take();
        let backend = &self.backend;
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(grace, async {
                for w in writers {
                    let _ = w.await;
                }
            })
            .await;
            match backend {
                Backend::Quic(c) => c.close().await,
                Backend::Tcp(c) => c.close(reader).await,
            }
        });
    }

    /// Gives up at once: closes the connection with `reason`, which the peer reads as
    /// `LinkError::PeerAborted`. What is still queued here is dropped; over TCP what sits
    /// in the kernel's buffers goes first (they are bounded: `tcp::SEND_BUFFER`).
    pub fn abort(&mut self, reason: &str) {
        let reason = short_reason(reason);
        if let Backend::Quic(c) = &self.backend {
            // The close overtakes every stream byte: before the queue ends, or the writer
            // would finish the stream and the peer could read that first.
            c.abort(reason);
        }
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(reason.to_string());
        }
        self.out = None;
        self.lanes = None;
        let writer = self.writer.take();
        let backend = &self.backend;
        self.runtime.block_on(async move {
            match backend {
                Backend::Quic(c) => c.wait_idle(ABORT_GRACE).await,
                Backend::Tcp(c) => {
                    if let Some(w) = writer {
                        let _ = tokio::time::timeout(ABORT_GRACE, w).await;
                    }
                    c.shutdown();
                }
            }
        });
    }

    /// Waits until the peer closes the connection (at most `limit`), then closes.
    pub fn wait_closed(mut self, limit: Duration) {
        let reader = self.reader.take();
        let backend = &self.backend;
        let reader = self.runtime.block_on(async move {
            match backend {
                Backend::Quic(c) => {
                    let _ = tokio::time::timeout(limit, c.connection.closed()).await;
                    reader
                }
                Backend::Tcp(_) => match reader {
                    Some(mut r) => match tokio::time::timeout(limit, &mut r).await {
                        Ok(_) => None,
                        Err(_) => Some(r),
                    },
                    None => None,
                },
            }
        });
        self.reader = reader;
        self.close(limit);
    }
}
