//! Host interrupts allocated at the IRTE update: a device outside the core (a vfio-user
//! server, a VFIO device) gets an eventfd per remapping entry of its requester **when the
//! entry becomes present**, and gives it back when the entry goes absent or is freed.
//!
//! The eventfd is the entry's own: the core binds it to the entry ([`crate::backing::bound`])
//! before the device has it, so the device's write reaches the vCPU through KVM with no
//! VMM thread on the way, and a retarget moves the irqfd without the device hearing of it.
//!
//! **Who is told what.** A requester with [`HostInterrupts`] attached is handed, after
//! every write, free or new table that changed its entries, the entries it wants that now
//! serve it, and asked to take back those handed that no longer do. Which entries it wants
//! is the scope it was attached with:
//! - [`InterruptControl::attach_host`]: every entry allocated to the requester (a device
//!   that stores its own messages, such as an IMS device, may name any of them), while
//!   present and verifying the requester;
//! - [`InterruptControl::attach_named_host`]: the entries the device's MSI-X table names
//!   now ([`InterruptControl::name_entries`]), allocated or not (a guest driving the VT-d
//!   unit allocates nothing), while present and verifying the requester. A table write
//!   that names a present entry hands it over then; one that stops naming it takes it back.
//!
//! Entries that do not verify the requester are never handed over.
//!
//! **Refusal.** Hand-overs run after the transaction, with the core's lock released (a
//! device answers over a socket); if the device refuses, the write is undone (every entry
//! it wrote back to what it was, its bound eventfds back where they were) and fails with
//! [`BackingError::HostRefused`]. Take-backs cannot fail a write: an entry is absent
//! whatever the device says, and what it still writes is dropped and recorded as the
//! entry's fault. A device that is [`HostRefusal::Gone`] is detached: its entries keep
//! working for the guest with nothing behind them.
//!
//! **Serialisation.** Writes, frees and new tables take the host lock first (outermost)
//! while any host is attached, so a hand-over and its undo see no other writer in
//! between. [`HostInterrupts`] methods must not call the core's writing methods.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{EntryWrite, InterruptCore, Writer};
use crate::backing::BackingError;
use crate::port::RoutingBackend;

/// Why a device did not take or give back eventfds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRefusal {
    /// The device refused (its answer, for the error).
    Refused(String),
    /// The device is gone (its process died or hung): it is detached.
    Gone(String),
}

/// The host interrupts of one requester's entries: a device outside the core.
pub trait HostInterrupts: Send + Sync {
    /// Hands the device the eventfds of `entries` (entry index, its eventfd), which just
    /// became present for its requester. All or none.
    ///
    /// # Errors
    /// The device's refusal; nothing of these is handed over then.
    fn hand_over(&self, entries: &[(u32, EventFd)]) -> Result<(), HostRefusal>;

    /// Takes back the eventfds of `entries`, no longer present for the requester (or
    /// freed).
    ///
    /// # Errors
    /// The device's refusal (counted; the entries are absent anyway).
    fn take_back(&self, entries: &[u32]) -> Result<(), HostRefusal>;
}

/// What the core knows of the attached hosts.
#[derive(Default)]
pub(super) struct Hosts {
    by_requester: BTreeMap<u16, Host>,
    /// Take-backs a device refused.
    pub(super) take_back_refusals: u64,
    /// Hosts detached because they were gone.
    pub(super) gone: u64,
}

struct Host {
    source: Arc<dyn HostInterrupts>,
    handed: BTreeSet<u32>,
    /// `None`: every entry allocated to the requester. Otherwise the entries the device
    /// names, with how many of its vectors name each.
    named: Option<BTreeMap<u32, u32>>,
}

impl Host {
    /// Whether the host wants entry `index` now, as `requester`.
    fn wants<B: RoutingBackend>(
        &self,
        backing: &crate::backing::Backing<B>,
        index: u32,
        requester: u16,
    ) -> bool {
        match &self.named {
            None => backing.serves(index, requester),
            Some(named) => named.contains_key(&index) && backing.verifies(index, requester),
        }
    }
}

/// What attached hosts have: for [`InterruptControl::hosts`](super::InterruptControl::hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// Requesters with a host attached.
    pub hosts: usize,
    /// Entries whose eventfd a host holds now.
    pub handed: usize,
    /// Take-backs a host refused.
    pub take_back_refusals: u64,
    /// Hosts detached because they were gone.
    pub gone: u64,
}

impl<B: RoutingBackend + 'static> InterruptCore<B> {
    fn hosts(&self) -> std::sync::MutexGuard<'_, Hosts> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`InterruptControl::write`](super::InterruptControl::write) with hosts attached.
    pub(super) fn write_hosted(
        &self,
        writer: Writer,
        writes: &[(u32, EntryWrite)],
    ) -> Result<(), BackingError> {
        let mut hosts = self.hosts();
        if hosts.by_requester.is_empty() {
            drop(hosts);
            return self.write_entries(writer, writes);
        }
        let indexes: BTreeSet<u32> = writes.iter().map(|(i, _)| *i).collect();
        let before: Vec<(u32, EntryWrite)> = {
            let backing = self.lock();
            indexes
                .iter()
                .map(|&i| (i, EntryWrite::Raw(backing.table().raw(i).unwrap_or([0, 0]))))
                .collect()
        };
        self.write_entries(writer, writes)?;
        if let Err(e) = self.settle(&mut hosts, &indexes) {
            // Back to what it was: the entries handed in this write were unbound already.
            if self.write_entries(Writer::Platform, &before).is_ok() {
                if matches!(writer, Writer::Requester(_)) {
                    self.reflect(indexes.iter().copied());
                }
            } else {
                self.lock().count_retire_error();
            }
            return Err(e);
        }
        Ok(())
    }

    /// [`InterruptControl::free`](super::InterruptControl::free): frees, then takes back
    /// the entries handed over.
    pub(super) fn free_hosted(
        &self,
        requester: u16,
        first: u32,
        count: u32,
    ) -> Result<(), BackingError> {
        let mut hosts = self.hosts();
        self.free_entries(requester, first, count)?;
        let end = first.saturating_add(count);
        let lost: Vec<(u16, Vec<u32>)> = hosts
            .by_requester
            .iter()
            .map(|(&r, h)| (r, h.handed.range(first..end).copied().collect()))
            .collect();
        self.take_back(&mut hosts, lost, false);
        Ok(())
    }

    /// A new table of `entries` entries: every entry handed over is absent after it.
    pub(super) fn new_table_hosted(&self, entries: u32) -> Result<(), BackingError> {
        let mut hosts = self.hosts();
        self.new_table(entries)?;
        let lost: Vec<(u16, Vec<u32>)> = hosts
            .by_requester
            .iter()
            .map(|(&r, h)| (r, h.handed.iter().copied().collect()))
            .collect();
        self.take_back(&mut hosts, lost, true);
        Ok(())
    }

    /// Hands over what `indexes` gained and takes back what they lost, per host.
    fn settle(&self, hosts: &mut Hosts, indexes: &BTreeSet<u32>) -> Result<(), BackingError> {
        let mut gained = Vec::new();
        let mut lost = Vec::new();
        {
            let backing = self.lock();
            for (&requester, host) in &hosts.by_requester {
                let (mut g, mut l) = (Vec::new(), Vec::new());
                for &i in indexes {
                    match (host.wants(&backing, i, requester), host.handed.contains(&i)) {
                        (true, false) => g.push(i),
                        (false, true) => l.push(i),
                        _ => {}
                    }
                }
                if !g.is_empty() {
                    gained.push((requester, g));
                }
                if !l.is_empty() {
                    lost.push((requester, l));
                }
            }
        }
        let mut done: Vec<(u16, Vec<u32>)> = Vec::new();
        for (requester, entries) in gained {
            match self.hand_over(hosts, requester, &entries) {
                Ok(true) => done.push((requester, entries)),
                Ok(false) => {}
                Err(e) => {
                    // Earlier hosts of this write give theirs back.
                    for (r, entries) in &done {
                        if let Some(host) = hosts.by_requester.get_mut(r) {
                            let _ = host.source.take_back(entries);
                            host.handed.retain(|i| !entries.contains(i));
                        }
                        self.unbind_all(entries);
                    }
                    return Err(e);
                }
            }
        }
        self.take_back(hosts, lost, true);
        Ok(())
    }

    /// Binds an eventfd to each of `entries` and hands them to `requester`'s host.
    /// `Ok(false)`: the host was gone and is detached.
    fn hand_over(
        &self,
        hosts: &mut Hosts,
        requester: u16,
        entries: &[u32],
    ) -> Result<bool, BackingError> {
        let Some(host) = hosts.by_requester.get(&requester) else {
            return Ok(false);
        };
        let owned = host.named.is_none();
        let mut copies = Vec::with_capacity(entries.len());
        for (k, &index) in entries.iter().enumerate() {
            let bound = EventFd::new(EFD_NONBLOCK)
                .and_then(|fd| Ok((fd.try_clone()?, fd)))
                .map_err(BackingError::EventFd)
                .and_then(|(copy, fd)| {
                    let mut backing = self.lock();
                    if owned {
                        backing.bind(index, requester, fd)?;
                    } else {
                        backing.bind_verified(index, requester, fd)?;
                    }
                    Ok(copy)
                });
            match bound {
                Ok(copy) => copies.push((index, copy)),
                Err(e) => {
                    self.unbind_all(entries.get(..k).unwrap_or_default());
                    return Err(e);
                }
            }
        }
        match host.source.hand_over(&copies) {
            Ok(()) => {
                if let Some(host) = hosts.by_requester.get_mut(&requester) {
                    host.handed.extend(entries.iter().copied());
                }
                Ok(true)
            }
            Err(HostRefusal::Refused(reason)) => {
                self.unbind_all(entries);
                Err(BackingError::HostRefused { requester, reason })
            }
            Err(HostRefusal::Gone(_)) => {
                self.unbind_all(entries);
                self.detach(hosts, requester);
                Ok(false)
            }
        }
    }

    /// Asks each host to take back its `lost` entries, and unbinds them (`unbind`: the
    /// entries are still allocated; after a free their bindings are gone already).
    fn take_back(&self, hosts: &mut Hosts, lost: Vec<(u16, Vec<u32>)>, unbind: bool) {
        for (requester, entries) in lost {
            if entries.is_empty() {
                continue;
            }
            let Some(host) = hosts.by_requester.get_mut(&requester) else {
                continue;
            };
            host.handed.retain(|i| !entries.contains(i));
            let answer = host.source.take_back(&entries);
            if unbind {
                self.unbind_all(&entries);
            }
            match answer {
                Ok(()) => {}
                Err(HostRefusal::Refused(_)) => hosts.take_back_refusals += 1,
                Err(HostRefusal::Gone(_)) => {
                    self.detach(hosts, requester);
                }
            }
        }
    }

    /// Unbinds `entries`, which the core bound for a host (a freed entry's binding is
    /// gone already).
    fn unbind_all(&self, entries: &[u32]) {
        let mut backing = self.lock();
        for &index in entries {
            backing.unbind_verified(index);
        }
    }

    /// Forgets `requester`'s host and unbinds every entry it held.
    fn detach(&self, hosts: &mut Hosts, requester: u16) -> usize {
        let Some(host) = hosts.by_requester.remove(&requester) else {
            return 0;
        };
        let entries: Vec<u32> = host.handed.into_iter().collect();
        self.unbind_all(&entries);
        hosts.gone += 1;
        entries.len()
    }

    pub(super) fn attach_host_impl(
        &self,
        requester: u16,
        source: Arc<dyn HostInterrupts>,
        named: bool,
    ) -> Result<(), BackingError> {
        let mut hosts = self.hosts();
        if hosts.by_requester.contains_key(&requester) {
            return Err(BackingError::HostRefused {
                requester,
                reason: "the requester has host interrupts attached already".into(),
            });
        }
        hosts.by_requester.insert(
            requester,
            Host {
                source,
                handed: BTreeSet::new(),
                named: named.then(BTreeMap::new),
            },
        );
        if named {
            return Ok(());
        }
        let live = self.lock().served(requester);
        if live.is_empty() {
            return Ok(());
        }
        match self.hand_over(&mut hosts, requester, &live) {
            Ok(_) => Ok(()),
            Err(e) => {
                hosts.by_requester.remove(&requester);
                Err(e)
            }
        }
    }

    pub(super) fn name_entries_impl(
        &self,
        requester: u16,
        changes: &[(u32, bool)],
    ) -> Result<(), BackingError> {
        let mut hosts = self.hosts();
        let Some(named) = hosts
            .by_requester
            .get_mut(&requester)
            .and_then(|h| h.named.as_mut())
        else {
            return Err(BackingError::HostRefused {
                requester,
                reason: "the requester has no host of named entries".into(),
            });
        };
        let mut touched = BTreeSet::new();
        for &(index, on) in changes {
            let count = named.entry(index).or_insert(0);
            let was = *count > 0;
            *count = if on {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
            if (*count > 0) != was {
                touched.insert(index);
            }
            if *count == 0 {
                named.remove(&index);
            }
        }
        if touched.is_empty() {
            return Ok(());
        }
        self.settle(&mut hosts, &touched)
    }

    pub(super) fn detach_host_impl(&self, requester: u16) -> usize {
        let mut hosts = self.hosts();
        let Some(host) = hosts.by_requester.get(&requester) else {
            return 0;
        };
        let entries: Vec<u32> = host.handed.iter().copied().collect();
        let source = host.source.clone();
        let n = self.detach(&mut hosts, requester);
        // A device that is still there gives them back; one that is gone cannot answer.
        let _ = source.take_back(&entries);
        n
    }

    pub(super) fn host_stats_impl(&self) -> HostStats {
        let hosts = self.hosts();
        HostStats {
            hosts: hosts.by_requester.len(),
            handed: hosts.by_requester.values().map(|h| h.handed.len()).sum(),
            take_back_refusals: hosts.take_back_refusals,
            gone: hosts.gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backing::{AllocFlags, Backing, Limits};
    use crate::control::{InterruptControl, Setting};
    use crate::fake::{Failures, FakeRouting};
    use crate::irte::{Irte, SourceValidation};
    use crate::msi::{DecodedMsi, Target};
    use crate::routes::{Irqchip, RouteTable};

    const DEV: u16 = 0x0028;
    const OTHER: u16 = 0x0030;

    /// A device that records what it holds, and refuses or is gone on demand.
    #[derive(Default)]
    struct Device {
        held: Mutex<BTreeMap<u32, EventFd>>,
        calls: Mutex<Vec<String>>,
        refuse: Mutex<Option<HostRefusal>>,
    }

    impl Device {
        fn held(&self) -> Vec<u32> {
            self.held.lock().unwrap().keys().copied().collect()
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl HostInterrupts for Device {
        fn hand_over(&self, entries: &[(u32, EventFd)]) -> Result<(), HostRefusal> {
            let list: Vec<u32> = entries.iter().map(|(i, _)| *i).collect();
            self.calls.lock().unwrap().push(format!("hand {list:?}"));
            if let Some(refusal) = self.refuse.lock().unwrap().clone() {
                return Err(refusal);
            }
            let mut held = self.held.lock().unwrap();
            for (i, fd) in entries {
                held.insert(*i, fd.try_clone().unwrap());
            }
            Ok(())
        }

        fn take_back(&self, entries: &[u32]) -> Result<(), HostRefusal> {
            self.calls.lock().unwrap().push(format!("take {entries:?}"));
            let mut held = self.held.lock().unwrap();
            for i in entries {
                held.remove(i);
            }
            Ok(())
        }
    }

    type Core = Arc<InterruptCore<Arc<FakeRouting>>>;

    fn core() -> (Core, Arc<FakeRouting>) {
        let kvm = Arc::new(FakeRouting::new());
        let routes = RouteTable::with_irqchip(kvm.clone(), 4096, Irqchip::Split).unwrap();
        let backing = Backing::new(routes, Limits::default()).unwrap();
        (InterruptCore::new(backing), kvm)
    }

    fn live(dest: u32, vector: u8, sid: u16) -> EntryWrite {
        EntryWrite::Entry(Irte::new(
            Target::fixed(dest, vector),
            SourceValidation::RequesterId { sid, qualifier: 0 },
        ))
    }

    /// Where the eventfd bound to `index` delivers now.
    fn delivers(core: &Core, kvm: &FakeRouting, index: u32) -> Option<Target> {
        let (_, gsi) = core.lock().binding(index)?;
        match kvm.route(gsi?)?.decode() {
            Ok(DecodedMsi::Compatibility(t)) => Some(t),
            _ => None,
        }
    }

    #[test]
    fn eventfds_are_handed_over_when_entries_become_present_and_taken_back_when_not() {
        let (core, kvm) = core();
        let dev = Arc::new(Device::default());
        let first = core.allocate(DEV, 4, AllocFlags::default()).unwrap();
        core.write(Writer::Requester(DEV), &[(first, live(0, 0x40, DEV))])
            .unwrap();
        // Attaching hands over what is present already, and nothing else.
        core.attach_host(DEV, dev.clone()).unwrap();
        assert_eq!(dev.calls(), [format!("hand {:?}", [first])]);
        // Activation of two more in one write: one hand-over with both.
        core.write(
            Writer::Requester(DEV),
            &[
                (first + 1, live(1, 0x41, DEV)),
                (first + 2, live(0, 0x42, DEV)),
            ],
        )
        .unwrap();
        assert_eq!(dev.calls(), [format!("hand {:?}", [first + 1, first + 2])]);
        assert_eq!(dev.held(), [first, first + 1, first + 2]);
        // A retarget is the core's business alone: the eventfd moves, the device hears
        // nothing.
        core.write(Writer::Requester(DEV), &[(first, live(1, 0x50, DEV))])
            .unwrap();
        assert!(dev.calls().is_empty());
        assert_eq!(delivers(&core, &kvm, first), Some(Target::fixed(1, 0x50)));
        // An entry that stops verifying the requester is taken back, as is an absent one.
        core.write(
            Writer::Requester(DEV),
            &[
                (first, live(1, 0x50, OTHER)),
                (first + 1, EntryWrite::Absent),
            ],
        )
        .unwrap();
        assert_eq!(dev.calls(), [format!("take {:?}", [first, first + 1])]);
        assert_eq!(core.lock().binding(first), None, "unbound");
        // Freeing takes back what was handed over.
        core.free(DEV, first, 4).unwrap();
        assert_eq!(dev.calls(), [format!("take {:?}", [first + 2])]);
        assert!(dev.held().is_empty());
        assert_eq!(core.lock().bound_entries(), 0);
        assert_eq!(core.host_stats().handed, 0);
    }

    #[test]
    fn another_requesters_entries_and_platform_writes_of_them_are_never_handed_over() {
        let (core, _) = core();
        let dev = Arc::new(Device::default());
        core.attach_host(DEV, dev.clone()).unwrap();
        let theirs = core.allocate(OTHER, 1, AllocFlags::default()).unwrap();
        core.write(Writer::Requester(OTHER), &[(theirs, live(0, 0x40, DEV))])
            .unwrap();
        core.write(Writer::Platform, &[(4000, live(0, 0x41, DEV))])
            .unwrap();
        assert!(dev.calls().is_empty());
        // A platform write that makes the device's own entry present hands it over; a new
        // table takes everything back.
        let mine = core.allocate(DEV, 1, AllocFlags::default()).unwrap();
        core.write(Writer::Platform, &[(mine, live(0, 0x42, DEV))])
            .unwrap();
        assert_eq!(dev.held(), [mine]);
        dev.calls();
        core.configure(Setting::NewTable { entries: 4096 }).unwrap();
        assert_eq!(dev.calls(), [format!("take {:?}", [mine])]);
    }

    #[test]
    fn a_refusal_fails_the_write_and_every_entry_keeps_what_it_had() {
        let (core, kvm) = core();
        let dev = Arc::new(Device::default());
        core.attach_host(DEV, dev.clone()).unwrap();
        let first = core.allocate(DEV, 2, AllocFlags::default()).unwrap();
        core.write(Writer::Requester(DEV), &[(first, live(0, 0x40, DEV))])
            .unwrap();
        dev.calls();
        *dev.refuse.lock().unwrap() = Some(HostRefusal::Refused("no more vectors".into()));
        // One write: a retarget of the live entry and an activation the device refuses.
        let before = core.entry(first).raw;
        let err = core
            .write(
                Writer::Requester(DEV),
                &[(first, live(1, 0x60, DEV)), (first + 1, live(1, 0x61, DEV))],
            )
            .unwrap_err();
        assert!(
            matches!(&err, BackingError::HostRefused { requester: DEV, reason } if reason == "no more vectors"),
            "{err:?}"
        );
        assert_eq!(core.entry(first).raw, before, "the old target is kept");
        assert_eq!(delivers(&core, &kvm, first), Some(Target::fixed(0, 0x40)));
        assert_eq!(core.entry(first + 1).raw, [0, 0]);
        assert!(!core.path().is_live(first + 1));
        assert_eq!(core.lock().bound_entries(), 1);
        assert_eq!(dev.held(), [first]);
        // A failure of the core's own (KVM refuses the routes) is the core's error, and
        // the device is not asked.
        *dev.refuse.lock().unwrap() = None;
        dev.calls();
        kvm.fail(Failures {
            set_routes: 1,
            ..Failures::default()
        });
        core.write(Writer::Requester(DEV), &[(first + 1, live(1, 0x61, DEV))])
            .unwrap_err();
        assert!(dev.calls().is_empty());
        core.write(Writer::Requester(DEV), &[(first + 1, live(1, 0x61, DEV))])
            .unwrap();
        assert_eq!(dev.held(), [first, first + 1]);
    }

    #[test]
    fn a_device_that_is_gone_is_detached_and_the_guest_keeps_its_entries() {
        let (core, _) = core();
        let dev = Arc::new(Device::default());
        core.attach_host(DEV, dev.clone()).unwrap();
        let first = core.allocate(DEV, 2, AllocFlags::default()).unwrap();
        core.write(Writer::Requester(DEV), &[(first, live(0, 0x40, DEV))])
            .unwrap();
        *dev.refuse.lock().unwrap() = Some(HostRefusal::Gone("connection reset".into()));
        core.write(Writer::Requester(DEV), &[(first + 1, live(0, 0x41, DEV))])
            .unwrap();
        assert!(core.path().is_live(first + 1));
        let stats = core.host_stats();
        assert_eq!((stats.hosts, stats.handed, stats.gone), (0, 0, 1));
        assert_eq!(core.lock().bound_entries(), 0, "every eventfd reclaimed");
        // Detaching by hand does the same; attaching twice is refused.
        let again = Arc::new(Device::default());
        core.attach_host(DEV, again.clone()).unwrap();
        assert_eq!(again.held(), [first, first + 1]);
        core.attach_host(DEV, again.clone()).unwrap_err();
        assert_eq!(core.detach_host(DEV), 2);
        assert!(again.held().is_empty());
        assert_eq!(core.lock().bound_entries(), 0);
    }

    /// A device whose MSI-X table the VMM emulates: entries it names, allocated or not
    /// (a guest driving the VT-d unit allocates nothing), are handed over while present
    /// and verifying its requester, whether the table or the entry changes.
    #[test]
    fn named_entries_are_handed_over_when_named_and_present_whoever_writes_them() {
        let (core, kvm) = core();
        let dev = Arc::new(Device::default());
        core.attach_named_host(DEV, dev.clone()).unwrap();
        // A VT-d invalidation loads entry 100: not named, nothing.
        core.write(Writer::Platform, &[(100, live(0, 0x40, DEV))])
            .unwrap();
        assert!(dev.calls().is_empty());
        // Vector 0 names it: handed over at the table write.
        core.name_entries(DEV, &[(100, true)]).unwrap();
        assert_eq!(dev.calls(), [format!("hand {:?}", [100])]);
        assert_eq!(delivers(&core, &kvm, 100), Some(Target::fixed(0, 0x40)));
        // A second vector naming it changes nothing; it is taken back when neither does.
        core.name_entries(DEV, &[(100, true)]).unwrap();
        core.name_entries(DEV, &[(100, false)]).unwrap();
        assert!(dev.calls().is_empty());
        core.name_entries(DEV, &[(100, false)]).unwrap();
        assert_eq!(dev.calls(), [format!("take {:?}", [100])]);
        // Named while absent: handed over when an invalidation makes it present, taken
        // back when it stops verifying the requester.
        core.name_entries(DEV, &[(200, true)]).unwrap();
        assert!(dev.calls().is_empty(), "nothing for an absent entry");
        core.write(Writer::Platform, &[(200, live(1, 0x41, DEV))])
            .unwrap();
        assert_eq!(dev.calls(), [format!("hand {:?}", [200])]);
        core.write(Writer::Platform, &[(200, live(1, 0x41, OTHER))])
            .unwrap();
        assert_eq!(dev.calls(), [format!("take {:?}", [200])]);
        assert_eq!(core.lock().bound_entries(), 0);
        // Naming needs a host of named entries.
        core.name_entries(OTHER, &[(1, true)]).unwrap_err();
    }
}
