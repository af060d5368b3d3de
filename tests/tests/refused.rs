//! Instructions KVM gives up on (`vmm::refused`): the test guest executes each of the set
//! in ring 0 and checks its architectural result, whoever completed it; the run report
//! counts the ones the VMM completed (all of them on a KVM that emulates guest ring 0, as
//! this project's machines do; none where the CPU runs them). An instruction outside the
//! set stops the run at once with the vCPU-stopped error at its address.

use integration_tests::{boot, config};
use vmm::exit::StopReason;
use vmm::refused::Kind;
use vmm::report::EXIT_VCPUS_STOPPED;
use vmm::Outcome;

/// How many of each kind `scenario=refused` executes (POPCNT four times).
const EXECUTED: [(Kind, u64); 5] = [
    (Kind::Int3, 1),
    (Kind::Clac, 1),
    (Kind::Stac, 1),
    (Kind::Popcnt, 4),
    (Kind::Fwait, 1),
];

fn completed(report: &vmm::RunReport, kind: Kind) -> u64 {
    report
        .completed_instructions
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn the_set_has_its_architectural_results_and_each_completion_is_counted() {
    let (report, console) = boot(&config(2, "scenario=refused"));
    assert!(report.passed(), "{report}\n{console}");
    for line in [
        "refused: int3 raised #BP returning to",
        "refused: fwait completed",
        // The MSR filter that watches `IA32_LSTAR` writes it as the guest asked and
        // answers a non-canonical value with #GP, as the CPU would.
        "refused: wrmsr IA32_LSTAR read back 0xffffffff81234560; a non-canonical value raised #GP and left 0xffffffff81234560",
    ] {
        assert!(console.contains(line), "`{line}` missing:\n{console}");
    }
    // The guest checked every result; the VMM completed each kind as often as the guest
    // ran it or never (the CPU did), and nothing it was not given.
    for (kind, ran) in EXECUTED {
        let n = completed(&report, kind);
        let skipped = match kind {
            Kind::Clac | Kind::Stac => console.contains("clac/stac skipped"),
            _ => console.contains(&format!("{kind} skipped")),
        };
        assert!(
            n == 0 || (n == ran && !skipped),
            "{n} {kind} completed, the guest ran {ran}:\n{report}"
        );
    }
    assert_eq!(completed(&report, Kind::Syscall), 0);
    if !report.completed_instructions.is_empty() {
        assert!(
            report
                .to_string()
                .contains("(instructions KVM gave up on, completed by the VMM)"),
            "{report}"
        );
    }
}

/// `cmpxchg16b` is not in the set: where KVM refuses it the run ends at once (not at the
/// watchdog) with KVM's emulation failure at the address the guest printed; where the
/// CPU runs it the guest passes.
#[test]
fn an_instruction_outside_the_set_stops_the_run_with_its_address() {
    let (report, console) = boot(&config(2, "scenario=unemulated"));
    let at = console
        .lines()
        .find_map(|l| l.strip_prefix("unemulated: cmpxchg16b at 0x"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("the guest names the instruction:\n{console}"));
    match &report.outcome {
        Outcome::GuestExit { code: 0 } => {
            assert!(console.contains("the CPU ran it"), "{console}");
        }
        Outcome::VcpuFailed { index, reason } => {
            assert_eq!(*index, 0);
            assert_eq!(
                *reason,
                StopReason::InternalError {
                    suberror: 1,
                    rip: Some(at)
                }
            );
            assert_eq!(report.exit_code(), EXIT_VCPUS_STOPPED);
            assert_eq!(
                report.failure().unwrap(),
                format!("vCPU 0 stopped: KVM could not emulate an instruction at RIP {at:#x}; the VM was stopped")
            );
            assert!(report.completed_instructions.is_empty(), "{report}");
        }
        other => panic!("{other:?}\n{report}\n{console}"),
    }
}
