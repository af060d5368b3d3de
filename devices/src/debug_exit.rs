//! The debug-exit port: the guest's verdict ends the VM.
//!
//! A write of 1 to 4 bytes reports that little-endian value (zero-extended) as the exit
//! code; 0 means success. Reads return [`DEBUG_EXIT_SIGNATURE`].

use hypercall::platform::DEBUG_EXIT_SIGNATURE;

use crate::bus::{le_u32, put_le_u32, BusDevice};

/// Receives the guest's verdict.
pub trait ExitSink: Send {
    /// The guest reported `code`.
    fn guest_exit(&self, code: u32);
}

/// The debug-exit device.
#[derive(Debug)]
pub struct DebugExit<S> {
    sink: S,
}

impl<S: ExitSink> DebugExit<S> {
    /// A device that reports to `sink`.
    pub fn new(sink: S) -> Self {
        Self { sink }
    }
}

impl<S: ExitSink> BusDevice for DebugExit<S> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        put_le_u32(data, DEBUG_EXIT_SIGNATURE);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.sink.guest_exit(le_u32(data));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    impl ExitSink for mpsc::Sender<u32> {
        fn guest_exit(&self, code: u32) {
            self.send(code).unwrap();
        }
    }

    #[test]
    fn writes_report_the_code_and_reads_the_signature() {
        let (tx, rx) = mpsc::channel();
        let mut dev = DebugExit::new(tx);
        dev.write(0, &[3]);
        dev.write(0, &0x1234_5678u32.to_le_bytes());
        dev.write(0, &[]);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![3, 0x1234_5678, 0]);
        let mut data = [0u8; 4];
        dev.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), DEBUG_EXIT_SIGNATURE);
    }
}
