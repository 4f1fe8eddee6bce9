//! Connecting to a daemon's control port: TLS with the cluster CA, and this node's
//! certificate or the daemon's token as the caller's proof.

use crate::pb::control_client::ControlClient;
use novacron_migration::tls::{CA_CERT, NODE_CERT, NODE_KEY, SERVER_NAME};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The control port when none is given.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7700";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on every connection: how often, and how long an answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected client.
pub type Client = ControlClient<InterceptedService<Channel, BearerToken>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {path} (make a TLS directory with `novacron certs init` or `certs issue`, or pass --tls-dir)")]
    Tls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a usable address of a daemon (expected HOST:PORT)")]
    Endpoint(String),
    #[error("the token is not a valid header value")]
    Token,
    #[error("cannot connect to the daemon at {endpoint} (is `novacron daemon` running there?)")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How to reach and prove oneself to a daemon.
#[derive(Debug, Clone)]
pub struct Connect {
    /// HOST:PORT.
    pub endpoint: String,
    /// Holds `ca.pem`, and `node.pem` + `node.key` to present (unless a token is given).
    pub tls_dir: PathBuf,
    pub token: Option<String>,
}

/// Adds the token (when there is one) to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Tls { path: path.to_owned(), source })
}

impl Connect {
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.tls_dir.join(CA_CERT))?))
            .domain_name(SERVER_NAME);
        // The node's certificate when it has one and no token was asked for.
        let (cert, key) = (self.tls_dir.join(NODE_CERT), self.tls_dir.join(NODE_KEY));
        if self.token.is_none() && cert.exists() {
            tls = tls.identity(Identity::from_pem(read(&cert)?, read(&key)?));
        }
        let uri = format!("https://{}", self.endpoint);
        let endpoint = Channel::from_shared(uri)
            .map_err(|_| ClientError::Endpoint(self.endpoint.clone()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A connection whose peer is cut off fails its calls within seconds, rather
            // than when TCP gives up minutes later (a request passed to a host that was
            // cut off would hang until then).
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tls_config(tls)
            .map_err(|source| ClientError::Connect { endpoint: self.endpoint.clone(), source })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { endpoint: self.endpoint.clone(), source })?;
        let token = match &self.token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| ClientError::Token)?),
            None => None,
        };
        Ok(ControlClient::with_interceptor(channel, BearerToken(token)))
    }
}
