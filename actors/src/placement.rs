//! Placement: which host a new VM (or a migrating one) goes to. Pure data and arithmetic,
//! no I/O and no clock, so the ClusterSupervisor owns one [`Placement`] as part of its
//! state and calls it from its handlers.
//!
//! # The inventory
//!
//! A host has a name, its capacity (vCPUs, memory MiB), labels (`zone=a`), a
//! [`HostState`] and the VMs recorded on it (name, size, group labels such as `app=web`).
//! Allocations change only through [`Placement::commit`] and [`Placement::release`], by
//! exactly the sizes recorded, so they never drift.
//!
//! # The rules, in the order a host is checked
//!
//! 1. **Excluded**: the request's `exclude` host (a migrating VM's current host) is never
//!    chosen.
//! 2. **State**: only `Ready` hosts take VMs; `Draining` and `Down` ones never do.
//! 3. **Labels**: every label in `required_labels` must be on the host with that value.
//! 4. **Anti-affinity**: a host that holds any VM with one of the request's
//!    `anti_affinity` groups is refused (e.g. replicas of one service, each carrying and
//!    avoiding `app=web`, land on different hosts).
//! 5. **Required affinity**: the host must hold a VM of every group in `affinity`. A group
//!    that no host holds yet is waived when the request carries that group itself, so the
//!    first member of a co-located set can be placed anywhere.
//! 6. **Capacity**: the VM must fit in what is left of the host's limit, where the limit is
//!    the capacity times the policy's overcommit ratio, in thousandths and rounded down
//!    (`cpu_overcommit_permille: 4000` lets 8 CPUs carry 32 vCPUs). Integer arithmetic
//!    only, so a fit is exact.
//!
//! A host refused by a rule is counted under that rule only; [`PlacementError::NoHostFits`]
//! lists the counts, and for full hosts the most vCPUs and memory any of them has free.
//!
//! # Choosing among the hosts that pass
//!
//! 1. The most `preferred_affinity` groups present on the host (a preference only: with
//!    none present anywhere it falls back to the rest).
//! 2. The strategy, on the load the host would have with the VM: the sum of its vCPU and
//!    memory use, each in millionths of the host's limit. `Spread` takes the least loaded,
//!    `Binpack` the most loaded.
//! 3. The host name, smallest first, so the same inventory always gives the same answer.
//!
//! `place` only chooses; the caller commits the choice once the host has admitted the VM
//! (the HostSupervisor's admission is still the final check on the host).
//!
//! # Cost
//!
//! Label and group names are interned to integers when hosts and VMs are recorded; each
//! host keeps a count per group, so rules 3 to 5 cost one small lookup per host and a
//! decision is one pass over the hosts, independent of the number of VMs
//! (`cargo bench -p novacron-benches --bench placement`).

use crate::host::Capacity;
use crate::spec::VmSpec;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Largest overcommit ratio accepted: 100.0.
pub const MAX_OVERCOMMIT_PERMILLE: u32 = 100_000;

/// A host in one [`Placement`]. Ids are never reused, so a stale id is refused rather than
/// taken for another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(u32);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host #{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Ready,
    /// Takes no new VMs; its VMs are being moved away.
    Draining,
    /// Not heard from; takes nothing.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Least loaded host first.
    Spread,
    /// Most loaded host that fits first.
    Binpack,
}

/// The cluster's placement policy. Ratios are in thousandths: 1000 is 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub cpu_overcommit_permille: u32,
    pub mem_overcommit_permille: u32,
    pub strategy: Strategy,
}

impl Default for Policy {
    /// vCPUs overcommitted 4 to 1, memory not at all, spread.
    fn default() -> Self {
        Policy { cpu_overcommit_permille: 4000, mem_overcommit_permille: 1000, strategy: Strategy::Spread }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), PlacementError> {
        for (what, permille) in [("cpu", self.cpu_overcommit_permille), ("memory", self.mem_overcommit_permille)] {
            if !(1..=MAX_OVERCOMMIT_PERMILLE).contains(&permille) {
                return Err(PlacementError::Overcommit { what, permille });
            }
        }
        Ok(())
    }
}

/// What a VM needs from its host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementRequest {
    pub vm: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The VM's own group labels (`app=web`), recorded with it on commit.
    pub groups: Vec<String>,
    /// Labels the host must have, all of them.
    pub required_labels: BTreeMap<String, String>,
    /// Groups the host must already hold a VM of (rule 5 of the module doc).
    pub affinity: Vec<String>,
    /// Groups whose hosts are preferred, if any of them fits.
    pub preferred_affinity: Vec<String>,
    /// Groups the host must hold no VM of.
    pub anti_affinity: Vec<String>,
    /// A host never to choose: the VM's current one when looking for a migration target.
    pub exclude: Option<HostId>,
}

impl PlacementRequest {
    pub fn new(vm: impl Into<String>, vcpus: u32, mem_mib: u64) -> Self {
        PlacementRequest { vm: vm.into(), vcpus, mem_mib, ..Default::default() }
    }

    /// The size and placement rules of a spec.
    pub fn for_spec(spec: &VmSpec) -> Self {
        let rules = &spec.placement;
        PlacementRequest {
            groups: rules.groups.clone(),
            required_labels: rules.host_labels.clone(),
            affinity: rules.affinity.clone(),
            anti_affinity: rules.anti_affinity.clone(),
            ..Self::new(spec.name.clone(), u32::from(spec.vcpus), spec.mem_mib)
        }
    }

    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.groups.push(group.into());
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.required_labels.insert(key.into(), value.into());
        self
    }

    pub fn affinity(mut self, group: impl Into<String>) -> Self {
        self.affinity.push(group.into());
        self
    }

    pub fn prefer(mut self, group: impl Into<String>) -> Self {
        self.preferred_affinity.push(group.into());
        self
    }

    pub fn anti_affinity(mut self, group: impl Into<String>) -> Self {
        self.anti_affinity.push(group.into());
        self
    }

    pub fn exclude(mut self, host: HostId) -> Self {
        self.exclude = Some(host);
        self
    }
}

/// A VM as recorded on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedVm {
    pub vcpus: u32,
    pub mem_mib: u64,
    pub groups: Vec<String>,
}

/// Hashes interned ids (small integers) with one multiplication; std's SipHash costs
/// more than the whole rest of a host's check.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// One host of the inventory.
#[derive(Debug, Clone)]
pub struct Host {
    name: String,
    capacity: Capacity,
    labels: BTreeMap<String, String>,
    state: HostState,
    vms: BTreeMap<String, PlacedVm>,
    allocated: Capacity,
    /// Capacity times the overcommit ratios.
    limit: Capacity,
    /// Interned `labels`, sorted.
    label_ids: Vec<u32>,
    /// VMs on this host per interned group.
    group_counts: IdMap<u32>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// What the recorded VMs hold.
    pub fn allocated(&self) -> Capacity {
        self.allocated
    }

    /// The capacity with the policy's overcommit.
    pub fn limit(&self) -> Capacity {
        self.limit
    }

    /// What is left of the limit.
    pub fn free(&self) -> Capacity {
        Capacity {
            vcpus: self.limit.vcpus.saturating_sub(self.allocated.vcpus),
            mem_mib: self.limit.mem_mib.saturating_sub(self.allocated.mem_mib),
        }
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    pub fn state(&self) -> HostState {
        self.state
    }

    /// The recorded VMs, by name.
    pub fn vms(&self) -> &BTreeMap<String, PlacedVm> {
        &self.vms
    }

    fn set_limit(&mut self, policy: &Policy) {
        let scale = |v: u64, permille: u32| u64::try_from(u128::from(v) * u128::from(permille) / 1000);
        self.limit = Capacity {
            vcpus: scale(u64::from(self.capacity.vcpus), policy.cpu_overcommit_permille)
                .map_or(u32::MAX, |v| u32::try_from(v).unwrap_or(u32::MAX)),
            mem_mib: scale(self.capacity.mem_mib, policy.mem_overcommit_permille).unwrap_or(u64::MAX),
        };
    }

    fn holds(&self, group: u32) -> bool {
        self.group_counts.get(&group).is_some_and(|&n| n > 0)
    }
}

/// Why no host was chosen: each host counted under the first rule that refused it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rejections {
    pub excluded: u32,
    pub down_or_draining: u32,
    pub missing_labels: u32,
    pub anti_affinity: u32,
    pub affinity: u32,
    pub full: u32,
    /// The most vCPUs and the most memory free on any full host (not necessarily the same
    /// host).
    pub largest_free_vcpus: u32,
    pub largest_free_mem_mib: u64,
    /// The request's rules, as `k=v` lists, for the message.
    pub labels: String,
    pub anti_affinity_groups: String,
    pub affinity_groups: String,
}

impl fmt::Display for Rejections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts = |n: u32| if n == 1 { "1 host".to_string() } else { format!("{n} hosts") };
        let verb = |n: u32, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        let mut parts = Vec::new();
        if self.excluded > 0 {
            parts.push(format!("{} excluded (the VM's current host)", hosts(self.excluded)));
        }
        if self.down_or_draining > 0 {
            parts.push(format!("{} down or draining", hosts(self.down_or_draining)));
        }
        if self.missing_labels > 0 {
            let n = self.missing_labels;
            parts.push(format!("{} {} label {}", hosts(n), verb(n, "lacks", "lack"), self.labels));
        }
        if self.anti_affinity > 0 {
            let n = self.anti_affinity;
            let hold = verb(n, "holds", "hold");
            parts.push(format!("{} {hold} a VM of anti-affinity group {}", hosts(n), self.anti_affinity_groups));
        }
        if self.affinity > 0 {
            let n = self.affinity;
            let hold = verb(n, "holds", "hold");
            parts.push(format!("{} {hold} no VM of affinity group {}", hosts(n), self.affinity_groups));
        }
        if self.full > 0 {
            parts.push(format!(
                "{} full (largest free: {} vCPUs, {} MiB)",
                hosts(self.full),
                self.largest_free_vcpus,
                self.largest_free_mem_mib
            ));
        }
        write!(f, "{}", parts.join(", "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no host fits VM {vm} ({vcpus} vCPUs / {mem_mib} MiB): {why}")]
    NoHostFits { vm: String, vcpus: u32, mem_mib: u64, why: Box<Rejections> },
    #[error("no hosts to place VM {0} on; wait for hosts to join the cluster")]
    NoHosts(String),
    #[error("VM {vm} asks for {vcpus} vCPUs and {mem_mib} MiB; both must be at least 1")]
    EmptyRequest { vm: String, vcpus: u32, mem_mib: u64 },
    #[error("a {what} overcommit of {permille}/1000 is out of range; use 1 to {MAX_OVERCOMMIT_PERMILLE} (1000 is 1.0)")]
    Overcommit { what: &'static str, permille: u32 },
    #[error("{0} is not in the inventory (removed?); look the host up again by name")]
    UnknownHost(HostId),
    #[error("a host named {0:?} is already in the inventory; remove it first or use another name")]
    DuplicateHost(String),
    #[error("VM {vm} is already placed on host {host}; release it there first")]
    AlreadyPlaced { vm: String, host: String },
    #[error("VM {0} is not placed on any host")]
    NotPlaced(String),
    #[error("host {host} still holds {vms} VMs; release or move them first")]
    HostNotEmpty { host: String, vms: usize },
}

/// The hosts' view and the placement decisions over it. See the module doc for the rules.
#[derive(Debug, Clone)]
pub struct Placement {
    policy: Policy,
    /// By `HostId`; `None` once removed (ids are not reused).
    hosts: Vec<Option<Host>>,
    /// Host name to id; its order is the tie-break order.
    by_name: BTreeMap<String, HostId>,
    /// The live host ids in name order: the order of every scan.
    order: Vec<HostId>,
    /// Where each recorded VM is.
    vm_host: HashMap<String, HostId>,
    /// Interned host labels: key, then value.
    label_ids: HashMap<String, HashMap<String, u32>>,
    next_label: u32,
    /// Interned VM groups, and how many recorded VMs carry each, cluster-wide.
    group_ids: HashMap<String, u32>,
    group_totals: Vec<u32>,
}

impl Placement {
    pub fn new(policy: Policy) -> Result<Self, PlacementError> {
        policy.validate()?;
        Ok(Placement {
            policy,
            hosts: Vec::new(),
            by_name: BTreeMap::new(),
            order: Vec::new(),
            vm_host: HashMap::new(),
            label_ids: HashMap::new(),
            next_label: 0,
            group_ids: HashMap::new(),
            group_totals: Vec::new(),
        })
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Changes the policy; the hosts' limits follow. Hosts may end up over their new limit:
    /// they keep their VMs and take no more until enough are released.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), PlacementError> {
        policy.validate()?;
        self.policy = policy;
        for host in self.hosts.iter_mut().flatten() {
            host.set_limit(&policy);
        }
        Ok(())
    }

    /// Adds a `Ready` host with no VMs.
    pub fn add_host(
        &mut self,
        name: impl Into<String>,
        capacity: Capacity,
        labels: BTreeMap<String, String>,
    ) -> Result<HostId, PlacementError> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(PlacementError::DuplicateHost(name));
        }
        let id = HostId(u32::try_from(self.hosts.len()).unwrap_or(u32::MAX));
        let mut label_ids: Vec<u32> = labels.iter().map(|(k, v)| self.intern_label(k, v)).collect();
        label_ids.sort_unstable();
        let mut host = Host {
            name: name.clone(),
            capacity,
            labels,
            state: HostState::Ready,
            vms: BTreeMap::new(),
            allocated: Capacity { vcpus: 0, mem_mib: 0 },
            limit: capacity,
            label_ids,
            group_counts: IdMap::default(),
        };
        host.set_limit(&self.policy);
        self.hosts.push(Some(host));
        self.by_name.insert(name, id);
        self.order = self.by_name.values().copied().collect();
        Ok(id)
    }

    /// Removes a host that holds no VMs.
    pub fn remove_host(&mut self, id: HostId) -> Result<Host, PlacementError> {
        let host = self.host(id).ok_or(PlacementError::UnknownHost(id))?;
        if !host.vms.is_empty() {
            return Err(PlacementError::HostNotEmpty { host: host.name.clone(), vms: host.vms.len() });
        }
        let host = self.slot(id)?.take().ok_or(PlacementError::UnknownHost(id))?;
        self.by_name.remove(&host.name);
        self.order = self.by_name.values().copied().collect();
        Ok(host)
    }

    pub fn set_state(&mut self, id: HostId, state: HostState) -> Result<(), PlacementError> {
        self.host_mut(id)?.state = state;
        Ok(())
    }

    pub fn host(&self, id: HostId) -> Option<&Host> {
        self.hosts.get(id.0 as usize)?.as_ref()
    }

    pub fn host_id(&self, name: &str) -> Option<HostId> {
        self.by_name.get(name).copied()
    }

    /// All hosts, by name.
    pub fn hosts(&self) -> impl Iterator<Item = (HostId, &Host)> {
        self.order.iter().filter_map(|&id| Some((id, self.host(id)?)))
    }

    /// The host a VM is recorded on.
    pub fn vm_host(&self, vm: &str) -> Option<HostId> {
        self.vm_host.get(vm).copied()
    }

    /// The best host for `req` by the module doc's rules, or why there is none. Changes
    /// nothing: [`Placement::commit`] records the VM once its host has taken it.
    pub fn place(&self, req: &PlacementRequest) -> Result<HostId, PlacementError> {
        if req.vcpus == 0 || req.mem_mib == 0 {
            return Err(PlacementError::EmptyRequest { vm: req.vm.clone(), vcpus: req.vcpus, mem_mib: req.mem_mib });
        }
        if self.order.is_empty() {
            return Err(PlacementError::NoHosts(req.vm.clone()));
        }
        // Names to ids once per decision. A label or group nobody has interned is on no host.
        let labels: Option<Vec<u32>> =
            req.required_labels.iter().map(|(k, v)| self.label_ids.get(k.as_str())?.get(v.as_str()).copied()).collect();
        let anti: Vec<u32> = req.anti_affinity.iter().filter_map(|g| self.group_ids.get(g.as_str()).copied()).collect();
        let preferred: Vec<u32> =
            req.preferred_affinity.iter().filter_map(|g| self.group_ids.get(g.as_str()).copied()).collect();
        let mut affinity = Vec::with_capacity(req.affinity.len());
        let mut affinity_unmet = false;
        for group in &req.affinity {
            match self.group_ids.get(group.as_str()).copied().filter(|&g| self.group_total(g) > 0) {
                Some(g) => affinity.push(g),
                // Nobody holds it yet: the VM's own group starts it (waived); anyone else waits.
                None if req.groups.contains(group) => {}
                None => affinity_unmet = true,
            }
        }

        let mut why = Rejections::default();
        // (preferred groups present, strategy score): the largest wins; ties keep the
        // earlier host, which is the smaller name.
        let mut best: Option<(HostId, (usize, u64))> = None;
        for &id in &self.order {
            let Some(host) = self.host(id) else { continue };
            if req.exclude == Some(id) {
                why.excluded += 1;
                continue;
            }
            if host.state != HostState::Ready {
                why.down_or_draining += 1;
                continue;
            }
            if !labels.as_ref().is_some_and(|ls| ls.iter().all(|l| host.label_ids.contains(l))) {
                why.missing_labels += 1;
                continue;
            }
            if anti.iter().any(|&g| host.holds(g)) {
                why.anti_affinity += 1;
                continue;
            }
            if affinity_unmet || !affinity.iter().all(|&g| host.holds(g)) {
                why.affinity += 1;
                continue;
            }
            let free = host.free();
            if req.vcpus > free.vcpus || req.mem_mib > free.mem_mib {
                why.full += 1;
                why.largest_free_vcpus = why.largest_free_vcpus.max(free.vcpus);
                why.largest_free_mem_mib = why.largest_free_mem_mib.max(free.mem_mib);
                continue;
            }
            let load = millionths(u64::from(host.allocated.vcpus) + u64::from(req.vcpus), u64::from(host.limit.vcpus))
                + millionths(host.allocated.mem_mib.saturating_add(req.mem_mib), host.limit.mem_mib);
            let score = match self.policy.strategy {
                Strategy::Spread => u64::MAX - load,
                Strategy::Binpack => load,
            };
            let key = (preferred.iter().filter(|&&g| host.holds(g)).count(), score);
            if best.is_none_or(|(_, b)| key > b) {
                best = Some((id, key));
            }
        }
        if let Some((id, _)) = best {
            return Ok(id);
        }
        why.labels = req.required_labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        why.anti_affinity_groups = req.anti_affinity.join(",");
        why.affinity_groups = req.affinity.join(",");
        Err(PlacementError::NoHostFits {
            vm: req.vm.clone(),
            vcpus: req.vcpus,
            mem_mib: req.mem_mib,
            why: Box::new(why),
        })
    }

    /// Records `req`'s VM on `host`: its size joins the host's allocation and its groups
    /// the host's counts. The rules are not checked again (call [`Placement::place`] first),
    /// so a recovering cluster can record what its hosts really run.
    pub fn commit(&mut self, host: HostId, req: &PlacementRequest) -> Result<(), PlacementError> {
        self.host(host).ok_or(PlacementError::UnknownHost(host))?;
        if let Some(&on) = self.vm_host.get(&req.vm) {
            let host = self.host(on).map_or_else(|| on.to_string(), |h| h.name.clone());
            return Err(PlacementError::AlreadyPlaced { vm: req.vm.clone(), host });
        }
        let groups: Vec<u32> = req.groups.iter().map(|g| self.intern_group(g)).collect();
        for &g in &groups {
            if let Some(total) = self.group_totals.get_mut(g as usize) {
                *total += 1;
            }
        }
        let h = self.host_mut(host)?;
        for g in groups {
            *h.group_counts.entry(g).or_insert(0) += 1;
        }
        h.allocated.vcpus = h.allocated.vcpus.saturating_add(req.vcpus);
        h.allocated.mem_mib = h.allocated.mem_mib.saturating_add(req.mem_mib);
        let vm = PlacedVm { vcpus: req.vcpus, mem_mib: req.mem_mib, groups: req.groups.clone() };
        h.vms.insert(req.vm.clone(), vm);
        self.vm_host.insert(req.vm.clone(), host);
        Ok(())
    }

    /// Forgets a VM: its host gets back exactly what `commit` recorded.
    pub fn release(&mut self, vm: &str) -> Result<(HostId, PlacedVm), PlacementError> {
        let id = self.vm_host.remove(vm).ok_or_else(|| PlacementError::NotPlaced(vm.to_string()))?;
        let h = self.host_mut(id)?;
        let placed = h.vms.remove(vm).ok_or_else(|| PlacementError::NotPlaced(vm.to_string()))?;
        h.allocated.vcpus = h.allocated.vcpus.saturating_sub(placed.vcpus);
        h.allocated.mem_mib = h.allocated.mem_mib.saturating_sub(placed.mem_mib);
        let groups: Vec<u32> = placed.groups.iter().filter_map(|g| self.group_ids.get(g).copied()).collect();
        let h = self.host_mut(id)?;
        for &g in &groups {
            if let Some(n) = h.group_counts.get_mut(&g) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    h.group_counts.remove(&g);
                }
            }
        }
        for g in groups {
            if let Some(total) = self.group_totals.get_mut(g as usize) {
                *total = total.saturating_sub(1);
            }
        }
        Ok((id, placed))
    }

    fn slot(&mut self, id: HostId) -> Result<&mut Option<Host>, PlacementError> {
        self.hosts.get_mut(id.0 as usize).ok_or(PlacementError::UnknownHost(id))
    }

    fn host_mut(&mut self, id: HostId) -> Result<&mut Host, PlacementError> {
        self.slot(id)?.as_mut().ok_or(PlacementError::UnknownHost(id))
    }

    fn group_total(&self, group: u32) -> u32 {
        self.group_totals.get(group as usize).copied().unwrap_or(0)
    }

    fn intern_label(&mut self, key: &str, value: &str) -> u32 {
        let values = self.label_ids.entry(key.to_string()).or_default();
        if let Some(&id) = values.get(value) {
            return id;
        }
        let id = self.next_label;
        self.next_label += 1;
        values.insert(value.to_string(), id);
        id
    }

    fn intern_group(&mut self, group: &str) -> u32 {
        if let Some(&id) = self.group_ids.get(group) {
            return id;
        }
        let id = u32::try_from(self.group_totals.len()).unwrap_or(u32::MAX);
        self.group_ids.insert(group.to_string(), id);
        self.group_totals.push(0);
        id
    }
}

/// `used / limit` in millionths (at most 1,000,000 while `used <= limit`).
fn millionths(used: u64, limit: u64) -> u64 {
    let v = u128::from(used) * 1_000_000 / u128::from(limit.max(1));
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(vcpus: u32, mem_mib: u64) -> Capacity {
        Capacity { vcpus, mem_mib }
    }

    fn zone(z: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("zone".to_string(), z.to_string())])
    }

    fn policy(cpu: u32, mem: u32, strategy: Strategy) -> Policy {
        Policy { cpu_overcommit_permille: cpu, mem_overcommit_permille: mem, strategy }
    }

    /// `n` hosts `h1..hn`, 8 CPUs and 16 GiB each, all in zone a, no overcommit.
    fn cluster(n: u32, strategy: Strategy) -> (Placement, Vec<HostId>) {
        let mut p = Placement::new(policy(1000, 1000, strategy)).unwrap();
        let ids = (1..=n).map(|i| p.add_host(format!("h{i}"), cap(8, 16384), zone("a")).unwrap()).collect();
        (p, ids)
    }

    fn place_commit(p: &mut Placement, req: &PlacementRequest) -> Result<HostId, PlacementError> {
        let id = p.place(req)?;
        p.commit(id, req).unwrap();
        Ok(id)
    }

    fn why(err: PlacementError) -> Rejections {
        match err {
            PlacementError::NoHostFits { why, .. } => *why,
            other => panic!("expected NoHostFits, got {other}"),
        }
    }

    #[test]
    fn test_place_cpu_overcommit_fits_up_to_the_ratio_and_no_further() {
        // 4 CPUs at 2.5: 10 vCPUs.
        let mut p = Placement::new(policy(2500, 1000, Strategy::Spread)).unwrap();
        let h = p.add_host("h1", cap(4, 65536), BTreeMap::new()).unwrap();

        let first = place_commit(&mut p, &PlacementRequest::new("a", 8, 1024));
        let second = place_commit(&mut p, &PlacementRequest::new("b", 2, 1024));
        let third = p.place(&PlacementRequest::new("c", 1, 1024));

        assert_eq!(first, Ok(h));
        assert_eq!(second, Ok(h));
        assert_eq!(p.host(h).unwrap().limit(), cap(10, 65536));
        assert_eq!(why(third.unwrap_err()).full, 1);
    }

    #[test]
    fn test_place_memory_without_overcommit_refuses_one_mib_over() {
        let mut p = Placement::new(policy(4000, 1000, Strategy::Spread)).unwrap();
        p.add_host("h1", cap(4, 4096), BTreeMap::new()).unwrap();
        place_commit(&mut p, &PlacementRequest::new("a", 1, 3072)).unwrap();

        let exact = p.place(&PlacementRequest::new("b", 1, 1024));
        let over = p.place(&PlacementRequest::new("c", 1, 1025));

        assert!(exact.is_ok());
        let why = why(over.unwrap_err());
        assert_eq!((why.full, why.largest_free_vcpus, why.largest_free_mem_mib), (1, 15, 1024));
    }

    #[test]
    fn test_place_memory_overcommit_ratio_rounds_down() {
        // 1000 MiB at 1.5 is 1500 MiB; 3 MiB at 1.5 would be 4.5, rounded down to 4.
        let mut p = Placement::new(policy(1000, 1500, Strategy::Spread)).unwrap();
        let big = p.add_host("big", cap(1, 1000), BTreeMap::new()).unwrap();
        let small = p.add_host("small", cap(1, 3), BTreeMap::new()).unwrap();

        assert_eq!(p.host(big).unwrap().limit().mem_mib, 1500);
        assert_eq!(p.host(small).unwrap().limit().mem_mib, 4);
        assert_eq!(p.place(&PlacementRequest::new("a", 1, 1500)), Ok(big));
        assert!(p.place(&PlacementRequest::new("a", 1, 1501)).is_err());
    }

    #[test]
    fn test_place_spread_and_binpack_choose_different_hosts() {
        let (mut spread, ids) = cluster(2, Strategy::Spread);
        place_commit(&mut spread, &PlacementRequest::new("existing", 4, 4096)).unwrap();
        let mut binpack = spread.clone();
        binpack.set_policy(policy(1000, 1000, Strategy::Binpack)).unwrap();
        let req = PlacementRequest::new("new", 2, 2048);

        // "existing" went to h1 (tie on an empty cluster: smallest name).
        assert_eq!(spread.vm_host("existing"), Some(ids[0]));
        assert_eq!(spread.place(&req), Ok(ids[1]));
        assert_eq!(binpack.place(&req), Ok(ids[0]));
    }

    #[test]
    fn test_place_binpack_skips_the_fullest_host_when_it_does_not_fit() {
        let (mut p, ids) = cluster(3, Strategy::Binpack);
        p.commit(ids[0], &PlacementRequest::new("a", 7, 1024)).unwrap();
        p.commit(ids[1], &PlacementRequest::new("b", 4, 1024)).unwrap();

        assert_eq!(p.place(&PlacementRequest::new("c", 2, 1024)), Ok(ids[1]));
    }

    #[test]
    fn test_place_ties_are_broken_by_host_name_not_insertion_order() {
        let mut p = Placement::new(Policy::default()).unwrap();
        p.add_host("zeta", cap(8, 8192), BTreeMap::new()).unwrap();
        let alpha = p.add_host("alpha", cap(8, 8192), BTreeMap::new()).unwrap();
        p.add_host("mid", cap(8, 8192), BTreeMap::new()).unwrap();

        assert_eq!(p.place(&PlacementRequest::new("vm", 1, 512)), Ok(alpha));
    }

    #[test]
    fn test_place_required_labels_must_all_match() {
        let mut p = Placement::new(Policy::default()).unwrap();
        let mut ssd_b = zone("b");
        ssd_b.insert("disk".into(), "ssd".into());
        let mut hdd_b = zone("b");
        hdd_b.insert("disk".into(), "hdd".into());
        let mut ssd_a = zone("a");
        ssd_a.insert("disk".into(), "ssd".into());
        p.add_host("h1", cap(8, 8192), ssd_a).unwrap();
        p.add_host("h2", cap(8, 8192), hdd_b).unwrap();
        let want = p.add_host("h3", cap(8, 8192), ssd_b).unwrap();

        let both = p.place(&PlacementRequest::new("vm", 1, 512).label("zone", "b").label("disk", "ssd"));
        let unknown = p.place(&PlacementRequest::new("vm", 1, 512).label("zone", "c"));

        assert_eq!(both, Ok(want));
        assert_eq!(why(unknown.unwrap_err()).missing_labels, 3);
    }

    #[test]
    fn test_place_anti_affinity_spreads_three_replicas_and_refuses_a_fourth() {
        // Binpack would stack them all on h1 without the rule.
        let (mut p, ids) = cluster(3, Strategy::Binpack);
        let replica =
            |i: u32| PlacementRequest::new(format!("web-{i}"), 1, 512).group("app=web").anti_affinity("app=web");

        let placed: Vec<_> = (1..=3).map(|i| place_commit(&mut p, &replica(i)).unwrap()).collect();
        let fourth = p.place(&replica(4));
        let other = p.place(&PlacementRequest::new("db", 1, 512).group("app=db").anti_affinity("app=db"));

        assert_eq!(placed, ids);
        assert_eq!(why(fourth.unwrap_err()).anti_affinity, 3);
        assert_eq!(other, Ok(ids[0]));
    }

    #[test]
    fn test_release_frees_the_anti_affinity_slot() {
        let (mut p, ids) = cluster(1, Strategy::Spread);
        let replica = |name: &str| PlacementRequest::new(name, 1, 512).group("app=web").anti_affinity("app=web");
        place_commit(&mut p, &replica("web-1")).unwrap();
        assert!(p.place(&replica("web-2")).is_err());

        p.release("web-1").unwrap();

        assert_eq!(p.place(&replica("web-2")), Ok(ids[0]));
    }

    #[test]
    fn test_place_required_affinity_colocates_with_its_group() {
        // Spread would pick the empty h1 or h3 without the rule.
        let (mut p, ids) = cluster(3, Strategy::Spread);
        p.commit(ids[1], &PlacementRequest::new("db", 4, 8192).group("app=db")).unwrap();

        let cache = p.place(&PlacementRequest::new("cache", 1, 512).affinity("app=db"));

        assert_eq!(cache, Ok(ids[1]));
    }

    #[test]
    fn test_place_required_affinity_to_an_absent_group_is_refused_unless_the_vm_starts_it() {
        let (p, ids) = cluster(2, Strategy::Spread);

        let stranger = p.place(&PlacementRequest::new("cache", 1, 512).affinity("app=db"));
        let first_member = p.place(&PlacementRequest::new("db-1", 1, 512).group("app=db").affinity("app=db"));

        assert_eq!(why(stranger.unwrap_err()).affinity, 2);
        assert_eq!(first_member, Ok(ids[0]));
    }

    #[test]
    fn test_place_preferred_affinity_prefers_then_falls_back() {
        let (mut p, ids) = cluster(3, Strategy::Spread);
        // h3 holds the db and is the most loaded: spread alone would avoid it.
        p.commit(ids[2], &PlacementRequest::new("db", 6, 8192).group("app=db")).unwrap();
        let cache = |mem| PlacementRequest::new("cache", 1, mem).prefer("app=db");

        let fits = p.place(&cache(4096));
        let too_big = p.place(&cache(12288));

        assert_eq!(fits, Ok(ids[2]));
        assert_eq!(too_big, Ok(ids[0]));
    }

    #[test]
    fn test_place_excluded_host_is_never_chosen() {
        let (p, ids) = cluster(2, Strategy::Spread);

        let target = p.place(&PlacementRequest::new("vm", 1, 512).exclude(ids[0]));
        let only = p.place(&PlacementRequest::new("vm", 1, 512).exclude(ids[1]));

        assert_eq!(target, Ok(ids[1]));
        assert_eq!(only, Ok(ids[0]));
    }

    #[test]
    fn test_place_down_and_draining_hosts_are_never_chosen() {
        let (mut p, ids) = cluster(3, Strategy::Spread);
        // h3 is the only loaded one, so spread would take h1 or h2.
        p.commit(ids[2], &PlacementRequest::new("busy", 6, 8192)).unwrap();
        p.set_state(ids[0], HostState::Down).unwrap();
        p.set_state(ids[1], HostState::Draining).unwrap();

        let chosen = p.place(&PlacementRequest::new("vm", 1, 512));
        p.set_state(ids[2], HostState::Down).unwrap();
        let none = p.place(&PlacementRequest::new("vm", 1, 512));

        assert_eq!(chosen, Ok(ids[2]));
        assert_eq!(why(none.unwrap_err()).down_or_draining, 3);
    }

    #[test]
    fn test_commit_and_release_keep_allocations_exact() {
        let (mut p, ids) = cluster(1, Strategy::Spread);
        let reqs: Vec<_> =
            (0..5).map(|i| PlacementRequest::new(format!("vm{i}"), 1 + i % 2, 100 + 7 * u64::from(i))).collect();
        for r in &reqs {
            p.commit(ids[0], r).unwrap();
        }
        let full = p.host(ids[0]).unwrap().allocated();

        let (from, released) = p.release("vm3").unwrap();
        let after_one = p.host(ids[0]).unwrap().allocated();
        for r in reqs.iter().filter(|r| r.vm != "vm3") {
            p.release(&r.vm).unwrap();
        }
        let empty = p.host(ids[0]).unwrap().allocated();

        assert_eq!(full, cap(7, 570));
        assert_eq!((from, released.vcpus, released.mem_mib), (ids[0], 2, 121));
        assert_eq!(after_one, cap(5, 449));
        assert_eq!(empty, cap(0, 0));
        assert!(p.host(ids[0]).unwrap().vms().is_empty());
        assert_eq!(p.vm_host("vm0"), None);
    }

    #[test]
    fn test_commit_same_vm_twice_and_release_unknown_vm_are_refused() {
        let (mut p, ids) = cluster(2, Strategy::Spread);
        p.commit(ids[0], &PlacementRequest::new("vm", 1, 512)).unwrap();

        let twice = p.commit(ids[1], &PlacementRequest::new("vm", 1, 512));
        let unknown = p.release("ghost");

        assert_eq!(twice, Err(PlacementError::AlreadyPlaced { vm: "vm".into(), host: "h1".into() }));
        assert_eq!(unknown, Err(PlacementError::NotPlaced("ghost".into())));
        assert_eq!(p.host(ids[1]).unwrap().allocated(), cap(0, 0));
    }

    #[test]
    fn test_place_error_names_every_reason() {
        let mut p = Placement::new(policy(1000, 1000, Strategy::Spread)).unwrap();
        let mut ids = Vec::new();
        for (i, z) in ["a", "a", "a", "a", "b", "b", "a", "a", "a", "a", "a", "a"].iter().enumerate() {
            ids.push(p.add_host(format!("h{i:02}"), cap(4, 8192), zone(z)).unwrap());
        }
        for &id in &ids[1..4] {
            p.set_state(id, HostState::Down).unwrap();
        }
        p.commit(ids[6], &PlacementRequest::new("web-1", 1, 512).group("app=web")).unwrap();
        // Five full hosts; h09 has the most vCPUs free, h10 the most memory.
        for (i, &id) in ids[7..12].iter().enumerate() {
            let (vcpus, mem) = if i == 2 {
                (2, 6144)
            } else if i == 3 {
                (3, 4096)
            } else {
                (4, 8192)
            };
            p.commit(id, &PlacementRequest::new(format!("filler-{i}"), vcpus, mem)).unwrap();
        }
        let req = PlacementRequest::new("web-2", 4, 8192).label("zone", "a").anti_affinity("app=web").exclude(ids[0]);

        let err = p.place(&req).unwrap_err();

        assert_eq!(
            err.to_string(),
            "no host fits VM web-2 (4 vCPUs / 8192 MiB): 1 host excluded (the VM's current host), \
             3 hosts down or draining, 2 hosts lack label zone=a, 1 host holds a VM of anti-affinity group app=web, \
             5 hosts full (largest free: 2 vCPUs, 4096 MiB)"
        );
    }

    #[test]
    fn test_place_on_no_hosts_or_an_empty_request_is_refused() {
        let (p, _) = cluster(1, Strategy::Spread);
        let empty = Placement::new(Policy::default()).unwrap();

        assert_eq!(empty.place(&PlacementRequest::new("vm", 1, 512)), Err(PlacementError::NoHosts("vm".into())));
        assert!(matches!(p.place(&PlacementRequest::new("vm", 0, 512)), Err(PlacementError::EmptyRequest { .. })));
        assert!(matches!(p.place(&PlacementRequest::new("vm", 1, 0)), Err(PlacementError::EmptyRequest { .. })));
    }

    #[test]
    fn test_policy_out_of_range_is_refused_and_set_policy_moves_the_limits() {
        let (mut p, ids) = cluster(1, Strategy::Spread);

        let zero = p.set_policy(policy(0, 1000, Strategy::Spread));
        let huge = Placement::new(policy(1000, MAX_OVERCOMMIT_PERMILLE + 1, Strategy::Spread));
        p.set_policy(policy(4000, 2000, Strategy::Spread)).unwrap();

        assert_eq!(zero, Err(PlacementError::Overcommit { what: "cpu", permille: 0 }));
        assert!(matches!(huge, Err(PlacementError::Overcommit { what: "memory", .. })));
        assert_eq!(p.host(ids[0]).unwrap().limit(), cap(32, 32768));
    }

    #[test]
    fn test_hosts_duplicate_names_and_removal_with_vms_are_refused() {
        let (mut p, ids) = cluster(2, Strategy::Spread);
        p.commit(ids[0], &PlacementRequest::new("vm", 1, 512)).unwrap();

        let dup = p.add_host("h1", cap(1, 1024), BTreeMap::new());
        let busy = p.remove_host(ids[0]);
        let removed = p.remove_host(ids[1]).map(|h| h.name().to_string());
        let stale = p.set_state(ids[1], HostState::Ready);

        assert_eq!(dup, Err(PlacementError::DuplicateHost("h1".into())));
        assert_eq!(busy.unwrap_err(), PlacementError::HostNotEmpty { host: "h1".into(), vms: 1 });
        assert_eq!(removed, Ok("h2".to_string()));
        assert_eq!(stale, Err(PlacementError::UnknownHost(ids[1])));
        assert_eq!(p.hosts().map(|(id, _)| id).collect::<Vec<_>>(), vec![ids[0]]);
    }
}
