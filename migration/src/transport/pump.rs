//! The frame pump both transports share: the writer task (queue, token bucket, the test
//! fault, the abort) and the reader task (frames split and decoded), over a byte stream
//! each backend provides.

use super::{LinkError, LinkStats, TruncateAfter, quic, tcp};
use crate::protocol::{self, Message};
use crate::throttle::{Bandwidth, TokenBucket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// The writer waits on the bucket per chunk, so a slow limit does not come in bursts; an
/// abort waits for at most one chunk.
pub(super) const WRITE_CHUNK: usize = 64 << 10;

/// A frame queued for a writer, after the head its stream's framing puts before it
/// (`lanes`; empty on a link without lanes).
pub(super) struct Outgoing {
    pub head: Vec<u8>,
    pub frame: Vec<u8>,
}

impl Outgoing {
    pub fn bare(frame: Vec<u8>) -> Self {
        Outgoing { head: Vec::new(), frame }
    }
}

/// One bandwidth limit over every stream of a link.
pub(super) type SharedBucket = Arc<Mutex<TokenBucket>>;

pub(super) fn shared_bucket() -> SharedBucket {
    Arc::new(Mutex::new(TokenBucket::new(Instant::now())))
}

/// The sending half of a connection's stream.
pub(super) enum WireWriter {
    Quic(quic::Writer),
    Tcp(tcp::Writer),
}

impl WireWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        match self {
            WireWriter::Quic(w) => w.write(bytes).await,
            WireWriter::Tcp(w) => w.write(bytes).await,
        }
    }

    /// Pushes out what a frame left buffered (the TLS layer over TCP buffers).
    async fn flush(&mut self) -> Result<(), LinkError> {
        match self {
            WireWriter::Quic(_) => Ok(()),
            WireWriter::Tcp(w) => w.flush().await,
        }
    }

    /// Ends the stream after everything written, and waits until the peer has it.
    async fn finish(&mut self) {
        match self {
            WireWriter::Quic(w) => w.finish().await,
            WireWriter::Tcp(w) => w.finish().await,
        }
    }

    /// Ends the stream where it is (the test fault), without waiting.
    async fn cut(&mut self) {
        match self {
            WireWriter::Quic(w) => w.cut(),
            WireWriter::Tcp(w) => w.finish().await,
        }
    }

    /// Tells the peer why this side gives up.
    async fn abort(&mut self, reason: &str) {
        match self {
            WireWriter::Quic(w) => w.abort(reason),
            WireWriter::Tcp(w) => w.abort(reason).await,
        }
    }
}

/// The receiving half.
pub(super) enum WireReader {
    Quic(quic::Reader),
    Tcp(tcp::Reader),
}

impl WireReader {
    /// Fills `buf`, or says how much it got before the stream ended.
    pub(super) async fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        match self {
            WireReader::Quic(r) => r.read_full(buf).await,
            WireReader::Tcp(r) => r.read_full(buf).await,
        }
    }
}

pub(super) struct Writer {
    pub wire: WireWriter,
    pub frames: mpsc::Receiver<Outgoing>,
    pub aborted: oneshot::Receiver<String>,
    pub bandwidth: Bandwidth,
    pub bucket: SharedBucket,
    pub stats: Arc<LinkStats>,
    pub fault: Option<TruncateAfter>,
}

impl Writer {
    /// Writes the queued frames until the engine drops its sender (then ends the stream
    /// once the peer has all of it) or aborts (then drops what is queued and says why).
    pub async fn run(mut self) -> Result<(), LinkError> {
        let mut abort_open = true;
        loop {
            let frame = tokio::select! {
                biased;
                reason = &mut self.aborted, if abort_open => match reason {
                    Ok(reason) => return self.abort(&reason).await,
                    // The link is closing without an abort.
                    Err(_) => {
                        abort_open = false;
                        continue;
                    }
                },
                frame = self.frames.recv() => frame,
            };
            let Some(Outgoing { head, frame }) = frame else { break };
            if !head.is_empty() {
                self.wire.write(&head).await?;
            }
            for chunk in frame.chunks(WRITE_CHUNK) {
                if abort_open {
                    match self.aborted.try_recv() {
                        Ok(reason) => return self.abort(&reason).await,
                        Err(oneshot::error::TryRecvError::Closed) => abort_open = false,
                        Err(oneshot::error::TryRecvError::Empty) => {}
                    }
                }
                let wait = self.take(chunk.len() as u64);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let sent = self.stats.sent.load(Ordering::Relaxed);
                if let Some(TruncateAfter(limit)) = self.fault
                    && sent + chunk.len() as u64 > limit
                {
                    let keep = limit.saturating_sub(sent) as usize;
                    self.wire.write(&chunk[..keep]).await?;
                    self.wire.cut().await;
                    tracing::warn!(bytes = limit, "test fault: stream cut short");
                    return Err(LinkError::Lost("test fault: the stream was cut short".into()));
                }
                self.wire.write(chunk).await?;
                self.stats.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            if self.frames.is_empty() {
                self.wire.flush().await?;
            }
        }
        // Everything is queued: end the stream and wait until the peer has all of it, so
        // that closing the connection loses nothing.
        self.wire.finish().await;
        Ok(())
    }

    /// How long to wait before `bytes` may go, by the link's bandwidth limit.
    fn take(&self, bytes: u64) -> std::time::Duration {
        // The bucket holds three numbers and no code that can panic.
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket.take(bytes, self.bandwidth.get(), Instant::now())
    }

    async fn abort(mut self, reason: &str) -> Result<(), LinkError> {
        // Nothing queued goes out any more.
        self.frames.close();
        self.wire.abort(reason).await;
        Ok(())
    }
}

/// Reads frames until the stream ends or fails; the first error is the last message. If
/// the engine stops taking messages, the stream is still read to its end (so that the task
/// ends when the peer's side does).
pub(super) async fn read_frames(
    mut wire: WireReader,
    messages: mpsc::Sender<Result<(Message, u64), LinkError>>,
    stats: Arc<LinkStats>,
) {
    let mut taken = true;
    loop {
        let result = read_frame(&mut wire, &stats).await;
        let stop = result.is_err();
        if taken && messages.send(result).await.is_err() {
            taken = false;
        }
        if stop {
            return;
        }
    }
}

pub(super) async fn read_frame(wire: &mut WireReader, stats: &LinkStats) -> Result<(Message, u64), LinkError> {
    let mut header = [0u8; 4];
    match wire.read_full(&mut header).await? {
        4 => {}
        0 => return Err(LinkError::Closed),
        _ => return Err(truncated("between frames")),
    }
    let len = protocol::frame_len(header)?;
    let mut body = vec![0u8; len];
    if wire.read_full(&mut body).await? < len {
        return Err(truncated("inside a frame"));
    }
    stats.received.fetch_add(4 + len as u64, Ordering::Relaxed);
    Ok((protocol::decode_message(&body)?, 4 + len as u64))
}

pub(super) fn truncated(where_: &str) -> LinkError {
    LinkError::Lost(format!("the stream ended {where_} (truncated)"))
}
