//! Interrupt sources shaped like cloud-hypervisor's: `InterruptSourceGroup` is written here
//! in the shape of `vm_device::interrupt::InterruptSourceGroup`, and [`RemappedMsiGroup`]
//! implements it over the interrupt core's front door for a device's MSI-X vectors.
//!
//! Each vector has its own eventfd, the **notifier**: VFIO, vhost-user or vfio-user hands
//! it to the kernel or to another process, which writes it. When the guest programs a
//! vector with a remappable message, the group binds the notifier to the remapping entry
//! the message names (`InterruptControl::bind_source`): the core keeps it attached to the
//! entry's current target, so a write reaches the guest with no thread of ours on the way,
//! and a retarget by the guest moves it. A compatibility-format message gets a plain MSI
//! route of the group's own in KVM's table (`RouteControl`), beside the core's.

use std::io;
use std::sync::{Mutex, PoisonError};

use irvm_irq::control::{CoreHandle, RouteChange};
use irvm_irq::msi::DecodedMsi;
use irvm_irq::routes::OwnerId;
use irvm_irq::{Gsi, MsiMessage};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An MSI vector's message, as cloud-hypervisor's `MsiIrqSourceConfig` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiIrqSourceConfig {
    /// Address bits 63:32.
    pub high_addr: u32,
    /// Address bits 31:0.
    pub low_addr: u32,
    /// Data.
    pub data: u32,
    /// The device ID (not used on x86; the group's requester ID is fixed).
    pub devid: u32,
}

/// A group of interrupt sources, in the shape of cloud-hypervisor's trait.
pub trait InterruptSourceGroup: Send + Sync {
    /// Raises vector `index` from the VMM.
    ///
    /// # Errors
    /// The eventfd's error, or no such vector.
    fn trigger(&self, index: u32) -> io::Result<()>;
    /// The eventfd another party writes to raise vector `index`.
    fn notifier(&self, index: u32) -> Option<EventFd>;
    /// Vector `index` now sends `config`, or nothing while `masked`.
    ///
    /// # Errors
    /// A message the core refuses (an entry not the group's, not verifying it), or KVM's
    /// error.
    fn update(&self, index: u32, config: MsiIrqSourceConfig, masked: bool) -> io::Result<()>;
}

/// Where a vector's notifier goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Off,
    Entry(u32),
    Route(Gsi),
}

#[derive(Debug)]
struct Vector {
    notifier: EventFd,
    delivery: Delivery,
}

/// MSI-X vectors of one device (requester ID), remapped through the interrupt core.
pub struct RemappedMsiGroup {
    core: CoreHandle,
    requester: u16,
    routes: OwnerId,
    vectors: Vec<Mutex<Vector>>,
}

impl std::fmt::Debug for RemappedMsiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemappedMsiGroup")
            .field("requester", &self.requester)
            .field("vectors", &self.vectors)
            .finish_non_exhaustive()
    }
}

fn refused(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl RemappedMsiGroup {
    /// `count` vectors of the device `requester`, all off. Plain (compatibility-format)
    /// vectors may take up to `count` routes in KVM's table.
    ///
    /// # Errors
    /// An eventfd could not be created.
    pub fn new(core: CoreHandle, requester: u16, count: u32) -> io::Result<Self> {
        let routes = core.routes().add_owner("msi-x group", count);
        let vectors = (0..count)
            .map(|_| {
                Ok(Mutex::new(Vector {
                    notifier: EventFd::new(EFD_NONBLOCK)?,
                    delivery: Delivery::Off,
                }))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            core,
            requester,
            routes,
            vectors,
        })
    }

    fn vector(&self, index: u32) -> io::Result<std::sync::MutexGuard<'_, Vector>> {
        let v = self
            .vectors
            .get(index as usize)
            .ok_or_else(|| refused(format!("no vector {index}")))?;
        Ok(v.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes the vector's notifier off whatever it was attached to.
    fn detach(&self, v: &mut Vector) -> io::Result<()> {
        match std::mem::replace(&mut v.delivery, Delivery::Off) {
            Delivery::Off => {}
            Delivery::Entry(index) => {
                self.core
                    .unbind_source(self.requester, index)
                    .map_err(refused)?;
            }
            Delivery::Route(gsi) => {
                let table = self.core.routes();
                table
                    .detach_irqfd(self.routes, gsi, &v.notifier)
                    .map_err(refused)?;
                table
                    .stage(self.routes, &[RouteChange::Remove(gsi)])
                    .and_then(|_| table.commit(self.routes))
                    .map_err(refused)?;
            }
        }
        Ok(())
    }
}

impl InterruptSourceGroup for RemappedMsiGroup {
    fn trigger(&self, index: u32) -> io::Result<()> {
        self.vector(index)?.notifier.write(1)
    }

    fn notifier(&self, index: u32) -> Option<EventFd> {
        self.vector(index).ok()?.notifier.try_clone().ok()
    }

    fn update(&self, index: u32, config: MsiIrqSourceConfig, masked: bool) -> io::Result<()> {
        let mut v = self.vector(index)?;
        self.detach(&mut v)?;
        if masked {
            return Ok(());
        }
        let msg = MsiMessage {
            address: (u64::from(config.high_addr) << 32) | u64::from(config.low_addr),
            data: config.data,
        };
        match msg.decode().map_err(refused)? {
            remappable @ DecodedMsi::Remappable { .. } => {
                let entry = remappable.index().unwrap_or(u32::MAX);
                let fd = v.notifier.try_clone()?;
                self.core
                    .bind_source(self.requester, entry, fd)
                    .map_err(refused)?;
                v.delivery = Delivery::Entry(entry);
            }
            DecodedMsi::Compatibility(_) => {
                let table = self.core.routes();
                let gsi = table
                    .stage(self.routes, &[RouteChange::Add(msg)])
                    .map_err(refused)?
                    .first()
                    .copied()
                    .ok_or_else(|| refused("no route"))?;
                table.commit(self.routes).map_err(refused)?;
                table
                    .attach_irqfd(self.routes, gsi, &v.notifier)
                    .map_err(refused)?;
                v.delivery = Delivery::Route(gsi);
            }
        }
        Ok(())
    }
}
