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
        let mut missing = BTreeSet::new();
        loop {
            tokio::time::sleep(EVERY).await;
            if let Err(e) = round(store.as_ref(), &host, &me, &leaving, &mut missing).await {
                tracing::debug!("reconciling with the cluster's records: {}", e.message());
            }
        }
    });
}

/// One round; `missing` is what the last round found owned here but absent.
async fn round(
    store: &dyn Store,
    host: &ActorRef<HostMsg>,
    me: &str,
    leaving: &Leaving,
    missing: &mut BTreeSet<String>,
) -> Result<(), tonic::Status> {
    let records = records::list(store).await?;
    let local = ask(host, HostMsg::ListVms).await?;
    let local_names: BTreeSet<&str> = local.iter().map(|v| v.name.as_str()).collect();
    for vm in &local {
        let Some(record) = records.iter().find(|r| r.spec.name == vm.name) else { continue };
        if record.record.owner == me && record.record.moving_to.is_none() && vm.phase == VmPhase::Starting {
            // Harmless for a VM booting here: its phase stays until its VMM answers.
            let _ = ask(host, |r| HostMsg::Arrived(vm.name.clone(), r)).await;
        }
        let owned_elsewhere = record.record.owner != me && record.record.moving_to.as_deref() != Some(me);
        let migrating = leaving.lock().unwrap_or_else(|p| p.into_inner()).contains(&vm.name);
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
        records.iter().filter(|r| absent.contains(&r.spec.name) && missing.contains(&r.spec.name)).collect();
    *missing = absent;
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
