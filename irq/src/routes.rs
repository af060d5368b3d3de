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
//! Ordering rules from the kernel (virt/kvm/eventfd.c): an irqfd resolves its route when
//! it is assigned, so the route must be committed first ([`RouteError::NotCommitted`]);
//! and a route must not be removed while irqfds are attached to it
//! ([`RouteError::IrqfdsAttached`]): detach first, then remove and commit.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::msi::MsiMessage;
use crate::port::{Gsi, RouteEntry, RouteKind, RoutingBackend};

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
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(RouteEntry {
                gsi,
                kind: RouteKind::Irqchip { chip, pin: gsi % 8 },
            });
        }
        routes.push(RouteEntry {
            gsi,
            kind: RouteKind::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: gsi,
            },
        });
    }
    routes
}

/// The routing table: legacy pins plus MSI routes, staged and committed.
#[derive(Debug)]
pub struct RouteTable<B> {
    backend: B,
    limit: u32,
    irqchip: Irqchip,
    committed: BTreeMap<Gsi, MsiMessage>,
    staged: BTreeMap<Gsi, MsiMessage>,
    /// Split irqchip only: the level-triggered pins' routes (committed at once).
    pins: BTreeMap<Gsi, MsiMessage>,
    irqfds: BTreeMap<Gsi, u32>,
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
            pins: BTreeMap::new(),
            irqfds: BTreeMap::new(),
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
        let committed = self.commit_table(false);
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

    /// Stages a new MSI route and returns its GSI (the lowest free one).
    ///
    /// # Errors
    /// [`RouteError::Exhausted`].
    pub fn allocate(&mut self, msg: MsiMessage) -> Result<Gsi, RouteError> {
        let mut candidate = LEGACY_GSI_COUNT;
        for &gsi in self.staged.keys() {
            if gsi != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.limit {
            return Err(RouteError::Exhausted { limit: self.limit });
        }
        self.staged.insert(candidate, msg);
        Ok(candidate)
    }

    /// Stages a new message for an existing MSI route.
    ///
    /// # Errors
    /// [`RouteError::NotAllocated`].
    pub fn update(&mut self, gsi: Gsi, msg: MsiMessage) -> Result<(), RouteError> {
        let slot = self
            .staged
            .get_mut(&gsi)
            .ok_or(RouteError::NotAllocated(gsi))?;
        *slot = msg;
        Ok(())
    }

    /// Stages the removal of an MSI route.
    ///
    /// # Errors
    /// [`RouteError::NotAllocated`] or [`RouteError::IrqfdsAttached`].
    pub fn remove(&mut self, gsi: Gsi) -> Result<(), RouteError> {
        if !self.staged.contains_key(&gsi) {
            return Err(RouteError::NotAllocated(gsi));
        }
        if self.irqfds.get(&gsi).copied().unwrap_or(0) > 0 {
            return Err(RouteError::IrqfdsAttached(gsi));
        }
        self.staged.remove(&gsi);
        Ok(())
    }

    /// Drops every staged change.
    pub fn rollback(&mut self) {
        self.staged.clone_from(&self.committed);
    }

    /// Sends the staged table to KVM in one ioctl. Returns whether a call was made (a
    /// commit with nothing staged is skipped).
    ///
    /// # Errors
    /// [`RouteError::Commit`]; the staged changes are then dropped and KVM keeps the
    /// previous table.
    pub fn commit(&mut self) -> Result<bool, RouteError> {
        if self.staged == self.committed {
            return Ok(false);
        }
        if let Err(e) = self.commit_table(true) {
            self.rollback();
            return Err(e);
        }
        self.committed.clone_from(&self.staged);
        Ok(true)
    }

    /// Sends the legacy GSIs and the staged MSI routes to KVM.
    /// `staged`: the staged MSI routes, else the committed ones (a pin change leaves
    /// whatever is staged for its own commit).
    fn commit_table(&mut self, staged: bool) -> Result<(), RouteError> {
        let msis = if staged {
            &self.staged
        } else {
            &self.committed
        };
        let mut routes = match self.irqchip {
            Irqchip::InKernel => legacy_routes(),
            Irqchip::Split => Vec::with_capacity(self.pins.len() + msis.len()),
        };
        let msi = |(&gsi, &msg): (&Gsi, &MsiMessage)| RouteEntry {
            gsi,
            kind: RouteKind::Msi(msg),
        };
        routes.extend(self.pins.iter().map(msi));
        routes.extend(msis.iter().map(msi));
        let begin = Instant::now();
        let result = self.backend.set_routes(&routes);
        self.last_commit_time = begin.elapsed();
        self.commit_time += self.last_commit_time;
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
        self.backend
            .assign_irqfd(fd, gsi)
            .map_err(|source| RouteError::Assign { gsi, source })?;
        *self.irqfds.entry(gsi).or_insert(0) += 1;
        Ok(())
    }

    /// Detaches `fd` from `gsi`.
    ///
    /// # Errors
    /// [`RouteError::Deassign`].
    pub fn detach_irqfd(&mut self, fd: &EventFd, gsi: Gsi) -> Result<(), RouteError> {
        self.backend
            .deassign_irqfd(fd, gsi)
            .map_err(|source| RouteError::Deassign { gsi, source })?;
        if let Some(n) = self.irqfds.get_mut(&gsi) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.irqfds.remove(&gsi);
            }
        }
        Ok(())
    }
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
        assert_eq!(table.committed.get(&gsi), Some(&msi(0)));
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
}
