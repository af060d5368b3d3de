//! PCI devices in the configuration: the `[[device]]` settings and `--device SPEC`, and
//! the resolved device list (kinds, sizes, slots).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Slots of the default slot-array IMS device.
pub const DEFAULT_IMS_SLOTS: u32 = 2048;
/// Queue contexts of the default queue-memory IMS device.
pub const DEFAULT_IMS_CONTEXTS: u32 = 64;
/// Admin command timeout of a queue-memory device when nothing says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT_MS: u32 = 1000;

/// What kind of PCI device, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// A slot-array IMS device (`devices::ims::slots`).
    ImsSlots {
        /// Message slots.
        slots: u32,
        /// Work queues.
        queues: u32,
    },
    /// A queue-memory IMS device (`devices::ims::queues`).
    ImsQueues {
        /// Queue contexts.
        contexts: u32,
        /// Admin command timeout in milliseconds.
        command_timeout_ms: u32,
    },
    /// A device served by another process over vfio-user (`crate::vfio_user`).
    VfioUser {
        /// The server's socket.
        socket: PathBuf,
    },
}

/// A PCI device of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// What it is.
    pub kind: DeviceKind,
    /// Its device number on bus 0 (function 0): requester ID `pci_slot << 3`.
    pub pci_slot: u8,
}

impl DeviceConfig {
    /// Its PCI requester ID (the source-id of its interrupts).
    #[must_use]
    pub fn requester_id(&self) -> u16 {
        u16::from(self.pci_slot) << 3
    }

    /// The setting that resolves to this device.
    #[must_use]
    pub fn setting(&self) -> DeviceSetting {
        let pci_slot = Some(self.pci_slot);
        match self.kind.clone() {
            DeviceKind::VfioUser { socket } => DeviceSetting::VfioUser {
                socket: Some(socket),
                pci_slot,
            },
            DeviceKind::ImsSlots { slots, queues } => DeviceSetting::ImsSlots {
                slots: Some(slots),
                queues: Some(queues),
                pci_slot,
            },
            DeviceKind::ImsQueues {
                contexts,
                command_timeout_ms,
            } => DeviceSetting::ImsQueues {
                contexts: Some(contexts),
                command_timeout_ms: Some(command_timeout_ms),
                pci_slot,
            },
        }
    }

    /// The devices of a VM whose configuration lists none.
    #[must_use]
    pub fn defaults() -> Vec<DeviceConfig> {
        vec![
            DeviceConfig {
                kind: DeviceKind::ImsSlots {
                    slots: DEFAULT_IMS_SLOTS,
                    queues: DEFAULT_IMS_SLOTS,
                },
                pci_slot: 3,
            },
            DeviceConfig {
                kind: DeviceKind::ImsQueues {
                    contexts: DEFAULT_IMS_CONTEXTS,
                    command_timeout_ms: DEFAULT_COMMAND_TIMEOUT_MS,
                },
                pci_slot: 4,
            },
        ]
    }
}

impl fmt::Display for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DeviceKind::VfioUser { socket } => write!(
                f,
                "00:{:02x}.0 vfio-user ({})",
                self.pci_slot,
                socket.display()
            ),
            DeviceKind::ImsSlots { slots, queues } => write!(
                f,
                "00:{:02x}.0 ims-slots ({slots} slots, {queues} queues)",
                self.pci_slot
            ),
            DeviceKind::ImsQueues { contexts, .. } => write!(
                f,
                "00:{:02x}.0 ims-queues ({contexts} contexts)",
                self.pci_slot
            ),
        }
    }
}

/// A device as written in a config file (`[[device]]`, told apart by its `kind`) or given
/// with `--device`; what is absent takes its default when resolved.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "DeviceFields", into = "DeviceFields")]
pub enum DeviceSetting {
    /// `kind = "ims-slots"`: a slot-array IMS device.
    ImsSlots {
        /// Message slots.
        slots: Option<u32>,
        /// Work queues.
        queues: Option<u32>,
        /// Device number on bus 0.
        pci_slot: Option<u8>,
    },
    /// `kind = "ims-queues"`: a queue-memory IMS device.
    ImsQueues {
        /// Queue contexts.
        contexts: Option<u32>,
        /// Admin command timeout in milliseconds.
        command_timeout_ms: Option<u32>,
        /// Device number on bus 0.
        pci_slot: Option<u8>,
    },
    /// `kind = "vfio-user"`: a device another process serves over vfio-user.
    VfioUser {
        /// The server's socket (required).
        socket: Option<PathBuf>,
        /// Device number on bus 0.
        pci_slot: Option<u8>,
    },
}

impl DeviceSetting {
    /// The `kind` that names it.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ImsSlots { .. } => "ims-slots",
            Self::ImsQueues { .. } => "ims-queues",
            Self::VfioUser { .. } => "vfio-user",
        }
    }

    /// The device number asked for.
    #[must_use]
    pub fn pci_slot(&self) -> Option<u8> {
        match *self {
            Self::ImsSlots { pci_slot, .. }
            | Self::ImsQueues { pci_slot, .. }
            | Self::VfioUser { pci_slot, .. } => pci_slot,
        }
    }
}

/// A device's settings as they are written: one flat table whose `kind` says which
/// other keys belong (snapshots of format 2 also carry the other kinds' keys as `null`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DeviceFields {
    kind: String,
    slots: Option<u32>,
    queues: Option<u32>,
    contexts: Option<u32>,
    command_timeout_ms: Option<u32>,
    pci_slot: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<PathBuf>,
}

impl TryFrom<DeviceFields> for DeviceSetting {
    type Error = ConfigError;

    fn try_from(d: DeviceFields) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Device(format!("{}: {why}", d.kind));
        if d.socket.is_some() && d.kind != "vfio-user" {
            return Err(bad("socket is for vfio-user"));
        }
        match d.kind.as_str() {
            "vfio-user"
                if d.slots.is_some()
                    || d.queues.is_some()
                    || d.contexts.is_some()
                    || d.command_timeout_ms.is_some() =>
            {
                Err(bad("a vfio-user device takes socket and pci_slot only"))
            }
            "vfio-user" => Ok(Self::VfioUser {
                socket: d.socket,
                pci_slot: d.pci_slot,
            }),
            "ims-slots" if d.contexts.is_some() || d.command_timeout_ms.is_some() => {
                Err(bad("contexts and command_timeout_ms are for ims-queues"))
            }
            "ims-slots" => Ok(Self::ImsSlots {
                slots: d.slots,
                queues: d.queues,
                pci_slot: d.pci_slot,
            }),
            "ims-queues" if d.slots.is_some() || d.queues.is_some() => {
                Err(bad("slots and queues are for ims-slots"))
            }
            "ims-queues" => Ok(Self::ImsQueues {
                contexts: d.contexts,
                command_timeout_ms: d.command_timeout_ms,
                pci_slot: d.pci_slot,
            }),
            other => Err(ConfigError::Device(format!(
                "unknown device kind `{other}` (ims-slots, ims-queues, vfio-user)"
            ))),
        }
    }
}

impl From<DeviceSetting> for DeviceFields {
    fn from(d: DeviceSetting) -> Self {
        let kind = d.kind().to_string();
        match d {
            DeviceSetting::ImsSlots {
                slots,
                queues,
                pci_slot,
            } => DeviceFields {
                kind,
                slots,
                queues,
                pci_slot,
                ..DeviceFields::default()
            },
            DeviceSetting::ImsQueues {
                contexts,
                command_timeout_ms,
                pci_slot,
            } => DeviceFields {
                kind,
                contexts,
                command_timeout_ms,
                pci_slot,
                ..DeviceFields::default()
            },
            DeviceSetting::VfioUser { socket, pci_slot } => DeviceFields {
                kind,
                socket,
                pci_slot,
                ..DeviceFields::default()
            },
        }
    }
}

impl FromStr for DeviceSetting {
    type Err = ConfigError;

    /// `KIND[,KEY=VALUE]...`, e.g. `ims-slots,slots=4096,queues=64,pci_slot=5` or
    /// `vfio-user,socket=/run/dev.sock`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut parts = s.split(',');
        let mut d = DeviceFields {
            kind: parts.next().unwrap_or_default().trim().to_string(),
            ..Default::default()
        };
        let bad = |why: &str| ConfigError::Device(format!("`{s}`: {why}"));
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("`{part}` is not KEY=VALUE")))?;
            let n = |v: &str| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| bad(&format!("{key} `{v}` is not a number")))
            };
            match key.trim() {
                "socket" if !value.is_empty() => d.socket = Some(PathBuf::from(value)),
                "slots" => d.slots = Some(n(value)?),
                "queues" => d.queues = Some(n(value)?),
                "contexts" => d.contexts = Some(n(value)?),
                "command_timeout_ms" => d.command_timeout_ms = Some(n(value)?),
                "pci_slot" => {
                    d.pci_slot = Some(
                        u8::try_from(n(value)?)
                            .map_err(|_| bad("pci_slot must be between 1 and 31"))?,
                    );
                }
                other => return Err(bad(&format!("unknown key `{other}`"))),
            }
        }
        d.try_into()
    }
}

/// Checks device settings and gives each a PCI slot.
pub(super) fn resolve_devices(
    settings: Option<Vec<DeviceSetting>>,
) -> Result<Vec<DeviceConfig>, ConfigError> {
    let Some(settings) = settings else {
        return Ok(DeviceConfig::defaults());
    };
    let mut taken = [false; 32];
    for d in &settings {
        if let Some(slot) = d.pci_slot() {
            if !(1..=31).contains(&slot) {
                return Err(ConfigError::Device(format!(
                    "{}: pci_slot {slot} must be between 1 and 31 (0 is the host bridge)",
                    d.kind()
                )));
            }
            let Some(cell) = taken.get_mut(usize::from(slot)) else {
                continue;
            };
            if std::mem::replace(cell, true) {
                return Err(ConfigError::Device(format!(
                    "pci_slot {slot} is given to two devices"
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(settings.len());
    for d in settings {
        let kind = resolve_kind(&d)?;
        let pci_slot = match d.pci_slot() {
            Some(slot) => slot,
            None => {
                let free = taken
                    .iter_mut()
                    .enumerate()
                    .skip(3)
                    .find(|(_, t)| !**t)
                    .map(|(i, t)| {
                        *t = true;
                        i
                    })
                    .ok_or_else(|| {
                        ConfigError::Device("more devices than free PCI slots".into())
                    })?;
                u8::try_from(free).unwrap_or(31)
            }
        };
        out.push(DeviceConfig { kind, pci_slot });
    }
    Ok(out)
}

/// A device's kind and sizes, defaults filled in and ranges checked.
fn resolve_kind(d: &DeviceSetting) -> Result<DeviceKind, ConfigError> {
    let bad = |why: String| ConfigError::Device(format!("{}: {why}", d.kind()));
    match d {
        DeviceSetting::VfioUser { socket, .. } => {
            let socket = socket
                .clone()
                .ok_or_else(|| bad("needs socket=PATH".into()))?;
            Ok(DeviceKind::VfioUser { socket })
        }
        &DeviceSetting::ImsSlots { slots, queues, .. } => {
            let max = devices::ims::slots::MAX_SLOTS;
            let slots = slots.unwrap_or(DEFAULT_IMS_SLOTS);
            if !(1..=max).contains(&slots) {
                return Err(bad(format!("slots {slots} must be between 1 and {max}")));
            }
            let queues = queues.unwrap_or(slots.min(DEFAULT_IMS_SLOTS));
            if !(1..=slots).contains(&queues) {
                return Err(bad(format!(
                    "queues {queues} must be between 1 and the slots ({slots})"
                )));
            }
            Ok(DeviceKind::ImsSlots { slots, queues })
        }
        &DeviceSetting::ImsQueues {
            contexts,
            command_timeout_ms,
            ..
        } => {
            let max = devices::ims::queues::MAX_CONTEXTS;
            let contexts = contexts.unwrap_or(DEFAULT_IMS_CONTEXTS);
            if !(1..=max).contains(&contexts) {
                return Err(bad(format!(
                    "contexts {contexts} must be between 1 and {max}"
                )));
            }
            let command_timeout_ms = command_timeout_ms.unwrap_or(DEFAULT_COMMAND_TIMEOUT_MS);
            if command_timeout_ms == 0 {
                return Err(bad("command_timeout_ms must be at least 1".into()));
            }
            Ok(DeviceKind::ImsQueues {
                contexts,
                command_timeout_ms,
            })
        }
    }
}
