//! The cluster as an operator sees and changes it: its status read from the store (any
//! daemon answers, with or without a leader), its event log, and cordoning a host.

use super::records;
use crate::pb;
use novacron_actors::store::DesiredState;
use novacron_cluster::election::LeaderRecord;
use novacron_cluster::records::{self as keys, HostRecord, host_key};
use novacron_store::{Compare, Op, Store, Txn};
use tonic::Status;

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the cluster store: {e}; try again"))
}

/// The cluster's event log after `after`, from the store.
pub async fn events(store: &dyn Store, after: u64) -> Result<pb::ClusterEventsReply, Status> {
    let events = novacron_cluster::events::read(store, after)
        .await
        .map_err(|e| unavailable(novacron_actors::error_chain(&e)))?;
    let events = events
        .into_iter()
        .map(|(seq, e)| pb::ClusterEvent {
            seq,
            at_ms: e.at_ms,
            kind: e.kind,
            host: e.host.unwrap_or_default(),
            vm: e.vm.unwrap_or_default(),
            message: e.message,
            tenure: e.tenure,
        })
        .collect();
    Ok(pb::ClusterEventsReply { events })
}

/// The cluster's status, from the store.
pub async fn status(store: &dyn Store) -> Result<pb::ClusterStatus, Status> {
    let health = store.health().await.map_err(unavailable)?;
    let leader = match store.get(keys::LEADER).await.map_err(unavailable)? {
        Some(kv) => serde_json::from_slice::<LeaderRecord>(&kv.value).map(|l| l.host).unwrap_or_default(),
        None => String::new(),
    };
    let alive = store.list(keys::ALIVE).await.map_err(unavailable)?;
    let alive: Vec<&str> = alive.kvs.iter().filter_map(|kv| keys::name_of(&kv.key, keys::ALIVE)).collect();
    let hosts = store.list(keys::HOSTS).await.map_err(unavailable)?;
    let hosts = hosts
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<HostRecord>(&kv.value).ok())
        .map(|h| pb::HostStatus {
            alive: alive.contains(&h.name.as_str()),
            leader: h.name == leader,
            cordoned: h.cordoned,
            labels: h.labels.into_iter().collect(),
            name: h.name,
            address: h.address,
        })
        .collect();
    let vms = records::list(store)
        .await?
        .into_iter()
        .map(|vm| pb::VmOwnership {
            name: vm.spec.name,
            owner: vm.record.owner,
            epoch: vm.record.epoch,
            moving_to: vm.record.moving_to.unwrap_or_default(),
            desired: match vm.desired {
                DesiredState::Running => "running".into(),
                DesiredState::Stopped => "stopped".into(),
            },
        })
        .collect();
    let store_members = health
        .members
        .into_iter()
        .map(|m| pb::StoreMember { name: m.name, endpoint: m.endpoint, healthy: m.healthy, leader: m.leader })
        .collect();
    Ok(pb::ClusterStatus {
        leader,
        store_kind: health.kind.into(),
        store: store_members,
        revision: health.revision,
        hosts,
        vms,
    })
}

/// Sets a host's cordon; answers its status.
pub async fn cordon(store: &dyn Store, host: &str, cordoned: bool) -> Result<pb::HostStatus, Status> {
    let key = host_key(host);
    let kv =
        store.get(&key).await.map_err(unavailable)?.ok_or_else(|| {
            Status::not_found(format!("no host {host:?} in the cluster; see `novacron cluster status`"))
        })?;
    let mut record: HostRecord =
        serde_json::from_slice(&kv.value).map_err(|e| Status::internal(format!("the record of host {host}: {e}")))?;
    record.cordoned = cordoned;
    let value = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
    let txn = Txn::new().when(Compare::unchanged_since(&key, kv.mod_revision)).then(Op::put(&key, value));
    if !store.txn(txn).await.map_err(unavailable)?.succeeded {
        return Err(Status::aborted(format!("host {host}'s record changed meanwhile; try again")));
    }
    tracing::info!(host, cordoned, "host cordon changed");
    let alive = store.get(&keys::alive_key(host)).await.map_err(unavailable)?.is_some();
    Ok(pb::HostStatus {
        name: record.name,
        address: record.address,
        alive,
        cordoned,
        leader: false,
        labels: record.labels.into_iter().collect(),
    })
}
