//! Our IMS devices served to a VMM in another process over vfio-user (`vmm device
//! ims-slots|ims-queues --socket PATH`): the same device models as in-process, behind the
//! rust-vmm `vfio_user` crate's `Server`.
//!
//! What crosses the socket (`docs/ims-device.md`, "Out of process"):
//! - region 0 is BAR 0, region 7 the configuration space (capabilities included: the
//!   queue-memory device's MSI-X table lives in its BAR and the device drives it itself);
//! - guest RAM arrives with `DMA_MAP` (a file descriptor and an offset), and the device
//!   reads its rings and contexts there;
//! - interrupt index [`ENTRY_IRQ_INDEX`] has one "vector" per remapping entry: the VMM sets
//!   an eventfd on vector `i` when entry `i` becomes present for the device's requester
//!   and takes it back (`DATA_NONE`) when it goes absent. Every message the device raises
//!   (an IMS slot's, a queue context's, its MSI-X entry's) is remappable and names its
//!   entry, so raising it is one write to that entry's eventfd: KVM injects it with no
//!   VMM thread on the way. A message whose entry has no eventfd is a fault the device
//!   counts, as a remapping unit's refusal is in-process.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use irq::msi::DecodedMsi;
use irq::remap::{Fault, FaultReason};
use irq::{MessageSink, MsiMessage};
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::ims::queues::ImsQueues;
use devices::ims::slots::ImsSlots;
use devices::ims::{ImsBackend, ImsEngine};
use devices::memory::DefaultMemory;
use devices::pci::PciFunction;

use crate::config::DeviceKind;

/// The interrupt index whose vectors are remapping entries (the first index after the
/// five VFIO defines for PCI).
pub const ENTRY_IRQ_INDEX: u32 = VFIO_PCI_NUM_IRQS;
/// Vectors of [`ENTRY_IRQ_INDEX`]: one per entry of the largest remapping table.
pub const ENTRY_VECTORS: u32 = 1 << 16;

/// Why a device could not be served.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: ::vfio_user::Error,
    },
    /// The connection ended in error.
    #[error("the vfio-user connection failed")]
    Connection(#[source] ::vfio_user::Error),
    /// The device or its event loop could not be set up.
    #[error("cannot set up the device")]
    Device(#[source] io::Error),
}

/// What a served device did, when its VMM went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServeReport {
    /// Messages raised through an entry's eventfd.
    pub raised: u64,
    /// Messages whose entry had no eventfd (counted by the device as faults).
    pub unbacked: u64,
    /// Hand-overs refused (over `max_vectors`, or malformed).
    pub refused: u64,
    /// Entries holding an eventfd at the end.
    pub held: usize,
}

/// The eventfds the VMM handed over, per remapping entry: the device's [`MessageSink`].
#[derive(Debug, Default)]
pub struct EntryFds {
    fds: Mutex<HashMap<u32, EventFd>>,
    stats: Mutex<ServeReport>,
    /// The most entries that may hold an eventfd at once (`None`: no limit).
    limit: Option<usize>,
}

impl EntryFds {
    /// A table that holds at most `limit` eventfds at once.
    #[must_use]
    pub fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    fn count(&self, f: impl FnOnce(&mut ServeReport)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// What the table did so far.
    #[must_use]
    pub fn report(&self) -> ServeReport {
        let mut report = *self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        report.held = self
            .fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        report
    }

    /// `SET_IRQS` on [`ENTRY_IRQ_INDEX`]: eventfds for entries `start..`, or (`DATA_NONE`)
    /// entries `start..start + count` taken back. All or none.
    ///
    /// # Errors
    /// A range beyond the index, a count that does not match the descriptors, an action
    /// other than trigger, or more entries than the limit; nothing changed then.
    pub fn set(&self, flags: u32, start: u32, count: u32, files: Vec<File>) -> io::Result<()> {
        let refuse = |why: &str| {
            self.count(|s| s.refused += 1);
            Err(io::Error::new(io::ErrorKind::InvalidInput, why.to_string()))
        };
        let end = u64::from(start) + u64::from(count);
        if end > u64::from(ENTRY_VECTORS) || flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return refuse("entries beyond the index, or not a trigger");
        }
        let mut fds = self.fds.lock().unwrap_or_else(PoisonError::into_inner);
        if flags & VFIO_IRQ_SET_DATA_NONE != 0 {
            for index in start..start + count {
                fds.remove(&index);
            }
            return Ok(());
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD == 0 || files.len() != count as usize {
            return refuse("eventfds that do not match the count");
        }
        let new = (start..start + count)
            .filter(|i| !fds.contains_key(i))
            .count();
        if self.limit.is_some_and(|limit| fds.len() + new > limit) {
            return refuse("no room for more host interrupts on this device");
        }
        for (index, file) in (start..).zip(files) {
            // SAFETY: the descriptor is the file's own, given up here; the device process
            // received it as an eventfd for this entry (anything else only fails writes).
            let fd = unsafe { EventFd::from_raw_fd(file.into_raw_fd()) };
            fds.insert(index, fd);
        }
        Ok(())
    }
}

impl MessageSink for EntryFds {
    fn signal_msi(&self, msg: &MsiMessage, source_id: u16) -> Result<(), Fault> {
        let fault = |reason, index| Fault {
            reason,
            source_id,
            index,
            suppressed: false,
        };
        let index = match msg.decode() {
            Ok(DecodedMsi::Compatibility(_)) => {
                self.count(|s| s.unbacked += 1);
                return Err(fault(FaultReason::CompatibilityBlocked, None));
            }
            Ok(decoded) => decoded.index().unwrap_or(u32::MAX),
            Err(_) => {
                self.count(|s| s.unbacked += 1);
                return Err(fault(FaultReason::RequestReserved, None));
            }
        };
        let written = self
            .fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&index)
            .map(|fd| fd.write(1));
        match written {
            Some(Ok(())) => {
                self.count(|s| s.raised += 1);
                Ok(())
            }
            _ => {
                self.count(|s| s.unbacked += 1);
                Err(fault(FaultReason::NotPresent, Some(index)))
            }
        }
    }
}

/// The server side of one device: its model, the memory the VMM mapped, its entries.
struct Backend<D> {
    device: Arc<Mutex<D>>,
    mem: DefaultMemory,
    entries: Arc<EntryFds>,
    bar_size: u64,
}

impl<D: PciFunction> Backend<D> {
    fn device(&self) -> std::sync::MutexGuard<'_, D> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, region: u32, offset: u64, len: usize) -> io::Result<()> {
        let size = match region {
            0 => self.bar_size,
            VFIO_PCI_CONFIG_REGION_INDEX => devices::pci::config::SIZE as u64,
            _ => 0,
        };
        if offset.checked_add(len as u64).is_none_or(|end| end > size) || len > 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("access of {len} bytes at {offset:#x} of region {region}"),
            ));
        }
        Ok(())
    }
}

impl<D: PciFunction> ::vfio_user::ServerBackend for Backend<D> {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.check(region, offset, data.len())?;
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            self.device().config().read(at, data);
        } else {
            self.device().bar_read(0, offset, data);
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(region, offset, data.len())?;
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            // BAR placement is the VMM's; the rest (command, capabilities) is the device's.
            self.device().config_write(at, data);
        } else {
            self.device().bar_write(0, offset, data);
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: ::vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<File>,
    ) -> io::Result<()> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let file = file.ok_or_else(|| invalid("a DMA mapping without a file".into()))?;
        let len = usize::try_from(size).map_err(|_| invalid(format!("{size} bytes")))?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(address),
            len,
            Some(FileOffset::new(file, offset)),
        )
        .map_err(|e| invalid(format!("mapping {size:#x} bytes at {address:#x}: {e}")))?;
        let next = self
            .mem
            .memory()
            .insert_region(Arc::new(region))
            .map_err(|e| invalid(format!("{address:#x}: {e}")))?;
        self.mem
            .lock()
            .map_err(|_| invalid("the memory lock".into()))?
            .replace(next);
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: ::vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> io::Result<()> {
        let (next, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(address), size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.mem
            .lock()
            .map_err(|_| io::Error::other("the memory lock"))?
            .replace(next);
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        if index != ENTRY_IRQ_INDEX {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("interrupt index {index}: this device raises only through its entries"),
            ));
        }
        self.entries.set(flags, start, count, fds)
    }
}

/// The regions a served device announces: BAR 0 of `bar_size` bytes and its
/// configuration space.
fn regions(bar_size: u64) -> Vec<::vfio_user::ServerRegion> {
    let flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                0 => bar_size,
                VFIO_PCI_CONFIG_REGION_INDEX => devices::pci::config::SIZE as u64,
                _ => 0,
            };
            ::vfio_user::ServerRegion {
                region_info: vfio_region_info {
                    argsz: u32::try_from(std::mem::size_of::<vfio_region_info>()).unwrap_or(0),
                    flags: if size == 0 { 0 } else { flags },
                    index,
                    size,
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The interrupt indexes: none of PCI's (no INTx, MSI or VFIO-managed MSI-X), and the
/// entries' index.
fn irqs() -> Vec<::vfio_user::IrqInfo> {
    (0..=ENTRY_IRQ_INDEX)
        .map(|index| ::vfio_user::IrqInfo {
            index,
            flags: if index == ENTRY_IRQ_INDEX {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
            count: if index == ENTRY_IRQ_INDEX {
                ENTRY_VECTORS
            } else {
                0
            },
        })
        .collect()
}

/// An empty guest memory, for a device before the VMM maps its RAM.
#[must_use]
pub fn unmapped_memory() -> DefaultMemory {
    GuestMemoryAtomic::new(GuestMemoryMmap::new())
}

/// Serves `device` (built over `mem`, raising through `entries`) at `socket` to one VMM,
/// until that VMM disconnects; the device's work runs on an event loop thread of its own.
///
/// # Errors
/// [`ServeError`].
pub fn serve<D>(
    socket: &Path,
    device: Arc<Mutex<D>>,
    mem: DefaultMemory,
    entries: Arc<EntryFds>,
) -> Result<ServeReport, ServeError>
where
    D: PciFunction + ImsEngine + 'static,
{
    let server = listen(socket, &device)?;
    run_server(&server, device, mem, entries)
}

/// Listens at `socket` for a VMM, for `device`.
fn listen<D: PciFunction>(
    socket: &Path,
    device: &Mutex<D>,
) -> Result<::vfio_user::Server, ServeError> {
    let bar_size = bar0_size(&*device.lock().unwrap_or_else(PoisonError::into_inner));
    ::vfio_user::Server::new(socket, false, irqs(), regions(bar_size)).map_err(|source| {
        ServeError::Listen {
            path: socket.to_path_buf(),
            source,
        }
    })
}

fn bar0_size(device: &impl PciFunction) -> u64 {
    device
        .config()
        .bars()
        .iter()
        .find(|b| b.index == 0)
        .map_or(0, |b| b.size)
}

/// Serves `device` to the VMM that connects to `server`, until it disconnects.
fn run_server<D>(
    server: &::vfio_user::Server,
    device: Arc<Mutex<D>>,
    mem: DefaultMemory,
    entries: Arc<EntryFds>,
) -> Result<ServeReport, ServeError>
where
    D: PciFunction + ImsEngine + 'static,
{
    let engine = ImsBackend::new(device.clone()).map_err(ServeError::Device)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| ServeError::Device(io::Error::other(e.to_string())))?;
    events.add_subscriber(Box::new(engine));
    let wake = EventFd::new(EFD_NONBLOCK).map_err(ServeError::Device)?;
    events.add_subscriber(Box::new(
        crate::threads::StopWake::new(&wake).map_err(ServeError::Device)?,
    ));
    let looping = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("ims-device".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    // No timeout: the device has its own timers, and the end of the
                    // connection writes `wake`. An error here is an interrupted wait.
                    let _ = events.run();
                }
            })
            .map_err(ServeError::Device)?
    };
    let bar_size = bar0_size(&*device.lock().unwrap_or_else(PoisonError::into_inner));
    let mut backend = Backend {
        device,
        mem,
        entries: entries.clone(),
        bar_size,
    };
    let result = server.run(&mut backend);
    stop.store(true, Ordering::Release);
    // A full counter still wakes the loop.
    let _ = wake.write(1);
    let _ = looping.join();
    result.map_err(ServeError::Connection)?;
    Ok(entries.report())
}

/// Serves a device of `kind` (one of our IMS devices) at `socket`, holding at most
/// `max_vectors` entries' eventfds at once; see [`serve`].
///
/// # Errors
/// [`ServeError`]; [`ServeError::Device`] for a kind that is not ours to serve.
pub fn serve_kind(
    kind: &DeviceKind,
    socket: &Path,
    max_vectors: Option<usize>,
) -> Result<ServeReport, ServeError> {
    let entries = Arc::new(EntryFds::new(max_vectors));
    let mem = unmapped_memory();
    // The device does not know its requester ID: the VMM verified it before handing
    // over any entry.
    let sink: Arc<dyn MessageSink> = entries.clone();
    match *kind {
        DeviceKind::ImsSlots { slots, queues } => {
            let device =
                ImsSlots::new(slots, queues, 0, sink, mem.clone()).map_err(ServeError::Device)?;
            serve(socket, Arc::new(Mutex::new(device)), mem, entries)
        }
        DeviceKind::ImsQueues {
            contexts,
            command_timeout_ms,
        } => {
            let mut device =
                ImsQueues::new(contexts, 0, sink, mem.clone()).map_err(ServeError::Device)?;
            device.set_timeout(Duration::from_millis(u64::from(command_timeout_ms)));
            serve(socket, Arc::new(Mutex::new(device)), mem, entries)
        }
        DeviceKind::VfioUser { .. } => Err(ServeError::Device(io::Error::new(
            io::ErrorKind::Unsupported,
            "a vfio-user device is served by its own process",
        ))),
    }
}

/// Slot-array devices this process serves on a thread of its own (`vmm bench` does, to
/// time an out-of-process device's delivery), by socket: the test harness raises their
/// slots directly, as it does an in-process device's.
static SERVED_HERE: Mutex<Vec<(PathBuf, Arc<Mutex<ImsSlots>>)>> = Mutex::new(Vec::new());

/// The slot-array device this process serves at `socket`, if any.
#[must_use]
pub fn served_here(socket: &Path) -> Option<Arc<Mutex<ImsSlots>>> {
    SERVED_HERE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|(path, _)| path == socket)
        .map(|(_, device)| device.clone())
}

/// Serves a slot-array device of `slots` slots at `socket` on a thread of this process,
/// listening before this returns; the thread ends when its VMM disconnects (and forgets
/// the device).
///
/// # Errors
/// The socket or the device could not be had.
pub fn serve_slots_here(
    socket: &Path,
    slots: u32,
) -> Result<thread::JoinHandle<Result<ServeReport, ServeError>>, ServeError> {
    let entries = Arc::new(EntryFds::new(None));
    let mem = unmapped_memory();
    let sink: Arc<dyn MessageSink> = entries.clone();
    let device = Arc::new(Mutex::new(
        ImsSlots::new(slots, slots, 0, sink, mem.clone()).map_err(ServeError::Device)?,
    ));
    let server = listen(socket, &device)?;
    let path = socket.to_path_buf();
    SERVED_HERE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((path.clone(), device.clone()));
    thread::Builder::new()
        .name("ims-served".into())
        .spawn(move || {
            let result = run_server(&server, device, mem, entries);
            SERVED_HERE
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(p, _)| *p != path);
            result
        })
        .map_err(ServeError::Device)
}
