//! What a VM is made of and how it runs, from defaults, a TOML file and command-line
//! flags (in that order of precedence, lowest first), validated before anything is
//! created. The machine (`machine.rs`) is what a snapshot keeps; the run (`run.rs`) is
//! given again by whoever restores it; devices (`devices.rs`) are the machine's
//! `[[device]]` tables. A file mixes both kinds of key in one flat table.
//!
//! ```toml
//! cpus = 2
//! memory = "64M"          # K, M, G, T (binary); a bare number is MiB
//! kernel = "guest.elf"    # absent: the built-in test guest
//! cmdline = "scenario=msi"
//! console = "stdout"      # "off", or "file:PATH"
//! watchdog = 30           # seconds; 0 disables it
//! kvm_device = "/dev/kvm"
//! max_routes = 64         # cap on KVM MSI routes for remapped targets (default: KVM's)
//! hypercall_rate = 200000 # hypercalls per second per VM before BUSY
//! irq_rate = 200000       # interrupts per second per entry before the rest coalesce; 0: off
//! harness = "on"          # the test harness; default: on for the built-in guest only
//!
//! # PCI devices; none listed: the default set (below); `device = []`: none
//! [[device]]
//! kind = "ims-slots"      # slot-array IMS device
//! slots = 2048            # 1 to 32768
//! queues = 2048           # work queues, 1 to slots
//! pci_slot = 3            # device number on bus 0 (1-31); default: the next free one
//!
//! [[device]]
//! kind = "ims-queues"     # queue-memory IMS device
//! contexts = 64           # queue contexts, 1 to 4096
//! command_timeout_ms = 1000
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::CMDLINE_MAX;

mod devices;
mod machine;
mod run;

pub use devices::*;
pub use machine::*;
pub use run::*;

/// A validated configuration: the machine and the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// What the VM is made of (what a snapshot keeps).
    pub machine: MachineConfig,
    /// How this run goes (console, watchdog, KVM device, snapshots, `until`).
    pub run: RunConfig,
}

/// Settings as written in a config file or given as flags, every one optional: the
/// machine's and the run's keys in one flat table.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Number of vCPUs.
    pub cpus: Option<u32>,
    /// Guest RAM, e.g. `"64M"`, or a number of MiB.
    pub memory: Option<SizeSetting>,
    /// ELF image path.
    pub kernel: Option<PathBuf>,
    /// Guest command line.
    pub cmdline: Option<String>,
    /// `stdout`, `off` or `file:PATH`.
    pub console: Option<String>,
    /// Watchdog in seconds; 0 disables it.
    pub watchdog: Option<u64>,
    /// KVM device node.
    pub kvm_device: Option<PathBuf>,
    /// Cap on KVM MSI routes.
    pub max_routes: Option<u32>,
    /// Remapping entries one requester may hold (absent: a fair share).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_entries_per_device: Option<u32>,
    /// Hypercalls per second.
    pub hypercall_rate: Option<u32>,
    /// Interrupts per second per remapping entry (0: no limit).
    pub irq_rate: Option<u32>,
    /// PCI devices (`[[device]]`); absent: the default set.
    pub device: Option<Vec<DeviceSetting>>,
    /// An initial ramdisk for a Linux kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Console text at which the run stops with success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// CPU features to hide from the guest, e.g. `["xsave", "cx16"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid_hide: Option<Vec<String>>,
    /// Where a snapshot of the VM goes, when the guest asks for one or at
    /// `snapshot_after_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<PathBuf>,
    /// Milliseconds after the start at which the snapshot is taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_after_ms: Option<u64>,
    /// What the VM does after its snapshot: `stop` (the default) or `continue`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_then: Option<String>,
    /// The test harness: `on` or `off` (default: on for the built-in test guest only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub harness: Option<String>,
    /// The control API's Unix socket (`docs/api.md`); it must not exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Where the interrupt event trace goes (a file, or `-` for stdout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Trace categories, comma-separated (`ir,hypercall,vtd,ioapic,ims,routes,faults` or
    /// `all`, the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_categories: Option<String>,
    /// Trace events per category per second before the rest are counted as dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_limit: Option<u32>,
    /// Seccomp filters: `on` (the default), `log` or `off`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<String>,
}

/// A size as a string with a unit or a number of MiB.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeSetting {
    /// `"64M"`, `"1G"`, ...
    Text(String),
    /// A number of MiB.
    MiB(u64),
}

/// Why a configuration is refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("invalid config file {}: {message}", .path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// Where and what.
        message: String,
    },
    /// A size could not be parsed.
    #[error("invalid memory size `{0}`: expected a number with an optional K, M, G or T suffix (a bare number is MiB)")]
    Size(String),
    /// A size is not a multiple of 4 KiB.
    #[error("invalid memory size {0} bytes: must be a multiple of 4 KiB")]
    SizeAlignment(u64),
    /// Too few or too many vCPUs.
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_CPUS}")]
    Cpus(u32),
    /// Less RAM than a guest needs.
    #[error("memory size {} is too small: at least {} is needed", format_size(*.0), format_size(MIN_MEMORY))]
    MemoryTooSmall(u64),
    /// More RAM than the host has.
    #[error("memory size {} exceeds the host's memory ({})", format_size(*.requested), format_size(*.host))]
    MemoryTooLarge {
        /// Requested.
        requested: u64,
        /// The host's total.
        host: u64,
    },
    /// Not a console destination.
    #[error("invalid console `{0}`: expected stdout, off or file:PATH")]
    Console(String),
    /// A route cap of zero.
    #[error("invalid max_entries_per_device {0}: 1 to 65536")]
    MaxEntriesPerDevice(u32),
    #[error("invalid max_routes 0: at least one route is needed")]
    MaxRoutes,
    /// A hypercall rate of zero.
    #[error("invalid hypercall_rate 0: at least one call per second is needed")]
    HypercallRate,
    /// A device setting is wrong.
    #[error("invalid device {0}")]
    Device(String),
    /// An empty `until` text.
    #[error("invalid until: the text to wait for is empty")]
    Until,
    /// A seccomp setting is wrong.
    #[error("{0}")]
    Seccomp(String),
    /// A trace setting is wrong.
    #[error("invalid trace: {0}")]
    Trace(String),
    /// An empty `api_socket` path.
    #[error("invalid api_socket: the path is empty")]
    ApiSocket,
    /// A harness setting other than on or off.
    #[error("invalid harness `{0}`: expected on or off")]
    Harness(String),
    /// A CPU feature this VMM cannot hide.
    #[error("cannot hide CPU feature `{0}`: known are {known}", known = machine::hideable_names())]
    CpuidHide(String),
    /// A snapshot setting without a file, or an empty file name.
    #[error("snapshot_after_ms and snapshot_then need a snapshot file (--snapshot FILE)")]
    SnapshotPath,
    /// Not a snapshot follow-up.
    #[error("invalid snapshot_then `{0}`: expected stop or continue")]
    SnapshotThen(String),
    /// The command line does not fit its page.
    #[error("command line is {0} bytes long; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
}

/// Parses `64M`, `1G`, `512K`, `2T` (binary units, optional `B`/`iB`), or a bare number
/// of MiB.
///
/// # Errors
/// [`ConfigError::Size`].
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let bad = || ConfigError::Size(text.to_string());
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "b" => 0,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// `64 MiB`, `1.5 GiB`, `512 KiB`, `100 B`.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes % size == 0 {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

impl Settings {
    /// Reads a TOML config file.
    ///
    /// # Errors
    /// [`ConfigError::ReadFile`] or [`ConfigError::ParseFile`] (with line and column).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            let place = e.span().map_or_else(String::new, |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            ConfigError::ParseFile {
                path: path.to_path_buf(),
                message: format!("{place}{}", e.message().trim()),
            }
        })
    }

    /// `self`, with every setting `over` has replacing ours.
    #[must_use]
    pub fn overridden_by(self, over: Settings) -> Settings {
        let (machine, run) = self.split();
        let (over_machine, over_run) = over.split();
        Settings::join(
            machine.overridden_by(over_machine),
            RunSettings {
                console: over_run.console.or(run.console),
                watchdog: over_run.watchdog.or(run.watchdog),
                kvm_device: over_run.kvm_device.or(run.kvm_device),
                until: over_run.until.or(run.until),
                snapshot: over_run.snapshot.or(run.snapshot),
                snapshot_after_ms: over_run.snapshot_after_ms.or(run.snapshot_after_ms),
                snapshot_then: over_run.snapshot_then.or(run.snapshot_then),
                api_socket: over_run.api_socket.or(run.api_socket),
                trace: over_run.trace.or(run.trace),
                trace_categories: over_run.trace_categories.or(run.trace_categories),
                trace_limit: over_run.trace_limit.or(run.trace_limit),
                seccomp: over_run.seccomp.or(run.seccomp),
            },
        )
    }

    /// The machine's keys and the run's.
    #[must_use]
    pub fn split(self) -> (MachineSettings, RunSettings) {
        let machine = MachineSettings {
            cpus: self.cpus,
            memory: self.memory,
            kernel: self.kernel,
            cmdline: self.cmdline,
            max_routes: self.max_routes,
            max_entries_per_device: self.max_entries_per_device,
            hypercall_rate: self.hypercall_rate,
            irq_rate: self.irq_rate,
            device: self.device,
            initrd: self.initrd,
            cpuid_hide: self.cpuid_hide,
            harness: self.harness,
            ..MachineSettings::default()
        };
        let run = RunSettings {
            console: self.console,
            watchdog: self.watchdog,
            kvm_device: self.kvm_device,
            until: self.until,
            snapshot: self.snapshot,
            snapshot_after_ms: self.snapshot_after_ms,
            snapshot_then: self.snapshot_then,
            api_socket: self.api_socket,
            trace: self.trace,
            trace_categories: self.trace_categories,
            trace_limit: self.trace_limit,
            seccomp: self.seccomp,
        };
        (machine, run)
    }

    /// One flat table of a machine's and a run's keys.
    fn join(machine: MachineSettings, run: RunSettings) -> Settings {
        Settings {
            cpus: machine.cpus,
            memory: machine.memory,
            kernel: machine.kernel,
            cmdline: machine.cmdline,
            max_routes: machine.max_routes,
            max_entries_per_device: machine.max_entries_per_device,
            hypercall_rate: machine.hypercall_rate,
            irq_rate: machine.irq_rate,
            device: machine.device,
            initrd: machine.initrd,
            cpuid_hide: machine.cpuid_hide,
            harness: machine.harness,
            console: run.console,
            watchdog: run.watchdog,
            kvm_device: run.kvm_device,
            until: run.until,
            snapshot: run.snapshot,
            snapshot_after_ms: run.snapshot_after_ms,
            snapshot_then: run.snapshot_then,
            api_socket: run.api_socket,
            trace: run.trace,
            trace_categories: run.trace_categories,
            trace_limit: run.trace_limit,
            seccomp: run.seccomp,
        }
    }

    /// The validated configuration: defaults, with these settings applied.
    ///
    /// # Errors
    /// Any [`ConfigError`] about a value.
    pub fn resolve(self) -> Result<VmConfig, ConfigError> {
        let (machine, run) = self.split();
        Ok(VmConfig {
            machine: machine.resolve()?,
            run: run.resolve()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("64").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("4096b").unwrap(), 4096);
        for bad in ["", "M", "12Q", "-1M", "1.5G", "99999999999999999T"] {
            assert!(
                matches!(parse_size(bad), Err(ConfigError::Size(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }

    #[test]
    fn machine_settings_resolve_to_the_same_machine() {
        let machine = MachineConfig {
            cpus: 3,
            memory: 96 << 20,
            cmdline: "scenario=ims".into(),
            max_routes: Some(40),
            irq_rate: 0,
            ..MachineConfig::default()
        };
        assert_eq!(machine.settings().resolve().unwrap(), machine);
        let snap = Settings {
            snapshot: Some("x.snap".into()),
            snapshot_after_ms: Some(1500),
            snapshot_then: Some("continue".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap()
        .run
        .snapshot
        .unwrap();
        assert_eq!(
            (snap.after, snap.then),
            (
                Some(std::time::Duration::from_millis(1500)),
                AfterSnapshot::Continue
            )
        );
        for bad in [
            Settings {
                snapshot_after_ms: Some(5),
                ..Settings::default()
            },
            Settings {
                snapshot: Some("x".into()),
                snapshot_then: Some("pause".into()),
                ..Settings::default()
            },
        ] {
            bad.resolve().unwrap_err();
        }
    }

    #[test]
    fn a_file_splits_into_the_machine_and_the_run() {
        let file: Settings = toml::from_str(
            "cpus = 3\nconsole = \"off\"\nwatchdog = 0\nuntil = \"login:\"\nharness = \"off\"\n",
        )
        .unwrap();
        let (machine, run) = file.clone().split();
        assert_eq!(
            (machine.cpus, machine.harness.as_deref()),
            (Some(3), Some("off"))
        );
        assert_eq!(
            (run.console.as_deref(), run.watchdog, run.until.as_deref()),
            (Some("off"), Some(0), Some("login:"))
        );
        let config = file.resolve().unwrap();
        assert_eq!((config.machine.cpus, config.machine.harness), (3, false));
        assert_eq!(
            (&config.run.console, config.run.watchdog),
            (&Console::Off, None)
        );
    }

    #[test]
    fn a_machine_header_refuses_a_run_setting_and_reads_older_nulls() {
        let json = serde_json::to_string(&MachineConfig::default().settings()).unwrap();
        assert!(!json.contains("console"), "{json}");
        let older = r#"{"cpus":2,"memory":"67108864b","kernel":null,"cmdline":"","console":null,"watchdog":null,"kvm_device":null,"max_routes":null,"hypercall_rate":200000,"irq_rate":200000,"device":[{"kind":"ims-slots","slots":2048,"queues":2048,"contexts":null,"command_timeout_ms":null,"pci_slot":3}]}"#;
        let machine: MachineSettings = serde_json::from_str(older).unwrap();
        assert_eq!(
            machine.device,
            Some(vec![DeviceSetting::ImsSlots {
                slots: Some(2048),
                queues: Some(2048),
                pci_slot: Some(3)
            }])
        );
        for run_key in ["console", "watchdog", "kvm_device", "snapshot", "until"] {
            let err = serde_json::from_str::<MachineSettings>(&format!(r#"{{"{run_key}":5}}"#))
                .unwrap_err()
                .to_string();
            assert!(err.contains("settings of a run"), "{run_key}: {err}");
        }
        serde_json::from_str::<MachineSettings>(r#"{"snapshot_then":"stop"}"#).unwrap_err();
    }

    #[test]
    fn defaults_resolve_to_the_demo_machine() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c, VmConfig::default());
        assert_eq!(
            (c.machine.cpus, c.machine.memory, &c.machine.kernel),
            (2, 64 << 20, &Kernel::BuiltIn)
        );
    }

    #[test]
    fn flags_override_the_file() {
        let file: Settings = toml::from_str("cpus = 4\nmemory = 128\nwatchdog = 0\n").unwrap();
        let flags = Settings {
            cpus: Some(8),
            ..Default::default()
        };
        let c = file.overridden_by(flags).resolve().unwrap();
        assert_eq!(
            (c.machine.cpus, c.machine.memory, c.run.watchdog),
            (8, 128 << 20, None)
        );
    }

    #[test]
    fn storm_control_is_on_by_default_and_can_be_set_or_turned_off() {
        assert_eq!(MachineConfig::default().irq_rate, DEFAULT_IRQ_RATE);
        let file: Settings = toml::from_str("irq_rate = 5000\n").unwrap();
        assert_eq!(file.clone().resolve().unwrap().machine.irq_rate, 5000);
        let off = Settings {
            irq_rate: Some(0),
            ..Default::default()
        };
        assert_eq!(
            file.overridden_by(off).resolve().unwrap().machine.irq_rate,
            0
        );
    }

    #[test]
    fn bad_values_are_refused_with_their_reason() {
        let resolve = |s: Settings| s.resolve().unwrap_err().to_string();
        assert_eq!(
            resolve(Settings {
                cpus: Some(0),
                ..Default::default()
            }),
            "invalid vCPU count 0: must be between 1 and 512"
        );
        let small = Settings {
            memory: Some(SizeSetting::Text("1M".into())),
            ..Default::default()
        };
        assert_eq!(
            resolve(small),
            "memory size 1 MiB is too small: at least 4 MiB is needed"
        );
        let huge = Settings {
            memory: Some(SizeSetting::Text("64T".into())),
            ..Default::default()
        };
        assert!(resolve(huge).starts_with("memory size 64 TiB exceeds the host's memory"));
        let odd = Settings {
            memory: Some(SizeSetting::Text("4097K".into())),
            ..Default::default()
        };
        assert!(resolve(odd).contains("multiple of 4 KiB"));
        let console = Settings {
            console: Some("tty".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(console),
            "invalid console `tty`: expected stdout, off or file:PATH"
        );
        let long = Settings {
            cmdline: Some("x".repeat(5000)),
            ..Default::default()
        };
        assert!(resolve(long).contains("at most 4095"));
    }

    #[test]
    fn unknown_keys_in_a_file_name_the_line() {
        let dir = std::env::temp_dir().join(format!("vmm-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "cpus = 2\ncpu = 4\n").unwrap();
        let err = Settings::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2, column 1: unknown field `cpu`"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let missing = Settings::from_file(&dir.join("none.toml")).unwrap_err();
        assert!(matches!(missing, ConfigError::ReadFile { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn consoles_parse() {
        assert_eq!("stdout".parse::<Console>().unwrap(), Console::Stdout);
        assert_eq!("off".parse::<Console>().unwrap(), Console::Off);
        assert_eq!(
            "file:/tmp/x".parse::<Console>().unwrap(),
            Console::File("/tmp/x".into())
        );
        "file:".parse::<Console>().unwrap_err();
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "a table of refused settings")]
    fn devices_default_parse_and_are_checked() {
        assert_eq!(
            Settings::default().resolve().unwrap().machine.devices,
            DeviceConfig::defaults()
        );
        let file: Settings = toml::from_str(
            "[[device]]\nkind = \"ims-queues\"\ncontexts = 8\n[[device]]\nkind = \"ims-slots\"\nslots = 100\npci_slot = 3\n",
        )
        .unwrap();
        let devices = file.resolve().unwrap().machine.devices;
        assert_eq!(
            devices,
            vec![
                DeviceConfig {
                    kind: DeviceKind::ImsQueues {
                        contexts: 8,
                        command_timeout_ms: DEFAULT_COMMAND_TIMEOUT_MS
                    },
                    pci_slot: 4
                },
                DeviceConfig {
                    kind: DeviceKind::ImsSlots {
                        slots: 100,
                        queues: 100
                    },
                    pci_slot: 3
                },
            ]
        );
        let none: Settings = toml::from_str("device = []\n").unwrap();
        assert!(none.resolve().unwrap().machine.devices.is_empty());
        let spec: DeviceSetting = "ims-slots,slots=32768,queues=16,pci_slot=9"
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            DeviceSetting::ImsSlots {
                slots: Some(32768),
                queues: Some(16),
                pci_slot: Some(9)
            }
        );
        for (bad, why) in [
            (
                "ims-slots,slots=40000",
                "slots 40000 must be between 1 and 32768",
            ),
            (
                "ims-slots,slots=4,queues=5",
                "queues 5 must be between 1 and the slots (4)",
            ),
            (
                "ims-slots,contexts=4",
                "contexts and command_timeout_ms are for ims-queues",
            ),
            ("ims-queues,queues=4", "slots and queues are for ims-slots"),
            (
                "ims-queues,contexts=0",
                "contexts 0 must be between 1 and 4096",
            ),
            (
                "ims-queues,command_timeout_ms=0",
                "command_timeout_ms must be at least 1",
            ),
            ("nic", "unknown device kind `nic`"),
            (
                "ims-slots,pci_slot=0",
                "pci_slot 0 must be between 1 and 31",
            ),
            ("vfio-user", "needs socket=PATH"),
            (
                "vfio-user,socket=/s,slots=4",
                "a vfio-user device takes socket and pci_slot only",
            ),
            ("ims-slots,socket=/s", "socket is for vfio-user"),
        ] {
            // A kind's own keys are checked when the setting is read; values when the
            // machine is resolved.
            let err = match bad.parse::<DeviceSetting>() {
                Err(e) => e.to_string(),
                Ok(setting) => Settings {
                    device: Some(vec![setting]),
                    ..Default::default()
                }
                .resolve()
                .unwrap_err()
                .to_string(),
            };
            assert!(err.contains(why), "{bad}: {err}");
        }
        let remote = Settings {
            device: Some(vec!["vfio-user,socket=/run/gpio.sock,pci_slot=6"
                .parse()
                .unwrap()]),
            ..Default::default()
        };
        assert_eq!(
            remote.resolve().unwrap().machine.devices,
            vec![DeviceConfig {
                kind: DeviceKind::VfioUser {
                    socket: "/run/gpio.sock".into()
                },
                pci_slot: 6
            }]
        );
        "ims-slots,slots".parse::<DeviceSetting>().unwrap_err();
        "ims-slots,colour=red".parse::<DeviceSetting>().unwrap_err();
        "ims-slots,slots=x".parse::<DeviceSetting>().unwrap_err();
        let err = toml::from_str::<Settings>("[[device]]\nkind = \"ims-queues\"\nslots = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("slots and queues are for ims-slots"), "{err}");
        let err = toml::from_str::<Settings>("[[device]]\nkind = \"ims-slots\"\ncolour = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let twice = Settings {
            device: Some(vec![
                "ims-slots,pci_slot=5".parse().unwrap(),
                "ims-queues,pci_slot=5".parse().unwrap(),
            ]),
            ..Default::default()
        };
        assert!(twice
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("two devices"));
    }
}
