//! Leader election on the cluster store (`docs/ha.md`, "Leadership").
//!
//! A candidate writes `leader` under a lease of its own only if the key is absent; the
//! key's create revision is the revision of that tenure. Every write the leader makes
//! carries [`Tenure::guard`], a compare on that revision, so a deposed leader's write fails
//! as a whole. Leadership ends when the lease does: it runs out (the leader died or was cut
//! off), or it is revoked (the leader steps down, or its host's keeper saw its daemon die).
//! Candidates watch the key and campaign as soon as it is gone.

use crate::records::{self, LEADER, RecordError};
use novacron_store::{Cmp, Compare, LeaseId, Op, OpResult, Revision, Store, StoreError, Txn};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// What `leader` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub host: String,
    /// The leader's control port, where the others forward what only it decides.
    pub address: String,
    pub lease: LeaseId,
    /// The leading daemon's process: a keeper that sees a daemon of its host die ends the
    /// tenure only if that daemon held it, not a successor's that won meanwhile. 0 in
    /// records from before it was kept (then the host is all the keeper can go by).
    #[serde(default)]
    pub pid: u32,
}

/// One leader's time in office.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenure {
    /// The create revision of `leader` for this tenure.
    pub revision: Revision,
    pub lease: LeaseId,
}

impl Tenure {
    /// The condition every write of this leader carries.
    pub fn guard(&self) -> Compare {
        Compare::CreateRevision { key: LEADER.to_string(), cmp: Cmp::Equal, revision: self.revision }
    }
}

/// How a campaign went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    Won(Tenure),
    /// Someone leads already.
    Lost(LeaderRecord),
}

pub struct Candidate {
    store: Arc<dyn Store>,
    host: String,
    address: String,
    ttl: Duration,
}

impl Candidate {
    pub fn new(store: Arc<dyn Store>, host: &str, address: &str, ttl: Duration) -> Self {
        Candidate { store, host: host.to_string(), address: address.to_string(), ttl }
    }

    /// One attempt: leads if nobody does.
    pub async fn campaign(&self) -> Result<Campaign, RecordError> {
        if let Some((record, _)) = self.leader().await? {
            return Ok(Campaign::Lost(record));
        }
        let (lease, _) = self.store.grant(self.ttl).await?;
        let record =
            LeaderRecord { host: self.host.clone(), address: self.address.clone(), lease, pid: std::process::id() };
        let value = records::encode(LEADER, &record)?;
        let txn = Txn::new()
            .when(Compare::absent(LEADER))
            .then(Op::Put { key: LEADER.to_string(), value, lease: Some(lease) })
            .otherwise(Op::Get { key: LEADER.to_string() });
        let outcome = self.store.txn(txn).await?;
        if outcome.succeeded {
            tracing::info!(host = %self.host, revision = outcome.revision, "leading the cluster");
            return Ok(Campaign::Won(Tenure { revision: outcome.revision, lease }));
        }
        let _ = self.store.revoke(lease).await;
        match outcome.results.first() {
            Some(OpResult::Got(Some(kv))) => Ok(Campaign::Lost(records::decode(kv)?)),
            // It went again between the compare and the read: the next campaign will see.
            _ => Ok(Campaign::Lost(record)),
        }
    }

    /// The current leader and its tenure, if there is one.
    pub async fn leader(&self) -> Result<Option<(LeaderRecord, Tenure)>, RecordError> {
        let Some(kv) = self.store.get(LEADER).await? else { return Ok(None) };
        let record: LeaderRecord = records::decode(&kv)?;
        let tenure = Tenure { revision: kv.create_revision, lease: kv.lease };
        Ok(Some((record, tenure)))
    }

    /// Renews the tenure's lease; false once it is over.
    pub async fn hold(&self, tenure: &Tenure) -> Result<bool, StoreError> {
        match self.store.keep_alive(tenure.lease).await {
            Ok(_) => Ok(true),
            Err(StoreError::LeaseGone(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives leadership up at once (the others campaign on the key's deletion).
    pub async fn step_down(&self, tenure: &Tenure) -> Result<(), StoreError> {
        match self.store.revoke(tenure.lease).await {
            Ok(()) | Err(StoreError::LeaseGone(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Ends the tenure of lease `lease` (a previous incarnation of this candidate's host,
    /// known dead).
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.store.revoke(lease).await {
            Ok(()) | Err(StoreError::LeaseGone(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until there is no leader (or `limit` passes): the moment to campaign.
    pub async fn wait_vacant(&self, limit: Duration) -> Result<(), RecordError> {
        let listing_rev = match self.store.get(LEADER).await? {
            None => return Ok(()),
            Some(kv) => kv.mod_revision,
        };
        let mut watch = self.store.watch(LEADER, listing_rev + 1).await?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, watch.next()).await {
                Err(_) => return Ok(()),
                Ok(Ok(e)) if e.kind == novacron_store::EventKind::Delete && e.kv.key == LEADER => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
}
