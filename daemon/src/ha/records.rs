//! The daemon's VM records in the cluster store: ownership (`novacron_cluster::records`)
//! plus the VM's spec and desired state, which the keeper carries along without reading.

use novacron_actors::VmSpec;
use novacron_actors::store::DesiredState;
use novacron_cluster::election::Tenure;
use novacron_cluster::records::{self, RecordError, VmRecord, vm_key};
use novacron_store::{Compare, KeyValue, Op, Store, Txn};
use tonic::Status;

/// A VM's record, decoded, with the revision it was read at (for compare-and-swap).
#[derive(Debug, Clone)]
pub struct Vm {
    pub record: VmRecord,
    pub spec: VmSpec,
    pub desired: DesiredState,
    pub mod_revision: i64,
}

fn store_status(e: RecordError) -> Status {
    match &e {
        RecordError::Store(s) if s.is_unavailable() => {
            Status::unavailable(format!("the cluster store: {}; try again", novacron_actors::error_chain(&e)))
        }
        _ => Status::internal(format!("the cluster store: {}", novacron_actors::error_chain(&e))),
    }
}

/// As `store_status`, for a write: one the store did not confirm in time may still take
/// effect (etcd commits what its leader had taken once it has a quorum again), so the
/// caller is told to look before trying again.
fn write_status(e: RecordError, name: &str) -> Status {
    match &e {
        RecordError::Store(novacron_store::StoreError::Timeout { .. }) => Status::unavailable(format!(
            "the cluster store: {}; the change may still take effect once the store has a quorum again: see `novacron vm show {name}` before trying again",
            novacron_actors::error_chain(&e)
        )),
        _ => store_status(e),
    }
}

pub fn record_for(owner: &str, epoch: u64, spec: &VmSpec, desired: DesiredState) -> Result<VmRecord, Status> {
    let mut rest = serde_json::Map::new();
    rest.insert("spec".into(), serde_json::to_value(spec).map_err(|e| Status::internal(e.to_string()))?);
    rest.insert("desired".into(), serde_json::to_value(desired).map_err(|e| Status::internal(e.to_string()))?);
    Ok(VmRecord { owner: owner.to_string(), epoch, moving_to: None, rest })
}

/// Decodes a VM record read from the store.
pub fn decode(kv: &KeyValue) -> Result<Vm, RecordError> {
    let record: VmRecord = records::decode(kv)?;
    let field = |name: &str| record.rest.get(name).cloned().unwrap_or(serde_json::Value::Null);
    let bad = |source| RecordError::Decode { key: kv.key.clone(), source };
    let spec: VmSpec = serde_json::from_value(field("spec")).map_err(bad)?;
    let desired: DesiredState = serde_json::from_value(field("desired")).map_err(bad)?;
    Ok(Vm { spec, desired, mod_revision: kv.mod_revision, record })
}

pub async fn get(store: &dyn Store, name: &str) -> Result<Option<Vm>, Status> {
    let kv = store.get(&vm_key(name)).await.map_err(|e| store_status(e.into()))?;
    kv.map(|kv| decode(&kv).map_err(store_status)).transpose()
}

/// Every VM record (those that do not decode are logged and left out).
pub async fn list(store: &dyn Store) -> Result<Vec<Vm>, Status> {
    let listing = store.list(records::VMS).await.map_err(|e| store_status(e.into()))?;
    Ok(listing
        .kvs
        .iter()
        .filter_map(|kv| decode(kv).map_err(|e| tracing::warn!("{}", novacron_actors::error_chain(&e))).ok())
        .collect())
}

fn encoded(name: &str, record: &VmRecord) -> Result<Vec<u8>, Status> {
    records::encode(&vm_key(name), record).map_err(store_status)
}

/// The leader records a new VM on `owner`, at epoch 1: only if no VM of that name is
/// recorded and it still leads.
pub async fn create(
    store: &dyn Store,
    tenure: &Tenure,
    spec: &VmSpec,
    owner: &str,
    desired: DesiredState,
) -> Result<(), Status> {
    let key = vm_key(&spec.name);
    let value = encoded(&spec.name, &record_for(owner, 1, spec, desired)?)?;
    let txn = Txn::new().when(tenure.guard()).when(Compare::absent(&key)).then(Op::put(&key, value));
    let outcome = store.txn(txn).await.map_err(|e| write_status(e.into(), &spec.name))?;
    if !outcome.succeeded {
        return Err(match get(store, &spec.name).await? {
            Some(vm) => Status::already_exists(format!(
                "a VM named {} already exists (on host {}); delete it first or choose another name",
                spec.name, vm.record.owner
            )),
            None => Status::unavailable("this daemon no longer leads the cluster; try again"),
        });
    }
    Ok(())
}

/// Records a VM this host already holds (from before it knew this store) as its own, at
/// epoch 1, if no VM of that name is recorded. Returns the other host that owns a VM of
/// that name, if one does.
pub async fn import(
    store: &dyn Store,
    me: &str,
    spec: &VmSpec,
    desired: DesiredState,
) -> Result<Option<String>, Status> {
    let key = vm_key(&spec.name);
    let value = encoded(&spec.name, &record_for(me, 1, spec, desired)?)?;
    let txn = Txn::new().when(Compare::absent(&key)).then(Op::put(&key, value));
    if store.txn(txn).await.map_err(|e| write_status(e.into(), &spec.name))?.succeeded {
        return Ok(None);
    }
    Ok(get(store, &spec.name).await?.map(|vm| vm.record.owner).filter(|owner| owner != me))
}

/// Writes `vm` back with `change` applied, if nobody changed it since it was read.
pub async fn update(store: &dyn Store, vm: &Vm, change: impl FnOnce(&mut VmRecord)) -> Result<bool, Status> {
    let mut record = vm.record.clone();
    change(&mut record);
    let key = vm_key(&vm.spec.name);
    let txn = Txn::new()
        .when(Compare::unchanged_since(&key, vm.mod_revision))
        .then(Op::put(&key, encoded(&vm.spec.name, &record)?));
    Ok(store.txn(txn).await.map_err(|e| write_status(e.into(), &vm.spec.name))?.succeeded)
}

/// Records the desired state of a VM this host owns (best effort: the local store has it
/// too; the cluster's copy is what a failover goes by).
pub async fn set_desired(store: &dyn Store, me: &str, name: &str, desired: DesiredState) {
    let Ok(Some(vm)) = get(store, name).await else { return };
    if vm.record.owner != me || vm.desired == desired {
        return;
    }
    let value = serde_json::to_value(desired).unwrap_or(serde_json::Value::Null);
    if let Err(e) = update(store, &vm, |r| {
        r.rest.insert("desired".into(), value);
    })
    .await
    {
        tracing::warn!(vm = name, "cannot record the desired state in the cluster store: {}", e.message());
    }
}

/// Forgets a VM this host owned (after it was deleted here).
pub async fn delete(store: &dyn Store, me: &str, name: &str) -> Result<(), Status> {
    let Some(vm) = get(store, name).await? else { return Ok(()) };
    if vm.record.owner != me {
        return Ok(());
    }
    let key = vm_key(name);
    let txn = Txn::new().when(Compare::unchanged_since(&key, vm.mod_revision)).then(Op::delete(&key));
    store.txn(txn).await.map_err(|e| store_status(e.into()))?;
    Ok(())
}
