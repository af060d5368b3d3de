//! The example embedder on real KVM. It needs `/dev/kvm`; without it the test fails (the
//! error says why), never skips.

#[test]
fn both_remapped_sources_deliver_every_interrupt_through_the_public_api() {
    check(&embedder_example::run(200).unwrap());
}

/// The doorbell's portable path (complete the `out`, then exchange the registers) gives the
/// guest the same answers.
#[test]
fn hypercalls_answered_without_shared_registers_are_the_same() {
    check(&embedder_example::run_with(200, false).unwrap());
}

fn check(report: &embedder_example::Report) {
    assert_eq!(report.guest_status, 0, "{report:?}");
    assert_eq!((report.ims, report.msix), (200, 200), "{report:?}");
    assert_eq!(
        report.vtd_version, 0x10,
        "the guest read the unit through our MMIO bus"
    );
    let calls: Vec<(&str, u64, u64)> = report
        .hypercalls
        .calls
        .iter()
        .map(|c| (c.name, c.calls, c.errors))
        .collect();
    assert_eq!(
        calls,
        vec![("allocate", 2, 0), ("update", 2, 0)],
        "{report:?}"
    );
}
