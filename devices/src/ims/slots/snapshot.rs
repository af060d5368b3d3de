//! The slot-array device's state, for snapshots: configuration space, slots (message,
//! mask, pending), work queues (addresses, indexes, bound slot), registers, and the work
//! taken off the rings but not completed yet (with how long until each is due), so that
//! a restored device completes exactly what the old one owed, once.

use std::time::{Duration, Instant};

use irq::MessageSink;
use serde::{Deserialize, Serialize};

use super::{ImsSlots, Slot, MAX_QUEUE_SIZE};
use crate::ims::snapshot::{QueueSnapshot, RestoreError};
use crate::memory::AddressSpace;

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotsSnapshot {
    /// Configuration space bytes.
    pub config: Vec<u8>,
    /// Each slot: message (address low, high, data) and control.
    pub slots: Vec<([u32; 3], u32)>,
    /// Each work queue and the slot it raises.
    pub queues: Vec<(QueueSnapshot, u32)>,
    /// `QUEUE_SELECT`.
    pub select: u32,
    /// `STATUS`.
    pub status: u32,
    /// `ERROR_SLOT`.
    pub error_slot: u32,
    /// Completions so far.
    pub completions: u64,
    /// Interrupts the remapping core refused.
    pub faults: u64,
    /// `INJECT_DELAY_US`.
    pub delay_us: u64,
    /// Queues notified and not yet looked at.
    pub notified: Vec<u32>,
    /// Work taken off the rings: queue, descriptor head, microseconds until due.
    pub deferred: Vec<(u32, u16, u64)>,
}

impl<M: AddressSpace> ImsSlots<M> {
    /// The device's state at `now`.
    #[must_use]
    pub fn snapshot(&self, now: Instant) -> SlotsSnapshot {
        SlotsSnapshot {
            config: self.config.raw().to_vec(),
            slots: self.slots.iter().map(|s| (s.message, s.control)).collect(),
            queues: self
                .queues
                .iter()
                .map(|q| (QueueSnapshot::of(&q.queue), q.slot))
                .collect(),
            select: self.select,
            status: self.status,
            error_slot: self.error_slot,
            completions: self.completions,
            faults: self.faults,
            delay_us: u64::try_from(self.delay.as_micros()).unwrap_or(u64::MAX),
            notified: self.notified.iter().copied().collect(),
            deferred: self.deferred.snapshot(now),
        }
    }

    /// A device like [`ImsSlots::new`] makes, in the state `snap` describes.
    ///
    /// # Errors
    /// A snapshot of another shape (slot or queue count, configuration size) or with a
    /// field out of range; nothing is built.
    pub fn restore(
        requester: u16,
        path: std::sync::Arc<dyn MessageSink>,
        mem: M,
        snap: &SlotsSnapshot,
        now: Instant,
    ) -> Result<Self, RestoreError> {
        let slots = u32::try_from(snap.slots.len()).map_err(|_| RestoreError("slot count"))?;
        let queues = u32::try_from(snap.queues.len()).map_err(|_| RestoreError("queue count"))?;
        if slots == 0 || slots > super::MAX_SLOTS || queues == 0 || queues > slots {
            return Err(RestoreError("slot or queue count out of range"));
        }
        let mut dev = Self::new(slots, queues, requester, path, mem)
            .map_err(|_| RestoreError("the device's eventfd"))?;
        dev.config.restore_raw(&snap.config)?;
        for (slot, &(message, control)) in dev.slots.iter_mut().zip(&snap.slots) {
            *slot = Slot { message, control };
        }
        for (q, (state, bound)) in dev.queues.iter_mut().zip(&snap.queues) {
            if *bound >= slots {
                return Err(RestoreError("a queue is bound to a slot beyond the array"));
            }
            state.apply(&mut q.queue, MAX_QUEUE_SIZE)?;
            q.slot = *bound;
        }
        if snap.notified.iter().any(|&q| q >= queues) {
            return Err(RestoreError("a notified queue beyond the device"));
        }
        dev.select = snap.select;
        dev.status = snap.status;
        dev.error_slot = snap.error_slot;
        dev.completions = snap.completions;
        dev.faults = snap.faults;
        dev.delay = Duration::from_micros(snap.delay_us.min(u64::from(u32::MAX)));
        dev.notified = snap.notified.iter().copied().collect();
        dev.deferred = crate::ims::Deferred::restore(&snap.deferred, queues, now)?;
        Ok(dev)
    }
}
