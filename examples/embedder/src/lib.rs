//! A small VMM that gives its guest interrupt remapping, an IMS device and the IRTE
//! hypercall by embedding the irvm crates, written only against their public API (it
//! does not depend on the `vmm` package). Read [`run`] top to bottom; the README's "For
//! VMM authors" walks through the same steps.
//!
//! 1. A KVM VM with the in-kernel irqchip and guest RAM, as any VMM makes them.
//! 2. The interrupt core over KVM's routing table (`irvm_irq`): a `Backing` behind an
//!    `InterruptCore`, whose handle is the front door every part below holds.
//! 3. The VT-d unit on its own MMIO bus (`irvm_devices::viommu`), linked to the core as
//!    its fault sink and table mirror.
//! 4. A PCI root bus in this VMM's own layout with one slot-array IMS device.
//! 5. A cloud-hypervisor-shaped `InterruptSourceGroup` for another device's MSI-X vectors
//!    ([`sources`]), whose notifier eventfds the core keeps attached to their remapped
//!    targets.
//! 6. The hypercall dispatcher (`irvm_devices::dispatch`) and a vCPU exit loop in which a
//!    doorbell `out` is one call.
//! 7. A guest ([`guest`]) that allocates entries with the hypercall, programs the IMS slot,
//!    and counts what both sources deliver.

pub mod guest;
pub mod sources;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use irvm_devices::bus::{BusDevice, ConcurrentBusDevice};
use irvm_devices::dispatch::{answer_doorbell, Dispatcher, HypercallStats};
use irvm_devices::ims::slots::ImsSlots;
use irvm_devices::pci::{MmioWindow, PciFunction, PciLayout, PciRoot};
use irvm_devices::viommu::dma::DmaMemory;
use irvm_devices::viommu::{Vtd, VtdDevice, WeakVtd};
use irvm_hypercall::platform::HYPERCALL_PORT;
use irvm_irq::backing::{Backing, Limits};
use irvm_irq::control::InterruptControl;
use irvm_irq::{InterruptCore, KvmRouting, MsiMessage, RouteTable};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use sources::{InterruptSourceGroup, MsiIrqSourceConfig, RemappedMsiGroup};

/// The IMS device's requester ID (00:03.0).
pub const IMS_REQUESTER: u16 = 0x0018;
/// The MSI-X device's requester ID (00:04.0; a device this VMM does not model, such as a
/// VFIO or vfio-user device, represented by its interrupt group).
pub const MSIX_REQUESTER: u16 = 0x0020;
/// Where the VT-d unit's registers are.
pub const VTD_BASE: u64 = 0xfed9_0000;
/// This VMM's PCI layout (not the `vmm` binary's).
pub const LAYOUT: PciLayout = PciLayout {
    ecam_base: 0xd000_0000,
    window_base: 0xc000_0000,
    window_size: 0x1000_0000,
    io_base: 0x6000,
    io_size: 0x1000,
};
/// How long a run may take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Anything that stopped the run.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What a run found.
#[derive(Debug)]
pub struct Report {
    /// Interrupts the guest counted from the IMS device.
    pub ims: u32,
    /// Interrupts the guest counted from the MSI-X device's notifier.
    pub msix: u32,
    /// The VT-d version register as the guest read it.
    pub vtd_version: u32,
    /// What the guest wrote to the exit port: 0, or a failed hypercall's status.
    pub guest_status: u32,
    /// The dispatcher's counters.
    pub hypercalls: HypercallStats,
}

extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The guest's vCPU, at its entry; sharing its registers with KVM if asked.
fn new_vcpu(kvm: &Kvm, vm: &VmFd, bar0: u64, share_registers: bool) -> Result<VcpuFd, Error> {
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    vcpu.set_sregs(&guest::sregs(vcpu.get_sregs()?))?;
    vcpu.set_regs(&guest::regs(bar0, VTD_BASE))?;
    if share_registers {
        // Hypercalls answered through kvm_run, without an ioctl of their own (where KVM
        // offers it).
        irvm_irq::kvm::share_registers(vm, &mut vcpu);
    }
    Ok(vcpu)
}

/// Boots the guest, has each source deliver `count` interrupts (each after the one before
/// was counted), and reports. The vCPU shares its registers with KVM, so hypercalls are
/// answered without an ioctl ([`run_with`] chooses).
///
/// # Errors
/// KVM, memory or device set-up failed, a source's interrupt was not counted in time, or
/// the guest did not finish before the deadline.
pub fn run(count: u32) -> Result<Report, Error> {
    run_with(count, true)
}

/// As [`run`]; with `share_registers` false the hypercalls take the portable path
/// (complete the `out`, then read and write the registers: three ioctls).
///
/// # Errors
/// As [`run`].
pub fn run_with(count: u32, share_registers: bool) -> Result<Report, Error> {
    // 1. The VM and its RAM.
    let kvm = Kvm::new()?;
    let vm = Arc::new(kvm.create_vm()?);
    vm.create_irq_chip()?;
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(guest::RAM)?)])?;
    let host = mem
        .find_region(GuestAddress(0))
        .ok_or("no RAM region")?
        .get_host_address(MemoryRegionAddress(0))? as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: guest::RAM,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the region is the mapping `mem` owns; `mem` (and its clones the devices
    // hold) outlive the VM, whose last user is the vCPU thread joined below.
    unsafe { vm.set_user_memory_region(region)? };
    // What the devices see of RAM: the same regions, through vm-memory (a dirty bitmap
    // would see their writes).
    let space = GuestMemoryAtomic::new(mem.clone());

    // 2. The interrupt core. Compatibility-format interrupts start blocked; the VT-d
    //    unit allows them while its remapping is off.
    let routing = KvmRouting::new(vm.clone());
    let routes = RouteTable::new(routing.clone(), routing.route_limit())?;
    let limits = Limits {
        table_size: 256,
        ..Limits::default()
    };
    let core = InterruptCore::new(Backing::new(routes, limits)?);

    // 3. The VT-d unit: the core's fault sink and the mirror of what requesters write.
    let vtd = Arc::new(Mutex::new(Vtd::new(
        core.handle(),
        Arc::new(space.clone()),
        Arc::new(routing.clone()),
    )));
    let path = core.path();
    path.set_fault_sink(WeakVtd::to(&vtd));
    core.set_mirror(WeakVtd::to(&vtd));
    path.set_compat_injector(Arc::new(routing));
    // Its DMA remapping: devices' memory goes through it, its faults come back to it.
    let dma = vtd.lock().unwrap_or_else(PoisonError::into_inner).dma();
    dma.set_fault_sink(WeakVtd::to(&vtd));

    // 4. PCI: one slot-array IMS device, its BAR placed in our window, its DMA
    //    translated by the VT-d unit for its requester ID (while the guest turns
    //    translation on; this guest does not, so the device sees RAM as it is).
    let ims = Arc::new(Mutex::new(ImsSlots::new(
        8,
        1,
        IMS_REQUESTER,
        path,
        dma.memory(IMS_REQUESTER, mem.clone()),
    )?));
    let mut root = PciRoot::new(LAYOUT);
    root.add(3, 0, ims.clone()).ok_or("00:03.0 is taken")?;
    root.assign_bars();
    let bar0 = {
        let dev = ims.lock().unwrap_or_else(PoisonError::into_inner);
        let b = dev.config().bytes(0x10, 8);
        u64::from_le_bytes(b.try_into()?) & !0xf
    };
    let window = MmioWindow(Arc::new(Mutex::new(root)));

    // 5. The MSI-X device's vectors, remapped.
    let group = Arc::new(RemappedMsiGroup::new(core.handle(), MSIX_REQUESTER, 1)?);

    // 6. The dispatcher, for the two devices' requester IDs.
    let dispatcher = Arc::new(Dispatcher::new(
        core.handle(),
        Arc::new(space),
        vec![0],
        vec![IMS_REQUESTER, MSIX_REQUESTER],
        100_000,
    ));

    // 7. The guest and its vCPU.
    let program = guest::program(IMS_REQUESTER, MSIX_REQUESTER, count);
    guest::load(&mem, &program)?;
    let mut vcpu = new_vcpu(&kvm, &vm, bar0, share_registers)?;

    register_signal_handler(SIGRTMIN(), kicked)?;
    let late = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    let parts = Parts {
        vtd: VtdDevice(vtd),
        window,
        dispatcher: dispatcher.clone(),
        group,
        ims,
        mem: mem.clone(),
        late: late.clone(),
    };
    let vcpu_thread = thread::Builder::new().name("vcpu0".into()).spawn(move || {
        let status = exit_loop(&mut vcpu, parts, count);
        let _ = done_tx.send(());
        status
    })?;
    if done_rx.recv_timeout(DEADLINE).is_err() {
        late.store(true, Ordering::Release);
        let _ = vcpu_thread.kill(SIGRTMIN());
    }
    let guest_status = vcpu_thread
        .join()
        .map_err(|_| "the vCPU thread panicked")??;
    let counter = |at: u64| mem.read_obj::<u32>(GuestAddress(guest::COUNTERS + at));
    Ok(Report {
        ims: counter(0)?,
        msix: counter(4)?,
        vtd_version: counter(8)?,
        guest_status,
        hypercalls: dispatcher.stats(),
    })
}

/// What the vCPU thread's exit loop serves.
struct Parts {
    vtd: VtdDevice,
    window: MmioWindow,
    dispatcher: Arc<Dispatcher>,
    group: Arc<RemappedMsiGroup>,
    ims: Arc<Mutex<ImsSlots<DmaMemory>>>,
    mem: GuestMemoryMmap,
    late: Arc<AtomicBool>,
}

/// Runs vCPU 0 until the guest writes the exit port (its status) or is too late: port I/O
/// for the hypercall and the guest's two ports, MMIO for the VT-d unit and the PCI window.
fn exit_loop(vcpu: &mut VcpuFd, mut p: Parts, count: u32) -> Result<u32, Error> {
    let mut sources: Vec<thread::JoinHandle<Result<(), Error>>> = Vec::new();
    let status = loop {
        let out = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut word = [0u8; 4];
                if let Some(w) = word.get_mut(..data.len()) {
                    w.copy_from_slice(data);
                }
                Some((port, data.len(), u32::from_le_bytes(word)))
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio(&mut p.vtd, &p.window, addr, Access::Read(data));
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio(&mut p.vtd, &p.window, addr, Access::Write(data));
                None
            }
            Ok(other) => return Err(format!("unexpected exit {other:?}").into()),
            Err(e) if e.errno() == libc::EINTR && p.late.load(Ordering::Acquire) => {
                return Err("the guest did not finish in time".into())
            }
            Err(e) if e.errno() == libc::EINTR => None,
            Err(e) => return Err(e.into()),
        };
        match out {
            // The hypercall: one call completes the `out` and answers it.
            Some((HYPERCALL_PORT, width, _)) => {
                answer_doorbell(vcpu, Some(&*p.dispatcher), width == 4)?;
            }
            // The guest's entry for the MSI-X vector: program the vector with its
            // remappable message, as the guest's driver would through the MSI-X table.
            Some((guest::READY_PORT, _, entry)) => {
                let msg = MsiMessage::remappable(u16::try_from(entry)?, None);
                let config = MsiIrqSourceConfig {
                    high_addr: msg.address_hi(),
                    low_addr: msg.address_lo(),
                    data: msg.data,
                    devid: u32::from(MSIX_REQUESTER),
                };
                p.group.update(0, config, false)?;
                sources = start_sources(count, &p.ims, &p.group, &p.mem)?;
            }
            Some((guest::EXIT_PORT, _, status)) => break status,
            _ => {}
        }
    };
    for s in sources {
        s.join().map_err(|_| "a source thread panicked")??;
    }
    Ok(status)
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// The MMIO bus: the VT-d unit's page, the PCI window; reads of anything else are all
/// ones and writes are dropped.
fn mmio(vtd: &mut VtdDevice, window: &MmioWindow, addr: u64, access: Access<'_>) {
    let in_window = addr.wrapping_sub(LAYOUT.window_base) < LAYOUT.window_size;
    match access {
        Access::Read(data) if addr.wrapping_sub(VTD_BASE) < 0x1000 => {
            vtd.read(addr - VTD_BASE, data);
        }
        Access::Read(data) if in_window => window.read(addr - LAYOUT.window_base, data),
        Access::Read(data) => data.fill(0xff),
        Access::Write(data) if addr.wrapping_sub(VTD_BASE) < 0x1000 => {
            vtd.write(addr - VTD_BASE, data);
        }
        Access::Write(data) if in_window => window.write(addr - LAYOUT.window_base, data),
        Access::Write(_) => {}
    }
}

/// Waits until the guest counter at `at` reaches `n`.
fn counted(mem: &GuestMemoryMmap, at: u64, n: u32) -> Result<(), Error> {
    let begin = Instant::now();
    while mem.read_obj::<u32>(GuestAddress(guest::COUNTERS + at))? < n {
        if begin.elapsed() > Duration::from_secs(10) {
            return Err(format!("interrupt {n} at counter {at} was not counted").into());
        }
        thread::sleep(Duration::from_micros(50));
    }
    Ok(())
}

/// The two sources, each on its own thread: the IMS device raising its slot 0 (as its
/// work would), and another party writing the MSI-X vector's notifier (as VFIO or a
/// device process would). Each waits until the guest counted its last interrupt.
fn start_sources(
    count: u32,
    ims: &Arc<Mutex<ImsSlots<DmaMemory>>>,
    group: &Arc<RemappedMsiGroup>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<thread::JoinHandle<Result<(), Error>>>, Error> {
    let notifier = group.notifier(0).ok_or("no notifier")?;
    let (ims, mem_a, mem_b) = (ims.clone(), mem.clone(), mem.clone());
    let device = thread::spawn(move || -> Result<(), Error> {
        for n in 1..=count {
            ims.lock().unwrap_or_else(PoisonError::into_inner).raise(0);
            counted(&mem_a, 0, n)?;
        }
        Ok(())
    });
    let outside = thread::spawn(move || -> Result<(), Error> {
        for n in 1..=count {
            notifier.write(1)?;
            counted(&mem_b, 4, n)?;
        }
        Ok(())
    });
    Ok(vec![device, outside])
}
