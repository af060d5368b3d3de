//! The front door of the interrupt core: one small control API, [`InterruptControl`],
//! through which every front end changes the core (the IRTE hypercall's dispatcher, the
//! VT-d unit, the IOAPIC's level pins, an embedder), and the named handle front ends hold,
//! [`CoreHandle`]. The data path ([`InterruptPath`]: "signal the interrupt behind entry
//! `i` as requester `s`") sits beside it and is reached through [`InterruptControl::path`].
//!
//! A front end never sees the core's concrete type, its KVM routing backend or its route
//! table: [`InterruptCore`] implements the trait over a [`Backing`] and keeps the lock.
//!
//! **Coherence of the two table writers.** The hypercall writes entries on behalf of a
//! requester; a VT-d unit owns the guest's copy of the table. When a requester's write or
//! free succeeds, the core tells the [`EntryMirror`] registered with it (the VT-d unit,
//! which writes the entry through into the guest's table), so both see one table: the
//! last writer wins. Platform writes (the unit's own invalidations) are not mirrored: they
//! come from that table.
//!
//! **Lock order.** The core's lock is the innermost: a front end may hold its own lock
//! (the VT-d unit does, while it commits an invalidation) when it calls the core, and the
//! core calls nothing that locks while it holds its lock; it calls the mirror only after
//! releasing it.

mod host;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use vmm_sys_util::eventfd::EventFd;

use crate::backing::{AllocFlags, Backing, BackingError, InterruptPath};
use crate::irte::Irte;
use crate::msi::MsiMessage;
use crate::port::{Gsi, RoutingBackend};
use crate::remap::Translation;
use crate::routes::{OwnerId, OwnerUsage, RouteError};

pub use host::{HostInterrupts, HostRefusal, HostStats};

/// What one entry becomes in a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryWrite {
    /// This entry.
    Entry(Irte),
    /// The raw 128-bit entry, in x2APIC (EIM) encoding, as a remapping table holds it: a
    /// malformed one becomes an entry that faults when used, not an error.
    Raw([u64; 2]),
    /// Not present.
    Absent,
}

/// Who writes: a requester may write only the entries allocated to it; the platform
/// (a VT-d unit loading the guest's table) may write any entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// A device, by requester ID.
    Requester(u16),
    /// The platform.
    Platform,
}

/// A setting of the core that a platform front end owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Compatibility-format interrupts are blocked (VT-d: IR on with CFI clear) or pass.
    BlockCompatibility(bool),
    /// A new table of `entries` entries (VT-d: SIRTP): every entry becomes absent
    /// (allocations stay), and requests beyond the new size fault.
    NewTable {
        /// Entries of the new table (at most the core's).
        entries: u32,
    },
    /// IOAPIC pin `pin` sends `message` as requester `source_id`, level-triggered
    /// (`None`: edge-triggered, or nothing): the core keeps KVM told which vector's
    /// EOIs the pin needs (the message's translated target, when it is level).
    LevelPin {
        /// The pin.
        pin: u32,
        /// What it sends.
        message: Option<MsiMessage>,
        /// As whom.
        source_id: u16,
    },
}

/// One entry as the core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// Its owner and whether it is managed; `None` when not allocated.
    pub owner: Option<(u16, bool)>,
    /// The entry, raw, in x2APIC encoding (zero when absent or beyond the table).
    pub raw: [u64; 2],
}

/// What is left, for one requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Entries in the table.
    pub table_size: u32,
    /// Entries not allocated to anyone.
    pub free_entries: u32,
    /// Entries the requester may still allocate under its quota.
    pub quota_left: u32,
    /// KVM routes left for new best-effort targets.
    pub best_effort_routes_left: u32,
}

/// Told of every entry a requester's write or free changed, after the change.
pub trait EntryMirror: Send + Sync {
    /// Entry `index` is now `raw` (x2APIC encoding; zero: absent).
    fn mirror(&self, index: u32, raw: [u64; 2]);
}

/// The interrupt core's control API. Object-safe: front ends hold a [`CoreHandle`].
pub trait InterruptControl: Send + Sync {
    /// Allocates `count` consecutive entries for `requester`; returns the first. The
    /// entries stay absent until written.
    ///
    /// # Errors
    /// As [`Backing::allocate`].
    fn allocate(&self, requester: u16, count: u32, flags: AllocFlags) -> Result<u32, BackingError>;

    /// Frees `count` entries from `first`, all `requester`'s (live ones are deactivated
    /// first), or nothing.
    ///
    /// # Errors
    /// As [`Backing::free`].
    fn free(&self, requester: u16, first: u32, count: u32) -> Result<(), BackingError>;

    /// Applies `writes` in one transaction (at most one KVM route commit), all or none;
    /// a later write of an index wins. For a [`Writer::Requester`], every index must be
    /// allocated to it, checked in order.
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`], [`BackingError::NotAllocated`],
    /// [`BackingError::NotOwner`], or the transaction's error; nothing changed then.
    fn write(&self, writer: Writer, writes: &[(u32, EntryWrite)]) -> Result<(), BackingError>;

    /// Entry `index`.
    fn entry(&self, index: u32) -> EntryInfo;

    /// What is left, for `requester`.
    fn capacity(&self, requester: u16) -> Capacity;

    /// Changes a platform setting.
    ///
    /// # Errors
    /// [`BackingError::Route`] when KVM refused a pin route (the pin keeps its previous
    /// one), or the transaction's error for a new table.
    fn configure(&self, setting: Setting) -> Result<(), BackingError>;

    /// Binds entry `index`, allocated to `requester`, to `fd`: an eventfd that a source
    /// outside the core writes (a VFIO vector, a vhost-user or vfio-user backend, another
    /// VMM's device). The core keeps it attached as an irqfd to the route of the entry's
    /// current target while the entry is present and verifies `requester`, moves it on
    /// retarget with nothing lost, and drops it when the entry is freed
    /// ([`crate::backing::bound`]).
    ///
    /// # Errors
    /// As [`Backing::bind`].
    fn bind_source(&self, requester: u16, index: u32, fd: EventFd) -> Result<(), BackingError>;

    /// Unbinds entry `index` and gives its eventfd back.
    ///
    /// # Errors
    /// As [`Backing::unbind`].
    fn unbind_source(&self, requester: u16, index: u32) -> Result<EventFd, BackingError>;

    /// Attaches `source`, the host interrupts of `requester`'s entries (a device outside
    /// the core): from now on it is handed each entry's eventfd when the entry becomes
    /// present for `requester`, and takes it back when the entry goes absent or is freed
    /// (module `host`). Entries present now are handed over at once.
    ///
    /// # Errors
    /// [`BackingError::HostRefused`] (the requester has a host already, or `source`
    /// refused the entries present now: nothing is attached), or a binding's error.
    fn attach_host(
        &self,
        requester: u16,
        source: Arc<dyn HostInterrupts>,
    ) -> Result<(), BackingError>;

    /// Attaches `source` as the host of the entries `requester`'s device names
    /// ([`Self::name_entries`]; a device whose MSI-X table the VMM emulates): it is handed
    /// an entry's eventfd while the entry is named, present and verifies `requester`,
    /// whoever it is allocated to.
    ///
    /// # Errors
    /// [`BackingError::HostRefused`]: the requester has a host already.
    fn attach_named_host(
        &self,
        requester: u16,
        source: Arc<dyn HostInterrupts>,
    ) -> Result<(), BackingError>;

    /// Tells the core which entries `requester`'s device names now: each `(index, true)`
    /// is one more vector naming `index`, `(index, false)` one fewer. Entries that become
    /// named while present are handed over now; entries no vector names any more are
    /// taken back.
    ///
    /// # Errors
    /// No host of named entries for `requester`, or the host's refusal of an entry (it
    /// stays named, not handed over).
    fn name_entries(&self, requester: u16, changes: &[(u32, bool)]) -> Result<(), BackingError>;

    /// Detaches `requester`'s host (its device is gone): every eventfd it held is unbound
    /// and it is asked to give them back. Returns how many it held.
    fn detach_host(&self, requester: u16) -> usize;

    /// What the attached hosts hold.
    fn host_stats(&self) -> HostStats;

    /// The data path.
    fn path(&self) -> Arc<InterruptPath>;

    /// KVM's routing table, shared with owners of plain MSI routes ([`RouteControl`]).
    fn routes(&self) -> &dyn RouteControl;
}

/// One change an owner stages in KVM's routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteChange {
    /// A new MSI route (its GSI is returned by [`RouteControl::stage`]).
    Add(MsiMessage),
    /// A new message for one of the owner's routes.
    Update(Gsi, MsiMessage),
    /// The removal of one of the owner's routes (detach its irqfds first).
    Remove(Gsi),
}

/// Plain (not remapped) MSI routes in KVM's one routing table, beside the core's: an
/// embedder's own MSI vectors, a legacy device's, the test harness's. Each owner has a
/// budget, stages its own changes and commits them with one `KVM_SET_GSI_ROUTING`; a
/// failed commit or rollback of one owner (a failed IRTE transaction included) never
/// drops another owner's staged routes ([`crate::routes`], "Owners"). Owners' routes
/// come out of the best-effort remapped entries' budget, never the managed ones'
/// reservation.
pub trait RouteControl: Send + Sync {
    /// Registers an owner named `name` that may have at most `budget` routes.
    fn add_owner(&self, name: &str, budget: u32) -> OwnerId;

    /// Stages `changes` for `owner`, all or none; returns the GSIs of the routes added,
    /// in order. Nothing reaches KVM before [`Self::commit`].
    ///
    /// # Errors
    /// [`BackingError::Route`] (not the owner's route, over its budget, no GSI left) or
    /// [`BackingError::RoutesExhausted`] (the managed reservation would be touched);
    /// nothing of these changes is staged then (earlier staged changes stay).
    fn stage(&self, owner: OwnerId, changes: &[RouteChange]) -> Result<Vec<Gsi>, BackingError>;

    /// Commits `owner`'s staged changes in one `KVM_SET_GSI_ROUTING`.
    ///
    /// # Errors
    /// [`BackingError::Route`]; `owner`'s staged changes are dropped and KVM keeps the
    /// previous table.
    fn commit(&self, owner: OwnerId) -> Result<(), BackingError>;

    /// Drops `owner`'s staged changes.
    fn rollback(&self, owner: OwnerId);

    /// Attaches `fd` as an irqfd to `owner`'s committed route `gsi`.
    ///
    /// # Errors
    /// [`BackingError::Route`].
    fn attach_irqfd(&self, owner: OwnerId, gsi: Gsi, fd: &EventFd) -> Result<(), BackingError>;

    /// Detaches `fd` from `owner`'s route `gsi`.
    ///
    /// # Errors
    /// [`BackingError::Route`].
    fn detach_irqfd(&self, owner: OwnerId, gsi: Gsi, fd: &EventFd) -> Result<(), BackingError>;

    /// Removes every route of `owner` (its irqfds detached first) and the owner.
    ///
    /// # Errors
    /// [`BackingError::Route`].
    fn remove_owner(&self, owner: OwnerId) -> Result<(), BackingError>;

    /// Every owner's routes against its budget.
    fn owners(&self) -> Vec<OwnerUsage>;
}

/// What front ends hold: the core behind its control API.
pub type CoreHandle = Arc<dyn InterruptControl>;

/// The interrupt core: a [`Backing`] behind its lock, with the mirror of requester writes.
pub struct InterruptCore<B: RoutingBackend> {
    backing: Mutex<Backing<B>>,
    path: Arc<InterruptPath>,
    mirror: RwLock<Option<Arc<dyn EntryMirror>>>,
    hosts: Mutex<host::Hosts>,
}

impl<B: RoutingBackend> std::fmt::Debug for InterruptCore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptCore").finish_non_exhaustive()
    }
}

impl<B: RoutingBackend + 'static> InterruptCore<B> {
    /// The core over `backing`. Compatibility-format requests start blocked (see
    /// [`Backing::new`]) until a front end allows them.
    #[must_use]
    pub fn new(backing: Backing<B>) -> Arc<Self> {
        let path = backing.path();
        Arc::new(Self {
            backing: Mutex::new(backing),
            path,
            mirror: RwLock::new(None),
            hosts: Mutex::new(host::Hosts::default()),
        })
    }

    /// This core as front ends hold it.
    #[must_use]
    pub fn handle(self: &Arc<Self>) -> CoreHandle {
        self.clone()
    }

    /// Tells `mirror` of every change a requester makes from now on (replacing any
    /// mirror before it).
    pub fn set_mirror(&self, mirror: Arc<dyn EntryMirror>) {
        *self.mirror.write().unwrap_or_else(PoisonError::into_inner) = Some(mirror);
    }

    /// The backing itself, for the VMM that owns the core (statistics, snapshots, its
    /// own MSI routes). Front ends use the [`InterruptControl`] methods.
    pub fn lock(&self) -> MutexGuard<'_, Backing<B>> {
        self.backing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `writes` (the write without hosts).
    fn write_entries(
        &self,
        writer: Writer,
        writes: &[(u32, EntryWrite)],
    ) -> Result<(), BackingError> {
        let mirror = match writer {
            Writer::Requester(_) => self.mirror(),
            Writer::Platform => None,
        };
        let reflected: Vec<(u32, [u64; 2])> = {
            let mut backing = self.lock();
            if let Writer::Requester(requester) = writer {
                for (index, _) in writes {
                    owned(&backing, *index, requester)?;
                }
            }
            // The entries before, only for a trace that wants them.
            let before: Option<Vec<[u64; 2]>> =
                tracing::enabled!(target: "irvm::ir", tracing::Level::INFO).then(|| {
                    writes
                        .iter()
                        .map(|(i, _)| backing.table().raw(*i).unwrap_or([0, 0]))
                        .collect()
                });
            let mut txn = backing.transaction();
            for (index, write) in writes {
                match write {
                    EntryWrite::Entry(entry) => txn.set(*index, entry)?,
                    EntryWrite::Raw(raw) => txn.write(*index, *raw)?,
                    EntryWrite::Absent => txn.clear(*index)?,
                }
            }
            let committed = txn.commit();
            if let Some(before) = before {
                trace_writes(&backing, writer, writes, &before, committed.as_ref().err());
            }
            committed?;
            // What the mirror is told, read under this lock (not taken again for it).
            match mirror {
                Some(_) => raws_of(&backing, writes.iter().map(|(index, _)| *index)),
                None => Vec::new(),
            }
        };
        if let Some(mirror) = mirror {
            for (index, raw) in reflected {
                mirror.mirror(index, raw);
            }
        }
        Ok(())
    }

    /// Frees entries (the free without hosts).
    fn free_entries(&self, requester: u16, first: u32, count: u32) -> Result<(), BackingError> {
        let freed = self.lock().free(first, count, requester);
        tracing::info!(
            target: "irvm::ir",
            kind = "free",
            requester = %format_args!("{requester:#06x}"),
            first,
            count,
            error = freed.as_ref().err().map(tracing::field::display),
        );
        freed?;
        self.reflect(first..first.saturating_add(count));
        Ok(())
    }

    /// Installs a new, empty table of `entries` entries (without hosts).
    fn new_table(&self, entries: u32) -> Result<(), BackingError> {
        tracing::info!(target: "irvm::ir", kind = "new_table", entries);
        let mut backing = self.lock();
        backing.set_active_size(entries);
        let size = backing.limits().table_size;
        let mut txn = backing.transaction();
        for index in 0..size {
            txn.clear(index)?;
        }
        txn.commit()
    }

    /// The mirror of requester writes, if any.
    fn mirror(&self) -> Option<Arc<dyn EntryMirror>> {
        self.mirror
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tells the mirror of `indexes` as the table now holds them (with the core's lock
    /// released while the mirror runs).
    fn reflect(&self, indexes: impl Iterator<Item = u32>) {
        let Some(mirror) = self.mirror() else { return };
        let raws = raws_of(&self.lock(), indexes);
        for (index, raw) in raws {
            mirror.mirror(index, raw);
        }
    }
}

/// The raw entries at `indexes` (zero beyond the table).
fn raws_of<B: RoutingBackend>(
    backing: &Backing<B>,
    indexes: impl Iterator<Item = u32>,
) -> Vec<(u32, [u64; 2])> {
    indexes
        .map(|i| (i, backing.table().raw(i).unwrap_or([0, 0])))
        .collect()
}

/// Traces each entry a write changed (or, refused, each it would have), with the entry
/// before and after and who wrote it.
fn trace_writes<B: RoutingBackend>(
    backing: &Backing<B>,
    writer: Writer,
    writes: &[(u32, EntryWrite)],
    before: &[[u64; 2]],
    refused: Option<&BackingError>,
) {
    let by = match writer {
        Writer::Requester(r) => format!("requester {r:#06x}"),
        Writer::Platform => "platform".to_string(),
    };
    for ((index, _), old) in writes.iter().zip(before) {
        let new = backing.table().raw(*index).unwrap_or([0, 0]);
        if refused.is_none() && new == *old {
            continue;
        }
        tracing::info!(
            target: "irvm::ir",
            kind = "irte_write",
            index = *index,
            by = by.as_str(),
            old = %format_args!("{:#018x}_{:016x}", old[1], old[0]),
            new = %format_args!("{:#018x}_{:016x}", new[1], new[0]),
            present = new[0] & 1 == 1,
            ok = refused.is_none(),
            error = refused.map(tracing::field::display),
        );
    }
}

/// Checks that `index` is allocated to `requester`.
fn owned<B: RoutingBackend>(
    backing: &Backing<B>,
    index: u32,
    requester: u16,
) -> Result<(), BackingError> {
    if index >= backing.limits().table_size {
        return Err(BackingError::IndexOutOfRange(index));
    }
    match backing.owner(index) {
        None => Err(BackingError::NotAllocated(index)),
        Some((owner, _)) if owner != requester => Err(BackingError::NotOwner { index, owner }),
        Some(_) => Ok(()),
    }
}

impl<B: RoutingBackend + 'static> InterruptControl for InterruptCore<B> {
    fn allocate(&self, requester: u16, count: u32, flags: AllocFlags) -> Result<u32, BackingError> {
        let result = self.lock().allocate(count, requester, flags);
        tracing::info!(
            target: "irvm::ir",
            kind = "allocate",
            requester = %format_args!("{requester:#06x}"),
            count,
            managed = flags.managed,
            first = result.as_ref().ok().copied(),
            error = result.as_ref().err().map(tracing::field::display),
        );
        result
    }

    fn free(&self, requester: u16, first: u32, count: u32) -> Result<(), BackingError> {
        self.free_hosted(requester, first, count)
    }

    fn write(&self, writer: Writer, writes: &[(u32, EntryWrite)]) -> Result<(), BackingError> {
        self.write_hosted(writer, writes)
    }

    fn entry(&self, index: u32) -> EntryInfo {
        let backing = self.lock();
        EntryInfo {
            owner: backing.owner(index),
            raw: backing.table().raw(index).unwrap_or([0, 0]),
        }
    }

    fn bind_source(&self, requester: u16, index: u32, fd: EventFd) -> Result<(), BackingError> {
        self.lock().bind(index, requester, fd)
    }

    fn unbind_source(&self, requester: u16, index: u32) -> Result<EventFd, BackingError> {
        self.lock().unbind(index, requester)
    }

    fn capacity(&self, requester: u16) -> Capacity {
        let backing = self.lock();
        Capacity {
            table_size: backing.limits().table_size,
            free_entries: backing.free_entries(),
            quota_left: backing.quota_left(requester),
            best_effort_routes_left: backing.best_effort_routes_left(),
        }
    }

    fn configure(&self, setting: Setting) -> Result<(), BackingError> {
        let mut backing = self.lock();
        match setting {
            Setting::BlockCompatibility(block) => {
                backing.set_block_compatibility(block);
                Ok(())
            }
            Setting::NewTable { entries } => {
                drop(backing);
                self.new_table_hosted(entries)
            }
            Setting::LevelPin {
                pin,
                message,
                source_id,
            } => {
                let route = message
                    .and_then(|m| match backing.table().translate(&m, source_id) {
                        Ok(
                            Translation::Remapped { target, .. }
                            | Translation::Compatibility(target),
                        ) => Some(target),
                        Err(_) => None,
                    })
                    .filter(|target| target.level)
                    .map(|target| target.to_msi());
                backing.routes_mut().set_pin_route(pin, route)?;
                Ok(())
            }
        }
    }

    fn attach_host(
        &self,
        requester: u16,
        source: Arc<dyn HostInterrupts>,
    ) -> Result<(), BackingError> {
        self.attach_host_impl(requester, source, false)
    }

    fn attach_named_host(
        &self,
        requester: u16,
        source: Arc<dyn HostInterrupts>,
    ) -> Result<(), BackingError> {
        self.attach_host_impl(requester, source, true)
    }

    fn name_entries(&self, requester: u16, changes: &[(u32, bool)]) -> Result<(), BackingError> {
        self.name_entries_impl(requester, changes)
    }

    fn detach_host(&self, requester: u16) -> usize {
        self.detach_host_impl(requester)
    }

    fn host_stats(&self) -> HostStats {
        self.host_stats_impl()
    }

    fn path(&self) -> Arc<InterruptPath> {
        self.path.clone()
    }

    fn routes(&self) -> &dyn RouteControl {
        self
    }
}

impl<B: RoutingBackend + 'static> RouteControl for InterruptCore<B> {
    fn add_owner(&self, name: &str, budget: u32) -> OwnerId {
        self.lock().routes_mut().add_owner(name, budget)
    }

    fn stage(&self, owner: OwnerId, changes: &[RouteChange]) -> Result<Vec<Gsi>, BackingError> {
        self.lock().stage_routes(owner, changes)
    }

    fn commit(&self, owner: OwnerId) -> Result<(), BackingError> {
        if owner == OwnerId::CORE {
            return Err(RouteError::NotOwner(owner.0).into());
        }
        self.lock().routes_mut().commit_as(owner)?;
        Ok(())
    }

    fn rollback(&self, owner: OwnerId) {
        if owner != OwnerId::CORE {
            self.lock().routes_mut().rollback_as(owner);
        }
    }

    fn attach_irqfd(&self, owner: OwnerId, gsi: Gsi, fd: &EventFd) -> Result<(), BackingError> {
        let mut backing = self.lock();
        let routes = backing.routes_mut();
        if routes.owner_of(gsi) != Some(owner) || owner == OwnerId::CORE {
            return Err(RouteError::NotOwner(owner.0).into());
        }
        routes.attach_irqfd(fd, gsi)?;
        Ok(())
    }

    fn detach_irqfd(&self, owner: OwnerId, gsi: Gsi, fd: &EventFd) -> Result<(), BackingError> {
        let mut backing = self.lock();
        let routes = backing.routes_mut();
        if routes.owner_of(gsi) != Some(owner) || owner == OwnerId::CORE {
            return Err(RouteError::NotOwner(owner.0).into());
        }
        routes.detach_irqfd(fd, gsi)?;
        Ok(())
    }

    fn remove_owner(&self, owner: OwnerId) -> Result<(), BackingError> {
        self.lock().routes_mut().remove_owner(owner)?;
        Ok(())
    }

    fn owners(&self) -> Vec<OwnerUsage> {
        self.lock().routes().owners()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::backing::Limits;
    use crate::fake::FakeRouting;
    use crate::irte::SourceValidation;
    use crate::msi::Target;
    use crate::routes::{Irqchip, RouteTable};

    const DEV: u16 = 0x0018;
    const OTHER: u16 = 0x0020;

    fn core() -> (Arc<InterruptCore<Arc<FakeRouting>>>, Arc<FakeRouting>) {
        let kvm = Arc::new(FakeRouting::new());
        let routes = RouteTable::with_irqchip(kvm.clone(), 4096, Irqchip::Split).unwrap();
        let backing = Backing::new(routes, Limits::default()).unwrap();
        (InterruptCore::new(backing), kvm)
    }

    fn entry(dest: u32, vector: u8, sid: u16) -> Irte {
        Irte::new(
            Target::fixed(dest, vector),
            SourceValidation::RequesterId { sid, qualifier: 0 },
        )
    }

    #[derive(Default)]
    struct Mirror(StdMutex<Vec<(u32, [u64; 2])>>);

    impl EntryMirror for Mirror {
        fn mirror(&self, index: u32, raw: [u64; 2]) {
            self.0.lock().unwrap().push((index, raw));
        }
    }

    #[test]
    fn a_requester_writes_only_its_own_entries_and_the_mirror_hears_of_them() {
        let (core, kvm) = core();
        let mirror = Arc::new(Mirror::default());
        core.set_mirror(mirror.clone());
        let handle = core.handle();
        let first = handle.allocate(DEV, 2, AllocFlags::default()).unwrap();
        let theirs = handle.allocate(OTHER, 1, AllocFlags::default()).unwrap();
        let mine = EntryWrite::Entry(entry(0, 0x40, DEV));
        handle
            .write(Writer::Requester(DEV), &[(first, mine)])
            .unwrap();
        assert_eq!(
            kvm.fire(handle.path().line_fd(first).unwrap()),
            Some(Target::fixed(0, 0x40))
        );
        // All or none: the second index is another requester's.
        let err = handle
            .write(Writer::Requester(DEV), &[(first + 1, mine), (theirs, mine)])
            .unwrap_err();
        assert!(matches!(err, BackingError::NotOwner { index, owner: OTHER } if index == theirs));
        assert!(!handle.path().is_live(first + 1));
        let err = handle
            .write(Writer::Requester(DEV), &[(4000, mine)])
            .unwrap_err();
        assert!(matches!(err, BackingError::NotAllocated(4000)));
        // The platform writes any entry, unmirrored.
        handle
            .write(
                Writer::Platform,
                &[(theirs, EntryWrite::Raw(entry(1, 0x41, OTHER).encode(true)))],
            )
            .unwrap();
        assert!(handle.path().is_live(theirs));
        handle.free(DEV, first, 2).unwrap();
        let heard = mirror.0.lock().unwrap().clone();
        assert_eq!(heard.len(), 3, "{heard:?}");
        assert_eq!(heard[0].0, first);
        assert_ne!(heard[0].1, [0, 0]);
        assert_eq!(&heard[1..], &[(first, [0, 0]), (first + 1, [0, 0])]);
        assert_eq!(handle.entry(theirs).owner, Some((OTHER, false)));
    }

    #[test]
    fn capacity_new_tables_and_compatibility_blocking() {
        let (core, _) = core();
        let handle = core.handle();
        let before = handle.capacity(DEV);
        assert_eq!(before.table_size, Limits::default().table_size);
        let first = handle.allocate(DEV, 4, AllocFlags::default()).unwrap();
        assert_eq!(handle.capacity(DEV).free_entries, before.free_entries - 4);
        assert_eq!(handle.capacity(DEV).quota_left, before.quota_left - 4);
        handle
            .write(
                Writer::Requester(DEV),
                &[(first, EntryWrite::Entry(entry(0, 0x40, DEV)))],
            )
            .unwrap();
        handle
            .configure(Setting::NewTable { entries: 256 })
            .unwrap();
        assert!(!handle.path().is_live(first), "a new table starts empty");
        assert_eq!(
            handle.entry(first).owner,
            Some((DEV, false)),
            "allocations stay"
        );
        handle.configure(Setting::BlockCompatibility(true)).unwrap();
        assert!(handle.path().blocks_compatibility());
    }

    #[test]
    fn a_level_pin_gets_the_route_of_its_translated_target() {
        let (core, kvm) = core();
        let handle = core.handle();
        let ioapic = 0xff00;
        let first = handle.allocate(ioapic, 1, AllocFlags::default()).unwrap();
        let mut level = entry(0, 0x33, ioapic);
        level.target.level = true;
        handle
            .write(
                Writer::Requester(ioapic),
                &[(first, EntryWrite::Entry(level))],
            )
            .unwrap();
        let handle16 = u16::try_from(first).unwrap();
        let message = Some(MsiMessage::remappable(handle16, None));
        handle
            .configure(Setting::LevelPin {
                pin: 9,
                message,
                source_id: ioapic,
            })
            .unwrap();
        assert_eq!(kvm.route(9), Some(level.target.to_msi()));
        // Another requester's view of the message translates to nothing: no route.
        handle
            .configure(Setting::LevelPin {
                pin: 9,
                message,
                source_id: DEV,
            })
            .unwrap();
        assert_eq!(kvm.route(9), None);
        let err = handle
            .configure(Setting::LevelPin {
                pin: 30,
                message: None,
                source_id: ioapic,
            })
            .unwrap_err();
        assert!(matches!(err, BackingError::Route(_)));
    }

    /// An embedder's own MSI routes beside the core's: staged routes survive a failed
    /// IRTE transaction, owners touch only their own routes, budgets and the managed
    /// reservation hold.
    #[test]
    fn route_owners_share_the_table_without_losing_staged_routes() {
        let kvm = Arc::new(FakeRouting::new());
        let routes = RouteTable::with_irqchip(kvm.clone(), 24 + 8, Irqchip::Split).unwrap();
        let core = InterruptCore::new(Backing::new(routes, Limits::default()).unwrap());
        let handle = core.handle();
        let table = handle.routes();
        let vmm = table.add_owner("embedder", 3);
        let msg = |dest| MsiMessage::compatibility(dest, 0x50).unwrap();
        let gsis = table
            .stage(vmm, &[RouteChange::Add(msg(0)), RouteChange::Add(msg(1))])
            .unwrap();
        // An IRTE transaction whose route commit fails.
        let first = handle.allocate(DEV, 1, AllocFlags::default()).unwrap();
        kvm.fail(crate::fake::Failures {
            set_routes: 1,
            ..crate::fake::Failures::default()
        });
        handle
            .write(
                Writer::Requester(DEV),
                &[(first, EntryWrite::Entry(entry(2, 0x40, DEV)))],
            )
            .unwrap_err();
        // The embedder's routes are still staged; its commit sends them.
        table.commit(vmm).unwrap();
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        table.attach_irqfd(vmm, gsis[0], &fd).unwrap();
        assert_eq!(
            kvm.fire(std::os::fd::AsRawFd::as_raw_fd(&fd)),
            Some(Target::fixed(0, 0x50))
        );
        // Not another owner's route, not over the budget, all or none.
        let other = table.add_owner("other", 8);
        table
            .stage(other, &[RouteChange::Remove(gsis[1])])
            .unwrap_err();
        table.attach_irqfd(other, gsis[1], &fd).unwrap_err();
        table
            .stage(vmm, &[RouteChange::Add(msg(2)), RouteChange::Add(msg(3))])
            .unwrap_err();
        assert_eq!(table.owners()[0].routes, 2, "nothing of a refused stage");
        // Managed entries' reservation: 8 routes, 2 the embedder's, 5 reserved.
        handle
            .allocate(
                OTHER,
                5,
                AllocFlags {
                    managed: true,
                    aligned: false,
                },
            )
            .unwrap();
        assert!(matches!(
            table.stage(other, &[RouteChange::Add(msg(4)), RouteChange::Add(msg(5))]),
            Err(BackingError::RoutesExhausted)
        ));
        table.stage(other, &[RouteChange::Add(msg(4))]).unwrap();
        table.rollback(other);
        table.detach_irqfd(vmm, gsis[0], &fd).unwrap();
        table.remove_owner(vmm).unwrap();
        assert_eq!(table.owners().len(), 1);
        assert_eq!(kvm.msi_routes(), 0);
    }
}
