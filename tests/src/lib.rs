//! Helpers shared by the integration tests: boot the test guest on real KVM with a
//! captured console.
//!
//! These tests need `/dev/kvm`. Where it is missing they fail (the VMM's error says
//! why); they never skip.

use std::time::Duration;

use vmm::{Kernel, RunReport, VmConfig};

/// A console that keeps what the guest printed.
pub use vmm::CapturedConsole as Captured;

/// The default machine with `cpus` vCPUs, the built-in guest and `cmdline`.
#[must_use]
pub fn config(cpus: u32, cmdline: &str) -> VmConfig {
    VmConfig {
        cpus,
        cmdline: cmdline.to_string(),
        kernel: Kernel::BuiltIn,
        watchdog: Some(Duration::from_secs(120)),
        ..VmConfig::default()
    }
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
        Err(e) => {
            let mut chain = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                chain.push_str(&format!(": {c}"));
                cause = c.source();
            }
            panic!("the VM could not run: {chain}");
        }
    };
    (report, console.text())
}
