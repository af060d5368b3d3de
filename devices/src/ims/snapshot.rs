//! What both IMS devices' snapshots share: a virtio queue's state.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

pub use crate::restore::RestoreError;

/// A virtio split queue as the device sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Entries (a power of two up to the device's maximum; 0 before set-up).
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The next available-ring index the device reads.
    pub next_avail: u16,
    /// The next used-ring index the device writes.
    pub next_used: u16,
    /// Whether `VIRTIO_F_EVENT_IDX` is in use.
    pub event_idx: bool,
}

fn halves(address: u64) -> (Option<u32>, Option<u32>) {
    let [a, b, c, d, e, f, g, h] = address.to_le_bytes();
    (
        Some(u32::from_le_bytes([a, b, c, d])),
        Some(u32::from_le_bytes([e, f, g, h])),
    )
}

impl QueueSnapshot {
    /// The state of `q`.
    #[must_use]
    pub fn of(q: &Queue) -> Self {
        Self {
            size: q.size(),
            ready: q.ready(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// Puts this state into `q`, whose maximum size is `max`.
    ///
    /// # Errors
    /// A size that is not a power of two up to `max`.
    pub fn apply(&self, q: &mut Queue, max: u16) -> Result<(), RestoreError> {
        if self.size > max || (self.size != 0 && !self.size.is_power_of_two()) {
            return Err(RestoreError(
                "a queue size is not a power of two within the maximum",
            ));
        }
        if self.size != 0 {
            q.set_size(self.size);
        }
        let (lo, hi) = halves(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = halves(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = halves(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(self.ready);
        Ok(())
    }
}
