//! Run permits: how a VMM under a cluster knows it may run its guest.
//!
//! A VMM started with `--require-permit` runs its guest only while it holds a permit that
//! has not run out: an ownership epoch and a deadline, pushed by its host's keeper over
//! the control socket (`permit`). The keeper gives permits only to the VMMs of VMs its host
//! owns, and only as far ahead as its own lease in the cluster store is safe; when no new
//! permit comes in time (the keeper is gone, the host is cut off), the VMM pauses its
//! guest by itself: it fences itself. The cluster starts the VM elsewhere only after the
//! deadline has passed (`docs/ha.md` has the timing argument).
//!
//! Deadlines are CLOCK_BOOTTIME milliseconds, a clock every process of a host shares and
//! that goes on while the machine sleeps (a suspended host must not wake up believing its
//! permits still hold). They are absolute, so a permit read late (a VMM that was stopped)
//! is no longer than it was when sent. An epoch never goes back: a permit of an older epoch
//! than one already held comes from a stale keeper and is refused.
//!
//! The vCPU threads check the permit before every entry into the guest, so even a VMM
//! whose main thread was stopped (SIGSTOP) and continued after the deadline never runs
//! the guest again without a new permit.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermitError {
    #[error("this VMM was not started with --require-permit; it needs no permit")]
    NotRequired,
    #[error("a permit of epoch {offered} is older than the epoch {held} this VMM holds (a stale keeper?)")]
    Stale { offered: u64, held: u64 },
}

/// Milliseconds of CLOCK_BOOTTIME.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given, which lives on this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[derive(Debug)]
pub struct RunPermit {
    required: bool,
    /// CLOCK_BOOTTIME ms until which the guest may run; 0: no permit yet.
    until_ms: AtomicU64,
    epoch: AtomicU64,
}

impl RunPermit {
    pub fn new(required: bool) -> Self {
        RunPermit { required, until_ms: AtomicU64::new(0), epoch: AtomicU64::new(0) }
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether the guest may run now.
    pub fn allows_now(&self) -> bool {
        !self.required || boottime_ms() < self.until_ms.load(Ordering::Acquire)
    }

    /// How long the current permit still holds (None: none is needed).
    pub fn left(&self) -> Option<Duration> {
        self.required
            .then(|| Duration::from_millis(self.until_ms.load(Ordering::Acquire).saturating_sub(boottime_ms())))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The deadline in CLOCK_BOOTTIME ms (0: none yet).
    pub fn until_ms(&self) -> u64 {
        self.until_ms.load(Ordering::Acquire)
    }

    /// Takes a permit for `epoch` until `until_ms` (CLOCK_BOOTTIME). Called from the VMM
    /// thread only, so the two fields need no lock between them.
    pub fn grant(&self, epoch: u64, until_ms: u64) -> Result<(), PermitError> {
        if !self.required {
            return Err(PermitError::NotRequired);
        }
        let held = self.epoch();
        if epoch < held {
            return Err(PermitError::Stale { offered: epoch, held });
        }
        self.epoch.store(epoch, Ordering::Release);
        self.until_ms.store(until_ms, Ordering::Release);
        Ok(())
    }
}

/// A migration's destination, at the commit, asks its host's keeper to claim the VM for
/// this host (`vmm receive --claim-from KEEPER_SOCK`): one JSON line each way.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The destination VMM's control socket: the keeper knows the VM by it.
    pub api_sock: String,
}

/// The keeper's answer: the permit of the new epoch, or why the claim failed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClaimAnswer {
    pub ok: bool,
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub until_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cannot ask the keeper at {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the keeper's answer is not valid: {0}")]
    BadAnswer(String),
    #[error("the keeper refused to claim the VM: {0}")]
    Refused(String),
}

/// Asks the keeper at `keeper_sock` to claim this VMM's VM; returns the permit
/// (epoch, CLOCK_BOOTTIME deadline) it gives.
pub fn claim(keeper_sock: &Path, api_sock: &Path, timeout: Duration) -> Result<(u64, u64), ClaimError> {
    let io = |source| ClaimError::Io { path: keeper_sock.to_owned(), source };
    let stream = UnixStream::connect(keeper_sock).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = ClaimRequest { api_sock: api_sock.to_string_lossy().into_owned() };
    let mut line = serde_json::to_vec(&request).map_err(|e| ClaimError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    let answer: ClaimAnswer = serde_json::from_str(&answer).map_err(|e| ClaimError::BadAnswer(e.to_string()))?;
    if !answer.ok {
        return Err(ClaimError::Refused(answer.error.unwrap_or_else(|| "no reason given".into())));
    }
    Ok((answer.epoch, answer.until_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_permit_allows_until_its_deadline_and_never_goes_back_an_epoch() {
        let p = RunPermit::new(true);
        let before_any = p.allows_now();
        p.grant(3, boottime_ms() + 60_000).unwrap();
        let granted = p.allows_now();
        let stale = p.grant(2, boottime_ms() + 60_000);
        p.grant(3, boottime_ms().saturating_sub(1)).unwrap();
        let expired = p.allows_now();

        assert!(!before_any, "no permit yet");
        assert!(granted);
        assert_eq!(stale, Err(PermitError::Stale { offered: 2, held: 3 }));
        assert!(!expired, "a deadline in the past does not allow");
        assert_eq!(p.epoch(), 3);
    }

    #[test]
    fn test_a_vmm_without_require_permit_always_runs_and_refuses_permits() {
        let p = RunPermit::new(false);
        assert!(p.allows_now());
        assert_eq!(p.left(), None);
        assert_eq!(p.grant(1, 5), Err(PermitError::NotRequired));
    }
}
