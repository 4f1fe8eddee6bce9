//! The VMM side of the control socket. It does no I/O waiting of its own: the VMM's event
//! loop polls the listener and the connections and calls in here when they are readable.

use super::{ApiError, ErrorKind, MAX_REQUEST_BYTES, Request, Response, parse_request};
use std::collections::HashMap;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {0} is in use by a running VMM")]
    InUse(PathBuf),
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

pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_id: u64,
}

impl ApiServer {
    /// Binds `path`. A stale socket file (nobody listening) is replaced; a live one is not.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ServerError::Bind { path: path.to_owned(), source };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiServer { path: path.to_owned(), listener, conns: HashMap::new(), next_id: 0 })
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
                }
                Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
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
