//! How a run ended, and the summary `vmm run` prints.

use std::fmt;
use std::time::Duration;

use crate::config::{format_size, Kernel};
use crate::exit::StopReason;

/// An error and its causes on one line (`error: cause: cause ...` without the prefix):
/// how the binary, the run's own failures and the tests print an error chain.
#[must_use]
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}

/// Process exit code when the watchdog ended the guest.
pub const EXIT_WATCHDOG: u8 = 124;
/// Process exit code when the VMM could not run the guest (bad config, KVM error).
pub const EXIT_VMM_ERROR: u8 = 125;
/// Process exit code when every vCPU stopped without a verdict (e.g. triple faults).
pub const EXIT_VCPUS_STOPPED: u8 = 126;
/// Guest failure codes above this are reported as this.
pub const EXIT_GUEST_MAX: u8 = 123;

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote its verdict to the debug-exit port.
    GuestExit {
        /// The code (0: success).
        code: u32,
    },
    /// No verdict before the watchdog fired.
    Watchdog {
        /// The watchdog's period.
        after: Duration,
        /// vCPUs that had already stopped, and why.
        stopped: Vec<(u32, StopReason)>,
    },
    /// Every vCPU stopped without a verdict.
    VcpusStopped {
        /// Each vCPU and why it stopped.
        stopped: Vec<(u32, StopReason)>,
    },
    /// A vCPU stopped because KVM or the VMM could not go on with it (an instruction KVM
    /// could not emulate that the VMM does not complete, a failed entry, an exit the VMM
    /// does not handle); the VM was stopped then, without waiting for the others.
    VcpuFailed {
        /// The vCPU.
        index: u32,
        /// Why it stopped.
        reason: StopReason,
    },
    /// The console showed the text the run was told to wait for (`--until`); the VM was
    /// stopped there. A success.
    ConsoleMatched {
        /// The text.
        text: String,
    },
    /// The VM took its snapshot and stopped (restore it to go on).
    Snapshotted {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The control API asked the VM to shut down (`PUT /api/v1/vm.shutdown`). Not a
    /// failure.
    Shutdown,
    /// A snapshot was due but could not be taken; the VM stopped.
    SnapshotFailed {
        /// Why, with its causes.
        error: String,
    },
}

/// A snapshot the run took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTaken {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long the VM was paused to take it: pausing, reading its state and copying the
    /// pages of RAM that hold something (a file over `snapshot::MAX_STAGED` is written
    /// instead). Writing the file and flushing it to disk come after, with the VM running
    /// again (or stopped, as the plan says); a VM the API paused waits for them.
    pub pause: Duration,
    /// How long pausing took (harness idle, devices and vCPUs stopped).
    pub pausing: Duration,
}

/// What happened in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The image that ran.
    pub kernel: Kernel,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The snapshot file the run was restored from, if it was.
    pub restored_from: Option<std::path::PathBuf>,
    /// The snapshot the run took, if it took one.
    pub snapshot: Option<SnapshotTaken>,
    /// Interrupts each vCPU counted, if the guest keeps the harness counter table.
    pub interrupts: Option<Vec<u64>>,
    /// Interrupts the test harness fired at each vCPU.
    pub harness_fired: Vec<u64>,
    /// Interrupt-remapping faults recorded, by VT-d fault reason code.
    pub remap_faults: Vec<(u8, u64)>,
    /// DMA-remapping faults (a device's access the guest's tables refused), by VT-d
    /// fault reason code (0x1-0xD), recorded or not (FPD).
    pub dma_faults: Vec<(u8, u64)>,
    /// The interrupt core's control-path counters at the end of the run.
    pub remap_stats: irq::backing::BackingStats,
    /// What the hypercall dispatcher handled.
    pub hypercalls: devices::dispatch::HypercallStats,
    /// What each PCI device did.
    pub devices: Vec<crate::pci::DeviceReport>,
    /// What storm control did.
    pub storms: irq::storm::StormStats,
    /// What the harness's benchmark requests measured (empty unless the guest asked).
    pub measurements: crate::harness::Measurements,
    /// Port and MMIO accesses that reached no device.
    pub unmapped_accesses: u64,
    /// Instructions KVM gave up on that the VMM completed, by kind (`refused`).
    pub completed_instructions: Vec<(crate::refused::Kind, u64)>,
    /// vCPUs that were still inside a device call when the VM stopped and did not leave
    /// it within the stop grace: the run ended without them (their threads finish on
    /// their own once the call returns).
    pub stuck_vcpus: u32,
    /// The VM's other threads (harness, storm ticker, device loop) by name that had not
    /// ended by the stop grace's end (a device loop inside a device call, a harness inside
    /// a request): the run ended without them. Each waits with no timeout or is woken by
    /// the stop, so an idle one is never here.
    pub threads_left: Vec<String>,
    /// Console output errors.
    pub console_errors: u64,
    /// What the interrupt event trace held (a run with `--trace`).
    pub trace: Option<crate::trace::TraceTotals>,
    /// Wall-clock time from set-up to stop.
    pub elapsed: Duration,
    /// When a vCPU first entered the guest (`None`: none did), for a caller that counts
    /// from its own start (the `vmm` binary counts from the process's).
    pub first_entry: Option<std::time::Instant>,
    /// From set-up's start (the run or restore call) to that first entry: building the
    /// VM (or restoring it) until the guest's first instruction.
    pub startup: Option<Duration>,
    /// From the process's start to that first entry, when the program knows when it
    /// started (the `vmm` binary sets it; the library cannot know).
    pub process_startup: Option<Duration>,
}

impl RunReport {
    /// Whether the guest reported success.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::GuestExit { code: 0 }
    }

    /// The process exit code for this outcome.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match &self.outcome {
            Outcome::GuestExit { code: 0 } => 0,
            Outcome::GuestExit { code } => u8::try_from(*code)
                .unwrap_or(EXIT_GUEST_MAX)
                .min(EXIT_GUEST_MAX),
            Outcome::Watchdog { .. } => EXIT_WATCHDOG,
            Outcome::VcpusStopped { .. } | Outcome::VcpuFailed { .. } => EXIT_VCPUS_STOPPED,
            Outcome::Snapshotted { .. } | Outcome::ConsoleMatched { .. } | Outcome::Shutdown => 0,
            Outcome::SnapshotFailed { .. } => EXIT_VMM_ERROR,
        }
    }

    /// One line saying what went wrong, if anything did.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        let stops = |stopped: &[(u32, StopReason)]| {
            stopped
                .iter()
                .map(|(i, r)| format!("vCPU {i}: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        match &self.outcome {
            Outcome::GuestExit { code: 0 } => None,
            Outcome::GuestExit { code } => {
                Some(format!("the guest reported failure (code {code})"))
            }
            Outcome::Watchdog { after, stopped } => {
                let mut line = format!(
                    "the guest reported no verdict within {} s; stopped by the watchdog",
                    after.as_secs_f64()
                );
                if !stopped.is_empty() {
                    line.push_str(&format!(" (already stopped: {})", stops(stopped)));
                }
                Some(line)
            }
            Outcome::VcpusStopped { stopped } => Some(format!(
                "every vCPU stopped without a verdict: {}",
                stops(stopped)
            )),
            Outcome::VcpuFailed { index, reason } => Some(format!(
                "vCPU {index} stopped: {reason}; the VM was stopped"
            )),
            Outcome::Snapshotted { .. } | Outcome::ConsoleMatched { .. } | Outcome::Shutdown => {
                None
            }
            Outcome::SnapshotFailed { error } => Some(format!("cannot take the snapshot: {error}")),
        }
    }
}

/// Up to this many vCPUs are listed one by one in the summary.
const LISTED_VCPUS: usize = 16;

fn per_vcpu(values: &[u64]) -> String {
    let one = |(i, n): (usize, &u64)| format!("vCPU {i}: {n}");
    if values.len() <= LISTED_VCPUS {
        return values
            .iter()
            .enumerate()
            .map(one)
            .collect::<Vec<_>>()
            .join(", ");
    }
    // Many vCPUs: the first few, the last two, and the spread.
    let head: Vec<String> = values.iter().enumerate().take(4).map(one).collect();
    let tail: Vec<String> = values
        .iter()
        .enumerate()
        .skip(values.len() - 2)
        .map(one)
        .collect();
    let total: u64 = values.iter().sum();
    let min = values.iter().min().copied().unwrap_or(0);
    let max = values.iter().max().copied().unwrap_or(0);
    format!(
        "{}, ..., {}; {total} over {} vCPUs, {min} to {max} each",
        head.join(", "),
        tail.join(", "),
        values.len()
    )
}

impl RunReport {
    /// The summary's first lines: the image, the machine, a snapshot taken.
    fn write_machine(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kernel = match &self.kernel {
            Kernel::BuiltIn => "built-in test guest".to_string(),
            Kernel::Elf(p) => p.display().to_string(),
        };
        writeln!(f, "vmm: kernel      {kernel}")?;
        if let Some(from) = &self.restored_from {
            writeln!(f, "vmm: restored    from {}", from.display())?;
        }
        writeln!(
            f,
            "vmm: machine     {} vCPU{}, {}, ran {:.2} s",
            self.cpus,
            if self.cpus == 1 { "" } else { "s" },
            format_size(self.memory),
            self.elapsed.as_secs_f64()
        )?;
        let ms = |t: Duration| t.as_secs_f64() * 1e3;
        match (self.process_startup, self.startup) {
            (Some(p), Some(s)) => writeln!(
                f,
                "vmm: startup     {:.1} ms from process start to the guest's first instruction ({:.1} ms of it setting up the VM)",
                ms(p),
                ms(s)
            )?,
            (_, Some(s)) => writeln!(
                f,
                "vmm: startup     {:.1} ms from set-up to the guest's first instruction",
                ms(s)
            )?,
            _ => {}
        }
        if let Some(s) = &self.snapshot {
            writeln!(
                f,
                "vmm: snapshot    {} ({}), VM paused {} ms ({} ms to pause)",
                s.path.display(),
                format_size(s.bytes),
                s.pause.as_millis(),
                s.pausing.as_millis()
            )?;
        }
        Ok(())
    }

    /// Interrupts: counted by the guest, fired by the harness, the core's and the
    /// hypercall's counters, storm control.
    fn write_interrupts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.interrupts {
            Some(counts) => writeln!(
                f,
                "vmm: interrupts  {} (counted by the guest)",
                per_vcpu(counts)
            )?,
            None => writeln!(f, "vmm: interrupts  not reported by the guest")?,
        }
        if self.harness_fired.iter().any(|&n| n > 0) {
            writeln!(
                f,
                "vmm: host fired  {} (by the test harness)",
                per_vcpu(&self.harness_fired)
            )?;
        }
        let st = &self.remap_stats;
        if st.transactions + st.rollbacks > 0 {
            writeln!(
                f,
                "vmm: remapping   {} transactions ({} rolled back), {} route commits taking {} us",
                st.transactions,
                st.rollbacks,
                st.route_commits,
                st.route_commit_time.as_micros()
            )?;
        }
        let hc = &self.hypercalls;
        if !hc.calls.is_empty() || hc.unknown + hc.throttled > 0 {
            let calls: Vec<String> = hc
                .calls
                .iter()
                .map(|c| {
                    format!(
                        "{} {} ({} failed, mean {} us, max {} us)",
                        c.name,
                        c.calls,
                        c.errors,
                        c.mean.as_micros(),
                        c.max.as_micros()
                    )
                })
                .collect();
            writeln!(
                f,
                "vmm: hypercalls  {}; {} unknown, {} throttled",
                calls.join(", "),
                hc.unknown,
                hc.throttled
            )?;
        }
        let st = &self.storms;
        if st.throttled > 0 {
            writeln!(
                f,
                "vmm: storms      {} interrupts from {} entries over {}/s coalesced into {} later deliveries",
                st.throttled, st.entries, st.rate, st.flushed
            )?;
        }
        Ok(())
    }

    /// Devices, faults, and what reached nothing or could not be done.
    fn write_devices(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.devices.iter().filter(|d| d.busy) {
            writeln!(
                f,
                "vmm: device      {}: still busy when the VM stopped; its counters were not read",
                d.device
            )?;
        }
        for d in self.devices.iter().filter(|d| !d.busy) {
            if let Some(r) = d.remote {
                let state = if r.lost {
                    "the device process was lost; it read as all ones from then on and its entries' host interrupts were taken back"
                } else {
                    "connected to the end"
                };
                let entries = r
                    .entry_messages
                    .map(|n| format!(", {n} SET_IRQS for its entries' host interrupts"))
                    .unwrap_or_default();
                writeln!(
                    f,
                    "vmm: device      {}: {} requests failed{entries}, {state}",
                    d.device, r.failed
                )?;
                continue;
            }
            let mut line = format!(
                "vmm: device      {}: {} completions, {} interrupts refused by remapping",
                d.device, d.completions, d.faults
            );
            if d.resets > 0 {
                line.push_str(&format!(", {} resets", d.resets));
            }
            if d.dropped > 0 {
                line.push_str(&format!(", {} interrupts dropped on purpose", d.dropped));
            }
            writeln!(f, "{line}")?;
        }
        for (what, faults) in [
            ("IR faults  ", &self.remap_faults),
            ("DMA faults ", &self.dma_faults),
        ] {
            if faults.is_empty() {
                continue;
            }
            let counts: Vec<String> = faults
                .iter()
                .map(|(code, n)| format!("{n} x {code:#x}"))
                .collect();
            writeln!(f, "vmm: {what} {} (VT-d fault reasons)", counts.join(", "))?;
        }
        if self.unmapped_accesses > 0 {
            writeln!(
                f,
                "vmm: unmapped    {} accesses reached no device",
                self.unmapped_accesses
            )?;
        }
        if !self.completed_instructions.is_empty() {
            let kinds: Vec<String> = self
                .completed_instructions
                .iter()
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect();
            writeln!(
                f,
                "vmm: completed   {} (instructions KVM gave up on, completed by the VMM)",
                kinds.join(", ")
            )?;
        }
        if self.stuck_vcpus > 0 {
            writeln!(
                f,
                "vmm: stuck       {} vCPUs were still inside a device call when the VM stopped; the run ended without them",
                self.stuck_vcpus
            )?;
        }
        if !self.threads_left.is_empty() {
            writeln!(
                f,
                "vmm: left        {} had not ended when the VM stopped; the run ended without them",
                self.threads_left.join(", ")
            )?;
        }
        if self.console_errors > 0 {
            writeln!(f, "vmm: console     {} output errors", self.console_errors)?;
        }
        if let Some(t) = self.trace {
            writeln!(
                f,
                "vmm: trace       {} events written, {} left out by the per-category limit",
                t.written, t.dropped
            )?;
        }
        Ok(())
    }

    /// The verdict line's text.
    fn verdict(&self) -> String {
        match &self.outcome {
            Outcome::GuestExit { code: 0 } => "PASS (guest exit code 0)".to_string(),
            Outcome::GuestExit { code } => format!("FAIL (guest exit code {code})"),
            Outcome::Watchdog { .. } => "HUNG (stopped by the watchdog)".to_string(),
            Outcome::VcpusStopped { .. } => "CRASHED (every vCPU stopped)".to_string(),
            Outcome::VcpuFailed { index, .. } => format!("CRASHED (vCPU {index} stopped)"),
            Outcome::Snapshotted { path } => {
                format!("SNAPSHOT (written to {}; the VM stopped)", path.display())
            }
            Outcome::SnapshotFailed { .. } => "SNAPSHOT FAILED (the VM stopped)".to_string(),
            Outcome::Shutdown => "SHUT DOWN (through the control API)".to_string(),
            Outcome::ConsoleMatched { text } => {
                format!("PASS (the console showed \"{text}\"; the VM was stopped there)")
            }
        }
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_machine(f)?;
        self.write_interrupts(f)?;
        self.write_devices(f)?;
        write!(f, "vmm: verdict     {}", self.verdict())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: Outcome) -> RunReport {
        RunReport {
            kernel: Kernel::BuiltIn,
            cpus: 2,
            memory: 64 << 20,
            outcome,
            restored_from: None,
            snapshot: None,
            interrupts: Some(vec![51, 51]),
            harness_fired: vec![50, 50],
            remap_faults: vec![],
            dma_faults: vec![],
            remap_stats: irq::backing::BackingStats::default(),
            hypercalls: devices::dispatch::HypercallStats::default(),
            devices: vec![crate::pci::DeviceReport {
                device: crate::config::DeviceConfig::defaults()[1].clone(),
                completions: 7,
                faults: 1,
                resets: 2,
                dropped: 0,
                busy: false,
                remote: None,
            }],
            measurements: crate::harness::Measurements::default(),
            storms: irq::storm::StormStats::default(),
            unmapped_accesses: 0,
            completed_instructions: Vec::new(),
            stuck_vcpus: 0,
            threads_left: Vec::new(),
            console_errors: 0,
            trace: None,
            elapsed: Duration::from_millis(420),
            first_entry: None,
            startup: None,
            process_startup: None,
        }
    }

    #[test]
    fn many_vcpus_are_summed_up_not_listed() {
        let mut values = vec![1u64; 288];
        values[5] = 3;
        let line = per_vcpu(&values);
        assert_eq!(
            line,
            "vCPU 0: 1, vCPU 1: 1, vCPU 2: 1, vCPU 3: 1, ..., vCPU 286: 1, vCPU 287: 1; \
             290 over 288 vCPUs, 1 to 3 each"
        );
        assert_eq!(per_vcpu(&[2, 3]), "vCPU 0: 2, vCPU 1: 3");
    }

    #[test]
    fn exit_codes_separate_guest_verdicts_from_vmm_outcomes() {
        assert_eq!(report(Outcome::GuestExit { code: 0 }).exit_code(), 0);
        assert_eq!(report(Outcome::GuestExit { code: 3 }).exit_code(), 3);
        assert_eq!(
            report(Outcome::GuestExit { code: 256 }).exit_code(),
            EXIT_GUEST_MAX
        );
        assert_eq!(
            report(Outcome::GuestExit { code: 124 }).exit_code(),
            EXIT_GUEST_MAX
        );
        let hung = Outcome::Watchdog {
            after: Duration::from_secs(2),
            stopped: vec![],
        };
        assert_eq!(report(hung).exit_code(), EXIT_WATCHDOG);
        let crashed = Outcome::VcpusStopped {
            stopped: vec![(0, StopReason::TripleFault { rip: Some(1) })],
        };
        let r = report(crashed);
        assert_eq!(r.exit_code(), EXIT_VCPUS_STOPPED);
        assert_eq!(
            r.failure().unwrap(),
            "every vCPU stopped without a verdict: vCPU 0: triple fault at RIP 0x1"
        );
    }

    #[test]
    fn summary_names_vcpus_interrupts_and_verdict() {
        let text = report(Outcome::GuestExit { code: 0 }).to_string();
        assert!(text.contains("2 vCPUs, 64 MiB"), "{text}");
        assert!(
            text.contains("vCPU 0: 51, vCPU 1: 51 (counted by the guest)"),
            "{text}"
        );
        assert!(text.ends_with("PASS (guest exit code 0)"), "{text}");
        assert!(
            text.contains("00:04.0 ims-queues (64 contexts): 7 completions, 1 interrupts refused by remapping, 2 resets"),
            "{text}"
        );
        assert!(report(Outcome::GuestExit { code: 0 }).failure().is_none());
    }
}
