//! The cluster store on an etcd 3.4 cluster, over etcd's v3 gRPC API (`proto/etcd.proto`,
//! compiled by protox: no protoc), with the cluster CA for etcd's client TLS.
//!
//! One gRPC channel per member. A call goes to the member that answered last; a member
//! that cannot be reached (the connection is refused or lost, so the request never got
//! there) is skipped for the next. A call that was sent but not answered in time is not
//! sent again (a transaction may have been applied): it fails with `Timeout`, and the next
//! call starts at another member. So while etcd has no quorum, calls fail within the
//! timeout instead of waiting.

use crate::{
    BoxFuture, Cmp, Compare, EventKind, Health, KeyValue, LeaderPoll, LeaseId, Listing, Member, Op, OpResult, Revision,
    Store, StoreError, Txn, TxnOutcome, Watch, WatchEvent, check_distinct_keys, prefix_end, ttl_seconds,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::cluster_client::ClusterClient;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use pb::watch_client::WatchClient;

/// How long a call may take unless the configuration says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where etcd is and how to talk to it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members: `https://HOST:PORT` (or `http://` without TLS).
    pub endpoints: Vec<String>,
    /// A TLS directory (`ca.pem`, `node.pem`, `node.key`): the cluster CA that signed
    /// etcd's server certificates, and this node's client certificate.
    pub tls_dir: Option<PathBuf>,
    pub timeout: Duration,
}

struct Link {
    url: String,
    channel: Channel,
}

pub struct EtcdStore {
    links: Vec<Link>,
    /// The member the next call tries first.
    preferred: AtomicUsize,
    timeout: Duration,
    /// One keep-alive stream, opened on first use and again after it fails.
    keepalive: Mutex<Option<KeepAliveStream>>,
}

struct KeepAliveStream {
    requests: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

fn read(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::Tls { path: path.to_owned(), source })
}

fn tls_config(dir: &Path) -> Result<ClientTlsConfig, StoreError> {
    use novacron_migration::tls::{CA_CERT, NODE_CERT, NODE_KEY, SERVER_NAME};
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&dir.join(CA_CERT))?))
        .identity(Identity::from_pem(read(&dir.join(NODE_CERT))?, read(&dir.join(NODE_KEY))?))
        .domain_name(SERVER_NAME))
}

/// An endpoint must be `http(s)://HOST:PORT` (tonic takes `HOST:PORT` for a URL with the
/// scheme HOST, and fails only at the first call, with "invalid URI").
fn check_url(url: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::BadUrl { url: url.to_string(), reason });
    let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")) else {
        return bad("no https:// or http://");
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() => Ok(()),
        _ => bad("not HOST:PORT after the scheme"),
    }
}

/// The TLS error under a failed call, if the call failed in the handshake (a certificate
/// one side does not trust), as rustls reports it.
fn tls_failure(error: &StoreError) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        cause = e.source();
    }
    None
}

/// Whether a failed call never reached the member (so sending it elsewhere is safe).
fn not_sent(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
}

impl EtcdStore {
    /// Connects to the members and checks that one answers (within the timeout).
    pub async fn connect(config: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        let endpoints = config.endpoints.join(",");
        if config.endpoints.is_empty() {
            return Err(StoreError::Protocol { op: "connect", reason: "no etcd endpoint given".into() });
        }
        for url in &config.endpoints {
            check_url(url)?;
        }
        let tls = config.tls_dir.as_deref().map(tls_config).transpose()?;
        let mut links = Vec::new();
        for url in &config.endpoints {
            let connect = |source| StoreError::Connect { endpoints: url.clone(), source };
            let mut endpoint = Endpoint::from_shared(url.clone()).map_err(connect)?.connect_timeout(config.timeout);
            if let Some(tls) = &tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(connect)?;
            }
            links.push(Link { url: url.clone(), channel: endpoint.connect_lazy() });
        }
        let store =
            EtcdStore { links, preferred: AtomicUsize::new(0), timeout: config.timeout, keepalive: Mutex::new(None) };
        store
            .unary("status", pb::StatusRequest {}, |c, r| async move { MaintenanceClient::new(c).status(r).await })
            .await
            .map_err(|e| match tls_failure(&e) {
                Some(reason) => StoreError::TlsRefused { endpoints: endpoints.clone(), reason },
                None => StoreError::Protocol {
                    op: "connect",
                    reason: format!("no member of {endpoints} answered: {}", novacron_migration::error_chain(&e)),
                },
            })?;
        Ok(store)
    }

    /// Runs `f` on one member after another, from the preferred one, while the request
    /// cannot be sent; see the module doc.
    async fn on_members<R, F, Fut>(&self, op: &'static str, f: F) -> Result<R, StoreError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let n = self.links.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let at = (first + i) % n;
            match tokio::time::timeout(self.timeout, f(self.links[at].channel.clone())).await {
                Ok(Ok(answer)) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
                Ok(Err(status)) if not_sent(&status) => {
                    tracing::debug!(member = %self.links[at].url, "etcd {op}: {status}");
                    last = Some(StoreError::Etcd { op, status });
                }
                Ok(Err(status)) => return Err(StoreError::Etcd { op, status }),
                Err(_) => {
                    self.preferred.store(at + 1, Ordering::Relaxed);
                    return Err(StoreError::Timeout { op, timeout: self.timeout });
                }
            }
        }
        self.preferred.store(first + 1, Ordering::Relaxed);
        Err(last.unwrap_or(StoreError::Timeout { op, timeout: self.timeout }))
    }

    /// A unary call of `request` through `f`.
    async fn unary<Q, R, F, Fut>(&self, op: &'static str, request: Q, f: F) -> Result<R, StoreError>
    where
        Q: Clone,
        F: Fn(Channel, Q) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.on_members(op, |c| {
            let call = f(c, request.clone());
            async move { call.await.map(tonic::Response::into_inner) }
        })
        .await
    }

    async fn keep_alive_once(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut guard = self.keepalive.lock().await;
        let exchange = async {
            match guard.as_mut() {
                Some(stream) => {
                    stream.requests.send(pb::LeaseKeepAliveRequest { id }).await.map_err(|_| StoreError::WatchEnded)?;
                }
                // etcd answers the stream's headers with its first response: the request
                // must be queued before the call.
                None => {
                    let opened = self
                        .on_members("lease keep-alive", |c| async move {
                            let (requests, rx) = mpsc::channel(4);
                            let _ = requests.try_send(pb::LeaseKeepAliveRequest { id });
                            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                            let responses = LeaseClient::new(c).lease_keep_alive(stream).await?.into_inner();
                            Ok(KeepAliveStream { requests, responses })
                        })
                        .await?;
                    *guard = Some(opened);
                }
            }
            let Some(stream) = guard.as_mut() else { return Err(StoreError::WatchEnded) };
            match stream.responses.message().await {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err(StoreError::WatchEnded),
                Err(status) => Err(StoreError::Etcd { op: "lease keep-alive", status }),
            }
        };
        let answer = tokio::time::timeout(self.timeout, exchange).await;
        match answer {
            Ok(Ok(r)) if r.ttl > 0 => Ok(Duration::from_secs(r.ttl as u64)),
            Ok(Ok(_)) => Err(StoreError::LeaseGone(id)),
            Ok(Err(e)) => {
                *guard = None;
                Err(e)
            }
            Err(_) => {
                *guard = None;
                self.preferred.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::Timeout { op: "lease keep-alive", timeout: self.timeout })
            }
        }
    }

    async fn watch_from(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision: from.max(0),
                progress_notify: false,
            })),
        };
        let (requests, mut responses) = self
            .on_members("watch", |c| {
                let create = create.clone();
                async move {
                    // As for keep-alives: the create request goes first.
                    let (requests, rx) = mpsc::channel(1);
                    let _ = requests.try_send(create);
                    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                    Ok((requests, WatchClient::new(c).watch(stream).await?.into_inner()))
                }
            })
            .await?;
        // The first answer says whether the watch exists.
        let first = tokio::time::timeout(self.timeout, responses.message())
            .await
            .map_err(|_| StoreError::Timeout { op: "watch", timeout: self.timeout })?
            .map_err(|status| StoreError::Etcd { op: "watch", status })?
            .ok_or(StoreError::WatchEnded)?;
        if first.compact_revision > 0 {
            return Err(StoreError::Compacted(first.compact_revision));
        }
        if first.canceled || !first.created {
            return Err(StoreError::Protocol { op: "watch", reason: format!("refused: {}", first.cancel_reason) });
        }
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(forward_watch(requests, responses, tx));
        Ok(Watch::new(events))
    }

    async fn health_now(&self) -> Result<Health, StoreError> {
        let members =
            self.unary("member list", pb::MemberListRequest {}, |c, r| async move {
                ClusterClient::new(c).member_list(r).await
            })
            .await?;
        let mut revision = 0;
        let mut leader_ids = Vec::new();
        let mut healthy_urls = Vec::new();
        for link in &self.links {
            let mut client = MaintenanceClient::new(link.channel.clone());
            if let Ok(Ok(status)) = tokio::time::timeout(self.timeout, client.status(pb::StatusRequest {})).await {
                let status = status.into_inner();
                revision = revision.max(status.header.as_ref().map_or(0, |h| h.revision));
                leader_ids.push(status.leader);
                if status.errors.is_empty() {
                    healthy_urls.push(link.url.clone());
                }
            }
        }
        let members = members
            .members
            .into_iter()
            .map(|m| {
                let endpoint = m.client_ur_ls.first().cloned().unwrap_or_default();
                Member {
                    healthy: m.client_ur_ls.iter().any(|u| healthy_urls.iter().any(|h| same_endpoint(h, u))),
                    leader: leader_ids.contains(&m.id),
                    name: m.name,
                    endpoint,
                }
            })
            .collect();
        Ok(Health { kind: "etcd", members, revision })
    }
}

/// One member's answers to a leader poll: its status, its list of members and its own
/// (serializable) read of the polled key.
type PollAnswer = (pb::StatusResponse, pb::MemberListResponse, pb::RangeResponse);

impl EtcdStore {
    /// See `Store::poll_leaderless`. Each member's answers are its own: Status and
    /// MemberList need no leader in etcd 3.4, and a serializable read is served from the
    /// member's applied state.
    async fn poll_leaderless_now(&self, key: &str, lease: LeaseId, within: Duration) -> LeaderPoll {
        let mut asks = tokio::task::JoinSet::new();
        for link in &self.links {
            let (channel, read) =
                (link.channel.clone(), pb::RangeRequest { serializable: true, ..range(key, Vec::new()) });
            asks.spawn(tokio::time::timeout(within, ask_member(channel, read)));
        }
        let mut answers = Vec::new();
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok(Ok(Ok(answer))) => answers.push(answer),
                Ok(Ok(Err(status))) => tracing::debug!("a member did not answer the leader poll: {status}"),
                _ => tracing::debug!("a member did not answer the leader poll within {within:?}"),
            }
        }
        tally_leaderless(&answers, lease)
    }
}

async fn ask_member(channel: Channel, read: pb::RangeRequest) -> Result<PollAnswer, tonic::Status> {
    let (status, members, held) = tokio::join!(
        async { MaintenanceClient::new(channel.clone()).status(pb::StatusRequest {}).await },
        async { ClusterClient::new(channel.clone()).member_list(pb::MemberListRequest {}).await },
        async { KvClient::new(channel.clone()).range(read).await },
    );
    Ok((status?.into_inner(), members?.into_inner(), held?.into_inner()))
}

/// Counts the distinct voting members that have no leader and hold the key under `lease`,
/// out of the most voters any member lists.
fn tally_leaderless(answers: &[PollAnswer], lease: LeaseId) -> LeaderPoll {
    let mut voters = 0;
    let mut leaderless = std::collections::BTreeSet::new();
    for (status, members, held) in answers {
        let voting: std::collections::BTreeSet<u64> =
            members.members.iter().filter(|m| !m.is_learner).map(|m| m.id).collect();
        voters = voters.max(voting.len());
        let id = status.header.as_ref().map_or(0, |h| h.member_id);
        let holds = held.kvs.first().is_some_and(|kv| kv.lease == lease);
        if status.leader == 0 && holds && voting.contains(&id) {
            leaderless.insert(id);
        }
    }
    LeaderPoll { voters, leaderless_holding: leaderless.len() }
}

/// `https://127.0.0.1:2379` and `http://127.0.0.1:2379/` name the same member.
fn same_endpoint(a: &str, b: &str) -> bool {
    let strip = |u: &str| u.split("://").nth(1).unwrap_or(u).trim_end_matches('/').to_string();
    strip(a) == strip(b)
}

/// Reads watch responses into the watch's channel until either side goes.
async fn forward_watch(
    _requests: mpsc::Sender<pb::WatchRequest>,
    mut responses: tonic::Streaming<pb::WatchResponse>,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
) {
    loop {
        let message = tokio::select! {
            m = responses.message() => m,
            _ = tx.closed() => return,
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => {
                let _ = tx.send(Err(StoreError::WatchEnded)).await;
                return;
            }
            Err(status) => {
                let _ = tx.send(Err(StoreError::Etcd { op: "watch", status })).await;
                return;
            }
        };
        if response.compact_revision > 0 {
            let _ = tx.send(Err(StoreError::Compacted(response.compact_revision))).await;
            return;
        }
        if response.canceled {
            let _ = tx.send(Err(StoreError::Protocol { op: "watch", reason: response.cancel_reason })).await;
            return;
        }
        for event in response.events {
            let converted = event_from_pb(event);
            let stop = converted.is_err();
            if tx.send(converted).await.is_err() || stop {
                return;
            }
        }
    }
}

fn event_from_pb(event: pb::Event) -> Result<WatchEvent, StoreError> {
    let kind = if event.r#type == pb::event::EventType::Delete as i32 { EventKind::Delete } else { EventKind::Put };
    let kv = event.kv.ok_or(StoreError::Protocol { op: "watch", reason: "an event without its key".into() })?;
    Ok(WatchEvent { kind, kv: kv_from_pb(kv, "watch")? })
}

fn kv_from_pb(kv: pb::KeyValue, op: &'static str) -> Result<KeyValue, StoreError> {
    let key = String::from_utf8(kv.key)
        .map_err(|_| StoreError::Protocol { op, reason: "a key that is not UTF-8 (not one of NovaCron's)".into() })?;
    Ok(KeyValue {
        key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    })
}

fn compare_to_pb(c: &Compare) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let result = |cmp: &Cmp| match cmp {
        Cmp::Equal => CompareResult::Equal,
        Cmp::NotEqual => CompareResult::NotEqual,
        Cmp::Less => CompareResult::Less,
        Cmp::Greater => CompareResult::Greater,
    } as i32;
    let (cmp, target, union) = match c {
        Compare::ModRevision { cmp, revision, .. } => (cmp, CompareTarget::Mod, TargetUnion::ModRevision(*revision)),
        Compare::CreateRevision { cmp, revision, .. } => {
            (cmp, CompareTarget::Create, TargetUnion::CreateRevision(*revision))
        }
        Compare::Version { cmp, version, .. } => (cmp, CompareTarget::Version, TargetUnion::Version(*version)),
        Compare::Value { cmp, value, .. } => (cmp, CompareTarget::Value, TargetUnion::Value(value.clone())),
    };
    pb::Compare {
        result: result(cmp),
        target: target as i32,
        key: c.key().as_bytes().to_vec(),
        target_union: Some(union),
    }
}

fn op_to_pb(op: &Op) -> pb::RequestOp {
    use pb::request_op::Request;
    let request = match op {
        Op::Put { key, value, lease } => Request::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.clone(),
            lease: lease.unwrap_or(0),
        }),
        Op::Delete { key } => {
            Request::RequestDeleteRange(pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), range_end: Vec::new() })
        }
        Op::DeletePrefix { prefix } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
        }),
        Op::Get { key } => Request::RequestRange(range(key, Vec::new())),
    };
    pb::RequestOp { request: Some(request) }
}

fn result_from_pb(r: pb::ResponseOp) -> Result<OpResult, StoreError> {
    use pb::response_op::Response;
    Ok(match r.response {
        Some(Response::ResponsePut(_)) => OpResult::Put,
        Some(Response::ResponseDeleteRange(d)) => OpResult::Deleted(d.deleted.max(0) as u64),
        Some(Response::ResponseRange(range)) => {
            OpResult::Got(range.kvs.into_iter().next().map(|kv| kv_from_pb(kv, "txn")).transpose()?)
        }
        None => return Err(StoreError::Protocol { op: "txn", reason: "an empty operation result".into() }),
    })
}

/// A linearizable read of `[key, range_end)` (an empty end: `key` alone).
fn range(key: &str, range_end: Vec<u8>) -> pb::RangeRequest {
    pb::RangeRequest { key: key.as_bytes().to_vec(), range_end, ..Default::default() }
}

/// etcd says a lease is gone with NOT_FOUND and "requested lease not found".
fn lease_gone(id: LeaseId) -> impl FnOnce(StoreError) -> StoreError {
    move |e| match e {
        StoreError::Etcd { status, .. } if status.message().contains("lease not found") => StoreError::LeaseGone(id),
        other => other,
    }
}

impl Store for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(async move {
            let request = range(key, Vec::new());
            let response = self.unary("get", request, |c, r| async move { KvClient::new(c).range(r).await }).await?;
            response.kvs.into_iter().next().map(|kv| kv_from_pb(kv, "get")).transpose()
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        Box::pin(async move {
            let request = range(prefix, prefix_end(prefix.as_bytes()));
            let response = self.unary("list", request, |c, r| async move { KvClient::new(c).range(r).await }).await?;
            let revision = response.header.map_or(0, |h| h.revision);
            let kvs = response.kvs.into_iter().map(|kv| kv_from_pb(kv, "list")).collect::<Result<_, _>>()?;
            Ok(Listing { kvs, revision })
        })
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>> {
        Box::pin(async move {
            check_distinct_keys(&txn.then)?;
            check_distinct_keys(&txn.otherwise)?;
            let request = pb::TxnRequest {
                compare: txn.when.iter().map(compare_to_pb).collect(),
                success: txn.then.iter().map(op_to_pb).collect(),
                failure: txn.otherwise.iter().map(op_to_pb).collect(),
            };
            let response =
                self.unary("txn", request, |c, r| async move { KvClient::new(c).txn(r).await }).await.map_err(|e| {
                    match e {
                        StoreError::Etcd { status, .. } if status.message().contains("lease not found") => {
                            let lease =
                                txn.then.iter().chain(&txn.otherwise).find_map(|op| {
                                    if let Op::Put { lease: Some(l), .. } = op { Some(*l) } else { None }
                                });
                            StoreError::LeaseGone(lease.unwrap_or(0))
                        }
                        other => other,
                    }
                })?;
            Ok(TxnOutcome {
                succeeded: response.succeeded,
                revision: response.header.map_or(0, |h| h.revision),
                results: response.responses.into_iter().map(result_from_pb).collect::<Result<_, _>>()?,
            })
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<(LeaseId, Duration), StoreError>> {
        Box::pin(async move {
            let request = pb::LeaseGrantRequest { ttl: ttl_seconds(ttl), id: 0 };
            let r = self
                .unary("lease grant", request, |c, r| async move { LeaseClient::new(c).lease_grant(r).await })
                .await?;
            if !r.error.is_empty() {
                return Err(StoreError::Protocol { op: "lease grant", reason: r.error });
            }
            Ok((r.id, Duration::from_secs(r.ttl.max(1) as u64)))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, StoreError>> {
        Box::pin(self.keep_alive_once(lease))
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let request = pb::LeaseRevokeRequest { id: lease };
            self.unary("lease revoke", request, |c, r| async move { LeaseClient::new(c).lease_revoke(r).await })
                .await
                .map_err(lease_gone(lease))?;
            Ok(())
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(self.watch_from(prefix, from))
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, StoreError>> {
        Box::pin(self.health_now())
    }

    fn poll_leaderless<'a>(&'a self, key: &'a str, lease: LeaseId, within: Duration) -> BoxFuture<'a, LeaderPoll> {
        Box::pin(self.poll_leaderless_now(key, lease, within))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_endpoints_must_be_urls_with_a_port() {
        for good in ["https://127.0.0.1:2379", "http://etcd-1:2379/", "https://[::1]:2379"] {
            assert!(check_url(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("etcd.example:2379", "no https:// or http://"),
            ("https://etcd.example", "not HOST:PORT after the scheme"),
            ("https://:2379", "not HOST:PORT after the scheme"),
            ("https://etcd:99999", "not HOST:PORT after the scheme"),
            ("https://etcd:2379/v3/kv", "not HOST:PORT after the scheme"),
        ] {
            assert!(matches!(check_url(bad), Err(StoreError::BadUrl { reason, .. }) if reason == why), "{bad}");
        }
    }

    fn answer(id: u64, leader: u64, voters: &[u64], learner: u64, lease: Option<LeaseId>) -> PollAnswer {
        let header = Some(pb::ResponseHeader { member_id: id, ..Default::default() });
        let mut members: Vec<pb::Member> = voters.iter().map(|&id| pb::Member { id, ..Default::default() }).collect();
        members.push(pb::Member { id: learner, is_learner: true, ..Default::default() });
        let kvs = lease.map(|lease| pb::KeyValue { key: b"k".to_vec(), lease, ..Default::default() }).into_iter();
        (
            pb::StatusResponse { header, leader, ..Default::default() },
            pb::MemberListResponse { header, members },
            pb::RangeResponse { header, kvs: kvs.collect(), ..Default::default() },
        )
    }

    #[test]
    fn test_a_leader_poll_counts_distinct_leaderless_voters_that_hold_the_key() {
        let voters = [1, 2, 3];
        let two = [answer(1, 0, &voters, 9, Some(7)), answer(2, 0, &voters, 9, Some(7))];
        assert_eq!(tally_leaderless(&two, 7), LeaderPoll { voters: 3, leaderless_holding: 2 });
        // The same member through two endpoints counts once.
        let twice = [answer(1, 0, &voters, 9, Some(7)), answer(1, 0, &voters, 9, Some(7))];
        assert_eq!(tally_leaderless(&twice, 7).leaderless_holding, 1);
        // A member that knows a leader, one whose state has the key under another lease
        // (this host's lease was revoked and the key written again) or none, and a learner
        // do not count.
        let not = [
            answer(1, 2, &voters, 9, Some(7)),
            answer(2, 0, &voters, 9, Some(8)),
            answer(3, 0, &voters, 9, None),
            answer(9, 0, &voters, 9, Some(7)),
        ];
        assert_eq!(tally_leaderless(&not, 7), LeaderPoll { voters: 3, leaderless_holding: 0 });
        // The most voters any member lists: one that missed a member's addition does not
        // shrink the majority.
        let grown = [answer(1, 0, &[1, 2, 3], 9, Some(7)), answer(2, 0, &[1, 2, 3, 4, 5], 9, Some(7))];
        assert!(!tally_leaderless(&grown, 7).majority_leaderless());
    }
}
