//! Page lanes: over QUIC, the source's page batches travel on QUIC streams of their own,
//! one per shard of the page pipeline (split by memory range), beside the control stream
//! that carries every other message. A lost packet then holds up one lane, not all
//! memory, and the destination takes each lane's batches as they come.
//!
//! Batches of different shards commute (each names only its own shard's pages), but
//! nothing else does: a `State` must come after every batch sent before it, and a batch
//! sent after a `Commit` must not be applied before it. So the destination's link hands
//! the engine the messages in an order the source could have sent them in:
//!
//! ```text
//! lane stream     lane (u16, first on the stream) | { epoch (u32) | frame }…
//! control stream  { count (u16) | frames per lane (u32 × count) | frame }…
//! ```
//!
//! A lane frame's epoch is the number of control frames sent before it; it is delivered
//! once that many were. A control frame carries how many frames each lane carried since
//! the control frame before; it is delivered once they all were. Within a lane the order
//! is the stream's. A lane is opened when it carries its first frame.
//!
//! Both ends choose lanes by ALPN ([`LANES_ALPN`]): a peer that offers only
//! [`protocol::ALPN`](crate::protocol::ALPN) (an older VMM) gets the single stream as before.
//! Only the source sends on lanes; TLS over TCP has one stream.

use super::LinkError;
use super::pump::{Outgoing, read_frame};
use super::{LinkStats, quic};
use crate::protocol::{Message, ProtocolError};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc};

/// The ALPN of a link whose source may send on lanes.
pub const LANES_ALPN: &[u8] = b"novacron-migrate/1+lanes";
/// Lanes a source may open. QUIC's flow control is sized for them ([`STREAM_WINDOW`]).
pub const MAX_LANES: usize = 8;
/// Each stream's receive window. The connection's is the sum of all streams' (the control
/// stream and every lane), so that lanes waiting on their epoch, their windows full, can
/// never take the window a frame the destination waits for needs.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * (MAX_LANES as u32 + 1);

fn lane_error(what: String) -> LinkError {
    LinkError::Protocol(ProtocolError::Lane(what))
}

/// The source's side: what heads each frame it sends, kept on the engine's thread in the
/// order it sends them.
#[derive(Debug, Default)]
pub(super) struct LaneCounter {
    /// Control frames sent.
    epoch: u32,
    /// Frames each lane carried since the last control frame.
    counts: Vec<u32>,
}

impl LaneCounter {
    /// The head of the next frame on `lane` (`first`: the lane's stream starts with it).
    pub fn lane_head(&mut self, lane: usize, first: bool) -> Vec<u8> {
        if self.counts.len() <= lane {
            self.counts.resize(lane + 1, 0);
        }
        self.counts[lane] += 1;
        let mut head = Vec::with_capacity(6);
        if first {
            head.extend_from_slice(&(lane as u16).to_le_bytes());
        }
        head.extend_from_slice(&self.epoch.to_le_bytes());
        head
    }

    /// Whether a control frame went: until one has, the destination has not taken the
    /// link (QUIC shows it a stream only once it carries bytes).
    pub fn control_sent(&self) -> bool {
        self.epoch > 0
    }

    /// The head of the next control frame.
    pub fn control_head(&mut self) -> Vec<u8> {
        let mut head = Vec::with_capacity(2 + 4 * self.counts.len());
        head.extend_from_slice(&(self.counts.len() as u16).to_le_bytes());
        for count in self.counts.drain(..) {
            head.extend_from_slice(&count.to_le_bytes());
        }
        self.epoch += 1;
        head
    }
}

/// The destination's side: how far delivery got, shared by the stream readers.
#[derive(Debug, Default)]
struct Delivered {
    /// Control frames handed to the engine.
    epoch: u32,
    /// Lane frames of the current epoch handed to the engine, per lane.
    counts: [u32; MAX_LANES],
}

#[derive(Default)]
pub(super) struct Gate {
    delivered: Mutex<Delivered>,
    changed: Notify,
}

impl Gate {
    /// Waits until `ready` says yes (or no: an error) about what was delivered.
    async fn wait(&self, mut ready: impl FnMut(&Delivered) -> Result<bool, LinkError>) -> Result<(), LinkError> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if ready(&self.lock())? {
                return Ok(());
            }
            changed.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Delivered> {
        // The lock guards two counters and no code that can panic; a poisoned one still
        // holds them.
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut Delivered)) {
        change(&mut self.lock());
        self.changed.notify_waiters();
    }
}

type Messages = mpsc::Sender<Result<(Message, u64), LinkError>>;

/// Reads the control stream: each frame waits until every lane frame before it was
/// delivered.
pub(super) async fn read_control(
    mut wire: super::pump::WireReader,
    gate: Arc<Gate>,
    messages: Messages,
    stats: Arc<LinkStats>,
) {
    loop {
        let result = async {
            let counts = read_counts(&mut wire).await?;
            let frame = read_frame(&mut wire, &stats).await?;
            gate.wait(|d| {
                for (lane, &got) in d.counts.iter().enumerate() {
                    let want = counts.get(lane).copied().unwrap_or(0);
                    if got > want {
                        return Err(lane_error(format!(
                            "lane {lane} carried {got} frames where the control stream says {want}"
                        )));
                    }
                    if got < want {
                        return Ok(false);
                    }
                }
                Ok(true)
            })
            .await?;
            Ok(frame)
        }
        .await;
        let stop = result.is_err();
        if messages.send(result).await.is_err() || stop {
            return;
        }
        gate.update(|d| {
            d.epoch = d.epoch.saturating_add(1);
            d.counts = [0; MAX_LANES];
        });
    }
}

async fn read_counts(wire: &mut super::pump::WireReader) -> Result<Vec<u32>, LinkError> {
    let mut count = [0u8; 2];
    match wire.read_full(&mut count).await? {
        2 => {}
        0 => return Err(LinkError::Closed),
        _ => return Err(super::pump::truncated("between frames")),
    }
    let count = u16::from_le_bytes(count) as usize;
    if count > MAX_LANES {
        return Err(lane_error(format!("a control frame counts {count} lanes; at most {MAX_LANES} are allowed")));
    }
    let mut bytes = vec![0u8; 4 * count];
    if wire.read_full(&mut bytes).await? < bytes.len() {
        return Err(super::pump::truncated("inside a frame"));
    }
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Takes the source's lane streams as it opens them, each read by a task of its own.
pub(super) async fn accept_lanes(
    connection: quinn::Connection,
    gate: Arc<Gate>,
    messages: Messages,
    stats: Arc<LinkStats>,
) {
    let mut opened = [false; MAX_LANES];
    while let Ok(recv) = connection.accept_uni().await {
        let mut wire = super::pump::WireReader::Quic(quic::Reader::new(recv));
        let lane = match read_lane_number(&mut wire, &mut opened).await {
            Ok(lane) => lane,
            Err(e) => {
                let _ = messages.send(Err(e)).await;
                return;
            }
        };
        tokio::spawn(read_lane(wire, lane, gate.clone(), messages.clone(), stats.clone()));
    }
}

async fn read_lane_number(
    wire: &mut super::pump::WireReader,
    opened: &mut [bool; MAX_LANES],
) -> Result<usize, LinkError> {
    let mut lane = [0u8; 2];
    if wire.read_full(&mut lane).await? < 2 {
        return Err(super::pump::truncated("before its lane number"));
    }
    let lane = u16::from_le_bytes(lane) as usize;
    match opened.get_mut(lane) {
        Some(seen) if !*seen => {
            *seen = true;
            Ok(lane)
        }
        Some(_) => Err(lane_error(format!("lane {lane} was opened twice"))),
        None => Err(lane_error(format!("lane {lane} is beyond the {MAX_LANES} allowed"))),
    }
}

/// Reads one lane: each frame waits until the control frames before it were delivered.
/// The lane's end is no error (the control stream says when the migration ends).
async fn read_lane(
    mut wire: super::pump::WireReader,
    lane: usize,
    gate: Arc<Gate>,
    messages: Messages,
    stats: Arc<LinkStats>,
) {
    loop {
        let result = async {
            let mut epoch = [0u8; 4];
            match wire.read_full(&mut epoch).await? {
                4 => {}
                0 => return Ok(None),
                _ => return Err(super::pump::truncated("between frames")),
            }
            let epoch = u32::from_le_bytes(epoch);
            let frame = read_frame(&mut wire, &stats).await?;
            gate.wait(|d| match d.epoch.cmp(&epoch) {
                std::cmp::Ordering::Less => Ok(false),
                std::cmp::Ordering::Equal => Ok(true),
                std::cmp::Ordering::Greater => Err(lane_error(format!(
                    "lane {lane} carried a frame of epoch {epoch} after control frame {} was delivered",
                    d.epoch
                ))),
            })
            .await?;
            Ok(Some(frame))
        }
        .await;
        match result {
            Ok(None) => return,
            Ok(Some(frame)) => {
                if messages.send(Ok(frame)).await.is_err() {
                    return;
                }
                gate.update(|d| d.counts[lane] = d.counts[lane].saturating_add(1));
            }
            Err(e) => {
                let _ = messages.send(Err(e)).await;
                return;
            }
        }
    }
}

/// A lane's writer on the source: its stream and the queue the engine fills.
pub(super) struct LaneWriter {
    pub out: mpsc::Sender<Outgoing>,
    pub task: tokio::task::JoinHandle<Result<(), LinkError>>,
}
