//! The VM's PCI devices: the root bus on the port and MMIO buses (CF8/CFC, ECAM, the BAR
//! windows), each configured device at its slot with its requester ID (IMS devices, and
//! devices in other processes through `crate::vfio_user`), and the devices' backends (and
//! vfio-user INTx relays) on one event-loop thread, which a snapshot pauses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::ims::queues::{ImsQueues, QueuesSnapshot};
use devices::ims::slots::{ImsSlots, RaiseSlot, SlotsSnapshot};
use devices::ims::snapshot::RestoreError;
use devices::ims::{ImsBackend, ImsEngine};
use devices::memory::DefaultMemory;
use devices::pci::{self, ConfigIo, Ecam, IoWindow, MmioWindow, PciRoot, RootSnapshot, SharedRoot};
use devices::viommu::dma::{DmaMemory, DmaUnit};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use irq::CoreHandle;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusError;
use crate::config::{DeviceConfig, DeviceKind};
use crate::exit::Buses;
use crate::vfio_user::entries::RemoteEntries;
pub use crate::vfio_user::function::IntxSink;
use crate::vfio_user::function::{BarMapper, IntxRelay, VfioUserFunction};
use crate::vfio_user::{Client, VfioUserError};

#[derive(Debug)]
enum Model {
    Slots(Arc<Mutex<ImsSlots<DmaMemory>>>),
    Queues(Arc<Mutex<ImsQueues<DmaMemory>>>),
    /// A device another process serves (no backend here: its work is there).
    VfioUser(Arc<Mutex<VfioUserFunction>>),
}

impl Model {
    fn slots(dev: ImsSlots<DmaMemory>) -> Self {
        Self::Slots(Arc::new(Mutex::new(dev)))
    }

    fn queues(dev: ImsQueues<DmaMemory>) -> Self {
        Self::Queues(Arc::new(Mutex::new(dev)))
    }

    /// The device as the root bus holds it.
    fn function(&self) -> pci::SharedFunction {
        match self {
            Self::Slots(d) => d.clone(),
            Self::Queues(d) => d.clone(),
            Self::VfioUser(d) => d.clone(),
        }
    }

    /// Its backend on the event loop, if it has one.
    fn backend(&self) -> std::io::Result<Option<Subscriber>> {
        Ok(match self {
            Self::Slots(d) => Some(Box::new(ImsBackend::new(d.clone())?)),
            Self::Queues(d) => Some(Box::new(ImsBackend::new(d.clone())?)),
            Self::VfioUser(_) => None,
        })
    }

    /// Its kick eventfd (to make a restored device look at its queues once).
    fn kick_fd(&self) -> std::io::Result<Option<vmm_sys_util::eventfd::EventFd>> {
        match self {
            Self::Slots(d) => d
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .kick_fd()
                .map(Some),
            Self::Queues(d) => d
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .kick_fd()
                .map(Some),
            Self::VfioUser(_) => Ok(None),
        }
    }
}

/// One device's state in a snapshot, in the order of the VM's device list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DeviceSnapshot {
    /// A slot-array device.
    ImsSlots(SlotsSnapshot),
    /// A queue-memory device.
    ImsQueues(QueuesSnapshot),
}

/// The PCI side of a VM in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciSnapshot {
    /// The root bus (address latch, host bridge).
    pub root: RootSnapshot,
    /// The devices, in the order of the VM's device list.
    pub devices: Vec<DeviceSnapshot>,
}

/// What one device did in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// The device.
    pub device: DeviceConfig,
    /// Work items completed.
    pub completions: u64,
    /// Interrupts the remapping core refused (absent or another device's entries).
    pub faults: u64,
    /// Resets (queue-memory devices).
    pub resets: u64,
    /// Completions not signalled on purpose (fault injection).
    pub dropped: u64,
    /// The device was still busy (a vCPU or its backend inside it) when the run ended:
    /// its counters were not read and read 0 here.
    pub busy: bool,
    /// A device in another process.
    pub remote: Option<RemoteReport>,
}

/// What a device in another process did in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteReport {
    /// Requests to it that failed (read as all ones, or dropped).
    pub failed: u64,
    /// Whether the connection was lost.
    pub lost: bool,
    /// `SET_IRQS` messages that handed over or took back its entries' eventfds (`None`:
    /// the device does not host its entries' interrupts).
    pub entry_messages: Option<u64>,
}

type Subscriber = Box<dyn MutEventSubscriber + Send>;
type Loop = EventManager<Subscriber>;

/// The PCI side of a VM.
pub struct PciDevices {
    root: SharedRoot,
    models: Vec<(DeviceConfig, Model)>,
    /// The event loop while running, or the loop itself while paused.
    thread: Option<JoinHandle<Loop>>,
    paused: Option<Loop>,
    stop: Arc<AtomicBool>,
    /// Written with `stop`: the loop's [`crate::threads::StopWake`].
    wake: EventFd,
}

impl std::fmt::Debug for PciDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciDevices")
            .field("root", &self.root)
            .field("models", &self.models)
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PciDevices {
    fn drop(&mut self) {
        self.pause();
    }
}

fn other(e: impl std::fmt::Debug) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

/// A device event loop and the eventfd that wakes it for a stop.
fn new_loop() -> Result<(Loop, EventFd), PciError> {
    let mut events: Loop = EventManager::new().map_err(other)?;
    let wake = EventFd::new(EFD_NONBLOCK)?;
    events.add_subscriber(Box::new(crate::threads::StopWake::new(&wake)?));
    Ok((events, wake))
}

/// How a device comes to be: new, or from its snapshot.
enum Origin<'a> {
    New,
    Restored(&'a DeviceSnapshot, Instant),
}

/// Why the PCI side cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// An eventfd, timer, epoll or thread could not be had.
    #[error("cannot set up the PCI devices")]
    Os(#[from] std::io::Error),
    /// A vfio-user device could not be reached or set up.
    #[error("cannot set up PCI device {device}")]
    VfioUser {
        /// Which.
        device: String,
        /// Why.
        #[source]
        source: crate::vfio_user::VfioUserError,
    },
    /// The VM has a device whose state lives in another process.
    #[error("a VM with a vfio-user device ({0}) cannot be snapshotted: its state is in the device process")]
    NotSnapshottable(String),
    /// A device's (or the root bus's) snapshot is refused.
    #[error("cannot restore PCI device {device}")]
    Restore {
        /// Which (`00:03.0 ims-slots ...`, or the root bus).
        device: String,
        /// Why.
        #[source]
        source: RestoreError,
    },
}

impl PciDevices {
    /// Creates `devices`, raising interrupts through `core`'s data path (devices in other
    /// processes: their entries' host interrupts, attached to `core`), and starts their
    /// event loop,
    /// which runs until [`PciDevices::finish`] or drop.
    ///
    /// # Errors
    /// An eventfd, timer, epoll or thread could not be had.
    pub fn new(
        devices: &[DeviceConfig],
        core: &CoreHandle,
        mem: (&DefaultMemory, &Arc<DmaUnit>),
        intx: &IntxSink,
        mapper: Option<&Arc<dyn BarMapper>>,
    ) -> Result<Self, PciError> {
        let origins = devices.iter().map(|d| (d.clone(), Origin::New)).collect();
        Self::build(origins, None, core, mem, (intx, mapper))
    }

    /// Creates `devices` in the states `snap` holds (one per device, same kinds, same
    /// order) and starts their event loop; each device then looks at its queues once, as
    /// if notified, so work the guest made available before the snapshot is not missed.
    ///
    /// # Errors
    /// As [`PciDevices::new`], or a snapshot that does not fit `devices` or is refused.
    pub fn restore(
        devices: &[DeviceConfig],
        snap: &PciSnapshot,
        core: &CoreHandle,
        mem: (&DefaultMemory, &Arc<DmaUnit>),
        intx: &IntxSink,
    ) -> Result<Self, PciError> {
        let refuse = |device: String, why: &'static str| PciError::Restore {
            device,
            source: RestoreError(why),
        };
        if snap.devices.len() != devices.len() {
            return Err(refuse(
                "list".into(),
                "the snapshot holds another number of devices",
            ));
        }
        let now = Instant::now();
        let origins = devices
            .iter()
            .zip(&snap.devices)
            .map(|(d, s)| (d.clone(), Origin::Restored(s, now)))
            .collect();
        Self::build(origins, Some(&snap.root), core, mem, (intx, None))
    }

    fn build(
        devices: Vec<(DeviceConfig, Origin<'_>)>,
        root_snap: Option<&RootSnapshot>,
        core: &CoreHandle,
        (mem, dma): (&DefaultMemory, &Arc<DmaUnit>),
        (intx, mapper): (&IntxSink, Option<&Arc<dyn BarMapper>>),
    ) -> Result<Self, PciError> {
        let path = core.path();
        let ram: vm_memory::GuestMemoryMmap = (*vm_memory::GuestAddressSpace::memory(mem)).clone();
        let mut root = PciRoot::new(devices::pci::PciLayout::default());
        let (mut events, wake) = new_loop()?;
        let mut models = Vec::with_capacity(devices.len());
        let mut kicks = Vec::new();
        for (d, origin) in devices {
            let rid = d.requester_id();
            // The device's DMA, translated as the VT-d unit's tables say for its requester.
            let dev_mem = || dma.memory(rid, ram.clone());
            let refused = |why| PciError::Restore {
                device: d.to_string(),
                source: RestoreError(why),
            };
            let restored = matches!(origin, Origin::Restored(..));
            let model = match (d.kind.clone(), origin) {
                (DeviceKind::VfioUser { socket }, Origin::New) => {
                    let (model, relay) = remote_device(&d, &socket, mem, (intx, mapper), core)?;
                    if let Some(relay) = relay {
                        events.add_subscriber(Box::new(relay));
                    }
                    model
                }
                (DeviceKind::ImsSlots { slots, queues }, Origin::New) => {
                    Model::slots(ImsSlots::new(slots, queues, rid, path.clone(), dev_mem())?)
                }
                (
                    DeviceKind::ImsSlots { slots, queues },
                    Origin::Restored(DeviceSnapshot::ImsSlots(s), now),
                ) => {
                    let dev = ImsSlots::restore(rid, path.clone(), dev_mem(), s, now).map_err(
                        |source| PciError::Restore {
                            device: d.to_string(),
                            source,
                        },
                    )?;
                    if (dev.slot_count(), dev.queue_count()) != (slots, queues) {
                        return Err(refused("slot or queue count differs from the device list"));
                    }
                    Model::slots(dev)
                }
                (
                    DeviceKind::ImsQueues {
                        contexts,
                        command_timeout_ms,
                    },
                    Origin::New,
                ) => {
                    let mut q = ImsQueues::new(contexts, rid, path.clone(), dev_mem())?;
                    q.set_timeout(Duration::from_millis(u64::from(command_timeout_ms)));
                    Model::queues(q)
                }
                (
                    DeviceKind::ImsQueues { contexts, .. },
                    Origin::Restored(DeviceSnapshot::ImsQueues(s), now),
                ) => {
                    let dev = ImsQueues::restore(rid, path.clone(), dev_mem(), s, now).map_err(
                        |source| PciError::Restore {
                            device: d.to_string(),
                            source,
                        },
                    )?;
                    if dev.context_count() != contexts {
                        return Err(refused("context count differs from the device list"));
                    }
                    Model::queues(dev)
                }
                (_, Origin::Restored(..)) => {
                    return Err(refused("the snapshot holds another kind of device"))
                }
            };
            if restored {
                kicks.extend(model.kick_fd()?);
            }
            if root.add(d.pci_slot, 0, model.function()).is_none() {
                return Err(other(format!("PCI slot {} is taken", d.pci_slot)).into());
            }
            if let Some(backend) = model.backend()? {
                events.add_subscriber(backend);
            }
            models.push((d, model));
        }
        match root_snap {
            None => root.assign_bars(),
            Some(snap) => root.restore(snap).map_err(|source| PciError::Restore {
                device: "root bus".into(),
                source,
            })?,
        }
        for kick in kicks {
            kick.write(1)?;
        }
        Self::start(root, models, (events, wake))
    }

    /// The devices on `root`, their event loop started.
    fn start(
        root: PciRoot,
        models: Vec<(DeviceConfig, Model)>,
        (events, wake): (Loop, EventFd),
    ) -> Result<Self, PciError> {
        let mut devices = Self {
            root: Arc::new(Mutex::new(root)),
            models,
            thread: None,
            paused: Some(events),
            stop: Arc::new(AtomicBool::new(false)),
            wake,
        };
        devices.resume()?;
        Ok(devices)
    }

    /// Stops the event loop (no device works until [`PciDevices::resume`]); returns once
    /// it has stopped.
    pub fn pause(&mut self) {
        self.stop_loop();
        if let Some(t) = self.thread.take() {
            // A loop thread that panicked took its loop with it; nothing is left to pause.
            self.paused = t.join().ok();
        }
    }

    /// Whether [`Self::finish`] left the event loop running (inside a device past its
    /// deadline): it had a loop, and did not get it back.
    #[must_use]
    pub fn loop_left_running(&self) -> bool {
        !self.models.is_empty() && self.thread.is_none() && self.paused.is_none()
    }

    /// Sets the stop flag and wakes the loop to see it (it waits with no timeout).
    fn stop_loop(&self) {
        self.stop.store(true, Ordering::Release);
        // A full counter still wakes the loop; nothing else can fail here.
        let _ = self.wake.write(1);
    }

    /// Starts the event loop again (or for the first time).
    ///
    /// # Errors
    /// The error of spawning its thread.
    pub fn resume(&mut self) -> std::io::Result<()> {
        if self.models.is_empty() || self.thread.is_some() {
            return Ok(());
        }
        let Some(mut events) = self.paused.take() else {
            return Ok(());
        };
        self.stop.store(false, Ordering::Release);
        let stopped = self.stop.clone();
        self.thread = Some(crate::threads::spawn(
            crate::seccomp::ThreadKind::Devices,
            "ims-devices".into(),
            move || {
                while !stopped.load(Ordering::Acquire) {
                    // No timeout: devices have their own timers, and a stop writes the
                    // loop's wake. An error here is an interrupted wait; the loop tries
                    // again.
                    let _ = events.run();
                }
                events
            },
        )?);
        Ok(())
    }

    /// The state of the root bus and every device (pause first for a consistent one).
    ///
    /// # Errors
    /// [`PciError::NotSnapshottable`] for a VM with a vfio-user device.
    pub fn snapshot(&self) -> Result<PciSnapshot, PciError> {
        let now = Instant::now();
        Ok(PciSnapshot {
            root: self
                .root
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(),
            devices: self
                .models
                .iter()
                .map(|(d, model)| match model {
                    Model::Slots(dev) => Ok(DeviceSnapshot::ImsSlots(
                        dev.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .snapshot(now),
                    )),
                    Model::Queues(dev) => Ok(DeviceSnapshot::ImsQueues(
                        dev.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .snapshot(now),
                    )),
                    Model::VfioUser(_) => Err(PciError::NotSnapshottable(d.to_string())),
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// The requester IDs of the devices (the hypercall's permitted requesters).
    #[must_use]
    pub fn requesters(&self) -> Vec<u16> {
        self.models.iter().map(|(d, _)| d.requester_id()).collect()
    }

    /// Every device as the root bus holds it, by requester ID.
    #[must_use]
    pub fn functions(&self) -> Vec<(u16, pci::SharedFunction)> {
        self.models
            .iter()
            .map(|(d, model)| (d.requester_id(), model.function()))
            .collect()
    }

    /// The slot-array devices, by requester ID (what the harness's benchmark requests
    /// raise).
    #[must_use]
    pub fn slot_devices(&self) -> Vec<(u16, Arc<dyn RaiseSlot>)> {
        self.models
            .iter()
            .filter_map(|(d, model)| match model {
                Model::Slots(dev) => Some((d.requester_id(), dev.clone() as Arc<dyn RaiseSlot>)),
                Model::Queues(_) | Model::VfioUser(_) => None,
            })
            .collect()
    }

    /// The slot-array devices in another process that this process serves on a thread
    /// (`vmm bench`'s), by requester ID: the harness raises their slots as it does an
    /// in-process device's, and their interrupts take the out-of-process path.
    #[must_use]
    pub fn remote_slot_devices(&self) -> Vec<(u16, Arc<dyn RaiseSlot>)> {
        self.models
            .iter()
            .filter_map(|(d, _)| match &d.kind {
                DeviceKind::VfioUser { socket } => crate::vfio_user::server::served_here(socket)
                    .map(|dev| (d.requester_id(), dev as Arc<dyn RaiseSlot>)),
                _ => None,
            })
            .collect()
    }

    /// Puts configuration access (ports `0xcf8`-`0xcff` and ECAM) and the BAR window on
    /// the buses.
    ///
    /// # Errors
    /// A range is taken.
    pub fn place(&self, buses: &mut Buses) -> Result<(), (&'static str, BusError)> {
        buses
            .pio
            .insert_concurrent(
                u64::from(pci::CONFIG_ADDRESS_PORT),
                u64::from(pci::CONFIG_PORTS),
                Arc::new(ConfigIo(self.root.clone())),
            )
            .map_err(|e| ("PCI configuration ports", e))?;
        buses
            .mmio
            .insert_concurrent(
                pci::ECAM_BASE,
                pci::ECAM_SIZE,
                Arc::new(Ecam(self.root.clone())),
            )
            .map_err(|e| ("PCI ECAM", e))?;
        buses
            .mmio
            .insert_concurrent(
                pci::WINDOW_BASE,
                pci::WINDOW_SIZE,
                Arc::new(MmioWindow(self.root.clone())),
            )
            .map_err(|e| ("PCI MMIO window", e))?;
        buses
            .pio
            .insert_concurrent(
                pci::IO_BASE,
                pci::IO_SIZE,
                Arc::new(IoWindow(self.root.clone())),
            )
            .map_err(|e| ("PCI I/O window", e))
    }

    /// Stops the event loop and reports each device, waiting for a busy loop or device
    /// no later than `deadline`: a loop still inside a device then is left to finish on
    /// its own, and a device still held is reported busy.
    #[must_use]
    pub fn finish(&mut self, deadline: Instant) -> Vec<DeviceReport> {
        self.stop_loop();
        if let Some(t) = self.thread.take() {
            self.paused = crate::threads::join_by(t, deadline);
        }
        self.models
            .iter()
            .map(|(device, model)| status_of(device, model, deadline).report)
            .collect()
    }

    /// Each device's counters and what of it is in use, as of now, while it runs (a
    /// device held longer than [`STATUS_PATIENCE`] by a vCPU or its loop is reported
    /// busy).
    #[must_use]
    pub fn status(&self) -> Vec<DeviceStatus> {
        let deadline = Instant::now() + STATUS_PATIENCE;
        self.models
            .iter()
            .map(|(device, model)| status_of(device, model, deadline))
            .collect()
    }
}

/// How long [`PciDevices::status`] waits for a device that is busy.
pub const STATUS_PATIENCE: Duration = Duration::from_millis(100);

/// A device's counters and use while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Its counters.
    pub report: DeviceReport,
    /// Message slots unmasked (slot-array) or contexts started (queue-memory), and how
    /// many it has; `None` for a device in another process.
    pub in_use: Option<(u32, u32)>,
}

fn status_of(device: &DeviceConfig, model: &Model, deadline: Instant) -> DeviceStatus {
    let report = |completions, faults, resets, dropped, remote| DeviceReport {
        device: device.clone(),
        completions,
        faults,
        resets,
        dropped,
        busy: false,
        remote,
    };
    let busy = DeviceStatus {
        report: DeviceReport {
            busy: true,
            ..report(0, 0, 0, 0, None)
        },
        in_use: None,
    };
    match model {
        Model::Slots(d) => lock_by(d, deadline).map_or(busy, |d| DeviceStatus {
            report: report(d.completions(), d.faults(), 0, 0, None),
            in_use: Some((d.slots_in_use(), d.slot_count())),
        }),
        Model::Queues(d) => lock_by(d, deadline).map_or(busy, |d| {
            let s = d.stats();
            DeviceStatus {
                report: report(s.completions, s.faults, s.resets, s.dropped, None),
                in_use: Some((d.contexts_in_use(), d.context_count())),
            }
        }),
        Model::VfioUser(d) => lock_by(d, deadline).map_or(busy, |d| DeviceStatus {
            report: report(0, 0, 0, 0, Some(d.report())),
            in_use: None,
        }),
    }
}

/// IOAPIC inputs of PCI INTx: 16 to 19, by device number and pin, as a bridge swizzles
/// them.
fn intx_input(pci_slot: u8, pin: u8) -> u8 {
    // The pin is the device's to say: anything but INTA-INTD has no input (the relay is
    // not made), and the sum is taken wide.
    let swizzled = (u16::from(pci_slot) + u16::from(pin.saturating_sub(1))) % 4;
    16 + u8::try_from(swizzled).unwrap_or(0)
}

/// A device another process serves: connected, guest RAM mapped for its DMA, its INTx (if
/// it has one) relayed to an IOAPIC input.
fn remote_device(
    d: &DeviceConfig,
    socket: &std::path::Path,
    mem: &DefaultMemory,
    (intx, mapper): (&IntxSink, Option<&Arc<dyn BarMapper>>),
    core: &CoreHandle,
) -> Result<(Model, Option<IntxRelay>), PciError> {
    let failed = |source| PciError::VfioUser {
        device: d.to_string(),
        source,
    };
    let mut client = Client::connect(socket, crate::vfio_user::DEFAULT_TIMEOUT).map_err(failed)?;
    client
        .map_ram(&vm_memory::GuestAddressSpace::memory(mem))
        .map_err(failed)?;
    let mut function = VfioUserFunction::new(client).map_err(failed)?;
    let pin = devices::pci::PciFunction::config(&function)
        .bytes(0x3d, 1)
        .first()
        .copied()
        .unwrap_or(0);
    let relay = function
        .connect_intx(intx_input(d.pci_slot, pin), intx.clone())
        .map_err(failed)?;
    // A device that raises through its remapping entries hosts their interrupts.
    if let Some(entries) = RemoteEntries::of(&function.client()) {
        let rid = d.requester_id();
        let entries = Arc::new(entries);
        function.set_entries(entries.clone());
        core.attach_host(rid, entries)
            .map_err(|e| failed(VfioUserError::Request(crate::report::error_chain(&e))))?;
        let core = core.clone();
        function.on_loss(move || {
            core.detach_host(rid);
        });
    } else if let Some(host) = function.msix_host(core.clone(), d.requester_id()) {
        // A device whose MSI-X table is ours: the entries its vectors name.
        let rid = d.requester_id();
        core.attach_named_host(rid, host)
            .map_err(|e| failed(VfioUserError::Request(crate::report::error_chain(&e))))?;
        let core = core.clone();
        function.on_loss(move || {
            core.detach_host(rid);
        });
    }
    if let Some(mapper) = mapper {
        function.set_mapper(mapper.clone());
    }
    Ok((Model::VfioUser(Arc::new(Mutex::new(function))), relay))
}

/// `mutex` locked, if it can be by `deadline`.
fn lock_by<T>(mutex: &Mutex<T>, deadline: Instant) -> Option<std::sync::MutexGuard<'_, T>> {
    loop {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_inputs_swizzle_and_take_any_pin_a_device_reports() {
        assert_eq!(intx_input(3, 1), 19);
        assert_eq!(intx_input(5, 1), 17);
        assert_eq!(intx_input(5, 2), 18);
        assert_eq!(
            intx_input(31, u8::MAX),
            17,
            "no overflow, whatever the device says"
        );
    }
}
