//! The `Control` service: each call checks its request, asks the HostSupervisor (or the
//! VM's supervisor) and turns the answer into a reply. Nothing here holds VM state; the
//! actors do.

use crate::client::Client;
use crate::cluster::{ClusterMsg, Route};
use crate::convert::{self, HostIdentity, host_error, invalid, vm_error, vm_to_pb};
use crate::ha::leadership::Leadership;
use crate::ha::reconcile::Leaving;
use crate::ha::records;
use crate::operations::Operations;
use crate::pb::{self, control_server::Control};
use novacron_actors::store::DesiredState;
use novacron_actors::{HostError, HostMsg, VmMsg, VmSpec};
use novacron_store::Store;
use novacron_vmm::api::Request as VmmRequest;
use ractor::ActorRef;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How long a call may wait for the host (a stop waits for the guest's shutdown).
const HOST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VMM may take to write a snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Recorded events sent to a new watcher at most.
const EVENT_HISTORY: usize = 10_000;

pub struct ControlService {
    pub host: ActorRef<HostMsg>,
    pub me: HostIdentity,
    pub operations: Arc<Operations>,
    /// Who leads the cluster: this daemon (its ClusterSupervisor) or another (a client).
    pub leadership: Leadership,
    /// The cluster store.
    pub store: Arc<dyn Store>,
    /// VMs migrating out of this host now.
    pub leaving: Leaving,
    /// Clients of the other daemons, by host.
    pub peers: Peers,
    /// This node's certificates: for other daemons and for migrations.
    pub tls_dir: PathBuf,
    /// Directories a snapshot is being written into now: a second one is refused.
    pub snapshots: Arc<Mutex<BTreeSet<PathBuf>>>,
}

/// Clients of the other hosts' daemons, made once per address (from `hosts/HOST`).
#[derive(Default)]
pub struct Peers {
    clients: tokio::sync::Mutex<std::collections::HashMap<String, (String, Client)>>,
}

impl Peers {
    /// A client of host `name`'s daemon, if it is a member and can be reached.
    pub async fn client(&self, store: &dyn Store, name: &str, tls_dir: &Path) -> Option<Client> {
        let kv = store.get(&novacron_cluster::records::host_key(name)).await.ok()??;
        let record: novacron_cluster::records::HostRecord = serde_json::from_slice(&kv.value).ok()?;
        let mut clients = self.clients.lock().await;
        if let Some((address, client)) = clients.get(name)
            && *address == record.address
        {
            return Some(client.clone());
        }
        let connect =
            crate::client::Connect { endpoint: record.address.clone(), tls_dir: tls_dir.to_owned(), token: None };
        let client = connect.connect().await.ok()?;
        clients.insert(name.to_string(), (record.address, client.clone()));
        Some(client)
    }
}

/// Marks a request one daemon passes to another: it is served where it arrives, never
/// passed on again.
const FORWARDED: &str = "x-novacron-forwarded";

pub fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// The next daemon a request goes to: a member passes requests to the primary as they
/// came (the primary does the cluster's part), the primary passes them to a VM's host
/// marked as forwarded (served there).
pub struct Hop {
    client: Client,
    mark: bool,
}

impl Hop {
    fn request<T>(&self, message: T) -> Request<T> {
        if self.mark { forwarded(message) } else { Request::new(message) }
    }
}

fn split<T>(request: Request<T>) -> (bool, T) {
    (request.metadata().contains_key(FORWARDED), request.into_inner())
}

/// Defines (and starts) a VM on this daemon's host.
pub async fn create_local(host: &ActorRef<HostMsg>, request: pb::CreateVmRequest, me: &str) -> Result<pb::Vm, Status> {
    let spec = checked_kernel(convert::spec_from_pb(request.spec)?).await?;
    let result = if request.start.unwrap_or(true) {
        ask(host, |r| HostMsg::CreateVm(spec, r)).await?
    } else {
        ask(host, |r| HostMsg::DefineVm(spec, r)).await?
    };
    Ok(vm_to_pb(&result.map_err(host_error)?, me))
}

/// The spec, once its kernel is known to be one this host's VMM boots (checked off the
/// async threads: it reads the whole file).
pub async fn checked_kernel(spec: VmSpec) -> Result<VmSpec, Status> {
    tokio::task::spawn_blocking(move || spec.check_kernel().map(|()| spec))
        .await
        .map_err(|e| Status::internal(format!("the kernel check failed: {e}")))?
        .map_err(invalid)
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the host supervisor did not answer: {e}; check the daemon's log"))
}

/// Sends `msg` to the host and waits for its answer.
pub async fn ask<T, F>(host: &ActorRef<HostMsg>, msg: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(ractor::RpcReplyPort<T>) -> HostMsg,
{
    ractor::call_t!(host, msg, HOST_TIMEOUT.as_millis() as u64).map_err(unavailable)
}

impl ControlService {
    /// The ClusterSupervisor, when this daemon leads.
    pub fn cluster(&self) -> Option<ActorRef<ClusterMsg>> {
        self.leadership.cluster()
    }

    /// The leader, when another daemon leads.
    fn primary(&self) -> Option<Client> {
        self.leadership.leader_client()
    }

    /// Another daemon to pass a request about VM `name` to, or `None` to serve it here:
    /// the VM's owner by its record in the cluster store (no leader needed); a VM the
    /// records do not name is looked for as before (here, then through the leader).
    async fn route_vm(&self, name: &str, forwarded: bool) -> Result<Option<Hop>, Status> {
        if forwarded {
            return Ok(None);
        }
        if let Ok(Some(vm)) = records::get(self.store.as_ref(), name).await {
            // Its owner, or the host it is migrating to (asked about the VM it receives).
            if vm.record.owner == self.me.name || vm.record.moving_to.as_deref() == Some(self.me.name.as_str()) {
                return Ok(None);
            }
            return match self.peers.client(self.store.as_ref(), &vm.record.owner, &self.tls_dir).await {
                Some(client) => Ok(Some(Hop { client, mark: true })),
                None => Err(Status::unavailable(format!(
                    "host {}, which holds VM {name}, does not answer; its guest runs on as it did (see `novacron host list`)",
                    vm.record.owner
                ))),
            };
        }
        if let Some(cluster) = &self.cluster() {
            let route = ractor::call_t!(cluster, |r| ClusterMsg::Locate(name.to_string(), r), 5000).ok().flatten();
            return Ok(route.and_then(|r| r.client).map(|client| Hop { client, mark: true }));
        }
        let Some(primary) = self.primary() else { return Ok(None) };
        let here = ask(&self.host, |r| HostMsg::VmActor(name.to_string(), r)).await?;
        Ok(if here.is_ok() { None } else { Some(Hop { client: primary, mark: false }) })
    }

    /// On the primary, a VM not found where the view put it (it moved, or was created,
    /// since the last poll) is looked for on every host; the view learns where it is.
    async fn or_found_elsewhere(
        &self,
        answer: Result<Response<pb::Vm>, Status>,
        name: &str,
    ) -> Result<Response<pb::Vm>, Status> {
        let (Err(e), Some(cluster)) = (&answer, &self.cluster()) else { return answer };
        if e.code() != tonic::Code::NotFound {
            return answer;
        }
        let routes: Vec<Route> = ractor::call_t!(cluster, ClusterMsg::Routes, 5000).map_err(unavailable)?;
        for route in routes {
            let found = match route.client {
                Some(mut client) => client.get_vm(forwarded(pb::VmRef { name: name.to_string() })).await.ok(),
                None => self.vm(name).await.ok().map(Response::new),
            };
            if let Some(vm) = found {
                let _ = cluster.cast(ClusterMsg::Created { host: route.host, vm: Box::new(vm.get_ref().clone()) });
                return Ok(vm);
            }
        }
        answer
    }

    /// On a member, for what concerns the whole cluster: the primary.
    fn to_primary(&self, forwarded: bool) -> Option<Client> {
        if forwarded { None } else { self.primary() }
    }

    /// The daemon of the host named by an operation id (`<host>-<n>`), or `None` for here.
    async fn route_operation(&self, id: &str, forwarded: bool) -> Result<Option<Hop>, Status> {
        let host = id.rsplit_once('-').map_or("", |(host, _)| host);
        if forwarded || host == self.me.name {
            return Ok(None);
        }
        if let Some(cluster) = &self.cluster() {
            let route = ractor::call_t!(cluster, |r| ClusterMsg::HostRoute(host.to_string(), r), 5000)
                .map_err(unavailable)?
                .ok_or_else(|| Status::not_found(format!("operation {id:?}: no host {host:?} is up in the cluster")))?;
            return Ok(route.client.map(|client| Hop { client, mark: true }));
        }
        Ok(self.primary().map(|client| Hop { client, mark: false }))
    }

    pub async fn vm_actor(&self, name: &str) -> Result<ActorRef<VmMsg>, Status> {
        let name = convert::name(name)?;
        ask(&self.host, |r| HostMsg::VmActor(name, r)).await?.map_err(host_error)
    }

    /// Sends a request to the VM's VMM through its supervisor.
    async fn control(&self, name: &str, request: VmmRequest, timeout: Duration) -> Result<(), Status> {
        let actor = self.vm_actor(name).await?;
        let wait = (timeout + Duration::from_secs(5)).as_millis() as u64;
        ractor::call_t!(actor, |reply| VmMsg::Control { request, timeout, reply }, wait)
            .map_err(unavailable)?
            .map_err(vm_error)?;
        Ok(())
    }

    async fn vm(&self, name: &str) -> Result<pb::Vm, Status> {
        let name = convert::name(name)?;
        let info = ask(&self.host, |r| HostMsg::GetVm(name, r)).await?.map_err(host_error)?;
        Ok(vm_to_pb(&info, &self.me.name))
    }

    async fn host_call(
        &self,
        name: &str,
        msg: fn(String, ractor::RpcReplyPort<Result<novacron_actors::VmInfo, HostError>>) -> HostMsg,
    ) -> Result<Response<pb::Vm>, Status> {
        let name = convert::name(name)?;
        let info = ask(&self.host, |r| msg(name, r)).await?.map_err(host_error)?;
        Ok(Response::new(vm_to_pb(&info, &self.me.name)))
    }

    async fn vm_call(
        &self,
        name: &str,
        msg: fn(ractor::RpcReplyPort<Result<novacron_actors::VmInfo, novacron_actors::VmError>>) -> VmMsg,
    ) -> Result<Response<pb::Vm>, Status> {
        let actor = self.vm_actor(name).await?;
        let info =
            ractor::call_t!(actor, msg, HOST_TIMEOUT.as_millis() as u64).map_err(unavailable)?.map_err(vm_error)?;
        Ok(Response::new(vm_to_pb(&info, &self.me.name)))
    }
}

/// A VM as its host last reported it, while that host does not answer.
fn unknown(mut vm: pb::Vm, host: &str, e: &Status) -> pb::Vm {
    vm.phase = "unknown".into();
    vm.error = format!("host {host} does not answer: {}", e.message());
    vm
}

/// A directory named in a request: absolute (the daemon's working directory means
/// nothing to a caller) and without `..`.
fn dir_arg(what: &str, dir: &str) -> Result<std::path::PathBuf, Status> {
    let path = std::path::PathBuf::from(dir);
    if dir.is_empty() || !path.is_absolute() {
        return Err(invalid(format!("{what} {dir:?} must be an absolute path on the daemon's host")));
    }
    if path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(invalid(format!("{what} {dir:?} must not contain '..'")));
    }
    Ok(path)
}

/// A snapshot goes into a new or empty directory only, as the proto says: writing into one
/// that holds files would mix two snapshots, or overwrite what is there.
fn fresh_dir(dir: &Path) -> Result<(), Status> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(entry) => {
                let first = entry.map(|e| e.file_name().to_string_lossy().into_owned()).unwrap_or_default();
                Err(invalid(format!(
                    "the snapshot directory {} is not empty (it holds {first:?}); give a new or empty directory",
                    dir.display()
                )))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(invalid(format!("the snapshot directory {} is a file, not a directory", dir.display())))
        }
        Err(e) => Err(invalid(format!("cannot use the snapshot directory {}: {e}", dir.display()))),
    }
}

/// Marks a directory as being written into until dropped.
struct Writing {
    dirs: Arc<Mutex<BTreeSet<PathBuf>>>,
    dir: PathBuf,
}

impl Writing {
    fn start(dirs: &Arc<Mutex<BTreeSet<PathBuf>>>, dir: &Path) -> Result<Writing, Status> {
        // Each change is one insert or one removal: a panic elsewhere leaves the set whole.
        if !dirs.lock().unwrap_or_else(|e| e.into_inner()).insert(dir.to_owned()) {
            return Err(Status::failed_precondition(format!(
                "a snapshot is being written into {} already; wait for it, or give another directory",
                dir.display()
            )));
        }
        Ok(Writing { dirs: dirs.clone(), dir: dir.to_owned() })
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.dir);
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, request) = split(request);
        if fwd {
            return Ok(Response::new(create_local(&self.host, request, &self.me.name).await?));
        }
        if let Some(mut primary) = self.primary() {
            return primary.create_vm(request).await;
        }
        let (Some(cluster), Some(tenure)) = (self.cluster(), self.leadership.tenure()) else {
            return Err(self.leadership.vacant());
        };
        // Checked here: a bad spec is refused before any host is chosen.
        let spec = convert::spec_from_pb(request.spec.clone())?;
        let route =
            ractor::call_t!(cluster, |r| ClusterMsg::Place(Box::new(spec.clone()), r), 5000).map_err(unavailable)??;
        let desired = if request.start.unwrap_or(true) { DesiredState::Running } else { DesiredState::Stopped };
        // The record first: the host's keeper permits the VM only once it names the host.
        records::create(self.store.as_ref(), &tenure, &spec, &route.host, desired).await?;
        let created = match route.client {
            None => create_local(&self.host, request, &self.me.name).await,
            Some(mut client) => client.create_vm(forwarded(request)).await.map(|r| r.into_inner()),
        };
        let vm = match created {
            Ok(vm) => vm,
            Err(e) => {
                let _ = records::delete(self.store.as_ref(), &route.host, &spec.name).await;
                return Err(e);
            }
        };
        let _ = cluster.cast(ClusterMsg::Created { host: route.host, vm: Box::new(vm.clone()) });
        Ok(Response::new(vm))
    }

    async fn start_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_vm(&r.name, fwd).await? {
            return hop.client.start_vm(hop.request(r)).await;
        }
        let answer = self.host_call(&r.name, HostMsg::StartVm).await?;
        records::set_desired(self.store.as_ref(), &self.me.name, &r.name, DesiredState::Running).await;
        Ok(answer)
    }

    async fn stop_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_vm(&r.name, fwd).await? {
            return hop.client.stop_vm(hop.request(r)).await;
        }
        let answer = self.host_call(&r.name, HostMsg::StopVm).await?;
        records::set_desired(self.store.as_ref(), &self.me.name, &r.name, DesiredState::Stopped).await;
        Ok(answer)
    }

    async fn pause_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_vm(&r.name, fwd).await? {
            return hop.client.pause_vm(hop.request(r)).await;
        }
        self.vm_call(&r.name, VmMsg::Pause).await
    }

    async fn resume_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_vm(&r.name, fwd).await? {
            return hop.client.resume_vm(hop.request(r)).await;
        }
        self.vm_call(&r.name, VmMsg::Resume).await
    }

    async fn delete_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        let name = r.name.clone();
        let answer = match self.route_vm(&r.name, fwd).await? {
            Some(mut hop) => hop.client.delete_vm(hop.request(r)).await,
            None => {
                let answer = self.host_call(&r.name, HostMsg::DeleteVm).await?;
                records::delete(self.store.as_ref(), &self.me.name, &name).await?;
                Ok(answer)
            }
        };
        if answer.is_ok()
            && let Some(cluster) = &self.cluster()
        {
            let _ = cluster.cast(ClusterMsg::Deleted(name));
        }
        answer
    }

    async fn list_vms(&self, request: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut primary) = self.to_primary(fwd) {
            return primary.list_vms(r).await;
        }
        let local = ask(&self.host, HostMsg::ListVms).await?;
        let mut vms: Vec<pb::Vm> = local.iter().map(|i| vm_to_pb(i, &self.me.name)).collect();
        if !fwd && let Some(cluster) = &self.cluster() {
            let routes: Vec<Route> = ractor::call_t!(cluster, ClusterMsg::Routes, 5000).map_err(unavailable)?;
            for route in routes {
                let Some(mut client) = route.client else { continue };
                match client.list_vms(forwarded(pb::ListVmsRequest {})).await {
                    Ok(answer) => vms.extend(answer.into_inner().vms),
                    // What it held when it last answered, marked as such.
                    Err(e) => {
                        let cached =
                            ractor::call_t!(cluster, ClusterMsg::Cached, 5000, route.host.clone()).unwrap_or_default();
                        vms.extend(cached.into_iter().map(|vm| unknown(vm, &route.host, &e)));
                    }
                }
            }
            vms.sort_by(|a, b| a.spec.as_ref().map(|s| &s.name).cmp(&b.spec.as_ref().map(|s| &s.name)));
        }
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn get_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_vm(&r.name, fwd).await? {
            let answer = hop.client.get_vm(hop.request(r.clone())).await;
            // A host that does not answer: what it said last, marked as such.
            if let (Err(e), Some(cluster)) = (&answer, &self.cluster())
                && e.code() == tonic::Code::Unavailable
            {
                let route = ractor::call_t!(cluster, |reply| ClusterMsg::Locate(r.name.clone(), reply), 5000);
                let host = route.ok().flatten().map(|route| route.host).unwrap_or_default();
                let cached = ractor::call_t!(cluster, ClusterMsg::Cached, 5000, host.clone()).unwrap_or_default();
                if let Some(vm) = cached.into_iter().find(|v| v.spec.as_ref().is_some_and(|s| s.name == r.name)) {
                    return Ok(Response::new(unknown(vm, &host, e)));
                }
            }
            return self.or_found_elsewhere(answer, &r.name).await;
        }
        let answer = self.vm(&r.name).await.map(Response::new);
        self.or_found_elsewhere(answer, &r.name).await
    }

    async fn snapshot_vm(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<pb::Operation>, Status> {
        let (fwd, request) = split(request);
        if let Some(mut hop) = self.route_vm(&request.name, fwd).await? {
            return hop.client.snapshot_vm(hop.request(request)).await;
        }
        let dir = dir_arg("the snapshot directory", &request.dir)?;
        let actor = self.vm_actor(&request.name).await?;
        // Refused now rather than as a failed operation when the VM has no VMM.
        let info = ractor::call_t!(actor, VmMsg::GetInfo, CONTROL_TIMEOUT.as_millis() as u64).map_err(unavailable)?;
        if info.pid.is_none() {
            return Err(vm_error(novacron_actors::VmError::NotRunning { name: info.name, phase: info.phase }));
        }
        let writing = Writing::start(&self.snapshots, &dir)?;
        fresh_dir(&dir)?;
        let (host, name) = (self.host.clone(), request.name.clone());
        let progress = self.operations.start("snapshot", &request.name, "writing the snapshot");
        let operation = progress.snapshot();
        let vmm_request = VmmRequest::Snapshot { dir: dir.to_string_lossy().into_owned(), paused: request.paused };
        let wait = (SNAPSHOT_TIMEOUT + Duration::from_secs(5)).as_millis() as u64;
        tokio::spawn(async move {
            let result = ractor::call_t!(
                actor,
                |reply| VmMsg::Control { request: vmm_request, timeout: SNAPSHOT_TIMEOUT, reply },
                wait
            );
            match result {
                Ok(Ok(response)) => {
                    let message = match response.snapshot {
                        Some(r) => r.summary(&dir),
                        None => format!("snapshot written to {}", dir.display()),
                    };
                    let _ = host.cast(HostMsg::SnapshotTaken { name, dir: dir.clone() });
                    progress.succeed(&message);
                }
                Ok(Err(e)) => progress.fail(&novacron_actors::error_chain(&e)),
                Err(e) => progress.fail(&format!("the VM's supervisor did not answer: {e}")),
            }
            drop(writing);
        });
        Ok(Response::new(operation))
    }

    async fn restore_vm(&self, request: Request<pb::RestoreRequest>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, request) = split(request);
        if let Some(mut hop) = self.route_vm(&request.name, fwd).await? {
            return hop.client.restore_vm(hop.request(request)).await;
        }
        let from = dir_arg("the snapshot directory", &request.dir)?;
        let name = convert::name(&request.name)?;
        let vm = ask(&self.host, |r| HostMsg::GetVm(name.clone(), r)).await?.map_err(host_error)?;
        // The snapshot's machine must be this VM's: its VMM takes its shape from the
        // snapshot, and the daemon reports the VM's spec.
        let dir = from.clone();
        let snapshot = tokio::task::spawn_blocking(move || novacron_vmm::snapshot::read(&dir))
            .await
            .map_err(|e| Status::internal(format!("reading the snapshot failed: {e}")))?
            .map_err(|e| {
                invalid(format!(
                    "{} holds no snapshot this daemon can read: {}",
                    from.display(),
                    novacron_actors::error_chain(&e)
                ))
            })?;
        if let Some(mismatch) = convert::snapshot_mismatch(&vm.spec, &snapshot.state.spec) {
            return Err(Status::failed_precondition(format!(
                "the snapshot in {} is not of VM {name}'s shape: {mismatch}",
                from.display()
            )));
        }
        let info = ask(&self.host, |reply| HostMsg::RestoreVm { name, from, reply }).await?.map_err(host_error)?;
        Ok(Response::new(vm_to_pb(&info, &self.me.name)))
    }

    async fn set_limit(&self, request: Request<pb::SetLimitRequest>) -> Result<Response<pb::Vm>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_vm(&r.name, fwd).await? {
            return hop.client.set_limit(hop.request(r)).await;
        }
        let request = convert::limit_request(&r)?;
        self.control(&r.name, request, CONTROL_TIMEOUT).await?;
        Ok(Response::new(self.vm(&r.name).await?))
    }

    async fn get_operation(&self, request: Request<pb::OperationRef>) -> Result<Response<pb::Operation>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_operation(&r.id, fwd).await? {
            return hop.client.get_operation(hop.request(r)).await;
        }
        let id = r.id;
        self.operations.get(&id).map(Response::new).ok_or_else(|| {
            Status::not_found(format!("no operation {id:?} on this host (ended ones are kept for a while)"))
        })
    }

    type WatchOperationStream = Stream_<pb::Operation>;

    async fn watch_operation(
        &self,
        request: Request<pb::OperationRef>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut hop) = self.route_operation(&r.id, fwd).await? {
            let stream = hop.client.watch_operation(hop.request(r)).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        let id = r.id;
        let mut rx =
            self.operations.watch(&id).ok_or_else(|| Status::not_found(format!("no operation {id:?} on this host")))?;
        let (tx, out) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let op = rx.borrow_and_update().clone();
                let running = op.state == crate::operations::RUNNING;
                if tx.send(Ok(op)).await.is_err() || !running || rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    type WatchEventsStream = Stream_<pb::Event>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let request = request.into_inner();
        if !request.vm.is_empty() {
            convert::name(&request.vm)?;
        }
        let after = request.after_seq;
        let feed = ask(&self.host, |reply| HostMsg::Events { after, limit: EVENT_HISTORY, reply })
            .await?
            .map_err(host_error)?;
        let (tx, out) = mpsc::channel(256);
        let host = self.me.name.clone();
        tokio::spawn(async move {
            let wanted = |vm: &Option<String>| request.vm.is_empty() || vm.as_deref() == Some(request.vm.as_str());
            let mut last = after;
            for (seq, event) in &feed.past {
                last = *seq;
                if wanted(&event.vm) && tx.send(Ok(convert::event_to_pb(*seq, event, &host))).await.is_err() {
                    return;
                }
            }
            if request.no_follow {
                return;
            }
            let mut live = feed.live;
            loop {
                match live.recv().await {
                    Ok((seq, event)) if seq > last => {
                        last = seq;
                        if wanted(&event.vm) && tx.send(Ok(convert::event_to_pb(seq, &event, &host))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let message = format!("this watcher fell {n} events behind; watch again with --after {last}");
                        let _ = tx.send(Err(Status::data_loss(message))).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn host_info(&self, _: Request<pb::HostInfoRequest>) -> Result<Response<pb::Host>, Status> {
        let info = ask(&self.host, HostMsg::HostInfo).await?;
        Ok(Response::new(convert::host_to_pb(&info, &self.me)))
    }

    async fn cluster_info(&self, request: Request<pb::ClusterInfoRequest>) -> Result<Response<pb::Cluster>, Status> {
        let (fwd, r) = split(request);
        if let Some(mut primary) = self.to_primary(fwd) {
            return primary.cluster_info(r).await;
        }
        if let Some(cluster) = &self.cluster() {
            let hosts = ractor::call_t!(cluster, ClusterMsg::Hosts, 5000).map_err(unavailable)?;
            return Ok(Response::new(pb::Cluster { hosts }));
        }
        // A daemon on its own is a cluster of one host.
        let info = ask(&self.host, HostMsg::HostInfo).await?;
        Ok(Response::new(pb::Cluster { hosts: vec![convert::host_to_pb(&info, &self.me)] }))
    }

    async fn migrate_vm(&self, request: Request<pb::MigrateVmRequest>) -> Result<Response<pb::Operation>, Status> {
        let (fwd, r) = split(request);
        convert::name(&r.name)?;
        if !r.to_address.is_empty() {
            if !fwd {
                return Err(invalid("to_address is set by the cluster's primary only; give to_host"));
            }
            return Ok(Response::new(crate::migrate::migrate_out(self, r).await?));
        }
        if let Some(mut primary) = self.to_primary(fwd) {
            return primary.migrate_vm(r).await;
        }
        let Some(cluster) = &self.cluster() else {
            return Err(self.leadership.vacant());
        };
        Ok(Response::new(crate::migrate::orchestrate(self, cluster, r).await?))
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(crate::ha::ops::status(self.store.as_ref()).await?))
    }

    async fn cluster_events(
        &self,
        request: Request<pb::ClusterEventsRequest>,
    ) -> Result<Response<pb::ClusterEventsReply>, Status> {
        Ok(Response::new(crate::ha::ops::events(self.store.as_ref(), request.into_inner().after_seq).await?))
    }

    async fn cordon_host(&self, request: Request<pb::CordonRequest>) -> Result<Response<pb::HostStatus>, Status> {
        let (fwd, r) = split(request);
        convert::name(&r.host).map_err(|_| invalid(format!("host name {:?} is not valid", r.host)))?;
        // Through the leader, so that its next placement knows.
        if let Some(mut primary) = self.to_primary(fwd) {
            return primary.cordon_host(r).await;
        }
        let status = crate::ha::ops::cordon(self.store.as_ref(), &r.host, r.cordoned).await?;
        if let Some(cluster) = self.cluster() {
            let _ = cluster.cast(ClusterMsg::Cordoned { host: r.host, cordoned: r.cordoned });
        }
        Ok(Response::new(status))
    }

    async fn drain_host(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::Operation>, Status> {
        let (fwd, r) = split(request);
        convert::name(&r.host).map_err(|_| invalid(format!("host name {:?} is not valid", r.host)))?;
        if let Some(mut primary) = self.to_primary(fwd) {
            return primary.drain_host(r).await;
        }
        let Some(cluster) = self.cluster() else { return Err(self.leadership.vacant()) };
        let plan = ractor::call_t!(cluster, |reply| ClusterMsg::PlanDrain(r.host.clone(), reply), 5000)
            .map_err(unavailable)??;
        crate::ha::ops::cordon(self.store.as_ref(), &r.host, true).await?;
        let progress =
            self.operations.start("drain", "", &format!("draining host {}: {} VMs to move", r.host, plan.len()));
        let op = progress.snapshot();
        crate::drain::run(plan, r.host, self.me.address.clone(), self.tls_dir.clone(), progress);
        Ok(Response::new(op))
    }

    async fn join_cluster(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let r = request.into_inner();
        let Some(cluster) = &self.cluster() else {
            return Err(Status::failed_precondition(format!(
                "host {} does not lead the cluster; ask the leader (`novacron host list`)",
                self.me.name
            )));
        };
        let reply = ractor::call_t!(cluster, |reply| ClusterMsg::Join(r, reply), 5000).map_err(unavailable)??;
        Ok(Response::new(reply))
    }

    async fn receive_vm(&self, request: Request<pb::ReceiveVmRequest>) -> Result<Response<pb::ReceiveVmReply>, Status> {
        Ok(Response::new(crate::migrate::receive(self, request.into_inner()).await?))
    }

    async fn vm_arrived(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        self.host_call(&request.into_inner().name, HostMsg::Arrived).await
    }
}
