//! The virtio-mmio transport, version 2 (spec 4.2.2): one device's registers in a 0x200
//! window of the MMIO bus. The guest learns of it from the ACPI DSDT (`LNRO0005`, as QEMU
//! and Firecracker describe virtio-mmio), and every access is checked here: a register
//! access that is not 32 bits wide, a write out of the order the spec sets, a queue index
//! that does not exist are ignored (and logged once), never acted on.

use super::persist::{PersistError, TransportState, VIRTIO_STATE_VERSION, check_registers, check_version};
use super::{ActivateError, VirtioDevice, status};
use crate::GuestMemory;
use crate::bus::BusDevice;
use virtio_queue::QueueT;

pub const MMIO_WINDOW: u64 = 0x200;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5243_564e; // "NVCR"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// The transport's own registers, as saved in a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioRegisters {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    regs: MmioRegisters,
    /// The first malformed access is logged; the rest would flood the log.
    complained: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Self {
        MmioTransport { device, mem, regs: MmioRegisters::default(), complained: false }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn save_state(&self) -> TransportState {
        TransportState { version: VIRTIO_STATE_VERSION, registers: self.regs, device: self.device.save_state() }
    }

    /// Restores a saved transport and device, all or nothing (see `persist`).
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), PersistError> {
        check_version("virtio transport", state.version, VIRTIO_STATE_VERSION)?;
        check_registers(&state.registers, state.device.common())?;
        self.device.restore_state(&state.device, &self.mem)?;
        self.regs = state.registers;
        if self.is_running() {
            self.device.activated();
        }
        Ok(())
    }

    /// True once the driver set DRIVER_OK and the device took its queues.
    pub fn is_running(&self) -> bool {
        self.regs.status & status::DRIVER_OK != 0 && self.device.common().mem.is_some() && !self.device.common().broken
    }

    fn complain(&mut self, what: &str) {
        if !self.complained {
            tracing::warn!(device = %self.device.common().id, "virtio-mmio: ignored {what}");
            self.complained = true;
        }
    }

    fn status_has(&self, bits: u32) -> bool {
        self.regs.status & bits == bits
    }

    /// Queue set-up is allowed between FEATURES_OK and DRIVER_OK, on an existing queue.
    fn selected_queue_for_setup(&mut self) -> Option<&mut virtio_queue::Queue> {
        let setup = self.status_has(status::FEATURES_OK) && !self.status_has(status::DRIVER_OK);
        let sel = self.regs.queue_sel as usize;
        if !setup {
            return None;
        }
        self.device.common_mut().queues.get_mut(sel)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let common = self.device.common();
        let queue = common.queues.get(self.regs.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => common.avail_features as u32,
                1 => (common.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => common.interrupt.status(),
            REG_STATUS => self.regs.status | if common.broken { status::DEVICE_NEEDS_RESET } else { 0 },
            // No shared memory regions: length all ones (spec 4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.regs.config_generation,
            _ => 0,
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.device.reset_device();
            self.device.common_mut().reset();
            self.regs = MmioRegisters { config_generation: self.regs.config_generation, ..MmioRegisters::default() };
            return;
        }
        // The driver only ever adds bits (spec 3.1.1); anything else is ignored.
        if value & self.regs.status != self.regs.status {
            self.complain(&format!("a status write that clears bits ({:#x} -> {value:#x})", self.regs.status));
            return;
        }
        let added = value & !self.regs.status;
        if added & status::FEATURES_OK != 0 {
            let common = self.device.common();
            if common.acked_features & !common.avail_features != 0 {
                // Features the device never offered: FEATURES_OK stays clear, as the spec says.
                self.regs.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.regs.status = value;
        if added & status::DRIVER_OK != 0 && self.status_has(status::FEATURES_OK) {
            match self.device.common_mut().activate(self.mem.clone()) {
                Ok(()) => self.device.activated(),
                Err(e) => self.activation_failed(e),
            }
        }
    }

    fn activation_failed(&mut self, e: ActivateError) {
        let id = self.device.common().id.clone();
        tracing::warn!(device = %id, "virtio-mmio: cannot activate: {e}");
        self.device.common_mut().mark_broken("activation failed");
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.regs.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.regs.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if !self.status_has(status::DRIVER) || self.status_has(status::FEATURES_OK) {
                    return self.complain("a feature write outside feature negotiation");
                }
                let common = self.device.common_mut();
                let shift = match self.regs.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                common.acked_features = (common.acked_features & !mask) | (u64::from(value) << shift);
            }
            REG_QUEUE_SEL => self.regs.queue_sel = value,
            REG_QUEUE_NUM => match self.selected_queue_for_setup() {
                Some(q) => q.set_size(value as u16),
                None => self.complain("QueueNum outside queue set-up"),
            },
            REG_QUEUE_READY => match self.selected_queue_for_setup() {
                Some(q) => q.set_ready(value == 1),
                None => self.complain("QueueReady outside queue set-up"),
            },
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH
            | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => {
                let Some(q) = self.selected_queue_for_setup() else {
                    return self.complain("a queue address outside queue set-up");
                };
                let (low, high) = if offset & 4 == 0 { (Some(value), None) } else { (None, Some(value)) };
                match offset & !4 {
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                    REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(low, high),
                    _ => q.set_used_ring_address(low, high),
                }
            }
            REG_QUEUE_NOTIFY => {
                let event = self.device.common().queue_events.get(value as usize);
                if let Some(Err(e)) = event.map(|evt| evt.write(1)) {
                    tracing::warn!("virtio-mmio: cannot signal a queue: {e}");
                }
            }
            REG_INTERRUPT_ACK => self.device.common().interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            _ => self.complain(&format!("a write to register {offset:#x}")),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            return self.device.read_config(offset - CONFIG_SPACE, data);
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
            self.complain(&format!("a {}-byte register read at {offset:#x}", data.len()));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return self.device.write_config(offset - CONFIG_SPACE, data);
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => self.write_register(offset, u32::from_le_bytes(word)),
            _ => self.complain(&format!("a {}-byte register write at {offset:#x}", data.len())),
        }
    }
}
