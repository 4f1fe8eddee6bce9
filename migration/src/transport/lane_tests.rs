//! Page lanes over QUIC: the order the destination's link hands out, what an older peer at
//! either end gets, and framing that does not add up.

use super::*;
use crate::protocol::{ALPN, PageBatch, PageEntry};

const WAIT: Duration = Duration::from_secs(10);

fn identity(dir: &std::path::Path) -> Identity {
    crate::tls::init(&dir.join("a"), "a").unwrap();
    Identity::load(&dir.join("a")).unwrap()
}

fn listen(id: &Identity) -> (Listener, SocketAddr) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), id).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A listener whose link's first `n` messages the returned thread answers, and this
/// node's identity to connect with.
fn receiving(n: usize) -> (tempfile::TempDir, Identity, SocketAddr, std::thread::JoinHandle<Vec<Message>>) {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path());
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        (0..n).map(|_| link.recv(WAIT).unwrap()).collect()
    });
    (tmp, id, addr, server)
}

/// A batch of shard `shard`'s `n`-th frame, told apart by its page number.
fn batch(shard: usize, n: u64) -> Message {
    let page = (shard as u64) << 32 | n;
    Message::Pages(PageBatch {
        entries: vec![PageEntry::Zero { page }],
        raw_len: 0,
        compressed: false,
        data: Vec::new(),
    })
}

fn shard_and_number(m: &Message) -> Option<(usize, u64)> {
    match m {
        Message::Pages(b) => b.entries.first().map(|e| ((e.page() >> 32) as usize, e.page() & 0xffff_ffff)),
        _ => None,
    }
}

/// Three control frames with batches of four shards between them, the later shards
/// held up by large frames: each control frame comes out after every batch sent before it
/// and before every batch sent after it, each shard's batches in order, nothing lost.
#[test]
fn quic_lanes_deliver_each_control_frame_after_the_batches_before_it_and_before_those_after() {
    const SHARDS: usize = 4;
    const PER_EPOCH: u64 = 6;
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path());
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        let mut got = Vec::new();
        loop {
            let m = link.recv(WAIT).unwrap();
            let end = m == Message::Commit;
            got.push(m);
            if end {
                return got;
            }
        }
    });
    let mut link = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Quic).unwrap();
    assert!(link.requester().is_none(), "a link with lanes handed out a requester");
    let mut numbers = [0u64; SHARDS];
    let mut sent = 0;
    for epoch in 0..3u8 {
        link.send(&Message::State(vec![epoch; 10])).unwrap();
        for i in 0..PER_EPOCH * SHARDS as u64 {
            let shard = (i as usize * 7 + epoch as usize) % SHARDS;
            let frame = protocol::encode_frame(&batch(shard, numbers[shard])).unwrap();
            // A large frame on the last shard: the other lanes overtake it.
            let frame = if shard == SHARDS - 1 && i % 5 == 0 {
                protocol::encode_frame(&Message::Pages(PageBatch {
                    entries: vec![PageEntry::Full { page: (shard as u64) << 32 | numbers[shard] }],
                    raw_len: crate::page::PAGE_SIZE as u32,
                    compressed: false,
                    data: vec![1; crate::page::PAGE_SIZE],
                }))
                .unwrap()
            } else {
                frame
            };
            link.send_pages(shard, frame).unwrap();
            numbers[shard] += 1;
            sent += 1;
        }
    }
    link.send(&Message::Commit).unwrap();
    let got = server.join().unwrap();
    assert_eq!(link.lanes_opened(), SHARDS);
    link.close(WAIT);

    assert_eq!(got.len(), sent + 4, "every frame arrived once");
    let mut next = [0u64; SHARDS];
    let mut epoch = 0u8;
    let mut in_epoch = 0;
    for m in &got {
        match shard_and_number(m) {
            Some((shard, n)) => {
                assert_eq!(n, next[shard], "shard {shard}'s batches out of order: {got:?}");
                next[shard] += 1;
                in_epoch += 1;
            }
            None => {
                if epoch > 0 {
                    assert_eq!(in_epoch, PER_EPOCH * SHARDS as u64, "epoch {epoch} has the wrong batches");
                }
                if let Message::State(s) = m {
                    assert_eq!(s[0], epoch);
                }
                epoch += 1;
                in_epoch = 0;
            }
        }
    }
    assert_eq!(next, numbers);
}

#[test]
fn tcp_links_have_no_lanes_and_send_pages_on_the_one_stream() {
    let (_tmp, id, addr, server) = receiving(3);
    let mut link = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Tcp).unwrap();
    link.send(&Message::Commit).unwrap();
    link.send_pages(3, protocol::encode_frame(&batch(3, 0)).unwrap()).unwrap();
    link.send(&Message::Commit).unwrap();

    assert_eq!(server.join().unwrap(), [Message::Commit, batch(3, 0), Message::Commit]);
    assert_eq!(link.lanes_opened(), 0);
}

fn quic_runtime() -> tokio::runtime::Runtime {
    runtime().unwrap()
}

/// A client endpoint with this node's certificate offering only `alpn`.
fn client_offering(rt: &tokio::runtime::Runtime, id: &Identity, alpn: &[u8]) -> quinn::Endpoint {
    let mut tls = id.rustls_client().unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let _guard = rt.enter();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// An older source (the plain ALPN) sends plain frames on one stream; a new listener reads
/// them as they are.
#[test]
fn quic_a_source_without_lanes_is_read_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path());
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || listener.accept().unwrap().recv(WAIT));
    let rt = quic_runtime();
    let endpoint = client_offering(&rt, &id, ALPN);
    rt.block_on(async {
        let conn = endpoint.connect(addr, crate::tls::SERVER_NAME).unwrap().await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&protocol::encode_frame(&batch(0, 7)).unwrap()).await.unwrap();
        assert_eq!(server.join().unwrap(), Ok(batch(0, 7)));
    });
}

/// A new source and an older receiver (the plain ALPN, no unidirectional streams): the
/// link has no lanes, and pages go on the one stream without heads.
#[test]
fn quic_a_receiver_without_lanes_gets_plain_frames_on_one_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path());
    let rt = quic_runtime();
    let mut tls = id.rustls_server().unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = {
        let _guard = rt.enter();
        quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), "127.0.0.1:0".parse().unwrap())
            .unwrap()
    };
    let addr = server.local_addr().unwrap();
    let reading = rt.spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        let mut frames = Vec::new();
        for _ in 0..2 {
            let mut head = [0u8; 4];
            recv.read_exact(&mut head).await.unwrap();
            let mut body = vec![0u8; protocol::frame_len(head).unwrap()];
            recv.read_exact(&mut body).await.unwrap();
            frames.push(protocol::decode_message(&body).unwrap());
        }
        frames
    });
    let mut link = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Quic).unwrap();
    link.send(&Message::Commit).unwrap();
    link.send_pages(2, protocol::encode_frame(&batch(2, 0)).unwrap()).unwrap();

    assert_eq!(rt.block_on(reading).unwrap(), [Message::Commit, batch(2, 0)]);
    assert_eq!(link.lanes_opened(), 0);
}

fn frame(m: &Message) -> Vec<u8> {
    protocol::encode_frame(m).unwrap()
}

/// A control frame counting no lane frames.
fn plain_control(m: &Message) -> Vec<u8> {
    let mut control = 0u16.to_le_bytes().to_vec();
    control.extend(frame(m));
    control
}

fn lane_frame(lane: u16, epoch: u32, m: &Message) -> Vec<u8> {
    let mut bytes = lane.to_le_bytes().to_vec();
    bytes.extend(epoch.to_le_bytes());
    bytes.extend(frame(m));
    bytes
}

/// What a source speaking lanes sends, byte for byte: `first` on the control stream, then
/// once it has arrived `lane` on a lane's stream, then once that has `then` on the
/// control stream. Answers the error the listener's link ends with.
fn refused(first: Vec<u8>, lane: Option<Vec<u8>>, then: Vec<u8>) -> LinkError {
    let tmp = tempfile::tempdir().unwrap();
    let id = identity(tmp.path());
    let (listener, addr) = listen(&id);
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        loop {
            if let Err(e) = link.recv(WAIT) {
                return e;
            }
        }
    });
    let rt = quic_runtime();
    let endpoint = client_offering(&rt, &id, LANES_ALPN);
    rt.block_on(async {
        let conn = endpoint.connect(addr, crate::tls::SERVER_NAME).unwrap().await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(lane) = lane {
            let mut uni = conn.open_uni().await.unwrap();
            uni.write_all(&lane).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        send.write_all(&then).await.unwrap();
        let err = tokio::task::spawn_blocking(move || server.join().unwrap()).await.unwrap();
        conn.close(0u32.into(), b"");
        err
    })
}

#[test]
fn quic_lane_framing_that_does_not_add_up_is_refused_by_name() {
    let bad = |e: LinkError| e.to_string().trim_start_matches("the peer sent a bad frame: page lanes: ").to_string();
    // A control frame that counts more lanes than there may be.
    let mut control = 9u16.to_le_bytes().to_vec();
    control.extend([0u8; 36]);
    control.extend(frame(&Message::Commit));
    assert_eq!(bad(refused(control, None, Vec::new())), "a control frame counts 9 lanes; at most 8 are allowed");

    let commit = plain_control(&Message::Commit);
    // A lane beyond the last.
    let lane = lane_frame(20, 1, &batch(0, 0));
    assert_eq!(bad(refused(commit.clone(), Some(lane), Vec::new())), "lane 20 is beyond the 8 allowed");

    // A lane frame the control frame after it does not count.
    let lane = lane_frame(0, 1, &batch(0, 0));
    let err = refused(commit.clone(), Some(lane), commit.clone());
    assert_eq!(bad(err), "lane 0 carried 1 frames where the control stream says 0");

    // A lane frame of an epoch that has passed.
    let mut two = commit.clone();
    two.extend(commit.clone());
    let lane = lane_frame(0, 1, &batch(0, 0));
    let err = refused(two, Some(lane), Vec::new());
    assert_eq!(bad(err), "lane 0 carried a frame of epoch 1 after control frame 2 was delivered");
}

/// QUIC shows the destination a stream only once it carries bytes, and the destination
/// takes a link by its control stream: batches sent before any control frame go there.
#[test]
fn quic_batches_sent_before_any_control_frame_still_arrive() {
    let (_tmp, id, addr, server) = receiving(3);
    let mut link = connect(addr, &id, Bandwidth::default(), None, TransportChoice::Quic).unwrap();
    for n in 0..3 {
        link.send_pages(1, protocol::encode_frame(&batch(1, n)).unwrap()).unwrap();
    }

    assert_eq!(server.join().unwrap(), [batch(1, 0), batch(1, 1), batch(1, 2)]);
    assert_eq!(link.lanes_opened(), 1, "the first went on the control stream, the others on a lane");
}
