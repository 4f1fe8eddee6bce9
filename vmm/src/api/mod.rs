//! The VMM's control socket: a Unix stream socket carrying one JSON object per line.
//!
//! ```text
//! -> {"version":1,"op":"status"}
//! <- {"version":1,"ok":true,"status":{"state":"running","vcpus":2,...}}
//! -> {"version":1,"op":"pause"}
//! <- {"version":1,"ok":true}
//! -> {"version":9,"op":"pause"}
//! <- {"version":1,"ok":false,"error":{"kind":"unsupported_version","message":"..."}}
//! ```
//!
//! Operations: `status`, `pause`, `resume`, `shutdown`, `snapshot`, `set_limit`, `migrate`,
//! `migrate_status`, `migrate_set`, `migrate_cancel`, `permit`, `watch`. Version policy: the VMM answers
//! requests of its own version and of the one before it; a request it cannot read gets an
//! error reply, never a closed connection without a word. The full description, with every
//! error kind, is `docs/control-socket.md`.

pub mod client;
pub mod server;

use novacron_devices::rate_limiter::{BucketUpdate, TokenBucketConfig};
use novacron_devices::virtio::LimitTarget;
use novacron_migration::source::{Fault, PostCopy, Prediction, Progress, Report};
use novacron_migration::transport::TransportChoice;
use serde::{Deserialize, Serialize};

/// The protocol version this VMM speaks.
pub const API_VERSION: u32 = 1;
/// The oldest request version it still answers.
pub const API_MIN_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown,
    /// Ends the VM because another host owns it now at epoch `owner_epoch` (its host's
    /// keeper found this copy stale): the VMM exits with `runtime::EVICTED_EXIT_CODE`, which
    /// its supervisor does not restart, whatever the restart policy.
    Evict {
        owner_epoch: u64,
    },
    /// Writes a snapshot into `dir` on the VMM's host; the VM resumes afterwards unless
    /// `paused`.
    Snapshot {
        dir: String,
        #[serde(default)]
        paused: bool,
    },
    /// Starts a live migration to the VMM receiving at `to` (host:port). The answer comes
    /// when it ends, with the report or the error; meanwhile other connections can ask
    /// `migrate_status`, `migrate_set` and `migrate_cancel`.
    Migrate(MigrateRequest),
    MigrateStatus,
    MigrateCancel,
    /// Changes the running migration's bandwidth limit (bytes/s, 0: none).
    MigrateSet {
        max_bandwidth: u64,
    },
    /// A run permit (`crate::permit`): the guest may run until `until_ms` (CLOCK_BOOTTIME
    /// milliseconds) under ownership epoch `epoch`.
    Permit {
        epoch: u64,
        until_ms: u64,
    },
    /// This connection is told of every change of the VM's run state (`VmEvent`), one
    /// line each, after the answer to this request.
    Watch,
    /// Changes a device's rate limiter while the VM runs.
    SetLimit {
        device: String,
        #[serde(default = "default_target")]
        target: LimitTarget,
        #[serde(default)]
        bandwidth: LimitChange,
        #[serde(default)]
        ops: LimitChange,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    pub to: String,
    /// The TLS directory (ca.pem, node.pem, node.key), on the VMM's host.
    pub tls_dir: String,
    /// Bytes per second; 0 is no limit.
    #[serde(default)]
    pub max_bandwidth: u64,
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    #[serde(default = "yes")]
    pub auto_converge: bool,
    #[serde(default = "yes")]
    pub compress: bool,
    /// MiB of last-sent pages kept for deltas.
    #[serde(default = "default_delta_cache_mib")]
    pub delta_cache_mib: u64,
    /// Threads for the page work (0: one per core).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub workers: usize,
    /// After the VM has moved, write a snapshot of it here (the base for a later
    /// migration back: `vmm receive --base DIR`).
    #[serde(default)]
    pub keep_snapshot: Option<String>,
    /// What carries the migration: `auto` (TLS over TCP to a near peer, QUIC to a far one),
    /// `quic` or `tcp`.
    #[serde(default)]
    pub transport: TransportChoice,
    /// Measure and predict only (`source::dry_run`): the VM runs on here, the receiver
    /// gets a link probe and waits on; the answer's status holds the prediction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Tests only: a fault to inject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Switch to post-copy (the VM runs at the destination before its last pages are
    /// there): after this many rounds, or when pre-copy would not converge (`auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<PostCopy>,
    /// The client's name for this migration, shown back in `migrate_status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

fn default_downtime_ms() -> u64 {
    50
}

fn default_delta_cache_mib() -> u64 {
    64
}

fn yes() -> bool {
    true
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A migration as the control socket shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The request's `id`, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub to: String,
    /// A dry run, not a migration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub progress: Progress,
    /// Set when a dry run ended well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
    /// Set when it ended well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    /// Set when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it ended well: whether the VM runs at the destination or stays paused there
    /// (as it was paused here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrived: Option<VmState>,
    /// The VM moved, but `keep_snapshot` could not be written: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_snapshot_error: Option<String>,
}

/// A snapshot directory named in a request: the VMM's working directory is nobody's
/// business, so it must be absolute.
pub fn check_snapshot_dir(field: &str, dir: &str) -> Result<(), ApiError> {
    if dir.is_empty() {
        return Err(ApiError::new(ErrorKind::BadRequest, format!("{field} is empty: name an absolute directory")));
    }
    if !std::path::Path::new(dir).is_absolute() {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!(
                "{field} {dir:?} is relative: name an absolute directory (the VMM's working directory is not yours)"
            ),
        ));
    }
    Ok(())
}

fn default_target() -> LimitTarget {
    LimitTarget::Device
}

/// What to do with one bucket of a rate limiter.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LimitChange {
    #[default]
    Keep,
    Off,
    Set(TokenBucketConfig),
}

impl LimitChange {
    /// One bucket's change as the command line gives it (`key` is "bw" or "ops"): no
    /// value keeps the bucket, "off" removes it, "SIZE[/MS]" sets it (with an optional
    /// one-time `burst`).
    pub fn parse(key: &str, value: Option<&str>, burst: Option<u64>) -> Result<LimitChange, String> {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return match burst {
                Some(_) => Err(format!("--{key}-burst needs --{key}")),
                None => Ok(LimitChange::Keep),
            };
        };
        if value == "off" {
            return Ok(LimitChange::Off);
        }
        let mut spec = format!("{key}={value}");
        if let Some(b) = burst {
            spec.push_str(&format!(",{key}_burst={b}"));
        }
        let config = novacron_devices::rate_limiter::parse_rate_limiter(&spec).map_err(|e| e.to_string())?;
        let bucket = if key == "bw" { config.bandwidth } else { config.ops };
        bucket.map(LimitChange::Set).ok_or_else(|| format!("--{key} {value} sets no limit"))
    }
}

impl From<LimitChange> for BucketUpdate {
    fn from(c: LimitChange) -> Self {
        match c {
            LimitChange::Keep => BucketUpdate::None,
            LimitChange::Off => BucketUpdate::Disabled,
            LimitChange::Set(config) => BucketUpdate::Update(config),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
        })
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    pub state: VmState,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub pid: u32,
    pub uptime_ms: u64,
    /// The kernel's path, or "test-guest" for the bundled one.
    pub kernel: String,
    pub boot_format: String,
    /// The virtio devices by name ("disk0", "net0", "rng0"), in slot order.
    #[serde(default)]
    pub devices: Vec<String>,
    /// For a VMM started with --require-permit: its run permit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit: Option<PermitStatus>,
    /// Microseconds from the start of the boot or restore to the guest's first
    /// instruction (a vCPU entering the guest); none before that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_instruction_us: Option<u64>,
    /// For a lazily restored VM: how much of its memory the loader has put in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_load: Option<MemoryLoadStatus>,
}

/// A lazy restore's loader (`snapshot::lazy`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLoadStatus {
    pub loaded_mib: u64,
    pub total_mib: u64,
    /// Chunks loaded because the guest or the VMM touched them first (the rest prefetched).
    pub on_demand_chunks: u64,
    /// Until everything was in, or so far.
    pub elapsed_ms: u64,
    pub done: bool,
}

/// A VMM's run permit (`crate::permit`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermitStatus {
    pub epoch: u64,
    /// Milliseconds it still holds (0: run out, or none yet).
    pub left_ms: u64,
    /// The guest is paused for want of a permit.
    pub fenced: bool,
}

/// What a `watch` connection is told, one line each, as it happens.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmEvent {
    /// The run permit ran out: the guest is paused until a new one.
    Fenced,
    /// A permit came: the guest may run (it does unless it was paused before).
    Permitted,
    /// Waiting for a first permit: a VMM that started (or a migration that arrived)
    /// under --require-permit.
    WaitingForPermit,
    Paused,
    Resumed,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not a request this version understands.
    BadRequest,
    UnsupportedVersion,
    /// The request does not apply in the VM's state (e.g. resume while running).
    InvalidState,
    /// The VMM could not carry it out.
    Internal,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into() }
    }
}

/// What a snapshot wrote.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReport {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    /// Pages written to memory.bin; the others were zero and left as holes.
    pub pages_written: u64,
    pub millis: u64,
}

impl SnapshotReport {
    /// One line for the operator: where, how long, how much.
    pub fn summary(&self, dir: &std::path::Path) -> String {
        format!(
            "snapshot written to {} in {} ms: {} MiB of memory ({} pages not zero), {} KiB of state",
            dir.display(),
            self.millis,
            self.memory_bytes >> 20,
            self.pages_written,
            self.state_bytes >> 10
        )
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// On a `watch` connection: what happened, with the status after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<VmEvent>,
}

impl Response {
    pub fn done() -> Self {
        Response {
            version: API_VERSION,
            ok: true,
            status: None,
            snapshot: None,
            migration: None,
            error: None,
            event: None,
        }
    }

    pub fn status(status: VmStatus) -> Self {
        Response { status: Some(status), ..Response::done() }
    }

    pub fn error(e: ApiError) -> Self {
        Response { ok: false, error: Some(e), ..Response::done() }
    }
}

/// Parses one request line, checking the version before the operation so that a newer
/// client gets "unsupported version" rather than "unknown operation".
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
        #[serde(default)]
        op: Option<serde_json::Value>,
    }
    let v: Version = serde_json::from_slice(line).map_err(|e| {
        ApiError::new(ErrorKind::BadRequest, format!("not a request (a JSON object with \"version\" and \"op\"): {e}"))
    })?;
    if !(API_MIN_VERSION..=API_VERSION).contains(&v.version) {
        return Err(ApiError::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this VMM speaks {API_MIN_VERSION} to {API_VERSION}",
                v.version
            ),
        ));
    }
    let frame: RequestFrame = serde_json::from_slice(line).map_err(|e| {
        let what = match &v.op {
            Some(serde_json::Value::String(op)) => format!("bad {op:?} request"),
            Some(other) => format!("bad request: \"op\" must be a name like \"status\", not {other}"),
            None => "bad request: no \"op\"".to_string(),
        };
        ApiError::new(ErrorKind::BadRequest, format!("{what}: {e}"))
    })?;
    Ok(frame.request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_request_accepts_each_op() {
        for (line, want) in [
            (r#"{"version":1,"op":"status"}"#, Request::Status),
            (r#"{"op":"pause","version":1}"#, Request::Pause),
            (r#"{"version":1,"op":"resume"}"#, Request::Resume),
            (r#"{"version":1,"op":"shutdown"}"#, Request::Shutdown),
            (r#"{"version":1,"op":"evict","owner_epoch":3}"#, Request::Evict { owner_epoch: 3 }),
        ] {
            assert_eq!(parse_request(line.as_bytes()), Ok(want));
        }
    }

    #[test]
    fn test_parse_request_newer_version_is_unsupported_even_with_unknown_op() {
        let err = parse_request(br#"{"version":7,"op":"teleport"}"#).unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnsupportedVersion);
    }

    #[test]
    fn test_parse_request_garbage_and_unknown_op_are_bad_requests() {
        for line in [
            &b"\xff\xfe"[..],
            b"{}",
            b"[1,2]",
            br#"{"version":1,"op":"teleport"}"#,
            br#"{"version":"1","op":"status"}"#,
        ] {
            assert_eq!(
                parse_request(line).unwrap_err().kind,
                ErrorKind::BadRequest,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn test_parse_request_missing_field_names_the_op() {
        let missing_to = parse_request(br#"{"version":1,"op":"migrate","tls_dir":"/t"}"#).unwrap_err();
        let numeric_op = parse_request(br#"{"version":1,"op":5}"#).unwrap_err();

        assert_eq!(missing_to.kind, ErrorKind::BadRequest);
        assert!(missing_to.message.starts_with("bad \"migrate\" request: missing field `to`"), "{missing_to}");
        assert!(numeric_op.message.contains("\"op\" must be a name like \"status\", not 5"), "{numeric_op}");
    }

    #[test]
    fn test_snapshot_dirs_must_be_absolute() {
        assert!(check_snapshot_dir("dir", "/srv/snap").is_ok());
        assert!(check_snapshot_dir("dir", "").unwrap_err().message.contains("dir is empty"));
        assert!(
            check_snapshot_dir("keep_snapshot", "s").unwrap_err().message.contains("keep_snapshot \"s\" is relative")
        );
    }

    #[test]
    fn test_response_round_trips_through_json() {
        let r = Response::error(ApiError::new(ErrorKind::InvalidState, "already paused"));
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        assert!(!text.contains("status"));
    }

    #[test]
    fn test_parse_request_set_limit_with_defaults_and_explicit_changes() {
        let minimal = parse_request(br#"{"version":1,"op":"set_limit","device":"disk0"}"#);
        let full = parse_request(
            br#"{"version":1,"op":"set_limit","device":"net0","target":"tx","bandwidth":{"set":{"size":1000,"refill_time_ms":100}},"ops":"off"}"#,
        );
        let bad_bucket =
            parse_request(br#"{"version":1,"op":"set_limit","device":"d","bandwidth":{"set":{"size":1}}}"#);

        assert_eq!(
            minimal,
            Ok(Request::SetLimit {
                device: "disk0".into(),
                target: LimitTarget::Device,
                bandwidth: LimitChange::Keep,
                ops: LimitChange::Keep
            })
        );
        let Ok(Request::SetLimit { target, bandwidth, ops, .. }) = full else { panic!("{full:?}") };
        assert_eq!((target, ops), (LimitTarget::Tx, LimitChange::Off));
        assert_eq!(
            bandwidth,
            LimitChange::Set(TokenBucketConfig { size: 1000, one_time_burst: 0, refill_time_ms: 100 })
        );
        assert_eq!(bad_bucket.unwrap_err().kind, ErrorKind::BadRequest);
    }
}
