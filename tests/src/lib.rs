//! Helpers shared by the integration tests: boot the test guest on real KVM with a
//! captured console.
//!
//! These tests need `/dev/kvm`. Where it is missing they fail (the VMM's error says
//! why); they never skip.

use std::path::Path;
use std::time::Duration;

use vmm::{Kernel, MachineConfig, RunConfig, RunReport, Settings, VmConfig};

/// A console that keeps what the guest printed.
pub use vmm::CapturedConsole as Captured;

/// The default machine with `cpus` vCPUs, the built-in guest and `cmdline`.
#[must_use]
pub fn config(cpus: u32, cmdline: &str) -> VmConfig {
    VmConfig {
        machine: MachineConfig {
            cpus,
            cmdline: cmdline.to_string(),
            kernel: Kernel::BuiltIn,
            ..MachineConfig::default()
        },
        run: RunConfig {
            watchdog: Some(Duration::from_secs(120)),
            ..RunConfig::default()
        },
    }
}

/// Restores the snapshot at `path` with `run`'s settings; the report and console text, or
/// the error chain on one line.
///
/// # Errors
/// The restore's error, as one line.
pub fn restore(path: &Path, run: &Settings) -> Result<(RunReport, String), String> {
    let console = Captured::default();
    vmm::restore_with_console(path, run, Box::new(console.clone()))
        .map(|report| (report, console.text()))
        .map_err(|e| vmm::report::error_chain(&e))
}

/// Boots `config` and returns the report and the console text.
///
/// # Panics
/// When the VM cannot be built (no KVM, for one): the error chain is in the message.
#[must_use]
pub fn boot(config: &VmConfig) -> (RunReport, String) {
    let console = Captured::default();
    let report = match vmm::run_with_console(config, Box::new(console.clone())) {
        Ok(report) => report,
        Err(e) => panic!("the VM could not run: {}", vmm::report::error_chain(&e)),
    };
    (report, console.text())
}

/// Interrupts the `vtd` scenario counted in all: a fixed number, plus the level-triggered
/// IOAPIC pin's, which arrive again after each EOI while its line is high, so how many
/// depends on how soon KVM reports the EOIs (the guest prints the number).
///
/// 20 + 400 remapped interrupts, 2 in the agreement test, 8 fault events (7 faults and the
/// queue error), the UART's 2 through IOAPIC pin 4, and the pin with a mismatched vector's 1.
///
/// # Panics
/// When the console does not say how many the level pin sent.
#[must_use]
pub fn vtd_interrupts(console: &str) -> u64 {
    let marker = "a level pin sent ";
    let level: u64 = console
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("`{marker}N` missing:\n{console}"));
    assert!(level >= 2, "the level pin was not sent again after an EOI");
    20 + 400 + 2 + 8 + 2 + 1 + level
}
