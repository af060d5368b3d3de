//! What backs every live remapped interrupt, and the transactions that change it.
//!
//! A KVM MSI route describes a *translated target* (destination, vector, modes). The
//! routes here are a cache of targets: each has one **line**, an eventfd attached to it as
//! an irqfd, and every present IRTE whose translated target is that route's points at its
//! line. KVM injects once per eventfd write, and two interrupts with the same target merge
//! in the LAPIC whether they came through one eventfd or two, so sharing loses nothing.
//! Live interrupts are therefore bounded by neither KVM's 4096 routes nor the process's
//! file descriptors (only distinct targets are); an absent IRTE costs nothing.
//!
//! Two halves, two locks:
//!
//! - The **data path**, [`InterruptPath`], is what device models call: "signal the
//!   interrupt behind entry `i` from requester `s`". It takes a read lock on that one
//!   entry's slot, checks the requester against the entry, and writes the line's eventfd;
//!   KVM does the rest in the kernel. Faults are counted per entry and queued for the
//!   front ends.
//! - The **control path**, [`Backing`], owns the remapping table, the route table and the
//!   lines. Changes are staged in a [`Transaction`] and applied by
//!   [`Transaction::commit`] with at most one `KVM_SET_GSI_ROUTING`. It takes an entry's
//!   write lock only to swap what is published there, never across an ioctl.
//!
//! Commit order, so that a failure anywhere leaves the previous state working:
//!
//! 1. plan: decode each staged entry; decide whether it keeps its line, joins the line of
//!    a routed target, needs a new route, or (as the sole user of its route, in a
//!    transaction that creates no route) has its route rewritten in place; check quotas
//!    and the route budget;
//! 2. one route commit: new routes, in-place rewrites, and the removal of routes whose
//!    lines earlier transactions retired;
//! 3. new lines for the new routes (an irqfd needs its route first);
//! 4. publish: swap every changed entry's slot;
//! 5. retire lines left without users: detach their irqfds (their routes go with the next
//!    commit, as the kernel wants irqfds gone before their route).
//!
//! Steps 1-3 undo what they did on failure, and nothing a device sees changes before step
//! 4, which cannot fail (a failed detach in step 5 is counted). A retarget to a target
//! that already has a route is a pointer swap: no ioctl at all. The interrupt after the
//! swap goes to the new target; one written just before it was injected, synchronously,
//! through the old line.
//!
//! **Managed** entries get a guaranteed reservation when they are allocated: an eventfd
//! each in a pool, and a share of the route budget that best-effort entries may not use
//! (managed entries route through their own routes). Their activation and retargeting
//! cannot fail for lack of routes or descriptors. Best-effort entries get what is left.
//! (One corner is not covered: a transaction that both creates routes and moves a managed
//! entry off a route it was the only user of holds that old route until the next commit.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::irte::{Irte, SourceValidation};
use crate::msi::{DecodedMsi, MsiMessage};
use crate::remap::{Fault, FaultReason, RemapError, RemapTable};
use crate::routes::{Gsi, RouteError, RouteTable, RoutingBackend};
use crate::storm::{StormStats, Storms};

/// Faults kept for the front ends to read before older ones are dropped (and counted).
pub const FAULT_QUEUE_LEN: usize = 256;

pub mod snapshot;

// ---- Data path ----------------------------------------------------------------------------

/// The requester check of a live entry, packed: bits 1:0 SVT, 3:2 SQ, 4 FPD, 31:16 SID.
fn pack_policy(validation: SourceValidation, fpd: bool) -> u32 {
    let (svt, sq, sid) = match validation {
        SourceValidation::None => (0, 0, 0),
        SourceValidation::RequesterId { sid, qualifier } => (1, u32::from(qualifier & 3), sid),
        SourceValidation::BusRange { first, last } => {
            (2, 0, (u16::from(first) << 8) | u16::from(last))
        }
    };
    svt | (sq << 2) | (u32::from(fpd) << 4) | (u32::from(sid) << 16)
}

fn unpack_policy(policy: u32) -> (SourceValidation, bool) {
    let sid = (policy >> 16) as u16;
    let validation = match policy & 3 {
        1 => SourceValidation::RequesterId {
            sid,
            qualifier: ((policy >> 2) & 3) as u8,
        },
        2 => SourceValidation::BusRange {
            first: (sid >> 8) as u8,
            last: (sid & 0xff) as u8,
        },
        _ => SourceValidation::None,
    };
    (validation, policy & (1 << 4) != 0)
}

/// The eventfd of a route, attached to it as an irqfd.
#[derive(Debug)]
struct Line {
    fd: EventFd,
    gsi: Gsi,
}

/// What the data path sees for one entry.
#[derive(Debug, Default)]
enum Published {
    /// Not present: a request faults with reason 0x22.
    #[default]
    Absent,
    /// Present but unusable (reserved bits, posted format): reason 0x24.
    Faulty(FaultReason),
    /// Live: check the requester, write the line.
    Live {
        /// The line of the entry's target.
        line: Arc<Line>,
        /// The packed requester check.
        policy: u32,
    },
}

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
    fn record(&self, fault: Fault) {
        if let Some(n) = self.by_reason.get(reason_slot(fault.reason)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
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

/// Injects an MSI directly (`KVM_SIGNAL_MSI`): for interrupts that are not remapped, such
/// as a remapping unit's own event interrupts, or compatibility-format requests while
/// those are allowed.
pub trait MsiInjector: Send + Sync {
    /// Injects `msg`.
    ///
    /// # Errors
    /// The kernel's error.
    fn inject(&self, msg: &MsiMessage) -> std::io::Result<()>;
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
    slots: Box<[RwLock<Published>]>,
    delivered: Box<[AtomicU64]>,
    faults_per_entry: Box<[AtomicU32]>,
    faults: FaultLog,
    block_compatibility: AtomicBool,
    write_errors: AtomicU64,
    hooks: RwLock<Hooks>,
    /// Entries in use by the front end's table (indexes at or beyond fault with 0x21).
    active_size: AtomicU32,
    storms: Storms,
}

impl InterruptPath {
    fn new(size: u32) -> Self {
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
                    let (validation, fpd) = unpack_policy(*policy);
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

// ---- Control path -------------------------------------------------------------------------

/// Limits of one VM's remapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Entries in the remapping table (1 to 65536).
    pub table_size: u32,
    /// Extended interrupt mode: IRTE destinations are x2APIC IDs.
    pub eim: bool,
    /// Live (present) entries the VM may have at once.
    pub max_live: u32,
    /// Entries one requester (source-id) may have allocated.
    pub max_per_device: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            table_size: 1 << 16,
            eim: true,
            max_live: 1 << 16,
            max_per_device: 1 << 16,
        }
    }
}

/// How to allocate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocFlags {
    /// Guarantee the entries' later activation (reserve an eventfd and route budget now).
    pub managed: bool,
    /// Align the block to the next power of two of its size (for multi-message MSI,
    /// where the device adds the vector number to the subhandle).
    pub aligned: bool,
}

/// Why a control-path operation failed. After every one of them the previous state is
/// intact.
#[derive(Debug, Error)]
pub enum BackingError {
    /// A count of zero or beyond the table.
    #[error("invalid entry count {0}")]
    BadCount(u32),
    /// No free block of the requested size (and alignment).
    #[error("no free block of {0} entries in the remapping table")]
    NoSpace(u32),
    /// The requester would exceed its quota.
    #[error("requester {source_id:#06x} would exceed its quota of {quota} entries")]
    DeviceQuota {
        /// The requester.
        source_id: u16,
        /// Its quota.
        quota: u32,
    },
    /// The VM would exceed its quota of live entries.
    #[error("the VM would exceed its quota of {0} live interrupts")]
    VmQuota(u32),
    /// No KVM route is left for a new target (best-effort entries; managed entries have a
    /// reservation).
    #[error("no KVM route is free for a new interrupt target")]
    RoutesExhausted,
    /// An index beyond the table.
    #[error("entry {0} is outside the remapping table")]
    IndexOutOfRange(u32),
    /// The entry is not allocated.
    #[error("entry {0} is not allocated")]
    NotAllocated(u32),
    /// The entry belongs to another requester.
    #[error("entry {index} belongs to requester {owner:#06x}")]
    NotOwner {
        /// The entry.
        index: u32,
        /// Its owner.
        owner: u16,
    },
    /// An eventfd could not be created (file descriptors exhausted).
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A routing operation failed.
    #[error("interrupt routing failed")]
    Route(#[from] RouteError),
}

impl From<RemapError> for BackingError {
    fn from(e: RemapError) -> Self {
        match e {
            RemapError::BadSize(n) => Self::BadCount(n),
            RemapError::IndexOutOfRange { index, .. } => Self::IndexOutOfRange(index),
        }
    }
}

/// A route of the cache: a translated target, and whose pool it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RouteKey {
    msg: MsiMessage,
    managed: bool,
}

/// A cached route and its line (`None` once retired: the route goes with the next commit).
#[derive(Debug)]
struct CachedRoute {
    gsi: Gsi,
    line: Option<Arc<Line>>,
    users: u32,
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    source_id: u16,
    managed: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    owner: Option<Owner>,
    live: Option<RouteKey>,
}

/// Counters of the control path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackingStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Transactions that failed and were rolled back.
    pub rollbacks: u64,
    /// `KVM_SET_GSI_ROUTING` calls (including the initial one).
    pub route_commits: u64,
    /// Time spent in them.
    pub route_commit_time: Duration,
    /// Time spent in the last one.
    pub last_route_commit_time: Duration,
    /// irqfd detaches that failed while retiring lines (the line is dropped anyway).
    pub retire_errors: u64,
    /// Live entries.
    pub live: u32,
    /// Lines (routes with an attached eventfd).
    pub lines: u32,
}

/// One route of the cache, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    /// Its GSI.
    pub gsi: Gsi,
    /// The translated message it carries.
    pub msg: MsiMessage,
    /// Live entries on its line.
    pub users: u32,
    /// Whether it belongs to the managed pool.
    pub managed: bool,
}

/// The control side of one VM's interrupt remapping.
#[derive(Debug)]
pub struct Backing<B: RoutingBackend> {
    routes: RouteTable<B>,
    table: RemapTable,
    path: Arc<InterruptPath>,
    entries: Vec<Entry>,
    cache: HashMap<RouteKey, CachedRoute>,
    /// Routes left without a line by a failed transaction: removed by the next commit.
    orphans: Vec<Gsi>,
    limits: Limits,
    live: u32,
    allocated: u32,
    per_device: HashMap<u16, u32>,
    managed_allocated: u32,
    /// Eventfds reserved for managed lines: one per managed entry without a line of its own.
    managed_fds: Vec<EventFd>,
    stats: BackingStats,
}

/// What a staged entry will be.
#[derive(Debug, Clone, Copy)]
enum NewState {
    Absent,
    Faulty(FaultReason),
    Live { key: RouteKey, policy: u32 },
}

/// What the commit does for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Publish a non-live state.
    Unpublish,
    /// Keep the route (maybe rewritten in place); publish the new requester check.
    Keep,
    /// Move to the line of another route (existing or created by this commit).
    Join,
}

#[derive(Debug)]
struct Planned {
    index: u32,
    raw: [u64; 2],
    state: NewState,
    step: Step,
}

impl<B: RoutingBackend> Backing<B> {
    /// Takes ownership of `routes` and creates an empty table with `limits`.
    ///
    /// # Errors
    /// [`BackingError::BadCount`] for a table size outside 1..=65536.
    pub fn new(routes: RouteTable<B>, limits: Limits) -> Result<Self, BackingError> {
        let table = RemapTable::new(limits.table_size, limits.eim)?;
        let path = Arc::new(InterruptPath::new(limits.table_size));
        Ok(Self {
            routes,
            table,
            path,
            entries: vec![Entry::default(); limits.table_size as usize],
            cache: HashMap::new(),
            orphans: Vec::new(),
            limits,
            live: 0,
            allocated: 0,
            per_device: HashMap::new(),
            managed_allocated: 0,
            managed_fds: Vec::new(),
            stats: BackingStats::default(),
        })
    }

    /// The data path, for device models.
    #[must_use]
    pub fn path(&self) -> Arc<InterruptPath> {
        self.path.clone()
    }

    /// The remapping table (raw entries as last committed).
    #[must_use]
    pub fn table(&self) -> &RemapTable {
        &self.table
    }

    /// The route table, for routes that are not remapped entries (legacy pins, plain MSI
    /// routes). Routes taken here count against best-effort entries' budget only.
    pub fn routes_mut(&mut self) -> &mut RouteTable<B> {
        &mut self.routes
    }

    /// The route table.
    #[must_use]
    pub fn routes(&self) -> &RouteTable<B> {
        &self.routes
    }

    /// The limits this backing was made with.
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Limits the table to its first `size` entries, as a front end's table size says
    /// (VT-d's IRTA.S): requests beyond fault with 0x21. At most the backing's size.
    pub fn set_active_size(&mut self, size: u32) {
        let size = size.min(self.limits.table_size);
        self.path.active_size.store(size, Ordering::Relaxed);
    }

    /// Blocks (or passes) compatibility-format requests in the table and the data path.
    pub fn set_block_compatibility(&mut self, block: bool) {
        self.table.set_block_compatibility(block);
        self.path
            .block_compatibility
            .store(block, Ordering::Relaxed);
    }

    /// Control-path counters.
    #[must_use]
    pub fn stats(&self) -> BackingStats {
        let (total, last) = self.routes.commit_time();
        let lines = self.cache.values().filter(|r| r.line.is_some()).count();
        BackingStats {
            route_commits: self.routes.commits(),
            route_commit_time: total,
            last_route_commit_time: last,
            live: self.live,
            lines: u32::try_from(lines).unwrap_or(u32::MAX),
            ..self.stats
        }
    }

    /// The routes of the cache that have a line.
    #[must_use]
    pub fn route_info(&self) -> Vec<RouteInfo> {
        let mut all: Vec<_> = self
            .cache
            .iter()
            .filter(|(_, r)| r.line.is_some())
            .map(|(k, r)| RouteInfo {
                gsi: r.gsi,
                msg: k.msg,
                users: r.users,
                managed: k.managed,
            })
            .collect();
        all.sort_by_key(|r| r.gsi);
        all
    }

    /// The owner of entry `index` and whether it is managed.
    #[must_use]
    pub fn owner(&self, index: u32) -> Option<(u16, bool)> {
        let owner = self.entries.get(index as usize)?.owner?;
        Some((owner.source_id, owner.managed))
    }

    /// Entries not allocated to anyone.
    #[must_use]
    pub fn free_entries(&self) -> u32 {
        self.limits.table_size.saturating_sub(self.allocated)
    }

    /// Entries `source_id` may still allocate under its quota.
    #[must_use]
    pub fn quota_left(&self, source_id: u16) -> u32 {
        let held = self.per_device.get(&source_id).copied().unwrap_or(0);
        self.limits.max_per_device.saturating_sub(held)
    }

    /// Routes still free for best-effort targets (the managed reservation excluded).
    #[must_use]
    pub fn best_effort_routes_left(&self) -> u32 {
        let unmanaged = self.routes.staged_msi_routes() - self.managed_routes();
        let used = unmanaged + self.managed_allocated as usize;
        u32::try_from(self.routes.capacity().saturating_sub(used)).unwrap_or(u32::MAX)
    }

    /// Allocates `count` consecutive entries for requester `source_id` and returns the
    /// first. Allocation is not activation: the entries stay absent (and cost nothing
    /// but, for managed ones, their reservation) until written.
    ///
    /// # Errors
    /// [`BackingError::BadCount`], [`BackingError::DeviceQuota`],
    /// [`BackingError::NoSpace`], [`BackingError::RoutesExhausted`] (managed: the route
    /// budget cannot cover the reservation) or [`BackingError::EventFd`].
    pub fn allocate(
        &mut self,
        count: u32,
        source_id: u16,
        flags: AllocFlags,
    ) -> Result<u32, BackingError> {
        if count == 0 || count > self.limits.table_size {
            return Err(BackingError::BadCount(count));
        }
        let held = self.per_device.get(&source_id).copied().unwrap_or(0);
        if held.saturating_add(count) > self.limits.max_per_device {
            return Err(BackingError::DeviceQuota {
                source_id,
                quota: self.limits.max_per_device,
            });
        }
        let first = self
            .find_free(count, flags.aligned)
            .ok_or(BackingError::NoSpace(count))?;
        if flags.managed {
            self.reserve_managed(count)?;
        }
        for entry in self
            .entries
            .iter_mut()
            .skip(first as usize)
            .take(count as usize)
        {
            entry.owner = Some(Owner {
                source_id,
                managed: flags.managed,
            });
        }
        *self.per_device.entry(source_id).or_insert(0) += count;
        self.allocated += count;
        Ok(first)
    }

    /// Reserves eventfds and route budget for `count` more managed entries.
    fn reserve_managed(&mut self, count: u32) -> Result<(), BackingError> {
        let unmanaged = self.routes.staged_msi_routes() - self.managed_routes();
        if unmanaged + (self.managed_allocated + count) as usize > self.routes.capacity() {
            return Err(BackingError::RoutesExhausted);
        }
        let mut fds = Vec::with_capacity(count as usize);
        for _ in 0..count {
            fds.push(EventFd::new(EFD_NONBLOCK).map_err(BackingError::EventFd)?);
        }
        self.managed_fds.append(&mut fds);
        self.managed_allocated += count;
        Ok(())
    }

    fn find_free(&self, count: u32, aligned: bool) -> Option<u32> {
        let step = if aligned {
            count.next_power_of_two()
        } else {
            1
        };
        let size = self.limits.table_size;
        let mut first = 0u32;
        while first.checked_add(count)? <= size {
            match (first..first + count).rev().find(|&i| {
                self.entries
                    .get(i as usize)
                    .is_none_or(|e| e.owner.is_some())
            }) {
                None => return Some(first),
                Some(taken) => first = (taken + 1).div_ceil(step) * step,
            }
        }
        None
    }

    fn managed_routes(&self) -> usize {
        self.cache.keys().filter(|k| k.managed).count()
    }

    /// Frees `count` entries from `first`, owned by `source_id`; live ones are deactivated
    /// first.
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`], [`BackingError::NotAllocated`] or
    /// [`BackingError::NotOwner`] (nothing is freed then).
    pub fn free(&mut self, first: u32, count: u32, source_id: u16) -> Result<(), BackingError> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.limits.table_size);
        let end = end.ok_or(BackingError::IndexOutOfRange(first.saturating_add(count)))?;
        for index in first..end {
            match self.entries.get(index as usize).and_then(|e| e.owner) {
                None => return Err(BackingError::NotAllocated(index)),
                Some(o) if o.source_id != source_id => {
                    return Err(BackingError::NotOwner {
                        index,
                        owner: o.source_id,
                    })
                }
                Some(_) => {}
            }
        }
        let mut txn = self.transaction();
        for index in first..end {
            txn.write(index, [0, 0])?;
        }
        txn.commit()?;
        for index in first..end {
            let owner = self
                .entries
                .get_mut(index as usize)
                .and_then(|e| e.owner.take());
            if let Some(owner) = owner {
                self.allocated -= 1;
                if owner.managed {
                    self.managed_allocated -= 1;
                    self.managed_fds.pop();
                }
                if let Some(n) = self.per_device.get_mut(&owner.source_id) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    /// Starts a transaction. Dropping it without [`Transaction::commit`] discards it.
    pub fn transaction(&mut self) -> Transaction<'_, B> {
        Transaction {
            backing: self,
            staged: BTreeMap::new(),
        }
    }

    fn decide(&self, raw: [u64; 2], managed: bool) -> NewState {
        match Irte::decode(raw, self.limits.eim) {
            Err(_) => NewState::Faulty(FaultReason::EntryReserved),
            Ok(e) if !e.present => NewState::Absent,
            Ok(e) => NewState::Live {
                key: RouteKey {
                    msg: e.target.to_msi(),
                    managed,
                },
                policy: pack_policy(e.validation, e.fault_processing_disable),
            },
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "the five commit steps read best in one place"
    )]
    fn apply(&mut self, staged: BTreeMap<u32, [u64; 2]>) -> Result<(), BackingError> {
        // 1. Plan against a simulation of the cache: key -> (existing gsi, users after).
        let mut sim: HashMap<RouteKey, (Option<Gsi>, i64)> = self
            .cache
            .iter()
            .filter(|(_, r)| r.line.is_some())
            .map(|(k, r)| (*k, (Some(r.gsi), i64::from(r.users))))
            .collect();
        let mut plan = Vec::with_capacity(staged.len());
        let mut live_after = i64::from(self.live);
        for (&index, &raw) in &staged {
            let Some(&entry) = self.entries.get(index as usize) else {
                return Err(BackingError::IndexOutOfRange(index));
            };
            let managed = entry.owner.is_some_and(|o| o.managed);
            let state = self.decide(raw, managed);
            let step = match (entry.live, state) {
                (_, NewState::Absent | NewState::Faulty(_)) => Step::Unpublish,
                (Some(old), NewState::Live { key, .. }) if old == key => Step::Keep,
                (_, NewState::Live { key, .. }) => {
                    sim.entry(key).or_insert((None, 0)).1 += 1;
                    Step::Join
                }
            };
            if let Some(old) = entry.live {
                if step != Step::Keep {
                    if let Some(u) = sim.get_mut(&old) {
                        u.1 -= 1;
                    }
                    live_after -= 1;
                }
            }
            if step == Step::Join {
                live_after += 1;
            }
            plan.push(Planned {
                index,
                raw,
                state,
                step,
            });
        }
        if live_after > i64::from(self.limits.max_live) {
            return Err(BackingError::VmQuota(self.limits.max_live));
        }
        let new_keys: Vec<RouteKey> = sim
            .iter()
            .filter(|(_, (gsi, n))| gsi.is_none() && *n > 0)
            .map(|(k, _)| *k)
            .collect();
        // When every new route would serve one entry that leaves a route it was the only
        // user of, rewrite those routes in place: no new route, nothing left to fail after
        // the commit.
        let mut rewrites: Vec<(Gsi, RouteKey, RouteKey)> = Vec::new();
        let mut seen = HashSet::new();
        for p in &plan {
            let (NewState::Live { key, .. }, Step::Join) = (p.state, p.step) else {
                continue;
            };
            let Some(old) = self.entries.get(p.index as usize).and_then(|e| e.live) else {
                continue;
            };
            let fresh = sim
                .get(&key)
                .is_some_and(|(gsi, n)| gsi.is_none() && *n == 1);
            let emptied = sim
                .get(&old)
                .and_then(|(gsi, n)| (*n == 0).then_some(*gsi))
                .flatten();
            if let (true, Some(gsi)) = (fresh, emptied) {
                if old.managed == key.managed && seen.insert(old) {
                    rewrites.push((gsi, old, key));
                }
            }
        }
        if rewrites.len() != new_keys.len() {
            rewrites.clear();
        }
        let creates: Vec<RouteKey> = if rewrites.is_empty() {
            new_keys
        } else {
            Vec::new()
        };
        // Routes whose lines earlier transactions retired go in this commit.
        let prune: Vec<RouteKey> = self
            .cache
            .iter()
            .filter(|(_, r)| r.line.is_none())
            .map(|(k, _)| *k)
            .collect();
        let new_unmanaged = creates.iter().filter(|k| !k.managed).count();
        if new_unmanaged > 0 {
            let after =
                self.routes.staged_msi_routes() + creates.len() - prune.len() - self.orphans.len();
            let managed_after = sim.iter().filter(|(k, (_, n))| k.managed && *n > 0).count();
            let unmanaged_after = after.saturating_sub(managed_after);
            if unmanaged_after + self.managed_allocated as usize > self.routes.capacity() {
                return Err(BackingError::RoutesExhausted);
            }
        }

        // 2. One route commit.
        for gsi in self.orphans.iter().chain(
            prune
                .iter()
                .filter_map(|k| self.cache.get(k).map(|r| &r.gsi)),
        ) {
            let _ = self.routes.remove(*gsi);
        }
        let mut created: Vec<(RouteKey, Gsi)> = Vec::with_capacity(creates.len());
        for key in &creates {
            match self.routes.allocate(key.msg) {
                Ok(gsi) => created.push((*key, gsi)),
                Err(e) => {
                    self.routes.rollback();
                    return Err(match e {
                        RouteError::Exhausted { .. } => BackingError::RoutesExhausted,
                        other => other.into(),
                    });
                }
            }
        }
        for (gsi, _, key) in &rewrites {
            if let Err(e) = self.routes.update(*gsi, key.msg) {
                self.routes.rollback();
                return Err(e.into());
            }
        }
        self.routes.commit()?;
        self.orphans.clear();
        for key in &prune {
            self.cache.remove(key);
        }
        for (gsi, old, key) in &rewrites {
            if let Some(mut route) = self.cache.remove(old) {
                // Its one user rejoins under the new key when it is published.
                route.gsi = *gsi;
                route.users = 0;
                self.cache.insert(*key, route);
            }
        }

        // 3. Lines for the new routes.
        let mut lines: Vec<(RouteKey, Arc<Line>)> = Vec::with_capacity(created.len());
        for (i, (key, gsi)) in created.iter().enumerate() {
            match self.new_line(*key, *gsi) {
                Ok(line) => lines.push((*key, line)),
                Err(e) => {
                    for (key, line) in lines {
                        self.retire_line(key, line);
                    }
                    self.orphans.extend(created.iter().skip(i).map(|(_, g)| *g));
                    // The routes of the retired lines stay in the cache without a line.
                    for (key, gsi) in created.iter().take(i) {
                        self.cache.insert(
                            *key,
                            CachedRoute {
                                gsi: *gsi,
                                line: None,
                                users: 0,
                            },
                        );
                    }
                    return Err(e);
                }
            }
        }
        for (key, line) in lines {
            let gsi = line.gsi;
            self.cache.insert(
                key,
                CachedRoute {
                    gsi,
                    line: Some(line),
                    users: 0,
                },
            );
        }

        // 4. Publish. Nothing fails from here on.
        for p in plan {
            let Some(entry) = self.entries.get_mut(p.index as usize) else {
                continue;
            };
            let old = entry.live;
            let published = match (p.step, p.state) {
                (Step::Keep | Step::Join, NewState::Live { key, policy }) => {
                    let Some(route) = self.cache.get_mut(&key) else {
                        continue;
                    };
                    let Some(line) = route.line.clone() else {
                        continue;
                    };
                    if p.step == Step::Join || old != Some(key) {
                        route.users += 1;
                    }
                    entry.live = Some(key);
                    Published::Live { line, policy }
                }
                (_, NewState::Faulty(reason)) => {
                    entry.live = None;
                    Published::Faulty(reason)
                }
                _ => {
                    entry.live = None;
                    Published::Absent
                }
            };
            if let Some(slot) = self.path.slots.get(p.index as usize) {
                *slot.write().unwrap_or_else(PoisonError::into_inner) = published;
            }
            match (old, entry.live) {
                (Some(_), None) => self.live -= 1,
                (None, Some(_)) => self.live += 1,
                _ => {}
            }
            if let Some(old) = old.filter(|o| Some(*o) != entry.live) {
                // (A rewritten route is no longer under its old key.)
                if let Some(route) = self.cache.get_mut(&old) {
                    route.users = route.users.saturating_sub(1);
                }
            }
            let _ = self.table.write(p.index, p.raw);
        }

        // 5. Retire lines left without users.
        let idle: Vec<RouteKey> = self
            .cache
            .iter()
            .filter(|(_, r)| r.users == 0 && r.line.is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            if let Some(line) = self.cache.get_mut(&key).and_then(|r| r.line.take()) {
                self.retire_line(key, line);
            }
        }
        Ok(())
    }

    /// An eventfd (from the managed pool for a managed route) attached to `gsi`.
    fn new_line(&mut self, key: RouteKey, gsi: Gsi) -> Result<Arc<Line>, BackingError> {
        let reserved = if key.managed {
            self.managed_fds.pop()
        } else {
            None
        };
        let fd = match reserved {
            Some(fd) => fd,
            None => EventFd::new(EFD_NONBLOCK).map_err(BackingError::EventFd)?,
        };
        if let Err(e) = self.routes.attach_irqfd(&fd, gsi) {
            if key.managed {
                self.managed_fds.push(fd);
            }
            return Err(e.into());
        }
        Ok(Arc::new(Line { fd, gsi }))
    }

    fn retire_line(&mut self, key: RouteKey, line: Arc<Line>) {
        if self.routes.detach_irqfd(&line.fd, line.gsi).is_err() {
            self.stats.retire_errors += 1;
        }
        // Every slot that pointed here was swapped under its write lock, so this is the
        // last reference.
        if let Ok(line) = Arc::try_unwrap(line) {
            // Whatever count is left was injected when it was written.
            let _ = line.fd.read();
            if key.managed && self.managed_fds.len() < self.managed_allocated as usize {
                self.managed_fds.push(line.fd);
            }
        }
    }
}

/// Staged entry writes, applied together by [`Transaction::commit`].
#[derive(Debug)]
pub struct Transaction<'a, B: RoutingBackend> {
    backing: &'a mut Backing<B>,
    staged: BTreeMap<u32, [u64; 2]>,
}

impl<B: RoutingBackend> Transaction<'_, B> {
    /// Stages a raw entry (as a guest's table holds it; a malformed entry becomes a
    /// faulting one, not an error).
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`].
    pub fn write(&mut self, index: u32, raw: [u64; 2]) -> Result<(), BackingError> {
        if index >= self.backing.limits.table_size {
            return Err(BackingError::IndexOutOfRange(index));
        }
        self.staged.insert(index, raw);
        Ok(())
    }

    /// Stages `entry` at `index`.
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`].
    pub fn set(&mut self, index: u32, entry: &Irte) -> Result<(), BackingError> {
        let raw = entry.encode(self.backing.limits.eim);
        self.write(index, raw)
    }

    /// Stages clearing entry `index` (not present).
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`].
    pub fn clear(&mut self, index: u32) -> Result<(), BackingError> {
        self.write(index, [0, 0])
    }

    /// Entries staged.
    #[must_use]
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// Whether nothing is staged.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Applies every staged write with at most one route commit, or none of them.
    ///
    /// # Errors
    /// Any [`BackingError`]; the previous state is then intact and still delivering.
    pub fn commit(self) -> Result<(), BackingError> {
        let result = self.backing.apply(self.staged);
        match result {
            Ok(()) => self.backing.stats.transactions += 1,
            Err(_) => self.backing.stats.rollbacks += 1,
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Failures, FakeRouting};
    use crate::msi::Target;

    const DEV: u16 = 0x0010;
    const OTHER: u16 = 0x0018;

    fn backing_with(limit: u32, limits: Limits) -> (Backing<Arc<FakeRouting>>, Arc<FakeRouting>) {
        let kvm = Arc::new(FakeRouting::new());
        let routes = RouteTable::new(kvm.clone(), limit).unwrap();
        (Backing::new(routes, limits).unwrap(), kvm)
    }

    fn backing() -> (Backing<Arc<FakeRouting>>, Arc<FakeRouting>) {
        backing_with(
            4096,
            Limits {
                table_size: 1024,
                ..Limits::default()
            },
        )
    }

    fn irte(dest: u32, vector: u8) -> Irte {
        Irte::new(
            Target::fixed(dest, vector),
            SourceValidation::RequesterId {
                sid: DEV,
                qualifier: 0,
            },
        )
    }

    fn set(b: &mut Backing<Arc<FakeRouting>>, entries: &[(u32, Irte)]) -> Result<(), BackingError> {
        let mut txn = b.transaction();
        for (i, e) in entries {
            txn.set(*i, e)?;
        }
        txn.commit()
    }

    /// Where KVM would deliver entry `index` now.
    fn lands(b: &Backing<Arc<FakeRouting>>, kvm: &FakeRouting, index: u32) -> Option<Target> {
        kvm.fire(b.path().line_fd(index)?)
    }

    #[test]
    fn entries_with_one_target_share_one_route() {
        let (mut b, kvm) = backing();
        set(
            &mut b,
            &[(0, irte(1, 0x40)), (1, irte(1, 0x40)), (2, irte(0, 0x41))],
        )
        .unwrap();
        assert_eq!(kvm.msi_routes(), 2);
        assert_eq!(kvm.irqfds(), 2, "one line per route");
        assert_eq!(b.path().line_fd(0), b.path().line_fd(1));
        assert_eq!(kvm.set_calls(), 2, "the initial table and one commit");
        assert_eq!(lands(&b, &kvm, 1), Some(Target::fixed(1, 0x40)));
        assert_eq!(lands(&b, &kvm, 2), Some(Target::fixed(0, 0x41)));
        let path = b.path();
        path.signal(1, DEV).unwrap();
        assert_eq!(path.delivered(1), 1);
        assert_eq!(b.stats().live, 3);
    }

    #[test]
    fn retarget_to_a_routed_target_needs_no_route_commit() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40)), (1, irte(1, 0x40))]).unwrap();
        let (commits, assigns) = (kvm.set_calls(), kvm.assign_calls());
        set(&mut b, &[(0, irte(1, 0x40))]).unwrap();
        assert_eq!(kvm.set_calls(), commits, "no KVM_SET_GSI_ROUTING");
        assert_eq!(kvm.assign_calls(), assigns, "no irqfd assign");
        assert_eq!(lands(&b, &kvm, 0), Some(Target::fixed(1, 0x40)));
        assert_eq!(kvm.irqfds(), 1, "the line left without users was retired");
        // The emptied route goes with the next commit that happens anyway.
        set(&mut b, &[(2, irte(3, 0x50))]).unwrap();
        assert_eq!(kvm.msi_routes(), 2);
    }

    #[test]
    fn a_sole_user_retarget_rewrites_its_route_in_place() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40))]).unwrap();
        let fd = b.path().line_fd(0);
        let assigns = kvm.assign_calls();
        set(&mut b, &[(0, irte(2, 0x44))]).unwrap();
        assert_eq!(b.path().line_fd(0), fd, "same eventfd");
        assert_eq!(kvm.assign_calls(), assigns, "no irqfd change");
        assert_eq!(kvm.msi_routes(), 1);
        assert_eq!(lands(&b, &kvm, 0), Some(Target::fixed(2, 0x44)));
    }

    #[test]
    fn a_failed_route_commit_leaves_everything_delivering_as_before() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40)), (1, irte(1, 0x40))]).unwrap();
        kvm.fail(Failures {
            set_routes: 1,
            ..Failures::default()
        });
        let err = set(
            &mut b,
            &[(0, irte(5, 0x60)), (1, irte(0, 0x40)), (2, irte(7, 0x70))],
        );
        assert!(
            matches!(err, Err(BackingError::Route(RouteError::Commit(_)))),
            "{err:?}"
        );
        assert_eq!(lands(&b, &kvm, 0), Some(Target::fixed(0, 0x40)));
        assert_eq!(lands(&b, &kvm, 1), Some(Target::fixed(1, 0x40)));
        assert!(!b.path().is_live(2));
        assert_eq!(kvm.irqfds(), 2);
        assert_eq!(b.table().raw(0), Some(irte(0, 0x40).encode(true)));
        assert_eq!(b.stats().rollbacks, 1);
        // And the same change goes through once KVM cooperates.
        set(&mut b, &[(0, irte(5, 0x60)), (2, irte(7, 0x70))]).unwrap();
        assert_eq!(lands(&b, &kvm, 0), Some(Target::fixed(5, 0x60)));
    }

    #[test]
    fn a_failed_irqfd_assign_after_the_commit_rolls_back() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40))]).unwrap();
        // Entry 1 joins the existing line; entry 2 needs a new route, whose line's assign
        // fails after the route commit.
        kvm.fail(Failures {
            assign: 1,
            ..Failures::default()
        });
        let err = set(&mut b, &[(1, irte(0, 0x40)), (2, irte(3, 0x41))]).unwrap_err();
        assert!(
            matches!(err, BackingError::Route(RouteError::Assign { .. })),
            "{err:?}"
        );
        assert!(!b.path().is_live(1) && !b.path().is_live(2));
        assert_eq!(kvm.irqfds(), 1);
        assert_eq!(lands(&b, &kvm, 0), Some(Target::fixed(0, 0x40)));
        assert!(matches!(
            b.path().signal(2, DEV),
            Err(Fault {
                reason: FaultReason::NotPresent,
                ..
            })
        ));
    }

    #[test]
    fn every_injected_failure_point_rolls_back() {
        for failures in [
            Failures {
                set_routes: 1,
                ..Failures::default()
            },
            Failures {
                assign: 1,
                ..Failures::default()
            },
            Failures {
                assign: 1,
                assign_skip: 1,
                ..Failures::default()
            },
        ] {
            let (mut b, kvm) = backing();
            set(&mut b, &[(0, irte(0, 0x40)), (1, irte(1, 0x41))]).unwrap();
            kvm.fail(failures);
            let change = [
                (0, irte(1, 0x41)),
                (1, irte(2, 0x42)),
                (2, irte(0, 0x40)),
                (3, irte(4, 0x44)),
            ];
            set(&mut b, &change).expect_err(&format!("{failures:?}"));
            assert_eq!(
                lands(&b, &kvm, 0),
                Some(Target::fixed(0, 0x40)),
                "{failures:?}"
            );
            assert_eq!(
                lands(&b, &kvm, 1),
                Some(Target::fixed(1, 0x41)),
                "{failures:?}"
            );
            assert!(!b.path().is_live(2) && !b.path().is_live(3), "{failures:?}");
            assert_eq!(kvm.irqfds(), 2, "{failures:?}");
            assert_eq!(b.stats().live, 2);
        }
    }

    #[test]
    fn deactivation_costs_no_route_and_detaches() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40))]).unwrap();
        let mut txn = b.transaction();
        txn.clear(0).unwrap();
        txn.commit().unwrap();
        assert_eq!(kvm.irqfds(), 0);
        let fault = b.path().signal(0, DEV).unwrap_err();
        assert_eq!(
            (fault.reason, fault.index),
            (FaultReason::NotPresent, Some(0))
        );
        assert_eq!(b.stats().live, 0);
    }

    #[test]
    fn thousands_of_entries_live_on_a_handful_of_routes() {
        let (mut b, kvm) = backing_with(4096, Limits::default());
        let mut txn = b.transaction();
        for i in 0..20_000u32 {
            txn.set(i, &irte(i % 8, 0x40 + (i / 8 % 4) as u8)).unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(kvm.msi_routes(), 32);
        assert_eq!(kvm.irqfds(), 32);
        assert_eq!(b.stats().live, 20_000);
        assert_eq!(kvm.set_calls(), 2);
        assert_eq!(lands(&b, &kvm, 19_999), Some(Target::fixed(7, 0x43)));
        assert_eq!(lands(&b, &kvm, 8), Some(Target::fixed(0, 0x41)));
    }

    #[test]
    fn source_id_mismatch_and_bad_entries_fault_and_are_recorded() {
        let (mut b, _kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40))]).unwrap();
        let path = b.path();
        let fault = path.signal(0, OTHER).unwrap_err();
        assert_eq!(
            (fault.reason, fault.source_id, fault.suppressed),
            (FaultReason::SourceIdMismatch, OTHER, false)
        );
        assert_eq!(path.delivered(0), 0);
        assert_eq!(path.faults(0), 1);
        assert_eq!(path.fault_log().count(FaultReason::SourceIdMismatch), 1);
        assert_eq!(path.fault_log().drain(), vec![fault]);
        // FPD: blocked, counted per entry, not queued.
        let mut quiet = irte(0, 0x40);
        quiet.fault_processing_disable = true;
        set(&mut b, &[(0, quiet)]).unwrap();
        assert!(path.signal(0, OTHER).unwrap_err().suppressed);
        assert!(path.fault_log().drain().is_empty());
        // A posted-format entry is refused when used, not misread.
        let mut txn = b.transaction();
        let mut raw = irte(0, 0x40).encode(true);
        raw[0] |= 1 << 15;
        txn.write(5, raw).unwrap();
        txn.commit().unwrap();
        assert_eq!(
            path.signal(5, DEV).unwrap_err().reason,
            FaultReason::EntryReserved
        );
        assert_eq!(
            path.signal(70_000, DEV).unwrap_err().reason,
            FaultReason::IndexOutOfRange
        );
        let compat = MsiMessage::compatibility(0, 0x40).unwrap();
        assert_eq!(
            path.signal_msi(&compat, DEV).unwrap_err().reason,
            FaultReason::CompatibilityBlocked
        );
        path.signal_msi(&MsiMessage::remappable(0, None), DEV)
            .unwrap();
    }

    #[test]
    fn a_device_message_signals_through_its_handle() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(9, irte(2, 0x55))]).unwrap();
        let path = b.path();
        path.signal_msi(&MsiMessage::remappable(8, Some(1)), DEV)
            .unwrap();
        assert_eq!(path.delivered(9), 1);
        assert_eq!(lands(&b, &kvm, 9), Some(Target::fixed(2, 0x55)));
    }

    #[test]
    fn managed_entries_activate_even_when_best_effort_routes_are_spent() {
        // Six MSI routes in all; two managed entries reserve two of them.
        let (mut b, _kvm) = backing_with(
            24 + 6,
            Limits {
                table_size: 64,
                ..Limits::default()
            },
        );
        let managed = b
            .allocate(
                2,
                DEV,
                AllocFlags {
                    managed: true,
                    aligned: false,
                },
            )
            .unwrap();
        let plain = b.allocate(8, DEV, AllocFlags::default()).unwrap();
        for i in 0..4 {
            set(&mut b, &[(plain + i, irte(i, 0x40))]).unwrap();
        }
        let err = set(&mut b, &[(plain + 4, irte(9, 0x40))]).unwrap_err();
        assert!(matches!(err, BackingError::RoutesExhausted), "{err:?}");
        // Sharing a routed target still works for best-effort entries.
        set(&mut b, &[(plain + 5, irte(0, 0x40))]).unwrap();
        // Managed entries get their own routes, and retarget, whatever is left.
        set(
            &mut b,
            &[(managed, irte(10, 0x60)), (managed + 1, irte(11, 0x61))],
        )
        .unwrap();
        set(&mut b, &[(managed, irte(12, 0x62))]).unwrap();
        set(&mut b, &[(managed, irte(11, 0x61))]).unwrap();
        assert!(b.path().is_live(managed) && b.path().is_live(managed + 1));
        // A third managed allocation cannot be covered.
        let err = b
            .allocate(
                1,
                DEV,
                AllocFlags {
                    managed: true,
                    aligned: false,
                },
            )
            .unwrap_err();
        assert!(matches!(err, BackingError::RoutesExhausted), "{err:?}");
    }

    #[test]
    fn quotas_are_enforced() {
        let limits = Limits {
            table_size: 64,
            max_live: 3,
            max_per_device: 4,
            eim: true,
        };
        let (mut b, _kvm) = backing_with(4096, limits);
        b.allocate(4, DEV, AllocFlags::default()).unwrap();
        let err = b.allocate(1, DEV, AllocFlags::default()).unwrap_err();
        assert!(
            matches!(
                err,
                BackingError::DeviceQuota {
                    source_id: DEV,
                    quota: 4
                }
            ),
            "{err:?}"
        );
        b.allocate(4, OTHER, AllocFlags::default()).unwrap();
        let err = set(
            &mut b,
            &[
                (0, irte(0, 0x40)),
                (1, irte(0, 0x40)),
                (2, irte(0, 0x40)),
                (3, irte(0, 0x40)),
            ],
        );
        assert!(matches!(err, Err(BackingError::VmQuota(3))), "{err:?}");
        assert_eq!(b.stats().live, 0);
    }

    #[test]
    fn allocation_alignment_ownership_and_free() {
        let (mut b, kvm) = backing_with(
            4096,
            Limits {
                table_size: 64,
                ..Limits::default()
            },
        );
        assert_eq!(b.allocate(3, DEV, AllocFlags::default()).unwrap(), 0);
        assert_eq!(
            b.allocate(
                4,
                DEV,
                AllocFlags {
                    aligned: true,
                    managed: false
                }
            )
            .unwrap(),
            4
        );
        assert_eq!(b.allocate(1, OTHER, AllocFlags::default()).unwrap(), 3);
        set(&mut b, &[(4, irte(0, 0x40))]).unwrap();
        assert!(matches!(
            b.free(4, 4, OTHER),
            Err(BackingError::NotOwner {
                index: 4,
                owner: DEV
            })
        ));
        assert!(matches!(
            b.free(10, 1, DEV),
            Err(BackingError::NotAllocated(10))
        ));
        assert!(matches!(
            b.free(60, 10, DEV),
            Err(BackingError::IndexOutOfRange(_))
        ));
        b.free(4, 4, DEV).unwrap();
        assert_eq!(kvm.irqfds(), 0, "freeing deactivates");
        assert_eq!(b.owner(4), None);
        assert_eq!(b.free_entries(), 64 - 4);
        assert!(matches!(
            b.allocate(0, DEV, AllocFlags::default()),
            Err(BackingError::BadCount(0))
        ));
        assert!(matches!(
            b.allocate(65, DEV, AllocFlags::default()),
            Err(BackingError::BadCount(65))
        ));
        assert!(matches!(
            b.allocate(61, DEV, AllocFlags::default()),
            Err(BackingError::NoSpace(61))
        ));
    }

    #[test]
    fn policy_changes_keep_the_line() {
        let (mut b, kvm) = backing();
        set(&mut b, &[(0, irte(0, 0x40))]).unwrap();
        let assigns = kvm.assign_calls();
        let open = Irte::new(Target::fixed(0, 0x40), SourceValidation::None);
        set(&mut b, &[(0, open)]).unwrap();
        assert_eq!(kvm.assign_calls(), assigns);
        b.path().signal(0, OTHER).unwrap();
    }

    #[derive(Default)]
    struct Recorder {
        faults: Mutex<Vec<Fault>>,
        injected: Mutex<Vec<MsiMessage>>,
    }

    impl FaultSink for Recorder {
        fn fault(&self, fault: &Fault) {
            self.faults.lock().unwrap().push(*fault);
        }
    }

    impl MsiInjector for Recorder {
        fn inject(&self, msg: &MsiMessage) -> std::io::Result<()> {
            self.injected.lock().unwrap().push(*msg);
            Ok(())
        }
    }

    #[test]
    fn faults_reach_the_sink_and_compatibility_requests_the_injector_when_allowed() {
        let (mut b, _kvm) = backing();
        let rec = Arc::new(Recorder::default());
        let path = b.path();
        path.set_fault_sink(rec.clone());
        path.set_compat_injector(rec.clone());
        path.signal(3, DEV).unwrap_err();
        let compat = MsiMessage::compatibility(1, 0x33).unwrap();
        assert_eq!(
            path.signal_msi(&compat, DEV).unwrap_err().reason,
            FaultReason::CompatibilityBlocked
        );
        b.set_block_compatibility(false);
        path.signal_msi(&compat, DEV).unwrap();
        let reasons: Vec<_> = rec
            .faults
            .lock()
            .unwrap()
            .iter()
            .map(|f| f.reason)
            .collect();
        assert_eq!(
            reasons,
            vec![FaultReason::NotPresent, FaultReason::CompatibilityBlocked]
        );
        assert_eq!(*rec.injected.lock().unwrap(), vec![compat]);
    }

    #[test]
    fn policies_pack_and_unpack() {
        for (v, fpd) in [
            (SourceValidation::None, false),
            (
                SourceValidation::RequesterId {
                    sid: 0xbeef,
                    qualifier: 3,
                },
                true,
            ),
            (SourceValidation::BusRange { first: 2, last: 9 }, false),
        ] {
            assert_eq!(unpack_policy(pack_policy(v, fpd)), (v, fpd));
        }
    }
}
