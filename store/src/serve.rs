//! The embedded store served over etcd's v3 gRPC API, so that the other daemons and the
//! keepers of a cluster on the embedded store reach it with the same client as etcd
//! (`etcd::EtcdStore`). The first daemon adds these services to its control port (TLS
//! with the cluster CA), and serves the part of the API that client uses: a single key
//! or a prefix for ranges and deletes, the current revision only, and one watch per stream.
//! Anything else is answered UNIMPLEMENTED (compares over ranges are not even in the
//! .proto: their field is skipped, and such a compare would be taken for one key).

use crate::etcd::pb;
use crate::{Cmp, Compare, EventKind, KeyValue, Op, OpResult, Store, StoreError, Txn, prefix_end};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The member id the embedded store gives itself in member lists and status answers.
const MEMBER_ID: u64 = 1;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The services, around one store; `advertise` is the client URL other daemons use.
#[derive(Clone)]
pub struct StoreService {
    store: Arc<dyn Store>,
    advertise: String,
}

impl StoreService {
    pub fn new(store: Arc<dyn Store>, advertise: String) -> Self {
        StoreService { store, advertise }
    }

    pub fn kv(&self) -> pb::kv_server::KvServer<StoreService> {
        pb::kv_server::KvServer::new(self.clone())
    }

    pub fn watch(&self) -> pb::watch_server::WatchServer<StoreService> {
        pb::watch_server::WatchServer::new(self.clone())
    }

    pub fn lease(&self) -> pb::lease_server::LeaseServer<StoreService> {
        pb::lease_server::LeaseServer::new(self.clone())
    }

    pub fn cluster(&self) -> pb::cluster_server::ClusterServer<StoreService> {
        pb::cluster_server::ClusterServer::new(self.clone())
    }

    pub fn maintenance(&self) -> pb::maintenance_server::MaintenanceServer<StoreService> {
        pb::maintenance_server::MaintenanceServer::new(self.clone())
    }
}

fn header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader { cluster_id: 0, member_id: MEMBER_ID, revision, raft_term: 1 })
}

/// The store's error as etcd would say it (the client recognises etcd's words).
fn status(e: StoreError) -> Status {
    match e {
        StoreError::LeaseGone(_) => Status::not_found("etcdserver: requested lease not found"),
        StoreError::DuplicateKey(_) => Status::invalid_argument("etcdserver: duplicate key given in txn request"),
        StoreError::Compacted(_) => Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
        other => Status::unavailable(novacron_migration::error_chain(&other)),
    }
}

fn text(bytes: Vec<u8>, what: &str) -> Result<String, Status> {
    String::from_utf8(bytes).map_err(|_| Status::invalid_argument(format!("{what} is not UTF-8")))
}

/// A range as this store serves it: one key, or every key with a prefix.
enum Range {
    Key(String),
    Prefix(String),
}

fn range(key: Vec<u8>, range_end: Vec<u8>) -> Result<Range, Status> {
    if range_end.is_empty() {
        return Ok(Range::Key(text(key, "the key")?));
    }
    if range_end == prefix_end(&key) {
        return Ok(Range::Prefix(text(key, "the prefix")?));
    }
    Err(Status::unimplemented("the embedded store serves a key or a prefix, not other ranges"))
}

fn kv_to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key.into_bytes(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

fn compare_from_pb(c: pb::Compare) -> Result<Compare, Status> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let key = text(c.key, "a compared key")?;
    let cmp = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => Cmp::Equal,
        Ok(CompareResult::NotEqual) => Cmp::NotEqual,
        Ok(CompareResult::Less) => Cmp::Less,
        Ok(CompareResult::Greater) => Cmp::Greater,
        Err(_) => return Err(Status::invalid_argument(format!("compare result {}", c.result))),
    };
    Ok(match (CompareTarget::try_from(c.target), c.target_union) {
        (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(revision))) => {
            Compare::ModRevision { key, cmp, revision }
        }
        (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(revision))) => {
            Compare::CreateRevision { key, cmp, revision }
        }
        (Ok(CompareTarget::Version), Some(TargetUnion::Version(version))) => Compare::Version { key, cmp, version },
        (Ok(CompareTarget::Value), Some(TargetUnion::Value(value))) => Compare::Value { key, cmp, value },
        _ => return Err(Status::unimplemented("this compare target")),
    })
}

fn op_from_pb(op: pb::RequestOp) -> Result<Op, Status> {
    use pb::request_op::Request as R;
    Ok(match op.request {
        Some(R::RequestPut(p)) => {
            Op::Put { key: text(p.key, "a key")?, value: p.value, lease: (p.lease != 0).then_some(p.lease) }
        }
        Some(R::RequestDeleteRange(d)) => match range(d.key, d.range_end)? {
            Range::Key(key) => Op::Delete { key },
            Range::Prefix(prefix) => Op::DeletePrefix { prefix },
        },
        Some(R::RequestRange(r)) => match range(r.key, r.range_end)? {
            Range::Key(key) => Op::Get { key },
            Range::Prefix(_) => return Err(Status::unimplemented("prefix reads inside a transaction")),
        },
        None => return Err(Status::invalid_argument("an empty transaction operation")),
    })
}

fn result_to_pb(r: OpResult, revision: i64) -> pb::ResponseOp {
    use pb::response_op::Response as R;
    let response = match r {
        OpResult::Put => R::ResponsePut(pb::PutResponse { header: header(revision) }),
        OpResult::Deleted(n) => {
            R::ResponseDeleteRange(pb::DeleteRangeResponse { header: header(revision), deleted: n as i64 })
        }
        OpResult::Got(kv) => R::ResponseRange(pb::RangeResponse {
            header: header(revision),
            count: i64::from(kv.is_some()),
            kvs: kv.into_iter().map(kv_to_pb).collect(),
            more: false,
        }),
    };
    pb::ResponseOp { response: Some(response) }
}

/// A transaction as a peer sent it, checked: what this store serves, or why not.
pub fn txn_from_pb(r: pb::TxnRequest) -> Result<Txn, Status> {
    Ok(Txn {
        when: r.compare.into_iter().map(compare_from_pb).collect::<Result<_, _>>()?,
        then: r.success.into_iter().map(op_from_pb).collect::<Result<_, _>>()?,
        otherwise: r.failure.into_iter().map(op_from_pb).collect::<Result<_, _>>()?,
    })
}

#[tonic::async_trait]
impl pb::kv_server::Kv for StoreService {
    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let r = request.into_inner();
        if r.revision > 0 || r.limit > 0 {
            return Err(Status::unimplemented("reads at a past revision or with a limit"));
        }
        let (kvs, revision) = match range(r.key, r.range_end)? {
            Range::Key(key) => {
                let kv = self.store.get(&key).await.map_err(status)?;
                let revision = self.store.health().await.map_err(status)?.revision;
                (kv.into_iter().collect(), revision)
            }
            Range::Prefix(prefix) => {
                let listing = self.store.list(&prefix).await.map_err(status)?;
                (listing.kvs, listing.revision)
            }
        };
        Ok(Response::new(pb::RangeResponse {
            header: header(revision),
            count: kvs.len() as i64,
            kvs: kvs.into_iter().map(kv_to_pb).collect(),
            more: false,
        }))
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let txn = txn_from_pb(request.into_inner())?;
        let outcome = self.store.txn(txn).await.map_err(status)?;
        let revision = outcome.revision;
        Ok(Response::new(pb::TxnResponse {
            header: header(revision),
            succeeded: outcome.succeeded,
            responses: outcome.results.into_iter().map(|r| result_to_pb(r, revision)).collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for StoreService {
    type WatchStream = Stream_<pb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut requests = request.into_inner();
        let create = match requests.message().await? {
            Some(pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(c)) }) => c,
            _ => return Err(Status::invalid_argument("a watch stream starts with a create request")),
        };
        let Range::Prefix(prefix) = range(create.key, create.range_end)? else {
            return Err(Status::unimplemented("the embedded store watches prefixes"));
        };
        let (tx, rx) = mpsc::channel(256);
        let first = match self.store.watch(&prefix, create.start_revision).await {
            Ok(watch) => {
                tokio::spawn(forward(watch, tx.clone(), requests));
                pb::WatchResponse { header: header(0), watch_id: 1, created: true, ..Default::default() }
            }
            Err(StoreError::Compacted(oldest)) => pb::WatchResponse {
                header: header(0),
                watch_id: 1,
                created: true,
                canceled: true,
                compact_revision: oldest,
                cancel_reason: "the revision has been compacted".into(),
                ..Default::default()
            },
            Err(e) => return Err(status(e)),
        };
        let _ = tx.send(Ok(first)).await;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Sends the watch's events down the stream until the client or the store goes.
async fn forward(
    mut watch: crate::Watch,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    mut requests: Streaming<pb::WatchRequest>,
) {
    loop {
        tokio::select! {
            event = watch.next() => {
                let response = match event {
                    Ok(e) => pb::WatchResponse {
                        header: header(e.revision()),
                        watch_id: 1,
                        events: vec![pb::Event {
                            r#type: match e.kind {
                                EventKind::Put => pb::event::EventType::Put as i32,
                                EventKind::Delete => pb::event::EventType::Delete as i32,
                            },
                            kv: Some(kv_to_pb(e.kv)),
                        }],
                        ..Default::default()
                    },
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            // The client closed its side (or sent something else): the watch ends.
            _ = requests.message() => return,
        }
    }
}

#[tonic::async_trait]
impl pb::lease_server::Lease for StoreService {
    type LeaseKeepAliveStream = Stream_<pb::LeaseKeepAliveResponse>;

    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = request.into_inner();
        if r.id != 0 {
            return Err(Status::unimplemented("leases with a chosen id"));
        }
        let ttl = std::time::Duration::from_secs(r.ttl.max(1) as u64);
        let (id, ttl) = self.store.grant(ttl).await.map_err(status)?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: header(0),
            id,
            ttl: ttl.as_secs() as i64,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        self.store.revoke(request.into_inner().id).await.map_err(status)?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: header(0) }))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = request.into_inner();
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(r)) = requests.message().await {
                let ttl = match store.keep_alive(r.id).await {
                    Ok(ttl) => ttl.as_secs() as i64,
                    Err(StoreError::LeaseGone(_)) => 0,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                if tx.send(Ok(pb::LeaseKeepAliveResponse { header: header(0), id: r.id, ttl })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for StoreService {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let member = pb::Member {
            id: MEMBER_ID,
            name: "embedded".into(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: vec![self.advertise.clone()],
            is_learner: false,
        };
        Ok(Response::new(pb::MemberListResponse { header: header(0), members: vec![member] }))
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for StoreService {
    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let revision = self.store.health().await.map_err(status)?.revision;
        Ok(Response::new(pb::StatusResponse {
            header: header(revision),
            version: format!("novacron-embedded {}", env!("CARGO_PKG_VERSION")),
            leader: MEMBER_ID,
            raft_term: 1,
            ..Default::default()
        }))
    }
}
