//! The interrupt core's control path, over the fake KVM.

use std::sync::Mutex;

use super::*;
use crate::fake::{Failures, FakeRouting};
use crate::irte::{Irte, SourceValidation};
use crate::msi::Target;
use crate::port::MsiInjector;
use crate::remap::{Fault, FaultReason};

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

// ---- External sources (`bound`) -----------------------------------------------------------

/// Where KVM would deliver a write to entry `index`'s bound eventfd now (the fake knows
/// irqfds by descriptor, and the core holds a duplicate: found through its GSI).
fn bound_lands(b: &Backing<Arc<FakeRouting>>, kvm: &FakeRouting, index: u32) -> Option<Target> {
    let gsi = b.binding(index)?.1?;
    assert!(kvm.irqfds_on(gsi) >= 2, "the line and the bound eventfd");
    match kvm.route(gsi)?.decode() {
        Ok(crate::msi::DecodedMsi::Compatibility(t)) => Some(t),
        _ => None,
    }
}

fn bound_entry(b: &mut Backing<Arc<FakeRouting>>, index: u32) -> EventFd {
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    b.bind(index, DEV, fd.try_clone().unwrap()).unwrap();
    fd
}

#[test]
fn a_bound_eventfd_follows_every_kind_of_retarget() {
    let (mut b, kvm) = backing();
    let first = b.allocate(3, DEV, AllocFlags::default()).unwrap();
    set(
        &mut b,
        &[(first, irte(0, 0x40)), (first + 1, irte(1, 0x41))],
    )
    .unwrap();
    let _fd = bound_entry(&mut b, first);
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(0, 0x40)));
    // Joins a routed target: a pointer swap for the data path, a move for the eventfd.
    set(&mut b, &[(first, irte(1, 0x41))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(1, 0x41)));
    // A target of its own, created (entry 1 keeps the old route).
    set(&mut b, &[(first, irte(2, 0x42))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(2, 0x42)));
    let gsi = b.binding(first).unwrap().1.unwrap();
    // Sole user moving to a fresh target: the route is rewritten in place, nothing moves.
    let assigns = kvm.assign_calls();
    set(&mut b, &[(first, irte(3, 0x43))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(3, 0x43)));
    assert_eq!(b.binding(first), Some((DEV, Some(gsi))));
    assert_eq!(kvm.assign_calls(), assigns);
    // Together with its neighbour, in one transaction.
    set(
        &mut b,
        &[(first, irte(1, 0x41)), (first + 1, irte(0, 0x40))],
    )
    .unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(1, 0x41)));
    assert_eq!(b.stats().bound, 1);
}

#[test]
fn a_bound_eventfd_is_detached_while_absent_and_what_it_wrote_then_is_a_fault() {
    let (mut b, kvm) = backing();
    let first = b.allocate(1, DEV, AllocFlags::default()).unwrap();
    // Bound while absent: attached when the entry becomes present.
    let fd = bound_entry(&mut b, first);
    assert_eq!(b.binding(first), Some((DEV, None)));
    fd.write(1).unwrap();
    set(&mut b, &[(first, irte(0, 0x40))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(0, 0x40)));
    assert_eq!(b.path().faults(first), 1);
    let mut txn = b.transaction();
    txn.clear(first).unwrap();
    txn.commit().unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), None);
    assert_eq!(
        kvm.irqfds(),
        0,
        "the line retired and the eventfd is detached"
    );
    fd.write(3).unwrap();
    set(&mut b, &[(first, irte(1, 0x41))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(1, 0x41)));
    assert_eq!(
        fd.read().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    assert_eq!(b.path().faults(first), 4);
    let last = b.path().fault_log().drain();
    assert_eq!(
        last.last().map(|f| (f.reason, f.index, f.source_id)),
        Some((FaultReason::NotPresent, Some(first), DEV))
    );
}

#[test]
fn a_source_is_bound_only_by_its_owner_for_an_entry_that_verifies_it() {
    let (mut b, _kvm) = backing();
    let first = b.allocate(2, DEV, AllocFlags::default()).unwrap();
    let foreign = Irte::new(
        Target::fixed(0, 0x40),
        SourceValidation::RequesterId {
            sid: OTHER,
            qualifier: 0,
        },
    );
    set(&mut b, &[(first, irte(0, 0x40)), (first + 1, foreign)]).unwrap();
    let fd = || EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(matches!(
        b.bind(first, OTHER, fd()).unwrap_err(),
        BackingError::NotOwner { owner: DEV, .. }
    ));
    assert!(matches!(
        b.bind(first + 1, DEV, fd()).unwrap_err(),
        BackingError::NotVerified { requester: DEV, .. }
    ));
    assert!(matches!(
        b.bind(first + 2, DEV, fd()).unwrap_err(),
        BackingError::NotAllocated(_)
    ));
    assert!(matches!(
        b.bind(5000, DEV, fd()).unwrap_err(),
        BackingError::IndexOutOfRange(5000)
    ));
    b.bind(first, DEV, fd()).unwrap();
    assert!(matches!(
        b.bind(first, DEV, fd()).unwrap_err(),
        BackingError::AlreadyBound(_)
    ));
    assert_eq!(b.bound_entries(), 1);
}

#[test]
fn an_entry_rewritten_for_another_requester_detaches_its_source() {
    let (mut b, kvm) = backing();
    let first = b.allocate(1, DEV, AllocFlags::default()).unwrap();
    set(&mut b, &[(first, irte(0, 0x40))]).unwrap();
    let fd = bound_entry(&mut b, first);
    let foreign = Irte::new(
        Target::fixed(0, 0x40),
        SourceValidation::RequesterId {
            sid: OTHER,
            qualifier: 0,
        },
    );
    set(&mut b, &[(first, foreign)]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), None);
    fd.write(1).unwrap();
    set(&mut b, &[(first, irte(0, 0x40))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(0, 0x40)));
    let log = b.path().fault_log().drain();
    assert_eq!(
        log.last().map(|f| f.reason),
        Some(FaultReason::SourceIdMismatch)
    );
}

#[test]
fn a_refused_attach_fails_the_transaction_and_every_source_stays_where_it_was() {
    let (mut b, kvm) = backing();
    let first = b.allocate(4, DEV, AllocFlags::default()).unwrap();
    set(
        &mut b,
        &[
            (first, irte(0, 0x40)),
            (first + 1, irte(1, 0x41)),
            (first + 2, irte(2, 0x42)),
        ],
    )
    .unwrap();
    let a = bound_entry(&mut b, first);
    let c = bound_entry(&mut b, first + 2);
    let before = b.table().raw(first).unwrap();
    // The second bound attach fails: joining a routed target (moved before the route
    // commit), then both to a target created for them (moved after its new line, whose
    // attach comes first).
    for (to, skip) in [(irte(1, 0x41), 1), (irte(5, 0x45), 2)] {
        let lines = b.stats().lines;
        kvm.fail(Failures {
            assign: 1,
            assign_skip: skip,
            ..Failures::default()
        });
        let err = set(&mut b, &[(first, to), (first + 2, to)]).unwrap_err();
        kvm.fail(Failures::default());
        assert!(matches!(err, BackingError::Route(_)), "{err}");
        assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(0, 0x40)));
        assert_eq!(
            bound_lands(&b, &kvm, first + 2),
            Some(Target::fixed(2, 0x42))
        );
        assert_eq!(b.table().raw(first).unwrap(), before);
        assert_eq!(lands(&b, &kvm, first), Some(Target::fixed(0, 0x40)));
        assert_eq!(b.stats().lines, lines);
    }
    // A failed route commit (it has the route of the line retired above to remove) puts
    // back what moved before it.
    kvm.fail(Failures {
        set_routes: 1,
        ..Failures::default()
    });
    set(&mut b, &[(first, irte(1, 0x41))]).unwrap_err();
    kvm.fail(Failures::default());
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(0, 0x40)));
    set(&mut b, &[(first, irte(1, 0x41))]).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), Some(Target::fixed(1, 0x41)));
    drop((a, c));
}

#[test]
fn freeing_a_bound_entry_drops_the_binding() {
    let (mut b, kvm) = backing();
    let first = b.allocate(1, DEV, AllocFlags::default()).unwrap();
    set(&mut b, &[(first, irte(0, 0x40))]).unwrap();
    let _fd = bound_entry(&mut b, first);
    b.free(first, 1, DEV).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), None);
    assert_eq!(b.bound_entries(), 0);
    assert_eq!(kvm.irqfds(), 0);
    // Unbinding gives the eventfd back, detached.
    let first = b.allocate(1, DEV, AllocFlags::default()).unwrap();
    set(&mut b, &[(first, irte(0, 0x40))]).unwrap();
    let _fd = bound_entry(&mut b, first);
    let back = b.unbind(first, DEV).unwrap();
    assert_eq!(bound_lands(&b, &kvm, first), None);
    drop(back);
    assert!(matches!(
        b.unbind(first, DEV).unwrap_err(),
        BackingError::NotBound(_)
    ));
}
