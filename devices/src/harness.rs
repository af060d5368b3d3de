//! The doorbell of the test harness.
//!
//! A write tells the host that a request is waiting in the harness mailbox; the request
//! itself is read from guest memory by whoever services it (on its own thread, so the
//! vCPU that rang is not held). Reads return [`HARNESS_SIGNATURE`].

use hypercall::platform::HARNESS_SIGNATURE;

use crate::bus::{le_u32, put_le_u32, BusDevice};

/// Receives doorbell rings.
pub trait DoorbellSink: Send {
    /// The guest rang with sequence number `seq`.
    fn ring(&self, seq: u32);
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
        self.sink.ring(le_u32(data));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    struct Rings(mpsc::Sender<u32>);

    impl DoorbellSink for Rings {
        fn ring(&self, seq: u32) {
            self.0.send(seq).unwrap();
        }
    }

    #[test]
    fn rings_are_forwarded_with_their_sequence_number() {
        let (tx, rx) = mpsc::channel();
        let mut bell = HarnessDoorbell::new(Rings(tx));
        bell.write(0, &7u32.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), 7);
        let mut data = [0u8; 4];
        bell.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), HARNESS_SIGNATURE);
    }
}
