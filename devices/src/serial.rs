//! The 16550A console on COM1: vm-superio's UART model, output to any writer.
//!
//! The model raises its interrupt through an [`IrqLine`]: in the VMM, a pulse on the
//! userspace IOAPIC's pin 4 (COM1's ISA IRQ), so the UART's interrupts are remapped like
//! any other; an eventfd attached as an irqfd works too. Console output errors (a full
//! disk, a closed pipe) are counted, never fatal to the guest.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The UART's interrupt output: raises its line once per call.
pub struct IrqLine(Box<dyn Fn() -> io::Result<()> + Send>);

impl IrqLine {
    /// A line that calls `raise`.
    pub fn new(raise: impl Fn() -> io::Result<()> + Send + 'static) -> Self {
        Self(Box::new(raise))
    }

    /// A line that writes `fd` (an irqfd on the KVM side).
    #[must_use]
    pub fn eventfd(fd: EventFd) -> Self {
        Self::new(move || fd.write(1))
    }
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqLine")
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        (self.0)()
    }
}

/// The UART's registers and receive FIFO, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest (at most the FIFO's 64).
    pub receive: Vec<u8>,
}

/// A 16550A UART whose transmitted bytes go to `W`.
#[derive(Debug)]
pub struct SerialConsole<W: Write> {
    uart: Serial<IrqLine, NoEvents, W>,
    errors: u64,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART that raises `irq` and writes its output to `out`.
    pub fn new(irq: IrqLine, out: W) -> Self {
        Self {
            uart: Serial::new(irq, out),
            errors: 0,
        }
    }

    /// A UART in the state `snap` describes, raising `irq` and writing to `out`.
    ///
    /// # Errors
    /// A receive FIFO longer than the UART's.
    pub fn restore(
        irq: IrqLine,
        out: W,
        snap: &SerialSnapshot,
    ) -> Result<Self, crate::restore::RestoreError> {
        let [baud_divisor_low, baud_divisor_high] = snap.divisor;
        let state = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.receive.clone(),
        };
        let uart = Serial::from_state(&state, irq, NoEvents, out).map_err(|_| {
            crate::restore::RestoreError("serial receive FIFO longer than 64 bytes")
        })?;
        Ok(Self { uart, errors: 0 })
    }

    /// The UART's state.
    #[must_use]
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            receive: s.in_buffer,
        }
    }

    /// Output or interrupt errors seen so far.
    #[must_use]
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Flushes the output writer.
    ///
    /// # Errors
    /// The writer's error.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }

    /// The output writer.
    pub fn writer(&self) -> &W {
        self.uart.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are one byte wide: a wider access reads the first register
        // and zeros above it.
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
            if self.uart.write(reg, value).is_err() {
                self.errors = self.errors.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_writer() {
        let irq = IrqLine::eventfd(EventFd::new(libc_nonblock()).unwrap());
        let mut uart = SerialConsole::new(irq, Vec::new());
        for b in b"hi\n" {
            uart.write(0, &[*b]);
        }
        // Line status: transmitter empty.
        let mut lsr = [0u8; 1];
        uart.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(uart.writer(), b"hi\n");
        // Odd sizes and offsets do not panic.
        uart.write(1 << 40, &[1]);
        uart.write(0, &[]);
        let mut wide = [0xffu8; 8];
        uart.read(5, &mut wide);
        assert_eq!(&wide[1..], &[0; 7]);
        assert_eq!(uart.errors(), 0);
    }

    #[test]
    fn a_restored_uart_keeps_its_registers_and_refuses_an_overlong_fifo() {
        let irq = || IrqLine::eventfd(EventFd::new(libc_nonblock()).unwrap());
        let mut uart = SerialConsole::new(irq(), Vec::new());
        uart.write(1, &[0x02]); // IER: transmitter empty interrupt
        uart.write(7, &[0x5a]); // scratch
        let snap = uart.snapshot();
        let mut again = SerialConsole::restore(irq(), Vec::new(), &snap).unwrap();
        assert_eq!(again.snapshot(), snap);
        let mut scratch = [0u8];
        again.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let long = SerialSnapshot {
            receive: vec![0; 65],
            ..snap
        };
        SerialConsole::restore(irq(), Vec::new(), &long).unwrap_err();
    }

    fn libc_nonblock() -> i32 {
        0o4000
    }
}
