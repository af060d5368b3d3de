//! The KVM port of the interrupt core: the few kernel operations it needs, as two small
//! traits, and their implementation over a KVM VM file descriptor. Everything else in this
//! crate reaches KVM through these and can run over a fake (`fake`, for tests).
//!
//! - [`RoutingBackend`]: the GSI routing table (`KVM_SET_GSI_ROUTING`) and irqfds
//!   (`KVM_IRQFD`, assign and deassign). The kernel's ordering rules that go with them
//!   are kept by [`crate::routes::RouteTable`].
//! - [`MsiInjector`]: one MSI injected directly (`KVM_SIGNAL_MSI`).
//! - `KvmRouting` (`crate::kvm`, feature `kvm`, on by default): both, over a `VmFd`.
//! - [`DoorbellVcpu`]: a vCPU stopped at a port-I/O exit, as the IRTE hypercall's doorbell
//!   needs it (complete the `out`, then read and write the call's registers); implemented
//!   for `kvm_ioctls::VcpuFd` in `crate::kvm`.
//! - [`FaultInjecting`]: test machinery in front of a backend, whose next calls fail on
//!   request; a VM built without it has no injection on its routing path.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::msi::MsiMessage;

/// A global system interrupt number: an index into KVM's routing table.
pub type Gsi = u32;

/// What one routing-table entry delivers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// A pin of an in-kernel interrupt controller.
    Irqchip {
        /// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`.
        chip: u32,
        /// Pin number on that chip.
        pin: u32,
    },
    /// An MSI message, injected into the local APICs it targets.
    Msi(MsiMessage),
}

/// One routing-table entry. Several entries may share a GSI (the legacy pins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEntry {
    /// The GSI the entry belongs to.
    pub gsi: Gsi,
    /// What it delivers to.
    pub kind: RouteKind,
}

/// The KVM operations routing needs. One method per ioctl; the real implementation is
/// `KvmRouting` (feature `kvm`), tests use fakes.
pub trait RoutingBackend: Send + Sync {
    /// Replaces the whole routing table (`KVM_SET_GSI_ROUTING`).
    ///
    /// # Errors
    /// The kernel's error; the previous table then stays in force.
    fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()>;
    /// Attaches `fd` to `gsi` (`KVM_IRQFD`): a write to `fd` then injects the route.
    ///
    /// # Errors
    /// The kernel's error (`EBUSY` if `fd` is already attached somewhere).
    fn assign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()>;
    /// Detaches `fd` from `gsi` (`KVM_IRQFD` with `KVM_IRQFD_FLAG_DEASSIGN`).
    ///
    /// # Errors
    /// The kernel's error.
    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()>;
}

/// Fault injection for a routing backend ([`FaultInjecting`]): the next calls of a kind
/// fail (with `ENOMEM`) before reaching KVM, as a real failure would, so that tests can
/// show that every failure leaves the previous state working and is reported.
#[derive(Debug, Default)]
pub struct InjectedFaults {
    set_routes: AtomicU32,
    assign_irqfd: AtomicU32,
}

impl InjectedFaults {
    /// Makes the next `n` `KVM_SET_GSI_ROUTING` calls fail.
    pub fn fail_route_commits(&self, n: u32) {
        self.set_routes.store(n, Ordering::Relaxed);
    }

    /// Makes the next `n` irqfd registrations fail.
    pub fn fail_irqfd_assigns(&self, n: u32) {
        self.assign_irqfd.store(n, Ordering::Relaxed);
    }

    fn take(counter: &AtomicU32) -> io::Result<()> {
        match counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
            Ok(_) => Err(io::Error::from_raw_os_error(12)), // ENOMEM, injected
            Err(_) => Ok(()),
        }
    }
}

/// Test machinery: `inner`, whose calls fail when [`InjectedFaults`] says so. A VM built
/// without it has no fault injection anywhere on its routing path.
#[derive(Debug, Clone)]
pub struct FaultInjecting<B> {
    inner: B,
    faults: Arc<InjectedFaults>,
}

impl<B: RoutingBackend> FaultInjecting<B> {
    /// `inner` with fault injection (nothing armed yet).
    #[must_use]
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            faults: Arc::default(),
        }
    }

    /// The switches (shared by clones).
    #[must_use]
    pub fn faults(&self) -> Arc<InjectedFaults> {
        self.faults.clone()
    }
}

impl<B: RoutingBackend> RoutingBackend for FaultInjecting<B> {
    fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()> {
        InjectedFaults::take(&self.faults.set_routes)?;
        self.inner.set_routes(routes)
    }

    fn assign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        InjectedFaults::take(&self.faults.assign_irqfd)?;
        self.inner.assign_irqfd(fd, gsi)
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        self.inner.deassign_irqfd(fd, gsi)
    }
}

/// Injects an MSI directly (`KVM_SIGNAL_MSI`): for interrupts that are not remapped, such
/// as a remapping unit's own event interrupts, or compatibility-format requests while
/// those are allowed.
pub trait MsiInjector: Send + Sync {
    /// Injects `msg`.
    ///
    /// # Errors
    /// The kernel's error.
    fn inject(&self, msg: &MsiMessage) -> std::io::Result<()>;
}

/// A vCPU stopped at the port-I/O exit of a doorbell `out` (the IRTE hypercall).
///
/// The order is the rule: KVM still holds the `out` when `KVM_RUN` returns, and the
/// call's answer must not be undone or overtaken by the completion of that `out`.
/// [`Self::answer_call`] keeps it. Its portable form completes the `out` first without
/// running a guest instruction ([`Self::complete_io`]), then reads the call's registers
/// and writes back the answer ([`Self::exchange_call_registers`]): three ioctls. A vCPU
/// that shares its registers with KVM through `kvm_run` (`KVM_CAP_SYNC_REGS`; for
/// `VcpuFd`, once `KVM_SYNC_X86_REGS` is in `kvm_valid_regs`) answers with none: it reads
/// the registers KVM stored at the exit and marks the answer dirty, and the vCPU's next
/// `KVM_RUN` loads the answer *before* it completes the `out`. Completing an `out` only
/// moves RIP past the instruction (and only if RIP is still at it); the answer never
/// touches RIP, so the guest sees the same state either way.
pub trait DoorbellVcpu {
    /// Completes the pending port access without running a guest instruction (KVM:
    /// `KVM_RUN` with `immediate_exit` set, which answers `EINTR`).
    ///
    /// # Errors
    /// The kernel's error.
    fn complete_io(&mut self) -> io::Result<()>;

    /// Reads RAX, RCX, RSI, RDI, R8 and R9 (in that order), lets `call` change them, and
    /// writes back RAX, RSI, RDI, R8 and R9 (RCX and every other register keep their
    /// values): one read and one write of the registers.
    ///
    /// # Errors
    /// The kernel's error; nothing is written when the read fails.
    fn exchange_call_registers(&mut self, call: &mut dyn FnMut(&mut [u64; 6])) -> io::Result<()>;

    /// Answers the call: the registers as [`Self::exchange_call_registers`] has them, and
    /// the `out` completed in the order the trait's rule requires. The default completes
    /// first, then exchanges; an implementation with a cheaper way that keeps the rule
    /// overrides it (`VcpuFd` with synchronized registers).
    ///
    /// # Errors
    /// The kernel's error; the guest's registers are unchanged then.
    fn answer_call(&mut self, call: &mut dyn FnMut(&mut [u64; 6])) -> io::Result<()> {
        self.complete_io()?;
        self.exchange_call_registers(call)
    }
}
