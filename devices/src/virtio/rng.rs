//! virtio-rng: fills the driver's buffers with bytes from the host's getrandom(2).

use super::chain;
use super::persist::{CommonState, DeviceState, PersistError, check_version, wrong_device};
use super::update_limiter;
use super::{
    DeviceCommon, EventSource, LimitError, LimitTarget, Served, TYPE_RNG, VirtioDevice, admit, limiter_fired,
    serve_queue,
};
use crate::rate_limiter::{BucketUpdate, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState};
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 64;
/// At most this much entropy per request: a driver cannot make the VMM allocate more.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Event source id of the rate limiter's timer.
const EVENT_LIMITER: u32 = 0;

pub struct Rng {
    common: DeviceCommon,
    limiter: RateLimiter,
    buffer: Vec<u8>,
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the live slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl Rng {
    pub fn new(name: &str, limits: RateLimiterConfig, irq: EventFd) -> Result<Self, RngError> {
        let common = DeviceCommon::new(name, 0, &[QUEUE_SIZE], irq).map_err(RngError::Setup)?;
        let limiter = RateLimiter::new(limits).map_err(RngError::Limiter)?;
        Ok(Rng { common, limiter, buffer: Vec::new() })
    }

    fn handle_chain(
        buffer: &mut Vec<u8>,
        id: &str,
        chain: virtio_queue::DescriptorChain<&crate::GuestMemory>,
        mem: &crate::GuestMemory,
    ) -> u32 {
        let shape = match chain::check(&chain, mem) {
            Ok(shape) => shape,
            Err(e) => {
                tracing::debug!(device = %id, "virtio-rng: dropped a malformed chain: {e}");
                return 0;
            }
        };
        let len = shape.writable_bytes.min(MAX_REQUEST_BYTES) as usize;
        let Ok(mut writer) = chain.writer(mem) else { return 0 };
        buffer.resize(len, 0);
        if let Err(e) = fill_random(buffer) {
            tracing::warn!(device = %id, "virtio-rng: getrandom failed: {e}");
            return 0;
        }
        match std::io::Write::write_all(&mut writer, buffer) {
            Ok(()) => len as u32,
            Err(_) => writer.bytes_written() as u32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot set up the device's queue and event fds")]
    Setup(#[source] std::io::Error),
    #[error("invalid rate limit")]
    Limiter(#[source] RateLimiterError),
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn common(&self) -> &DeviceCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activated(&mut self) {}

    fn reset_device(&mut self) {}

    fn process_queue(&mut self, index: usize) {
        let (limiter, buffer, id) = (&mut self.limiter, &mut self.buffer, self.common.id.clone());
        serve_queue(&mut self.common, index, |chain, mem| {
            let bytes = chain::check(&chain, mem).map_or(0, |s| s.writable_bytes.min(MAX_REQUEST_BYTES));
            if !admit(limiter, bytes) {
                return Served::Later;
            }
            Served::Used(Self::handle_chain(buffer, &id, chain, mem))
        });
    }

    fn event_sources(&self) -> Vec<EventSource> {
        vec![EventSource { fd: self.limiter.as_raw_fd(), id: EVENT_LIMITER, edge: false }]
    }

    fn handle_event(&mut self, id: u32) {
        if id == EVENT_LIMITER {
            limiter_fired(&mut self.limiter, &self.common.id);
            self.process_queue(0);
        }
    }

    fn set_rate_limits(
        &mut self,
        target: LimitTarget,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), LimitError> {
        if update_limiter(&mut self.limiter, &self.common.id, target, bandwidth, ops)? {
            self.process_queue(0);
        }
        Ok(())
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Rng(RngState {
            version: RNG_STATE_VERSION,
            common: self.common.save(),
            limiter: self.limiter.save(),
        })
    }

    fn restore_state(&mut self, state: &DeviceState, mem: &crate::GuestMemory) -> Result<(), PersistError> {
        let DeviceState::Rng(s) = state else { return Err(wrong_device(state, "rng")) };
        check_version("virtio-rng", s.version, RNG_STATE_VERSION)?;
        let checked = self.common.check_restore(&s.common, mem)?;
        let limiter = RateLimiter::restore(&s.limiter).map_err(|e| PersistError::Limiter(e.to_string()))?;
        self.common.apply_restore(checked, mem);
        self.limiter = limiter;
        Ok(())
    }
}

pub const RNG_STATE_VERSION: u16 = 1;

/// virtio-rng keeps only its rate limiter besides the common virtio state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub version: u16,
    pub common: CommonState,
    pub limiter: RateLimiterState,
}
