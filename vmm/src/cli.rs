//! The `vmm` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, DeviceSetting, Settings, SizeSetting};

/// A KVM virtual machine monitor with interrupt remapping, IMS devices and an IRTE
/// hypercall.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest and run it until it reports a verdict, every vCPU stops, or the
    /// watchdog fires. With no options: the built-in test guest on 2 vCPUs and 64 MiB.
    #[command(after_help = "\
Exit status: 0 when the guest reports success; the guest's code (1-123) when it reports
failure; 124 when the watchdog stopped it; 125 when the VM could not be set up; 126 when
every vCPU stopped without a verdict.

Flags override the config file, which overrides the defaults.

Examples:
  vmm run                                  the built-in test guest, default machine
  vmm run --cpus 8 --cmdline scenario=msi  its MSI scenario on 8 vCPUs
  vmm run --kernel guest.elf --memory 1G --config vm.toml")]
    Run(Box<RunArgs>),
    /// Measure our interrupt paths beside raw KVM's for the same work, in one run: a table
    /// on stdout and the figures as JSON.
    #[command(after_help = "\
In the test guest (2 vCPUs, one ims-slots device): delivery latency from an IMS slot through
interrupt remapping to the guest's handler beside a raw irqfd on a plain MSI route;
interrupts per second through the slots beside raw irqfds; the most remapped interrupts live
at once that all delivered. On the host: the IRTE retarget hypercall with 1, 512, 4096 and
65536 live interrupts beside one whole-table KVM_SET_GSI_ROUTING of that size; one BATCH
activating 2048 entries beside one 2048-entry KVM_SET_GSI_ROUTING; the device-side cost of
one interrupt. Medians and 99th percentiles. The README says how to read them.")]
    Bench(BenchArgs),
    /// Restore a VM from a snapshot file (`vmm run --snapshot`) and run it on until a
    /// verdict, as `vmm run` would.
    #[command(after_help = "\
The snapshot fixes the machine (vCPUs, memory, devices, interrupt limits, command line);
the console, the watchdog, the KVM device and further snapshots are this run's. A file that
is not a snapshot of this VMM, of another format version, truncated or tampered with is
refused with the reason; nothing runs. Exit status as for `vmm run`.

Examples:
  vmm run --cmdline scenario=snapshot --snapshot vm.snap
  vmm restore vm.snap")]
    Restore(RestoreArgs),
    /// Serve one of our IMS devices to a VMM in another process over vfio-user, until that
    /// VMM disconnects.
    #[command(after_help = "\
The device model is the one `vmm run` builds in-process. The VMM connects with
`--device vfio-user,socket=PATH`, maps guest RAM to this process, and hands it one eventfd
per remapping entry of the device's requester while the entry is present (interrupt index 5,
docs/ims-device.md \"Out of process\"): the device's interrupts go from here to KVM directly.

Examples:
  vmm device ims-slots --socket /tmp/slots.sock &
  vmm run --device vfio-user,socket=/tmp/slots.sock --device ims-queues --cmdline scenario=ims")]
    Device(DeviceArgs),
    /// Send one request to a running VM's control API (`--api-socket`) and print the
    /// answer, for people without `curl --unix-socket`.
    #[command(after_help = "\
Without JSON the request is a GET, with JSON a PUT; -X chooses. The answer's body goes to
stdout; the exit status is 0 for a 2xx answer and 1 otherwise (125 if the socket cannot be
reached). docs/api.md lists the endpoints.

Examples:
  vmm api /tmp/vm.sock /api/v1/vm.info
  vmm api /tmp/vm.sock /api/v1/interrupts/table?requester=00:03.0&present=true
  vmm api /tmp/vm.sock /api/v1/vm.pause -X PUT
  vmm api /tmp/vm.sock /api/v1/vm.snapshot '{\"path\": \"/tmp/vm.snap\"}'")]
    Api(ApiArgs),
}

/// Options of `vmm api`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The VM's API socket
    pub socket: PathBuf,
    /// The endpoint, e.g. /api/v1/vm.info
    pub path: String,
    /// A JSON body (makes the request a PUT)
    pub json: Option<String>,
    /// The method [default: GET, or PUT with a body]
    #[arg(short = 'X', long, value_name = "METHOD")]
    pub method: Option<String>,
}

/// Options of `vmm device`.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Which device.
    #[command(subcommand)]
    pub kind: ServedKind,
}

/// The devices `vmm device` serves.
#[derive(Debug, Subcommand)]
pub enum ServedKind {
    /// The slot-array IMS device (1b36:1100)
    ImsSlots {
        #[command(flatten)]
        serve: ServeArgs,
        /// Message slots
        #[arg(long, value_name = "N", default_value_t = crate::config::DEFAULT_IMS_SLOTS, value_parser = clap::value_parser!(u32).range(1..=i64::from(devices::ims::slots::MAX_SLOTS)))]
        slots: u32,
        /// Work queues, at most the slots [default: the slots, at most 2048]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(devices::ims::slots::MAX_SLOTS)))]
        queues: Option<u32>,
    },
    /// The queue-memory IMS device (1b36:1101)
    ImsQueues {
        #[command(flatten)]
        serve: ServeArgs,
        /// Queue contexts
        #[arg(long, value_name = "N", default_value_t = crate::config::DEFAULT_IMS_CONTEXTS, value_parser = clap::value_parser!(u32).range(1..=i64::from(devices::ims::queues::MAX_CONTEXTS)))]
        contexts: u32,
        /// Milliseconds an admin command may take before the device resets
        #[arg(long, value_name = "MS", default_value_t = crate::config::DEFAULT_COMMAND_TIMEOUT_MS, value_parser = clap::value_parser!(u32).range(1..))]
        command_timeout_ms: u32,
    },
}

/// Where and how a device is served.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to listen on (must not exist)
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The most host interrupts (entries' eventfds) the device holds at once; a hand-over
    /// beyond it is refused, and the guest's IRTE update that asked for it fails [default: no limit]
    #[arg(long, value_name = "N")]
    pub max_vectors: Option<u32>,
}

impl ServedKind {
    /// The device, as the VMM's configuration names it, and how it is served.
    #[must_use]
    pub fn device(&self) -> (crate::config::DeviceKind, &ServeArgs) {
        use crate::config::DeviceKind;
        match *self {
            Self::ImsSlots {
                ref serve,
                slots,
                queues,
            } => (
                DeviceKind::ImsSlots {
                    slots,
                    queues: queues
                        .unwrap_or(slots.min(crate::config::DEFAULT_IMS_SLOTS))
                        .min(slots),
                },
                serve,
            ),
            Self::ImsQueues {
                ref serve,
                contexts,
                command_timeout_ms,
            } => (
                DeviceKind::ImsQueues {
                    contexts,
                    command_timeout_ms,
                },
                serve,
            ),
        }
    }
}

/// Options of `vmm restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot file
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub run: RunOptions,
    #[command(flatten)]
    pub snapshots: SnapshotArgs,
}

impl RestoreArgs {
    /// The run's settings (console, watchdog, KVM device, snapshot); the machine comes
    /// from the file.
    #[must_use]
    pub fn settings(&self) -> Settings {
        Settings {
            console: self.run.console.clone(),
            watchdog: self.run.watchdog,
            kvm_device: self.run.kvm_device.clone(),
            until: self.run.until.clone(),
            snapshot: self.snapshots.snapshot.clone(),
            snapshot_after_ms: self.snapshots.snapshot_after_ms,
            snapshot_then: self.snapshots.snapshot_then.clone(),
            api_socket: self.run.api_socket.clone(),
            trace: self.run.trace.clone(),
            trace_categories: self.run.trace_categories.clone(),
            trace_limit: self.run.trace_limit,
            seccomp: self.run.seccomp.clone(),
            ..Settings::default()
        }
    }
}

/// Options of `vmm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Samples per figure
    #[arg(long, value_name = "N", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub samples: u32,
    /// Interrupts per throughput run (in the guest)
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub interrupts: u32,
    /// Remapped interrupts to make live at once in the guest (halved until all are delivered)
    #[arg(long, value_name = "N", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub live: u32,
    /// Where the JSON goes
    #[arg(long, value_name = "PATH", default_value = "vmm-bench.json")]
    pub json: PathBuf,
    /// KVM device node
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
}

/// Options of `vmm run`.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Image to boot: a 64-bit ELF (this VMM's boot protocol), a Linux bzImage, or a Linux vmlinux (through its PVH entry) [default: the built-in test guest]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Number of vCPUs, 1 to 512 (above 255 the guest needs x2APIC) [default: 2]
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest RAM, e.g. 64M or 1G; a bare number is MiB [default: 64M]
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Command line handed to the guest (the test guest reads scenario=smoke|msi|remap|ims|all|..., see the README)
    #[arg(long, value_name = "ARGS")]
    pub cmdline: Option<String>,
    /// TOML file with the same settings (cpus, memory, kernel, cmdline, console, watchdog, kvm_device, max_routes, max_entries_per_device, hypercall_rate, irq_rate, cpuid_hide, initrd, until, snapshot, snapshot_after_ms, snapshot_then, harness, api_socket, trace, trace_categories, trace_limit, seccomp, [[device]])
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunOptions,
    /// Cap on the KVM MSI routes for remapped interrupt targets [default: KVM's limit]
    #[arg(long, value_name = "N")]
    pub max_routes: Option<u32>,
    /// Remapping entries one requester (device) may hold; beyond, ALLOCATE answers
    /// QUOTA_EXCEEDED [default: 65536 shared evenly among the VM's requesters]
    #[arg(long, value_name = "N")]
    pub max_entries_per_device: Option<u32>,
    /// Hypercalls per second before the guest is answered BUSY [default: 200000]
    #[arg(long, value_name = "N")]
    pub hypercall_rate: Option<u32>,
    /// Interrupts per second from one entry before the rest are coalesced; 0 for no limit [default: 200000]
    #[arg(long, value_name = "N")]
    pub irq_rate: Option<u32>,
    /// A PCI device, repeatable: ims-slots[,slots=N][,queues=N][,pci_slot=N],
    /// ims-queues[,contexts=N][,command_timeout_ms=MS][,pci_slot=N] or
    /// vfio-user,socket=PATH[,pci_slot=N] (a device in another process); `none` for no devices
    /// [default: ims-slots with 2048 slots at 00:03.0, ims-queues with 64 contexts at 00:04.0]
    #[arg(long, value_name = "SPEC")]
    pub device: Vec<String>,
    /// Initial ramdisk for a Linux kernel (bzImage or vmlinux) given with --kernel
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// CPU features to hide from the guest, comma-separated: xsave, cx16, avx, avx2,
    /// avx512f, pcid, invpcid, tsc_deadline_timer, rdrand, rdseed, pdpe1gb, la57, umip,
    /// smap, popcnt, ssse3 (a nested KVM may not emulate what some of them need)
    /// [default: none]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub cpuid_hide: Vec<String>,
    /// The test harness (doorbell, mailbox, its requester IDs, fault injection): on or off
    /// [default: on for the built-in test guest, off for any other kernel]
    #[arg(long, value_name = "on|off")]
    pub harness: Option<String>,
    #[command(flatten)]
    pub snapshots: SnapshotArgs,
}

/// What belongs to a run rather than to the machine (`vmm run` and `vmm restore`).
#[derive(Debug, Default, Args)]
pub struct RunOptions {
    /// Where serial console output goes: stdout, off or file:PATH [default: stdout]
    #[arg(long, value_name = "WHERE")]
    pub console: Option<String>,
    /// Seconds the guest may run without a verdict; 0 disables the watchdog [default: 30]
    #[arg(long, value_name = "SECONDS")]
    pub watchdog: Option<u64>,
    /// KVM device node [default: /dev/kvm]
    #[arg(long, value_name = "PATH")]
    pub kvm_device: Option<PathBuf>,
    /// Stop the run with success once the console shows this text (for a guest that never
    /// reports a verdict, e.g. a stock kernel)
    #[arg(long, value_name = "TEXT")]
    pub until: Option<String>,
    /// Serve the control API (HTTP/1.1, JSON; docs/api.md) on this Unix socket, which must
    /// not exist; it is made owner-only and removed when the run ends
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Write the interrupt event trace (one JSON object per line; docs/api.md "Trace") to
    /// this file, or to stdout with -
    #[arg(long, value_name = "PATH")]
    pub trace: Option<String>,
    /// Trace categories, comma-separated: ir, hypercall, vtd, ioapic, ims, routes, faults,
    /// or all [default: all]
    #[arg(long, value_name = "LIST", requires = "trace")]
    pub trace_categories: Option<String>,
    /// Trace events per category per second; beyond, a `dropped` record counts them [default: 5000]
    #[arg(long, value_name = "N", requires = "trace")]
    pub trace_limit: Option<u32>,
    /// Seccomp filters on every VMM thread: on (a call outside its thread's filter stops
    /// the VMM, naming the thread and the call), log (the kernel logs it) or off [default: on]
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<String>,
}

/// When a running VM snapshots itself.
#[derive(Debug, Default, Args)]
pub struct SnapshotArgs {
    /// Where a snapshot of the VM goes: taken when the guest asks (harness SNAPSHOT
    /// request) or at --snapshot-after-ms, whichever comes first
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// Take the snapshot this many milliseconds into the run
    #[arg(long, value_name = "MS", requires = "snapshot")]
    pub snapshot_after_ms: Option<u64>,
    /// What the VM does after its snapshot: stop or continue [default: stop]
    #[arg(long, value_name = "WHAT", requires = "snapshot")]
    pub snapshot_then: Option<String>,
}

impl RunArgs {
    /// The settings these flags give, over those of the config file if one is named.
    ///
    /// # Errors
    /// The config file's [`ConfigError`].
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let device = match self.device.as_slice() {
            [] => None,
            [none] if none == "none" => Some(Vec::new()),
            specs => Some(
                specs
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<Vec<DeviceSetting>, _>>()?,
            ),
        };
        let flags = Settings {
            cpus: self.cpus,
            memory: self.memory.clone().map(SizeSetting::Text),
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            console: self.run.console.clone(),
            watchdog: self.run.watchdog,
            kvm_device: self.run.kvm_device.clone(),
            until: self.run.until.clone(),
            max_routes: self.max_routes,
            max_entries_per_device: self.max_entries_per_device,
            hypercall_rate: self.hypercall_rate,
            irq_rate: self.irq_rate,
            device,
            snapshot: self.snapshots.snapshot.clone(),
            snapshot_after_ms: self.snapshots.snapshot_after_ms,
            snapshot_then: self.snapshots.snapshot_then.clone(),
            cpuid_hide: (!self.cpuid_hide.is_empty()).then(|| self.cpuid_hide.clone()),
            initrd: self.initrd.clone(),
            harness: self.harness.clone(),
            api_socket: self.run.api_socket.clone(),
            trace: self.run.trace.clone(),
            trace_categories: self.run.trace_categories.clone(),
            trace_limit: self.run.trace_limit,
            seccomp: self.run.seccomp.clone(),
        };
        Ok(file.overridden_by(flags))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_without_options_means_the_defaults() {
        let cli = Cli::try_parse_from(["vmm", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.settings().unwrap(), Settings::default());
    }

    #[test]
    fn flags_become_settings() {
        let cli = Cli::try_parse_from([
            "vmm",
            "run",
            "--cpus",
            "8",
            "--memory",
            "1G",
            "--cmdline",
            "scenario=msi",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        let config = args.settings().unwrap().resolve().unwrap();
        assert_eq!(
            (
                config.machine.cpus,
                config.machine.memory,
                config.machine.cmdline.as_str()
            ),
            (8, 1 << 30, "scenario=msi")
        );
    }
}
