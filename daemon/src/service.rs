//! The `Control` service: each call checks its request, asks the HostSupervisor (or the
//! VM's supervisor) and turns the answer into a reply. Nothing here holds VM state; the
//! actors do.

use crate::convert::{self, host_error, invalid, vm_error, vm_to_pb};
use crate::operations::Operations;
use crate::pb::{self, control_server::Control};
use novacron_actors::{HostError, HostMsg, VmMsg};
use novacron_vmm::api::{LimitChange, Request as VmmRequest};
use ractor::ActorRef;
use std::pin::Pin;
use std::sync::Arc;
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
    /// This host's name and control port address, as reported.
    pub name: String,
    pub address: String,
    pub operations: Arc<Operations>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the host supervisor did not answer: {e}; check the daemon's log"))
}

/// Sends `msg` to the host and waits for its answer.
async fn ask<T, F>(host: &ActorRef<HostMsg>, msg: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(ractor::RpcReplyPort<T>) -> HostMsg,
{
    ractor::call_t!(host, msg, HOST_TIMEOUT.as_millis() as u64).map_err(unavailable)
}

impl ControlService {
    async fn vm_actor(&self, name: &str) -> Result<ActorRef<VmMsg>, Status> {
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
        Ok(vm_to_pb(&info, &self.name))
    }

    async fn host_call(
        &self,
        name: &str,
        msg: fn(String, ractor::RpcReplyPort<Result<novacron_actors::VmInfo, HostError>>) -> HostMsg,
    ) -> Result<Response<pb::Vm>, Status> {
        let name = convert::name(name)?;
        let info = ask(&self.host, |r| msg(name, r)).await?.map_err(host_error)?;
        Ok(Response::new(vm_to_pb(&info, &self.name)))
    }

    async fn vm_call(
        &self,
        name: &str,
        msg: fn(ractor::RpcReplyPort<Result<novacron_actors::VmInfo, novacron_actors::VmError>>) -> VmMsg,
    ) -> Result<Response<pb::Vm>, Status> {
        let actor = self.vm_actor(name).await?;
        let info =
            ractor::call_t!(actor, msg, HOST_TIMEOUT.as_millis() as u64).map_err(unavailable)?.map_err(vm_error)?;
        Ok(Response::new(vm_to_pb(&info, &self.name)))
    }
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

#[tonic::async_trait]
impl Control for ControlService {
    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let spec = convert::spec_from_pb(request.spec)?;
        let start = request.start.unwrap_or(true);
        let result = if start {
            ask(&self.host, |r| HostMsg::CreateVm(spec, r)).await?
        } else {
            ask(&self.host, |r| HostMsg::DefineVm(spec, r)).await?
        };
        Ok(Response::new(vm_to_pb(&result.map_err(host_error)?, &self.name)))
    }

    async fn start_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        self.host_call(&request.into_inner().name, HostMsg::StartVm).await
    }

    async fn stop_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        self.host_call(&request.into_inner().name, HostMsg::StopVm).await
    }

    async fn pause_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        self.vm_call(&request.into_inner().name, VmMsg::Pause).await
    }

    async fn resume_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        self.vm_call(&request.into_inner().name, VmMsg::Resume).await
    }

    async fn delete_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        self.host_call(&request.into_inner().name, HostMsg::DeleteVm).await
    }

    async fn list_vms(&self, _: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = ask(&self.host, HostMsg::ListVms).await?;
        Ok(Response::new(pb::ListVmsResponse { vms: vms.iter().map(|i| vm_to_pb(i, &self.name)).collect() }))
    }

    async fn get_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        Ok(Response::new(self.vm(&request.into_inner().name).await?))
    }

    async fn snapshot_vm(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<pb::Operation>, Status> {
        let request = request.into_inner();
        let dir = dir_arg("the snapshot directory", &request.dir)?;
        let actor = self.vm_actor(&request.name).await?;
        // Refused now rather than as a failed operation when the VM has no VMM.
        let info = ractor::call_t!(actor, VmMsg::GetInfo, CONTROL_TIMEOUT.as_millis() as u64).map_err(unavailable)?;
        if info.pid.is_none() {
            return Err(vm_error(novacron_actors::VmError::NotRunning { name: info.name, phase: info.phase }));
        }
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
                    progress.succeed(&message);
                }
                Ok(Err(e)) => progress.fail(&novacron_actors::error_chain(&e)),
                Err(e) => progress.fail(&format!("the VM's supervisor did not answer: {e}")),
            }
        });
        Ok(Response::new(operation))
    }

    async fn restore_vm(&self, request: Request<pb::RestoreRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let from = dir_arg("the snapshot directory", &request.dir)?;
        if !from.join("state.bin").is_file() {
            return Err(invalid(format!("{} holds no snapshot (no state.bin)", from.display())));
        }
        let actor = self.vm_actor(&request.name).await?;
        let info = ractor::call_t!(actor, |reply| VmMsg::Restore { from, reply }, HOST_TIMEOUT.as_millis() as u64)
            .map_err(unavailable)?
            .map_err(vm_error)?;
        Ok(Response::new(vm_to_pb(&info, &self.name)))
    }

    async fn set_limit(&self, request: Request<pb::SetLimitRequest>) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        let burst = |b: u64| (b != 0).then_some(b);
        let bandwidth = LimitChange::parse("bw", Some(&r.bandwidth), burst(r.bandwidth_burst)).map_err(invalid)?;
        let ops = LimitChange::parse("ops", Some(&r.ops), burst(r.ops_burst)).map_err(invalid)?;
        if bandwidth == LimitChange::Keep && ops == LimitChange::Keep {
            return Err(invalid("the request changes nothing: give bandwidth or ops"));
        }
        let target = match r.direction.as_str() {
            "" => novacron_devices::virtio::LimitTarget::Device,
            "rx" => novacron_devices::virtio::LimitTarget::Rx,
            "tx" => novacron_devices::virtio::LimitTarget::Tx,
            other => return Err(invalid(format!("direction {other:?} is unknown: use rx, tx or nothing"))),
        };
        if r.device.is_empty() {
            return Err(invalid("the request names no device (e.g. disk0, net0)"));
        }
        let request = VmmRequest::SetLimit { device: r.device, target, bandwidth, ops };
        self.control(&r.name, request, CONTROL_TIMEOUT).await?;
        Ok(Response::new(self.vm(&r.name).await?))
    }

    async fn get_operation(&self, request: Request<pb::OperationRef>) -> Result<Response<pb::Operation>, Status> {
        let id = request.into_inner().id;
        self.operations.get(&id).map(Response::new).ok_or_else(|| {
            Status::not_found(format!("no operation {id:?} on this host (ended ones are kept for a while)"))
        })
    }

    type WatchOperationStream = Stream_<pb::Operation>;

    async fn watch_operation(
        &self,
        request: Request<pb::OperationRef>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        let id = request.into_inner().id;
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
        let host = self.name.clone();
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
        Ok(Response::new(convert::host_to_pb(&info, &self.name, &self.address)))
    }

    async fn cluster_info(&self, _: Request<pb::ClusterInfoRequest>) -> Result<Response<pb::Cluster>, Status> {
        // One daemon is a cluster of one host until hosts join each other.
        let info = ask(&self.host, HostMsg::HostInfo).await?;
        Ok(Response::new(pb::Cluster { hosts: vec![convert::host_to_pb(&info, &self.name, &self.address)] }))
    }
}
