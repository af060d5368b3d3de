//! Resource bounds on real KVM: a driver that meets its requester's quota of remapping
//! entries gets `QUOTA_EXCEEDED` (documented) for one more, its device works with the
//! entries it has, and the other device is untouched.

use integration_tests::{boot, config};

#[test]
fn a_requester_at_its_quota_gets_quota_exceeded_and_the_other_device_is_untouched() {
    let mut cfg = config(2, "scenario=ims");
    cfg.machine.max_entries_per_device = Some(100);
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
    for line in [
        "ims-slots: the host allows this requester 100 entries; using 100 of 2048",
        "ims-slots: one entry beyond the quota: status 3 (QUOTA_EXCEEDED)",
        "ims-slots: 100 slots over 2 vCPUs, 2 rounds: 200 completions, 200 counted by the handlers",
        "ims-queues: 28 completions, all counted",
    ] {
        assert!(console.contains(line), "{line} missing:\n{console}");
    }
    // The queue-memory device (the other requester) did all its work.
    assert_eq!(report.devices[1].completions, 28, "{report}");
}

#[test]
fn by_default_each_requester_may_hold_a_fair_share_of_the_table() {
    let cfg = config(2, "");
    // Two IMS devices and the harness's two requesters share 65,536 entries.
    assert_eq!(cfg.machine.entries_per_requester(), 16_384);
    let mut plain = cfg.machine.clone();
    plain.harness = false;
    assert_eq!(plain.entries_per_requester(), 32_768);
    plain.max_entries_per_device = Some(7);
    assert_eq!(plain.entries_per_requester(), 7);
}
