//! The QUIC link a migration runs over: one bidirectional stream of framed messages,
//! mutual TLS, and a bandwidth limit on what this side sends.
//!
//! The engines on both ends are plain threads; a `Link` hides the async side. It owns a
//! one-worker tokio runtime whose two tasks pump frames: the writer takes encoded frames
//! from a small bounded queue (so the engine is paced by the network), waits on the token
//! bucket and writes them; the reader splits the peer's bytes into frames, decodes them
//! and queues the messages. A failure on either side ends the link, and the engine's next
//! call returns the error.

use crate::protocol::{self, Message, ProtocolError};
use crate::throttle::{Bandwidth, TokenBucket};
use crate::tls::{Identity, SERVER_NAME, TlsError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Frames queued for the writer: enough to keep the link busy while the engine encodes.
const QUEUE_FRAMES: usize = 4;
/// The writer waits on the bucket per chunk, so a slow limit does not come in bursts.
const WRITE_CHUNK: usize = 64 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

pub struct Link {
    runtime: tokio::runtime::Runtime,
    out: Option<mpsc::Sender<Vec<u8>>>,
    /// Messages read by the reader task, with their frame sizes.
    incoming: mpsc::Receiver<Result<(Message, u64), LinkError>>,
    writer: Option<tokio::task::JoinHandle<Result<(), LinkError>>>,
    pub stats: Arc<LinkStats>,
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
    peer: SocketAddr,
    bandwidth: Bandwidth,
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

/// Application close codes: the end of a migration, and an abort (the reason follows).
const CLOSE_DONE: u32 = 0;
const CLOSE_ABORT: u32 = 1;

/// Why the connection went, in words an operator can act on.
fn connection_error(e: &quinn::ConnectionError) -> LinkError {
    use quinn::ConnectionError as C;
    match e {
        C::ApplicationClosed(c) if c.error_code == CLOSE_ABORT.into() => {
            LinkError::PeerAborted(String::from_utf8_lossy(&c.reason).into_owned())
        }
        C::ApplicationClosed(_) => LinkError::Closed,
        C::TimedOut => LinkError::Lost(format!(
            "the peer stopped answering (nothing for {:?}): it ended, or the network between is down",
            crate::tls::IDLE_TIMEOUT
        )),
        C::Reset => LinkError::Lost("the peer reset the connection (it restarted or crashed)".into()),
        other => lost(other),
    }
}

fn write_error(e: quinn::WriteError) -> LinkError {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_error(&c),
        other => lost(other),
    }
}

/// Connects to a receiving VMM at `addr`.
pub fn connect(
    addr: SocketAddr,
    identity: &Identity,
    bandwidth: Bandwidth,
    fault: Option<TruncateAfter>,
) -> Result<Link, LinkError> {
    let runtime = runtime()?;
    let client = identity.client_config()?;
    let connect_err = |reason: String| LinkError::Connect { addr, reason };
    let (endpoint, connection, streams) = runtime.block_on(async {
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(lost)?;
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(client);
        let connecting = endpoint.connect(addr, SERVER_NAME).map_err(|e| connect_err(e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_err(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_err(handshake_reason(&e)))?;
        let streams = connection.open_bi().await.map_err(|e| connect_err(e.to_string()))?;
        Ok::<_, LinkError>((endpoint, connection, streams))
    })?;
    Ok(Link::start(runtime, endpoint, connection, streams, bandwidth, fault))
}

/// TLS alerts travel as QUIC transport error codes 0x100 + alert.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

fn handshake_reason(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as C;
    let tls = match e {
        C::TransportError(t) => is_tls_alert(t.code),
        C::ConnectionClosed(c) => is_tls_alert(c.error_code),
        _ => false,
    };
    if tls {
        format!("{e} (the two sides' certificates are not from the same cluster CA: check --tls-dir on both)")
    } else if matches!(e, C::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED) {
        "the receiver is busy with another migration (a `vmm receive` takes one VM): start another one".to_string()
    } else if matches!(e, C::TimedOut) {
        "no answer (is `novacron vmm receive` listening there, and can UDP pass?)".to_string()
    } else {
        e.to_string()
    }
}

/// A bound QUIC endpoint waiting for the migration's source.
pub struct Listener {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
}

impl Listener {
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<Self, LinkError> {
        let runtime = runtime()?;
        let server = identity.server_config()?;
        let endpoint = {
            let _guard = runtime.enter();
            quinn::Endpoint::server(server, addr).map_err(|e| LinkError::Listen { addr, reason: e.to_string() })?
        };
        Ok(Listener { runtime, endpoint })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Waits for a source with a valid certificate. Peers that fail the TLS handshake are
    /// logged and refused; the listener goes on waiting for the right one.
    pub fn accept(self) -> Result<Link, LinkError> {
        let endpoint = self.endpoint.clone();
        let (connection, streams) = self.runtime.block_on(async {
            loop {
                let incoming = endpoint.accept().await.ok_or(LinkError::Closed)?;
                let remote = incoming.remote_address();
                let connection = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%remote, "refused a migration peer: {}", handshake_reason(&e));
                        continue;
                    }
                };
                match connection.accept_bi().await {
                    Ok(streams) => return Ok::<_, LinkError>((connection, streams)),
                    Err(e) => tracing::warn!(%remote, "migration peer left before it sent anything: {e}"),
                }
            }
        })?;
        self.runtime.spawn(refuse_others(endpoint));
        Ok(Link::start(self.runtime, self.endpoint, connection, streams, Bandwidth::default(), None))
    }
}

/// Refuses every further source while this listener's migration runs, so that a second
/// one hears at once that the receiver is busy instead of waiting for a handshake.
async fn refuse_others(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tracing::warn!(remote = %incoming.remote_address(), "refused a second migration source: busy with one");
        incoming.refuse();
    }
}

async fn write_frames(
    mut send: quinn::SendStream,
    mut frames: mpsc::Receiver<Vec<u8>>,
    bandwidth: Bandwidth,
    stats: Arc<LinkStats>,
    fault: Option<TruncateAfter>,
) -> Result<(), LinkError> {
    let mut bucket = TokenBucket::new(Instant::now());
    while let Some(frame) = frames.recv().await {
        for chunk in frame.chunks(WRITE_CHUNK) {
            let wait = bucket.take(chunk.len() as u64, bandwidth.get(), Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let sent = stats.sent.load(Ordering::Relaxed);
            if let Some(TruncateAfter(limit)) = fault
                && sent + chunk.len() as u64 > limit
            {
                let keep = limit.saturating_sub(sent) as usize;
                send.write_all(&chunk[..keep]).await.map_err(write_error)?;
                let _ = send.finish();
                tracing::warn!(bytes = limit, "test fault: stream cut short");
                return Err(LinkError::Lost("test fault: the stream was cut short".into()));
            }
            send.write_all(chunk).await.map_err(write_error)?;
            stats.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }
    // The engine dropped its sender: everything is queued. End the stream and wait until
    // the peer has acknowledged all of it, so that closing the connection loses nothing.
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

async fn read_frames(
    mut recv: quinn::RecvStream,
    messages: mpsc::Sender<Result<(Message, u64), LinkError>>,
    stats: Arc<LinkStats>,
) {
    loop {
        let mut header = [0u8; 4];
        let result = match recv.read_exact(&mut header).await {
            Ok(()) => match protocol::frame_len(header) {
                Ok(len) => {
                    let mut body = vec![0u8; len];
                    match recv.read_exact(&mut body).await {
                        Ok(()) => {
                            stats.received.fetch_add(4 + len as u64, Ordering::Relaxed);
                            protocol::decode_message(&body).map(|m| (m, 4 + len as u64)).map_err(LinkError::from)
                        }
                        Err(e) => Err(read_error(e, "inside a frame")),
                    }
                }
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(read_error(e, "between frames")),
        };
        let stop = result.is_err();
        if messages.send(result).await.is_err() || stop {
            return;
        }
    }
}

fn read_error(e: quinn::ReadExactError, where_: &str) -> LinkError {
    match e {
        quinn::ReadExactError::FinishedEarly(0) if where_ == "between frames" => LinkError::Closed,
        quinn::ReadExactError::FinishedEarly(_) => LinkError::Lost(format!("the stream ended {where_} (truncated)")),
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => connection_error(&c),
        quinn::ReadExactError::ReadError(e) => lost(e),
    }
}

impl Link {
    fn start(
        runtime: tokio::runtime::Runtime,
        endpoint: quinn::Endpoint,
        connection: quinn::Connection,
        (send, recv): (quinn::SendStream, quinn::RecvStream),
        bandwidth: Bandwidth,
        fault: Option<TruncateAfter>,
    ) -> Link {
        let stats = Arc::new(LinkStats::default());
        let (out, frames) = mpsc::channel(QUEUE_FRAMES);
        let (messages, incoming) = mpsc::channel(QUEUE_FRAMES * 4);
        let writer = runtime.spawn(write_frames(send, frames, bandwidth.clone(), stats.clone(), fault));
        runtime.spawn(read_frames(recv, messages, stats.clone()));
        let peer = connection.remote_address();
        Link {
            runtime,
            out: Some(out),
            incoming,
            writer: Some(writer),
            stats,
            connection,
            endpoint,
            peer,
            bandwidth,
            queued: 0,
            consumed: 0,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection's smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
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
        let sent = match &self.out {
            Some(out) => out.blocking_send(frame).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.writer_error());
        }
        self.queued += len as u64;
        Ok(())
    }

    /// Frame bytes handed to `send` so far; `stats.sent` counts those the writer has
    /// written (behind the bandwidth limit, a queue of frames may wait between the two).
    pub fn queued(&self) -> u64 {
        self.queued
    }

    /// Why the writer stopped.
    fn writer_error(&mut self) -> LinkError {
        self.out = None;
        match self.writer.take() {
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

    /// Bytes the connection put on the wire (UDP payloads, all overheads included).
    pub fn wire_bytes(&self) -> u64 {
        self.connection.stats().udp_tx.bytes
    }

    /// Ends the link: waits up to `grace` for what was queued to reach the peer, then
    /// closes the connection.
    pub fn close(mut self, grace: Duration) {
        self.out = None;
        let writer = self.writer.take();
        let connection = self.connection.clone();
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async move {
            if let Some(w) = writer {
                let _ = tokio::time::timeout(grace, w).await;
            }
            connection.close(CLOSE_DONE.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        });
    }

    /// Gives up at once: closes the connection with `reason`, which the peer reads as
    /// `LinkError::PeerAborted` (nothing queued behind a slow link delays it).
    pub fn abort(&mut self, reason: &str) {
        // A QUIC close frame must fit a packet: keep the reason short.
        let mut end = reason.len().min(900);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.connection.close(CLOSE_ABORT.into(), &reason.as_bytes()[..end]);
        // Only now: ending the queue makes the writer finish the stream, which must not
        // reach the peer before the reason does.
        self.out = None;
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
        });
    }

    /// Waits until the peer closes the connection (at most `limit`), then closes.
    pub fn wait_closed(self, limit: Duration) {
        let connection = self.connection.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(limit, connection.closed()).await;
        });
        self.close(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Digests;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    fn identity(dir: &std::path::Path, name: &str) -> Identity {
        crate::tls::init(&dir.join(name), name).unwrap();
        Identity::load(&dir.join(name)).unwrap()
    }

    #[test]
    fn messages_cross_both_ways_and_an_abort_carries_its_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let id = identity(tmp.path(), "a");
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &id).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut link = listener.accept().unwrap();
            let got = link.recv(Duration::from_secs(10)).unwrap();
            link.send(&Message::Ready(Digests { memory: [1; 32], state: [2; 32] })).unwrap();
            let err = link.recv(Duration::from_secs(10)).unwrap_err();
            (got, err)
        });
        let mut link = connect(addr, &id, Bandwidth::default(), None).unwrap();
        link.send(&Message::State(vec![7; 100_000])).unwrap();
        assert_eq!(
            link.recv(Duration::from_secs(10)).unwrap(),
            Message::Ready(Digests { memory: [1; 32], state: [2; 32] })
        );
        link.abort("the operator cancelled");
        let (got, err) = server.join().unwrap();

        assert_eq!(got, Message::State(vec![7; 100_000]));
        assert_eq!(err, LinkError::PeerAborted("the operator cancelled".into()));
        assert!(link.stats.sent.load(Ordering::Relaxed) > 100_000);
    }

    #[test]
    fn a_second_source_hears_that_the_receiver_is_busy() {
        let tmp = tempfile::tempdir().unwrap();
        let id = identity(tmp.path(), "a");
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &id).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut link = listener.accept().unwrap();
            let got = link.recv(Duration::from_secs(10));
            (link, got)
        });
        let mut first = connect(addr, &id, Bandwidth::default(), None).unwrap();
        first.send(&Message::Commit).unwrap();
        let (_link, got) = server.join().unwrap();

        let second = connect(addr, &id, Bandwidth::default(), None).err().unwrap();

        assert_eq!(got, Ok(Message::Commit));
        assert!(second.to_string().contains("busy with another migration"), "{second}");
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let id = identity(tmp.path(), "a");
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &id).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || listener.accept());
        // A client that trusts the cluster CA but presents no certificate of its own.
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_file(tmp.path().join("a").join(crate::tls::CA_CERT)).unwrap();
        roots.add(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![crate::protocol::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let rt = runtime().unwrap();
        let refused = rt.block_on(async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
            let conn = endpoint.connect(addr, SERVER_NAME).unwrap().await.map_err(|e| crate::error_chain(&e))?;
            // TLS 1.3: the server's verdict on the client certificate may come after the
            // client's handshake completes; the stream then fails.
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| crate::error_chain(&e))?;
            send.write_all(b"hello").await.map_err(|e| crate::error_chain(&e))?;
            let mut b = [0u8; 1];
            recv.read_exact(&mut b).await.map_err(|e| crate::error_chain(&e))?;
            Ok::<_, String>(())
        });
        let err = refused.expect_err("a client without a certificate got through");
        assert!(err.contains("certificate"), "refused for another reason: {err}");
    }
}
