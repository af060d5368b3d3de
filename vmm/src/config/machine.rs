//! The machine: what a VM is made of and what a snapshot keeps (vCPUs, memory, image,
//! command line, interrupt limits, devices, CPU features, the harness).

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::devices::{resolve_devices, DeviceConfig, DeviceSetting};
use super::{parse_size, ConfigError, SizeSetting};
use crate::layout::CMDLINE_MAX;

/// vCPUs when nothing says otherwise.
pub const DEFAULT_CPUS: u32 = 2;
/// Guest RAM when nothing says otherwise.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
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

/// The image to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// The test guest built with this VMM (`resources/guest`).
    BuiltIn,
    /// A 64-bit ELF executable following the boot protocol of `hypercall::boot`, or a
    /// Linux bzImage (told apart by its header), booted with the Linux boot protocol.
    Elf(PathBuf),
}

/// A validated machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs (1 to [`MAX_CPUS`]).
    pub cpus: u32,
    /// Bytes of guest RAM (a multiple of 4 KiB, at least [`MIN_MEMORY`]).
    pub memory: u64,
    /// The image.
    pub kernel: Kernel,
    /// An initial ramdisk for a Linux kernel.
    pub initrd: Option<PathBuf>,
    /// The command line handed to the guest.
    pub cmdline: String,
    /// Cap on the KVM MSI routes the VM uses (`None`: KVM's limit).
    pub max_routes: Option<u32>,
    /// Remapping entries one requester may hold (`None`: a fair share, see
    /// [`MachineConfig::entries_per_requester`]).
    pub max_entries_per_device: Option<u32>,
    /// Hypercalls per second before the VM is throttled with `BUSY`.
    pub hypercall_rate: u32,
    /// Interrupts per second from one remapping entry before the rest are coalesced
    /// (storm control; 0: no limit).
    pub irq_rate: u32,
    /// PCI devices.
    pub devices: Vec<DeviceConfig>,
    /// CPU features hidden from the guest (names from [`crate::cpuid::HIDEABLE`]).
    pub cpuid_hide: Vec<String>,
    /// The test harness (docs/boot-protocol.md): its doorbell, mailbox, requester IDs and
    /// fault injection exist only when this is on. On by default for the built-in test
    /// guest, off for any other image.
    pub harness: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            cpus: DEFAULT_CPUS,
            memory: DEFAULT_MEMORY,
            kernel: Kernel::BuiltIn,
            initrd: None,
            cmdline: String::new(),
            max_routes: None,
            max_entries_per_device: None,
            hypercall_rate: DEFAULT_HYPERCALL_RATE,
            irq_rate: DEFAULT_IRQ_RATE,
            devices: DeviceConfig::defaults(),
            cpuid_hide: Vec::new(),
            harness: true,
        }
    }
}

impl MachineConfig {
    /// Remapping entries one requester may hold: the setting, or else a fair share of the
    /// 65,536-entry table among the VM's requesters (its devices, and the harness's two
    /// when it is on), so that no device's driver can take what another's needs.
    #[must_use]
    pub fn entries_per_requester(&self) -> u32 {
        let requesters = self.devices.len() + if self.harness { 2 } else { 0 };
        let share = irq::backing::snapshot::MAX_TABLE_SIZE
            / u32::try_from(requesters.max(1)).unwrap_or(u32::MAX);
        self.max_entries_per_device.unwrap_or(share.max(1))
    }

    /// The settings that resolve to this machine (what a snapshot's header keeps).
    #[must_use]
    pub fn settings(&self) -> MachineSettings {
        MachineSettings {
            cpus: Some(self.cpus),
            memory: Some(SizeSetting::Text(format!("{}b", self.memory))),
            kernel: match &self.kernel {
                Kernel::BuiltIn => None,
                Kernel::Elf(path) => Some(path.clone()),
            },
            cmdline: Some(self.cmdline.clone()),
            max_routes: self.max_routes,
            max_entries_per_device: self.max_entries_per_device,
            hypercall_rate: Some(self.hypercall_rate),
            irq_rate: Some(self.irq_rate),
            device: Some(self.devices.iter().map(DeviceConfig::setting).collect()),
            initrd: self.initrd.clone(),
            cpuid_hide: (!self.cpuid_hide.is_empty()).then(|| self.cpuid_hide.clone()),
            harness: Some(if self.harness { "on" } else { "off" }.to_string()),
            ..MachineSettings::default()
        }
    }
}

/// The machine's part of a config file's settings, every one optional; also the
/// `machine` of a snapshot's header.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineSettings {
    /// Number of vCPUs.
    pub cpus: Option<u32>,
    /// Guest RAM, e.g. `"64M"`, or a number of MiB.
    pub memory: Option<SizeSetting>,
    /// ELF image path.
    pub kernel: Option<PathBuf>,
    /// Guest command line.
    pub cmdline: Option<String>,
    /// Cap on KVM MSI routes.
    pub max_routes: Option<u32>,
    /// Remapping entries one requester may hold (absent: a fair share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// CPU features to hide from the guest, e.g. `["xsave", "cx16"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid_hide: Option<Vec<String>>,
    /// The test harness: `on` or `off` (default: on for the built-in test guest only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub harness: Option<String>,
    // A run's settings have no place here. Snapshots of format 2 written before the
    // machine had its own type carry the first three as `null`, which is accepted.
    #[serde(default, skip_serializing)]
    pub(super) console: Option<NotAMachineSetting>,
    #[serde(default, skip_serializing)]
    pub(super) watchdog: Option<NotAMachineSetting>,
    #[serde(default, skip_serializing)]
    pub(super) kvm_device: Option<NotAMachineSetting>,
    #[serde(default, skip_serializing)]
    pub(super) snapshot: Option<NotAMachineSetting>,
    #[serde(default, skip_serializing)]
    pub(super) until: Option<NotAMachineSetting>,
}

/// A run's setting found among a machine's: refused whatever its value (`null` reads as
/// absent before this is reached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NotAMachineSetting;

impl<'de> Deserialize<'de> for NotAMachineSetting {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "the machine settings hold settings of a run (console, watchdog, KVM device, \
             snapshot or until)",
        ))
    }
}

impl MachineSettings {
    /// `self`, with every setting `over` has replacing ours.
    #[must_use]
    pub fn overridden_by(self, over: MachineSettings) -> MachineSettings {
        MachineSettings {
            cpus: over.cpus.or(self.cpus),
            memory: over.memory.or(self.memory),
            kernel: over.kernel.or(self.kernel),
            cmdline: over.cmdline.or(self.cmdline),
            max_routes: over.max_routes.or(self.max_routes),
            max_entries_per_device: over.max_entries_per_device.or(self.max_entries_per_device),
            hypercall_rate: over.hypercall_rate.or(self.hypercall_rate),
            irq_rate: over.irq_rate.or(self.irq_rate),
            device: over.device.or(self.device),
            initrd: over.initrd.or(self.initrd),
            cpuid_hide: over.cpuid_hide.or(self.cpuid_hide),
            harness: over.harness.or(self.harness),
            ..MachineSettings::default()
        }
    }

    /// The validated machine: defaults, with these settings applied.
    ///
    /// # Errors
    /// Any [`ConfigError`] about a machine's value.
    pub fn resolve(self) -> Result<MachineConfig, ConfigError> {
        let defaults = MachineConfig::default();
        let cpus = self.cpus.unwrap_or(defaults.cpus);
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(cpus));
        }
        let memory = resolve_memory(self.memory, defaults.memory)?;
        let cmdline = self.cmdline.unwrap_or(defaults.cmdline);
        if cmdline.len() > CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        let kernel = self.kernel.map_or(Kernel::BuiltIn, Kernel::Elf);
        let harness = match self.harness.as_deref() {
            None => kernel == Kernel::BuiltIn,
            Some("on") => true,
            Some("off") => false,
            Some(other) => return Err(ConfigError::Harness(other.to_string())),
        };
        Ok(MachineConfig {
            cpus,
            memory,
            kernel,
            initrd: self.initrd,
            cmdline,
            max_routes: match self.max_routes {
                Some(0) => return Err(ConfigError::MaxRoutes),
                other => other,
            },
            max_entries_per_device: match self.max_entries_per_device {
                Some(n) if n == 0 || n > irq::backing::snapshot::MAX_TABLE_SIZE => {
                    return Err(ConfigError::MaxEntriesPerDevice(n))
                }
                other => other,
            },
            hypercall_rate: match self.hypercall_rate {
                Some(0) => return Err(ConfigError::HypercallRate),
                Some(n) => n,
                None => defaults.hypercall_rate,
            },
            irq_rate: self.irq_rate.unwrap_or(defaults.irq_rate),
            devices: resolve_devices(self.device)?,
            cpuid_hide: resolve_cpuid_hide(self.cpuid_hide)?,
            harness,
        })
    }
}

fn resolve_memory(setting: Option<SizeSetting>, default: u64) -> Result<u64, ConfigError> {
    let memory = match setting {
        None => default,
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
    Ok(memory)
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

pub(super) fn hideable_names() -> String {
    crate::cpuid::HIDEABLE
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}
