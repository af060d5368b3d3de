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
    // All through the harness's one requester: more than its fair share of the table
    // (16,384 of 65,536 with two devices and the harness), so the quota is lifted.
    let mut cfg = config(8, "scenario=remap remap_entries=20000 remap_vectors=64");
    cfg.machine.max_entries_per_device = Some(65_536);
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
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
    for source in ["retarget", "external source"] {
        for mode in ["rewriting its route", "joining routed targets"] {
            let line = console
                .lines()
                .find(|l| l.starts_with(&format!("{source} ({mode})")))
                .unwrap_or_default();
            assert!(
                line.contains("2000 interrupts") && line.contains("all counted once"),
                "{console}"
            );
            assert!(line.contains("on 2 vCPUs"), "delivery moved: {line}");
            if source == "external source" {
                // Each of its interrupts follows a move of its eventfd.
                let retargets: u32 = line
                    .split(", ")
                    .find_map(|part| part.strip_suffix(" retargets")?.parse().ok())
                    .unwrap();
                assert!(retargets >= 2000, "{line}");
            }
        }
    }
    // Through the data path: 2 x 2000; through an external eventfd: 2 x (2000 + 1).
    let total: u64 = report.interrupts.unwrap().iter().sum();
    assert_eq!(total, 8002);
    assert_eq!(
        report.remap_stats.bound, 0,
        "bindings go with their entries"
    );
}

#[test]
fn retarget_across_four_vcpus() {
    let (_, console) = passes(4, "scenario=retarget retarget_count=1000");
    assert_eq!(console.matches("all counted once").count(), 4, "{console}");
    assert_eq!(console.matches("none while absent").count(), 2, "{console}");
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

/// More than 255 vCPUs: the guest runs in x2APIC mode, the interrupt core's IRTEs carry
/// 32-bit destinations (EIM), and KVM's routes carry destination bits 31:8 in
/// `address_hi`; one remapped interrupt reaches each of 288 vCPUs, vCPU 287 included.
#[test]
fn remapped_interrupts_reach_vcpu_287_of_288() {
    let mut cfg = config(288, "scenario=remap remap_entries=288");
    cfg.machine.memory = 256 << 20;
    cfg.run.watchdog = Some(std::time::Duration::from_secs(300));
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
    assert!(console.contains("x2APIC"), "{console}");
    let counts = report
        .interrupts
        .clone()
        .expect("the guest keeps its counters");
    assert_eq!(counts.len(), 288);
    assert_eq!(counts[287], 1, "{report}");
    assert!(counts.iter().all(|&n| n == 1), "{report}");
    assert_eq!(report.harness_fired[287], 1, "{report}");
}
