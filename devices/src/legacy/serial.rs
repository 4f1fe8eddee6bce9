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

/// Version of the serial port's saved state.
pub const SERIAL_STATE_VERSION: u16 = 1;
/// The UART's receive FIFO (vm-superio's), the most a saved state may hold.
const FIFO_BYTES: usize = 64;

/// The 8250's registers and its receive FIFO, as saved. Output already handed on is not
/// state; a partial line still buffered is flushed before saving.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub version: u16,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialStateError {
    #[error("serial state version {0} is not the supported version {SERIAL_STATE_VERSION}")]
    Version(u16),
    #[error("the saved receive FIFO holds {0} bytes; the UART's holds {FIFO_BYTES}")]
    FifoTooLong(usize),
    #[error("cannot rebuild the UART: {0}")]
    Rebuild(String),
}

impl Serial {
    pub fn save_state(&mut self) -> SerialState {
        self.flush();
        let s = self.uart.state();
        SerialState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Checks `state`, then rebuilds the UART from it with the same interrupt and output.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<(), SerialStateError> {
        if state.version != SERIAL_STATE_VERSION {
            return Err(SerialStateError::Version(state.version));
        }
        if state.in_buffer.len() > FIFO_BYTES {
            return Err(SerialStateError::FifoTooLong(state.in_buffer.len()));
        }
        let registers = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|e| SerialStateError::Rebuild(e.to_string()))?;
        let placeholder = LineBuffer { out: Box::new(std::io::sink()), pending: Vec::new() };
        let mut spare = vm_superio::Serial::new(
            EventFdTrigger(irq.try_clone().map_err(|e| SerialStateError::Rebuild(e.to_string()))?),
            placeholder,
        );
        std::mem::swap(&mut spare, &mut self.uart);
        let out = spare.into_writer();
        match vm_superio::Serial::from_state(&registers, EventFdTrigger(irq), NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            // Only the interrupt could fail here, after the checks above.
            Err(e) => Err(SerialStateError::Rebuild(format!("{e:?}"))),
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
        if let Err(e) = self.uart.write(offset as u8, *byte)
            && !self.write_failed
        {
            tracing::warn!("serial console output failed, further output is dropped: {e}");
            self.write_failed = true;
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
    fn test_serial_state_round_trips_registers_and_fifo_and_refuses_bad_states() {
        let out = Shared::default();
        let mut serial = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(out.clone()));
        serial.write(3, &[0x83]); // LCR: DLAB on, 8 bits
        serial.write(0, &[0x0c]); // divisor low: 9600 baud
        serial.write(3, &[0x03]); // DLAB off
        serial.write(7, &[0x5a]); // scratch
        let saved = serial.save_state();
        let mut fresh = Serial::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(out.clone()));

        fresh.restore_state(&saved).unwrap();
        let mut scratch = [0u8];
        fresh.read(7, &mut scratch);
        let bad_version = fresh.restore_state(&SerialState { version: 2, ..saved.clone() });
        let bad_fifo = fresh.restore_state(&SerialState { in_buffer: vec![0; 65], ..saved.clone() });
        for &b in b"ok\n" {
            fresh.write(0, &[b]);
        }

        assert_eq!(fresh.save_state(), saved);
        assert_eq!((saved.baud_divisor_low, saved.line_control, scratch[0]), (0x0c, 0x03, 0x5a));
        assert_eq!(bad_version, Err(SerialStateError::Version(2)));
        assert_eq!(bad_fifo, Err(SerialStateError::FifoTooLong(65)));
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n", "the restored UART writes to the same output");
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
