//! Assembling and running one VM: the only place that wires KVM, memory, devices and
//! vCPUs together. Each step is a call into the module that owns it.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufWriter, Cursor, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::debug_exit::{DebugExit, ExitSink};
use devices::harness::HarnessDoorbell;
use devices::ioapic::{self, IoApic, RemappingOutput};
use devices::memory::{DefaultMemory, SharedRam};
use devices::serial::{IrqLine, SerialConsole};
use devices::viommu::{self, Vtd, VtdDevice, WeakVtd};
use hypercall::boot::BootInfo;
use hypercall::{harness, platform};
use irq::backing::{Backing, BackingError, InterruptPath, Limits};
use irq::fdlimit::{raise_fd_limit, FdLimitError};
use irq::port::{FaultInjecting, MsiInjector};
use irq::remap::FaultReason;
use irq::{InterruptControl, InterruptCore, Irqchip, KvmRouting, RouteError, RouteTable};
use kvm_bindings::{kvm_mp_state, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::{BusError, SharedDevice};
use crate::config::{
    format_size, AfterSnapshot, Console, Kernel, Settings, SnapshotPlan, VmConfig,
};
use crate::exit::{Buses, ExitCounters, StopReason};
use crate::harness::{Doorbell, Harness, SharedBacking};
use crate::layout::{Placement, BOOT_INFO_ADDR, CMDLINE_ADDR};
use crate::loader::{LoadError, LoadedImage};
use crate::memory::{self, MemoryError};
use crate::pci::PciDevices;
use crate::report::{Outcome, RunReport, SnapshotTaken};
use crate::snapshot::{self, SnapshotError, VmSnapshot};
use crate::vcpu::{self, HypercallTimes, VcpuShared, VmEvent};
use crate::x86::{self, BootStateError};
use devices::dispatch::Dispatcher;
use hypercall::harness::{FOREIGN_SOURCE_ID, HARNESS_SOURCE_ID};

/// The test guest's ELF image, built from `resources/guest` by this crate's build script.
pub static TEST_GUEST_ELF: &[u8] = include_bytes!(env!("VMM_TEST_GUEST_ELF"));

mod assemble;
mod boot;
mod console;
mod control;
mod kvm;
mod running;
mod stop;

pub use crate::routing::VmRouting;
use crate::threads::join_by;
use assemble::{Host, Vm};
use boot::*;
pub use console::CapturedConsole;
use console::*;
use kvm::*;
pub use stop::STOP_GRACE;
use stop::*;

/// COM1's IOAPIC pin (its ISA IRQ).
const COM1_PIN: usize = platform::COM1_IOAPIC_PIN as usize;
/// File descriptors beyond the interrupt lines: KVM, vCPUs, eventfds of devices, stdio.
const FD_HEADROOM: u64 = 512;
/// Where KVM may put its real-mode TSS (three pages, inside the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Why a VM could not be built or run.
#[derive(Debug, Error)]
pub enum VmError {
    /// The KVM device could not be opened.
    #[error("cannot open KVM device {}", .path.display())]
    OpenKvm {
        /// The device node.
        path: PathBuf,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability this VMM relies on.
    #[error("KVM lacks {0}, which this VMM needs")]
    MissingCapability(&'static str),
    /// More vCPUs than KVM allows.
    #[error("{cpus} vCPUs requested but KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        cpus: u32,
        /// KVM's limit.
        max: usize,
    },
    /// A VM-level KVM call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest RAM could not be set up.
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    /// The kernel file could not be opened.
    #[error("cannot open kernel {}", .path.display())]
    OpenKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel could not be loaded.
    #[error("cannot load kernel {name}")]
    Load {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// RAM cannot hold the image, the vCPU areas and the mailbox.
    #[error("memory size {} is too small for the image and {cpus} vCPUs (the image ends at {image_end:#x})", format_size(*.memory))]
    TooSmall {
        /// RAM.
        memory: u64,
        /// vCPUs.
        cpus: u32,
        /// End of the image.
        image_end: u64,
    },
    /// A Linux kernel could not be loaded.
    #[error("cannot load Linux kernel {}", .path.display())]
    Linux {
        /// The bzImage.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::linux::LinuxError,
    },
    /// Page tables, GDTs or TSSs could not be written.
    #[error("cannot write the boot state")]
    BootState(#[from] BootStateError),
    /// The boot information or command line could not be written.
    #[error("cannot write the boot information")]
    BootInfo,
    /// Interrupt routing could not be set up.
    #[error("cannot set up interrupt routing")]
    Routes(#[from] RouteError),
    /// The interrupt core could not be set up.
    #[error("cannot set up interrupt remapping")]
    Backing(#[from] BackingError),
    /// Too few file descriptors for the interrupt lines.
    #[error("cannot raise the open-file limit")]
    FdLimit(#[from] FdLimitError),
    /// A device could not be put on its bus.
    #[error("cannot place device {0}")]
    Bus(&'static str, #[source] BusError),
    /// The console file could not be created.
    #[error("cannot create console file {}", .path.display())]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A vCPU could not be created or set up.
    #[error("cannot set up vCPU {index}: {what} failed")]
    Vcpu {
        /// vCPU index.
        index: u32,
        /// Which call.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A snapshot could not be taken, read or restored.
    #[error("snapshot")]
    Snapshot(#[from] SnapshotError),
    /// The run's settings over a snapshot's machine are refused.
    #[error("invalid settings")]
    Config(#[source] crate::config::ConfigError),
    /// The PCI devices could not be set up or restored.
    #[error(transparent)]
    Pci(#[from] crate::pci::PciError),
    /// The control API could not be served.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// An OS resource (thread, eventfd, signal handler) could not be had.
    #[error("cannot {0}")]
    Os(&'static str, #[source] io::Error),
}

/// Runs a VM as configured, with console output where the configuration says.
///
/// # Errors
/// Any [`VmError`] raised while building the VM. How the guest ended (including a
/// failure it reported, a watchdog stop or a crash) is in the [`RunReport`].
pub fn run(config: &VmConfig) -> Result<RunReport, VmError> {
    run_with_console(config, open_console(&config.run.console)?)
}

/// Runs a VM as configured, with console output going to `console` (whatever
/// `config.run.console` says).
///
/// # Errors
/// As [`run`].
pub fn run_with_console(
    config: &VmConfig,
    console: Box<dyn Write + Send>,
) -> Result<RunReport, VmError> {
    run_vm(config, Start::Boot, console)
}

/// Restores the VM in the snapshot at `path` and runs it on, with `run`'s settings for
/// the console, watchdog, KVM device, `until` and further snapshots (the machine is the
/// snapshot's; `run`'s machine settings are ignored).
///
/// # Errors
/// A snapshot that cannot be read or is refused ([`VmError::Snapshot`]), or any
/// [`VmError`] of building the VM.
pub fn restore(path: &Path, run: &Settings) -> Result<RunReport, VmError> {
    let (snap, config, file) = read_snapshot(path, run)?;
    let console = open_console(&config.run.console)?;
    run_vm(
        &config,
        Start::Restore(Box::new(snap), file, path.into()),
        console,
    )
}

/// As [`restore`], with console output going to `console`.
///
/// # Errors
/// As [`restore`].
pub fn restore_with_console(
    path: &Path,
    run: &Settings,
    console: Box<dyn Write + Send>,
) -> Result<RunReport, VmError> {
    let (snap, config, file) = read_snapshot(path, run)?;
    run_vm(
        &config,
        Start::Restore(Box::new(snap), file, path.into()),
        console,
    )
}

fn read_snapshot(
    path: &Path,
    run: &Settings,
) -> Result<(VmSnapshot, VmConfig, snapshot::RamFile), VmError> {
    let (snap, machine, file) = snapshot::read(path)?;
    let (_, run) = run.clone().split();
    let run = run.resolve().map_err(VmError::Config)?;
    Ok((snap, VmConfig { machine, run }, file))
}

/// Where a VM's state comes from.
enum Start {
    /// A fresh boot of the configured image.
    Boot,
    /// A snapshot, with its file positioned at guest RAM, and the file's name.
    Restore(Box<VmSnapshot>, snapshot::RamFile, PathBuf),
}

fn run_vm(
    config: &VmConfig,
    start: Start,
    console: Box<dyn Write + Send>,
) -> Result<RunReport, VmError> {
    let started = Instant::now();
    // The trace is this thread's, and every thread the VM starts inherits it.
    let trace = match &config.run.trace {
        Some(plan) => Some(
            crate::trace::Trace::open(plan).map_err(|e| VmError::Os("create the trace file", e))?,
        ),
        None => None,
    };
    let _traced = trace
        .as_ref()
        .map(|t| tracing::dispatcher::set_default(&t.dispatch()));
    // Every thread the VM starts installs its filter in this mode.
    let _filters = crate::seccomp::scope(config.run.seccomp);
    let host = Host::open(config)?;
    let (vm, events) = Vm::assemble(config, &host, start, console)?;
    let mut report = vm.run(&events, started)?;
    report.trace = trace.map(|t| t.finish());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_watch_finds_text_split_over_writes_once() {
        let (tx, rx) = mpsc::channel();
        let out = CapturedConsole::default();
        let mut watch = ConsoleWatch::new(Box::new(out.clone()), "IRQ remapping", tx);
        for piece in ["boot ... Enabled IR", "Q rem", "apping in x2apic mode\n"] {
            watch.write_all(piece.as_bytes()).unwrap();
        }
        watch.write_all(b"IRQ remapping again\n").unwrap();
        assert_eq!(rx.try_iter().count(), 1);
        assert!(out.text().ends_with("again\n"));
        let (tx, rx) = mpsc::channel();
        let mut none = ConsoleWatch::new(Box::new(io::sink()), "absent", tx);
        none.write_all(b"abs").unwrap();
        none.write_all(b"ent-ly not").unwrap();
        assert_eq!(rx.try_iter().count(), 1, "split as abs|ent");
    }
}
