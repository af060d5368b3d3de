//! The data path: what device models call, per interrupt. "Signal the interrupt behind
//! entry `i` as requester `s`" takes a read lock on that one entry's slot, checks the
//! requester against the entry, and writes the line's eventfd; KVM injects the route the
//! eventfd is attached to, in the kernel. Faults are counted per entry and queued for the
//! front ends ([`crate::faults`]). The control path ([`crate::backing`]) publishes what
//! each slot holds; it takes a slot's write lock only to swap it, never across an ioctl.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vmm_sys_util::eventfd::EventFd;

use crate::faults::{FaultLog, FaultSink};
use crate::irte::SourceValidation;
use crate::msi::{DecodedMsi, MsiMessage};
use crate::port::{Gsi, MsiInjector};
use crate::remap::{Fault, FaultReason};
use crate::storm::{StormStats, Storms};

/// The requester check of a live entry: who may raise it, and whether its faults are
/// suppressed (FPD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Who may raise it.
    pub(crate) validation: SourceValidation,
    /// Fault processing disabled: its faults are counted, not recorded.
    pub(crate) fpd: bool,
}

/// The eventfd of a route, attached to it as an irqfd.
#[derive(Debug)]
pub(crate) struct Line {
    pub(crate) fd: EventFd,
    pub(crate) gsi: Gsi,
}

/// What the data path sees for one entry.
#[derive(Debug, Default)]
pub(crate) enum Published {
    /// Not present: a request faults with reason 0x22.
    #[default]
    Absent,
    /// Present but unusable (reserved bits, posted format): reason 0x24.
    Faulty(FaultReason),
    /// Live: check the requester, write the line.
    Live {
        /// The line of the entry's target.
        line: Arc<Line>,
        /// The requester check.
        policy: Policy,
    },
}

/// Where the data path reports faults and sends compatibility-format requests.
#[derive(Default)]
struct Hooks {
    sink: Option<Arc<dyn FaultSink>>,
    compat: Option<Arc<dyn MsiInjector>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("sink", &self.sink.is_some())
            .field("compat", &self.compat.is_some())
            .finish()
    }
}

/// The device-facing side: cheap, per entry, never waiting for the control path's ioctls.
#[derive(Debug)]
pub struct InterruptPath {
    pub(crate) slots: Box<[RwLock<Published>]>,
    delivered: Box<[AtomicU64]>,
    faults_per_entry: Box<[AtomicU32]>,
    faults: FaultLog,
    pub(crate) block_compatibility: AtomicBool,
    write_errors: AtomicU64,
    hooks: RwLock<Hooks>,
    /// Entries in use by the front end's table (indexes at or beyond fault with 0x21).
    pub(crate) active_size: AtomicU32,
    storms: Storms,
}

impl InterruptPath {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            slots: (0..size).map(|_| RwLock::new(Published::Absent)).collect(),
            delivered: (0..size).map(|_| AtomicU64::new(0)).collect(),
            faults_per_entry: (0..size).map(|_| AtomicU32::new(0)).collect(),
            faults: FaultLog::default(),
            block_compatibility: AtomicBool::new(true),
            write_errors: AtomicU64::new(0),
            hooks: RwLock::new(Hooks::default()),
            active_size: AtomicU32::new(size),
            storms: Storms::new(size),
        }
    }

    /// Storm control: at most `per_second` interrupts per second from each entry (0: no
    /// limit); signals beyond it are coalesced into one later delivery by
    /// [`Self::flush_throttled`] (see [`crate::storm`]).
    pub fn set_storm_rate(&self, per_second: u32) {
        self.storms.set_rate(per_second);
    }

    /// Delivers the coalesced interrupt of every entry that was throttled since the last
    /// call, through its line as published now (an entry gone meanwhile gets nothing).
    /// Call it every [`crate::storm::WINDOW`] while storm control is on. Returns how many
    /// were delivered.
    pub fn flush_throttled(&self) -> usize {
        let mut n = 0;
        for index in self.storms.take_pending() {
            let Some(slot) = self.slots.get(index as usize) else {
                continue;
            };
            if let Published::Live { line, .. } =
                &*slot.read().unwrap_or_else(PoisonError::into_inner)
            {
                if line.fd.write(1).is_err() {
                    self.write_errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }
        self.storms.count_flushed(n as u64);
        n
    }

    /// What storm control did.
    #[must_use]
    pub fn storm_stats(&self) -> StormStats {
        self.storms.stats()
    }

    /// Sends every recorded fault to `sink` too.
    pub fn set_fault_sink(&self, sink: Arc<dyn FaultSink>) {
        self.hooks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .sink = Some(sink);
    }

    /// Delivers compatibility-format requests through `injector` while they are not
    /// blocked (without it they always fault).
    pub fn set_compat_injector(&self, injector: Arc<dyn MsiInjector>) {
        self.hooks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .compat = Some(injector);
    }

    /// Records `count` requests from `source_id` to entry `index` that were dropped with
    /// `reason`: an external source's writes while its entry could not take them
    /// (`backing::bound`). One fault record; the entry's fault count grows by `count`.
    pub(crate) fn dropped(&self, index: u32, source_id: u16, reason: FaultReason, count: u64) {
        if count == 0 {
            return;
        }
        self.fault(reason, Some(index), source_id, false);
        if let Some(n) = self.faults_per_entry.get(index as usize) {
            let more = u32::try_from(count - 1).unwrap_or(u32::MAX);
            n.fetch_add(more, Ordering::Relaxed);
        }
    }

    fn fault(
        &self,
        reason: FaultReason,
        index: Option<u32>,
        source_id: u16,
        suppressed: bool,
    ) -> Fault {
        let fault = Fault {
            reason,
            source_id,
            index,
            suppressed,
        };
        if let Some(n) = index.and_then(|i| self.faults_per_entry.get(i as usize)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        if !suppressed {
            self.faults.record(fault);
            let sink = self
                .hooks
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .sink
                .clone();
            if let Some(sink) = sink {
                sink.fault(&fault);
            }
        }
        fault
    }

    /// Raises the interrupt behind entry `index` on behalf of requester `source_id`.
    ///
    /// # Errors
    /// The [`Fault`] (also counted, and queued unless the entry suppresses it): the
    /// interrupt was not delivered.
    pub fn signal(&self, index: u32, source_id: u16) -> Result<(), Fault> {
        let in_table = index < self.active_size.load(Ordering::Relaxed);
        let Some(slot) = self.slots.get(index as usize).filter(|_| in_table) else {
            return Err(self.fault(FaultReason::IndexOutOfRange, Some(index), source_id, false));
        };
        // The slot lock is released before a fault is recorded: the fault sink (a
        // front end) may hold its own lock while it commits transactions.
        let refused = {
            let published = slot.read().unwrap_or_else(PoisonError::into_inner);
            match &*published {
                Published::Absent => Some((FaultReason::NotPresent, false)),
                Published::Faulty(reason) => Some((*reason, false)),
                Published::Live { line, policy } => {
                    let Policy { validation, fpd } = *policy;
                    if validation.allows(source_id) {
                        if !self.storms.admit(index) {
                            // Coalesced: delivered by the next flush.
                        } else if line.fd.write(1).is_err() {
                            self.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    } else {
                        Some((FaultReason::SourceIdMismatch, fpd))
                    }
                }
            }
        };
        match refused {
            Some((reason, suppressed)) => {
                Err(self.fault(reason, Some(index), source_id, suppressed))
            }
            None => {
                if let Some(n) = self.delivered.get(index as usize) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(target: "irvm::ir", kind = "signal", index, requester = source_id);
                Ok(())
            }
        }
    }

    /// Raises the interrupt a device wrote as `msg` (an IMS slot's or MSI-X entry's
    /// message) on behalf of requester `source_id`.
    ///
    /// # Errors
    /// The [`Fault`]: a malformed request (0x20), a compatibility-format message (0x25:
    /// with remapping on, only remappable messages are backed), or any fault of
    /// [`Self::signal`].
    pub fn signal_msi(&self, msg: &MsiMessage, source_id: u16) -> Result<(), Fault> {
        match msg.decode() {
            Err(_) => Err(self.fault(FaultReason::RequestReserved, None, source_id, false)),
            Ok(DecodedMsi::Compatibility(_)) => {
                let compat = self
                    .hooks
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .compat
                    .clone();
                match compat {
                    Some(injector) if !self.blocks_compatibility() => {
                        if injector.inject(msg).is_err() {
                            self.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    _ => Err(self.fault(FaultReason::CompatibilityBlocked, None, source_id, false)),
                }
            }
            Ok(decoded) => self.signal(decoded.index().unwrap_or(u32::MAX), source_id),
        }
    }

    /// Whether compatibility-format requests are blocked.
    #[must_use]
    pub fn blocks_compatibility(&self) -> bool {
        self.block_compatibility.load(Ordering::Relaxed)
    }

    /// Interrupts delivered through entry `index`.
    #[must_use]
    pub fn delivered(&self, index: u32) -> u64 {
        self.delivered
            .get(index as usize)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Faults raised by requests for entry `index` (recorded or suppressed).
    #[must_use]
    pub fn faults(&self, index: u32) -> u32 {
        self.faults_per_entry
            .get(index as usize)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// The fault log.
    #[must_use]
    pub fn fault_log(&self) -> &FaultLog {
        &self.faults
    }

    /// Eventfd writes that failed (the eventfd counter was saturated).
    #[must_use]
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Whether entry `index` is live.
    #[must_use]
    pub fn is_live(&self, index: u32) -> bool {
        self.line_fd(index).is_some()
    }

    /// The raw fd of entry `index`'s line (for tests that ask a fake where it delivers).
    #[must_use]
    pub fn line_fd(&self, index: u32) -> Option<i32> {
        let slot = self.slots.get(index as usize)?;
        match &*slot.read().unwrap_or_else(PoisonError::into_inner) {
            Published::Live { line, .. } => Some(line.fd.as_raw_fd()),
            _ => None,
        }
    }
}

/// Where a device model sends the messages it raises (an IMS slot's, an MSI-X entry's):
/// the core's data path in the VMM's own process, or, for a device served to a VMM in
/// another process, a table of the eventfds that VMM handed over per remapping entry.
/// The device model does not know which.
pub trait MessageSink: Send + Sync {
    /// Raises the interrupt `msg` names, on behalf of requester `source_id`.
    ///
    /// # Errors
    /// The [`Fault`] that blocked it; the device counts it.
    fn signal_msi(&self, msg: &MsiMessage, source_id: u16) -> Result<(), Fault>;
}

impl MessageSink for InterruptPath {
    fn signal_msi(&self, msg: &MsiMessage, source_id: u16) -> Result<(), Fault> {
        InterruptPath::signal_msi(self, msg, source_id)
    }
}
