//! DMA remapping on real KVM: the test guest builds root, context and second-level tables
//! for the slot-array IMS device, turns translation on the way Linux does, and watches
//! the device's virtqueue work land at the IOVAs it mapped; a remap seen only after its
//! IOTLB invalidation, a write to a read-only page and an unmapped IOVA each recorded as
//! a DMA fault with its fault event, a pass-through context entry.

use integration_tests::{boot, config};

const LINES: [&str; 4] = [
    "dma: translation on: device 0x0018 in domain 1, 4-level table",
    "dma: a remap of the used ring took effect at its IOTLB invalidation, not before",
    "dma: faults 0x5 (write to a read-only page) and 0x6 (unmapped IOVA) recorded, each with a fault event; the device went on",
    "dma: 6 completions, 2 DMA faults, translation off; PASS",
];

fn dma(cpus: u32) {
    let (report, console) = boot(&config(cpus, "scenario=dma"));
    assert!(report.passed(), "{report}\n{console}");
    for line in LINES {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
    // Exactly one fault of each kind: the device's write to the read-only page and its
    // read of the unmapped descriptor table; nothing else faulted.
    assert_eq!(report.dma_faults, vec![(0x5, 1), (0x6, 1)], "{report}");
    // 6 completions and 2 fault events, nothing else.
    let total: u64 = report.interrupts.as_ref().unwrap().iter().sum();
    assert_eq!(total, 8, "{report}");
    assert!(report.remap_faults.is_empty(), "{report}");
}

/// A snapshot taken while translation is on (the used ring remapped, the caches warm)
/// restores into a VM whose unit translates the same way: the rest of the scenario (the
/// faults, recovery, pass-through) passes there, with the same fault counts.
#[test]
fn a_snapshot_with_translation_on_restores_and_the_scenario_finishes() {
    let file = std::env::temp_dir().join(format!("vmm-test-{}-dma.snap", std::process::id()));
    let mut cfg = config(2, "scenario=dma dma_snapshot=1");
    cfg.run.snapshot = Some(vmm::config::SnapshotPlan {
        path: file.clone(),
        after: None,
        then: vmm::config::AfterSnapshot::Stop,
    });
    let (before, console) = boot(&cfg);
    assert!(
        matches!(before.outcome, vmm::Outcome::Snapshotted { .. }),
        "{before}\n{console}"
    );
    assert!(before.dma_faults.is_empty(), "{before}");
    let settings = vmm::Settings {
        watchdog: Some(120),
        ..vmm::Settings::default()
    };
    let restored = integration_tests::restore(&file, &settings);
    let _ = std::fs::remove_file(&file);
    let (after, console) = restored.unwrap();
    assert!(after.passed(), "{after}\n{console}");
    for line in &LINES[2..] {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
    assert_eq!(after.dma_faults, vec![(0x5, 1), (0x6, 1)], "{after}");
}

#[test]
fn dma_remapping_on_one_vcpu() {
    dma(1);
}

#[test]
fn dma_remapping_on_two_vcpus() {
    dma(2);
}

#[test]
fn dma_remapping_on_four_vcpus() {
    dma(4);
}
