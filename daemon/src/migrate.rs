//! Live migration between the cluster's hosts, through the daemons:
//!
//! 1. The primary (`orchestrate`) checks the request (the VM exists, the target host is
//!    up and is another host, the VM is not migrating already) and hands it to the VM's
//!    host with the target's address.
//! 2. The source daemon (`migrate_out`) asks the target daemon to start a receiving VMM
//!    (`receive`: admitted like a new VM, not recorded until it arrives), then tells its
//!    own VMM to migrate there (the VMM streams memory over QUIC itself; nothing passes
//!    through the actors) and reports the VMM's progress in an operation.
//! 3. On success the target takes the VM (`VmArrived`: recorded, under its restart policy)
//!    and the source forgets it; on failure the target's receiving VMM is deleted and the
//!    VM runs on at the source, as it was.

use crate::client::{Client, Connect};
use crate::cluster::ClusterMsg;
use crate::convert::{self, host_error, invalid, vm_error};
use crate::ha::records;
use crate::operations::Progress;
use crate::pb;
use crate::service::{ControlService, ask, forwarded, unavailable};
use novacron_actors::{HostMsg, Incoming, VmError, VmMsg, VmPhase};
use novacron_migration::source::PostCopy;
use novacron_vmm::api::{MigrateRequest, Request as VmmRequest};
use ractor::ActorRef;
use ractor::rpc::CallResult;
use std::time::{Duration, Instant};
use tonic::Status;

/// Longest a migration may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How often the source's VMM is asked for its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long a receiving VMM may take to listen.
const RECEIVER_START: Duration = Duration::from_secs(10);
const DEFAULT_DOWNTIME_MS: u64 = 50;
/// How long the source's VMM may take to exit after the VM moved.
const SOURCE_EXIT: Duration = Duration::from_secs(10);

/// On the primary: checks the request and hands it to the VM's host.
pub async fn orchestrate(
    svc: &ControlService,
    cluster: &ActorRef<ClusterMsg>,
    mut r: pb::MigrateVmRequest,
) -> Result<pb::Operation, Status> {
    convert::name(&r.to_host).map_err(|_| invalid(format!("host name {:?} is not valid", r.to_host)))?;
    if post_copy(&r)?.is_some() && r.dry_run {
        return Err(invalid("a dry run predicts a pre-copy migration only: leave post_copy out"));
    }
    let source = ractor::call_t!(cluster, |reply| ClusterMsg::Locate(r.name.clone(), reply), 5000)
        .map_err(unavailable)?
        .ok_or_else(|| Status::not_found(format!("no VM named {:?} in the cluster", r.name)))?;
    if source.host == r.to_host {
        return Err(Status::failed_precondition(format!(
            "VM {} is on host {} already; choose another --to-host (`novacron host list`)",
            r.name, r.to_host
        )));
    }
    let target = ractor::call_t!(cluster, |reply| ClusterMsg::HostRoute(r.to_host.clone(), reply), 5000)
        .map_err(unavailable)?
        .ok_or_else(|| {
            Status::not_found(format!("no host {:?} is up in the cluster; see `novacron host list`", r.to_host))
        })?;
    let (vm, from, to) = (r.name.clone(), source.host.clone(), target.host.clone());
    ractor::call_t!(cluster, |reply| ClusterMsg::CheckTarget { vm, source: from, target: to, reply }, 5000)
        .map_err(unavailable)??;
    r.to_address = target.address.clone();
    let hand_over = async |r: pb::MigrateVmRequest| match source.client.clone() {
        None => migrate_out(svc, r).await,
        Some(mut client) => client.migrate_vm(forwarded(r)).await.map(|a| a.into_inner()),
    };
    if r.dry_run {
        // Nothing moves: the cluster's bookkeeping of migrations stays out of it.
        return hand_over(r).await;
    }
    ractor::call_t!(cluster, |reply| ClusterMsg::MigrationStarting(r.name.clone(), reply), 5000)
        .map_err(unavailable)??;
    let name = r.name.clone();
    let started = hand_over(r).await;
    let op = match started {
        Ok(op) => op,
        Err(e) => {
            let _ = cluster.cast(ClusterMsg::MigrationEnded { vm: name, moved: None });
            return Err(e);
        }
    };
    // Followed to its end, so that the cluster knows where the VM is and that it may
    // migrate again.
    let (cluster, id, operations) = (cluster.clone(), op.id.clone(), svc.operations.clone());
    let (from, to) = (source.host.clone(), target.host.clone());
    tokio::spawn(async move {
        let end = match source.client {
            None => match operations.watch(&id) {
                Some(mut rx) => loop {
                    if rx.borrow().state != crate::operations::RUNNING || rx.changed().await.is_err() {
                        break Some(rx.borrow().clone());
                    }
                },
                None => None,
            },
            Some(client) => last_of(client, id).await,
        };
        let moved = end.filter(|op| op.state == crate::operations::SUCCEEDED).map(|_| (from, to));
        let _ = cluster.cast(ClusterMsg::MigrationEnded { vm: name, moved });
    });
    Ok(op)
}

/// The last state of a remote operation (`None` if the stream broke first).
async fn last_of(mut client: Client, id: String) -> Option<pb::Operation> {
    let mut stream = client.watch_operation(forwarded(pb::OperationRef { id })).await.ok()?.into_inner();
    let mut last = None;
    while let Ok(Some(op)) = stream.message().await {
        last = Some(op);
    }
    last
}

/// On the VM's host: starts the receiver at the target, then the migration.
pub async fn migrate_out(svc: &ControlService, r: pb::MigrateVmRequest) -> Result<pb::Operation, Status> {
    let actor = svc.vm_actor(&r.name).await?;
    let info = ractor::call_t!(actor, VmMsg::GetInfo, 5000).map_err(unavailable)?;
    if info.pid.is_none() || !matches!(info.phase, VmPhase::Running | VmPhase::Paused) {
        return Err(vm_error(VmError::NotRunning { name: info.name, phase: info.phase }));
    }
    let connect = Connect { endpoint: r.to_address.clone(), tls_dir: svc.tls_dir.clone(), token: None };
    let mut target = connect.connect().await.map_err(|e| {
        Status::unavailable(format!("cannot reach the target host: {}", novacron_actors::error_chain(&e)))
    })?;
    if r.dry_run {
        return dry_run_out(svc, r, actor, info, target).await;
    }
    // The record says where the VM goes: only that host's keeper may claim it at the commit.
    let record =
        records::get(svc.store.as_ref(), &r.name).await?.filter(|vm| vm.record.owner == svc.me.name).ok_or_else(
            || Status::failed_precondition(format!("VM {} is not this host's by the cluster's records", r.name)),
        )?;
    // Leaving before the record names the target: the reconciler clears a target that no
    // migration from here follows.
    let outgoing = Outgoing::start(svc, &r.name);
    match records::update(svc.store.as_ref(), &record, |rec| rec.moving_to = Some(r.to_host.clone())).await {
        Ok(true) => {}
        Ok(false) => {
            outgoing.done();
            return Err(Status::aborted(format!("VM {}'s record changed meanwhile; try again", r.name)));
        }
        Err(e) => {
            outgoing.done();
            return Err(e);
        }
    }
    let receive = pb::ReceiveVmRequest { spec: Some(convert::spec_to_pb(&info.spec)) };
    let listen = match target.receive_vm(forwarded(receive)).await {
        Ok(answer) => answer.into_inner().listen,
        Err(e) => {
            outgoing.failed().await;
            return Err(e);
        }
    };

    let progress = svc.operations.start("migrate", &r.name, &format!("connecting to {listen}"));
    let op = progress.snapshot();
    let request = vmm_request(svc, &r, listen, op.id.clone());
    let (host, name, socket) = (svc.host.clone(), r.name.clone(), info.socket.clone());
    tokio::spawn(async move {
        let result = follow(&actor, request, &socket, &progress).await;
        let moved = result.is_ok();
        finish(result, &host, &actor, &mut target, &name, progress).await;
        if moved { outgoing.moved() } else { outgoing.failed().await }
    });
    Ok(op)
}

/// The request's post-copy choice, checked.
fn post_copy(r: &pb::MigrateVmRequest) -> Result<Option<PostCopy>, Status> {
    match r.post_copy.as_str() {
        "" => Ok(None),
        s => s.parse().map(Some).map_err(invalid),
    }
}

/// What the VM's VMM is asked to do.
fn vmm_request(svc: &ControlService, r: &pb::MigrateVmRequest, to: String, id: String) -> VmmRequest {
    VmmRequest::Migrate(MigrateRequest {
        to,
        tls_dir: svc.tls_dir.to_string_lossy().into_owned(),
        max_bandwidth: r.max_bandwidth,
        downtime_ms: if r.downtime_ms == 0 { DEFAULT_DOWNTIME_MS } else { r.downtime_ms },
        auto_converge: true,
        compress: true,
        delta_cache_mib: 64,
        // One per core of the VM's host.
        workers: 0,
        keep_snapshot: None,
        transport: Default::default(),
        dry_run: r.dry_run,
        fault: None,
        // Checked by `orchestrate`, on the primary.
        post_copy: post_copy(r).ok().flatten(),
        id: Some(id),
    })
}

/// On the VM's host: a dry run against a receiver started at the target for it, and
/// removed after. The records and the VM stay as they are.
async fn dry_run_out(
    svc: &ControlService,
    r: pb::MigrateVmRequest,
    actor: ActorRef<VmMsg>,
    info: novacron_actors::VmInfo,
    mut target: Client,
) -> Result<pb::Operation, Status> {
    let receive = pb::ReceiveVmRequest { spec: Some(convert::spec_to_pb(&info.spec)) };
    let listen = target.receive_vm(forwarded(receive)).await?.into_inner().listen;
    let progress = svc.operations.start("migrate-dry-run", &r.name, &format!("measuring against {listen}"));
    let op = progress.snapshot();
    let request = vmm_request(svc, &r, listen, op.id.clone());
    tokio::spawn(async move {
        let result = follow(&actor, request, &info.socket, &progress).await;
        let vm = pb::VmRef { name: r.name.clone() };
        if let Err(status) = target.delete_vm(forwarded(vm)).await {
            tracing::warn!(vm = r.name, "cannot remove the dry run's receiver at the target: {}", status.message());
        }
        match result.map(|response| response.migration.and_then(|m| m.prediction)) {
            Ok(Some(p)) => progress.predicted(&prediction_line(&p), convert::prediction_to_pb(&p)),
            Ok(None) => progress.fail("the VMM answered the dry run without a prediction"),
            Err(e) => progress.fail(&e),
        }
    });
    Ok(op)
}

/// A dry run's outcome in one line.
fn prediction_line(p: &novacron_migration::source::Prediction) -> String {
    let mib = p.bytes as f64 / f64::from(1 << 20);
    match &p.failure {
        None => format!(
            "would converge: {} ms in all, {} ms of downtime, {mib:.1} MiB, {} rounds{}",
            p.total_ms,
            p.downtime_ms,
            p.rounds,
            if p.throttle_max > 0 { format!(", vCPUs throttled up to {}%", p.throttle_max) } else { String::new() }
        ),
        Some(f) if p.advice.is_empty() => format!("would not converge: {f}"),
        Some(f) => format!("would not converge: {f}; would with {}", p.advice.join("; ")),
    }
}

/// A VM migrating out of this host: in the reconciler's leaving set while it goes, and
/// its record's `moving_to` cleared again if it does not go.
struct Outgoing {
    store: std::sync::Arc<dyn novacron_store::Store>,
    leaving: crate::ha::reconcile::Leaving,
    me: String,
    name: String,
}

impl Outgoing {
    fn start(svc: &ControlService, name: &str) -> Outgoing {
        svc.leaving.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Outgoing {
            store: svc.store.clone(),
            leaving: svc.leaving.clone(),
            me: svc.me.name.clone(),
            name: name.to_string(),
        }
    }

    fn done(&self) {
        self.leaving.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
    }

    /// The target's keeper claimed the VM at the commit: its record says so already.
    fn moved(self) {
        self.done();
    }

    /// The VM stays: the record no longer names a target (if it still names this host).
    async fn failed(self) {
        self.done();
        match records::get(self.store.as_ref(), &self.name).await {
            Ok(Some(vm)) if vm.record.owner == self.me && vm.record.moving_to.is_some() => {
                if let Err(e) = records::update(self.store.as_ref(), &vm, |r| r.moving_to = None).await {
                    tracing::warn!(vm = %self.name, "cannot clear the failed migration from the record: {}", e.message());
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vm = %self.name, "cannot read the record after a failed migration: {}", e.message())
            }
        }
    }
}

/// Runs the VMM's migration, updating `progress` from its status meanwhile.
async fn follow(
    actor: &ActorRef<VmMsg>,
    request: VmmRequest,
    socket: &std::path::Path,
    progress: &Progress,
) -> Result<novacron_vmm::api::Response, String> {
    let call = actor.call(|reply| VmMsg::Control { request, timeout: MIGRATE_TIMEOUT, reply }, None);
    tokio::pin!(call);
    loop {
        tokio::select! {
            answer = &mut call => {
                return match answer {
                    Ok(CallResult::Success(Ok(response))) => Ok(response),
                    Ok(CallResult::Success(Err(e))) => Err(novacron_actors::error_chain(&e)),
                    Ok(_) | Err(_) => Err("the VM's supervisor did not answer".into()),
                };
            }
            () = tokio::time::sleep(PROGRESS_EVERY) => {
                let status = novacron_actors::process::api_call(socket, VmmRequest::MigrateStatus, PROGRESS_EVERY * 4).await;
                if let Ok(response) = status && let Some(m) = response.migration {
                    let (line, percent) = progress_line(&m.progress);
                    progress.update(&line, percent);
                }
            }
        }
    }
}

/// The outcome: the target takes the VM and the source forgets it, or the target's
/// receiver goes and the VM stays.
async fn finish(
    result: Result<novacron_vmm::api::Response, String>,
    host: &ActorRef<HostMsg>,
    actor: &ActorRef<VmMsg>,
    target: &mut Client,
    name: &str,
    progress: Progress,
) {
    let vm = pb::VmRef { name: name.to_string() };
    match result {
        Ok(response) => {
            if let Err(e) = target.vm_arrived(forwarded(vm)).await {
                progress.fail(&format!("the VM moved but the target host did not take it: {}", e.message()));
                return;
            }
            // The source VMM exits right after it answers; the host forgets the VM once
            // its supervisor has seen that.
            let deadline = Instant::now() + SOURCE_EXIT;
            while Instant::now() < deadline {
                match ractor::call_t!(actor, VmMsg::GetInfo, 5000) {
                    Ok(info) if info.pid.is_some() => tokio::time::sleep(Duration::from_millis(10)).await,
                    _ => break,
                }
            }
            match ractor::call_t!(host, HostMsg::Departed, 5000, name.to_string()) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(vm = name, "cannot forget the VM that moved away: {e}"),
                Err(e) => tracing::error!(vm = name, "cannot forget the VM that moved away: {e}"),
            }
            let report = response.migration.and_then(|m| m.report);
            let message = match report {
                Some(r) => format!(
                    "moved in {} ms, {} rounds, downtime {:.1} ms, {:.1} MiB sent, {}memory verified ({})",
                    r.total_ms,
                    r.rounds,
                    r.downtime_us as f64 / 1000.0,
                    r.bytes_sent as f64 / f64::from(1 << 20),
                    r.post_copy.map_or(String::new(), |p| format!(
                        "post-copy: {} pages after the switchover ({} asked for by the guest) in {} ms, ",
                        p.pages, p.requested, p.post_copy_ms
                    )),
                    &r.memory_digest[..r.memory_digest.len().min(16)]
                ),
                None => "moved".into(),
            };
            progress.succeed(&message);
        }
        Err(e) => {
            // The receiver has ended (or will); its entry goes.
            if let Err(status) = target.delete_vm(forwarded(vm)).await {
                tracing::warn!(vm = name, "cannot remove the failed receiver at the target: {}", status.message());
            }
            progress.fail(&format!("{e}; the VM runs on at its host"));
        }
    }
}

/// One line of progress and a percentage (pages of the current round done).
fn progress_line(p: &novacron_migration::source::Progress) -> (String, u32) {
    let round_total = p.remaining_pages + p.pages_sent.min(p.total_pages);
    let percent = (100 * (round_total - p.remaining_pages)).checked_div(round_total).unwrap_or(0) as u32;
    let line = format!(
        "{:?}, round {}: {:.1} MiB sent, {} pages left, dirty {} pages/s, {:.0} MiB/s, downtime estimate {} ms{}",
        p.phase,
        p.round,
        p.bytes_sent as f64 / f64::from(1 << 20),
        p.remaining_pages,
        p.dirty_rate,
        p.bandwidth as f64 / f64::from(1 << 20),
        p.estimated_downtime_ms,
        if p.throttle_percent > 0 { format!(", vCPUs throttled {}%", p.throttle_percent) } else { String::new() }
    );
    (line, percent.min(99))
}

/// On the target: admits the VM and starts its receiving VMM on a free port.
pub async fn receive(svc: &ControlService, r: pb::ReceiveVmRequest) -> Result<pb::ReceiveVmReply, Status> {
    let spec = convert::spec_from_pb(r.spec)?;
    let ip = svc
        .me
        .address
        .parse::<std::net::SocketAddr>()
        .map_err(|e| Status::internal(format!("this host's address {}: {e}", svc.me.address)))?
        .ip();
    // A port on the control port's address free for QUIC (UDP) and TLS over TCP alike.
    let port = novacron_migration::transport::free_port(ip)
        .map_err(|e| Status::unavailable(format!("no free port for the receiver on {ip}: {e}")))?;
    let listen = std::net::SocketAddr::new(ip, port).to_string();
    let runtime_dir = ask(&svc.host, HostMsg::HostInfo).await?.runtime_dir;
    let socket = runtime_dir.join(format!("{}.sock", spec.name));
    let name = spec.name.clone();
    let incoming = Incoming { listen: listen.clone(), tls_dir: svc.tls_dir.clone() };
    // Nothing is removed before the host admits the VM: a refused receive leaves the
    // socket of a VM of that name alone.
    ask(&svc.host, |reply| HostMsg::ReceiveVm { spec, incoming, reply }).await?.map_err(host_error)?;
    // The VMM binds its control socket right after its QUIC listener: once the socket
    // accepts, the source can connect (a stale socket file of an ended VMM refuses, and
    // the new VMM replaces it).
    let deadline = Instant::now() + RECEIVER_START;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            let _ = ask(&svc.host, |reply| HostMsg::DeleteVm(name.clone(), reply)).await;
            return Err(Status::unavailable(format!(
                "the receiving VMM of {name} did not start within {RECEIVER_START:?}; see its log in {}",
                runtime_dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pb::ReceiveVmReply { listen })
}
