//! The IRTE hypercall on real KVM, driven by the test guest through the documented ABI
//! only (`hypercall::abi`): discovery, allocate / activate / retarget / deactivate / free
//! with interrupts raised by the VMM-side harness, batches, managed reservations at
//! exhaustion, every bad input's documented error, and throttling.

use integration_tests::{boot, config};

fn hypercall(
    cpus: u32,
    cmdline: &str,
    max_routes: Option<u32>,
    rate: Option<u32>,
) -> (vmm::RunReport, String) {
    let mut config = config(cpus, cmdline);
    config.machine.max_routes = max_routes;
    if let Some(rate) = rate {
        config.machine.hypercall_rate = rate;
    }
    let (report, console) = boot(&config);
    assert!(report.passed(), "{report}\n{console}");
    (report, console)
}

#[test]
fn the_abi_works_end_to_end() {
    let (report, console) = hypercall(2, "scenario=hypercall", Some(16), None);
    for line in [
        "hypercall: ABI v1 at port 0x510, features 0x1f, 65536 entries",
        "hypercall: allocate, activate, retarget, deactivate, compose, free: done",
        "hypercall: batch of 16 applied in one call; a batch with a bad entry applied nothing",
        "hypercall: 15 bad inputs refused with their documented errors",
        "best-effort targets until NO_SPACE; earlier ones still deliver; the managed entry activated",
        "hypercall: PASS",
    ] {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
    // 5 on vCPU 0, 5 after the retarget to vCPU 1, the batch, the exhaustion and managed
    // raises; the 3 raises after deactivation were faults (entry not present), not
    // deliveries.
    assert_eq!(report.remap_faults, vec![(0x22, 3)], "{report}");
    let calls = &report.hypercalls.calls;
    let update = calls
        .iter()
        .find(|c| c.name == "update")
        .expect("update calls counted");
    assert!(update.calls >= 20 && update.errors >= 7, "{update:?}");
    assert_eq!(report.hypercalls.unknown, 1);
}

#[test]
fn the_abi_works_on_one_and_four_vcpus() {
    hypercall(1, "scenario=hypercall", Some(16), None);
    hypercall(4, "scenario=hypercall", None, None);
}

#[test]
fn a_guest_hammering_the_port_is_throttled_and_the_vmm_stays_healthy() {
    let (report, console) = hypercall(2, "scenario=hypercall hammer=300", Some(16), Some(50));
    assert!(
        console.contains("hammering calls answered BUSY; then served again"),
        "{console}"
    );
    assert!(report.hypercalls.throttled >= 250, "{report}");
}
