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
use devices::serial::{IrqLine, SerialConsole};
use devices::viommu::{self, Vtd, VtdDevice, WeakVtd};
use hypercall::boot::BootInfo;
use hypercall::{harness, platform};
use irq::backing::{Backing, BackingError, InterruptPath, Limits};
use irq::fdlimit::{raise_fd_limit, FdLimitError};
use irq::port::{FaultInjecting, MsiInjector, RouteEntry};
use irq::remap::FaultReason;
use irq::{
    Gsi, InterruptControl, InterruptCore, Irqchip, KvmRouting, RouteError, RouteTable,
    RoutingBackend,
};
use kvm_bindings::{
    kvm_enable_cap, kvm_mp_state, CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X2APIC_API,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
    KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusError, SharedDevice};
use crate::config::{
    format_size, AfterSnapshot, Console, Kernel, Settings, SnapshotPlan, VmConfig,
};
use crate::exit::{Buses, ExitCounters, StopReason};
use crate::harness::{Doorbell, Harness, SharedBacking};
use crate::hypercall::Dispatcher;
use crate::layout::{Placement, BOOT_INFO_ADDR, CMDLINE_ADDR};
use crate::loader::{LoadError, LoadedImage};
use crate::memory::{self, MemoryError};
use crate::pci::PciDevices;
use crate::report::{Outcome, RunReport, SnapshotTaken};
use crate::snapshot::{self, SnapshotError, VmSnapshot};
use crate::vcpu::{self, HypercallTimes, VcpuShared, VmEvent};
use crate::x86::{self, BootStateError};
use hypercall::harness::{FOREIGN_SOURCE_ID, HARNESS_SOURCE_ID};

/// The test guest's ELF image, built from `resources/guest` by this crate's build script.
pub static TEST_GUEST_ELF: &[u8] = include_bytes!(env!("VMM_TEST_GUEST_ELF"));

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
    /// An OS resource (thread, eventfd, signal handler) could not be had.
    #[error("cannot {0}")]
    Os(&'static str, #[source] io::Error),
}

/// A console that keeps what the guest printed, for callers that want it afterwards (or
/// from another thread).
#[derive(Debug, Clone, Default)]
pub struct CapturedConsole(Arc<Mutex<Vec<u8>>>);

impl CapturedConsole {
    /// Everything written so far, as text.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for CapturedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A console that passes everything on and tells the controller, once, when the output
/// shows `pattern` (`--until`).
struct ConsoleWatch {
    inner: Box<dyn Write + Send>,
    pattern: Vec<u8>,
    /// The last bytes seen, for a pattern split over writes.
    tail: Vec<u8>,
    events: Option<Sender<VmEvent>>,
}

impl ConsoleWatch {
    fn new(inner: Box<dyn Write + Send>, pattern: &str, events: Sender<VmEvent>) -> Self {
        Self {
            inner,
            pattern: pattern.as_bytes().to_vec(),
            tail: Vec::new(),
            events: Some(events),
        }
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.events.is_some() && !self.pattern.is_empty() {
            self.tail
                .extend_from_slice(buf.get(..n).unwrap_or_default());
            if self
                .tail
                .windows(self.pattern.len())
                .any(|w| w == self.pattern.as_slice())
            {
                if let Some(events) = self.events.take() {
                    let _ = events.send(VmEvent::ConsoleMatched);
                }
            }
            let keep = self.pattern.len().saturating_sub(1);
            let cut = self.tail.len().saturating_sub(keep);
            self.tail.drain(..cut);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reports the guest's verdict to the controller.
#[derive(Debug)]
struct ExitEvents(Sender<VmEvent>);

impl ExitSink for ExitEvents {
    fn guest_exit(&self, code: u32) {
        let _ = self.0.send(VmEvent::GuestExit(code));
    }
}

/// vCPUs beyond this many have APIC IDs only x2APIC can address.
const X2APIC_ONLY_ABOVE: u32 = 255;

/// Creates the split irqchip (KVM_CAP_SPLIT_IRQCHIP): local APICs in KVM, the IOAPIC
/// here, no PIC or PIT. KVM reserves GSIs 0-23 for the IOAPIC's pins and reports the EOIs
/// of their level-triggered vectors (`KVM_EXIT_IOAPIC_EOI`).
fn create_split_irqchip(vm: &VmFd) -> Result<(), VmError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        args: [u64::from(irq::routes::LEGACY_GSI_COUNT), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| VmError::Kvm("create the split irqchip (KVM_CAP_SPLIT_IRQCHIP)", e))
}

/// Turns on 32-bit APIC IDs for MSI routes and LAPIC state (KVM_CAP_X2APIC_API): an MSI
/// route then carries destination bits 31:8 in `address_hi`, which is how the interrupt
/// core already writes them, so remapped interrupts reach vCPUs above 255. Broadcast
/// quirks of xAPIC destination 0xff are off (0xff is an ordinary x2APIC ID).
fn enable_x2apic_api(vm: &VmFd) -> Result<(), VmError> {
    let wanted = u64::from(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
    let supported = u64::try_from(vm.check_extension_int(Cap::X2ApicApi)).unwrap_or(0);
    if supported & wanted != wanted {
        return Err(VmError::MissingCapability(
            "32-bit APIC IDs (KVM_CAP_X2APIC_API), needed for more than 255 vCPUs",
        ));
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X2APIC_API,
        args: [wanted, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| VmError::Kvm("enable 32-bit APIC IDs (KVM_CAP_X2APIC_API)", e))
}

/// Opens the console a configuration names.
fn open_console(console: &Console) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        Console::Stdout => Box::new(io::stdout()),
        Console::Off => Box::new(io::sink()),
        Console::File(path) => Box::new(BufWriter::new(File::create(path).map_err(|source| {
            VmError::ConsoleFile {
                path: path.clone(),
                source,
            }
        })?)),
    })
}

/// Runs a VM as configured, with console output where the configuration says.
///
/// # Errors
/// Any [`VmError`] raised while building the VM. How the guest ended (including a
/// failure it reported, a watchdog stop or a crash) is in the [`RunReport`].
pub fn run(config: &VmConfig) -> Result<RunReport, VmError> {
    run_with_console(config, open_console(&config.console)?)
}

/// Runs a VM as configured, with console output going to `console` (whatever
/// `config.console` says).
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
    let console = open_console(&config.console)?;
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

fn read_snapshot(path: &Path, run: &Settings) -> Result<(VmSnapshot, VmConfig, File), VmError> {
    let (snap, _, file) = snapshot::read(path)?;
    let run = Settings {
        console: run.console.clone(),
        watchdog: run.watchdog,
        kvm_device: run.kvm_device.clone(),
        until: run.until.clone(),
        snapshot: run.snapshot.clone(),
        snapshot_after_ms: run.snapshot_after_ms,
        snapshot_then: run.snapshot_then.clone(),
        ..Settings::default()
    };
    let config = snap
        .machine
        .clone()
        .overridden_by(run)
        .resolve()
        .map_err(VmError::Config)?;
    Ok((snap, config, file))
}

/// Where a VM's state comes from.
enum Start {
    /// A fresh boot of the configured image.
    Boot,
    /// A snapshot, with its file positioned at guest RAM, and the file's name.
    Restore(Box<VmSnapshot>, File, PathBuf),
}

/// The parts of a running VM a snapshot pauses and reads.
struct Machine<'a> {
    config: &'a VmConfig,
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    msr_list: &'a [u32],
    image_end: u64,
    shared: VcpuShared,
    threads: Vec<JoinHandle<VcpuFd>>,
    harness_idle: Arc<Mutex<()>>,
    storm_gate: Arc<Mutex<()>>,
    path: &'a Arc<InterruptPath>,
    backing: &'a SharedBacking,
    vtd: &'a Arc<Mutex<Vtd>>,
    ioapic: &'a Arc<Mutex<IoApic>>,
    serial: &'a Arc<Mutex<SerialConsole<Box<dyn Write + Send>>>>,
    pci: &'a mut PciDevices,
    taken: Option<SnapshotTaken>,
}

fn run_vm(
    config: &VmConfig,
    start: Start,
    console: Box<dyn Write + Send>,
) -> Result<RunReport, VmError> {
    let started = Instant::now();
    vcpu::install_kick_handler().map_err(|e| VmError::Os("install the vCPU kick handler", e))?;
    let open_error = |source| VmError::OpenKvm {
        path: config.kvm_device.clone(),
        source,
    };
    let device = CString::new(config.kvm_device.as_os_str().as_bytes())
        .map_err(|_| open_error(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(device).map_err(open_error)?;
    for (cap, name) in [
        (
            Cap::SplitIrqchip,
            "the split irqchip (KVM_CAP_SPLIT_IRQCHIP)",
        ),
        (Cap::IrqRouting, "GSI routing (KVM_CAP_IRQ_ROUTING)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if config.cpus as usize > max {
        return Err(VmError::TooManyVcpus {
            cpus: config.cpus,
            max,
        });
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Kvm("read the supported CPUID", e))?;
    let msr_list = match &config.snapshot {
        Some(_) => kvm
            .get_msr_index_list()
            .map_err(|e| VmError::Kvm("read the MSRs KVM saves", e))?
            .as_slice()
            .to_vec(),
        None => Vec::new(),
    };
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| VmError::Kvm("create the VM", e))?,
    );
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    create_split_irqchip(&vm)?;
    if config.cpus > X2APIC_ONLY_ABOVE {
        enable_x2apic_api(&vm)?;
    }

    let mem = memory::allocate(config.memory)?;
    memory::register(&vm, &mem)?;
    let (snap, restored_from, entry, image_end) = match start {
        Start::Boot => match &config.kernel {
            Kernel::Elf(path) if crate::linux::is_bzimage(path) => {
                let boot = crate::linux::load(
                    &mem,
                    path,
                    config.initrd.as_deref(),
                    &config.cmdline,
                    config.memory,
                    memory::low_ram_end(config.memory),
                )
                .map_err(|source| VmError::Linux {
                    path: path.clone(),
                    source,
                })?;
                (None, None, Some(Entry::Linux(boot)), boot.kernel_end)
            }
            _ => {
                let image = load_kernel(&mem, config)?;
                (None, None, Some(Entry::Guest(image.entry)), image.end)
            }
        },
        Start::Restore(snap, mut file, from) => {
            snapshot::load_memory(&mut file, &from, &mem, config.memory)?;
            snapshot::restore_vm(&vm, &snap.vm)?;
            let end = snap.image_end;
            (Some(snap), Some(from), None, end)
        }
    };
    let placement = match (&snap, entry) {
        (None, Some(entry)) => {
            let placement = write_boot_state(&mem, config, image_end)?;
            if let Entry::Linux(_) = entry {
                x86::write_linux_gdt(
                    &mem,
                    crate::linux::BOOT_GDT,
                    placement.cpu_area(0) + crate::layout::CPU_AREA_TSS,
                )?;
            }
            write_acpi(&mem, config)?;
            placement
        }
        _ => place(config, image_end)?,
    };

    let routing = KvmRouting::new(vm.clone());
    let kvm_limit = routing.route_limit();
    let limit = config.max_routes.map_or(kvm_limit, |cap| {
        kvm_limit.min(cap.saturating_add(irq::routes::LEGACY_GSI_COUNT))
    });
    // One line (eventfd) per route at most, plus the VM's own descriptors.
    raise_fd_limit(u64::from(limit) + FD_HEADROOM + u64::from(config.cpus))?;
    // Fault injection sits in front of KVM only for a VM with the test harness.
    let (routing, injected_faults) = if config.harness {
        let injecting = FaultInjecting::new(routing);
        let faults = injecting.faults();
        (VmRouting::Injecting(injecting), Some(faults))
    } else {
        (VmRouting::Kvm(routing), None)
    };
    let routes = RouteTable::with_irqchip(routing, limit, Irqchip::Split)?;
    let backing = match &snap {
        None => Backing::new(routes, Limits::default())?,
        Some(s) => Backing::restore(routes, &s.interrupts).map_err(SnapshotError::from)?,
    };
    let table_size = backing.limits().table_size;
    // The core: devices and the dispatcher hold it through its front door (`handle`);
    // the VMM keeps the concrete core for statistics, snapshots and the harness.
    let backing: SharedBacking = InterruptCore::new(backing);
    // The VT-d unit: registers on the MMIO bus, faults from the data path, its own event
    // interrupts (and compatibility-format requests while allowed) injected directly.
    let injector: Arc<dyn MsiInjector> = Arc::new(KvmRouting::new(vm.clone()));
    let vtd = match &snap {
        None => Vtd::new(backing.handle(), mem.clone(), injector.clone()),
        Some(s) => Vtd::restore(
            backing.handle(),
            mem.clone(),
            injector.clone(),
            s.vtd.clone(),
        )
        .map_err(SnapshotError::from)?,
    };
    let vtd = Arc::new(Mutex::new(vtd));
    let path = backing.path();
    // The unit hears of faults and of what requesters write (so its table in guest
    // memory shows the hypercall's entries too).
    path.set_fault_sink(WeakVtd::to(&vtd));
    backing.set_mirror(WeakVtd::to(&vtd));
    path.set_compat_injector(injector);
    path.set_storm_rate(config.irq_rate);
    // The IOAPIC: its interrupts are MSIs from requester ff:00.0 (as the DMAR says) into
    // the interrupt core; its level pins' routes let KVM report their EOIs.
    let ioapic_out = Arc::new(RemappingOutput::new(
        backing.handle(),
        crate::acpi::IOAPIC_SOURCE_ID,
    ));
    let ioapic = match &snap {
        None => IoApic::new(ioapic_out),
        Some(s) => IoApic::restore(s.vm.ioapic.clone(), ioapic_out)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?,
    };
    let ioapic = Arc::new(Mutex::new(ioapic));
    let com1_pin = ioapic.clone();
    let serial_irq = IrqLine::new(move || {
        com1_pin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pulse(COM1_PIN);
        Ok(())
    });
    let (events, event_rx) = mpsc::channel();
    let console: Box<dyn Write + Send> = match &config.until {
        Some(text) => Box::new(ConsoleWatch::new(console, text, events.clone())),
        None => console,
    };
    let serial = match &snap {
        None => SerialConsole::new(serial_irq, console),
        Some(s) => SerialConsole::restore(&s.serial, serial_irq, console)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?,
    };
    let serial = Arc::new(Mutex::new(serial));

    let (rings, ring_rx) = mpsc::sync_channel(1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut buses = Buses::default();
    let mut devices: Vec<(u16, u16, &'static str, SharedDevice)> = vec![
        (
            platform::COM1_PORT,
            platform::COM1_LEN,
            "COM1",
            serial.clone(),
        ),
        (
            platform::DEBUG_EXIT_PORT,
            1,
            "debug-exit",
            Arc::new(Mutex::new(DebugExit::new(ExitEvents(events.clone())))),
        ),
    ];
    if config.harness {
        devices.push((
            platform::HARNESS_PORT,
            1,
            "harness doorbell",
            Arc::new(Mutex::new(HarnessDoorbell::new(Doorbell(rings.clone())))),
        ));
    }
    buses
        .mmio
        .insert(
            platform::VTD_BASE,
            viommu::regs::SIZE,
            Arc::new(Mutex::new(VtdDevice(vtd.clone()))),
        )
        .map_err(|e| VmError::Bus("VT-d unit", e))?;
    buses
        .mmio
        .insert(
            u64::from(crate::acpi::IOAPIC_ADDR),
            ioapic::SIZE,
            ioapic.clone(),
        )
        .map_err(|e| VmError::Bus("IOAPIC", e))?;
    buses.ioapic = Some(ioapic.clone());
    let mut pci = match &snap {
        None => PciDevices::new(&config.devices, &path, &mem)?,
        Some(s) => PciDevices::restore(&config.devices, &s.pci, &path, &mem)?,
    };
    pci.place(&mut buses)
        .map_err(|(name, e)| VmError::Bus(name, e))?;
    for (port, len, name, device) in devices {
        buses
            .pio
            .insert(u64::from(port), u64::from(len), device)
            .map_err(|e| VmError::Bus(name, e))?;
    }

    let mut vcpus = Vec::with_capacity(config.cpus as usize);
    for index in 0..config.cpus {
        let vcpu = create_vcpu(
            &vm,
            &cpuid,
            index,
            config.cpus,
            table_size,
            &config.cpuid_hide,
        )?;
        match (&snap, entry) {
            (Some(s), _) => {
                let state = s
                    .vcpus
                    .get(index as usize)
                    .ok_or_else(|| SnapshotError::Invalid(format!("no state for vCPU {index}")))?;
                snapshot::restore_vcpu(&vcpu, index, state)?;
            }
            (None, Some(entry)) => boot_vcpu(&vcpu, index, &placement, entry)?,
            (None, None) => {}
        }
        vcpus.push(vcpu);
    }
    if let (None, Some(_), Some(vcpu)) = (&snap, entry, vcpus.first()) {
        tell_tsc_khz(&mem, vcpu)?;
    }

    let apic_ids: Vec<u32> = (0..config.cpus).collect();
    let hypercall_times = Arc::new(HypercallTimes::default());
    let mut harness = Harness::new(
        mem.clone(),
        placement.mailbox,
        apic_ids,
        backing.clone(),
        stop.clone(),
    )
    .with_slot_devices(pci.slot_devices())
    .with_pci_functions(pci.functions())
    .with_hypercall_times(hypercall_times.clone())
    .with_ioapic(ioapic.clone());
    if let Some(faults) = injected_faults {
        harness = harness.with_faults(faults);
    }
    if config.snapshot.is_some() {
        harness = harness.with_snapshots(events.clone());
    }
    if config.harness && snap.is_some() && harness.unserved().is_some() {
        // Rung before the snapshot, not done when it was taken: serve it now.
        let _ = rings.try_send(());
    }
    drop(rings);
    let harness_fired = harness.fired();
    let measurements = harness.measurements();
    let harness_idle = harness.idle_lock();
    // Without the harness there is no doorbell (the port is unclaimed), no thread serving
    // it, and its requester IDs are no devices of this VM.
    let harness_thread = match config.harness {
        true => Some(
            harness
                .spawn(ring_rx)
                .map_err(|e| VmError::Os("start the harness thread", e))?,
        ),
        false => None,
    };

    let mut requesters = match config.harness {
        true => vec![HARNESS_SOURCE_ID, FOREIGN_SOURCE_ID],
        false => Vec::new(),
    };
    requesters.extend(pci.requesters());
    requesters.sort_unstable();
    let dispatcher = Arc::new(Dispatcher::new(
        backing.handle(),
        mem.clone(),
        (0..config.cpus).collect(),
        requesters,
        config.hypercall_rate,
    ));
    buses.hypercall_port = Some(platform::HYPERCALL_PORT);
    let shared = VcpuShared {
        buses: Arc::new(buses),
        counters: Arc::new(ExitCounters::default()),
        stop: stop.clone(),
        pause: Arc::new(AtomicBool::new(false)),
        events,
        hypercalls: Some(dispatcher.clone()),
        hypercall_times,
    };
    let storm_gate = Arc::new(Mutex::new(()));
    let storm_ticker = spawn_storm_ticker(&path, config.irq_rate, stop.clone(), storm_gate.clone())
        .map_err(|e| VmError::Os("start the storm ticker", e))?;
    let mut threads = Vec::with_capacity(vcpus.len());
    let mut spawn_error = None;
    for (index, vcpu) in (0..).zip(vcpus) {
        match vcpu::spawn(vcpu, index, shared.clone()) {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                spawn_error = Some(VmError::Os("start a vCPU thread", e));
                break;
            }
        }
    }
    let counters = shared.counters.clone();
    let mut machine = Machine {
        config,
        vm: &vm,
        mem: &mem,
        msr_list: &msr_list,
        image_end,
        shared,
        threads,
        harness_idle,
        storm_gate,
        path: &path,
        backing: &backing,
        vtd: &vtd,
        ioapic: &ioapic,
        serial: &serial,
        pci: &mut pci,
        taken: None,
    };
    let outcome = match spawn_error {
        None => machine.supervise(&event_rx),
        Some(_) => Outcome::VcpusStopped {
            stopped: Vec::new(),
        },
    };

    stop.store(true, Ordering::Release);
    // Every thread gets until the same moment to leave: one inside a device call (a
    // device the guest keeps busy) is left to finish on its own, so the run ends on
    // time, the watchdog's included.
    let deadline = Instant::now() + STOP_GRACE;
    let threads = std::mem::take(&mut machine.threads);
    let stuck_vcpus = stop_vcpus(threads, deadline);
    let snapshot = machine.taken.take();
    drop(machine);
    if let Some(t) = harness_thread {
        let _ = join_by(t, deadline);
    }
    if let Some(t) = storm_ticker {
        let _ = join_by(t, deadline);
    }
    let devices = pci.finish(deadline);
    if let Some(e) = spawn_error {
        return Err(e);
    }

    let measurements = measurements
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let remap_stats = backing.lock().stats();
    let mut serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
    let flush_failed = u64::from(serial.flush().is_err());
    Ok(RunReport {
        kernel: config.kernel.clone(),
        cpus: config.cpus,
        memory: config.memory,
        outcome,
        restored_from,
        snapshot,
        interrupts: config
            .harness
            .then(|| guest_counts(&mem, &placement, config.cpus))
            .flatten(),
        harness_fired: harness_fired
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect(),
        remap_faults: remap_faults(&backing),
        remap_stats,
        hypercalls: dispatcher.stats(),
        storms: path.storm_stats(),
        devices,
        measurements,
        stuck_vcpus,
        unmapped_accesses: counters.unmapped_pio.load(Ordering::Relaxed)
            + counters.unmapped_mmio.load(Ordering::Relaxed),
        console_errors: serial.errors() + flush_failed,
        elapsed: started.elapsed(),
    })
}

impl Machine<'_> {
    /// Waits for a verdict, for every vCPU to stop, or for the watchdog; takes the
    /// snapshot when it is due.
    fn supervise(&mut self, events: &mpsc::Receiver<VmEvent>) -> Outcome {
        let config = self.config;
        let begin = Instant::now();
        let deadline = config.watchdog.map(|w| begin + w);
        let mut snapshot_at = config
            .snapshot
            .as_ref()
            .and_then(|p| p.after)
            .map(|a| begin + a);
        let mut stopped: Vec<(u32, StopReason)> = Vec::new();
        loop {
            let wake = match (deadline, snapshot_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let event = match wake {
                Some(d) => events.recv_timeout(d.saturating_duration_since(Instant::now())),
                None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let snapshot_due = match &event {
                Ok(VmEvent::SnapshotRequested) => true,
                Err(RecvTimeoutError::Timeout) => {
                    snapshot_at.is_some_and(|at| Instant::now() >= at)
                }
                _ => false,
            };
            if snapshot_due {
                snapshot_at = None;
                let Some(plan) = config.snapshot.as_ref() else {
                    continue;
                };
                if self.taken.is_some() {
                    // One snapshot per run; a second request is answered but not taken.
                    continue;
                }
                match self.snapshot(plan) {
                    Ok(()) if plan.then == AfterSnapshot::Stop => {
                        return Outcome::Snapshotted {
                            path: plan.path.clone(),
                        }
                    }
                    Ok(()) => continue,
                    Err(e) => {
                        return Outcome::SnapshotFailed {
                            error: error_line(&e),
                        }
                    }
                }
            }
            match event {
                Ok(VmEvent::GuestExit(code)) => return Outcome::GuestExit { code },
                Ok(VmEvent::ConsoleMatched) => {
                    return Outcome::ConsoleMatched {
                        text: config.until.clone().unwrap_or_default(),
                    }
                }
                Ok(VmEvent::VcpuStopped { index, reason }) => {
                    if !stopped.iter().any(|(i, _)| *i == index) {
                        stopped.push((index, reason));
                    }
                    if stopped.len() == config.cpus as usize {
                        return Outcome::VcpusStopped { stopped };
                    }
                }
                Ok(VmEvent::SnapshotRequested) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        let after = config.watchdog.unwrap_or_default();
                        return Outcome::Watchdog { after, stopped };
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Outcome::VcpusStopped { stopped },
            }
        }
    }

    /// Pauses the VM, writes its snapshot to `plan.path`, and (to go on) resumes it.
    fn snapshot(&mut self, plan: &SnapshotPlan) -> Result<(), VmError> {
        let began = Instant::now();
        // The harness between requests, the devices' loop and storm control stopped,
        // then the vCPUs out of KVM_RUN with nothing pending.
        let harness_idle = self.harness_idle.clone();
        let _harness = harness_idle.lock().unwrap_or_else(PoisonError::into_inner);
        let storm_gate = self.storm_gate.clone();
        let _storms = storm_gate.lock().unwrap_or_else(PoisonError::into_inner);
        self.pci.pause();
        // Interrupts storm control holds back go to the LAPICs, where the snapshot
        // finds them.
        self.path.flush_throttled();
        self.shared.pause.store(true, Ordering::Release);
        let vcpus = pause_vcpus(std::mem::take(&mut self.threads));
        self.shared.pause.store(false, Ordering::Release);
        let paused = began.elapsed();
        let written = self.capture(&vcpus).and_then(|snap| {
            snapshot::write(&plan.path, &snap, self.mem, self.config.memory).map_err(VmError::from)
        });
        let bytes = written?;
        self.taken = Some(SnapshotTaken {
            path: plan.path.clone(),
            bytes,
            pause: began.elapsed(),
            pausing: paused,
        });
        if plan.then == AfterSnapshot::Continue {
            self.pci
                .resume()
                .map_err(|e| VmError::Os("resume the PCI devices", e))?;
            for (index, vcpu) in (0..).zip(vcpus) {
                let handle = vcpu::spawn(vcpu, index, self.shared.clone())
                    .map_err(|e| VmError::Os("resume a vCPU thread", e))?;
                self.threads.push(handle);
            }
        }
        Ok(())
    }

    /// The paused VM's state (everything but RAM, which [`snapshot::write`] adds).
    fn capture(&self, vcpus: &[VcpuFd]) -> Result<VmSnapshot, VmError> {
        let states = (0..)
            .zip(vcpus)
            .map(|(index, vcpu)| snapshot::capture_vcpu(vcpu, index, self.msr_list))
            .collect::<Result<Vec<_>, _>>()?;
        if states.len() != self.config.cpus as usize {
            return Err(SnapshotError::Invalid("a vCPU thread was lost".into()).into());
        }
        Ok(VmSnapshot {
            machine: self.config.machine_settings(),
            image_end: self.image_end,
            vm: snapshot::capture_vm(
                self.vm,
                self.ioapic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .state()
                    .clone(),
            )?,
            vcpus: states,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(),
            interrupts: self.backing.lock().snapshot(),
            vtd: self
                .vtd
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .state()
                .clone(),
            pci: self.pci.snapshot(),
        })
    }
}

/// An error and its causes on one line.
fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(&format!(": {e}"));
        cause = e.source();
    }
    line
}

/// Pauses every vCPU thread (the pause flag is set): kicks each until it has handed its
/// vCPU back. A thread that ended on its own hands its vCPU back as well.
fn pause_vcpus(threads: Vec<JoinHandle<VcpuFd>>) -> Vec<VcpuFd> {
    let begin = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && begin.elapsed() < Duration::from_secs(10) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            vcpu::kick(t);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    threads.into_iter().filter_map(|t| t.join().ok()).collect()
}

fn load_kernel(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<LoadedImage, VmError> {
    let low_end = memory::low_ram_end(config.memory);
    match &config.kernel {
        Kernel::BuiltIn => crate::loader::load(mem, &mut Cursor::new(TEST_GUEST_ELF), low_end)
            .map_err(|source| VmError::Load {
                name: "built-in test guest".into(),
                source,
            }),
        Kernel::Elf(path) => {
            let mut file = File::open(path).map_err(|source| VmError::OpenKernel {
                path: path.clone(),
                source,
            })?;
            crate::loader::load(mem, &mut file, low_end).map_err(|source| VmError::Load {
                name: path.display().to_string(),
                source,
            })
        }
    }
}

/// The VM's KVM routing: KVM itself, or (for a VM with the test harness, whose `INJECT`
/// request needs it) KVM with fault injection in front. A VM without the harness has no
/// fault injection on its routing path.
#[derive(Debug, Clone)]
pub enum VmRouting {
    /// KVM.
    Kvm(KvmRouting),
    /// KVM behind fault injection.
    Injecting(FaultInjecting<KvmRouting>),
}

impl RoutingBackend for VmRouting {
    fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()> {
        match self {
            Self::Kvm(r) => r.set_routes(routes),
            Self::Injecting(r) => r.set_routes(routes),
        }
    }

    fn assign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        match self {
            Self::Kvm(r) => r.assign_irqfd(fd, gsi),
            Self::Injecting(r) => r.assign_irqfd(fd, gsi),
        }
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        match self {
            Self::Kvm(r) => r.deassign_irqfd(fd, gsi),
            Self::Injecting(r) => r.deassign_irqfd(fd, gsi),
        }
    }
}

/// Where the vCPU areas and the mailbox go after an image ending at `image_end`.
fn place(config: &VmConfig, image_end: u64) -> Result<Placement, VmError> {
    Placement::new(image_end, config.cpus, memory::low_ram_end(config.memory)).ok_or(
        VmError::TooSmall {
            memory: config.memory,
            cpus: config.cpus,
            image_end,
        },
    )
}

/// Page tables, vCPU areas, command line and boot information.
fn write_boot_state(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    image_end: u64,
) -> Result<Placement, VmError> {
    let placement = place(config, image_end)?;
    x86::write_page_tables(mem, x86::identity_map_end(memory::ram_top(config.memory)))?;
    for cpu in 0..config.cpus {
        x86::write_cpu_area(mem, placement.cpu_area(cpu))?;
    }
    // NUL-terminated (a Linux kernel wants the NUL; the boot information has the length).
    let mut cmdline = config.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| VmError::BootInfo)?;
    let apic_ids: Vec<u32> = (0..config.cpus).collect();
    let info = BootInfo {
        mem_size: config.memory,
        cmdline: (CMDLINE_ADDR, config.cmdline.len() as u64),
        // Without the harness there is no mailbox, and its place is free RAM.
        mailbox: match config.harness {
            true => (placement.mailbox, placement.mailbox_size),
            false => (0, 0),
        },
        apic_ids: &apic_ids,
        free_start: match config.harness {
            true => placement.mailbox + placement.mailbox_size,
            false => placement.mailbox,
        },
        // Known once a vCPU exists (`tell_tsc_khz`).
        tsc_khz: 0,
    };
    let mut page = vec![0u8; hypercall::boot::PAGE_SIZE];
    info.encode(&mut page).map_err(|_| VmError::BootInfo)?;
    mem.write_slice(&page, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|_| VmError::BootInfo)?;
    Ok(placement)
}

/// Writes the TSC frequency KVM gives the vCPUs into the boot information (left 0, "not
/// known", if KVM cannot say).
fn tell_tsc_khz(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), VmError> {
    let Ok(khz) = vcpu.get_tsc_khz() else {
        return Ok(());
    };
    let at = BOOT_INFO_ADDR + hypercall::boot::offset::TSC_KHZ as u64;
    mem.write_obj(khz, GuestAddress(at))
        .map_err(|_| VmError::BootInfo)
}

/// A vCPU with its CPUID (which tells the guest the remapping table's size).
fn create_vcpu(
    vm: &VmFd,
    supported: &CpuId,
    index: u32,
    cpus: u32,
    table_size: u32,
    hidden: &[String],
) -> Result<VcpuFd, VmError> {
    let fail = |what| {
        move |source| VmError::Vcpu {
            index,
            what,
            source,
        }
    };
    let vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(fail("KVM_CREATE_VCPU"))?;
    let mut entries = supported.as_slice().to_vec();
    crate::cpuid::patch(&mut entries, index, cpus, table_size);
    crate::cpuid::hide(&mut entries, hidden);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::Vcpu {
        index,
        what: "building CPUID",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// A new vCPU's boot state: long mode at the image's entry point.
/// Where a booted VM starts.
#[derive(Debug, Clone, Copy)]
enum Entry {
    /// This VMM's boot protocol (`hypercall::boot`): every vCPU at the image's entry.
    Guest(u64),
    /// Linux's 64-bit boot protocol: the BSP at `startup_64`; the others wait for SIPI.
    Linux(crate::linux::LinuxBoot),
}

/// The ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG, DMAR) in the BIOS area.
fn write_acpi(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<(), VmError> {
    let platform = crate::acpi::Platform {
        apic_ids: (0..config.cpus).collect(),
        vtd_base: platform::VTD_BASE,
        ecam_base: devices::pci::ECAM_BASE,
        scopes: Vec::new(),
    };
    for (at, table) in crate::acpi::tables(&platform) {
        mem.write_slice(&table, GuestAddress(at))
            .map_err(|_| VmError::BootInfo)?;
    }
    Ok(())
}

fn boot_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    placement: &Placement,
    entry: Entry,
) -> Result<(), VmError> {
    let entry = match entry {
        Entry::Guest(at) => at,
        Entry::Linux(boot) => return boot_linux_vcpu(vcpu, index, placement, boot),
    };
    let fail = |what| {
        move |source| VmError::Vcpu {
            index,
            what,
            source,
        }
    };
    let area = placement.cpu_area(index);
    let sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&x86::long_mode_sregs(sregs, area))
        .map_err(fail("KVM_SET_SREGS"))?;
    vcpu.set_regs(&x86::entry_regs(entry, area, BOOT_INFO_ADDR, index))
        .map_err(fail("KVM_SET_REGS"))?;
    vcpu.set_fpu(&x86::initial_fpu())
        .map_err(fail("KVM_SET_FPU"))?;
    // Application processors of KVM's local APICs wait for INIT/SIPI; these start
    // directly at the entry point.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(fail("KVM_SET_MP_STATE"))
}

/// The BSP of a Linux boot in long mode at `startup_64` with `RSI` at the zero page,
/// interrupts off; the other vCPUs keep KVM's reset state and wait for INIT/SIPI.
fn boot_linux_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    placement: &Placement,
    boot: crate::linux::LinuxBoot,
) -> Result<(), VmError> {
    if index != 0 {
        return Ok(());
    }
    let fail = |what| {
        move |source| VmError::Vcpu {
            index,
            what,
            source,
        }
    };
    let sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    let area = placement.cpu_area(0);
    vcpu.set_sregs(&x86::linux_sregs(sregs, area, crate::linux::BOOT_GDT))
        .map_err(fail("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: boot.entry,
        rsi: boot.zero_page,
        rsp: area + hypercall::boot::STACK_SIZE - 8,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(fail("KVM_SET_REGS"))?;
    vcpu.set_fpu(&x86::initial_fpu())
        .map_err(fail("KVM_SET_FPU"))
}

/// With storm control on, a thread that delivers the coalesced interrupts of throttled
/// entries every window, until `stop`.
fn spawn_storm_ticker(
    path: &Arc<InterruptPath>,
    rate: u32,
    stop: Arc<AtomicBool>,
    gate: Arc<Mutex<()>>,
) -> io::Result<Option<JoinHandle<()>>> {
    if rate == 0 {
        return Ok(None);
    }
    let path = path.clone();
    std::thread::Builder::new()
        .name("irq-storms".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(irq::storm::WINDOW);
                // A snapshot holds the gate while the VM is paused.
                let _open = gate.lock().unwrap_or_else(PoisonError::into_inner);
                path.flush_throttled();
            }
        })
        .map(Some)
}

/// Kicks every vCPU thread until it has left `KVM_RUN`, then joins it; a thread still
/// running at `deadline` (inside a device call) is left to end on its own. Returns how
/// many were.
fn stop_vcpus(threads: Vec<JoinHandle<VcpuFd>>, deadline: Instant) -> u32 {
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            vcpu::kick(t);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut stuck = 0;
    for t in threads {
        if join_by(t, deadline).is_none() {
            stuck += 1;
        }
    }
    stuck
}

/// How long a stopping VM waits for its threads (vCPUs, harness, storm ticker, device
/// loop) before it ends without those still inside a device call.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Joins `thread` if it has ended by `deadline`; otherwise leaves it to finish on its
/// own (detached: what it holds is shared, and freed when it ends) and returns `None`.
pub(crate) fn join_by<T>(thread: JoinHandle<T>, deadline: Instant) -> Option<T> {
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if thread.is_finished() {
        thread.join().ok()
    } else {
        None
    }
}

/// Remapping faults recorded by the data path, by reason.
fn remap_faults(backing: &SharedBacking) -> Vec<(u8, u64)> {
    let path = backing.lock().path();
    FaultReason::ALL
        .iter()
        .map(|r| (r.code(), path.fault_log().count(*r)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Interrupts per vCPU from the harness counter table, if the guest keeps it.
fn guest_counts(mem: &GuestMemoryMmap, placement: &Placement, cpus: u32) -> Option<Vec<u64>> {
    let base = placement.mailbox;
    let valid: u32 = mem
        .read_obj(GuestAddress(base + harness::offset::COUNTS_VALID as u64))
        .ok()?;
    if valid != 1 {
        return None;
    }
    (0..cpus as usize)
        .map(|cpu| {
            (32..=255u8)
                .map(|v| {
                    let at = GuestAddress(base + harness::counter_offset(cpu, v) as u64);
                    mem.read_obj::<u32>(at).map(u64::from).ok()
                })
                .sum()
        })
        .collect()
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
