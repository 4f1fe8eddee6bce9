//! Who may call the control port. The port always speaks TLS with this node's certificate
//! from the cluster's TLS directory (`novacron certs init|issue`). A caller proves itself
//! with either a client certificate signed by the cluster CA (checked by TLS) or the
//! daemon's token (`<data dir>/token`, made at first start) as `authorization: Bearer
//! TOKEN`. Anything else is refused with UNAUTHENTICATED before any handler runs.

use crate::listen::Gate;
use novacron_migration::tls::{CA_CERT, NODE_CERT, NODE_KEY};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The token's file in the data dir.
pub const TOKEN_FILE: &str = "token";
/// Random bytes in a token (hex-encoded in the file).
const TOKEN_BYTES: usize = 32;
/// The largest token file read. The daemon's own is 65 bytes; a token rides in a header of
/// every call, and a header of megabytes makes the daemon close the connection.
pub const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {0} is empty; delete it and the daemon makes a new one")]
    EmptyToken(PathBuf),
    #[error(
        "the token file {path} is {len} bytes, more than the {MAX_TOKEN_FILE} a token file may be: give the daemon's <data dir>/token"
    )]
    TokenTooLong { path: PathBuf, len: u64 },
    #[error(
        "the token file {0} does not hold a token (one word of printable ASCII): give the daemon's <data dir>/token"
    )]
    NotAToken(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AuthError {
    let path = path.to_owned();
    move |source| AuthError::Io { what, path, source }
}

/// The daemon's token: read from `<data dir>/token`, or made (readable by its owner only).
pub fn load_or_create_token(data_dir: &Path) -> Result<String, AuthError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(TOKEN_FILE);
    if path.exists() {
        return read_token(&path);
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("read", Path::new("/dev/urandom")))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("create", &path))?;
    file.write_all(format!("{token}\n").as_bytes()).map_err(io("write", &path))?;
    Ok(token)
}

/// A token file's token (surrounding whitespace ignored), checked before it is used: at
/// most `MAX_TOKEN_FILE` bytes, one word of printable ASCII (what a header may carry).
pub fn read_token(path: &Path) -> Result<String, AuthError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io("read", path))?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file that is too long, whatever its size says.
    file.take(MAX_TOKEN_FILE + 1).read_to_end(&mut bytes).map_err(io("read", path))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        let len = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(AuthError::TokenTooLong { path: path.to_owned(), len });
    }
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(AuthError::EmptyToken(path.to_owned()));
    }
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(AuthError::NotAToken(path.to_owned()));
    }
    Ok(String::from_utf8_lossy(token).into_owned())
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(io("read", path))
}

/// The port's TLS: this node's certificate, and client certificates checked against the
/// cluster CA when a client presents one (one without may still bring the token).
pub fn server_tls(tls_dir: &Path) -> Result<ServerTlsConfig, AuthError> {
    let identity = Identity::from_pem(read(&tls_dir.join(NODE_CERT))?, read(&tls_dir.join(NODE_KEY))?);
    let ca = Certificate::from_pem(read(&tls_dir.join(CA_CERT))?);
    Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca).client_auth_optional(true))
}

/// The check in front of every call.
#[derive(Clone)]
pub struct Authenticator {
    bearer: String,
    /// Told of each connection that authenticates, so that it stops counting as pending.
    gate: Option<Arc<Gate>>,
}

impl Authenticator {
    pub fn new(token: &str, gate: Option<Arc<Gate>>) -> Self {
        Authenticator { bearer: format!("Bearer {token}"), gate }
    }

    pub fn check(&self, request: &Request<()>) -> Result<(), Status> {
        self.verify(request)?;
        if let Some(gate) = &self.gate {
            gate.authenticated(request.remote_addr());
        }
        Ok(())
    }

    fn verify(&self, request: &Request<()>) -> Result<(), Status> {
        // TLS verified the chain up to the cluster CA; presenting one is enough.
        if request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            return Ok(());
        }
        let given = request.metadata().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, self.bearer.as_bytes()) {
            return Ok(());
        }
        Err(Status::unauthenticated(
            "no client certificate of this cluster's CA and no valid token: give the CLI --tls-dir DIR \
             (a directory made by `novacron certs issue`) or --token-file FILE (the daemon's <data dir>/token)",
        ))
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_token(dir.path()).unwrap();
        assert_eq!(token.len(), TOKEN_BYTES * 2);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), token);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(TOKEN_FILE), "\n").unwrap();
        assert!(matches!(load_or_create_token(dir.path()), Err(AuthError::EmptyToken(_))));
    }

    #[test]
    fn only_the_exact_bearer_token_passes_without_a_certificate() {
        let auth = Authenticator::new("abc123", None);
        let with = |value: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", value.parse().unwrap());
            r
        };
        assert!(auth.check(&with("Bearer abc123")).is_ok());
        for bad in ["Bearer abc12", "Bearer abc1234", "abc123", "Bearer ABC123", ""] {
            let err = auth.check(&with(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(auth.check(&Request::new(())).is_err());
    }

    #[test]
    fn token_files_that_are_not_tokens_are_refused_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let huge = file("huge", &vec![b'a'; 1 << 20]);
        let spaced = file("spaced", b"two words\n");
        let binary = file("binary", &[0xff, 0xfe, 0x00, 0x41]);
        let good = file("good", b"  0123abcd\n");

        let too_long = read_token(&huge).unwrap_err();
        assert!(matches!(too_long, AuthError::TokenTooLong { len: 1_048_576, .. }), "{too_long}");
        assert!(too_long.to_string().contains("1048576 bytes"), "{too_long}");
        assert!(matches!(read_token(&spaced), Err(AuthError::NotAToken(_))));
        assert!(matches!(read_token(&binary), Err(AuthError::NotAToken(_))));
        assert_eq!(read_token(&good).unwrap(), "0123abcd");
    }
}
