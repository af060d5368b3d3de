//! What a guest written from the docs alone found (issue 15), each sequence run by the test
//! guest's `hostile` scenario against its documented outcome on real KVM, and the
//! watchdog ending a run whose vCPU is stuck inside a device call.

use std::time::Duration;

use integration_tests::{boot, config};
use vmm::Outcome;

#[test]
fn hostile_sequences_get_their_documented_answers() {
    for cpus in [1, 2] {
        let (report, console) = boot(&config(cpus, "scenario=hostile"));
        assert!(report.passed(), "{report}\n{console}");
        for line in [
            "hostile: ims-queues: ADMIN_TAIL 0xfffffffe refused at once",
            "hostile: ims-slots: a stopped, zeroed and re-programmed queue completed its first new item",
            "hostile: hypercall: 1- and 2-byte outs answered UNSUPPORTED with nothing allocated",
            "hostile: harness: 1002 junk rings served nothing",
        ] {
            assert!(console.contains(line), "{line} missing:\n{console}");
        }
        // The narrow rings are counted with the unknown calls; nothing was allocated.
        assert_eq!(report.hypercalls.unknown, 2, "{report}");
        let allocate = report
            .hypercalls
            .calls
            .iter()
            .find(|c| c.name == "allocate");
        assert_eq!(allocate.map_or(0, |c| c.calls), 0, "{report}");
        // Two slot-device completions; the junk admin commands completed nothing.
        assert_eq!(
            report
                .devices
                .iter()
                .map(|d| d.completions)
                .collect::<Vec<_>>(),
            vec![2, 0],
            "{report}"
        );
        // Each vCPU counted the one request served before the junk, once.
        assert_eq!(report.harness_fired, vec![1; cpus as usize], "{report}");
        assert_eq!(report.interrupts, Some(vec![1; cpus as usize]), "{report}");
    }
}

#[test]
fn the_watchdog_ends_a_run_whose_vcpu_is_stuck_in_a_device_call() {
    let mut cfg = config(2, "scenario=stuck");
    cfg.run.watchdog = Some(Duration::from_secs(2));
    let (report, console) = boot(&cfg);
    assert!(
        matches!(report.outcome, Outcome::Watchdog { .. }),
        "{report}\n{console}"
    );
    assert!(
        console.contains("stuck: the host holds the slot-array device"),
        "{console}"
    );
    assert_eq!(report.stuck_vcpus, 1, "{report}");
    let slots = &report.devices[0];
    assert!(slots.busy, "the held device is reported busy: {report}");
    // The device is held for 30 s; the run ends at the watchdog plus the 1-s stop grace
    // (a structural bound, far from the hold, not a timing measurement).
    assert!(report.elapsed < Duration::from_secs(15), "{report}");
}
