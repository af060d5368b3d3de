//! IMS devices on PCI, driven by the test guest's drivers on real KVM: the slot-array
//! device with thousands of slots spread over the vCPUs, retargets under load, another
//! device's entry refused; the queue-memory device's admin commands, lazy masking, fault
//! injection and reset recovery.

use integration_tests::{boot, config};
use vmm::config::{DeviceConfig, DeviceKind};

fn device(report: &vmm::RunReport, slot: u8) -> &vmm::pci::DeviceReport {
    report
        .devices
        .iter()
        .find(|d| d.device.pci_slot == slot)
        .expect("the device is in the report")
}

#[test]
fn both_ims_devices_deliver_every_completion_on_the_right_vcpu() {
    let (report, console) = boot(&config(4, "scenario=ims"));
    assert!(report.passed(), "{report}\n{console}");
    for line in [
        "ims-slots: 2048 slots over 4 vCPUs, 2 rounds: 4096 completions, 4096 counted by the handlers",
        "ims-slots: a compatibility-format message was refused (STATUS, ERROR_SLOT 2047); a masked slot latched and fired on unmask",
        "ims-slots: 96 completions while",
        "ims-slots: a slot holding another device's entry was refused (1 remapping fault)",
        "ims-queues: STOP drained 4 slow items before completing; START resumed the queue",
        "ims-queues: a masked context latched its interrupt and delivered it on unmask",
        "ims-queues: a stalled command timed out into a reset; the driver restarted every queue",
        "ims-queues: a forced reset was recovered",
        "ims-queues: 28 completions, all counted",
    ] {
        assert!(console.contains(line), "{line} missing:\n{console}");
    }
    // The guest checked each completion against its vCPU; the host agrees on the totals:
    // slots 2 x 2048 + 1 masked + 96 retargeted + 1 through the foreign entry (refused).
    let slots = device(&report, 3);
    assert_eq!((slots.completions, slots.faults), (4096 + 1 + 96 + 1, 1));
    let queues = device(&report, 4);
    assert_eq!(
        (
            queues.completions,
            queues.resets,
            queues.dropped,
            queues.faults
        ),
        (28, 2, 1, 0)
    );
    // Counted by the guest: every signalled completion, plus 23 admin interrupts.
    let total: u64 = report.interrupts.as_ref().unwrap().iter().sum();
    assert_eq!(total, 4096 + 1 + 96 + 28 + 23, "{report}");
    // The foreign entry's interrupt was a source-id fault, never a delivery.
    assert_eq!(report.remap_faults, vec![(0x26, 1)], "{report}");
}

#[test]
fn a_slot_array_of_32768_reaches_its_last_slot() {
    let mut config = config(2, "scenario=ims ims_slots=4096 ims_rounds=1");
    config.machine.devices = vec![
        DeviceConfig {
            kind: DeviceKind::ImsSlots {
                slots: 32_768,
                queues: 4096,
            },
            pci_slot: 7,
        },
        DeviceConfig {
            kind: DeviceKind::ImsQueues {
                contexts: 8,
                command_timeout_ms: 1000,
            },
            pci_slot: 9,
        },
    ];
    let (report, console) = boot(&config);
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console.contains("ims-slots: 4096 slots over 2 vCPUs, 1 rounds: 4096 completions"),
        "{console}"
    );
    assert!(console.contains("ERROR_SLOT 32767"), "{console}");
    assert_eq!(device(&report, 7).completions, 4096 + 1 + 96 + 1);
}

#[test]
fn scenario_ims_fails_loudly_without_its_devices() {
    let mut config = config(2, "scenario=ims");
    config.machine.devices = Vec::new();
    let (report, console) = boot(&config);
    assert!(
        !report.passed(),
        "scenario=ims needs the devices:\n{console}"
    );
    assert!(
        console.contains("ims: FAIL: no slot-array IMS device (1b36:1100)"),
        "{console}"
    );
}
