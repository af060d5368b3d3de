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
