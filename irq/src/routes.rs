//! KVM's GSI routing table, owned in one place.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so whoever sets it must know every
//! route. [`RouteTable`] is that owner: it keeps the legacy GSIs 0-23 as the VM's
//! [`Irqchip`] needs them, hands out MSI routes above them up to the limit KVM reports,
//! stages changes, and commits them with one ioctl per [`RouteTable::commit`]. A commit
//! that fails leaves both KVM's table and ours as they were (KVM applies a routing update
//! atomically or not at all).
//!
//! With the in-kernel irqchip the legacy GSIs are routed to the IOAPIC's 24 pins and the
//! PIC's 16, as KVM's default table does. With the split irqchip
//! (`KVM_CAP_SPLIT_IRQCHIP` with 24 reserved pins) the IOAPIC is in user space and KVM
//! reports the EOI of a vector (`KVM_EXIT_IOAPIC_EOI`) only when an MSI route at a GSI
//! below 24 is level-triggered with that vector and targets the vCPU
//! (`kvm_scan_ioapic_routes`). Legacy GSI `n` then carries the translated message IOAPIC
//! pin `n` delivers while it is level-triggered ([`RouteTable::set_pin_route`]); nothing
//! is injected through it.
//!
//! **Owners.** Several parties put MSI routes in the one table: the interrupt core (the
//! routes behind remapped entries, [`OwnerId::CORE`]) and any number of others, each an
//! [`OwnerId`] with a route budget (an embedder's own MSI routes, the test harness's plain
//! routes). Each owner stages and commits its own routes: [`RouteTable::commit_as`] sends
//! KVM what is committed plus that owner's staged changes, and [`RouteTable::rollback_as`]
//! drops only that owner's, so a failed transaction of one owner (a failed IRTE
//! transaction included) never drops another's staged routes. GSIs are handed out from one
//! space, staged routes of every owner included, so they never collide.
//!
//! Ordering rules from the kernel (virt/kvm/eventfd.c): an irqfd resolves its route when
//! it is assigned, so the route must be committed first ([`RouteError::NotCommitted`]);
//! and a route must not be removed while irqfds are attached to it
//! ([`RouteError::IrqfdsAttached`]): detach first, then remove and commit.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::msi::MsiMessage;
use crate::port::{Gsi, RouteEntry, RouteKind, RoutingBackend};

/// KVM's number for the in-kernel PIC's first chip (`KVM_IRQCHIP_PIC_MASTER`).
pub const IRQCHIP_PIC_MASTER: u32 = 0;
/// KVM's number for the in-kernel PIC's second chip (`KVM_IRQCHIP_PIC_SLAVE`).
pub const IRQCHIP_PIC_SLAVE: u32 = 1;
/// KVM's number for the in-kernel IOAPIC (`KVM_IRQCHIP_IOAPIC`).
pub const IRQCHIP_IOAPIC: u32 = 2;

/// GSIs below this belong to the IOAPIC's pins (and the in-kernel PIC's below 16).
pub const LEGACY_GSI_COUNT: Gsi = 24;

/// Where the VM's IOAPIC (and PIC) are, which decides what the legacy GSIs carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Irqchip {
    /// KVM's in-kernel PIC and IOAPIC (`KVM_CREATE_IRQCHIP`): the legacy GSIs go to their
    /// pins.
    #[default]
    InKernel,
    /// The split irqchip: local APICs in KVM, the IOAPIC in user space, no PIC. The legacy
    /// GSIs carry the level-triggered pins' messages (see the module documentation).
    Split,
}

/// Why a routing operation failed. The table is unchanged after every one of them.
#[derive(Debug, Error)]
pub enum RouteError {
    /// Every GSI up to KVM's limit is in use.
    #[error("no free GSI: all {limit} routes are in use")]
    Exhausted {
        /// KVM's route limit.
        limit: u32,
    },
    /// The GSI is not an MSI route of this table.
    #[error("GSI {0} is not an allocated MSI route")]
    NotAllocated(Gsi),
    /// An irqfd was to be attached to a route KVM does not have yet.
    #[error("GSI {0} has no committed route (commit before attaching an irqfd)")]
    NotCommitted(Gsi),
    /// A route was to be removed while irqfds are attached to it.
    #[error("GSI {0} still has irqfds attached (detach them before removing the route)")]
    IrqfdsAttached(Gsi),
    /// A pin route was set on a table without the split irqchip, or beyond the pins.
    #[error("GSI {0} is not an IOAPIC pin of a split irqchip")]
    NotAPin(Gsi),
    /// KVM's route limit leaves no room above the legacy GSIs.
    #[error("KVM reports {0} routes, too few for the {LEGACY_GSI_COUNT} legacy GSIs")]
    LimitTooSmall(u32),
    /// An owner would exceed its route budget.
    #[error("route owner {owner} would exceed its budget of {budget} routes")]
    OwnerBudget {
        /// The owner.
        owner: u32,
        /// Its budget.
        budget: u32,
    },
    /// The owner is not registered, or the route belongs to another owner.
    #[error("route owner {0} is unknown or does not own the route")]
    NotOwner(u32),
    /// `KVM_SET_GSI_ROUTING` failed; the previous table stays in force.
    #[error("KVM_SET_GSI_ROUTING failed")]
    Commit(#[source] io::Error),
    /// `KVM_IRQFD` (assign) failed.
    #[error("attaching an irqfd to GSI {gsi} failed")]
    Assign {
        /// The route.
        gsi: Gsi,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `KVM_IRQFD` (deassign) failed.
    #[error("detaching an irqfd from GSI {gsi} failed")]
    Deassign {
        /// The route.
        gsi: Gsi,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// The legacy entries of KVM's default table: IOAPIC pins 0-23 and PIC pins 0-15.
fn legacy_routes() -> Vec<RouteEntry> {
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..LEGACY_GSI_COUNT {
        if gsi < 16 {
            let chip = if gsi < 8 {
                IRQCHIP_PIC_MASTER
            } else {
                IRQCHIP_PIC_SLAVE
            };
            routes.push(RouteEntry {
                gsi,
                kind: RouteKind::Irqchip { chip, pin: gsi % 8 },
            });
        }
        routes.push(RouteEntry {
            gsi,
            kind: RouteKind::Irqchip {
                chip: IRQCHIP_IOAPIC,
                pin: gsi,
            },
        });
    }
    routes
}

/// Who a route belongs to (module documentation, "Owners").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerId(pub u32);

impl OwnerId {
    /// The interrupt core: the routes behind remapped entries (no budget of its own; its
    /// accounting is the core's).
    pub const CORE: OwnerId = OwnerId(0);
}

/// One MSI route and its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    owner: OwnerId,
    msg: MsiMessage,
}

/// An owner's routes against its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerUsage {
    /// The owner.
    pub owner: OwnerId,
    /// What it was registered as.
    pub name: String,
    /// Routes it has staged (committed or not).
    pub routes: u32,
    /// Routes it may have.
    pub budget: u32,
}

/// The routing table: legacy pins plus MSI routes, staged and committed, by owner.
#[derive(Debug)]
pub struct RouteTable<B> {
    backend: B,
    limit: u32,
    irqchip: Irqchip,
    committed: BTreeMap<Gsi, Route>,
    staged: BTreeMap<Gsi, Route>,
    /// Owners other than the core: name and budget.
    owners: BTreeMap<OwnerId, (String, u32)>,
    /// Split irqchip only: the level-triggered pins' routes (committed at once).
    pins: BTreeMap<Gsi, MsiMessage>,
    irqfds: BTreeMap<Gsi, u32>,
    /// Owners that staged a change since their last commit or rollback: the others' staged
    /// routes are their committed ones, and their commit has nothing to compare or send.
    unsettled: BTreeSet<OwnerId>,
    commits: u64,
    commit_time: Duration,
    last_commit_time: Duration,
}

impl<B: RoutingBackend> RouteTable<B> {
    /// Takes ownership of KVM's table: commits the legacy routes so that KVM's table and
    /// ours agree from the start. `limit` is KVM's route limit.
    ///
    /// # Errors
    /// [`RouteError::LimitTooSmall`] or [`RouteError::Commit`].
    pub fn new(backend: B, limit: u32) -> Result<Self, RouteError> {
        Self::with_irqchip(backend, limit, Irqchip::InKernel)
    }

    /// Takes ownership of KVM's table for a VM with `irqchip`: with the in-kernel one as
    /// [`Self::new`]; with the split one the table starts empty (no pin routes).
    ///
    /// # Errors
    /// [`RouteError::LimitTooSmall`] or [`RouteError::Commit`].
    pub fn with_irqchip(backend: B, limit: u32, irqchip: Irqchip) -> Result<Self, RouteError> {
        if limit <= LEGACY_GSI_COUNT {
            return Err(RouteError::LimitTooSmall(limit));
        }
        let initial = match irqchip {
            Irqchip::InKernel => legacy_routes(),
            Irqchip::Split => Vec::new(),
        };
        backend.set_routes(&initial).map_err(RouteError::Commit)?;
        Ok(Self {
            backend,
            limit,
            irqchip,
            committed: BTreeMap::new(),
            staged: BTreeMap::new(),
            owners: BTreeMap::new(),
            pins: BTreeMap::new(),
            irqfds: BTreeMap::new(),
            unsettled: BTreeSet::new(),
            commits: 1,
            commit_time: Duration::ZERO,
            last_commit_time: Duration::ZERO,
        })
    }

    /// KVM's route limit (GSIs are below it).
    #[must_use]
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The irqchip the legacy GSIs are routed for.
    #[must_use]
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// The route IOAPIC pin `pin` has (split irqchip).
    #[must_use]
    pub fn pin_route(&self, pin: Gsi) -> Option<MsiMessage> {
        self.pins.get(&pin).copied()
    }

    /// Split irqchip: gives IOAPIC pin `pin` the route `msg` (the translated message of a
    /// level-triggered pin) or none, committing at once when that changes anything (with
    /// the MSI routes KVM already has; staged ones stay staged). Returns whether a commit
    /// was made.
    ///
    /// # Errors
    /// [`RouteError::NotAPin`] or [`RouteError::Commit`] (the pin keeps its route).
    pub fn set_pin_route(&mut self, pin: Gsi, msg: Option<MsiMessage>) -> Result<bool, RouteError> {
        if self.irqchip != Irqchip::Split || pin >= LEGACY_GSI_COUNT {
            return Err(RouteError::NotAPin(pin));
        }
        if self.pins.get(&pin) == msg.as_ref() {
            return Ok(false);
        }
        let previous = match msg {
            Some(m) => self.pins.insert(pin, m),
            None => self.pins.remove(&pin),
        };
        let committed = self.send(&self.committed.clone());
        if committed.is_err() {
            match previous {
                Some(m) => self.pins.insert(pin, m),
                None => self.pins.remove(&pin),
            };
        }
        committed.map(|()| true)
    }

    /// `KVM_SET_GSI_ROUTING` calls made so far (including the initial one).
    #[must_use]
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// MSI routes KVM currently has.
    #[must_use]
    pub fn committed_msi_routes(&self) -> usize {
        self.committed.len()
    }

    /// MSI routes staged (what KVM will have after the next commit).
    #[must_use]
    pub fn staged_msi_routes(&self) -> usize {
        self.staged.len()
    }

    /// How many MSI routes fit above the legacy GSIs.
    #[must_use]
    pub fn capacity(&self) -> usize {
        (self.limit - LEGACY_GSI_COUNT) as usize
    }

    /// Time spent in `KVM_SET_GSI_ROUTING` by [`Self::commit`]: in all, and the last call.
    #[must_use]
    pub fn commit_time(&self) -> (Duration, Duration) {
        (self.commit_time, self.last_commit_time)
    }

    /// Registers a new route owner named `name` that may have `budget` routes.
    pub fn add_owner(&mut self, name: &str, budget: u32) -> OwnerId {
        let id = self
            .owners
            .keys()
            .next_back()
            .map_or(1, |o| o.0.saturating_add(1));
        let owner = OwnerId(id);
        self.owners.insert(owner, (name.to_string(), budget));
        owner
    }

    /// Removes `owner`'s staged changes and every route it has, in one commit, and
    /// forgets it. Its irqfds must be detached first.
    ///
    /// # Errors
    /// [`RouteError::NotOwner`], [`RouteError::IrqfdsAttached`] or
    /// [`RouteError::Commit`] (the owner stays, with its committed routes).
    pub fn remove_owner(&mut self, owner: OwnerId) -> Result<(), RouteError> {
        if owner == OwnerId::CORE || !self.owners.contains_key(&owner) {
            return Err(RouteError::NotOwner(owner.0));
        }
        self.rollback_as(owner);
        let gsis: Vec<Gsi> = self.owned(owner).collect();
        if let Some(&gsi) = gsis.iter().find(|g| self.irqfds.contains_key(g)) {
            return Err(RouteError::IrqfdsAttached(gsi));
        }
        for gsi in &gsis {
            self.staged.remove(gsi);
        }
        self.unsettled.insert(owner);
        self.commit_as(owner)?;
        self.owners.remove(&owner);
        Ok(())
    }

    /// Every owner but the core, with its routes and budget.
    #[must_use]
    pub fn owners(&self) -> Vec<OwnerUsage> {
        self.owners
            .iter()
            .map(|(&owner, (name, budget))| OwnerUsage {
                owner,
                name: name.clone(),
                routes: u32::try_from(self.owned(owner).count()).unwrap_or(u32::MAX),
                budget: *budget,
            })
            .collect()
    }

    /// Who has route `gsi` staged.
    #[must_use]
    pub fn owner_of(&self, gsi: Gsi) -> Option<OwnerId> {
        self.staged.get(&gsi).map(|r| r.owner)
    }

    /// The GSIs `owner` has staged.
    fn owned(&self, owner: OwnerId) -> impl Iterator<Item = Gsi> + '_ {
        self.staged
            .iter()
            .filter(move |(_, r)| r.owner == owner)
            .map(|(&gsi, _)| gsi)
    }

    /// Stages a new MSI route of the core and returns its GSI (the lowest free one).
    ///
    /// # Errors
    /// [`RouteError::Exhausted`].
    pub fn allocate(&mut self, msg: MsiMessage) -> Result<Gsi, RouteError> {
        self.allocate_as(OwnerId::CORE, msg)
    }

    /// Stages a new MSI route of `owner` and returns its GSI (the lowest free one).
    ///
    /// # Errors
    /// [`RouteError::NotOwner`], [`RouteError::OwnerBudget`] or [`RouteError::Exhausted`].
    pub fn allocate_as(&mut self, owner: OwnerId, msg: MsiMessage) -> Result<Gsi, RouteError> {
        if owner != OwnerId::CORE {
            let &(_, budget) = self
                .owners
                .get(&owner)
                .ok_or(RouteError::NotOwner(owner.0))?;
            if self.owned(owner).count() >= budget as usize {
                return Err(RouteError::OwnerBudget {
                    owner: owner.0,
                    budget,
                });
            }
        }
        // The lowest GSI neither staged nor still KVM's for another owner (one that owner
        // removed but has not committed yet); an owner may reuse its own.
        let mut candidate = LEGACY_GSI_COUNT;
        for &gsi in self.staged.keys() {
            if gsi != candidate {
                break;
            }
            candidate += 1;
        }
        while self.staged.contains_key(&candidate)
            || self
                .committed
                .get(&candidate)
                .is_some_and(|r| r.owner != owner)
        {
            candidate += 1;
        }
        if candidate >= self.limit {
            return Err(RouteError::Exhausted { limit: self.limit });
        }
        self.staged.insert(candidate, Route { owner, msg });
        self.unsettled.insert(owner);
        Ok(candidate)
    }

    /// Stages a new message for an existing MSI route of the core.
    ///
    /// # Errors
    /// [`RouteError::NotAllocated`].
    pub fn update(&mut self, gsi: Gsi, msg: MsiMessage) -> Result<(), RouteError> {
        self.update_as(OwnerId::CORE, gsi, msg)
    }

    /// Stages a new message for an existing MSI route of `owner`.
    ///
    /// # Errors
    /// [`RouteError::NotAllocated`] or [`RouteError::NotOwner`].
    pub fn update_as(
        &mut self,
        owner: OwnerId,
        gsi: Gsi,
        msg: MsiMessage,
    ) -> Result<(), RouteError> {
        let route = self
            .staged
            .get_mut(&gsi)
            .ok_or(RouteError::NotAllocated(gsi))?;
        if route.owner != owner {
            return Err(RouteError::NotOwner(owner.0));
        }
        route.msg = msg;
        self.unsettled.insert(owner);
        Ok(())
    }

    /// Stages the removal of an MSI route of the core.
    ///
    /// # Errors
    /// [`RouteError::NotAllocated`] or [`RouteError::IrqfdsAttached`].
    pub fn remove(&mut self, gsi: Gsi) -> Result<(), RouteError> {
        self.remove_as(OwnerId::CORE, gsi)
    }

    /// Stages the removal of an MSI route of `owner`.
    ///
    /// # Errors
    /// [`RouteError::NotAllocated`], [`RouteError::NotOwner`] or
    /// [`RouteError::IrqfdsAttached`].
    pub fn remove_as(&mut self, owner: OwnerId, gsi: Gsi) -> Result<(), RouteError> {
        match self.staged.get(&gsi) {
            None => return Err(RouteError::NotAllocated(gsi)),
            Some(r) if r.owner != owner => return Err(RouteError::NotOwner(owner.0)),
            Some(_) => {}
        }
        if self.irqfds.get(&gsi).copied().unwrap_or(0) > 0 {
            return Err(RouteError::IrqfdsAttached(gsi));
        }
        self.staged.remove(&gsi);
        self.unsettled.insert(owner);
        Ok(())
    }

    /// `owner`'s staged routes, to put back with [`Self::restore_staged`].
    pub(crate) fn staged_of(&self, owner: OwnerId) -> Vec<(Gsi, MsiMessage)> {
        self.staged
            .iter()
            .filter(|(_, r)| r.owner == owner)
            .map(|(&g, r)| (g, r.msg))
            .collect()
    }

    /// Puts `owner`'s staged routes back to `routes` (from [`Self::staged_of`]).
    pub(crate) fn restore_staged(&mut self, owner: OwnerId, routes: Vec<(Gsi, MsiMessage)>) {
        self.staged.retain(|_, r| r.owner != owner);
        for (gsi, msg) in routes {
            self.staged.insert(gsi, Route { owner, msg });
        }
        self.unsettled.insert(owner);
    }

    /// Drops every staged change of the core.
    pub fn rollback(&mut self) {
        self.rollback_as(OwnerId::CORE);
    }

    /// Drops every staged change of `owner`; other owners' stay staged.
    pub fn rollback_as(&mut self, owner: OwnerId) {
        self.staged.retain(|_, r| r.owner != owner);
        for (&gsi, r) in &self.committed {
            if r.owner == owner {
                self.staged.insert(gsi, *r);
            }
        }
        self.unsettled.remove(&owner);
    }

    /// Commits the core's staged changes ([`Self::commit_as`]).
    ///
    /// # Errors
    /// As [`Self::commit_as`].
    pub fn commit(&mut self) -> Result<bool, RouteError> {
        self.commit_as(OwnerId::CORE)
    }

    /// Sends KVM, in one ioctl, the committed table with `owner`'s staged changes applied
    /// (other owners' staged changes stay staged). Returns whether a call was made (a
    /// commit with nothing of `owner`'s staged is skipped, without walking the table when
    /// `owner` staged nothing since its last commit).
    ///
    /// # Errors
    /// [`RouteError::NotOwner`] for an owner never registered, or [`RouteError::Commit`];
    /// `owner`'s staged changes are then dropped and KVM keeps the previous table.
    pub fn commit_as(&mut self, owner: OwnerId) -> Result<bool, RouteError> {
        if owner != OwnerId::CORE && !self.owners.contains_key(&owner) {
            return Err(RouteError::NotOwner(owner.0));
        }
        if !self.unsettled.contains(&owner) {
            return Ok(false);
        }
        let next: BTreeMap<Gsi, Route> = if self.owners.is_empty() {
            // The core alone: what is staged is what KVM gets.
            self.staged.clone()
        } else {
            let mut next: BTreeMap<Gsi, Route> = self
                .committed
                .iter()
                .filter(|(_, r)| r.owner != owner)
                .map(|(&g, &r)| (g, r))
                .collect();
            next.extend(
                self.staged
                    .iter()
                    .filter(|(_, r)| r.owner == owner)
                    .map(|(&g, &r)| (g, r)),
            );
            next
        };
        if next == self.committed {
            self.unsettled.remove(&owner);
            return Ok(false);
        }
        if let Err(e) = self.send(&next) {
            self.rollback_as(owner);
            return Err(e);
        }
        self.committed = next;
        self.unsettled.remove(&owner);
        Ok(true)
    }

    /// Sends the legacy GSIs, the pins' routes and `msis` to KVM.
    fn send(&mut self, msis: &BTreeMap<Gsi, Route>) -> Result<(), RouteError> {
        let mut routes = match self.irqchip {
            Irqchip::InKernel => legacy_routes(),
            Irqchip::Split => Vec::with_capacity(self.pins.len() + msis.len()),
        };
        routes.extend(self.pins.iter().map(|(&gsi, &msg)| RouteEntry {
            gsi,
            kind: RouteKind::Msi(msg),
        }));
        routes.extend(msis.iter().map(|(&gsi, r)| RouteEntry {
            gsi,
            kind: RouteKind::Msi(r.msg),
        }));
        let begin = Instant::now();
        let result = self.backend.set_routes(&routes);
        self.last_commit_time = begin.elapsed();
        self.commit_time += self.last_commit_time;
        tracing::info!(
            target: "irvm::routes",
            kind = "commit",
            routes = routes.len(),
            msi_routes = msis.len(),
            duration_ns = u64::try_from(self.last_commit_time.as_nanos()).unwrap_or(u64::MAX),
            ok = result.is_ok(),
            error = result.as_ref().err().map(tracing::field::display),
        );
        result.map_err(RouteError::Commit)?;
        self.commits += 1;
        Ok(())
    }

    /// Attaches `fd` to the committed route `gsi`.
    ///
    /// # Errors
    /// [`RouteError::NotCommitted`] or [`RouteError::Assign`].
    pub fn attach_irqfd(&mut self, fd: &EventFd, gsi: Gsi) -> Result<(), RouteError> {
        let routed = match self.irqchip {
            Irqchip::InKernel => gsi < LEGACY_GSI_COUNT,
            Irqchip::Split => self.pins.contains_key(&gsi),
        };
        if !routed && !self.committed.contains_key(&gsi) {
            return Err(RouteError::NotCommitted(gsi));
        }
        let assigned = self.backend.assign_irqfd(fd, gsi);
        trace_irqfd("irqfd_attach", fd, gsi, assigned.is_ok());
        assigned.map_err(|source| RouteError::Assign { gsi, source })?;
        *self.irqfds.entry(gsi).or_insert(0) += 1;
        Ok(())
    }

    /// Detaches `fd` from `gsi`.
    ///
    /// # Errors
    /// [`RouteError::Deassign`].
    pub fn detach_irqfd(&mut self, fd: &EventFd, gsi: Gsi) -> Result<(), RouteError> {
        let deassigned = self.backend.deassign_irqfd(fd, gsi);
        trace_irqfd("irqfd_detach", fd, gsi, deassigned.is_ok());
        deassigned.map_err(|source| RouteError::Deassign { gsi, source })?;
        if let Some(n) = self.irqfds.get_mut(&gsi) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.irqfds.remove(&gsi);
            }
        }
        Ok(())
    }
}

/// The trace event of an irqfd attached to or detached from `gsi`.
fn trace_irqfd(kind: &'static str, fd: &EventFd, gsi: Gsi, ok: bool) {
    tracing::info!(target: "irvm::routes", kind, gsi, fd = fd.as_raw_fd(), ok);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every call; fails the calls it is told to.
    #[derive(Debug, Default)]
    struct FakeKvm {
        tables: Mutex<Vec<Vec<RouteEntry>>>,
        fail_set: Mutex<bool>,
        assigned: Mutex<Vec<Gsi>>,
    }

    impl RoutingBackend for &FakeKvm {
        fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()> {
            if *self.fail_set.lock().unwrap() {
                return Err(io::Error::from_raw_os_error(libc_enomem()));
            }
            self.tables.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
        fn assign_irqfd(&self, _fd: &EventFd, gsi: Gsi) -> io::Result<()> {
            self.assigned.lock().unwrap().push(gsi);
            Ok(())
        }
        fn deassign_irqfd(&self, _fd: &EventFd, gsi: Gsi) -> io::Result<()> {
            let mut a = self.assigned.lock().unwrap();
            let pos = a
                .iter()
                .position(|&g| g == gsi)
                .expect("deassign of unassigned irqfd");
            a.remove(pos);
            Ok(())
        }
    }

    fn libc_enomem() -> i32 {
        12
    }

    fn msi(dest: u32) -> MsiMessage {
        MsiMessage::compatibility(dest, 0x40).unwrap()
    }

    #[test]
    fn new_table_commits_the_legacy_routes() {
        let kvm = FakeKvm::default();
        let table = RouteTable::new(&kvm, 4096).unwrap();
        let tables = kvm.tables.lock().unwrap();
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].len(), 24 + 16);
        assert_eq!(table.commits(), 1);
        RouteTable::new(&kvm, 24).unwrap_err();
    }

    #[test]
    fn allocations_start_above_legacy_and_commit_once() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::new(&kvm, 4096).unwrap();
        let a = table.allocate(msi(0)).unwrap();
        let b = table.allocate(msi(1)).unwrap();
        assert_eq!((a, b), (24, 25));
        assert!(table.commit().unwrap());
        let last = kvm.tables.lock().unwrap().last().unwrap().clone();
        assert_eq!(last.len(), 40 + 2);
        assert_eq!(
            last[41],
            RouteEntry {
                gsi: 25,
                kind: RouteKind::Msi(msi(1))
            }
        );
        // Nothing staged: no ioctl.
        assert!(!table.commit().unwrap());
        assert_eq!(kvm.tables.lock().unwrap().len(), 2);
        // A freed GSI is reused.
        table.remove(a).unwrap();
        assert_eq!(table.allocate(msi(2)).unwrap(), 24);
    }

    #[test]
    fn failed_commit_keeps_the_previous_table() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::new(&kvm, 4096).unwrap();
        let gsi = table.allocate(msi(0)).unwrap();
        table.commit().unwrap();
        table.update(gsi, msi(5)).unwrap();
        *kvm.fail_set.lock().unwrap() = true;
        assert!(matches!(table.commit(), Err(RouteError::Commit(_))));
        *kvm.fail_set.lock().unwrap() = false;
        // The staged update was dropped: committing again is a no-op, and the route
        // still carries the old message.
        assert!(!table.commit().unwrap());
        assert_eq!(table.committed.get(&gsi).map(|r| r.msg), Some(msi(0)));
        assert_eq!(table.commits(), 2);
    }

    #[test]
    fn ordering_rules_are_enforced() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::new(&kvm, 4096).unwrap();
        let fd = EventFd::new(0).unwrap();
        let gsi = table.allocate(msi(0)).unwrap();
        assert!(matches!(
            table.attach_irqfd(&fd, gsi),
            Err(RouteError::NotCommitted(24))
        ));
        table.commit().unwrap();
        table.attach_irqfd(&fd, gsi).unwrap();
        assert!(matches!(
            table.remove(gsi),
            Err(RouteError::IrqfdsAttached(24))
        ));
        table.detach_irqfd(&fd, gsi).unwrap();
        table.remove(gsi).unwrap();
        table.commit().unwrap();
        assert_eq!(table.committed_msi_routes(), 0);
        assert!(matches!(
            table.update(gsi, msi(1)),
            Err(RouteError::NotAllocated(24))
        ));
    }

    #[test]
    fn a_split_irqchip_table_has_only_the_level_pins_routes() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::with_irqchip(&kvm, 4096, Irqchip::Split).unwrap();
        assert!(kvm.tables.lock().unwrap()[0].is_empty());
        let gsi = table.allocate(msi(0)).unwrap();
        assert_eq!(gsi, 24);
        table.commit().unwrap();
        // A pin route commits at once, beside the MSI routes; setting it again is free.
        assert!(table.set_pin_route(4, Some(msi(3))).unwrap());
        assert!(!table.set_pin_route(4, Some(msi(3))).unwrap());
        let last = kvm.tables.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            last,
            vec![
                RouteEntry {
                    gsi: 4,
                    kind: RouteKind::Msi(msi(3))
                },
                RouteEntry {
                    gsi: 24,
                    kind: RouteKind::Msi(msi(0))
                }
            ]
        );
        assert_eq!(table.pin_route(4), Some(msi(3)));
        // A failed commit leaves the pin as it was.
        *kvm.fail_set.lock().unwrap() = true;
        table.set_pin_route(4, None).unwrap_err();
        table.set_pin_route(5, Some(msi(1))).unwrap_err();
        *kvm.fail_set.lock().unwrap() = false;
        assert_eq!(
            (table.pin_route(4), table.pin_route(5)),
            (Some(msi(3)), None)
        );
        // A pin change sends what KVM has, not what is staged; the MSI commit keeps pins.
        table.update(gsi, msi(2)).unwrap();
        assert!(table.set_pin_route(6, Some(msi(4))).unwrap());
        let last = kvm.tables.lock().unwrap().last().unwrap().clone();
        assert!(last.contains(&RouteEntry {
            gsi,
            kind: RouteKind::Msi(msi(0))
        }));
        assert!(table.set_pin_route(6, None).unwrap());
        table.commit().unwrap();
        assert_eq!(kvm.tables.lock().unwrap().last().unwrap().len(), 2);
        assert!(table.set_pin_route(4, None).unwrap());
        assert_eq!(kvm.tables.lock().unwrap().last().unwrap().len(), 1);
        // Only pins 0-23 of a split irqchip have pin routes.
        assert!(matches!(
            table.set_pin_route(24, None),
            Err(RouteError::NotAPin(24))
        ));
        let mut in_kernel = RouteTable::new(&kvm, 4096).unwrap();
        assert!(matches!(
            in_kernel.set_pin_route(4, None),
            Err(RouteError::NotAPin(4))
        ));
    }

    #[test]
    fn exhaustion_is_an_error() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::new(&kvm, 26).unwrap();
        table.allocate(msi(0)).unwrap();
        table.allocate(msi(1)).unwrap();
        assert!(matches!(
            table.allocate(msi(2)),
            Err(RouteError::Exhausted { limit: 26 })
        ));
    }

    /// The MSI routes KVM was last given.
    fn kvm_msis(kvm: &FakeKvm) -> Vec<Gsi> {
        let tables = kvm.tables.lock().unwrap();
        tables
            .last()
            .unwrap()
            .iter()
            .filter(|e| matches!(e.kind, RouteKind::Msi(_)))
            .map(|e| e.gsi)
            .collect()
    }

    #[test]
    fn an_owner_that_staged_nothing_since_its_commit_sends_nothing() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::new(&kvm, 4096).unwrap();
        let other = table.add_owner("embedder", 4);
        let gsi = table.allocate(msi(0)).unwrap();
        assert!(table.commit().unwrap());
        let sent = table.commits();
        assert!(!table.commit().unwrap(), "nothing staged since");
        // Another owner's staging does not unsettle the core.
        table.allocate_as(other, msi(1)).unwrap();
        assert!(!table.commit().unwrap());
        assert_eq!(table.commits(), sent);
        assert!(table.commit_as(other).unwrap());
        // A change undone before the commit sends nothing either; a real one does.
        table.update(gsi, msi(2)).unwrap();
        table.update(gsi, msi(0)).unwrap();
        assert!(!table.commit().unwrap());
        table.update(gsi, msi(3)).unwrap();
        table.rollback();
        assert!(!table.commit().unwrap());
        table.update(gsi, msi(3)).unwrap();
        assert!(table.commit().unwrap());
        assert_eq!(table.commits(), sent + 2);
    }

    #[test]
    fn each_owner_commits_and_rolls_back_only_its_own_routes() {
        let kvm = FakeKvm::default();
        let mut table = RouteTable::new(&kvm, 4096).unwrap();
        let vmm = table.add_owner("embedder", 2);
        let mine = table.allocate_as(vmm, msi(1)).unwrap();
        // The core stages and commits: the embedder's staged route is not sent, and stays
        // staged.
        let core = table.allocate(msi(0)).unwrap();
        assert_ne!(mine, core);
        assert!(table.commit().unwrap());
        assert_eq!(kvm_msis(&kvm), vec![core]);
        // The core's next transaction fails: only its own staged change goes.
        table.allocate(msi(2)).unwrap();
        *kvm.fail_set.lock().unwrap() = true;
        table.commit().unwrap_err();
        *kvm.fail_set.lock().unwrap() = false;
        assert_eq!(
            table.staged_msi_routes(),
            2,
            "the core's first and the embedder's"
        );
        assert!(table.commit_as(vmm).unwrap());
        assert_eq!(kvm_msis(&kvm), vec![mine.min(core), mine.max(core)]);
        // Ownership and budget.
        table.update_as(vmm, core, msi(3)).unwrap_err();
        table.remove_as(vmm, core).unwrap_err();
        table.allocate_as(vmm, msi(4)).unwrap();
        assert!(matches!(
            table.allocate_as(vmm, msi(5)).unwrap_err(),
            RouteError::OwnerBudget { budget: 2, .. }
        ));
        table.rollback_as(vmm);
        let usage = table.owners();
        assert_eq!(
            (usage[0].name.as_str(), usage[0].routes, usage[0].budget),
            ("embedder", 1, 2)
        );
        // A GSI one owner removed but has not committed is not handed to another.
        table.remove_as(vmm, mine).unwrap();
        let next = table.allocate(msi(6)).unwrap();
        assert_ne!(next, mine);
        table.commit().unwrap();
        table.commit_as(vmm).unwrap();
        assert_eq!(kvm_msis(&kvm), vec![core.min(next), core.max(next)]);
        table.remove_owner(vmm).unwrap();
        assert!(table.owners().is_empty());
        table.allocate_as(vmm, msi(7)).unwrap_err();
        // An owner that was never registered (or is gone) commits nothing of anyone's.
        table.allocate(msi(8)).unwrap();
        let calls = kvm.tables.lock().unwrap().len();
        assert!(matches!(table.commit_as(vmm), Err(RouteError::NotOwner(_))));
        assert_eq!(kvm.tables.lock().unwrap().len(), calls);
    }
}
