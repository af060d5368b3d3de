//! A VM's end: every thread it started is woken by the stop (none waits out a poll
//! period), and every one has ended when the run returns.

use integration_tests::{boot, config};

/// The default machine (two IMS devices, storm control, the harness): the device event
/// loop, the harness and the storm ticker wait with no timeout or are woken by the stop,
/// so an idle one still running at the stop grace's end could only be one the stop did not
/// wake. None is.
#[test]
fn a_vm_with_devices_ends_with_every_thread_woken_and_joined() {
    let (report, console) = boot(&config(2, "scenario=smoke"));
    assert!(report.passed(), "{report}\n{console}");
    assert_eq!(report.devices.len(), 2, "{report}");
    assert_eq!(report.stuck_vcpus, 0, "{report}");
    assert!(report.threads_left.is_empty(), "{report}");
}
