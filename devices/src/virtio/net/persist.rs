//! virtio-net state: the common virtio state and the MAC address, which must match (the
//! guest keeps using it). A frame read from the tap but not yet delivered is not saved:
//! like a frame in flight on a wire, it may be lost across a snapshot or migration.

use super::Net;
use crate::GuestMemory;
use crate::virtio::persist::{CommonState, DeviceState, PersistError, check_same, check_version, wrong_device};
use serde::{Deserialize, Serialize};

pub const NET_STATE_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u16,
    pub common: CommonState,
    pub mac: [u8; 6],
}

impl Net {
    pub(super) fn save(&self) -> DeviceState {
        DeviceState::Net(NetState { version: NET_STATE_VERSION, common: self.common.save(), mac: self.mac })
    }

    pub(super) fn restore(&mut self, state: &DeviceState, mem: &GuestMemory) -> Result<(), PersistError> {
        let DeviceState::Net(s) = state else { return Err(wrong_device(state, "net")) };
        check_version("virtio-net", s.version, NET_STATE_VERSION)?;
        check_same("MAC address", &s.mac, &self.mac)?;
        let checked = self.common.check_restore(&s.common, mem)?;
        self.pending_rx.clear();
        self.common.apply_restore(checked, mem);
        Ok(())
    }
}
