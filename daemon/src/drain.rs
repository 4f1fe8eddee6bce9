//! Draining a host: every VM it owns live-migrated to the others, one at a time, by the
//! placement the leader planned for all of them together before anything moved.

use crate::client::{Client, Connect};
use crate::cluster::Route;
use crate::operations::{Progress, SUCCEEDED};
use crate::pb;
use std::path::PathBuf;

/// Migrates each VM of `plan` in turn through this daemon's own port (as `vm migrate`
/// would), reporting in `progress`; stops at the first that fails.
pub fn run(plan: Vec<(String, Route)>, host: String, me: String, tls_dir: PathBuf, progress: Progress) {
    tokio::spawn(async move {
        let connect = Connect { endpoint: me, tls_dir, token: None };
        let mut client = match connect.connect().await {
            Ok(c) => c,
            Err(e) => {
                progress.fail(&format!("cannot reach this daemon's own port: {}", novacron_actors::error_chain(&e)));
                return;
            }
        };
        let total = plan.len();
        for (i, (vm, to)) in plan.into_iter().enumerate() {
            progress.update(
                &format!("VM {vm} ({} of {total}): migrating to {}", i + 1, to.host),
                (100 * i / total.max(1)) as u32,
            );
            if let Err(e) = migrate_one(&mut client, &vm, &to.host).await {
                progress.fail(&format!("drained {i} of {total} VMs of host {host}; VM {vm} did not move: {e}"));
                return;
            }
        }
        progress.succeed(&format!("host {host} drained: {total} VMs moved; it stays cordoned"));
    });
}

/// One VM's migration, followed to its end.
async fn migrate_one(client: &mut Client, vm: &str, to: &str) -> Result<(), String> {
    let request = pb::MigrateVmRequest { name: vm.to_string(), to_host: to.to_string(), ..Default::default() };
    let op = client.migrate_vm(request).await.map_err(|s| s.message().to_string())?.into_inner();
    let mut stream = client
        .watch_operation(pb::OperationRef { id: op.id.clone() })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut last = op;
    while let Ok(Some(next)) = stream.message().await {
        last = next;
    }
    if last.state == SUCCEEDED { Ok(()) } else { Err(last.message) }
}
