//! virtio-net state: the common virtio state and the MAC address, which must match (the
//! guest keeps using it). A frame read from the tap but not yet delivered is not saved:
//! like a frame in flight on a wire, it may be lost across a snapshot or migration.

use super::Net;
use crate::GuestMemory;
use crate::rate_limiter::{RateLimiter, RateLimiterState};
use crate::virtio::persist::{CommonState, DeviceState, PersistError, check_same, check_version, wrong_device};
use serde::{Deserialize, Serialize};

pub const NET_STATE_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u16,
    pub common: CommonState,
    pub mac: [u8; 6],
    pub rx_limiter: RateLimiterState,
    pub tx_limiter: RateLimiterState,
}

impl Net {
    pub(super) fn save(&self) -> DeviceState {
        DeviceState::Net(NetState {
            version: NET_STATE_VERSION,
            common: self.common.save(),
            mac: self.mac,
            rx_limiter: self.rx_limiter.save(),
            tx_limiter: self.tx_limiter.save(),
        })
    }

    pub(super) fn restore(&mut self, state: &DeviceState, mem: &GuestMemory) -> Result<(), PersistError> {
        let DeviceState::Net(s) = state else { return Err(wrong_device(state, "net")) };
        check_version("virtio-net", s.version, NET_STATE_VERSION)?;
        check_same("MAC address", &s.mac, &self.mac)?;
        let checked = self.common.check_restore(&s.common, mem)?;
        let limiter = |state| RateLimiter::restore(state).map_err(|e| PersistError::Limiter(e.to_string()));
        let (rx, tx) = (limiter(&s.rx_limiter)?, limiter(&s.tx_limiter)?);
        self.pending_rx.clear();
        self.common.apply_restore(checked, mem);
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        Ok(())
    }
}
