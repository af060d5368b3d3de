//! Faults recorded by the data path, for the front ends: a bounded queue (older faults
//! dropped and counted), totals by reason, and a sink told of each as it happens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::remap::{Fault, FaultReason};

/// Faults kept for the front ends to read before older ones are dropped (and counted).
pub const FAULT_QUEUE_LEN: usize = 256;

/// Faults recorded by the data path, for the front ends (the vIOMMU's fault registers,
/// the hypercall's statistics).
#[derive(Debug, Default)]
pub struct FaultLog {
    queue: Mutex<std::collections::VecDeque<Fault>>,
    dropped: AtomicU64,
    by_reason: [AtomicU64; 7],
}

fn reason_slot(reason: FaultReason) -> usize {
    (reason.code() - FaultReason::RequestReserved.code()) as usize
}

impl FaultLog {
    pub(crate) fn record(&self, fault: Fault) {
        if let Some(n) = self.by_reason.get(reason_slot(fault.reason)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        crate::warn_limited!(
            "interrupt remapping fault {:#x} ({:?}): requester {:04x}, index {}; not delivered",
            fault.reason.code(),
            fault.reason,
            fault.source_id,
            fault.index.map_or("none".to_string(), |i| i.to_string())
        );
        tracing::info!(
            target: "irvm::faults",
            kind = "ir",
            reason = %format_args!("{:#x}", fault.reason.code()),
            name = ?fault.reason,
            requester = %format_args!("{:#06x}", fault.source_id),
            index = fault.index,
        );
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.len() >= FAULT_QUEUE_LEN {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(fault);
    }

    /// Takes the queued faults, oldest first.
    pub fn drain(&self) -> Vec<Fault> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    /// Faults recorded with `reason` since the start.
    #[must_use]
    pub fn count(&self, reason: FaultReason) -> u64 {
        self.by_reason
            .get(reason_slot(reason))
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Faults dropped because the queue was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Told about every recorded fault, on the thread that raised it (the vIOMMU's fault
/// recording registers and fault event interrupt hang off this).
pub trait FaultSink: Send + Sync {
    /// A fault was recorded (not one an entry suppresses with FPD).
    fn fault(&self, fault: &Fault);
}
