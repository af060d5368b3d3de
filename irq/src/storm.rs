//! Interrupt-storm control for the data path.
//!
//! Each entry may deliver at most `budget` interrupts per [`WINDOW`]. A signal beyond that
//! is **coalesced**, not dropped: the entry is marked pending and counted as throttled,
//! and `Storms::take_pending` (called every window by the VMM's storm ticker) hands it
//! back for one delivery. MSIs are edges and interrupts of one entry merge in the target
//! LAPIC anyway, so one delivery stands for all the signals it replaced: the guest sees at
//! most `budget` + 1 interrupts per window from a storming entry, and every other entry is
//! untouched (the accounting is per entry and lock-free on the hot path).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The accounting window.
pub const WINDOW: Duration = Duration::from_millis(10);
/// Windows per second.
const WINDOWS_PER_SECOND: u32 = 100;

/// What storm control did, for reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StormStats {
    /// The limit, in interrupts per second per entry (0: none).
    pub rate: u32,
    /// Signals coalesced instead of delivered at once.
    pub throttled: u64,
    /// Distinct entries that were ever throttled.
    pub entries: u64,
    /// Coalesced deliveries made afterwards.
    pub flushed: u64,
}

/// Per-entry storm accounting.
#[derive(Debug)]
pub(crate) struct Storms {
    rate: AtomicU32,
    budget: AtomicU32,
    epoch: Instant,
    /// Per entry: window number (high half) and deliveries in it (low half).
    windows: Box<[AtomicU64]>,
    pending: Box<[AtomicBool]>,
    ever: Box<[AtomicBool]>,
    queue: Mutex<Vec<u32>>,
    throttled: AtomicU64,
    entries: AtomicU64,
    flushed: AtomicU64,
}

impl Storms {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            rate: AtomicU32::new(0),
            budget: AtomicU32::new(0),
            epoch: Instant::now(),
            windows: (0..size).map(|_| AtomicU64::new(0)).collect(),
            pending: (0..size).map(|_| AtomicBool::new(false)).collect(),
            ever: (0..size).map(|_| AtomicBool::new(false)).collect(),
            queue: Mutex::new(Vec::new()),
            throttled: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    /// At most `per_second` interrupts per second per entry (0: no limit); rounded up to
    /// a whole number per window.
    pub(crate) fn set_rate(&self, per_second: u32) {
        self.rate.store(per_second, Ordering::Relaxed);
        self.budget
            .store(per_second.div_ceil(WINDOWS_PER_SECOND), Ordering::Relaxed);
    }

    fn window_now(&self) -> u64 {
        let ms = self.epoch.elapsed().as_millis() / WINDOW.as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX) & 0xffff_ffff
    }

    /// Whether entry `index` may deliver now; if not, the signal is coalesced.
    pub(crate) fn admit(&self, index: u32) -> bool {
        let budget = u64::from(self.budget.load(Ordering::Relaxed));
        let Some(cell) = self.windows.get(index as usize).filter(|_| budget > 0) else {
            return true;
        };
        let now = self.window_now();
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 != now {
                (now << 32) | 1
            } else if cur & 0xffff_ffff < budget {
                cur + 1
            } else {
                break;
            };
            match cell.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
        self.throttled.fetch_add(1, Ordering::Relaxed);
        crate::warn_limited!(
            "interrupt storm: entry {index} is over its rate; its signals are coalesced"
        );
        tracing::info!(target: "irvm::ir", kind = "coalesced", index);
        if self
            .ever
            .get(index as usize)
            .is_some_and(|e| !e.swap(true, Ordering::Relaxed))
        {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        if self
            .pending
            .get(index as usize)
            .is_some_and(|p| !p.swap(true, Ordering::AcqRel))
        {
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(index);
        }
        false
    }

    /// The entries with a coalesced interrupt, each once; they are no longer pending.
    pub(crate) fn take_pending(&self) -> Vec<u32> {
        let taken = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
        for &index in &taken {
            if let Some(p) = self.pending.get(index as usize) {
                p.store(false, Ordering::Release);
            }
        }
        taken
    }

    pub(crate) fn count_flushed(&self, n: u64) {
        self.flushed.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> StormStats {
        StormStats {
            rate: self.rate.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            flushed: self.flushed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_admits_everything() {
        let s = Storms::new(4);
        assert!((0..10_000).all(|_| s.admit(1)));
        assert_eq!(s.stats().throttled, 0);
    }

    #[test]
    fn a_storming_entry_is_coalesced_and_others_are_not() {
        let s = Storms::new(4);
        s.set_rate(300); // 3 per window
        let begin = Instant::now();
        let admitted = (0..100).filter(|_| s.admit(2)).count();
        // Unless the window turned meanwhile, exactly the budget went through.
        if begin.elapsed() < WINDOW / 2 {
            assert_eq!(admitted, 3);
            assert_eq!(s.stats().throttled, 97);
        }
        assert!(
            (0..3).all(|_| s.admit(1)),
            "another entry has its own budget"
        );
        assert_eq!(
            s.take_pending(),
            vec![2],
            "pending once, however many coalesced"
        );
        assert!(s.take_pending().is_empty());
        assert_eq!(s.stats().entries, 1);
        std::thread::sleep(WINDOW * 2);
        assert!(s.admit(2), "a new window has a new budget");
    }

    #[test]
    fn out_of_table_indexes_are_not_tracked() {
        let s = Storms::new(1);
        s.set_rate(1);
        assert!((0..10).all(|_| s.admit(7)));
    }
}
