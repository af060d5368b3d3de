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
//! Two halves, two locks (the data path in [`crate::path`], the control path here; the
//! commit's steps in `commit`, save and restore in [`snapshot`]):
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
//! 1. plan (`plan`, `plan_routes`): decode each staged entry; decide whether it keeps
//!    its line, joins the line of a routed target, needs a new route, or (as the sole
//!    user of its route, in a transaction that creates no route) has its route rewritten
//!    in place; check quotas and the route budget;
//! 2. one route commit (`route_commit`): new routes, in-place rewrites, and the removal
//!    of routes whose lines earlier transactions retired;
//! 3. new lines for the new routes (`new_lines`; an irqfd needs its route first);
//! 4. publish (`publish`): swap every changed entry's slot;
//! 5. retire lines left without users (`retire_idle_lines`): detach their irqfds (their
//!    routes go with the next commit, as the kernel wants irqfds gone before their route).
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::control::RouteChange;
pub use crate::faults::{FaultLog, FaultSink, FAULT_QUEUE_LEN};
use crate::msi::MsiMessage;
pub use crate::path::InterruptPath;
use crate::path::Line;
use crate::port::{Gsi, RoutingBackend};
use crate::remap::{RemapError, RemapTable};
use crate::routes::{OwnerId, RouteError, RouteTable};

pub mod bound;
mod commit;
pub mod snapshot;

pub use commit::Transaction;

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
    /// The entry already has an external source.
    #[error("entry {0} is already bound to an eventfd")]
    AlreadyBound(u32),
    /// The entry has no external source.
    #[error("entry {0} is not bound to an eventfd")]
    NotBound(u32),
    /// The live entry's source validation does not allow the requester.
    #[error("entry {index} does not verify requester {requester:#06x}")]
    NotVerified {
        /// The entry.
        index: u32,
        /// The requester.
        requester: u16,
    },
    /// The requester's device refused the host interrupts of entries the write made
    /// present ([`crate::control::HostInterrupts`]); the write was undone.
    #[error("the device of requester {requester:#06x} refused its host interrupts: {reason}")]
    HostRefused {
        /// The requester.
        requester: u16,
        /// What the device said.
        reason: String,
    },
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
    /// Entries bound to an external eventfd.
    pub bound: u32,
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
    /// Whether the cache may hold routes whose lines were retired (the next commit prunes
    /// them; without any, it need not look).
    maybe_retired: bool,
    limits: Limits,
    live: u32,
    allocated: u32,
    per_device: HashMap<u16, u32>,
    managed_allocated: u32,
    /// Eventfds reserved for managed lines: one per managed entry without a line of its own.
    managed_fds: Vec<EventFd>,
    /// Entries with an external source (`bound`).
    bound: HashMap<u32, bound::Bound>,
    stats: BackingStats,
}

impl<B: RoutingBackend> Backing<B> {
    /// Takes ownership of `routes` and creates an empty table with `limits`.
    ///
    /// Compatibility-format requests start **blocked**, as a VT-d unit with interrupt
    /// remapping on and CFI clear blocks them; a front end that allows them says so
    /// (`Setting::BlockCompatibility(false)`: `devices::viommu::Vtd::new` does, as the unit
    /// starts with remapping off).
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
            maybe_retired: false,
            limits,
            live: 0,
            allocated: 0,
            per_device: HashMap::new(),
            managed_allocated: 0,
            managed_fds: Vec::new(),
            bound: HashMap::new(),
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

    /// The route table (the IOAPIC's pin routes, owners' routes through
    /// [`crate::control::RouteControl`]).
    /// Counts a step that could not be undone or retired (a KVM refusal on the way back).
    pub(crate) fn count_retire_error(&mut self) {
        self.stats.retire_errors += 1;
    }

    pub(crate) fn routes_mut(&mut self) -> &mut RouteTable<B> {
        &mut self.routes
    }

    /// Stages `changes` for route owner `owner` (not the core), all or none
    /// ([`crate::control::RouteControl::stage`]); new routes must leave the managed
    /// entries' reservation whole.
    ///
    /// # Errors
    /// As [`crate::control::RouteControl::stage`].
    pub fn stage_routes(
        &mut self,
        owner: OwnerId,
        changes: &[RouteChange],
    ) -> Result<Vec<Gsi>, BackingError> {
        if owner == OwnerId::CORE {
            return Err(RouteError::NotOwner(owner.0).into());
        }
        let adds = changes
            .iter()
            .filter(|c| matches!(c, RouteChange::Add(_)))
            .count();
        if adds > self.best_effort_routes_left() as usize {
            return Err(BackingError::RoutesExhausted);
        }
        // Undone by hand on failure: other owners' staged changes must stay.
        let before = self.routes.staged_of(owner);
        let mut added = Vec::with_capacity(adds);
        let mut result = Ok(());
        for change in changes {
            let step = match *change {
                RouteChange::Add(msg) => self.routes.allocate_as(owner, msg).map(|g| added.push(g)),
                RouteChange::Update(gsi, msg) => self.routes.update_as(owner, gsi, msg),
                RouteChange::Remove(gsi) => self.routes.remove_as(owner, gsi),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        match result {
            Ok(()) => Ok(added),
            Err(e) => {
                self.routes.restore_staged(owner, before);
                Err(e.into())
            }
        }
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
            bound: u32::try_from(self.bound.len()).unwrap_or(u32::MAX),
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
        self.forget_bindings(first, end);
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
}

#[cfg(test)]
mod tests;
