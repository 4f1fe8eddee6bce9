//! The ClusterSupervisor: an actor on the cluster's primary daemon (the one started
//! without `--join`). It owns the hosts' view: who is in the cluster, who is up, what
//! each holds (a poll of every host every 500 ms, the primary's own host included). From
//! that view it places new VMs (`actors::placement`), tells the control port which host
//! holds a VM, refuses a second migration of a VM, and when a host stays silent for 3 s
//! it starts that host's VMs again on the others (cold boot from their spec), once: a VM
//! started elsewhere is remembered, and if its old host comes back holding it, the old
//! copy is deleted there (and a re-joining host is told to forget it before it starts).

use crate::client::Client;
use crate::convert::{self, HostIdentity};
use crate::pb;
use novacron_actors::placement::{HostState as PlacementState, Placement, PlacementRequest, Policy};
use novacron_actors::{Capacity, HostMsg, VmSpec};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::Status;

/// How often every host is asked for its state.
pub const POLL: Duration = Duration::from_millis(500);
/// A host not heard from for this long is down; its VMs go elsewhere.
pub const DOWN_AFTER: Duration = Duration::from_secs(3);
/// One poll's longest wait.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// The members file in the primary's data dir.
const MEMBERS_FILE: &str = "cluster-members.json";

/// Where a VM or a host is reached: this daemon (`client: None`) or another one.
#[derive(Clone)]
pub struct Route {
    pub host: String,
    pub address: String,
    pub client: Option<Client>,
}

/// A member as the members file keeps it (the primary's own host is not in it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct MemberRecord {
    name: String,
    address: String,
    labels: BTreeMap<String, String>,
}

struct Member {
    record: MemberRecord,
    client: Option<Client>,
    local: bool,
    last_ok: Instant,
    up: bool,
    /// Its daemon stopped on purpose: not polled for liveness until it joins again.
    away: bool,
    polling: bool,
    info: Option<pb::Host>,
    vms: Vec<pb::Vm>,
    /// VMs created or moved here since a poll began: a poll that started before them
    /// does not know them and must not drop them.
    recent: Vec<(Instant, pb::Vm)>,
}

impl Member {
    /// Has been reached (or is this host): requests can go to it.
    fn reachable(&self) -> bool {
        self.local || self.client.is_some()
    }

    /// A VM that is here now, known before the next poll says so.
    fn add(&mut self, vm: pb::Vm) {
        self.vms.retain(|v| vm_name(v) != vm_name(&vm));
        self.recent.push((Instant::now(), vm.clone()));
        self.vms.push(vm);
    }

    fn route(&self) -> Route {
        Route { host: self.record.name.clone(), address: self.record.address.clone(), client: self.client.clone() }
    }
}

pub struct ClusterArgs {
    pub me: HostIdentity,
    pub host: ActorRef<HostMsg>,
    pub tls_dir: PathBuf,
    pub data_dir: PathBuf,
    pub policy: Policy,
}

pub struct ClusterState {
    args: ClusterArgs,
    members: BTreeMap<String, Member>,
    /// VMs started elsewhere after their host went down: VM -> the host it left.
    moved: BTreeMap<String, String>,
    migrating: BTreeSet<String>,
}

pub enum ClusterMsg {
    Join(pb::JoinRequest, RpcReplyPort<Result<pb::JoinReply, Status>>),
    /// Where a new VM goes.
    Place(Box<VmSpec>, RpcReplyPort<Result<Route, Status>>),
    /// A VM was created (or arrived) on `host`: counted at once, before the next poll.
    Created {
        host: String,
        vm: Box<pb::Vm>,
    },
    /// A VM was deleted: forgotten at once, so that nothing acts on it before the next poll.
    Deleted(String),
    /// The host holding a VM, if any host does.
    Locate(String, RpcReplyPort<Option<Route>>),
    /// A host by name, if it is in the cluster and up.
    HostRoute(String, RpcReplyPort<Option<Route>>),
    /// Every host, up or down.
    Hosts(RpcReplyPort<Vec<pb::Host>>),
    /// Every host that is up.
    Routes(RpcReplyPort<Vec<Route>>),
    /// Checks that `vm` (on `source`) may move to `target` by the placement rules.
    CheckTarget {
        vm: String,
        source: String,
        target: String,
        reply: RpcReplyPort<Result<(), Status>>,
    },
    /// The VMs a host held when it last answered (for hosts that do not answer now).
    Cached(String, RpcReplyPort<Vec<pb::Vm>>),
    /// Refused while the VM is migrating already.
    MigrationStarting(String, RpcReplyPort<Result<(), Status>>),
    /// A migration ended; when it moved the VM, from which host to which.
    MigrationEnded {
        vm: String,
        moved: Option<(String, String)>,
    },
    #[doc(hidden)]
    Tick,
    #[doc(hidden)]
    Polled {
        host: String,
        started: Instant,
        result: Box<PollResult>,
        client: Option<Client>,
    },
}

pub struct ClusterSupervisor;

fn members_path(state: &ClusterState) -> PathBuf {
    state.args.data_dir.join(MEMBERS_FILE)
}

/// Writes the members file (atomically: a new file renamed over the old one).
fn save_members(state: &ClusterState) {
    let records: Vec<&MemberRecord> = state.members.values().filter(|m| !m.local).map(|m| &m.record).collect();
    let path = members_path(state);
    let tmp = path.with_extension("json.new");
    let written = serde_json::to_vec_pretty(&records)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::error!("cannot save the cluster's members to {}: {e}", path.display());
    }
}

fn load_members(path: &std::path::Path) -> Vec<MemberRecord> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!("the members file {} is damaged ({e}); hosts must join again", path.display());
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

fn new_member(record: MemberRecord, local: bool) -> Member {
    Member {
        record,
        client: None,
        local,
        last_ok: Instant::now(),
        up: true,
        away: false,
        polling: false,
        info: None,
        vms: Vec::new(),
        recent: Vec::new(),
    }
}

fn vm_name(vm: &pb::Vm) -> &str {
    vm.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// The size and rules of a VM as a placement request (no file checks: a kernel path is
/// the host's business).
fn request_of(spec: &pb::VmSpec) -> PlacementRequest {
    PlacementRequest {
        groups: spec.groups.clone(),
        required_labels: spec.host_labels.clone().into_iter().collect(),
        affinity: spec.affinity.clone(),
        anti_affinity: spec.anti_affinity.clone(),
        ..PlacementRequest::new(spec.name.clone(), spec.vcpus, spec.mem_mib)
    }
}

impl ClusterSupervisor {
    /// Polls every host that is not being polled already; answers come back as `Polled`.
    fn poll(myself: &ActorRef<ClusterMsg>, state: &mut ClusterState) {
        for member in state.members.values_mut().filter(|m| !m.polling) {
            member.polling = true;
            let me = myself.clone();
            let name = member.record.name.clone();
            let started = Instant::now();
            if member.local {
                let host = state.args.host.clone();
                let identity = state.args.me.clone();
                tokio::spawn(async move {
                    let result = poll_local(&host, &identity).await;
                    let _ = me.cast(ClusterMsg::Polled { host: name, started, result: Box::new(result), client: None });
                });
            } else {
                let (client, address, tls_dir) =
                    (member.client.clone(), member.record.address.clone(), state.args.tls_dir.clone());
                tokio::spawn(async move {
                    let (result, client) = poll_remote(client, &address, tls_dir).await;
                    let _ = me.cast(ClusterMsg::Polled { host: name, started, result: Box::new(result), client });
                });
            }
        }
    }

    /// Hosts silent for longer than `DOWN_AFTER` go down; their VMs go elsewhere.
    async fn check_liveness(state: &mut ClusterState) {
        let now = Instant::now();
        let dead: Vec<String> = state
            .members
            .values()
            .filter(|m| m.up && !m.local && !m.away && now.duration_since(m.last_ok) > DOWN_AFTER)
            .map(|m| m.record.name.clone())
            .collect();
        for name in dead {
            let Some(member) = state.members.get_mut(&name) else { continue };
            member.up = false;
            if let Some(info) = &mut member.info {
                info.state = "down".into();
            }
            let vms = std::mem::take(&mut member.vms);
            tracing::warn!(host = %name, vms = vms.len(), "host not heard from for {DOWN_AFTER:?}: down");
            for vm in vms {
                Self::fail_over(state, &name, vm).await;
            }
        }
    }

    /// Starts a dead host's VM on another host, if its policy wants it running.
    async fn fail_over(state: &mut ClusterState, dead: &str, vm: pb::Vm) {
        let Some(spec) = vm.spec.clone() else { return };
        let policy = spec.restart.as_ref().map_or("on-failure", |r| r.kind.as_str());
        let wanted = matches!(vm.phase.as_str(), "running" | "paused" | "starting");
        if !wanted || policy == "never" || state.moved.contains_key(&spec.name) {
            tracing::info!(vm = %spec.name, host = dead, phase = %vm.phase, policy, "not started elsewhere");
            return;
        }
        let route = match Self::place(state, &request_of(&spec)) {
            Ok(route) => route,
            Err(e) => {
                tracing::error!(vm = %spec.name, "cannot start it elsewhere: {}", e.message());
                return;
            }
        };
        let request = pb::CreateVmRequest { spec: Some(spec.clone()), start: Some(true) };
        let created = match &route.client {
            None => crate::service::create_local(&state.args.host, request, &state.args.me.name).await,
            Some(client) => client.clone().create_vm(crate::service::forwarded(request)).await.map(|r| r.into_inner()),
        };
        match created {
            Ok(created) => {
                tracing::warn!(vm = %spec.name, from = dead, to = %route.host, "started again on another host");
                state.moved.insert(spec.name.clone(), dead.to_string());
                if let Some(member) = state.members.get_mut(&route.host) {
                    member.add(created);
                }
            }
            Err(e) => tracing::error!(vm = %spec.name, to = %route.host, "cannot start it there: {}", e.message()),
        }
    }

    /// Whether `vm` fits on `target` by capacity and rules (its source excluded).
    fn check_target(state: &ClusterState, vm: &str, source: &str, target: &str) -> Result<(), Status> {
        let spec = state
            .members
            .get(source)
            .and_then(|m| m.vms.iter().find(|v| vm_name(v) == vm))
            .and_then(|v| v.spec.clone())
            .ok_or_else(|| Status::not_found(format!("no VM named {vm:?} on host {source}")))?;
        let mut request = request_of(&spec);
        // Its own groups on its source do not count against it.
        request.vm = format!("{vm} (moving)");
        Self::place_among(state, &request, |name| name == target)
            .map(|_| ())
            .map_err(|e| Status::failed_precondition(format!("VM {vm} cannot move to host {target}: {}", e.message())))
    }

    /// The host for `request` among the hosts that are up, by the placement rules.
    fn place(state: &ClusterState, request: &PlacementRequest) -> Result<Route, Status> {
        Self::place_among(state, request, |_| true)
    }

    /// As `place`, among the hosts `eligible` accepts.
    fn place_among(
        state: &ClusterState,
        request: &PlacementRequest,
        eligible: impl Fn(&str) -> bool,
    ) -> Result<Route, Status> {
        let mut placement = Placement::new(state.args.policy).map_err(|e| Status::internal(e.to_string()))?;
        let mut routes = BTreeMap::new();
        // A host is placed on once it has answered a poll (so it has a client, or is this one).
        for member in state.members.values().filter(|m| m.reachable()) {
            let Some(info) = &member.info else { continue };
            let capacity = Capacity { vcpus: info.cpus, mem_mib: info.mem_mib };
            let Ok(id) = placement.add_host(member.record.name.clone(), capacity, member.record.labels.clone()) else {
                continue;
            };
            if !member.up || !eligible(&member.record.name) {
                let _ = placement.set_state(id, PlacementState::Down);
            }
            // Every VM a host holds counts, stopped ones too: they keep their share.
            for vm in &member.vms {
                if let Some(spec) = &vm.spec {
                    // A VM counted twice (a poll racing a create) is counted once.
                    let _ = placement.commit(id, &request_of(spec));
                }
            }
            routes.insert(id, member.route());
        }
        let id = placement.place(request).map_err(|e| Status::resource_exhausted(e.to_string()))?;
        routes.remove(&id).ok_or_else(|| Status::internal("placement chose a host it was not given"))
    }

    fn locate(state: &ClusterState, vm: &str) -> Option<Route> {
        state
            .members
            .values()
            .filter(|m| m.reachable())
            // A stopped daemon's VMs still exist: asked for, its last report answers.
            .find(|m| (m.up || m.away) && m.vms.iter().any(|v| vm_name(v) == vm))
            .map(Member::route)
    }

    /// VMs a host reports that the cluster started elsewhere while it was away: deleted
    /// there, so that each VM runs once.
    fn fence(state: &ClusterState, host: &str, vms: &[pb::Vm], client: Option<Client>) {
        for vm in vms {
            let name = vm_name(vm);
            if state.moved.get(name).is_some_and(|left| left == host) {
                tracing::warn!(
                    vm = name,
                    host,
                    "the host came back holding a VM that now runs elsewhere; deleting it there"
                );
                let request = pb::VmRef { name: name.to_string() };
                match client.clone() {
                    Some(mut c) => {
                        tokio::spawn(async move {
                            let _ = c.delete_vm(crate::service::forwarded(request)).await;
                        });
                    }
                    None => {
                        let host = state.args.host.clone();
                        tokio::spawn(async move {
                            let _ = ractor::call!(host, HostMsg::DeleteVm, request.name);
                        });
                    }
                }
            }
        }
    }
}

async fn poll_local(host: &ActorRef<HostMsg>, me: &HostIdentity) -> Result<(pb::Host, Vec<pb::Vm>), String> {
    let timeout = POLL_TIMEOUT.as_millis() as u64;
    let info = ractor::call_t!(host, HostMsg::HostInfo, timeout).map_err(|e| e.to_string())?;
    let vms = ractor::call_t!(host, HostMsg::ListVms, timeout).map_err(|e| e.to_string())?;
    Ok((convert::host_to_pb(&info, me), vms.iter().map(|v| convert::vm_to_pb(v, &me.name)).collect()))
}

type PollResult = Result<(pb::Host, Vec<pb::Vm>), String>;

async fn poll_remote(client: Option<Client>, address: &str, tls_dir: PathBuf) -> (PollResult, Option<Client>) {
    let mut client = match client {
        Some(c) => c,
        None => {
            let connect = crate::client::Connect { endpoint: address.to_string(), tls_dir, token: None };
            match tokio::time::timeout(POLL_TIMEOUT, connect.connect()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return (Err(novacron_actors::error_chain(&e)), None),
                Err(_) => return (Err("connect timed out".into()), None),
            }
        }
    };
    let calls = async {
        let info = client.host_info(crate::service::forwarded(pb::HostInfoRequest {})).await?.into_inner();
        let vms = client.list_vms(crate::service::forwarded(pb::ListVmsRequest {})).await?.into_inner().vms;
        Ok::<_, Status>((info, vms))
    };
    match tokio::time::timeout(POLL_TIMEOUT, calls).await {
        Ok(Ok(answer)) => (Ok(answer), Some(client)),
        Ok(Err(status)) => (Err(status.message().to_string()), None),
        Err(_) => (Err("no answer".into()), None),
    }
}

impl Actor for ClusterSupervisor {
    type Msg = ClusterMsg;
    type State = ClusterState;
    type Arguments = ClusterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ClusterMsg>,
        args: ClusterArgs,
    ) -> Result<ClusterState, ActorProcessingErr> {
        let mut members = BTreeMap::new();
        let me = MemberRecord {
            name: args.me.name.clone(),
            address: args.me.address.clone(),
            labels: args.me.labels.clone(),
        };
        let mut local = new_member(me, true);
        // Known at once, so that VMs can be placed here from the first request.
        match poll_local(&args.host, &args.me).await {
            Ok((info, vms)) => (local.info, local.vms) = (Some(info), vms),
            Err(e) => tracing::warn!("cannot read this host's state yet: {e}"),
        }
        members.insert(local.record.name.clone(), local);
        for record in load_members(&args.data_dir.join(MEMBERS_FILE)) {
            tracing::info!(host = %record.name, address = %record.address, "a member of the cluster, from the members file");
            members.insert(record.name.clone(), new_member(record, false));
        }
        myself.send_interval(POLL, || ClusterMsg::Tick);
        Ok(ClusterState { args, members, moved: BTreeMap::new(), migrating: BTreeSet::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<ClusterMsg>,
        msg: ClusterMsg,
        state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMsg::Tick => {
                Self::check_liveness(state).await;
                Self::poll(&myself, state);
            }
            ClusterMsg::Polled { host, started, result, client } => {
                let Some(member) = state.members.get_mut(&host) else { return Ok(()) };
                member.polling = false;
                match *result {
                    Ok(_) if member.away => {}
                    Ok((mut info, vms)) => {
                        if !member.up {
                            tracing::info!(host = %host, "host is up again");
                        }
                        info.state = "up".into();
                        info.primary = member.local;
                        member.up = true;
                        member.last_ok = Instant::now();
                        member.info = Some(info);
                        if client.is_some() {
                            member.client = client.clone();
                        }
                        let vms_copy = vms.clone();
                        member.vms = vms;
                        member.recent.retain(|(at, _)| *at > started);
                        for (_, vm) in &member.recent {
                            if !member.vms.iter().any(|v| vm_name(v) == vm_name(vm)) {
                                member.vms.push(vm.clone());
                            }
                        }
                        Self::fence(state, &host, &vms_copy, client);
                    }
                    // The client is kept: its channel reconnects by itself.
                    Err(e) => tracing::debug!(host = %host, "poll failed: {e}"),
                }
            }
            ClusterMsg::Join(request, reply) => {
                let result = join(state, request);
                let _ = reply.send(result);
                // Reached now rather than at the next tick.
                Self::poll(&myself, state);
            }
            ClusterMsg::Place(spec, reply) => {
                let _ = reply.send(Self::place(state, &PlacementRequest::for_spec(&spec)));
            }
            ClusterMsg::Created { host, vm } => {
                // A VM is on one host: wherever the view had it before, it is not there.
                for member in state.members.values_mut().filter(|m| m.record.name != host) {
                    member.vms.retain(|v| vm_name(v) != vm_name(&vm));
                    member.recent.retain(|(_, v)| vm_name(v) != vm_name(&vm));
                }
                if let Some(member) = state.members.get_mut(&host) {
                    member.add(*vm);
                }
            }
            ClusterMsg::Deleted(vm) => {
                for member in state.members.values_mut() {
                    member.vms.retain(|v| vm_name(v) != vm);
                    member.recent.retain(|(_, v)| vm_name(v) != vm);
                }
            }
            ClusterMsg::Locate(vm, reply) => {
                let _ = reply.send(Self::locate(state, &vm));
            }
            ClusterMsg::HostRoute(name, reply) => {
                let route = state.members.get(&name).filter(|m| m.up && m.reachable());
                let _ = reply.send(route.map(Member::route));
            }
            ClusterMsg::Hosts(reply) => {
                let hosts = state
                    .members
                    .values()
                    .map(|m| {
                        m.info.clone().unwrap_or_else(|| pb::Host {
                            name: m.record.name.clone(),
                            address: m.record.address.clone(),
                            state: if m.up { "joining".into() } else { "down".into() },
                            ..Default::default()
                        })
                    })
                    .collect();
                let _ = reply.send(hosts);
            }
            ClusterMsg::Routes(reply) => {
                let routes = state.members.values().filter(|m| (m.up || m.away) && m.reachable());
                let _ = reply.send(routes.map(Member::route).collect());
            }
            ClusterMsg::CheckTarget { vm, source, target, reply } => {
                let _ = reply.send(Self::check_target(state, &vm, &source, &target));
            }
            ClusterMsg::Cached(host, reply) => {
                let _ = reply.send(state.members.get(&host).map(|m| m.vms.clone()).unwrap_or_default());
            }
            ClusterMsg::MigrationStarting(vm, reply) => {
                let result = if state.migrating.insert(vm.clone()) {
                    // Wherever it lands now is where it belongs.
                    state.moved.remove(&vm);
                    Ok(())
                } else {
                    Err(Status::failed_precondition(format!(
                        "VM {vm} is migrating already; wait for that migration to end (`novacron vm operation ID`)"
                    )))
                };
                let _ = reply.send(result);
            }
            ClusterMsg::MigrationEnded { vm, moved } => {
                state.migrating.remove(&vm);
                if let Some((from, to)) = moved {
                    let taken = state.members.get_mut(&from).and_then(|m| {
                        let i = m.vms.iter().position(|v| vm_name(v) == vm)?;
                        Some(m.vms.remove(i))
                    });
                    if let (Some(mut entry), Some(member)) = (taken, state.members.get_mut(&to)) {
                        entry.host = to.clone();
                        member.add(entry);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A host joins (or joins again): recorded, polled from now on, and told which of its VMs
/// run elsewhere now.
fn join(state: &mut ClusterState, request: pb::JoinRequest) -> Result<pb::JoinReply, Status> {
    convert::name(&request.name)
        .map_err(|_| Status::invalid_argument(format!("host name {:?} is not valid (a-z, 0-9, '-')", request.name)))?;
    if request.name == state.args.me.name {
        return Err(Status::already_exists(format!(
            "{} is the primary's own name; give the joining daemon another --name",
            request.name
        )));
    }
    if request.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!("address {:?} is not IP:PORT", request.address)));
    }
    let record = MemberRecord {
        name: request.name.clone(),
        address: request.address,
        labels: request.labels.into_iter().collect(),
    };
    if request.leaving {
        let member = state
            .members
            .get_mut(&request.name)
            .ok_or_else(|| Status::not_found(format!("host {} is not in the cluster", request.name)))?;
        member.away = true;
        member.up = false;
        if let Some(info) = &mut member.info {
            info.state = "stopped".into();
        }
        tracing::info!(host = %request.name, "host's daemon stops on purpose; its VMs are left where they are");
        return Ok(pb::JoinReply { evicted: Vec::new(), primary: state.args.me.name.clone() });
    }
    let evicted: Vec<String> =
        request.vms.into_iter().filter(|vm| state.moved.get(vm).is_some_and(|left| *left == request.name)).collect();
    let known = state.members.get(&record.name).map(|m| m.record.clone());
    if known.as_ref() != Some(&record) {
        // New, or back at another address: a new client; what it held stays known.
        let vms = state.members.remove(&record.name).map(|m| m.vms).unwrap_or_default();
        let mut member = new_member(record.clone(), false);
        member.vms = vms;
        state.members.insert(record.name.clone(), member);
        save_members(state);
    } else if let Some(member) = state.members.get_mut(&record.name) {
        // It just spoke: up (the next poll brings its figures).
        member.last_ok = Instant::now();
        member.away = false;
        member.up = true;
        if let Some(info) = &mut member.info {
            info.state = "up".into();
        }
    }
    tracing::info!(host = %record.name, address = %record.address, evicted = evicted.len(), "host joined");
    Ok(pb::JoinReply { evicted, primary: state.args.me.name.clone() })
}
