//! PCI devices in the configuration: the `[[device]]` settings and `--device SPEC`, and
//! the resolved device list (kinds, sizes, slots).

use std::fmt;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// A PCI device of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let mut d = DeviceSetting {
            pci_slot: Some(self.pci_slot),
            ..DeviceSetting::default()
        };
        match self.kind {
            DeviceKind::ImsSlots { slots, queues } => {
                d.kind = "ims-slots".into();
                d.slots = Some(slots);
                d.queues = Some(queues);
            }
            DeviceKind::ImsQueues {
                contexts,
                command_timeout_ms,
            } => {
                d.kind = "ims-queues".into();
                d.contexts = Some(contexts);
                d.command_timeout_ms = Some(command_timeout_ms);
            }
        }
        d
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
        match self.kind {
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

/// A device as written in a config file (`[[device]]`) or given with `--device`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceSetting {
    /// `ims-slots` or `ims-queues`.
    pub kind: String,
    /// Slots of an `ims-slots` device.
    pub slots: Option<u32>,
    /// Work queues of an `ims-slots` device.
    pub queues: Option<u32>,
    /// Queue contexts of an `ims-queues` device.
    pub contexts: Option<u32>,
    /// Admin command timeout of an `ims-queues` device.
    pub command_timeout_ms: Option<u32>,
    /// Device number on bus 0.
    pub pci_slot: Option<u8>,
}

impl FromStr for DeviceSetting {
    type Err = ConfigError;

    /// `KIND[,KEY=VALUE]...`, e.g. `ims-slots,slots=4096,queues=64,pci_slot=5`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut parts = s.split(',');
        let mut d = DeviceSetting {
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
        Ok(d)
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
        if let Some(slot) = d.pci_slot {
            if !(1..=31).contains(&slot) {
                return Err(ConfigError::Device(format!(
                    "{}: pci_slot {slot} must be between 1 and 31 (0 is the host bridge)",
                    d.kind
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
        let bad = |why: String| ConfigError::Device(format!("{}: {why}", d.kind));
        let kind = match d.kind.as_str() {
            "ims-slots" => {
                if d.contexts.is_some() || d.command_timeout_ms.is_some() {
                    return Err(bad(
                        "contexts and command_timeout_ms are for ims-queues".into()
                    ));
                }
                let max = devices::ims::slots::MAX_SLOTS;
                let slots = d.slots.unwrap_or(DEFAULT_IMS_SLOTS);
                if !(1..=max).contains(&slots) {
                    return Err(bad(format!("slots {slots} must be between 1 and {max}")));
                }
                let queues = d.queues.unwrap_or(slots.min(DEFAULT_IMS_SLOTS));
                if !(1..=slots).contains(&queues) {
                    return Err(bad(format!(
                        "queues {queues} must be between 1 and the slots ({slots})"
                    )));
                }
                DeviceKind::ImsSlots { slots, queues }
            }
            "ims-queues" => {
                if d.slots.is_some() || d.queues.is_some() {
                    return Err(bad("slots and queues are for ims-slots".into()));
                }
                let max = devices::ims::queues::MAX_CONTEXTS;
                let contexts = d.contexts.unwrap_or(DEFAULT_IMS_CONTEXTS);
                if !(1..=max).contains(&contexts) {
                    return Err(bad(format!(
                        "contexts {contexts} must be between 1 and {max}"
                    )));
                }
                let command_timeout_ms = d.command_timeout_ms.unwrap_or(DEFAULT_COMMAND_TIMEOUT_MS);
                if command_timeout_ms == 0 {
                    return Err(bad("command_timeout_ms must be at least 1".into()));
                }
                DeviceKind::ImsQueues {
                    contexts,
                    command_timeout_ms,
                }
            }
            other => {
                return Err(ConfigError::Device(format!(
                    "unknown device kind `{other}` (ims-slots, ims-queues)"
                )))
            }
        };
        let pci_slot = match d.pci_slot {
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
