//! QUIC (quinn): one bidirectional stream per migration for control, and the source's page
//! lanes as unidirectional streams where both ends speak them (`lanes`); an abort is an
//! application close (code 1, the reason as text), which overtakes every stream byte still
//! queued; a second source is refused with CONNECTION_REFUSED. The transport's tuning is
//! in `tls::transport`.

use super::lanes::LANES_ALPN;
use super::pump::{WireReader, WireWriter};
use super::{BUSY, Backend, CA_HINT, CLOSE_LINGER, CONNECT_TIMEOUT, Connected, LaneRole, LinkError, lost};
use crate::tls::{Identity, SERVER_NAME};
use std::net::SocketAddr;
use std::time::Duration;

/// Application close codes: the end of a migration, and an abort (the reason follows).
const CLOSE_DONE: u32 = 0;
const CLOSE_ABORT: u32 = 1;

pub(super) struct Conn {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

impl Conn {
    pub fn abort(&self, reason: &str) {
        self.connection.close(CLOSE_ABORT.into(), reason.as_bytes());
    }

    pub async fn wait_idle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.endpoint.wait_idle()).await;
    }

    pub async fn close(&self) {
        self.connection.close(CLOSE_DONE.into(), b"done");
        self.wait_idle(CLOSE_LINGER).await;
    }
}

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

/// A quinn endpoint on `socket` that takes datagrams as large as loopback's (the MTU
/// discovery in `tls::transport` decides what is sent).
pub(super) fn endpoint(
    runtime: &tokio::runtime::Runtime,
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, String> {
    let _guard = runtime.enter();
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(crate::tls::MAX_UDP_PAYLOAD).map_err(|e| e.to_string())?;
    let rt = quinn::default_runtime().ok_or("no async runtime for quinn")?;
    quinn::Endpoint::new(config, server, socket, rt).map_err(|e| e.to_string())
}

pub(super) fn connect(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    identity: &Identity,
) -> Result<Connected, LinkError> {
    let client = identity.client_config()?;
    let connect_err = |reason: String| LinkError::Connect { addr, reason };
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(lost)?;
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| connect_err(e.to_string()))?;
    let mut endpoint = endpoint(runtime, socket, None).map_err(connect_err)?;
    endpoint.set_default_client_config(client);
    runtime.block_on(async {
        let connecting = endpoint.connect(addr, SERVER_NAME).map_err(|e| connect_err(e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_err(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_err(handshake_reason(&e)))?;
        let streams = connection.open_bi().await.map_err(|e| connect_err(e.to_string()))?;
        let lanes = if speaks_lanes(&connection) { LaneRole::Send } else { LaneRole::None };
        Ok(connected(endpoint, connection, streams, lanes))
    })
}

fn connected(
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    lanes: LaneRole,
) -> Connected {
    let peer = connection.remote_address();
    // Control frames go ahead of the lanes' pages: they wait for them at the destination
    // anyway, and a post-copy's page requests should not.
    let _ = send.set_priority(1);
    Connected {
        writer: WireWriter::Quic(Writer { send, connection: connection.clone() }),
        reader: WireReader::Quic(Reader { recv }),
        backend: Backend::Quic(Conn { endpoint, connection }),
        peer,
        lanes,
    }
}

/// Whether the handshake chose the ALPN of page lanes (both ends are new enough).
fn speaks_lanes(connection: &quinn::Connection) -> bool {
    connection
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == LANES_ALPN)
}

/// Opens a page lane's stream (the peer speaks lanes).
pub(super) async fn open_lane(connection: &quinn::Connection) -> Result<WireWriter, LinkError> {
    let send = connection.open_uni().await.map_err(|e| connection_error(&e))?;
    Ok(WireWriter::Quic(Writer { send, connection: connection.clone() }))
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
        format!("{e} ({CA_HINT})")
    } else if matches!(e, C::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED) {
        BUSY.to_string()
    } else if matches!(e, C::TimedOut) {
        "no answer (is `novacron vmm receive` listening there, and can UDP pass?)".to_string()
    } else {
        e.to_string()
    }
}

/// The first source whose handshake succeeds and that opens its stream.
pub(super) async fn accept(endpoint: &quinn::Endpoint) -> Result<Connected, LinkError> {
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
            Ok(streams) => {
                let lanes = if speaks_lanes(&connection) { LaneRole::Receive } else { LaneRole::None };
                return Ok(connected(endpoint.clone(), connection, streams, lanes));
            }
            Err(e) => tracing::warn!(%remote, "migration peer left before it sent anything: {e}"),
        }
    }
}

/// Refuses every further source while this listener's migration runs, so that a second
/// one hears at once that the receiver is busy instead of waiting for a handshake.
pub(super) async fn refuse_others(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tracing::warn!(remote = %incoming.remote_address(), "refused a second migration source (QUIC): busy with one");
        incoming.refuse();
    }
}

pub(super) struct Writer {
    send: quinn::SendStream,
    connection: quinn::Connection,
}

impl Writer {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send.write_all(bytes).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => connection_error(&c),
            other => lost(other),
        })
    }

    pub async fn finish(&mut self) {
        let _ = self.send.finish();
        let _ = self.send.stopped().await;
    }

    pub fn cut(&mut self) {
        let _ = self.send.finish();
    }

    pub fn abort(&mut self, reason: &str) {
        // `Link::abort` closed the connection already; this is the same close.
        self.connection.close(CLOSE_ABORT.into(), reason.as_bytes());
    }
}

pub(super) struct Reader {
    recv: quinn::RecvStream,
}

impl Reader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Reader { recv }
    }

    pub async fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        match self.recv.read_exact(buf).await {
            Ok(()) => Ok(buf.len()),
            Err(quinn::ReadExactError::FinishedEarly(n)) => Ok(n),
            Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => Err(connection_error(&c)),
            Err(quinn::ReadExactError::ReadError(e)) => Err(lost(e)),
        }
    }
}
