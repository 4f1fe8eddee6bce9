//! The control port's connections before they have proved themselves.
//!
//! A connection is *pending* from its accept until its first authenticated call (a client
//! certificate of the cluster CA, or the daemon's token: see `auth`). Pending connections
//! are few and short-lived, so that idle or half-open ones cannot take the daemon's file
//! descriptors:
//!
//! - at most [`MAX_PENDING`] at once: a new one past that closes the oldest pending one
//!   (a real client authenticates within milliseconds of connecting, an idle one never does);
//! - each is closed [`PENDING_TIMEOUT`] after its accept if it has not authenticated by then
//!   (the TLS handshake has a shorter timeout of its own, in `run`);
//! - when `accept` fails for want of descriptors (EMFILE, ENFILE) or memory, the oldest
//!   pending connection is closed and accepting waits a little, doubling up to
//!   [`MAX_BACKOFF`] while nothing can be freed, instead of retrying at once (which is a
//!   busy loop while the error lasts).
//!
//! Authenticated connections are not limited here: they come from the cluster's hosts and
//! operators.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections that have not authenticated yet, at most.
pub const MAX_PENDING: usize = 64;
/// How long a connection may take from its accept to its first authenticated call.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait after an accept that failed for want of descriptors.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// The longest such wait.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A failing accept is logged once per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One pending connection, as both the gate and the connection see it.
#[derive(Default)]
struct Pending {
    /// Closed by the gate (to make room): the connection ends at its next poll.
    evicted: AtomicBool,
    /// Authenticated: no longer pending.
    passed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Pending {
    fn waker(&self) -> MutexGuard<'_, Option<Waker>> {
        self.waker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        if let Some(waker) = self.waker().take() {
            waker.wake();
        }
    }
}

#[derive(Default)]
struct Registry {
    next: u64,
    /// Oldest first.
    pending: VecDeque<(u64, Option<SocketAddr>, Arc<Pending>)>,
}

/// The pending connections of one port.
#[derive(Default)]
pub struct Gate {
    registry: Mutex<Registry>,
}

impl Gate {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every change is one push or one removal: a panic elsewhere leaves it whole.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection from `peer` made an authenticated call: it is not pending any more.
    pub fn authenticated(&self, peer: Option<SocketAddr>) {
        let Some(peer) = peer else { return };
        let mut registry = self.registry();
        if let Some(i) = registry.pending.iter().position(|(_, addr, _)| *addr == Some(peer))
            && let Some((_, _, pending)) = registry.pending.remove(i)
        {
            pending.passed.store(true, Ordering::Release);
        }
    }

    /// Connections pending now.
    pub fn pending(&self) -> usize {
        self.registry().pending.len()
    }

    /// Closes the oldest pending connection; false when there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self.registry().pending.pop_front();
        oldest.map(|(_, _, pending)| pending.evict()).is_some()
    }

    fn admit(self: &Arc<Self>, stream: TcpStream) -> Guarded {
        let peer = stream.peer_addr().ok();
        let pending = Arc::new(Pending::default());
        let (id, evicted) = {
            let mut registry = self.registry();
            registry.next += 1;
            let id = registry.next;
            registry.pending.push_back((id, peer, pending.clone()));
            let over = registry.pending.len().saturating_sub(MAX_PENDING);
            (id, (0..over).filter_map(|_| registry.pending.pop_front()).map(|(_, _, p)| p).collect::<Vec<_>>())
        };
        if !evicted.is_empty() {
            tracing::debug!("{MAX_PENDING} connections wait to authenticate; closing the oldest");
        }
        evicted.iter().for_each(|p| p.evict());
        Guarded {
            inner: stream,
            watch: Some(Watch {
                gate: self.clone(),
                id,
                pending,
                deadline: Box::pin(tokio::time::sleep(PENDING_TIMEOUT)),
            }),
        }
    }

    fn forget(&self, id: u64) {
        self.registry().pending.retain(|(i, _, _)| *i != id);
    }
}

/// What a pending connection watches: its eviction, its authentication, its deadline.
struct Watch {
    gate: Arc<Gate>,
    id: u64,
    pending: Arc<Pending>,
    deadline: Pin<Box<Sleep>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.gate.forget(self.id);
    }
}

/// An accepted connection; it fails its next read once evicted or past its deadline
/// without having authenticated, so that its server task ends and closes it.
pub struct Guarded {
    inner: TcpStream,
    /// `None` once authenticated.
    watch: Option<Watch>,
}

impl Guarded {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(watch) = &mut self.watch else { return Ok(()) };
        if watch.pending.passed.load(Ordering::Acquire) {
            self.watch = None;
            return Ok(());
        }
        *watch.pending.waker() = Some(cx.waker().clone());
        if watch.pending.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "closed to make room: it had not authenticated"));
        }
        if watch.deadline.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "it did not authenticate in time"));
        }
        Ok(())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    // The TCP stream's own: tonic finds the peer's address and certificates by this type.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// The port's accepted connections, each admitted through the gate.
pub struct Incoming {
    listener: TcpListener,
    gate: Arc<Gate>,
    backoff: Option<Pin<Box<Sleep>>>,
    delay: Duration,
    warned: Option<Instant>,
}

impl Incoming {
    pub fn new(listener: TcpListener, gate: Arc<Gate>) -> Self {
        Incoming { listener, gate, backoff: None, delay: MIN_BACKOFF, warned: None }
    }

    /// An accept failed: wait before the next one, closing a pending connection when one
    /// can be closed (then a short wait lets it go).
    fn back_off(&mut self, e: &io::Error) {
        let freed = self.gate.evict_oldest();
        let wait = if freed { MIN_BACKOFF } else { self.delay };
        self.delay = if freed { MIN_BACKOFF } else { (self.delay * 2).min(MAX_BACKOFF) };
        if self.warned.is_none_or(|at| at.elapsed() > WARN_EVERY) {
            tracing::warn!(
                pending = self.gate.pending(),
                "cannot accept a connection on the control port ({e}); closing connections that have not authenticated and waiting {wait:?}"
            );
            self.warned = Some(Instant::now());
        }
        self.backoff = Some(Box::pin(tokio::time::sleep(wait)));
    }
}

/// Errors of `accept` that say the daemon is out of something, not that one peer failed.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Guarded>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = &mut this.backoff {
                if backoff.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, _))) => {
                    this.delay = MIN_BACKOFF;
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY: {e}");
                    }
                    return Poll::Ready(Some(Ok(this.gate.admit(stream))));
                }
                Poll::Ready(Err(e)) if out_of_resources(&e) => this.back_off(&e),
                // One peer's trouble (reset before accept, ...): the next one, after a
                // moment (an error that lasts must not make a busy loop either).
                Poll::Ready(Err(e)) => {
                    tracing::debug!("accept failed: {e}");
                    this.backoff = Some(Box::pin(tokio::time::sleep(MIN_BACKOFF)));
                }
            }
        }
    }
}
