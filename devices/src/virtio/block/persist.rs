//! virtio-blk state: the common virtio state and what identifies the disk. The image's
//! contents are not part of it (they are the file, or the destination's copy of it); its
//! size, read-only flag and ID must match, or the guest would see its disk change. The rate limiter's buckets are
//! carried over, so a throttled guest stays throttled.

use super::Block;
use super::disk::ID_BYTES;
use crate::GuestMemory;
use crate::rate_limiter::{RateLimiter, RateLimiterState};
use crate::virtio::persist::{CommonState, DeviceState, PersistError, check_same, check_version, wrong_device};
use serde::{Deserialize, Serialize};

pub const BLOCK_STATE_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub version: u16,
    pub common: CommonState,
    pub sectors: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
    pub limiter: RateLimiterState,
}

impl Block {
    pub(super) fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            version: BLOCK_STATE_VERSION,
            common: self.common.save(),
            sectors: self.disk.sectors(),
            read_only: self.disk.read_only(),
            id: *self.disk.id(),
            limiter: self.limiter.save(),
        })
    }

    pub(super) fn restore(&mut self, state: &DeviceState, mem: &GuestMemory) -> Result<(), PersistError> {
        let DeviceState::Block(s) = state else { return Err(wrong_device(state, "block")) };
        check_version("virtio-blk", s.version, BLOCK_STATE_VERSION)?;
        check_same("disk size in sectors", &s.sectors, &self.disk.sectors())?;
        check_same("read-only flag", &s.read_only, &self.disk.read_only())?;
        check_same("disk id", &s.id, self.disk.id())?;
        let checked = self.common.check_restore(&s.common, mem)?;
        let limiter = RateLimiter::restore(&s.limiter).map_err(|e| PersistError::Limiter(e.to_string()))?;
        self.common.apply_restore(checked, mem);
        self.limiter = limiter;
        Ok(())
    }
}
