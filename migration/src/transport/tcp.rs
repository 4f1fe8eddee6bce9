//! TLS 1.3 over TCP: rustls (the ring provider, the same cluster CA, certificates and
//! verification as QUIC, `tls::Identity::rustls_server`/`rustls_client`) on a kernel TCP
//! socket.
//!
//! Inside TLS the stream is a sequence of records, a u32 LE header (the kind in the top
//! byte, the length in the low 24 bits) and its payload:
//!
//! | kind | sent by | payload |
//! |---|---|---|
//! | `DATA` | both | up to 64 KiB of the frame stream (frames may span records) |
//! | `ABORT` | both | the reason, UTF-8; the last record |
//! | `ACCEPT` | the receiver, first | none: this source is the migration |
//! | `BUSY` | the receiver, first | none: another migration runs here; the connection ends |
//!
//! Records let an abort leave at the next 64 KiB boundary instead of behind the rest of an
//! 8 MiB frame; the writer drops what is still queued, and the kernel's send buffer is
//! bounded ([`SEND_BUFFER`]), so that is all an abort waits behind. The end of a migration
//! is a TLS close_notify and the socket's FIN. A dead peer is noticed by TCP keep-alives
//! and `TCP_USER_TIMEOUT` within `tls::IDLE_TIMEOUT`, as QUIC's idle timeout does.

use super::pump::{WRITE_CHUNK, WireReader, WireWriter};
use super::{
    AUTO_PROBE_TIMEOUT, AUTO_TCP_MAX_RTT, BUSY, Backend, CA_HINT, CLOSE_LINGER, CONNECT_TIMEOUT, Connected, LinkError,
    MAX_REASON, lost,
};
use crate::tls::{IDLE_TIMEOUT, Identity, SERVER_NAME};
use socket2::{SockRef, Socket, TcpKeepalive};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

const DATA: u8 = 0;
const ABORT: u8 = 1;
const ACCEPT: u8 = 2;
const REFUSE_BUSY: u8 = 3;
/// The kernel's send buffer (it doubles the figure): what an abort may wait behind, and
/// enough for a 10 Gbit/s LAN with a millisecond of delay.
pub(super) const SEND_BUFFER: usize = 1 << 20;
/// Keep-alive probes after this much silence, this often (the kernel counts in whole
/// seconds), this many: with `TCP_USER_TIMEOUT`, a dead peer is given up within
/// `IDLE_TIMEOUT`, sending or not.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 2;
/// Handshakes a receiver finishes at once before it has picked its source.
const CANDIDATES: usize = 4;

/// rustls reads the socket 4 KiB at a time: a buffer under it makes that a copy, and the
/// socket reads this large (on loopback this more than doubled the rate).
const READ_BUFFER: usize = 256 << 10;

type Socketed = tokio::io::BufReader<Counted>;
type Tls = tokio_rustls::TlsStream<Socketed>;

fn header(kind: u8, len: usize) -> [u8; 4] {
    // Lengths are at most WRITE_CHUNK or MAX_REASON: 24 bits hold them.
    ((u32::from(kind) << 24) | (len as u32 & 0x00ff_ffff)).to_le_bytes()
}

fn parse_header(h: [u8; 4]) -> (u8, usize) {
    let v = u32::from_le_bytes(h);
    ((v >> 24) as u8, (v & 0x00ff_ffff) as usize)
}

/// An I/O error of the socket or of TLS, in words an operator can act on.
fn io_error(e: io::Error) -> LinkError {
    use io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof => {
            LinkError::Lost("the peer's connection ended without a TLS close (it crashed or was killed)".into())
        }
        K::ConnectionReset | K::BrokenPipe => {
            LinkError::Lost("the peer reset the connection (it restarted or crashed)".into())
        }
        K::TimedOut => LinkError::Lost(format!(
            "the peer stopped answering (nothing for {IDLE_TIMEOUT:?}): it ended, or the network between is down"
        )),
        _ => lost(e),
    }
}

/// A TLS failure gets the hint about the cluster CA.
fn handshake_reason(e: &io::Error) -> String {
    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        format!("{e} ({CA_HINT})")
    } else {
        e.to_string()
    }
}

/// Keep-alives, the user timeout, no Nagle delay (a small last frame goes at once), and
/// the bounded send buffer.
fn tune(socket: SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    let keepalive =
        TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(IDLE_TIMEOUT))?;
    socket.set_send_buffer_size(SEND_BUFFER)
}

/// The kernel's smoothed RTT of the connection (`TCP_INFO`'s `tcpi_rtt`).
fn kernel_rtt(socket: &Socket) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is open for as long as `socket` lives; the kernel writes at
    // most `len` bytes into `info`, which is that large, and sets `len` to what it wrote.
    let r = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_rtt) + std::mem::size_of::<u32>();
    if r != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: `info` was zeroed and then (partly) written by the kernel; it holds only
    // integers, for which every bit pattern is valid.
    let info = unsafe { info.assume_init() };
    Some(Duration::from_micros(info.tcpi_rtt.into()))
}

/// The socket as the link keeps it, for `TCP_INFO`, shutdowns and the bytes written.
pub(super) struct Conn {
    /// A duplicate of the connection's descriptor (the TLS stream owns the other).
    socket: Socket,
    written: Arc<AtomicU64>,
}

impl Conn {
    pub fn rtt(&self) -> Duration {
        kernel_rtt(&self.socket).unwrap_or_default()
    }

    /// TLS records (and the handshake) written to the socket.
    pub fn wire_bytes(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// After the writer has ended the stream: waits (briefly) for the peer's end, so that
    /// closing here does not reset a connection whose last bytes are on their way.
    pub async fn close(&self, reader: Option<tokio::task::JoinHandle<()>>) {
        if let Some(r) = reader {
            let _ = tokio::time::timeout(CLOSE_LINGER, r).await;
        }
        self.shutdown();
    }

    pub fn shutdown(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// The socket under TLS, counting what is written to it.
pub(super) struct Counted {
    inner: tokio::net::TcpStream,
    written: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connected socket, tuned, in the runtime (call it inside one), with the duplicate the
/// link keeps.
fn adopt(socket: std::net::TcpStream) -> io::Result<(Socketed, Conn)> {
    tune(SockRef::from(&socket))?;
    let dup = SockRef::from(&socket).try_clone()?;
    socket.set_nonblocking(true)?;
    let inner = tokio::net::TcpStream::from_std(socket)?;
    let written = Arc::new(AtomicU64::new(0));
    let counted = Counted { inner, written: written.clone() };
    Ok((tokio::io::BufReader::with_capacity(READ_BUFFER, counted), Conn { socket: dup, written }))
}

fn split(tls: Tls, conn: Conn, peer: SocketAddr) -> Connected {
    let (read, write) = tokio::io::split(tls);
    Connected {
        writer: WireWriter::Tcp(Writer { half: write, buf: Vec::with_capacity(WRITE_CHUNK + 4) }),
        reader: WireReader::Tcp(Reader { half: read, left: 0 }),
        backend: Backend::Tcp(conn),
        peer,
        lanes: super::LaneRole::None,
    }
}

/// A TCP connection to `addr` within `timeout`.
pub(super) fn dial(addr: SocketAddr, timeout: Duration) -> Result<std::net::TcpStream, LinkError> {
    std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| LinkError::Connect {
        addr,
        reason: if e.kind() == io::ErrorKind::TimedOut {
            format!("no answer within {timeout:?} (is `novacron vmm receive` listening there, and can TCP pass?)")
        } else {
            e.to_string()
        },
    })
}

/// `Auto`'s probe: a TCP connection to `addr` if its handshake (one round trip) takes at
/// most `AUTO_TCP_MAX_RTT`. A far peer's connection is dropped before TLS starts (its
/// receiver notes it and goes on waiting).
pub(super) fn dial_near(addr: SocketAddr) -> Option<std::net::TcpStream> {
    let start = Instant::now();
    match std::net::TcpStream::connect_timeout(&addr, AUTO_PROBE_TIMEOUT) {
        Ok(s) if start.elapsed() <= AUTO_TCP_MAX_RTT => {
            tracing::debug!(%addr, rtt = ?start.elapsed(), "near peer: TLS over TCP");
            Some(s)
        }
        Ok(_) => {
            tracing::info!(%addr, rtt = ?start.elapsed(), "far peer: QUIC");
            None
        }
        Err(e) => {
            tracing::info!(%addr, "no TCP answer ({e}): QUIC");
            None
        }
    }
}

/// TLS on `socket` (connected to `addr`), then the receiver's first record.
pub(super) fn connect(
    runtime: &tokio::runtime::Runtime,
    socket: std::net::TcpStream,
    addr: SocketAddr,
    identity: &Identity,
) -> Result<Connected, LinkError> {
    let connect_err = |reason: String| LinkError::Connect { addr, reason };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(identity.rustls_client()?));
    let peer = socket.peer_addr().map_err(|e| connect_err(e.to_string()))?;
    let (counted, conn) = {
        let _guard = runtime.enter();
        adopt(socket).map_err(|e| connect_err(e.to_string()))?
    };
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).map_err(|e| connect_err(e.to_string()))?;
    runtime.block_on(async {
        let started = async {
            let mut tls = Tls::from(tls.connect(name, counted).await.map_err(|e| handshake_reason(&e))?);
            // TLS 1.3: the receiver's verdict on this side's certificate comes after the
            // handshake, as an alert where its first record would be.
            let mut h = [0u8; 4];
            let got = read_full(&mut tls, &mut h).await.map_err(|e| handshake_reason(&e))?;
            match (got, parse_header(h)) {
                (4, (ACCEPT, 0)) => Ok(tls),
                (4, (REFUSE_BUSY, 0)) => Err(BUSY.to_string()),
                (0, _) => Err("the receiver closed the connection".to_string()),
                (_, (kind, _)) => Err(format!("the receiver answered a record of kind {kind}")),
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, started).await {
            Ok(Ok(tls)) => Ok(split(tls, conn, peer)),
            Ok(Err(reason)) => Err(connect_err(reason)),
            Err(_) => Err(connect_err(format!("no TLS answer within {CONNECT_TIMEOUT:?}"))),
        }
    })
}

/// Reads into `buf` until it is full or the stream ends; says how much it got.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// A source that finished its TLS handshake, waiting for the receiver's first record.
pub(super) struct Candidate {
    tls: Tls,
    conn: Conn,
    peer: SocketAddr,
}

/// The receiver's TCP side: a listener and its TLS configuration.
pub(super) struct Acceptor {
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

impl Acceptor {
    pub fn new(
        runtime: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        identity: &Identity,
    ) -> Result<Self, String> {
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(identity.rustls_server().map_err(|e| e.to_string())?));
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        Ok(Acceptor { listener, tls })
    }

    /// Accepts connections and does their handshakes (each on its own, so a slow or bad
    /// peer holds up no other); the ones that pass come out of the channel.
    pub fn start(self, runtime: &tokio::runtime::Runtime) -> mpsc::Receiver<Candidate> {
        let (tx, rx) = mpsc::channel(CANDIDATES);
        runtime.spawn(async move {
            loop {
                match self.listener.accept().await {
                    Ok((stream, remote)) => {
                        tokio::spawn(handshake(self.tls.clone(), stream, remote, tx.clone()));
                    }
                    Err(e) => {
                        // Out of descriptors, say: wait a little rather than spin.
                        tracing::warn!("cannot accept a TCP connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        rx
    }
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    candidates: mpsc::Sender<Candidate>,
) {
    let adopted = stream.into_std().and_then(adopt);
    let (counted, conn) = match adopted {
        Ok(a) => a,
        Err(e) => return tracing::warn!(%remote, "cannot set up a TCP connection: {e}"),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(counted)).await {
        Ok(Ok(tls)) => {
            let _ = candidates.send(Candidate { tls: Tls::from(tls), conn, peer: remote }).await;
        }
        // An `auto` source that measured the round trip and chose QUIC.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%remote, "a TCP peer left before its TLS handshake")
        }
        Ok(Err(e)) => tracing::warn!(%remote, "refused a migration peer: {}", handshake_reason(&e)),
        Err(_) => tracing::warn!(%remote, "refused a migration peer: no TLS handshake within {CONNECT_TIMEOUT:?}"),
    }
}

/// Takes `candidate` as the migration's source.
pub(super) async fn accepted(mut candidate: Candidate) -> Result<Connected, LinkError> {
    candidate.tls.write_all(&header(ACCEPT, 0)).await.map_err(io_error)?;
    candidate.tls.flush().await.map_err(io_error)?;
    Ok(split(candidate.tls, candidate.conn, candidate.peer))
}

/// Tells every further source that this receiver is busy.
pub(super) async fn refuse_others(mut candidates: mpsc::Receiver<Candidate>) {
    while let Some(mut c) = candidates.recv().await {
        tracing::warn!(remote = %c.peer, "refused a second migration source (TCP): busy with one");
        let _ = c.tls.write_all(&header(REFUSE_BUSY, 0)).await;
        let _ = c.tls.shutdown().await;
    }
}

pub(super) struct Writer {
    half: WriteHalf<Tls>,
    /// A record being put together: header and payload in one write, one TLS record run.
    buf: Vec<u8>,
}

impl Writer {
    async fn record(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&header(kind, payload.len()));
        self.buf.extend_from_slice(payload);
        self.half.write_all(&self.buf).await
    }

    /// `bytes`: at most `WRITE_CHUNK`, as the pump writes them.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.record(DATA, bytes).await.map_err(io_error)
    }

    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.half.flush().await.map_err(io_error)
    }

    /// close_notify, then the socket's FIN.
    pub async fn finish(&mut self) {
        let _ = self.half.flush().await;
        let _ = self.half.shutdown().await;
    }

    pub async fn abort(&mut self, reason: &str) {
        let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        if let Err(e) = self.record(ABORT, reason).await {
            tracing::debug!("the abort did not reach the peer: {e}");
        }
        self.finish().await;
    }
}

pub(super) struct Reader {
    half: ReadHalf<Tls>,
    /// Payload bytes left in the current DATA record.
    left: usize,
}

impl Reader {
    pub async fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        let mut got = 0;
        while got < buf.len() {
            if self.left == 0 {
                let mut h = [0u8; 4];
                match read_full(&mut self.half, &mut h).await.map_err(io_error)? {
                    4 => {}
                    0 => return Ok(got),
                    _ => return Err(LinkError::Lost("the stream ended inside a record header (truncated)".into())),
                }
                match parse_header(h) {
                    (DATA, len) if len <= WRITE_CHUNK => self.left = len,
                    (ABORT, len) if len <= MAX_REASON => {
                        let mut reason = vec![0u8; len];
                        read_full(&mut self.half, &mut reason).await.map_err(io_error)?;
                        return Err(LinkError::PeerAborted(String::from_utf8_lossy(&reason).into_owned()));
                    }
                    (kind, len) => {
                        return Err(LinkError::Lost(format!("the peer sent a bad record (kind {kind}, {len} bytes)")));
                    }
                }
                continue;
            }
            let want = self.left.min(buf.len() - got);
            match self.half.read(&mut buf[got..got + want]).await.map_err(io_error)? {
                0 => return Ok(got),
                n => {
                    got += n;
                    self.left -= n;
                }
            }
        }
        Ok(got)
    }
}
