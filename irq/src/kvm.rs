//! The KVM side of the port (feature `kvm`, on by default): [`KvmRouting`] implements
//! [`RoutingBackend`] and [`MsiInjector`] over a `VmFd`, `VcpuFd` implements
//! [`DoorbellVcpu`], and the VM set-up the interrupt core relies on is here as functions an
//! embedder calls once: [`create_split_irqchip`], [`enable_x2apic_api`], and per vCPU
//! [`share_registers`] (hypercalls answered without an ioctl). Without the
//! feature the crate has no KVM dependency and [`RoutingBackend`] is the only seam.

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
    KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X2APIC_API, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_SYNC_X86_REGS, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
    KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Cap, SyncReg, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::msi::MsiMessage;
use crate::port::{DoorbellVcpu, Gsi, MsiInjector, RouteEntry, RouteKind, RoutingBackend};
use crate::routes::{IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, LEGACY_GSI_COUNT};

const _: () = assert!(
    IRQCHIP_PIC_MASTER == kvm_bindings::KVM_IRQCHIP_PIC_MASTER
        && IRQCHIP_PIC_SLAVE == kvm_bindings::KVM_IRQCHIP_PIC_SLAVE
        && IRQCHIP_IOAPIC == kvm_bindings::KVM_IRQCHIP_IOAPIC
);

fn kernel(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Creates the split irqchip (`KVM_CAP_SPLIT_IRQCHIP`) with the 24 IOAPIC pins the core's
/// `Irqchip::Split` table expects: local APICs in KVM, the IOAPIC in user space, no PIC
/// or PIT. Call it before creating vCPUs.
///
/// # Errors
/// The kernel's error.
pub fn create_split_irqchip(vm: &VmFd) -> io::Result<()> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        args: [u64::from(LEGACY_GSI_COUNT), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(kernel)
}

/// Turns on 32-bit APIC IDs for MSI routes and LAPIC state (`KVM_CAP_X2APIC_API`), with
/// the broadcast quirk of xAPIC destination 0xff off: an MSI route then carries
/// destination bits 31:8 in `address_hi`, as the core writes them, so remapped interrupts
/// reach vCPUs above 255. Needed for more than 255 vCPUs; call it before creating vCPUs.
///
/// # Errors
/// `Unsupported` when KVM lacks either flag, or the kernel's error.
pub fn enable_x2apic_api(vm: &VmFd) -> io::Result<()> {
    let wanted = u64::from(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
    let supported = u64::try_from(vm.check_extension_int(Cap::X2ApicApi)).unwrap_or(0);
    if supported & wanted != wanted {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "KVM_CAP_X2APIC_API without 32-bit APIC IDs",
        ));
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X2APIC_API,
        args: [wanted, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(kernel)
}

/// [`RoutingBackend`] over a KVM VM file descriptor.
#[derive(Debug, Clone)]
pub struct KvmRouting {
    vm: Arc<VmFd>,
}

impl KvmRouting {
    /// Routing for `vm`, which must have an in-kernel or split irqchip.
    #[must_use]
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }

    /// The number of routes KVM accepts (`KVM_CAP_IRQ_ROUTING`), capped at what the
    /// `kvm-bindings` table can hold.
    #[must_use]
    pub fn route_limit(&self) -> u32 {
        let reported = self.vm.check_extension_int(Cap::IrqRouting);
        let reported = u32::try_from(reported).unwrap_or(0);
        let table_max = u32::try_from(kvm_bindings::KVM_MAX_IRQ_ROUTES).unwrap_or(u32::MAX);
        reported.min(table_max)
    }
}

fn to_kvm(entry: &RouteEntry) -> kvm_irq_routing_entry {
    let mut out = kvm_irq_routing_entry {
        gsi: entry.gsi,
        ..Default::default()
    };
    match entry.kind {
        RouteKind::Irqchip { chip, pin } => {
            out.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            out.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
        }
        RouteKind::Msi(msg) => {
            out.type_ = KVM_IRQ_ROUTING_MSI;
            out.u.msi = kvm_irq_routing_msi {
                address_lo: msg.address_lo(),
                address_hi: msg.address_hi(),
                data: msg.data,
                ..Default::default()
            };
        }
    }
    out
}

impl MsiInjector for KvmRouting {
    fn inject(&self, msg: &MsiMessage) -> io::Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: msg.address_lo(),
            address_hi: msg.address_hi(),
            data: msg.data,
            ..Default::default()
        };
        // KVM returns >0 when delivered, 0 when the guest blocked it (an LAPIC disabled).
        self.vm.signal_msi(msi).map(|_| ()).map_err(io::Error::from)
    }
}

impl RoutingBackend for KvmRouting {
    fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()> {
        let entries: Vec<_> = routes.iter().map(to_kvm).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }

    fn assign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(io::Error::from)
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(io::Error::from)
    }
}

impl DoorbellVcpu for VcpuFd {
    fn complete_io(&mut self) -> io::Result<()> {
        self.set_kvm_immediate_exit(1);
        let completed = self.run().map(|_| ());
        self.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => {
                Err(io::Error::from_raw_os_error(e.errno()))
            }
            _ => Ok(()),
        }
    }

    fn exchange_call_registers(&mut self, call: &mut dyn FnMut(&mut [u64; 6])) -> io::Result<()> {
        let mut r = self.get_regs().map_err(kernel)?;
        let mut regs = [r.rax, r.rcx, r.rsi, r.rdi, r.r8, r.r9];
        call(&mut regs);
        let [rax, _, rsi, rdi, r8, r9] = regs;
        (r.rax, r.rsi, r.rdi, r.r8, r.r9) = (rax, rsi, rdi, r8, r9);
        self.set_regs(&r).map_err(kernel)
    }

    /// With `KVM_SYNC_X86_REGS` valid ([`share_registers`]), no ioctl: KVM stored the
    /// registers in `kvm_run` at the exit; the answer goes back there, marked dirty, and
    /// the next `KVM_RUN` loads it before completing the `out` (KVM's `sync_regs` runs
    /// before `complete_userspace_io`, which only advances RIP, and only while RIP is still
    /// at the `out`). Otherwise the portable three ioctls.
    fn answer_call(&mut self, call: &mut dyn FnMut(&mut [u64; 6])) -> io::Result<()> {
        if self.get_kvm_run().kvm_valid_regs & u64::from(KVM_SYNC_X86_REGS) == 0 {
            self.complete_io()?;
            return self.exchange_call_registers(call);
        }
        let r = &mut self.sync_regs_mut().regs;
        let mut regs = [r.rax, r.rcx, r.rsi, r.rdi, r.r8, r.r9];
        call(&mut regs);
        let [rax, _, rsi, rdi, r8, r9] = regs;
        (r.rax, r.rsi, r.rdi, r.r8, r.r9) = (rax, rsi, rdi, r8, r9);
        self.set_sync_dirty_reg(SyncReg::Register);
        Ok(())
    }
}

/// Has KVM store `vcpu`'s general registers in its `kvm_run` at every exit
/// (`KVM_CAP_SYNC_REGS`), so that [`DoorbellVcpu::answer_call`] answers a hypercall without
/// an ioctl. Returns whether KVM offers it (`vm`'s capability); without it nothing changes
/// and hypercalls take the portable path.
pub fn share_registers(vm: &VmFd, vcpu: &mut VcpuFd) -> bool {
    // KVM answers the register sets it can synchronize (KVM_SYNC_X86_VALID_FIELDS).
    let offered = vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_SYNC_REGS));
    let usable = u64::try_from(offered).is_ok_and(|bits| bits & u64::from(KVM_SYNC_X86_REGS) != 0);
    if usable {
        vcpu.set_sync_valid_reg(SyncReg::Register);
    }
    usable
}
