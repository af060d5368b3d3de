//! A fake [`RoutingBackend`] that behaves like KVM's routing and irqfd ioctls, can fail any
//! call on demand, and can "fire" an eventfd to say where KVM would deliver it.
//!
//! Available to other crates' tests with the `test-utils` feature.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::msi::{DecodedMsi, MsiMessage, Target};
use crate::port::{Gsi, RouteEntry, RouteKind, RoutingBackend};

/// Which upcoming calls fail (each counter is the number of calls to fail).
#[derive(Debug, Default, Clone, Copy)]
pub struct Failures {
    /// `set_routes` calls to fail.
    pub set_routes: u32,
    /// `assign_irqfd` calls to fail.
    pub assign: u32,
    /// `deassign_irqfd` calls to fail.
    pub deassign: u32,
    /// `assign_irqfd` calls to let through before the next failing one.
    pub assign_skip: u32,
}

#[derive(Debug, Default)]
struct State {
    table: Vec<RouteEntry>,
    irqfds: HashMap<i32, Gsi>,
    set_calls: u64,
    assign_calls: u64,
    deassign_calls: u64,
    fail: Failures,
}

/// The fake.
#[derive(Debug, Default)]
pub struct FakeRouting {
    state: Mutex<State>,
}

fn injected() -> io::Error {
    io::Error::from_raw_os_error(12) // ENOMEM
}

impl FakeRouting {
    /// A fake with an empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes upcoming calls fail.
    pub fn fail(&self, failures: Failures) {
        self.state().fail = failures;
    }

    /// `KVM_SET_GSI_ROUTING` calls so far.
    #[must_use]
    pub fn set_calls(&self) -> u64 {
        self.state().set_calls
    }

    /// `KVM_IRQFD` assign calls so far.
    #[must_use]
    pub fn assign_calls(&self) -> u64 {
        self.state().assign_calls
    }

    /// MSI routes in the table.
    #[must_use]
    pub fn msi_routes(&self) -> usize {
        self.state()
            .table
            .iter()
            .filter(|e| matches!(e.kind, RouteKind::Msi(_)))
            .count()
    }

    /// Attached irqfds.
    #[must_use]
    pub fn irqfds(&self) -> usize {
        self.state().irqfds.len()
    }

    /// Where KVM would deliver a write to `fd`: the target of its route, or `None` if the
    /// eventfd is not attached or its GSI has no MSI route.
    #[must_use]
    pub fn fire(&self, fd: i32) -> Option<Target> {
        let state = self.state();
        let gsi = *state.irqfds.get(&fd)?;
        state.table.iter().find_map(|e| match e.kind {
            RouteKind::Msi(msg) if e.gsi == gsi => match msg.decode() {
                Ok(DecodedMsi::Compatibility(t)) => Some(t),
                _ => None,
            },
            _ => None,
        })
    }

    /// Irqfds attached to `gsi`.
    #[must_use]
    pub fn irqfds_on(&self, gsi: Gsi) -> usize {
        self.state().irqfds.values().filter(|&&g| g == gsi).count()
    }

    /// The message routed at `gsi`.
    #[must_use]
    pub fn route(&self, gsi: Gsi) -> Option<MsiMessage> {
        self.state().table.iter().find_map(|e| match e.kind {
            RouteKind::Msi(m) if e.gsi == gsi => Some(m),
            _ => None,
        })
    }
}

impl RoutingBackend for FakeRouting {
    fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()> {
        let mut s = self.state();
        s.set_calls += 1;
        if s.fail.set_routes > 0 {
            s.fail.set_routes -= 1;
            return Err(injected());
        }
        s.table = routes.to_vec();
        Ok(())
    }

    fn assign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        let mut s = self.state();
        s.assign_calls += 1;
        if s.fail.assign > 0 {
            if s.fail.assign_skip > 0 {
                s.fail.assign_skip -= 1;
            } else {
                s.fail.assign -= 1;
                return Err(injected());
            }
        }
        if s.irqfds.contains_key(&fd.as_raw_fd()) {
            return Err(io::Error::from_raw_os_error(16)); // EBUSY, as KVM
        }
        s.irqfds.insert(fd.as_raw_fd(), gsi);
        Ok(())
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        let mut s = self.state();
        s.deassign_calls += 1;
        if s.fail.deassign > 0 {
            s.fail.deassign -= 1;
            return Err(injected());
        }
        match s.irqfds.get(&fd.as_raw_fd()) {
            Some(&g) if g == gsi => {
                s.irqfds.remove(&fd.as_raw_fd());
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(2)), // ENOENT, as KVM
        }
    }
}

impl RoutingBackend for std::sync::Arc<FakeRouting> {
    fn set_routes(&self, routes: &[RouteEntry]) -> io::Result<()> {
        self.as_ref().set_routes(routes)
    }

    fn assign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        self.as_ref().assign_irqfd(fd, gsi)
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> io::Result<()> {
        self.as_ref().deassign_irqfd(fd, gsi)
    }
}

/// An interrupt core over a fake KVM, as the tests and fuzz targets of every crate build
/// it: KVM's routes are the fake's, `routes` of them (4096 is KVM's usual limit).
pub type FakeCore = std::sync::Arc<crate::control::InterruptCore<std::sync::Arc<FakeRouting>>>;

/// A new core with `limits` for a VM with `irqchip`, over a new fake (returned too, to
/// fire eventfds and inject failures).
///
/// # Panics
/// If the fake refuses the initial route commit (it never does unless told to).
#[must_use]
#[cfg_attr(
    not(test),
    expect(
        clippy::expect_used,
        reason = "a test fixture over a fake that fails only when told to"
    )
)]
pub fn core(
    irqchip: crate::routes::Irqchip,
    routes: u32,
    limits: crate::backing::Limits,
) -> (FakeCore, std::sync::Arc<FakeRouting>) {
    let kvm = std::sync::Arc::new(FakeRouting::new());
    let table = crate::routes::RouteTable::with_irqchip(kvm.clone(), routes, irqchip)
        .expect("the fake accepts the first commit");
    let backing = crate::backing::Backing::new(table, limits).expect("a new core");
    (crate::control::InterruptCore::new(backing), kvm)
}

/// A core restored from `snapshot` over a new fake (4096 routes, in-kernel irqchip).
///
/// # Errors
/// The snapshot's refusal.
pub fn restored_core(
    snapshot: &crate::backing::snapshot::BackingSnapshot,
) -> Result<(FakeCore, std::sync::Arc<FakeRouting>), crate::backing::snapshot::RestoreError> {
    let kvm = std::sync::Arc::new(FakeRouting::new());
    let table = crate::routes::RouteTable::new(kvm.clone(), 4096)
        .map_err(crate::backing::BackingError::from)?;
    let backing = crate::backing::Backing::restore(table, snapshot)?;
    Ok((crate::control::InterruptCore::new(backing), kvm))
}
