//! The ClusterSupervisor: an actor on the cluster's leader (`ha::leadership`), started for
//! one tenure. It owns the hosts' view: who is in the cluster (`hosts/*` in the cluster
//! store), who is up (whose keeper holds its lease: `alive/*`), and what each holds (a poll
//! of every host every 500 ms, its own included, for phases and capacity). From that view
//! it places new VMs (`actors::placement`), tells the control port which host holds a VM
//! and refuses a second migration of a VM. When a host's lease has been gone for the
//! failover wait, it moves that host's VMs that should run to other hosts: each by a
//! compare-and-swap of its record (this tenure still leads, the host is still gone, the
//! record unchanged) that raises its epoch, then a create on the new host. The old host's
//! guests fenced themselves before that (`docs/ha.md`), and when it comes back its keeper
//! and daemon drop the copies it held (`ha::reconcile`).

use crate::client::Client;
use crate::convert::{self, HostIdentity};
use crate::ha::records as vm_records;
use crate::pb;
use novacron_actors::placement::{HostState as PlacementState, Placement, PlacementRequest, Policy};
use novacron_actors::store::DesiredState;
use novacron_actors::{Capacity, HostMsg, RestartPolicy, VmSpec};
use novacron_cluster::election::Tenure;
use novacron_cluster::events::EventWriter;
use novacron_cluster::records::{self as keys, HostRecord, alive_key, vm_key};
use novacron_cluster::steady::StoreMonitor;
use novacron_cluster::timing::Timing;
use novacron_store::{Compare, Op, Store, Txn};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;

/// How often every host is asked for its state (and the store for the members).
pub const POLL: Duration = Duration::from_millis(500);
/// After a failover wait, a little more, so that the read comes after it has passed.
const LEASE_RECHECK: Duration = Duration::from_millis(10);
/// One poll's longest wait.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a VM or a host is reached: this daemon (`client: None`) or another one.
#[derive(Clone)]
pub struct Route {
    pub host: String,
    pub address: String,
    pub client: Option<Client>,
}

struct Member {
    record: HostRecord,
    client: Option<Client>,
    local: bool,
    /// Its keeper holds its lease.
    up: bool,
    /// Since when this leader has seen its lease gone.
    absent_since: Option<Instant>,
    /// Its VMs were moved elsewhere during this absence.
    failed_over: bool,
    /// Its failover waits for the store to have been steady until then (a read of the
    /// members is due at that time).
    held_until: Option<Instant>,
    /// Its loss of lease is in the event log (so is its return, then).
    logged_down: bool,
    polling: bool,
    /// Its last poll was answered: new VMs may be placed on it.
    answering: bool,
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

    /// Reached, and its daemon answered the last poll: a host whose daemon is gone (its
    /// keeper may still hold the lease) takes nothing new.
    fn placeable(&self) -> bool {
        self.local || (self.client.is_some() && self.answering)
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
    pub policy: Policy,
    pub store: Arc<dyn Store>,
    pub tenure: Tenure,
    pub timing: Timing,
    /// How long the store has answered every read on time (this daemon's, across tenures).
    pub steady: StoreMonitor,
}

pub struct ClusterState {
    args: ClusterArgs,
    members: BTreeMap<String, Member>,
    /// The VM records as last read, for failovers.
    records: Vec<vm_records::Vm>,
    migrating: BTreeSet<String>,
    /// The cluster's event log, as this tenure writes it.
    events: EventWriter,
}

/// The cluster's members and their VMs as the store has them now.
pub struct Membership {
    hosts: Vec<HostRecord>,
    alive: BTreeSet<String>,
    records: Vec<vm_records::Vm>,
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
    /// A host's cordon changed (in the store already): known at once.
    Cordoned {
        host: String,
        cordoned: bool,
    },
    /// Where each VM of a host would go if it were drained (see `plan_drain`).
    PlanDrain(String, RpcReplyPort<Result<Vec<(String, Route)>, Status>>),
    /// Refused while the VM is migrating already.
    MigrationStarting(String, RpcReplyPort<Result<(), Status>>),
    /// A migration ended; when it moved the VM, from which host to which.
    MigrationEnded {
        vm: String,
        moved: Option<(String, String)>,
    },
    #[doc(hidden)]
    Tick,
    /// A lease came or went (the watch of `alive/`), or a failover wait ran out: the
    /// members are read again now, not at the next tick.
    #[doc(hidden)]
    Leases,
    #[doc(hidden)]
    Membership(Box<Result<Membership, String>>),
    #[doc(hidden)]
    Polled {
        host: String,
        started: Instant,
        result: Box<PollResult>,
        client: Option<Client>,
    },
}

pub struct ClusterSupervisor;

/// Tells the supervisor each time a host's lease comes or goes, until the supervisor stops.
/// A watch that breaks (the store away) is opened again; the ticks go on meanwhile.
fn watch_leases(supervisor: ActorRef<ClusterMsg>, store: Arc<dyn Store>) {
    tokio::spawn(async move {
        loop {
            if let Ok(listing) = store.list(keys::ALIVE).await
                && let Ok(mut watch) = store.watch(keys::ALIVE, listing.revision + 1).await
            {
                while watch.next().await.is_ok() {
                    if supervisor.cast(ClusterMsg::Leases).is_err() {
                        return;
                    }
                }
            }
            if supervisor.get_status() != ractor::ActorStatus::Running {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    });
}

fn new_member(record: HostRecord, local: bool) -> Member {
    Member {
        record,
        client: None,
        local,
        up: false,
        absent_since: None,
        failed_over: false,
        held_until: None,
        logged_down: false,
        polling: false,
        answering: false,
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

    /// Reads the members, their leases and the VM records; the answer comes back as
    /// `Membership`.
    fn read_membership(myself: &ActorRef<ClusterMsg>, state: &ClusterState) {
        let (me, store) = (myself.clone(), state.args.store.clone());
        tokio::spawn(async move {
            let read = async {
                let hosts = store.list(keys::HOSTS).await.map_err(|e| e.to_string())?;
                let alive = store.list(keys::ALIVE).await.map_err(|e| e.to_string())?;
                let records = vm_records::list(store.as_ref()).await.map_err(|e| e.message().to_string())?;
                let hosts =
                    hosts.kvs.iter().filter_map(|kv| serde_json::from_slice::<HostRecord>(&kv.value).ok()).collect();
                let alive =
                    alive.kvs.iter().filter_map(|kv| keys::name_of(&kv.key, keys::ALIVE).map(str::to_string)).collect();
                Ok::<_, String>(Membership { hosts, alive, records })
            };
            let _ = me.cast(ClusterMsg::Membership(Box::new(read.await)));
        });
    }

    /// Takes in the store's view of the members: new hosts, who holds a lease; hosts whose
    /// lease has been gone for the failover wait have their VMs moved.
    fn members_read(state: &mut ClusterState, read: Membership, myself: &ActorRef<ClusterMsg>) {
        let now = Instant::now();
        for record in read.hosts {
            let local = record.name == state.args.me.name;
            match state.members.get_mut(&record.name) {
                Some(m) if m.record.address != record.address => {
                    // Restarted on another port: the same host (its absence in the log too).
                    let logged_down = m.logged_down;
                    *m = new_member(record, local);
                    m.logged_down = logged_down;
                }
                Some(m) => m.record = record,
                None => {
                    tracing::info!(host = %record.name, address = %record.address, "a member of the cluster");
                    state.members.insert(record.name.clone(), new_member(record, local));
                }
            }
        }
        state.records = read.records;
        let mut gone = Vec::new();
        for member in state.members.values_mut() {
            let up = read.alive.contains(&member.record.name);
            if up {
                if !member.up {
                    tracing::info!(host = %member.record.name, "host holds its lease: up");
                }
                if std::mem::take(&mut member.logged_down) {
                    let host = &member.record.name;
                    state.events.record("host-up", Some(host), None, format!("host {host} holds its lease again"));
                }
                member.absent_since = None;
                member.failed_over = false;
                member.held_until = None;
            } else {
                if member.up {
                    tracing::warn!(host = %member.record.name, "host's lease is gone: down");
                    let host = &member.record.name;
                    state.events.record("host-down", Some(host), None, format!("host {host}'s lease is gone"));
                    member.logged_down = true;
                }
                if member.absent_since.is_none() {
                    // Read again as soon as the wait has passed, not at the tick after it.
                    let wait = state.args.timing.failover_wait + LEASE_RECHECK;
                    myself.send_after(wait, || ClusterMsg::Leases);
                }
                let since = *member.absent_since.get_or_insert(now);
                let waited = now.duration_since(since) >= state.args.timing.failover_wait;
                // Held while the store was unsteady too recently (see `steady.rs`).
                if !member.failed_over && waited && Self::store_steady(&state.args, &state.events, member, now, myself)
                {
                    member.failed_over = true;
                    member.held_until = None;
                    if !std::mem::replace(&mut member.logged_down, true) {
                        // Gone before this tenure began: logged before its failover.
                        let host = &member.record.name;
                        state.events.record("host-down", Some(host), None, format!("host {host}'s lease is gone"));
                    }
                    gone.push(member.record.name.clone());
                }
            }
            member.up = up;
            let word = match (up, member.record.cordoned) {
                (false, _) => "down",
                (true, true) => "cordoned",
                (true, false) => "up",
            };
            if let Some(info) = &mut member.info {
                info.state = word.into();
            }
        }
        for host in gone {
            Self::fail_over(state, &host, myself);
        }
    }

    /// Whether the store has been steady for S, so that `member`'s failover may go ahead;
    /// if not, a read of the members is due when it will have been.
    fn store_steady(
        args: &ClusterArgs,
        events: &EventWriter,
        member: &mut Member,
        now: Instant,
        myself: &ActorRef<ClusterMsg>,
    ) -> bool {
        let steady = args.steady.steady_for();
        if steady >= args.timing.steady {
            return true;
        }
        if member.held_until.is_none_or(|until| now >= until) {
            let left = args.timing.steady - steady;
            if member.held_until.is_none() {
                let host = &member.record.name;
                let message = format!(
                    "host {host}'s failover waits until the store has answered every read on time for {:?} (it has for {steady:?})",
                    args.timing.steady
                );
                tracing::warn!("{message}");
                events.record("failover-held", Some(host), None, message);
            }
            member.held_until = Some(now + left);
            myself.send_after(left + LEASE_RECHECK, || ClusterMsg::Leases);
        }
        false
    }

    /// Moves the VMs of a host whose lease is gone, that should run, to the others.
    fn fail_over(state: &mut ClusterState, dead: &str, myself: &ActorRef<ClusterMsg>) {
        // Its VMs migrating out too: a target's claim and this move are both guarded by
        // the record, so exactly one of them takes the VM.
        let owned: Vec<vm_records::Vm> = state.records.iter().filter(|r| r.record.owner == dead).cloned().collect();
        tracing::warn!(host = dead, vms = owned.len(), "failing the host's VMs over");
        let message = format!("failing over the VMs of host {dead}: {}", owned.len());
        state.events.record("failover", Some(dead), None, message);
        if let Some(member) = state.members.get_mut(dead) {
            member.vms.clear();
        }
        for vm in owned {
            let name = vm.spec.name.clone();
            if vm.desired != DesiredState::Running || vm.spec.restart == RestartPolicy::Never {
                tracing::info!(vm = %name, host = dead, "not started elsewhere (stopped, or restart policy never)");
                continue;
            }
            let route = match Self::place(state, &PlacementRequest::for_spec(&vm.spec)) {
                Ok(route) => route,
                Err(e) => {
                    tracing::error!(vm = %name, "cannot start it elsewhere: {}", e.message());
                    let message = format!("VM {name} of host {dead} cannot start elsewhere: {}", e.message());
                    state.events.record("stuck", Some(dead), Some(&name), message);
                    continue;
                }
            };
            let placeholder = pb::Vm {
                spec: Some(convert::spec_to_pb(&vm.spec)),
                host: route.host.clone(),
                phase: "starting".into(),
                ..Default::default()
            };
            if let Some(member) = state.members.get_mut(&route.host) {
                member.add(placeholder);
            }
            let (args_store, tenure, host, me) =
                (state.args.store.clone(), state.args.tenure, state.args.host.clone(), state.args.me.name.clone());
            let dead = dead.to_string();
            let (myself, events) = (myself.clone(), state.events.clone());
            tokio::spawn(async move {
                let moved = move_vm(args_store.as_ref(), &tenure, &dead, &vm, &route.host).await;
                match moved {
                    Ok(true) => {
                        let message = format!("VM {name} moved from host {dead} to host {}", route.host);
                        events.record("moved", Some(&route.host), Some(&name), message);
                    }
                    Ok(false) => {
                        tracing::warn!(vm = %name, "not moved: its record or its host's lease changed meanwhile");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(vm = %name, "cannot move it: {}", e.message());
                        return;
                    }
                }
                let request = pb::CreateVmRequest { spec: Some(convert::spec_to_pb(&vm.spec)), start: Some(true) };
                let created = match &route.client {
                    None => crate::service::create_local(&host, request, &me).await,
                    Some(client) => {
                        client.clone().create_vm(crate::service::forwarded(request)).await.map(|r| r.into_inner())
                    }
                };
                match created {
                    Ok(created) => {
                        tracing::warn!(vm = %name, from = %dead, to = %route.host, "started again on another host");
                        let _ = myself.cast(ClusterMsg::Created { host: route.host.clone(), vm: Box::new(created) });
                    }
                    // The new owner's daemon creates it from the record by itself.
                    Err(e) => {
                        tracing::warn!(vm = %name, to = %route.host, "cannot start it there now: {}", e.message())
                    }
                }
            });
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
        let (placement, mut routes) = Self::placement_of(state, eligible)?;
        let id = placement.place(request).map_err(|e| Status::resource_exhausted(e.to_string()))?;
        routes.remove(&id).ok_or_else(|| Status::internal("placement chose a host it was not given"))
    }

    /// The placement of the view: every host that has answered, those that are down,
    /// cordoned or not `eligible` taking nothing new; and where each host is reached.
    fn placement_of(
        state: &ClusterState,
        eligible: impl Fn(&str) -> bool,
    ) -> Result<(Placement, BTreeMap<novacron_actors::placement::HostId, Route>), Status> {
        let mut placement = Placement::new(state.args.policy).map_err(|e| Status::internal(e.to_string()))?;
        let mut routes = BTreeMap::new();
        // A host is placed on while it answers its polls (or is this one).
        for member in state.members.values().filter(|m| m.placeable()) {
            let Some(info) = &member.info else { continue };
            let capacity = Capacity { vcpus: info.cpus, mem_mib: info.mem_mib };
            let Ok(id) = placement.add_host(member.record.name.clone(), capacity, member.record.labels.clone()) else {
                continue;
            };
            if !member.up {
                let _ = placement.set_state(id, PlacementState::Down);
            } else if member.record.cordoned || !eligible(&member.record.name) {
                let _ = placement.set_state(id, PlacementState::Draining);
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
        Ok((placement, routes))
    }

    /// Where each VM of `host` goes when it is drained, all of them placed together; or
    /// which do not fit anywhere else (then nothing may move).
    fn plan_drain(state: &ClusterState, host: &str) -> Result<Vec<(String, Route)>, Status> {
        if !state.members.contains_key(host) {
            return Err(Status::not_found(format!("no host {host:?} in the cluster; see `novacron cluster status`")));
        }
        let (mut placement, routes) = Self::placement_of(state, |name| name != host)?;
        let mut plan = Vec::new();
        let mut refused = Vec::new();
        for vm in state.records.iter().filter(|r| r.record.owner == host && r.record.moving_to.is_none()) {
            let mut request = PlacementRequest::for_spec(&vm.spec);
            // Its own groups on the host it leaves do not count against it.
            request.vm = format!("{} (moving)", vm.spec.name);
            match placement.place(&request) {
                Ok(id) => {
                    let _ = placement.commit(id, &request);
                    if let Some(route) = routes.get(&id) {
                        plan.push((vm.spec.name.clone(), route.clone()));
                    }
                }
                Err(e) => refused.push(format!(
                    "VM {} ({} vCPUs / {} MiB) fits on no other host: {e}",
                    vm.spec.name, vm.spec.vcpus, vm.spec.mem_mib
                )),
            }
        }
        if !refused.is_empty() {
            return Err(Status::failed_precondition(format!(
                "cannot drain host {host}: {}; nothing was moved",
                refused.join("; ")
            )));
        }
        Ok(plan)
    }

    /// The VM's owner by its record; else the host the view last saw it on.
    fn locate(state: &ClusterState, vm: &str) -> Option<Route> {
        let owner = state.records.iter().find(|r| r.spec.name == vm).map(|r| r.record.owner.clone());
        if let Some(member) = owner.and_then(|o| state.members.get(&o)).filter(|m| m.reachable()) {
            return Some(member.route());
        }
        state
            .members
            .values()
            .filter(|m| m.reachable())
            .find(|m| m.vms.iter().any(|v| vm_name(v) == vm))
            .map(Member::route)
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
        let me = HostRecord {
            name: args.me.name.clone(),
            address: args.me.address.clone(),
            labels: args.me.labels.clone(),
            cordoned: false,
        };
        let mut local = new_member(me, true);
        // Known at once, so that VMs can be placed here from the first request.
        match poll_local(&args.host, &args.me).await {
            Ok((info, vms)) => (local.info, local.vms) = (Some(info), vms),
            Err(e) => tracing::warn!("cannot read this host's state yet: {e}"),
        }
        members.insert(local.record.name.clone(), local);
        tracing::info!(tenure = args.tenure.revision, "the cluster supervisor starts for this tenure");
        let events = EventWriter::start(args.store.clone(), args.tenure);
        let message = format!("{} leads the cluster (tenure {})", args.me.name, args.tenure.revision);
        events.record("leading", Some(&args.me.name), None, message);
        let state = ClusterState { args, members, records: Vec::new(), migrating: BTreeSet::new(), events };
        Self::read_membership(&myself, &state);
        myself.send_interval(POLL, || ClusterMsg::Tick);
        watch_leases(myself.clone(), state.args.store.clone());
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<ClusterMsg>,
        msg: ClusterMsg,
        state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMsg::Tick => {
                Self::read_membership(&myself, state);
                Self::poll(&myself, state);
            }
            ClusterMsg::Leases => Self::read_membership(&myself, state),
            ClusterMsg::Membership(read) => match *read {
                Ok(read) => Self::members_read(state, read, &myself),
                Err(e) => tracing::warn!("cannot read the cluster's members from the store: {e}"),
            },
            ClusterMsg::Polled { host, started, result, client } => {
                let Some(member) = state.members.get_mut(&host) else { return Ok(()) };
                member.polling = false;
                member.answering = result.is_ok();
                match *result {
                    Ok((mut info, vms)) => {
                        // Up or down is the lease's word, not the poll's.
                        info.state = match (member.up, member.record.cordoned) {
                            (false, _) => "down".into(),
                            (true, true) => "cordoned".into(),
                            (true, false) => "up".into(),
                        };
                        info.primary = member.local;
                        member.info = Some(info);
                        if client.is_some() {
                            member.client = client;
                        }
                        member.vms = vms;
                        member.recent.retain(|(at, _)| *at > started);
                        for (_, vm) in &member.recent {
                            if !member.vms.iter().any(|v| vm_name(v) == vm_name(vm)) {
                                member.vms.push(vm.clone());
                            }
                        }
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
                let routes = state.members.values().filter(|m| m.up && m.reachable());
                let _ = reply.send(routes.map(Member::route).collect());
            }
            ClusterMsg::Cordoned { host, cordoned } => {
                if let Some(member) = state.members.get_mut(&host) {
                    member.record.cordoned = cordoned;
                }
            }
            ClusterMsg::PlanDrain(host, reply) => {
                let _ = reply.send(Self::plan_drain(state, &host));
            }
            ClusterMsg::CheckTarget { vm, source, target, reply } => {
                let _ = reply.send(Self::check_target(state, &vm, &source, &target));
            }
            ClusterMsg::Cached(host, reply) => {
                let _ = reply.send(state.members.get(&host).map(|m| m.vms.clone()).unwrap_or_default());
            }
            ClusterMsg::MigrationStarting(vm, reply) => {
                let result = if state.migrating.insert(vm.clone()) {
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

/// A host joins (the daemons of this version write their record themselves; this is for
/// a caller that asks): its record goes into the store.
fn join(state: &mut ClusterState, request: pb::JoinRequest) -> Result<pb::JoinReply, Status> {
    convert::name(&request.name)
        .map_err(|_| Status::invalid_argument(format!("host name {:?} is not valid (a-z, 0-9, '-')", request.name)))?;
    if request.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!("address {:?} is not IP:PORT", request.address)));
    }
    if request.leaving {
        // A daemon that stops leaves its keeper running: its VMs run on, nothing to do.
        return Ok(pb::JoinReply { evicted: Vec::new(), primary: state.args.me.name.clone() });
    }
    let record = HostRecord {
        name: request.name.clone(),
        address: request.address,
        labels: request.labels.into_iter().collect(),
        cordoned: false,
    };
    let store = state.args.store.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::ha::write_host_record(store.as_ref(), record).await {
            tracing::warn!("cannot record a joining host: {}", novacron_actors::error_chain(&e));
        }
    });
    Ok(pb::JoinReply { evicted: Vec::new(), primary: state.args.me.name.clone() })
}

/// Moves `vm` from `dead` to `to`: its record's owner and a new epoch, only if this tenure
/// still leads, `dead`'s lease is still gone and the record is as it was read.
async fn move_vm(
    store: &dyn Store,
    tenure: &Tenure,
    dead: &str,
    vm: &vm_records::Vm,
    to: &str,
) -> Result<bool, Status> {
    let mut record = vm.record.clone();
    record.owner = to.to_string();
    record.epoch += 1;
    record.moving_to = None;
    let key = vm_key(&vm.spec.name);
    let value = keys::encode(&key, &record).map_err(|e| Status::internal(e.to_string()))?;
    let txn = Txn::new()
        .when(tenure.guard())
        .when(Compare::absent(alive_key(dead)))
        .when(Compare::unchanged_since(&key, vm.mod_revision))
        .then(Op::put(&key, value));
    let outcome = store.txn(txn).await.map_err(|e| Status::unavailable(e.to_string()))?;
    if outcome.succeeded {
        tracing::warn!(vm = %vm.spec.name, from = dead, to, epoch = record.epoch, "the VM's ownership moved");
    }
    Ok(outcome.succeeded)
}
