//! Both transports, each behaviour once per transport: the pump and the `Link` API are
//! shared, the connection under them is not.

use super::*;
use crate::protocol::Digests;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::sync::atomic::Ordering;
use std::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

/// A case run on both transports, as two tests.
macro_rules! on_both {
    ($case:ident, $quic:ident, $tcp:ident) => {
        #[test]
        fn $quic() {
            $case(Transport::Quic);
        }

        #[test]
        fn $tcp() {
            $case(Transport::Tcp);
        }
    };
}

fn identity(dir: &std::path::Path, name: &str) -> Identity {
    crate::tls::init(&dir.join(name), name).unwrap();
    Identity::load(&dir.join(name)).unwrap()
}

fn choice(t: Transport) -> TransportChoice {
    match t {
        Transport::Quic => TransportChoice::Quic,
        Transport::Tcp => TransportChoice::Tcp,
    }
}

fn listen(id: &Identity) -> (Listener, SocketAddr) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), id).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn ready() -> Message {
    Message::Ready(Digests { memory: [1; 32], state: [2; 32] })
}

fn messages_cross_both_ways_and_an_abort_carries_its_reason(t: Transport) {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        let got = link.recv(WAIT).unwrap();
        link.send(&ready()).unwrap();
        let err = link.recv(WAIT).unwrap_err();
        (got, err, link.transport())
    });
    let mut link = connect(addr, &id, Bandwidth::default(), None, choice(t)).unwrap();
    link.send(&Message::State(vec![7; 100_000])).unwrap();
    let answer = link.recv(WAIT).unwrap();
    link.abort("the operator cancelled");
    let (got, err, served) = server.join().unwrap();

    assert_eq!(answer, ready());
    assert_eq!(got, Message::State(vec![7; 100_000]));
    assert_eq!(err, LinkError::PeerAborted("the operator cancelled".into()));
    assert_eq!((link.transport(), served), (t, t));
    assert!(link.stats.sent.load(Ordering::Relaxed) > 100_000);
    assert!(link.wire_bytes() > 100_000, "wire bytes {}", link.wire_bytes());
}

on_both!(
    messages_cross_both_ways_and_an_abort_carries_its_reason,
    quic_messages_cross_both_ways_and_an_abort_carries_its_reason,
    tcp_messages_cross_both_ways_and_an_abort_carries_its_reason
);

/// The source queues 4 MiB behind a 20 MB/s limit (200 ms of frames), then aborts: the
/// reason reaches the receiver well before those frames would have.
fn an_abort_does_not_wait_behind_queued_frames(t: Transport) {
    const FRAMES: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        let mut frames = 0;
        loop {
            match link.recv(WAIT) {
                Ok(_) => frames += 1,
                Err(e) => return (frames, e, Instant::now()),
            }
        }
    });
    let mut link = connect(addr, &id, Bandwidth::new(20_000_000), None, choice(t)).unwrap();
    for _ in 0..FRAMES {
        link.send(&Message::State(vec![3; 1 << 20])).unwrap();
    }
    let aborted = Instant::now();
    link.abort("cancelled while frames were queued");
    let (frames, err, heard) = server.join().unwrap();

    assert_eq!(err, LinkError::PeerAborted("cancelled while frames were queued".into()));
    assert!(frames < FRAMES, "all {frames} frames arrived before the abort");
    let late = heard.saturating_duration_since(aborted);
    assert!(late < Duration::from_millis(100), "the abort arrived {late:?} after it was sent");
}

on_both!(
    an_abort_does_not_wait_behind_queued_frames,
    quic_an_abort_does_not_wait_behind_queued_frames,
    tcp_an_abort_does_not_wait_behind_queued_frames
);

fn a_second_source_hears_that_the_receiver_is_busy(t: Transport) {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        let got = link.recv(WAIT);
        (link, got)
    });
    let mut first = connect(addr, &id, Bandwidth::default(), None, choice(t)).unwrap();
    first.send(&Message::Commit).unwrap();
    let (_link, got) = server.join().unwrap();

    let started = Instant::now();
    let second_quic = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Quic).err().unwrap();
    let second_tcp = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Tcp).err().unwrap();

    assert_eq!(got, Ok(Message::Commit));
    for second in [second_quic, second_tcp] {
        assert!(second.to_string().contains("busy with another migration"), "{second}");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "busy took {:?}", started.elapsed());
}

on_both!(
    a_second_source_hears_that_the_receiver_is_busy,
    quic_a_second_source_hears_that_the_receiver_is_busy,
    tcp_a_second_source_hears_that_the_receiver_is_busy
);

/// A source from another cluster is refused, and the listener then takes the right one.
fn a_peer_of_another_ca_is_refused_and_the_listener_waits_on(t: Transport) {
    let tmp = tempfile::tempdir().unwrap();
    let ours = identity(tmp.path(), "a");
    let theirs = identity(tmp.path(), "other");
    let (listener, addr) = listen(&ours);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        link.recv(WAIT)
    });
    let refused = connect(addr, &theirs, Bandwidth::default(), None, choice(t)).err().unwrap();
    let mut right = connect(addr, &ours, Bandwidth::default(), None, choice(t)).unwrap();
    right.send(&Message::Commit).unwrap();

    assert!(matches!(refused, LinkError::Connect { .. }), "{refused:?}");
    assert!(refused.to_string().contains("cluster CA"), "{refused}");
    assert_eq!(server.join().unwrap(), Ok(Message::Commit));
}

on_both!(
    a_peer_of_another_ca_is_refused_and_the_listener_waits_on,
    quic_a_peer_of_another_ca_is_refused_and_the_listener_waits_on,
    tcp_a_peer_of_another_ca_is_refused_and_the_listener_waits_on
);

/// The stream cut in the middle of a frame is reported as truncated, not as a clean end.
fn truncation(t: Transport) {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        let first = link.recv(WAIT);
        (first, link.recv(WAIT))
    });
    let commit = protocol::encode_frame(&Message::Commit).unwrap().len() as u64;
    let mut link = connect(addr, &id, Bandwidth::default(), Some(TruncateAfter(commit + 1000)), choice(t)).unwrap();
    link.send(&Message::Commit).unwrap();
    let _ = link.send(&Message::State(vec![9; 100_000]));
    let (first, second) = server.join().unwrap();

    assert_eq!(first, Ok(Message::Commit));
    assert_eq!(second, Err(LinkError::Lost("the stream ended inside a frame (truncated)".into())));
}

on_both!(
    truncation,
    quic_a_stream_cut_inside_a_frame_is_reported_truncated,
    tcp_a_stream_cut_inside_a_frame_is_reported_truncated
);

/// The token bucket paces both alike: 2 MB at 10 MB/s takes about 200 ms.
fn the_bandwidth_limit_holds(t: Transport) {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        for _ in 0..20 {
            link.recv(WAIT).unwrap();
        }
        link.send(&Message::Commit).unwrap();
        link.wait_closed(WAIT);
    });
    let mut link = connect(addr, &id, Bandwidth::new(10_000_000), None, choice(t)).unwrap();
    let started = Instant::now();
    for _ in 0..20 {
        link.send(&Message::State(vec![5; 100_000])).unwrap();
    }
    let answer = link.recv(WAIT);
    let took = started.elapsed();
    link.close(WAIT);
    server.join().unwrap();

    assert_eq!(answer, Ok(Message::Commit));
    assert!(took >= Duration::from_millis(170) && took < Duration::from_millis(1500), "{took:?}");
}

on_both!(the_bandwidth_limit_holds, quic_the_bandwidth_limit_holds, tcp_the_bandwidth_limit_holds);

#[test]
fn tcp_rtt_comes_from_the_kernel_and_auto_takes_tcp_on_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        let got = link.recv(WAIT);
        (got, link.transport())
    });
    let mut link = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Auto).unwrap();
    link.send(&Message::State(vec![1; 1 << 20])).unwrap();
    let rtt = link.rtt();
    let transport = link.transport();
    link.close(WAIT);
    let (got, served) = server.join().unwrap();

    assert_eq!(got, Ok(Message::State(vec![1; 1 << 20])));
    assert_eq!((transport, served), (Transport::Tcp, Transport::Tcp));
    assert!(rtt > Duration::ZERO && rtt < AUTO_TCP_MAX_RTT, "{rtt:?}");
}

/// A listener, and a client configuration that trusts the cluster CA but presents no
/// certificate of its own.
fn listener_and_a_client_without_a_certificate() -> (tempfile::TempDir, SocketAddr, rustls::ClientConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path(), "a");
    let (listener, addr) = listen(&id);
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
    (tmp, addr, tls)
}

#[test]
fn quic_a_client_without_a_certificate_is_refused() {
    let (_tmp, addr, tls) = listener_and_a_client_without_a_certificate();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let rt = runtime().unwrap();
    let refused = rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let conn =
            endpoint.connect(addr, crate::tls::SERVER_NAME).unwrap().await.map_err(|e| crate::error_chain(&e))?;
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

#[test]
fn tcp_a_client_without_a_certificate_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_tmp, addr, tls) = listener_and_a_client_without_a_certificate();
    let rt = runtime().unwrap();
    let refused = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
        let mut s =
            tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(|e| e.to_string())?;
        s.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(b)
    });
    let err = refused.expect_err("a client without a certificate got through");
    assert!(err.contains("Certificate") || err.contains("certificate"), "refused for another reason: {err}");
}

#[test]
fn test_a_free_port_takes_both_a_tcp_listener_and_a_udp_socket() {
    let ip = std::net::Ipv4Addr::LOCALHOST.into();
    // Hold a TCP port: what free_port answers is never one TCP already has.
    let held = std::net::TcpListener::bind((ip, 0)).unwrap();
    for _ in 0..20 {
        let port = free_port(ip).unwrap();
        assert_ne!(port, held.local_addr().unwrap().port());
        let _tcp = std::net::TcpListener::bind((ip, port)).expect("TCP takes it");
        let _udp = std::net::UdpSocket::bind((ip, port)).expect("UDP takes it");
    }
}
