//! The VMM side of the control socket. It does no I/O waiting of its own: the VMM's event
//! loop polls the listener and the connections and calls in here when they are readable.

use super::{ApiError, ErrorKind, MAX_REQUEST_BYTES, Request, Response, parse_request};
use std::collections::HashMap;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {0} is in use by a running VMM")]
    InUse(PathBuf),
    #[error("{path} exists and is {kind}, not a socket: choose another --api-sock path (nothing was removed)")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot tell whether control socket {path} is in use")]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// What a readable connection produced.
pub struct Incoming {
    /// Each complete line, parsed.
    pub requests: Vec<Result<Request, ApiError>>,
    /// The peer hung up or broke the protocol: answer `requests`, then `close` it.
    pub closed: bool,
}

/// While accepting fails for want of descriptors, the listener is left alone this long,
/// doubling up to the maximum; and the failures are logged once per LOG_EVERY.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepting stopped for want of descriptors (or kernel memory): when to try again.
#[derive(Default)]
struct Exhaustion {
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Failed accepts since the last log line, and when that was.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Exhaustion {
    fn failed(&mut self, e: &std::io::Error, now: Instant) {
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        self.retry_at = Some(now + self.backoff);
        self.unlogged += 1;
        if self.logged_at.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            tracing::warn!(
                failed_accepts = self.unlogged,
                backoff_ms = self.backoff.as_millis() as u64,
                "control socket: cannot accept new connections: {e}; serving those already open, retrying"
            );
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
    }

    fn accepted(&mut self) {
        self.backoff = Duration::ZERO;
        self.retry_at = None;
    }
}

fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    exhaustion: Exhaustion,
}

/// What is at a path, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device"
    }
}

impl ApiServer {
    /// Binds `path`. Only a stale socket (one nobody answers on) is removed first; a live
    /// socket or anything that is not a socket is refused and left alone.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServerError::NotASocket { path: path.to_owned(), kind: kind_of(&meta) });
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_owned())),
                Err(e) if e.kind() == IoErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|source| ServerError::Bind { path: path.to_owned(), source })?;
                }
                Err(source) => return Err(ServerError::Probe { path: path.to_owned(), source }),
            },
            Err(e) if e.kind() == IoErrorKind::NotFound => {}
            Err(source) => return Err(ServerError::Probe { path: path.to_owned(), source }),
        }
        let bind_err = |source| ServerError::Bind { path: path.to_owned(), source };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiServer {
            path: path.to_owned(),
            listener,
            conns: HashMap::new(),
            next_id: 0,
            exhaustion: Exhaustion::default(),
        })
    }

    /// Set while accepting is backing off: the listener should not be polled before then
    /// (it stays readable, and polling it would spin).
    pub fn retry_accept_at(&self) -> Option<Instant> {
        self.exhaustion.retry_at
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts every pending connection; returns their ids and fds for the poller.
    pub fn accept(&mut self) -> Vec<(u64, RawFd)> {
        let mut accepted = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    accepted.push((id, stream.as_raw_fd()));
                    self.conns.insert(id, Conn { stream, buf: Vec::new() });
                    self.exhaustion.accepted();
                }
                Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(e) if is_exhaustion(&e) => {
                    self.exhaustion.failed(&e, Instant::now());
                    break;
                }
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    break;
                }
            }
        }
        accepted
    }

    /// Reads what connection `id` has sent and parses every complete line.
    pub fn read(&mut self, id: u64) -> Incoming {
        let mut incoming = Incoming { requests: Vec::new(), closed: false };
        let Some(conn) = self.conns.get_mut(&id) else {
            incoming.closed = true;
            return incoming;
        };
        let mut chunk = [0u8; 4096];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    incoming.closed = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(_) => {
                    incoming.closed = true;
                    break;
                }
            }
        }
        while let Some(end) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=end).collect();
            incoming.requests.push(parse_request(&line[..line.len() - 1]));
        }
        if conn.buf.len() > MAX_REQUEST_BYTES {
            incoming.requests.push(Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            )));
            incoming.closed = true;
        }
        incoming
    }

    /// Sends a response line. A peer that does not read its answers is dropped.
    pub fn reply(&mut self, id: u64, response: &Response) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut line = serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        if conn.stream.write_all(&line).is_err() {
            self.conns.remove(&id);
        }
    }

    pub fn close(&mut self, id: u64) {
        self.conns.remove(&id);
    }

    pub fn conn_fd(&self, id: u64) -> Option<RawFd> {
        self.conns.get(&id).map(|c| c.stream.as_raw_fd())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn test_server_parses_lines_split_across_reads_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let mut server = ApiServer::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let (id, _) = server.accept()[0];

        client.write_all(br#"{"version":1,"op":"sta"#).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let first = server.read(id);
        client.write_all(b"tus\"}\nnot json\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = server.read(id);
        server.reply(id, &Response::done());

        assert!(first.requests.is_empty() && !first.closed);
        assert_eq!(second.requests.len(), 2);
        assert_eq!(second.requests[0], Ok(Request::Status));
        assert_eq!(second.requests[1].as_ref().unwrap_err().kind, ErrorKind::BadRequest);
        let mut answer = String::new();
        BufReader::new(&client).read_line(&mut answer).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&answer).unwrap(), Response::done());
    }

    #[test]
    fn test_server_refuses_endless_line_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let mut server = ApiServer::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let (id, _) = server.accept()[0];
        let writer = std::thread::spawn(move || {
            let _ = client.write_all(&vec![b'x'; MAX_REQUEST_BYTES + 10_000]);
            client
        });

        let mut incoming = server.read(id);
        while !incoming.closed {
            std::thread::sleep(std::time::Duration::from_millis(5));
            incoming = server.read(id);
        }
        server.close(id);
        let _client = writer.join().unwrap();

        assert_eq!(incoming.requests.last().unwrap().as_ref().unwrap_err().kind, ErrorKind::BadRequest);
    }

    #[test]
    fn test_bind_refuses_what_is_not_a_socket_and_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious.txt");
        std::fs::write(&file, b"keep me").unwrap();
        let sub = dir.path().join("a-dir");
        std::fs::create_dir(&sub).unwrap();

        let on_file = ApiServer::bind(&file).err().unwrap();
        let on_dir = ApiServer::bind(&sub).err().unwrap();

        assert!(matches!(on_file, ServerError::NotASocket { kind: "a regular file", .. }), "{on_file}");
        assert!(matches!(on_dir, ServerError::NotASocket { kind: "a directory", .. }), "{on_dir}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        assert!(sub.is_dir());
    }

    #[test]
    fn test_exhaustion_backs_off_and_logs_once_per_interval() {
        let mut ex = Exhaustion::default();
        let t0 = Instant::now();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);

        for i in 0..20 {
            ex.failed(&e, t0 + Duration::from_millis(i));
        }
        let backoff_after_20 = ex.backoff;
        let unlogged = ex.unlogged;
        ex.failed(&e, t0 + LOG_EVERY);
        let unlogged_after_interval = ex.unlogged;
        ex.accepted();

        assert_eq!(backoff_after_20, BACKOFF_MAX);
        assert_eq!(unlogged, 19, "the first failure is logged, the next 19 wait for the interval");
        assert_eq!(unlogged_after_interval, 0);
        assert_eq!((ex.backoff, ex.retry_at), (Duration::ZERO, None));
    }

    #[test]
    fn test_bind_replaces_stale_socket_but_not_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a stale file behind
        let live = ApiServer::bind(&path).unwrap();

        assert!(matches!(ApiServer::bind(&path), Err(ServerError::InUse(_))));
        drop(live);
        assert!(!path.exists());
    }
}
