//! Between the gRPC messages and the actors' types. Requests are checked here, before
//! anything reaches an actor: a bad field is INVALID_ARGUMENT with what is wrong.

use crate::pb;
use novacron_actors::spec::validate_name;
use novacron_actors::store::{Event, EventKind, StoreError};
use novacron_actors::vm::VmError;
use novacron_actors::{HostError, HostInfo, PlacementRules, RestartPolicy, VmInfo, VmSpec};
use novacron_devices::virtio::LimitTarget;
use novacron_vmm::api::{LimitChange, Request as VmmRequest};
use novacron_vmm::config::KernelSource;
use novacron_vmm::snapshot::MachineSpec;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Status;

pub fn invalid(message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(message.to_string())
}

/// A VM name from a request, checked.
pub fn name(name: &str) -> Result<String, Status> {
    validate_name(name).map_err(invalid)?;
    Ok(name.to_string())
}

pub fn restart_from_pb(p: Option<pb::RestartPolicy>) -> Result<RestartPolicy, Status> {
    let Some(p) = p else { return Ok(RestartPolicy::on_failure()) };
    match p.kind.as_str() {
        "always" => Ok(RestartPolicy::Always),
        "never" => Ok(RestartPolicy::Never),
        "on-failure" | "" => {
            let RestartPolicy::OnFailure { max_restarts, window, backoff_initial, backoff_max } =
                RestartPolicy::on_failure()
            else {
                return Err(Status::internal("the default restart policy is not on-failure"));
            };
            let or = |ms: u64, default: Duration| if ms == 0 { default } else { Duration::from_millis(ms) };
            let backoff_initial = or(p.backoff_initial_ms, backoff_initial);
            let backoff_max = or(p.backoff_max_ms, backoff_max);
            if backoff_max < backoff_initial {
                return Err(invalid(format!(
                    "restart.backoff_max_ms ({} ms) is below restart.backoff_initial_ms ({} ms)",
                    backoff_max.as_millis(),
                    backoff_initial.as_millis()
                )));
            }
            Ok(RestartPolicy::OnFailure {
                max_restarts: if p.max_restarts == 0 { max_restarts } else { p.max_restarts },
                window: or(p.window_ms, window),
                backoff_initial,
                backoff_max,
            })
        }
        other => Err(invalid(format!("restart policy {other:?} is unknown: use always, on-failure or never"))),
    }
}

pub fn restart_to_pb(policy: &RestartPolicy) -> pb::RestartPolicy {
    match *policy {
        RestartPolicy::Always => pb::RestartPolicy { kind: "always".into(), ..Default::default() },
        RestartPolicy::Never => pb::RestartPolicy { kind: "never".into(), ..Default::default() },
        RestartPolicy::OnFailure { max_restarts, window, backoff_initial, backoff_max } => pb::RestartPolicy {
            kind: "on-failure".into(),
            max_restarts,
            window_ms: window.as_millis() as u64,
            backoff_initial_ms: backoff_initial.as_millis() as u64,
            backoff_max_ms: backoff_max.as_millis() as u64,
        },
    }
}

/// A spec from a request, with every rule of [`VmSpec::validate`] checked.
pub fn spec_from_pb(p: Option<pb::VmSpec>) -> Result<VmSpec, Status> {
    let p = p.ok_or_else(|| invalid("the request has no spec"))?;
    let vcpus = u8::try_from(p.vcpus).map_err(|_| invalid(format!("vcpus {} is out of range (1 to 8)", p.vcpus)))?;
    let spec = VmSpec {
        name: p.name,
        vcpus,
        mem_mib: p.mem_mib,
        kernel: (!p.kernel.is_empty()).then(|| PathBuf::from(&p.kernel)),
        cmdline: p.cmdline,
        // The daemon chooses where the console goes: a caller naming a file would have
        // the daemon write anywhere it can.
        serial_log: None,
        restart: restart_from_pb(p.restart)?,
        placement: PlacementRules {
            groups: p.groups,
            host_labels: p.host_labels.into_iter().collect(),
            affinity: p.affinity,
            anti_affinity: p.anti_affinity,
        },
    };
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

/// A `SetLimit` request as the VMM's control request, checked.
pub fn limit_request(r: &pb::SetLimitRequest) -> Result<VmmRequest, Status> {
    name(&r.name)?;
    let burst = |b: u64| (b != 0).then_some(b);
    let bandwidth = LimitChange::parse("bw", Some(&r.bandwidth), burst(r.bandwidth_burst)).map_err(invalid)?;
    let ops = LimitChange::parse("ops", Some(&r.ops), burst(r.ops_burst)).map_err(invalid)?;
    if bandwidth == LimitChange::Keep && ops == LimitChange::Keep {
        return Err(invalid("the request changes nothing: give bandwidth or ops"));
    }
    let target = match r.direction.as_str() {
        "" => LimitTarget::Device,
        "rx" => LimitTarget::Rx,
        "tx" => LimitTarget::Tx,
        other => return Err(invalid(format!("direction {other:?} is unknown: use rx, tx or nothing"))),
    };
    if r.device.is_empty() {
        return Err(invalid("the request names no device (e.g. disk0, net0)"));
    }
    Ok(VmmRequest::SetLimit { device: r.device.clone(), target, bandwidth, ops })
}

/// How a snapshot's machine differs from the VM it would continue, if it does: vCPUs,
/// memory, kernel, and devices (a daemon's VMs have no disks, networks or entropy device).
pub fn snapshot_mismatch(spec: &VmSpec, machine: &MachineSpec) -> Option<String> {
    let mut diffs = Vec::new();
    if machine.vcpus != spec.vcpus {
        diffs.push(format!("it has {} vCPUs, the VM {}", machine.vcpus, spec.vcpus));
    }
    if machine.mem_mib != spec.mem_mib {
        diffs.push(format!("it has {} MiB of memory, the VM {} MiB", machine.mem_mib, spec.mem_mib));
    }
    let kernel = spec.kernel.clone().map_or(KernelSource::TestGuest, KernelSource::File).to_string();
    if machine.kernel != kernel {
        diffs.push(format!("it booted kernel {}, the VM boots {kernel}", machine.kernel));
    }
    let devices = [("disks", machine.disks.len()), ("network interfaces", machine.nets.len())];
    for (what, n) in devices.into_iter().filter(|(_, n)| *n > 0) {
        diffs.push(format!("it has {n} {what}, the VM none"));
    }
    if machine.rng.is_some() {
        diffs.push("it has an entropy device, the VM none".into());
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// A dry run's prediction as the control port shows it.
pub fn prediction_to_pb(p: &novacron_migration::source::Prediction) -> pb::MigrationPrediction {
    let m = &p.measured;
    let (window_ms, dirtied) = m.dirty_curve.last().copied().unwrap_or_default();
    pb::MigrationPrediction {
        converges: p.converges,
        total_ms: p.total_ms,
        downtime_ms: p.downtime_ms,
        bytes: p.bytes,
        rounds: p.rounds,
        throttle_max: p.throttle_max.into(),
        failure: p.failure.clone().unwrap_or_default(),
        advice: p.advice.clone(),
        link_bytes_per_s: m.link_bytes_per_s,
        rtt_us: m.rtt_us,
        dirty_pages_per_s: (dirtied * 1000).checked_div(window_ms).unwrap_or(0),
        touched_pages: m.touched_pages,
    }
}

pub fn spec_to_pb(spec: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: spec.name.clone(),
        vcpus: spec.vcpus.into(),
        mem_mib: spec.mem_mib,
        kernel: spec.kernel.as_ref().map(|k| k.display().to_string()).unwrap_or_default(),
        cmdline: spec.cmdline.clone(),
        restart: Some(restart_to_pb(&spec.restart)),
        groups: spec.placement.groups.clone(),
        host_labels: spec.placement.host_labels.clone().into_iter().collect(),
        affinity: spec.placement.affinity.clone(),
        anti_affinity: spec.placement.anti_affinity.clone(),
    }
}

pub fn vm_to_pb(info: &VmInfo, host: &str) -> pb::Vm {
    pb::Vm {
        spec: Some(spec_to_pb(&info.spec)),
        phase: info.phase.to_string(),
        pid: info.pid.unwrap_or(0),
        restarts: info.restarts,
        last_exit: info.last_exit.map(|e| e.to_string()).unwrap_or_default(),
        error: info.error.clone().unwrap_or_default(),
        host: host.to_string(),
        serial_log: info.serial_log.display().to_string(),
        control_socket: info.socket.display().to_string(),
    }
}

pub fn event_kind(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Created => "created",
        EventKind::Started => "started",
        EventKind::Stopped => "stopped",
        EventKind::Paused => "paused",
        EventKind::Resumed => "resumed",
        EventKind::Restarted => "restarted",
        EventKind::Adopted => "adopted",
        EventKind::Failed => "failed",
        EventKind::Deleted => "deleted",
        EventKind::MigratedIn => "migrated-in",
        EventKind::MigratedOut => "migrated-out",
        EventKind::Fenced => "fenced",
    }
}

pub fn event_to_pb(seq: u64, event: &Event, host: &str) -> pb::Event {
    pb::Event {
        seq,
        at_ms: event.at_ms,
        vm: event.vm.clone().unwrap_or_default(),
        kind: event_kind(event.kind).into(),
        message: event.message.clone(),
        host: host.to_string(),
    }
}

/// What a host says about itself.
#[derive(Debug, Clone, Default)]
pub struct HostIdentity {
    pub name: String,
    pub address: String,
    pub cpus: u32,
    pub labels: std::collections::BTreeMap<String, String>,
    pub primary: bool,
}

pub fn host_to_pb(info: &HostInfo, me: &HostIdentity) -> pb::Host {
    pb::Host {
        name: me.name.clone(),
        address: me.address.clone(),
        cpus: me.cpus,
        labels: me.labels.clone().into_iter().collect(),
        primary: me.primary,
        vcpus: info.capacity.vcpus,
        mem_mib: info.capacity.mem_mib,
        used_vcpus: info.used.vcpus,
        used_mem_mib: info.used.mem_mib,
        vms: info.vms as u32,
        version: env!("CARGO_PKG_VERSION").into(),
        state: "up".into(),
    }
}

/// A host's error as a gRPC status: the code says what kind, the message says what to do.
pub fn host_error(e: HostError) -> Status {
    let message = novacron_actors::error_chain(&e);
    match e {
        HostError::InvalidSpec(_) | HostError::SocketPath(_) => Status::invalid_argument(message),
        HostError::AlreadyExists(_) => Status::already_exists(message),
        HostError::NoCapacity { .. } => Status::resource_exhausted(message),
        HostError::NotFound(_) => Status::not_found(message),
        HostError::GaveUp { .. } | HostError::SnapshotOf { .. } | HostError::Orphan { .. } => {
            Status::failed_precondition(message)
        }
        HostError::Vm(e) => vm_error_code(&e, message),
        HostError::Unresponsive { .. } | HostError::Restarting(_) => Status::unavailable(message),
        HostError::Store(e) => store_error(&e, message),
        _ => Status::internal(message),
    }
}

/// A store that could not save: the operator's to fix (free space, check the disk) and
/// the caller's to retry; nothing was changed.
pub fn store_error(e: &StoreError, message: String) -> Status {
    if e.is_full() { Status::resource_exhausted(message) } else { Status::unavailable(message) }
}

pub fn vm_error(e: VmError) -> Status {
    let message = novacron_actors::error_chain(&e);
    vm_error_code(&e, message)
}

fn vm_error_code(e: &VmError, message: String) -> Status {
    match e {
        VmError::NotRunning { .. } | VmError::Busy { .. } | VmError::Refused { .. } | VmError::Stopping { .. } => {
            Status::failed_precondition(message)
        }
        VmError::Control { .. } => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vcpus: u32, mem_mib: u64) -> pb::VmSpec {
        pb::VmSpec { name: name.into(), vcpus, mem_mib, ..Default::default() }
    }

    #[test]
    fn bad_specs_are_invalid_arguments_that_name_the_field() {
        for (p, what) in [
            (None, "no spec"),
            (Some(spec("Bad_Name", 1, 64)), "a-z"),
            (Some(spec("ok", 0, 64)), "vCPU"),
            (Some(spec("ok", 300, 64)), "vcpus 300"),
            (Some(spec("ok", 1, 1)), "memory"),
            (Some(pb::VmSpec { kernel: "/no/such/kernel".into(), ..spec("ok", 1, 64) }), "/no/such/kernel"),
        ] {
            let status = spec_from_pb(p).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(what), "{what}: {}", status.message());
        }
    }

    #[test]
    fn restart_policies_round_trip_and_unknown_ones_are_refused() {
        for kind in ["always", "never", "on-failure"] {
            let policy = restart_from_pb(Some(pb::RestartPolicy { kind: kind.into(), ..Default::default() })).unwrap();
            assert_eq!(restart_to_pb(&policy).kind, kind);
            assert_eq!(restart_from_pb(Some(restart_to_pb(&policy))).unwrap(), policy);
        }
        let custom =
            pb::RestartPolicy { kind: "on-failure".into(), max_restarts: 7, window_ms: 9000, ..Default::default() };
        let RestartPolicy::OnFailure { max_restarts, window, .. } = restart_from_pb(Some(custom)).unwrap() else {
            panic!("not on-failure")
        };
        assert_eq!((max_restarts, window), (7, Duration::from_secs(9)));
        let err =
            restart_from_pb(Some(pb::RestartPolicy { kind: "sometimes".into(), ..Default::default() })).unwrap_err();
        assert!(err.message().contains("sometimes"));
        let inverted = pb::RestartPolicy {
            kind: "on-failure".into(),
            backoff_initial_ms: 500,
            backoff_max_ms: 100,
            ..Default::default()
        };
        assert_eq!(restart_from_pb(Some(inverted)).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_good_spec_converts_both_ways() {
        let p = pb::VmSpec { cmdline: "ws=1 hb=100".into(), ..spec("web-1", 2, 128) };
        let s = spec_from_pb(Some(p.clone())).unwrap();
        assert_eq!((s.name.as_str(), s.vcpus, s.mem_mib, s.cmdline.as_str()), ("web-1", 2, 128, "ws=1 hb=100"));
        let back = spec_to_pb(&s);
        assert_eq!((back.name, back.vcpus, back.mem_mib, back.cmdline), (p.name, p.vcpus, p.mem_mib, p.cmdline));
    }
}
