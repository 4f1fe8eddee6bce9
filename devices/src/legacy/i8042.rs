//! The i8042 keyboard controller, for its CPU reset line only (ports 0x60 and 0x64).

use super::EventFdTrigger;
use crate::bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// Port range: 0x60..0x65; `reset` is signalled when the guest pulses the reset line.
    pub const PORT_BASE: u64 = 0x60;
    pub const PORT_LEN: u64 = 5;

    pub fn new(reset: EventFd) -> Self {
        I8042 { inner: vm_superio::I8042Device::new(EventFdTrigger(reset)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.inner.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data
            && let Err(e) = self.inner.write(offset as u8, *byte)
        {
            tracing::error!("i8042: could not signal the reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_i8042_reset_command_signals_reset_and_other_writes_do_not() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());

        dev.write(0, &[0xfe]); // data port: not a command
        assert!(reset.read().is_err(), "no reset expected yet");
        dev.write(4, &[0xfe]); // command port: pulse reset

        assert_eq!(reset.read().unwrap(), 1);
    }
}
