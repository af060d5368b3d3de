//! The doorbell of the test harness.
//!
//! A 4-byte write tells the host to look at the harness mailbox; the request, and its
//! sequence number, are read from guest memory by whoever services it (on its own
//! thread, so the vCPU that rang is not held). The value written is not used, and
//! writes of other widths are ignored. Reads return [`HARNESS_SIGNATURE`].

use hypercall::platform::HARNESS_SIGNATURE;

use crate::bus::{put_le_u32, BusDevice};

/// Receives doorbell rings.
pub trait DoorbellSink: Send {
    /// The guest rang: the mailbox may hold a new request.
    fn ring(&self);
}

/// The harness doorbell device.
#[derive(Debug)]
pub struct HarnessDoorbell<S> {
    sink: S,
}

impl<S: DoorbellSink> HarnessDoorbell<S> {
    /// A doorbell that forwards to `sink`.
    pub fn new(sink: S) -> Self {
        Self { sink }
    }
}

impl<S: DoorbellSink> BusDevice for HarnessDoorbell<S> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        put_le_u32(data, HARNESS_SIGNATURE);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() == 4 {
            self.sink.ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    struct Rings(mpsc::Sender<()>);

    impl DoorbellSink for Rings {
        fn ring(&self) {
            self.0.send(()).unwrap();
        }
    }

    #[test]
    fn four_byte_writes_ring_and_others_do_not() {
        let (tx, rx) = mpsc::channel();
        let mut bell = HarnessDoorbell::new(Rings(tx));
        bell.write(0, &7u32.to_le_bytes());
        rx.try_recv().unwrap();
        bell.write(0, &[7]);
        bell.write(0, &[7, 0]);
        bell.write(0, &7u64.to_le_bytes());
        rx.try_recv().unwrap_err();
        let mut data = [0u8; 4];
        bell.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), HARNESS_SIGNATURE);
    }
}
