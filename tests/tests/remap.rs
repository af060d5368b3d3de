//! Remapped interrupts through the interrupt core on real KVM: the test harness programs
//! IRTEs as a front end would and raises them as a device would; the test guest counts
//! what arrives on each vCPU and vector, and checks it against what was raised.

use integration_tests::{boot, config};

fn passes(cpus: u32, cmdline: &str) -> (vmm::RunReport, String) {
    let (report, console) = boot(&config(cpus, cmdline));
    assert!(report.passed(), "{report}\n{console}");
    (report, console)
}

#[test]
fn remapped_interrupts_arrive_on_the_right_vcpu_and_vector() {
    let (report, console) = passes(4, "scenario=remap remap_entries=512 remap_vectors=8");
    assert!(
        console.contains(
            "remap: 512 IRTEs live at once over 8 vectors (1 route commits), each delivered once"
        ),
        "{console}"
    );
    // Entry i went to vCPU i % 4: 128 each, and the guest counted exactly that.
    assert_eq!(report.harness_fired, vec![128; 4]);
    assert_eq!(report.interrupts, Some(vec![128; 4]));
}

#[test]
fn twenty_thousand_live_irtes_all_deliver() {
    let (report, console) = passes(8, "scenario=remap remap_entries=20000 remap_vectors=64");
    assert!(
        console.contains("remap: 20000 IRTEs live at once"),
        "{console}"
    );
    assert_eq!(report.harness_fired, vec![2500; 8]);
    assert_eq!(report.interrupts, Some(vec![2500; 8]));
}

#[test]
fn retarget_under_continuous_firing_loses_none() {
    let (report, console) = passes(2, "scenario=retarget retarget_count=2000");
    for mode in ["rewriting its route", "joining routed targets"] {
        let line = console
            .lines()
            .find(|l| l.contains(mode))
            .unwrap_or_default();
        assert!(
            line.contains("2000 interrupts") && line.contains("all counted once"),
            "{console}"
        );
        assert!(line.contains("on 2 vCPUs"), "delivery moved: {line}");
    }
    let total: u64 = report.interrupts.unwrap().iter().sum();
    assert_eq!(total, 4000);
}

#[test]
fn retarget_across_four_vcpus() {
    let (_, console) = passes(4, "scenario=retarget retarget_count=1000");
    assert_eq!(console.matches("all counted once").count(), 2, "{console}");
}

#[test]
fn a_source_id_mismatch_is_not_delivered_and_is_recorded() {
    let (report, console) = passes(2, "scenario=sid sid_count=25");
    assert!(
        console.contains("sid: 25 foreign requests blocked and recorded as faults"),
        "{console}"
    );
    assert_eq!(report.remap_faults, vec![(0x26, 25)]);
    assert_eq!(report.interrupts, Some(vec![1, 0]));
}
