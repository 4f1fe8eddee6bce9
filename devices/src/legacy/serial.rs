//! The 8250 UART at COM1 (vm-superio), written to stdout or a file.

use super::EventFdTrigger;
use crate::bus::BusDevice;
use std::io::Write;
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Where the guest's console goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Collects the guest's bytes and hands them on a line at a time. The UART model flushes
/// after every byte; passing that on would cost a system call per character, on the path
/// of the boot benchmark. A partial line (a shell prompt) goes out when the VMM calls
/// `Serial::flush`, which its event loop does when it is idle.
struct LineBuffer {
    out: SerialOutput,
    pending: Vec<u8>,
}

/// A line longer than this goes out without waiting for its end.
const MAX_PENDING: usize = 4096;

impl LineBuffer {
    fn write_out(&mut self, upto: usize) -> std::io::Result<()> {
        let result = self.out.write_all(&self.pending[..upto]).and_then(|_| self.out.flush());
        self.pending.drain(..upto);
        result
    }
}

impl Write for LineBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') {
            self.write_out(last_newline + 1)?;
        } else if self.pending.len() >= MAX_PENDING {
            self.write_out(self.pending.len())?;
        }
        Ok(buf.len())
    }

    /// Deliberately nothing: see the type's comment.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, LineBuffer>,
    write_failed: bool,
}

impl Serial {
    /// `irq` is signalled when the UART raises its interrupt; the VMM makes it an irqfd.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        let buffer = LineBuffer { out, pending: Vec::with_capacity(256) };
        Serial { uart: vm_superio::Serial::new(EventFdTrigger(irq), buffer), write_failed: false }
    }

    /// Hands on what the guest wrote but has not ended with a newline yet.
    pub fn flush(&mut self) {
        let buffer = self.uart.writer_mut();
        if !buffer.pending.is_empty() {
            let len = buffer.pending.len();
            let _ = buffer.write_out(len);
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] if offset < 8 => *byte = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        if offset >= 8 {
            return;
        }
        // A console nobody reads (a closed pipe) must not stop the guest; say it once.
        if let Err(e) = self.uart.write(offset as u8, *byte) {
            if !self.write_failed {
                tracing::warn!("serial console output failed, further output is dropped: {e}");
                self.write_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_serial_bytes_written_to_thr_reach_output_and_raise_irq_when_enabled() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));

        serial.write(1, &[0x02]); // IER: transmitter holding register empty interrupt
        for &b in b"hi\n" {
            serial.write(0, &[b]);
        }

        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn test_serial_partial_line_waits_for_newline_or_flush() {
        let out = Shared::default();
        let mut serial = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(out.clone()));

        for &b in b"login: " {
            serial.write(0, &[b]);
        }
        let before_flush = out.0.lock().unwrap().len();
        serial.flush();

        assert_eq!(before_flush, 0);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"login: ");
    }

    #[test]
    fn test_serial_wide_or_out_of_range_access_is_ignored() {
        let out = Shared::default();
        let mut serial = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(out.clone()));

        let mut wide = [0u8; 2];
        serial.read(0, &mut wide);
        serial.write(0, b"ab");
        serial.write(9, b"c");

        assert_eq!(wide, [0xff, 0xff]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
