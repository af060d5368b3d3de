//! What a VM is made of, from defaults, a TOML file and command-line flags (in that order
//! of precedence, lowest first), validated before anything is created.
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

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::CMDLINE_MAX;

/// vCPUs when nothing says otherwise.
pub const DEFAULT_CPUS: u32 = 2;
/// Guest RAM when nothing says otherwise.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Watchdog when nothing says otherwise.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(30);
/// Most vCPUs: what the boot protocol describes. Above 255 the guest must use x2APIC, and
/// interrupts reach those vCPUs only through remapping in x2APIC mode (EIM) or x2APIC
/// MSIs; the VMM turns on KVM's 32-bit APIC IDs for them.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the boot protocol's 512, checked below"
)]
pub const MAX_CPUS: u32 = hypercall::boot::MAX_CPUS as u32;
const _: () = assert!(MAX_CPUS as usize == hypercall::boot::MAX_CPUS);
/// Least guest RAM: the boot structures, an image and a few vCPU stacks.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Hypercalls per second per VM when nothing says otherwise.
pub const DEFAULT_HYPERCALL_RATE: u32 = 200_000;
/// Interrupts per second from one remapping entry before the rest are coalesced.
pub const DEFAULT_IRQ_RATE: u32 = 200_000;
mod devices;

use devices::resolve_devices;
pub use devices::*;

/// The image to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// The test guest built with this VMM (`resources/guest`).
    BuiltIn,
    /// A 64-bit ELF executable following the boot protocol of `hypercall::boot`, or a
    /// Linux bzImage (told apart by its header), booted with the Linux boot protocol.
    Elf(PathBuf),
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// Standard output.
    Stdout,
    /// Nowhere.
    Off,
    /// A file (created or truncated).
    File(PathBuf),
}

impl FromStr for Console {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(ConfigError::Console(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => write!(f, "stdout"),
            Self::Off => write!(f, "off"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// What a VM does after taking its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSnapshot {
    /// It stops; the run ends with the snapshot (restore it to go on).
    #[default]
    Stop,
    /// It goes on running.
    Continue,
}

/// When and where a running VM takes a snapshot of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPlan {
    /// The file (written whole under a temporary name, then renamed).
    pub path: PathBuf,
    /// When, from the start of the run (or of the restored run); `None`: only when the
    /// guest asks (the harness `SNAPSHOT` request). The first of the two takes it.
    pub after: Option<Duration>,
    /// What the VM does afterwards.
    pub then: AfterSnapshot,
}

fn hideable_names() -> String {
    crate::cpuid::HIDEABLE
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn resolve_cpuid_hide(names: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::new();
    for name in names.unwrap_or_default() {
        let name = name.trim().to_ascii_lowercase();
        if crate::cpuid::hideable(&name).is_none() {
            return Err(ConfigError::CpuidHide(name));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

fn resolve_snapshot(
    path: Option<PathBuf>,
    after_ms: Option<u64>,
    then: Option<String>,
) -> Result<Option<SnapshotPlan>, ConfigError> {
    let then = match then.as_deref() {
        None | Some("stop") => AfterSnapshot::Stop,
        Some("continue") => AfterSnapshot::Continue,
        Some(other) => return Err(ConfigError::SnapshotThen(other.to_string())),
    };
    match path {
        Some(path) if !path.as_os_str().is_empty() => Ok(Some(SnapshotPlan {
            path,
            after: after_ms.map(Duration::from_millis),
            then,
        })),
        Some(_) => Err(ConfigError::SnapshotPath),
        None if after_ms.is_some() || then != AfterSnapshot::Stop => Err(ConfigError::SnapshotPath),
        None => Ok(None),
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (1 to [`MAX_CPUS`]).
    pub cpus: u32,
    /// Bytes of guest RAM (a multiple of 4 KiB, at least [`MIN_MEMORY`]).
    pub memory: u64,
    /// The image.
    pub kernel: Kernel,
    /// The command line handed to the guest.
    pub cmdline: String,
    /// Console output.
    pub console: Console,
    /// How long the guest may run without a verdict; `None` for ever.
    pub watchdog: Option<Duration>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Cap on the KVM MSI routes the VM uses (`None`: KVM's limit).
    pub max_routes: Option<u32>,
    /// Hypercalls per second before the VM is throttled with `BUSY`.
    pub hypercall_rate: u32,
    /// Interrupts per second from one remapping entry before the rest are coalesced
    /// (storm control; 0: no limit).
    pub irq_rate: u32,
    /// PCI devices.
    pub devices: Vec<DeviceConfig>,
    /// Whether, when and where the VM takes a snapshot of itself.
    pub snapshot: Option<SnapshotPlan>,
    /// CPU features hidden from the guest (names from [`crate::cpuid::HIDEABLE`]).
    pub cpuid_hide: Vec<String>,
    /// An initial ramdisk for a Linux kernel.
    pub initrd: Option<PathBuf>,
    /// Text on the console at which the run stops with success (for guests that never
    /// report a verdict, such as a stock kernel).
    pub until: Option<String>,
    /// The test harness (docs/boot-protocol.md): its doorbell, mailbox, requester IDs and
    /// fault injection exist only when this is on. On by default for the built-in test
    /// guest, off for any other image.
    pub harness: bool,
}

impl VmConfig {
    /// The settings that make this machine (what a snapshot keeps): vCPUs, memory,
    /// image, command line, interrupt limits and devices; not where the console goes,
    /// the watchdog, the KVM device or snapshots, which belong to a run.
    #[must_use]
    pub fn machine_settings(&self) -> Settings {
        Settings {
            cpus: Some(self.cpus),
            memory: Some(SizeSetting::Text(format!("{}b", self.memory))),
            kernel: match &self.kernel {
                Kernel::BuiltIn => None,
                Kernel::Elf(path) => Some(path.clone()),
            },
            cmdline: Some(self.cmdline.clone()),
            max_routes: self.max_routes,
            hypercall_rate: Some(self.hypercall_rate),
            irq_rate: Some(self.irq_rate),
            device: Some(self.devices.iter().map(DeviceConfig::setting).collect()),
            cpuid_hide: (!self.cpuid_hide.is_empty()).then(|| self.cpuid_hide.clone()),
            harness: Some(on_off(self.harness).to_string()),
            ..Settings::default()
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: DEFAULT_CPUS,
            memory: DEFAULT_MEMORY,
            kernel: Kernel::BuiltIn,
            cmdline: String::new(),
            console: Console::Stdout,
            watchdog: Some(DEFAULT_WATCHDOG),
            kvm_device: PathBuf::from("/dev/kvm"),
            max_routes: None,
            hypercall_rate: DEFAULT_HYPERCALL_RATE,
            irq_rate: DEFAULT_IRQ_RATE,
            devices: DeviceConfig::defaults(),
            snapshot: None,
            cpuid_hide: Vec::new(),
            initrd: None,
            until: None,
            harness: true,
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// Settings as written in a config file or given as flags; every one optional.
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
    /// A harness setting other than on or off.
    #[error("invalid harness `{0}`: expected on or off")]
    Harness(String),
    /// A CPU feature this VMM cannot hide.
    #[error("cannot hide CPU feature `{0}`: known are {known}", known = hideable_names())]
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
        Settings {
            cpus: over.cpus.or(self.cpus),
            memory: over.memory.or(self.memory),
            kernel: over.kernel.or(self.kernel),
            cmdline: over.cmdline.or(self.cmdline),
            console: over.console.or(self.console),
            watchdog: over.watchdog.or(self.watchdog),
            kvm_device: over.kvm_device.or(self.kvm_device),
            max_routes: over.max_routes.or(self.max_routes),
            hypercall_rate: over.hypercall_rate.or(self.hypercall_rate),
            irq_rate: over.irq_rate.or(self.irq_rate),
            device: over.device.or(self.device),
            snapshot: over.snapshot.or(self.snapshot),
            snapshot_after_ms: over.snapshot_after_ms.or(self.snapshot_after_ms),
            snapshot_then: over.snapshot_then.or(self.snapshot_then),
            cpuid_hide: over.cpuid_hide.or(self.cpuid_hide),
            initrd: over.initrd.or(self.initrd),
            until: over.until.or(self.until),
            harness: over.harness.or(self.harness),
        }
    }

    /// The validated configuration: defaults, with these settings applied.
    ///
    /// # Errors
    /// Any [`ConfigError`] about a value.
    pub fn resolve(self) -> Result<VmConfig, ConfigError> {
        let defaults = VmConfig::default();
        let cpus = self.cpus.unwrap_or(defaults.cpus);
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(cpus));
        }
        let memory = match self.memory {
            None => defaults.memory,
            Some(SizeSetting::Text(t)) => parse_size(&t)?,
            Some(SizeSetting::MiB(n)) => n
                .checked_mul(1 << 20)
                .ok_or_else(|| ConfigError::Size(n.to_string()))?,
        };
        if memory % 4096 != 0 {
            return Err(ConfigError::SizeAlignment(memory));
        }
        if memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(memory));
        }
        if let Some(host) = crate::memory::host_memory() {
            if memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: memory,
                    host,
                });
            }
        }
        let cmdline = self.cmdline.unwrap_or(defaults.cmdline);
        if cmdline.len() > CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        let console = match self.console {
            Some(text) => text.parse()?,
            None => defaults.console,
        };
        let kernel = self.kernel.map_or(Kernel::BuiltIn, Kernel::Elf);
        let harness = match self.harness.as_deref() {
            None => kernel == Kernel::BuiltIn,
            Some("on") => true,
            Some("off") => false,
            Some(other) => return Err(ConfigError::Harness(other.to_string())),
        };
        Ok(VmConfig {
            cpus,
            memory,
            kernel,
            harness,
            cmdline,
            console,
            watchdog: match self.watchdog {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => defaults.watchdog,
            },
            kvm_device: self.kvm_device.unwrap_or(defaults.kvm_device),
            max_routes: match self.max_routes {
                Some(0) => return Err(ConfigError::MaxRoutes),
                other => other,
            },
            hypercall_rate: match self.hypercall_rate {
                Some(0) => return Err(ConfigError::HypercallRate),
                Some(n) => n,
                None => defaults.hypercall_rate,
            },
            irq_rate: self.irq_rate.unwrap_or(defaults.irq_rate),
            devices: resolve_devices(self.device)?,
            snapshot: resolve_snapshot(self.snapshot, self.snapshot_after_ms, self.snapshot_then)?,
            cpuid_hide: resolve_cpuid_hide(self.cpuid_hide)?,
            initrd: self.initrd,
            until: match self.until {
                Some(text) if text.is_empty() => return Err(ConfigError::Until),
                other => other,
            },
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
        let config = VmConfig {
            cpus: 3,
            memory: 96 << 20,
            cmdline: "scenario=ims".into(),
            max_routes: Some(40),
            irq_rate: 0,
            ..VmConfig::default()
        };
        let again = config.machine_settings().resolve().unwrap();
        assert_eq!(again, config);
        let snap = Settings {
            snapshot: Some("x.snap".into()),
            snapshot_after_ms: Some(1500),
            snapshot_then: Some("continue".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap()
        .snapshot
        .unwrap();
        assert_eq!(
            (snap.after, snap.then),
            (Some(Duration::from_millis(1500)), AfterSnapshot::Continue)
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
    fn defaults_resolve_to_the_demo_machine() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c, VmConfig::default());
        assert_eq!(
            (c.cpus, c.memory, &c.kernel),
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
        assert_eq!((c.cpus, c.memory, c.watchdog), (8, 128 << 20, None));
    }

    #[test]
    fn storm_control_is_on_by_default_and_can_be_set_or_turned_off() {
        assert_eq!(VmConfig::default().irq_rate, DEFAULT_IRQ_RATE);
        let file: Settings = toml::from_str("irq_rate = 5000\n").unwrap();
        assert_eq!(file.clone().resolve().unwrap().irq_rate, 5000);
        let off = Settings {
            irq_rate: Some(0),
            ..Default::default()
        };
        assert_eq!(file.overridden_by(off).resolve().unwrap().irq_rate, 0);
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
    fn devices_default_parse_and_are_checked() {
        assert_eq!(
            Settings::default().resolve().unwrap().devices,
            DeviceConfig::defaults()
        );
        let file: Settings = toml::from_str(
            "[[device]]\nkind = \"ims-queues\"\ncontexts = 8\n[[device]]\nkind = \"ims-slots\"\nslots = 100\npci_slot = 3\n",
        )
        .unwrap();
        let devices = file.resolve().unwrap().devices;
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
        assert!(none.resolve().unwrap().devices.is_empty());
        let spec: DeviceSetting = "ims-slots,slots=32768,queues=16,pci_slot=9"
            .parse()
            .unwrap();
        assert_eq!(
            (spec.slots, spec.queues, spec.pci_slot),
            (Some(32768), Some(16), Some(9))
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
        ] {
            let setting: DeviceSetting = bad.parse().unwrap();
            let err = Settings {
                device: Some(vec![setting]),
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        "ims-slots,slots".parse::<DeviceSetting>().unwrap_err();
        "ims-slots,colour=red".parse::<DeviceSetting>().unwrap_err();
        "ims-slots,slots=x".parse::<DeviceSetting>().unwrap_err();
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
