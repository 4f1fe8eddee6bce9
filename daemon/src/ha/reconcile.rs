//! This host's VMs brought in line with the cluster's records, now and then:
//!
//! - a VM held here that another host owns now (the cluster moved it while this host was
//!   cut off, or its daemon was away) is deleted here: its VMM gets no permit anyway, and
//!   its keeper has shut it down; a paused copy would only confuse;
//! - a VM this host owns that is not here (a failover placed it here, and the leader's
//!   request to create it did not arrive) is created here, as its record says, once it has
//!   been missing for two rounds (the leader writes a record just before it asks the host
//!   to create the VM: that request must not meet a VM made here from the record).
//!
//! - a VM that arrived here by live migration, owned here now (this host's keeper claimed
//!   it at the commit), whose source daemon never said so (it died mid-migration), is
//!   taken as arrived: its phase is what its VMM says.
//!
//! - a VM held here that has no record at all (it was deleted in the cluster while this
//!   host was cut off or its daemon away; its keeper gives it no permit, so it could only
//!   sit fenced, failed or stopped) is deleted here, once it has been so for two rounds
//!   and a read of its key alone finds nothing. The VMs of a data dir from before the
//!   cluster store are put into the records when the host first joins (`import_vms`), so
//!   none of them is taken for one the cluster deleted.
//!
//! - a VM that failed to arrive here by live migration is deleted here, and the record's
//!   target cleared if it still names this host (its source's daemon does that, unless it
//!   died meanwhile); a VM owned here whose record names a target while no migration runs
//!   from here (the daemon that started it died) has the target cleared too. A record
//!   left naming a target would keep a later `vm show` on the target, and the target's
//!   keeper ready to claim a VM that no longer comes.
//!
//! A VM migrating out of this host is left alone until its migration ends.

use super::records;
use crate::service::ask;
use novacron_actors::store::DesiredState;
use novacron_actors::{HostMsg, VmPhase};
use novacron_store::Store;
use ractor::ActorRef;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const EVERY: Duration = Duration::from_secs(2);

/// VMs migrating out of this host now (the migration code keeps it).
pub type Leaving = Arc<Mutex<BTreeSet<String>>>;

pub fn run(store: Arc<dyn Store>, host: ActorRef<HostMsg>, me: String, leaving: Leaving) {
    tokio::spawn(async move {
        let (mut missing, mut unrecorded) = (BTreeSet::new(), BTreeSet::new());
        loop {
            tokio::time::sleep(EVERY).await;
            let seen = Seen { missing: &mut missing, unrecorded: &mut unrecorded };
            if let Err(e) = round(store.as_ref(), &host, &me, &leaving, seen).await {
                tracing::debug!("reconciling with the cluster's records: {}", e.message());
            }
        }
    });
}

/// What the round before found: VMs owned here but absent, and VMs here with no record.
struct Seen<'a> {
    missing: &'a mut BTreeSet<String>,
    unrecorded: &'a mut BTreeSet<String>,
}

/// One round.
async fn round(
    store: &dyn Store,
    host: &ActorRef<HostMsg>,
    me: &str,
    leaving: &Leaving,
    seen: Seen<'_>,
) -> Result<(), tonic::Status> {
    let records = records::list(store).await?;
    let local = ask(host, HostMsg::ListVms).await?;
    let local_names: BTreeSet<&str> = local.iter().map(|v| v.name.as_str()).collect();
    let mut unrecorded = BTreeSet::new();
    for vm in &local {
        let Some(record) = records.iter().find(|r| r.spec.name == vm.name) else {
            if !seen.unrecorded.contains(&vm.name) {
                unrecorded.insert(vm.name.clone());
            } else if unrecorded_still(store, &vm.name).await? {
                tracing::warn!(vm = %vm.name, phase = %vm.phase, "the cluster has no record of this VM (it was deleted meanwhile); deleting it here");
                let _ = ask(host, |r| HostMsg::DeleteVm(vm.name.clone(), r)).await;
            }
            continue;
        };
        if vm.receiving && vm.phase == VmPhase::Failed {
            // Its receiver failed, so no claim can come from here: the migration is over.
            // Its source's daemon clears the record, unless it died meanwhile: then no one
            // else would. If this host owns the VM now (a failover put it here), the VM is
            // created here from the record once its receiver is gone.
            if record.record.moving_to.as_deref() == Some(me) {
                clear_migration(store, record, "its receiver here failed").await;
            }
            tracing::warn!(vm = %vm.name, owner = %record.record.owner, "the migration to this host failed; deleting its receiver");
            let _ = ask(host, |r| HostMsg::DeleteVm(vm.name.clone(), r)).await;
            continue;
        }
        let migrating = leaving.lock().unwrap_or_else(|p| p.into_inner()).contains(&vm.name);
        if record.record.owner == me
            && record.record.moving_to.is_some()
            && !migrating
            && !vmm_migrating(&vm.socket).await
        {
            // A migration this daemon no longer follows (its daemon before it died), over.
            clear_migration(store, record, "no migration runs from here").await;
        }
        if record.record.owner == me && record.record.moving_to.is_none() && vm.phase == VmPhase::Starting {
            // Harmless for a VM booting here: its phase stays until its VMM answers.
            let _ = ask(host, |r| HostMsg::Arrived(vm.name.clone(), r)).await;
        }
        let owned_elsewhere = record.record.owner != me && record.record.moving_to.as_deref() != Some(me);
        if owned_elsewhere && !migrating {
            tracing::warn!(
                vm = %vm.name,
                owner = %record.record.owner,
                epoch = record.record.epoch,
                "another host owns this VM now; deleting the copy here"
            );
            let _ = ask(host, |r| HostMsg::DeleteVm(vm.name.clone(), r)).await;
        }
    }
    let absent: BTreeSet<String> = records
        .iter()
        .filter(|r| r.record.owner == me && !local_names.contains(r.spec.name.as_str()))
        .map(|r| r.spec.name.clone())
        .collect();
    let long_absent: Vec<&records::Vm> =
        records.iter().filter(|r| absent.contains(&r.spec.name) && seen.missing.contains(&r.spec.name)).collect();
    *seen.missing = absent;
    *seen.unrecorded = unrecorded;
    for record in long_absent {
        let spec = record.spec.clone();
        let name = spec.name.clone();
        let created = match record.desired {
            DesiredState::Running => ask(host, |r| HostMsg::CreateVm(spec, r)).await?,
            DesiredState::Stopped => ask(host, |r| HostMsg::DefineVm(spec, r)).await?,
        };
        match created {
            Ok(info) if info.phase != VmPhase::Failed => {
                tracing::info!(vm = %name, epoch = record.record.epoch, "this host owns the VM: created it here")
            }
            Ok(_) => tracing::warn!(vm = %name, "created the VM this host owns, but it failed to start"),
            Err(e) => tracing::warn!(vm = %name, "cannot create the VM this host owns: {e}"),
        }
    }
    Ok(())
}

/// Takes the migration out of `record` (`to` cleared), if the record is as it was read: a
/// claim that won meanwhile, or a new migration, changed it and stays.
async fn clear_migration(store: &dyn Store, record: &records::Vm, why: &str) {
    match records::update(store, record, |r| r.moving_to = None).await {
        Ok(true) => {
            tracing::warn!(vm = %record.spec.name, to = ?record.record.moving_to, "a migration that is over: cleared from the record ({why})")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::debug!(vm = %record.spec.name, "cannot clear the migration from the record: {}", e.message())
        }
    }
}

/// Whether the VMM at `socket` runs a migration now (one that failed has its error).
async fn vmm_migrating(socket: &std::path::Path) -> bool {
    let request = novacron_vmm::api::Request::MigrateStatus;
    match novacron_actors::process::api_call(socket, request, Duration::from_secs(2)).await {
        Ok(response) => response.migration.is_some_and(|m| m.error.is_none()),
        // Unsure (busy, or between processes): leave the record for the next round.
        Err(_) => true,
    }
}

/// Whether VM `name` still has no record, by a read of its key alone (a listing leaves out
/// records that do not decode; those are not deletions).
async fn unrecorded_still(store: &dyn Store, name: &str) -> Result<bool, tonic::Status> {
    let key = novacron_cluster::records::vm_key(name);
    let read = store.get(&key).await;
    Ok(read
        .map_err(|e| tonic::Status::unavailable(format!("the cluster store: {}", novacron_actors::error_chain(&e))))?
        .is_none())
}
