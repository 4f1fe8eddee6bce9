//! A blocking client of the control socket, for the CLI and tests.

use super::{API_VERSION, ApiError, Request, RequestFrame, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM's control socket {path} (is the VM running with --api-sock {path}?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control socket connection failed")]
    Io(#[from] std::io::Error),
    #[error("the VMM closed the connection without answering")]
    NoAnswer,
    #[error("the VMM's answer is not a valid response: {0}")]
    BadResponse(String),
    #[error("the VMM refused: {0}")]
    Refused(ApiError),
}

/// Sends one request and waits (up to `timeout`) for its response.
pub fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Response, ClientError> {
    let stream =
        UnixStream::connect(socket).map_err(|source| ClientError::Connect { path: socket.to_owned(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(&RequestFrame { version: API_VERSION, request })
        .map_err(|e| ClientError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(ClientError::NoAnswer);
    }
    parse_response(&reply)
}

/// A response line from a VMM: its answer, or its refusal as an error. The VMM is not
/// trusted (its guest may own it): a malformed line is an error, never a panic.
pub fn parse_response(line: &str) -> Result<Response, ClientError> {
    let response: Response = serde_json::from_str(line).map_err(|e| ClientError::BadResponse(e.to_string()))?;
    match response.error {
        Some(e) if !response.ok => Err(ClientError::Refused(e)),
        _ => Ok(response),
    }
}
