//! Reliability on real KVM: interrupt storms are coalesced per entry without touching
//! other sources, and injected KVM failures are reported to the guest while the previous
//! state keeps working. (Device command timeouts and resets are in `ims.rs`.)

use integration_tests::{boot, config};

#[test]
fn a_storm_is_coalesced_counted_and_reported_and_a_bystander_is_unaffected() {
    let mut cfg = config(2, "scenario=storm storm_count=20000 storm_bystanders=25");
    cfg.machine.irq_rate = 1000;
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console.contains("all 25 bystander interrupts arrived"),
        "{console}"
    );
    let s = report.storms;
    assert_eq!((s.rate, s.entries), (1000, 1), "{report}");
    assert!(s.throttled > 10_000, "{report}");
    assert!(
        s.flushed >= 1,
        "the storm's last interrupt was delivered late: {report}"
    );
    let text = report.to_string();
    assert!(text.contains("vmm: storms      "), "{text}");
    assert!(
        text.contains("from 1 entries over 1000/s coalesced"),
        "{text}"
    );
}

#[test]
fn without_a_storm_nothing_is_throttled() {
    let (report, console) = boot(&config(2, "scenario=remap remap_entries=512"));
    assert!(report.passed(), "{report}\n{console}");
    assert_eq!(report.storms.throttled, 0);
    assert!(!report.to_string().contains("vmm: storms"));
}

#[test]
fn injected_kvm_failures_are_reported_and_leave_the_previous_state_working() {
    let (report, console) = boot(&config(1, "scenario=faults"));
    assert!(report.passed(), "{report}\n{console}");
    // As an ABI 1.0 driver the guest gets NO_SPACE; once it accepts 1.1's HOST_ERROR,
    // that, and its retry works.
    for line in [
        "faults: a failed route commit is reported to the guest (NO_SPACE)",
        "faults: a failed irqfd registration is reported to the guest (NO_SPACE)",
        "faults: a failed irqfd registration is reported to the guest (HOST_ERROR)",
        "faults: a failed route commit is reported to the guest (HOST_ERROR)",
        "faults: each injected failure left the entry delivering as before",
    ] {
        assert!(console.contains(line), "{line} missing:\n{console}");
    }
    assert_eq!(report.remap_stats.rollbacks, 4, "{report}");
    // The refusals are counted as failed updates.
    let update = report.hypercalls.calls.iter().find(|c| c.name == "update");
    assert_eq!(update.map(|c| c.errors), Some(4), "{report}");
    let set = report
        .hypercalls
        .calls
        .iter()
        .find(|c| c.name == "set_features");
    assert_eq!(set.map(|c| (c.calls, c.errors)), Some((1, 0)), "{report}");
}
