//! Assembling a VM, for a boot and for a restore alike: each component is built by one
//! function that takes the saved state (`Some` when restoring, `None` when booting), so
//! the two paths cannot drift apart. The order is the dependency order: KVM and memory,
//! the image or the saved RAM, the interrupt core, the VT-d unit, the IOAPIC, the UART,
//! the buses and PCI devices, the vCPUs, the test harness (when asked for) and the
//! hypercall dispatcher.

use super::*;
use crate::refused::Completions;

/// The UART as the bus and the VM share it.
pub(super) type SharedSerial = Arc<Mutex<SerialConsole<Box<dyn Write + Send>>>>;

/// What the host's KVM offers, read once before the VM is made.
pub(super) struct Host {
    kvm: Kvm,
    cpuid: kvm_bindings::CpuId,
    msr_list: Vec<u32>,
}

impl Host {
    /// Opens the KVM device and checks what the VM needs.
    pub(super) fn open(config: &VmConfig) -> Result<Self, VmError> {
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Os("install the vCPU kick handler", e))?;
        let open_error = |source| VmError::OpenKvm {
            path: config.run.kvm_device.clone(),
            source,
        };
        let device = CString::new(config.run.kvm_device.as_os_str().as_bytes())
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
        if config.machine.cpus as usize > max {
            return Err(VmError::TooManyVcpus {
                cpus: config.machine.cpus,
                max,
            });
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("read the supported CPUID", e))?;
        // Snapshots are taken when the run plans one or the control API asks.
        let snapshots = config.run.snapshot.is_some() || config.run.api_socket.is_some();
        let msr_list = match snapshots {
            true => kvm
                .get_msr_index_list()
                .map_err(|e| VmError::Kvm("read the MSRs KVM saves", e))?
                .as_slice()
                .to_vec(),
            false => Vec::new(),
        };
        Ok(Self {
            kvm,
            cpuid,
            msr_list,
        })
    }
}

/// The test harness's parts the VM keeps (the harness itself runs on its thread).
pub(super) struct HarnessParts {
    pub(super) fired: Arc<Vec<std::sync::atomic::AtomicU64>>,
    pub(super) measurements: Arc<Mutex<crate::harness::Measurements>>,
    /// Held while the harness serves a request (a snapshot takes it to pause it).
    pub(super) idle: Arc<Mutex<()>>,
    pub(super) thread: Option<JoinHandle<()>>,
    /// Wakes the harness thread (which waits for rings with no timeout) to see the stop.
    pub(super) wake: Option<mpsc::SyncSender<()>>,
}

/// A VM: the KVM VM, its memory and every part, owned in one place. Fields drop in
/// declaration order: the parts (which hold clones of the memory and of the VM fd) first,
/// then the VM fd, then the memory, so guest memory outlives every user of it (the SAFETY
/// note of `memory::register`).
pub(super) struct Vm<'a> {
    pub(super) config: &'a VmConfig,
    pub(super) msr_list: Vec<u32>,
    pub(super) image_end: u64,
    pub(super) placement: Placement,
    pub(super) restored_from: Option<PathBuf>,
    /// vCPUs made and not running yet (taken by [`Vm::run`]).
    pub(super) vcpus: Vec<VcpuFd>,
    pub(super) threads: Vec<JoinHandle<VcpuFd>>,
    pub(super) shared: VcpuShared,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) storm_gate: Arc<Mutex<()>>,
    pub(super) harness: HarnessParts,
    pub(super) dispatcher: Arc<Dispatcher>,
    pub(super) pci: PciDevices,
    pub(super) serial: SharedSerial,
    pub(super) ioapic: Arc<Mutex<IoApic>>,
    pub(super) vtd: Arc<Mutex<Vtd>>,
    pub(super) path: Arc<InterruptPath>,
    pub(super) backing: SharedBacking,
    pub(super) taken: Option<SnapshotTaken>,
    /// The routing path's fault-injection switches (a VM with the test harness).
    pub(super) injected_faults: Option<Arc<irq::port::InjectedFaults>>,
    pub(super) vm: Arc<VmFd>,
    pub(super) mem: GuestMemoryMmap,
}

/// Where the image (or the saved RAM) put things.
struct Loaded {
    saved: Option<Box<VmSnapshot>>,
    restored_from: Option<PathBuf>,
    entry: Option<Entry>,
    image_end: u64,
    placement: Placement,
}

/// The KVM VM, with the split irqchip and (above 255 vCPUs) 32-bit APIC IDs.
fn create_vm(kvm: &Kvm, config: &VmConfig) -> Result<Arc<VmFd>, VmError> {
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| VmError::Kvm("create the VM", e))?,
    );
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    create_split_irqchip(&vm)?;
    // Without it a kernel's `syscall` from user space is not watched; on a KVM that runs
    // guest code natively nothing needs it.
    crate::refused::syscall::install(&vm);
    if config.machine.cpus > X2APIC_ONLY_ABOVE {
        enable_x2apic_api(&vm)?;
    }
    Ok(vm)
}

/// Guest RAM filled: the image and the boot structures for a boot, the saved RAM (and
/// the VM's clock and irqchip state) for a restore.
fn load(
    config: &VmConfig,
    start: Start,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<Loaded, VmError> {
    let (saved, restored_from, entry, image_end) = match start {
        Start::Boot => match &config.machine.kernel {
            Kernel::Elf(path)
                if crate::linux::is_bzimage(path) || crate::linux::has_pvh_note(path) =>
            {
                let load = if crate::linux::is_bzimage(path) {
                    crate::linux::load
                } else {
                    crate::linux::load_pvh
                };
                let boot = load(
                    mem,
                    path,
                    config.machine.initrd.as_deref(),
                    &config.machine.cmdline,
                    config.machine.memory,
                    memory::low_ram_end(config.machine.memory),
                )
                .map_err(|source| VmError::Linux {
                    path: path.clone(),
                    source,
                })?;
                (None, None, Some(Entry::Linux(boot)), boot.kernel_end)
            }
            _ => {
                let image = load_kernel(mem, config)?;
                (None, None, Some(Entry::Guest(image.entry)), image.end)
            }
        },
        Start::Restore(snap, mut file, from) => {
            snapshot::load_memory(&mut file, &from, mem, config.machine.memory)?;
            snapshot::restore_vm(vm, &snap.vm)?;
            let end = snap.image_end;
            (Some(snap), Some(from), None, end)
        }
    };
    let placement = match (&saved, entry) {
        (None, Some(entry)) => {
            let placement = write_boot_state(mem, config, image_end)?;
            if let Entry::Linux(_) = entry {
                x86::write_linux_gdt(
                    mem,
                    crate::linux::BOOT_GDT,
                    placement.cpu_area(0) + crate::layout::CPU_AREA_TSS,
                )?;
            }
            write_acpi(mem, config)?;
            placement
        }
        _ => place(config, image_end)?,
    };
    Ok(Loaded {
        saved,
        restored_from,
        entry,
        image_end,
        placement,
    })
}

/// The IOAPIC as the input of devices' INTx.
struct IoApicInput(Arc<Mutex<IoApic>>);

impl crate::vfio_user::function::IntxInput for IoApicInput {
    fn assert(&self, pin: usize) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .assert_line(pin)
    }

    fn resample(&self, pin: usize, unmask: Arc<dyn Fn() + Send + Sync>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_resample(pin, Some(unmask));
    }
}

/// The PCI devices, new or from the snapshot. Devices in other processes pulse an IOAPIC
/// input for INTx, and map the parts of their BARs they let be mapped into KVM slots.
fn build_pci(
    config: &VmConfig,
    core: &SharedBacking,
    (vm, space, vtd): (&Arc<VmFd>, &DefaultMemory, &Arc<Mutex<Vtd>>),
    ioapic: &Arc<Mutex<IoApic>>,
    saved: Option<&VmSnapshot>,
) -> Result<PciDevices, VmError> {
    let intx: crate::pci::IntxSink = Arc::new(IoApicInput(ioapic.clone()));
    let devices = &config.machine.devices;
    let core = core.handle();
    let dma = vtd
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .dma();
    let mem = (space, &dma);
    Ok(match saved {
        None => {
            let slots: Arc<dyn crate::vfio_user::function::BarMapper> =
                Arc::new(crate::memory::BarSlots::new(vm.clone()));
            PciDevices::new(devices, &core, mem, &intx, Some(&slots))?
        }
        Some(s) => PciDevices::restore(devices, &s.pci, &core, mem, &intx)?,
    })
}

/// The interrupt core over KVM's routing (behind fault injection only with the test
/// harness), new or restored; and the injection switches when there are any.
fn build_core(
    config: &VmConfig,
    vm: &Arc<VmFd>,
    saved: Option<&VmSnapshot>,
) -> Result<(SharedBacking, Option<Arc<irq::port::InjectedFaults>>), VmError> {
    let routing = KvmRouting::new(vm.clone());
    let kvm_limit = routing.route_limit();
    let limit = config.machine.max_routes.map_or(kvm_limit, |cap| {
        kvm_limit.min(cap.saturating_add(irq::routes::LEGACY_GSI_COUNT))
    });
    // One line (eventfd) per route at most, plus the VM's own descriptors.
    raise_fd_limit(u64::from(limit) + FD_HEADROOM + u64::from(config.machine.cpus))?;
    let (routing, injected_faults) = if config.machine.harness {
        let injecting = FaultInjecting::new(routing);
        let faults = injecting.faults();
        (VmRouting::Injecting(injecting), Some(faults))
    } else {
        (VmRouting::Kvm(routing), None)
    };
    let routes = RouteTable::with_irqchip(routing, limit, Irqchip::Split)?;
    let backing = match saved {
        None => Backing::new(
            routes,
            Limits {
                max_per_device: config.machine.entries_per_requester(),
                ..Limits::default()
            },
        )?,
        Some(s) => Backing::restore(routes, &s.interrupts).map_err(SnapshotError::from)?,
    };
    // Devices and the dispatcher hold the core through its front door (`handle`); the
    // VMM keeps the concrete core for statistics, snapshots and the harness.
    Ok((InterruptCore::new(backing), injected_faults))
}

/// The VT-d unit, linked to the core: it hears of faults and of what requesters write
/// (so its table in guest memory shows the hypercall's entries too); its own event
/// interrupts, and compatibility-format requests while allowed, are injected directly.
fn build_vtd(
    config: &VmConfig,
    core: &SharedBacking,
    vm: &Arc<VmFd>,
    space: &DefaultMemory,
    saved: Option<&VmSnapshot>,
) -> Result<Arc<Mutex<Vtd>>, VmError> {
    let injector: Arc<dyn MsiInjector> = Arc::new(KvmRouting::new(vm.clone()));
    let ram: SharedRam = Arc::new(space.clone());
    let vtd = match saved {
        None => Vtd::new(core.handle(), ram, injector.clone()),
        Some(s) => Vtd::restore(core.handle(), ram, injector.clone(), s.vtd.clone())
            .map_err(SnapshotError::from)?,
    };
    let vtd = Arc::new(Mutex::new(vtd));
    let path = core.path();
    path.set_fault_sink(WeakVtd::to(&vtd));
    core.set_mirror(WeakVtd::to(&vtd));
    vtd.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .dma()
        .set_fault_sink(WeakVtd::to(&vtd));
    path.set_compat_injector(injector);
    path.set_storm_rate(config.machine.irq_rate);
    Ok(vtd)
}

/// The IOAPIC: its interrupts are MSIs from requester ff:00.0 (as the DMAR says) into the
/// interrupt core, which keeps its level pins' routes so that KVM reports their EOIs.
fn build_ioapic(
    core: &SharedBacking,
    saved: Option<&VmSnapshot>,
) -> Result<Arc<Mutex<IoApic>>, VmError> {
    let output = Arc::new(RemappingOutput::new(
        core.handle(),
        devices::viommu::dmar::IOAPIC_SOURCE_ID,
    ));
    let ioapic = match saved {
        None => IoApic::new(output),
        Some(s) => IoApic::restore(output, s.vm.ioapic.clone()).map_err(|source| {
            SnapshotError::Device {
                what: "IOAPIC",
                source,
            }
        })?,
    };
    Ok(Arc::new(Mutex::new(ioapic)))
}

/// COM1, interrupting through IOAPIC pin 4; its output watched for `--until`.
fn build_serial(
    config: &VmConfig,
    ioapic: &Arc<Mutex<IoApic>>,
    console: Box<dyn Write + Send>,
    events: &Sender<VmEvent>,
    saved: Option<&VmSnapshot>,
) -> Result<SharedSerial, VmError> {
    let com1_pin = ioapic.clone();
    let irq = IrqLine::new(move || {
        com1_pin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pulse(COM1_PIN);
        Ok(())
    });
    let console: Box<dyn Write + Send> = match &config.run.until {
        Some(text) => Box::new(ConsoleWatch::new(console, text, events.clone())),
        None => console,
    };
    let serial = match saved {
        None => SerialConsole::new(irq, console),
        Some(s) => SerialConsole::restore(irq, console, &s.serial).map_err(|source| {
            SnapshotError::Device {
                what: "UART",
                source,
            }
        })?,
    };
    Ok(Arc::new(Mutex::new(serial)))
}

/// The platform's devices on the buses: COM1, debug-exit, the harness doorbell (only
/// with the harness), the VT-d unit, the IOAPIC, and PCI (configuration and BARs).
fn build_buses(
    config: &VmConfig,
    parts: (&SharedSerial, &Arc<Mutex<Vtd>>, &Arc<Mutex<IoApic>>),
    pci: &PciDevices,
    events: &Sender<VmEvent>,
    rings: &mpsc::SyncSender<()>,
) -> Result<Buses, VmError> {
    let (serial, vtd, ioapic) = parts;
    let mut buses = Buses::default();
    let mut ports: Vec<(u16, u16, &'static str, SharedDevice)> = vec![
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
    if config.machine.harness {
        ports.push((
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
    pci.place(&mut buses)
        .map_err(|(name, e)| VmError::Bus(name, e))?;
    for (port, len, name, device) in ports {
        buses
            .pio
            .insert(u64::from(port), u64::from(len), device)
            .map_err(|e| VmError::Bus(name, e))?;
    }
    buses.hypercall_port = Some(platform::HYPERCALL_PORT);
    buses.null_port = config.machine.harness.then_some(platform::NULL_PORT);
    Ok(buses)
}

/// The vCPUs, each with its CPUID, in its boot state or its saved one.
fn build_vcpus(
    vm: &VmFd,
    host: &Host,
    config: &VmConfig,
    table_size: u32,
    loaded: &Loaded,
    mem: &GuestMemoryMmap,
) -> Result<Vec<VcpuFd>, VmError> {
    let mut vcpus = Vec::with_capacity(config.machine.cpus as usize);
    for index in 0..config.machine.cpus {
        let vcpu = create_vcpu(
            vm,
            &host.cpuid,
            index,
            config.machine.cpus,
            table_size,
            &config.machine.cpuid_hide,
        )?;
        match (&loaded.saved, loaded.entry) {
            (Some(s), _) => {
                let state = s
                    .vcpus
                    .get(index as usize)
                    .ok_or_else(|| SnapshotError::Invalid(format!("no state for vCPU {index}")))?;
                snapshot::restore_vcpu(&vcpu, index, state)?;
            }
            (None, Some(entry)) => boot_vcpu(&vcpu, index, &loaded.placement, entry)?,
            (None, None) => {}
        }
        vcpus.push(vcpu);
    }
    if let (None, Some(_), Some(vcpu)) = (&loaded.saved, loaded.entry, vcpus.first()) {
        tell_tsc_khz(mem, vcpu)?;
    }
    Ok(vcpus)
}

/// What the test harness needs to serve a guest, and its thread (only when the run
/// asked for the harness: without it there is no doorbell, no thread, and its
/// requester IDs are no devices of this VM).
#[expect(
    clippy::too_many_arguments,
    reason = "the harness reaches into every part"
)]
fn build_harness(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    placement: &Placement,
    core: &SharedBacking,
    parts: (&PciDevices, &Arc<Mutex<IoApic>>),
    stop: &Arc<AtomicBool>,
    times: &Arc<HypercallTimes>,
    events: &Sender<VmEvent>,
    faults: Option<Arc<irq::port::InjectedFaults>>,
    rings: (mpsc::SyncSender<()>, mpsc::Receiver<()>),
    restoring: bool,
) -> Result<HarnessParts, VmError> {
    let (pci, ioapic) = parts;
    let (rings, ring_rx) = rings;
    let mut harness = Harness::new(
        mem.clone(),
        placement.mailbox,
        (0..config.machine.cpus).collect(),
        core.clone(),
        stop.clone(),
    )
    .with_slot_devices(pci.slot_devices())
    .with_remote_slot_devices(pci.remote_slot_devices())
    .with_pci_functions(pci.functions())
    .with_hypercall_times(times.clone())
    .with_ioapic(ioapic.clone());
    if let Some(faults) = faults {
        harness = harness.with_faults(faults);
    }
    if config.run.snapshot.is_some() {
        harness = harness.with_snapshots(events.clone());
    }
    if config.machine.harness && restoring && harness.unserved().is_some() {
        // Rung before the snapshot, not done when it was taken: serve it now.
        let _ = rings.try_send(());
    }
    let fired = harness.fired();
    let measurements = harness.measurements();
    let idle = harness.idle_lock();
    let thread = match config.machine.harness {
        true => Some(
            harness
                .spawn(ring_rx)
                .map_err(|e| VmError::Os("start the harness thread", e))?,
        ),
        false => None,
    };
    Ok(HarnessParts {
        fired,
        measurements,
        idle,
        wake: thread.is_some().then_some(rings),
        thread,
    })
}

impl<'a> Vm<'a> {
    /// Builds the VM `config` describes, fresh (`Start::Boot`) or from a snapshot; with
    /// the receiver of what its vCPUs and devices report.
    pub(super) fn assemble(
        config: &'a VmConfig,
        host: &Host,
        start: Start,
        console: Box<dyn Write + Send>,
    ) -> Result<(Self, mpsc::Receiver<VmEvent>), VmError> {
        let vm = create_vm(&host.kvm, config)?;
        // A device in another process maps guest RAM for DMA: then RAM is a memory file.
        let remote = config
            .machine
            .devices
            .iter()
            .any(|d| matches!(d.kind, crate::config::DeviceKind::VfioUser { .. }));
        let mem = if remote {
            memory::allocate_shared(config.machine.memory)?
        } else {
            memory::allocate(config.machine.memory)?
        };
        memory::register(&vm, &mem)?;
        // What the devices and the dispatcher see of guest memory: the same regions.
        let space = DefaultMemory::new(mem.clone());
        let loaded = load(config, start, &vm, &mem)?;
        let saved = loaded.saved.as_deref();

        let (backing, injected_faults) = build_core(config, &vm, saved)?;
        let table_size = backing.lock().limits().table_size;
        let vtd = build_vtd(config, &backing, &vm, &space, saved)?;
        let ioapic = build_ioapic(&backing, saved)?;
        let (events, event_rx) = mpsc::channel();
        let serial = build_serial(config, &ioapic, console, &events, saved)?;
        let path = backing.path();
        let pci = build_pci(config, &backing, (&vm, &space, &vtd), &ioapic, saved)?;
        let (rings, ring_rx) = mpsc::sync_channel(1);
        let buses = build_buses(config, (&serial, &vtd, &ioapic), &pci, &events, &rings)?;
        let vcpus = build_vcpus(&vm, host, config, table_size, &loaded, &mem)?;

        let stop = Arc::new(AtomicBool::new(false));
        let hypercall_times = Arc::new(HypercallTimes::default());
        let harness = build_harness(
            config,
            &mem,
            &loaded.placement,
            &backing,
            (&pci, &ioapic),
            &stop,
            &hypercall_times,
            &events,
            injected_faults.clone(),
            (rings, ring_rx),
            saved.is_some(),
        )?;
        let mut requesters = match config.machine.harness {
            true => vec![HARNESS_SOURCE_ID, FOREIGN_SOURCE_ID],
            false => Vec::new(),
        };
        requesters.extend(pci.requesters());
        requesters.sort_unstable();
        let dispatcher = Arc::new(Dispatcher::new(
            backing.handle(),
            Arc::new(space.clone()),
            (0..config.machine.cpus).collect(),
            requesters,
            config.machine.hypercall_rate,
        ));
        if let Some(saved) = saved {
            dispatcher
                .restore_accepted_features(&saved.hypercall_features)
                .map_err(|why| VmError::Snapshot(SnapshotError::Invalid(why)))?;
        }
        let shared = VcpuShared {
            buses: Arc::new(buses),
            counters: Arc::new(ExitCounters::default()),
            stop: stop.clone(),
            pause: Arc::new(AtomicBool::new(false)),
            events,
            hypercalls: Some(dispatcher.clone()),
            hypercall_times,
            memory: Some(mem.clone()),
            completions: Arc::new(Completions::default()),
            first_entry: Arc::default(),
        };
        let vm = Self {
            config,
            msr_list: host.msr_list.clone(),
            image_end: loaded.image_end,
            placement: loaded.placement,
            restored_from: loaded.restored_from,
            vcpus,
            threads: Vec::new(),
            shared,
            stop,
            storm_gate: Arc::new(Mutex::new(())),
            harness,
            dispatcher,
            pci,
            serial,
            ioapic,
            vtd,
            path,
            backing,
            taken: None,
            injected_faults,
            vm,
            mem,
        };
        Ok((vm, event_rx))
    }
}
