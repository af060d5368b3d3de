//! The VT-d unit on real KVM: the test guest enables interrupt remapping the way Linux
//! does, writes IRTEs into its own memory, invalidates them through the queue, and a
//! device (the host harness) raises remappable and compatibility-format messages; the
//! IOAPIC's pins, in remappable format, go through the same unit as requester ff:00.0.

use integration_tests::{boot, config, vtd_interrupts};

const LINES: [&str; 6] = [
    "compatibility format blocked",
    "vtd: retarget by invalidation under load: 400 of 400 counted",
    "vtd: faults 0x25, 0x21, 0x22, 0x24, 0x26 recorded, each with a fault event",
    "vtd: the hypercall and the registers agree on entry",
    "vtd: a malformed descriptor stopped the queue (IQE) until repaired; PASS",
    "vtd: IOAPIC pins remapped: COM1 (edge) 2 of 2; a level pin sent",
];

fn vtd(cpus: u32, cmdline: &str) -> (vmm::RunReport, String) {
    let (report, console) = boot(&config(cpus, cmdline));
    assert!(report.passed(), "{report}\n{console}");
    for line in LINES {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
    let total: u64 = report.interrupts.as_ref().unwrap().iter().sum();
    assert_eq!(total, vtd_interrupts(&console), "{report}");
    // Compatibility format and source-id faults: one from a device, one from the IOAPIC.
    assert_eq!(
        report.remap_faults,
        vec![(0x21, 1), (0x22, 1), (0x24, 1), (0x25, 2), (0x26, 2)]
    );
    (report, console)
}

#[test]
fn linux_style_interrupt_remapping_in_x2apic_mode() {
    let (_, console) = vtd(2, "scenario=vtd");
    assert!(
        console.contains("vtd: interrupt remapping enabled (x2APIC mode)"),
        "{console}"
    );
}

#[test]
fn linux_style_interrupt_remapping_in_xapic_mode() {
    let (_, console) = vtd(4, "scenario=vtd apic=xapic");
    assert!(
        console.contains("vtd: interrupt remapping enabled (xAPIC mode)"),
        "{console}"
    );
}

#[test]
fn linux_style_interrupt_remapping_on_one_vcpu() {
    vtd(1, "scenario=vtd");
}
