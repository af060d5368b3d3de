//! The queue-memory device's state, for snapshots: configuration space and MSI-X, the
//! running queue contexts (queue state, cached message, pending bit), the admin queue and
//! a command still waiting (with the time left before it times out), the fault-injection
//! knobs, counters, and the work still owed.

use std::time::{Duration, Instant};

use irq::MessageSink;
use irq::MsiMessage;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::{
    ImsQueues, QueueStats, Running, Waiting, MAX_ADMIN_SIZE, MAX_CONTEXTS, MAX_QUEUE_SIZE,
};
use crate::ims::snapshot::{QueueSnapshot, RestoreError};
use crate::memory::AddressSpace;
use crate::pci::msix::{Msix, MsixSnapshot};

/// One running queue context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextSnapshot {
    /// Its number.
    pub id: u32,
    /// Its queue.
    pub queue: QueueSnapshot,
    /// Where the context sits in guest memory.
    pub address: u64,
    /// The cached message: address, data.
    pub message: (u64, u32),
    /// An interrupt latched while the context's mask was set.
    pub pending: bool,
}

/// A command that has not completed: its entry, the context it drains, the microseconds
/// left before it times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingSnapshot {
    /// The command's entry in the admin ring.
    pub entry: u64,
    /// The context a `STOP` drains.
    pub draining: Option<u32>,
    /// Microseconds before it times out.
    pub left_us: u64,
}

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuesSnapshot {
    /// Configuration space bytes.
    pub config: Vec<u8>,
    /// MSI-X table, pending bits and control.
    pub msix: MsixSnapshot,
    /// Queue contexts the device has.
    pub contexts: u32,
    /// The running ones, by ascending number.
    pub running: Vec<ContextSnapshot>,
    /// Admin ring base.
    pub admin_base: u64,
    /// Admin ring entries.
    pub admin_size: u32,
    /// Admin ring head.
    pub admin_head: u32,
    /// Admin ring tail.
    pub admin_tail: u32,
    /// Whether the admin ring runs.
    pub admin_enabled: bool,
    /// A command that has not completed.
    pub waiting: Option<WaitingSnapshot>,
    /// `STATUS`.
    pub status: u32,
    /// The command timeout, microseconds.
    pub timeout_us: u64,
    /// Injected completion delay, microseconds.
    pub delay_us: u64,
    /// Interrupts still to drop on purpose.
    pub drop: u32,
    /// Commands still to stall on purpose.
    pub stall: u32,
    /// A reset is due.
    pub reset_due: bool,
    /// Counters.
    pub stats: QueueStats,
    /// Work taken off the rings: context, head, microseconds until due.
    pub deferred: Vec<(u32, u16, u64)>,
    /// Contexts notified and not yet looked at.
    pub notified: Vec<u32>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl<M: AddressSpace> ImsQueues<M> {
    /// The device's state at `now`.
    #[must_use]
    pub fn snapshot(&self, now: Instant) -> QueuesSnapshot {
        QueuesSnapshot {
            config: self.config.raw().to_vec(),
            msix: self.msix.snapshot(),
            contexts: u32::try_from(self.contexts.len()).unwrap_or(u32::MAX),
            running: (0u32..)
                .zip(&self.contexts)
                .filter_map(|(id, c)| {
                    c.as_ref().map(|r| ContextSnapshot {
                        id,
                        queue: QueueSnapshot::of(&r.queue),
                        address: r.address,
                        message: (r.message.address, r.message.data),
                        pending: r.pending,
                    })
                })
                .collect(),
            admin_base: self.admin_base,
            admin_size: self.admin_size,
            admin_head: self.admin_head,
            admin_tail: self.admin_tail,
            admin_enabled: self.admin_enabled,
            waiting: self.waiting.map(|w| WaitingSnapshot {
                entry: w.entry,
                draining: w.draining,
                left_us: micros(w.deadline.saturating_duration_since(now)),
            }),
            status: self.status,
            timeout_us: micros(self.timeout),
            delay_us: micros(self.delay),
            drop: self.drop,
            stall: self.stall,
            reset_due: self.reset_due,
            stats: self.stats,
            deferred: self.deferred.snapshot(now),
            notified: self.notified.iter().copied().collect(),
        }
    }

    /// A device like [`ImsQueues::new`] makes, in the state `snap` describes.
    ///
    /// # Errors
    /// A field out of range or of another shape; nothing is built.
    pub fn restore(
        requester: u16,
        path: std::sync::Arc<dyn MessageSink>,
        mem: M,
        snap: &QueuesSnapshot,
        now: Instant,
    ) -> Result<Self, RestoreError> {
        let n = snap.contexts;
        if !(1..=MAX_CONTEXTS).contains(&n) {
            return Err(RestoreError("context count out of range"));
        }
        if snap.admin_enabled
            && !(snap.admin_size.is_power_of_two() && snap.admin_size <= MAX_ADMIN_SIZE)
        {
            return Err(RestoreError("an enabled admin ring of an invalid size"));
        }
        if snap.notified.iter().any(|&c| c >= n)
            || snap
                .waiting
                .and_then(|w| w.draining)
                .is_some_and(|c| c >= n)
        {
            return Err(RestoreError("a context beyond the device"));
        }
        let mut dev =
            Self::new(n, requester, path, mem).map_err(|_| RestoreError("the device's eventfd"))?;
        dev.config.restore_raw(&snap.config)?;
        dev.msix = Msix::restore(&snap.msix, 1)?;
        let mut previous = None;
        for c in &snap.running {
            if previous.is_some_and(|p| p >= c.id) {
                return Err(RestoreError("running contexts repeated or out of order"));
            }
            previous = Some(c.id);
            let mut queue =
                Queue::new(MAX_QUEUE_SIZE).map_err(|_| RestoreError("a queue of the device"))?;
            c.queue.apply(&mut queue, MAX_QUEUE_SIZE)?;
            let slot = dev
                .contexts
                .get_mut(c.id as usize)
                .ok_or(RestoreError("a running context beyond the device"))?;
            *slot = Some(Running {
                queue,
                address: c.address,
                message: MsiMessage {
                    address: c.message.0,
                    data: c.message.1,
                },
                pending: c.pending,
            });
        }
        let capped = |us: u64| Duration::from_micros(us.min(u64::from(u32::MAX)));
        dev.admin_base = snap.admin_base;
        dev.admin_size = snap.admin_size;
        dev.admin_head = snap.admin_head;
        dev.admin_tail = snap.admin_tail;
        dev.admin_enabled = snap.admin_enabled;
        dev.waiting = snap.waiting.map(|w| Waiting {
            entry: w.entry,
            draining: w.draining,
            deadline: now + capped(w.left_us),
        });
        dev.status = snap.status;
        dev.timeout = capped(snap.timeout_us);
        dev.delay = capped(snap.delay_us);
        dev.drop = snap.drop;
        dev.stall = snap.stall;
        dev.reset_due = snap.reset_due;
        dev.stats = snap.stats;
        dev.deferred = crate::ims::Deferred::restore(&snap.deferred, n, now)?;
        dev.notified = snap.notified.iter().copied().collect();
        Ok(dev)
    }
}
