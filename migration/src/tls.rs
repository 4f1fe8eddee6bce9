//! The cluster's certificates and the mutual-TLS configurations built from them.
//!
//! A TLS directory holds `ca.pem` (the cluster CA), `node.pem` and `node.key` (this node's
//! certificate, signed by the CA, and its key). `novacron certs init` makes one with a new
//! CA (and keeps `ca.key` there, to issue more); `novacron certs issue` makes another
//! node's directory from the CA's. Both ends of a migration present their node
//! certificate and accept only a peer whose certificate the cluster CA signed: a peer
//! without one can neither send memory into a VMM nor receive memory from one. Every
//! node certificate names `novacron-node`, the name a client checks.

use crate::protocol::ALPN;
use crate::transport::{CONNECTION_WINDOW, LANES_ALPN, MAX_LANES, STREAM_WINDOW};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";
/// The name every node certificate carries and every client expects.
pub const SERVER_NAME: &str = "novacron-node";
const CA_NAME: &str = "NovaCron cluster CA";
/// Certificates are valid from the first date to the second (years, January 1st).
const VALIDITY: (i32, i32) = (2025, 2045);
/// How long a silent peer is given before the migration fails over to the source.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest UDP payload an endpoint takes (its transport parameter): as large as the
/// datagrams MTU discovery may grow to.
pub const MAX_UDP_PAYLOAD: u16 = MTU_UPPER_BOUND;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists already; remove it or choose another directory")]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {reason} (make the directory with `novacron certs init --dir DIR`)")]
    Pem { path: PathBuf, reason: String },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the TLS configuration is not usable: {0}")]
    Config(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Io { what, path, source }
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if private { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists { path: path.to_owned() }
        } else {
            TlsError::Io { what: "create", path: path.to_owned(), source: e }
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io("write", path))
}

/// The CA's parameters. The CA certificate is made from them once; issuing rebuilds them
/// (the name, key usages and key identifier method are all an issuer needs), so no
/// certificate parser is needed to sign with an existing CA. The name carries a hash of
/// the CA's public key, so that every cluster's CA has its own name and a certificate
/// from another cluster is reported as "unknown issuer".
fn ca_params(key: &KeyPair) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    let id = blake3::hash(key.public_key_raw());
    let id: String = id.as_bytes()[..6].iter().map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("{CA_NAME} {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut p);
    Ok(p)
}

fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(VALIDITY.0, 1, 1);
    p.not_after = rcgen::date_time_ymd(VALIDITY.1, 1, 1);
}

/// Makes `dir` a TLS directory with a new cluster CA and a certificate for node `name`.
pub fn init(dir: &Path, name: &str) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let key = KeyPair::generate()?;
    let cert = ca_params(&key)?.self_signed(&key)?;
    write_new(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write_new(&dir.join(CA_CERT), &cert.pem(), false)?;
    issue(dir, dir, name)
}

/// Makes `out` a TLS directory for node `name`, signed by the CA in `ca_dir`.
pub fn issue(ca_dir: &Path, out: &Path, name: &str) -> Result<(), TlsError> {
    let ca_key_path = ca_dir.join(CA_KEY);
    let pem = std::fs::read_to_string(&ca_key_path).map_err(io("read", &ca_key_path))?;
    let ca_key =
        KeyPair::from_pem(&pem).map_err(|e| TlsError::Pem { path: ca_key_path.clone(), reason: e.to_string() })?;
    let issuer = Issuer::new(ca_params(&ca_key)?, ca_key);
    let mut p = CertificateParams::new(vec![SERVER_NAME.to_string(), name.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(io("create", out))?;
    if out != ca_dir {
        let ca_pem_path = ca_dir.join(CA_CERT);
        let ca_pem = std::fs::read_to_string(&ca_pem_path).map_err(io("read", &ca_pem_path))?;
        write_new(&out.join(CA_CERT), &ca_pem, false)?;
    }
    write_new(&out.join(NODE_KEY), &key.serialize_pem(), true)?;
    write_new(&out.join(NODE_CERT), &cert.pem(), false)
}

/// The ring provider with TLS 1.3's AES-128-GCM first (AES-256-GCM and ChaCha20 after):
/// the quicker of the two AES suites, and the ciphers are a large part of a migration's
/// CPU on a fast link.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

/// A node's certificate, key and the CA it trusts, read from a TLS directory.
pub struct Identity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn pem_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError {
    let path = path.to_owned();
    move |e| TlsError::Pem { path, reason: e.to_string() }
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let cert_path = dir.join(NODE_CERT);
        let key_path = dir.join(NODE_KEY);
        Ok(Identity {
            ca: CertificateDer::from_pem_file(&ca_path).map_err(pem_err(&ca_path))?,
            chain: vec![CertificateDer::from_pem_file(&cert_path).map_err(pem_err(&cert_path))?],
            key: PrivateKeyDer::from_pem_file(&key_path).map_err(pem_err(&key_path))?,
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| TlsError::Config(format!("the CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }

    /// Server side (QUIC and TLS over TCP): presents this node's certificate, requires the
    /// peer's, signed by the cluster CA; TLS 1.3 only, the ring provider.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("this node's certificate or key: {e}")))?;
        tls.alpn_protocols = alpn();
        Ok(tls)
    }

    /// Client side (QUIC and TLS over TCP): presents this node's certificate, checks the
    /// server's against the cluster CA and [`SERVER_NAME`].
    pub fn rustls_client(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("this node's certificate or key: {e}")))?;
        tls.alpn_protocols = alpn();
        Ok(tls)
    }

    /// QUIC server side.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(self.rustls_server()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport());
        Ok(config)
    }

    /// QUIC client side.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.rustls_client()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport());
        Ok(config)
    }
}

/// Datagrams grow (by MTU discovery, from quinn's safe 1200 bytes) up to this: a GSO batch
/// of quinn's 10 datagrams must fit the kernel's 64 KiB, or sends fail (8000 here: loopback
/// fell to 4 MiB/s). On loopback 6500-byte datagrams carry about three times 1452-byte
/// ones; on a 1500-byte link the probes above it are lost and discovery stays at the
/// path's MTU (`docs/migration.md`, "Transports").
pub const MTU_UPPER_BOUND: u16 = 6500;

/// The ALPNs both ends offer, the one with page lanes first: a VMM that knows only the
/// plain one (an older release) still connects (`transport::lanes`).
fn alpn() -> Vec<Vec<u8>> {
    vec![LANES_ALPN.to_vec(), ALPN.to_vec()]
}

/// A control stream and up to MAX_LANES page lanes carry a migration: windows large
/// enough for a fast link with some delay (16 MiB a lane covers 320 MB/s at 50 ms, and
/// the connection's is every stream's together), a short idle timeout so that a dead peer
/// is noticed within seconds, and keep-alives so that a quiet but live one is not. GSO
/// stays on (quinn's default; without it loopback carried a third), and so does cubic
/// (quinn's BBR measured no better on loopback, and far worse with the CPU contended).
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams((MAX_LANES as u32).into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(64 << 20);
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue_make_loadable_directories_that_never_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        init(&a, "host-a").unwrap();
        issue(&a, &b, "host-b").unwrap();
        for dir in [&a, &b] {
            let id = Identity::load(dir).unwrap();
            id.server_config().unwrap();
            id.client_config().unwrap();
        }
        assert!(!b.join(CA_KEY).exists(), "the CA key stays with the CA");
        assert!(matches!(init(&a, "again"), Err(TlsError::Exists { .. })));
        let err = Identity::load(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("certs init"), "{err}");
    }
}
