//! The 16550A console on COM1: vm-superio's UART model, output to any writer.
//!
//! The model raises its interrupt through an eventfd ([`EventFdTrigger`]) that the VMM
//! attaches as an irqfd to the UART's legacy GSI (4 for COM1). Console output errors (a
//! full disk, a closed pipe) are counted, never fatal to the guest.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// An interrupt line backed by an eventfd (an irqfd on the KVM side).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550A UART whose transmitted bytes go to `W`.
#[derive(Debug)]
pub struct SerialConsole<W: Write> {
    uart: Serial<EventFdTrigger, NoEvents, W>,
    errors: u64,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART that raises `irq` and writes its output to `out`.
    pub fn new(irq: EventFdTrigger, out: W) -> Self {
        Self {
            uart: Serial::new(irq, out),
            errors: 0,
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
        let irq = EventFdTrigger(EventFd::new(libc_nonblock()).unwrap());
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

    fn libc_nonblock() -> i32 {
        0o4000
    }
}
