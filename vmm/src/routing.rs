//! The VM's KVM routing (plain, or behind fault injection for a VM with the test
//! harness) and the interrupt core over it, as the VMM that owns the core holds it.

use std::io;
use std::sync::Arc;

use irq::kvm::KvmRouting;
use irq::port::{FaultInjecting, Gsi, RouteEntry, RoutingBackend};
use vmm_sys_util::eventfd::EventFd;

/// The interrupt core of the VM (remapping table, routes, lines) as the VMM that owns it
/// holds it: front ends get its [`irq::CoreHandle`]; the VMM keeps this for statistics,
/// snapshots and the harness (whose plain MSI routes share KVM's routing table).
pub type SharedBacking = Arc<irq::InterruptCore<VmRouting>>;

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
