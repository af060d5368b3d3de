//! Interrupt sources outside the core: an entry **bound** to an eventfd that someone else
//! writes (a VFIO vector, a vhost-user backend, a vfio-user server, another VMM's device
//! model). The core keeps that eventfd attached as an irqfd to the KVM route of whatever
//! target the entry has, so a write goes guest-ward in the kernel with no VMM thread on
//! the way:
//!
//! - attached while the entry is present and its source validation allows the requester
//!   it was bound for; detached while it is absent, faulty or validates someone else;
//! - moved on retarget: detached from the old target's route, attached to the new one. A
//!   write in between stays in the eventfd's counter and KVM injects it, to the new
//!   target, when the eventfd is attached (KVM polls an irqfd when it is assigned), so
//!   none is lost and none is doubled. A retarget that rewrites the entry's route in
//!   place needs no move at all;
//! - what was written while it was detached is dropped when it is attached again, and
//!   recorded as the entry's fault (not present, or source-id mismatch), as a remapping
//!   unit drops a request it blocks;
//! - freed with the entry (the core drops its copy of the eventfd; the owner keeps its
//!   own).
//!
//! **Source-id verification** happens when the eventfd is bound and whenever the entry
//! changes, not per interrupt (no VMM code sees those writes): an entry can be bound only
//! by its owner, for the requester it was allocated to, and is attached only while its
//! source validation allows that requester. Storm control and the data path's delivery
//! counts do not see bound writes either. The moves are part of the transaction that
//! changes the entry: if KVM refuses an attach, the whole transaction fails and every
//! eventfd is back where it was.
//!
//! Bindings are not part of a snapshot: whoever restores a VM binds its sources again.

use std::sync::PoisonError;

use vmm_sys_util::eventfd::EventFd;

use super::commit::{NewState, Planned};
use super::{Backing, BackingError, RouteKey};
use crate::path::{Policy, Published};
use crate::port::{Gsi, RoutingBackend};
use crate::remap::FaultReason;

/// An entry's external source.
#[derive(Debug)]
pub(super) struct Bound {
    /// The requester it was bound for (the entry's owner).
    requester: u16,
    /// The core's copy of the eventfd.
    fd: EventFd,
    /// The GSI it is attached to.
    attached: Option<Gsi>,
    /// What a write is while it is detached.
    detached_as: FaultReason,
}

/// One bound eventfd's move in a commit: from one GSI (or none) to another (or none).
#[derive(Debug, Clone, Copy)]
pub(super) struct Move {
    index: u32,
    from: Option<Gsi>,
    to: Result<Gsi, FaultReason>,
    /// What a write was while detached, before the move.
    was: FaultReason,
}

/// Where a bound source goes for an entry in `state` as `requester`: the GSI of its
/// target's route, or why it is detached.
fn destination(
    live: Option<(RouteKey, Policy)>,
    requester: u16,
    gsi_of: impl Fn(RouteKey) -> Option<Gsi>,
) -> Result<Gsi, FaultReason> {
    let Some((key, policy)) = live else {
        return Err(FaultReason::NotPresent);
    };
    if !policy.validation.allows(requester) {
        return Err(FaultReason::SourceIdMismatch);
    }
    gsi_of(key).ok_or(FaultReason::NotPresent)
}

impl<B: RoutingBackend> Backing<B> {
    /// Binds entry `index` to `fd`, an eventfd its owner `requester` writes from outside
    /// the core (module documentation of `bound`). Attached at once if the entry is live.
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`], [`BackingError::NotAllocated`],
    /// [`BackingError::NotOwner`], [`BackingError::AlreadyBound`],
    /// [`BackingError::NotVerified`] (the live entry validates another requester), or
    /// [`BackingError::Route`] (KVM refused the irqfd); nothing is bound then.
    pub fn bind(&mut self, index: u32, requester: u16, fd: EventFd) -> Result<(), BackingError> {
        self.check_owner(index, requester)?;
        self.attach_new(index, requester, fd)
    }

    fn attach_new(&mut self, index: u32, requester: u16, fd: EventFd) -> Result<(), BackingError> {
        if self.bound.contains_key(&index) {
            return Err(BackingError::AlreadyBound(index));
        }
        let to = destination(self.live_now(index), requester, |k| self.line_gsi(k));
        if to == Err(FaultReason::SourceIdMismatch) {
            return Err(BackingError::NotVerified { index, requester });
        }
        let mut bound = Bound {
            requester,
            fd,
            attached: None,
            detached_as: FaultReason::NotPresent,
        };
        match to {
            Ok(gsi) => {
                // Whatever was written before the binding is the owner's business.
                let _ = bound.fd.read();
                self.routes.attach_irqfd(&bound.fd, gsi)?;
                bound.attached = Some(gsi);
            }
            Err(reason) => bound.detached_as = reason,
        }
        self.bound.insert(index, bound);
        Ok(())
    }

    /// Unbinds entry `index` (detaching its eventfd) and gives the eventfd back.
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`], [`BackingError::NotAllocated`],
    /// [`BackingError::NotOwner`] or [`BackingError::NotBound`].
    pub fn unbind(&mut self, index: u32, requester: u16) -> Result<EventFd, BackingError> {
        self.check_owner(index, requester)?;
        let bound = self
            .bound
            .remove(&index)
            .ok_or(BackingError::NotBound(index))?;
        if let Some(gsi) = bound.attached {
            if self.routes.detach_irqfd(&bound.fd, gsi).is_err() {
                self.stats.retire_errors += 1;
            }
        }
        Ok(bound.fd)
    }

    /// Entry `index`'s external source: the requester it was bound for, and the GSI its
    /// eventfd is attached to now (`None`: detached).
    #[must_use]
    pub fn binding(&self, index: u32) -> Option<(u16, Option<Gsi>)> {
        self.bound.get(&index).map(|b| (b.requester, b.attached))
    }

    /// Whether entry `index` is allocated to `requester`, present, and verifies it: an
    /// eventfd bound to it now would be attached.
    #[must_use]
    pub fn serves(&self, index: u32, requester: u16) -> bool {
        self.check_owner(index, requester).is_ok()
            && destination(self.live_now(index), requester, |k| self.line_gsi(k)).is_ok()
    }

    /// Whether entry `index` is present and verifies `requester`, whoever it is allocated
    /// to (or none: a VT-d unit's table entry): an eventfd bound to it for `requester`
    /// would be attached.
    #[must_use]
    pub fn verifies(&self, index: u32, requester: u16) -> bool {
        destination(self.live_now(index), requester, |k| self.line_gsi(k)).is_ok()
    }

    /// [`Self::bind`] without the allocation check, for the core's hosts of entries a
    /// device names (`control::host`): the entry must be within the table.
    pub(crate) fn bind_verified(
        &mut self,
        index: u32,
        requester: u16,
        fd: EventFd,
    ) -> Result<(), BackingError> {
        if index as usize >= self.entries.len() {
            return Err(BackingError::IndexOutOfRange(index));
        }
        self.attach_new(index, requester, fd)
    }

    /// Unbinds entry `index` whoever bound it (the core's hosts' own bindings).
    pub(crate) fn unbind_verified(&mut self, index: u32) {
        if let Some(bound) = self.bound.remove(&index) {
            if let Some(gsi) = bound.attached {
                if self.routes.detach_irqfd(&bound.fd, gsi).is_err() {
                    self.stats.retire_errors += 1;
                }
            }
        }
    }

    /// Every entry that [`Self::serves`] `requester`, in index order.
    #[must_use]
    pub fn served(&self, requester: u16) -> Vec<u32> {
        self.entries
            .iter()
            .zip(0u32..)
            .filter(|(e, i)| {
                e.owner.is_some_and(|o| o.source_id == requester) && self.serves(*i, requester)
            })
            .map(|(_, i)| i)
            .collect()
    }

    /// Entries with an external source.
    #[must_use]
    pub fn bound_entries(&self) -> usize {
        self.bound.len()
    }

    /// Drops the bindings of entries that were freed.
    pub(super) fn forget_bindings(&mut self, first: u32, end: u32) {
        self.bound.retain(|&i, _| i < first || i >= end);
    }

    fn check_owner(&self, index: u32, requester: u16) -> Result<(), BackingError> {
        let entry = self
            .entries
            .get(index as usize)
            .ok_or(BackingError::IndexOutOfRange(index))?;
        match entry.owner {
            None => Err(BackingError::NotAllocated(index)),
            Some(o) if o.source_id != requester => Err(BackingError::NotOwner {
                index,
                owner: o.source_id,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Entry `index`'s route key and requester check, as published now.
    fn live_now(&self, index: u32) -> Option<(RouteKey, Policy)> {
        let key = self.entries.get(index as usize)?.live?;
        let slot = self.path.slots.get(index as usize)?;
        match &*slot.read().unwrap_or_else(PoisonError::into_inner) {
            Published::Live { policy, .. } => Some((key, *policy)),
            _ => None,
        }
    }

    fn line_gsi(&self, key: RouteKey) -> Option<Gsi> {
        let route = self.cache.get(&key)?;
        route.line.as_ref().map(|_| route.gsi)
    }

    /// 3b. Moves the bound eventfds of `entries` to their new targets' routes (found in
    ///    the cache, or among `rewrites` not yet applied). Detaches first (a failure is
    ///    counted, as when a line retires), then attaches; if KVM refuses an attach, the
    ///    moves made are undone and the error returned. Returns the moves, for
    ///    [`Self::undo_moves`] should a later step fail.
    pub(super) fn move_bound(
        &mut self,
        entries: &[Planned],
        rewrites: &[(Gsi, RouteKey, RouteKey)],
    ) -> Result<Vec<Move>, BackingError> {
        if self.bound.is_empty() {
            return Ok(Vec::new());
        }
        let gsi_of = |k: RouteKey| {
            rewrites
                .iter()
                .find(|(_, _, new)| *new == k)
                .map(|(gsi, _, _)| *gsi)
                .or_else(|| self.line_gsi(k))
        };
        let mut moves = Vec::new();
        for p in entries {
            let Some(bound) = self.bound.get(&p.index) else {
                continue;
            };
            let live = match p.state {
                NewState::Live { key, policy } => Some((key, policy)),
                NewState::Absent | NewState::Faulty(_) => None,
            };
            let to = destination(live, bound.requester, gsi_of);
            if to.ok() != bound.attached || to.err().is_some_and(|r| r != bound.detached_as) {
                moves.push(Move {
                    index: p.index,
                    from: bound.attached,
                    to,
                    was: bound.detached_as,
                });
            }
        }
        for m in &moves {
            self.set_attachment(m.index, m.from, None, m.to.err());
        }
        for (done, m) in moves.iter().enumerate() {
            let Ok(gsi) = m.to else { continue };
            if let Err(e) = self.attach_bound(m.index, gsi, m.from.is_none()) {
                // Moves before this one are made, this one and the rest are detached:
                // put every one back where it was.
                for (k, m) in moves.iter().enumerate() {
                    let now = if k < done { m.to.ok() } else { None };
                    self.set_attachment(m.index, now, m.from, Some(m.was));
                }
                return Err(e);
            }
        }
        Ok(moves)
    }

    /// Puts the bound eventfds of `moves` back where they were before
    /// [`Self::move_bound`] (a later step of the commit failed).
    pub(super) fn undo_moves(&mut self, moves: &[Move]) {
        for m in moves {
            self.set_attachment(m.index, m.to.ok(), m.from, Some(m.was));
        }
    }

    /// Attaches entry `index`'s eventfd to `gsi`; what was written while it was detached
    /// (`drop_pending`) is dropped and recorded as the entry's fault first.
    fn attach_bound(
        &mut self,
        index: u32,
        gsi: Gsi,
        drop_pending: bool,
    ) -> Result<(), BackingError> {
        let Some(bound) = self.bound.get_mut(&index) else {
            return Ok(());
        };
        if drop_pending {
            if let Ok(n) = bound.fd.read() {
                self.path
                    .dropped(index, bound.requester, bound.detached_as, n);
            }
        }
        self.routes.attach_irqfd(&bound.fd, gsi)?;
        bound.attached = Some(gsi);
        Ok(())
    }

    /// Moves entry `index`'s eventfd from `from` to `to` (either may be none) without
    /// failing: a refused detach or attach is counted.
    fn set_attachment(
        &mut self,
        index: u32,
        from: Option<Gsi>,
        to: Option<Gsi>,
        detached_as: Option<FaultReason>,
    ) {
        let Some(bound) = self.bound.get_mut(&index) else {
            return;
        };
        if let Some(gsi) = from {
            if self.routes.detach_irqfd(&bound.fd, gsi).is_err() {
                self.stats.retire_errors += 1;
            }
            bound.attached = None;
        }
        if let Some(reason) = detached_as {
            bound.detached_as = reason;
        }
        if let Some(gsi) = to {
            if self.routes.attach_irqfd(&bound.fd, gsi).is_ok() {
                bound.attached = Some(gsi);
            } else {
                self.stats.retire_errors += 1;
            }
        }
    }
}
