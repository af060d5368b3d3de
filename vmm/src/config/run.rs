//! A run: where the console goes, how long the guest may take, which KVM device, when
//! to stop and when to take a snapshot. None of it is part of the machine: a restored
//! snapshot takes these from the run that restores it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::ConfigError;

/// Watchdog when nothing says otherwise.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(30);

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

/// A validated run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Console output.
    pub console: Console,
    /// How long the guest may run without a verdict; `None` for ever.
    pub watchdog: Option<Duration>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Whether, when and where the VM takes a snapshot of itself.
    pub snapshot: Option<SnapshotPlan>,
    /// Text on the console at which the run stops with success (for guests that never
    /// report a verdict, such as a stock kernel).
    pub until: Option<String>,
    /// Where the control API listens (`docs/api.md`), if anywhere.
    pub api_socket: Option<PathBuf>,
    /// The interrupt event trace, if any.
    pub trace: Option<crate::trace::TracePlan>,
    /// The seccomp filters of the VM's threads.
    pub seccomp: crate::seccomp::SeccompMode,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            console: Console::Stdout,
            watchdog: Some(DEFAULT_WATCHDOG),
            kvm_device: PathBuf::from("/dev/kvm"),
            snapshot: None,
            until: None,
            api_socket: None,
            trace: None,
            seccomp: crate::seccomp::SeccompMode::On,
        }
    }
}

/// The run's part of a config file's settings, every one optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSettings {
    /// `stdout`, `off` or `file:PATH`.
    pub console: Option<String>,
    /// Watchdog in seconds; 0 disables it.
    pub watchdog: Option<u64>,
    /// KVM device node.
    pub kvm_device: Option<PathBuf>,
    /// Console text at which the run stops with success.
    pub until: Option<String>,
    /// Where a snapshot of the VM goes.
    pub snapshot: Option<PathBuf>,
    /// Milliseconds after the start at which the snapshot is taken.
    pub snapshot_after_ms: Option<u64>,
    /// What the VM does after its snapshot: `stop` (the default) or `continue`.
    pub snapshot_then: Option<String>,
    /// The control API's socket.
    pub api_socket: Option<PathBuf>,
    /// The trace's output (`-`: stdout).
    pub trace: Option<String>,
    /// Its categories.
    pub trace_categories: Option<String>,
    /// Its events per category per second.
    pub trace_limit: Option<u32>,
    /// `on`, `log` or `off`.
    pub seccomp: Option<String>,
}

impl RunSettings {
    /// The validated run: defaults, with these settings applied.
    ///
    /// # Errors
    /// Any [`ConfigError`] about a run's value.
    pub fn resolve(self) -> Result<RunConfig, ConfigError> {
        let defaults = RunConfig::default();
        Ok(RunConfig {
            console: match self.console {
                Some(text) => text.parse()?,
                None => defaults.console,
            },
            watchdog: match self.watchdog {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => defaults.watchdog,
            },
            kvm_device: self.kvm_device.unwrap_or(defaults.kvm_device),
            snapshot: resolve_snapshot(self.snapshot, self.snapshot_after_ms, self.snapshot_then)?,
            until: match self.until {
                Some(text) if text.is_empty() => return Err(ConfigError::Until),
                other => other,
            },
            api_socket: match self.api_socket {
                Some(path) if path.as_os_str().is_empty() => return Err(ConfigError::ApiSocket),
                other => other,
            },
            trace: match self.trace {
                Some(output) => Some(
                    crate::trace::TracePlan::new(
                        &output,
                        self.trace_categories.as_deref(),
                        self.trace_limit,
                    )
                    .map_err(ConfigError::Trace)?,
                ),
                None if self.trace_categories.is_some() || self.trace_limit.is_some() => {
                    return Err(ConfigError::Trace(
                        "trace_categories and trace_limit need a trace output (--trace PATH)"
                            .into(),
                    ))
                }
                None => None,
            },
            seccomp: match self.seccomp {
                Some(text) => text.parse().map_err(ConfigError::Seccomp)?,
                None => defaults.seccomp,
            },
        })
    }
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
