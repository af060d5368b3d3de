//! The VM's PCI devices: the root bus on the port and MMIO buses (CF8/CFC, ECAM, the BAR
//! window), each configured IMS device at its slot with its requester ID, and the
//! devices' backends on one event-loop thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::ims::queues::ImsQueues;
use devices::ims::slots::ImsSlots;
use devices::ims::ImsBackend;
use devices::pci::{self, ConfigIo, Ecam, MmioWindow, PciRoot, SharedRoot};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use irq::backing::InterruptPath;
use vm_memory::GuestMemoryMmap;

use crate::bus::BusError;
use crate::config::{DeviceConfig, DeviceKind};
use crate::exit::Buses;

/// How long the event loop waits before looking at the stop flag again.
const LOOP_TIMEOUT_MS: i32 = 50;

#[derive(Debug)]
enum Model {
    Slots(Arc<Mutex<ImsSlots>>),
    Queues(Arc<Mutex<ImsQueues>>),
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
}

/// The PCI side of a VM.
#[derive(Debug)]
pub struct PciDevices {
    root: SharedRoot,
    models: Vec<(DeviceConfig, Model)>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Drop for PciDevices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Subscriber = Box<dyn MutEventSubscriber + Send>;

impl PciDevices {
    /// Creates `devices`, raising interrupts through `path`, and starts their event loop,
    /// which runs until [`PciDevices::finish`] or drop.
    ///
    /// # Errors
    /// An eventfd, timer, epoll or thread could not be had.
    pub fn new(
        devices: &[DeviceConfig],
        path: &Arc<InterruptPath>,
        mem: &GuestMemoryMmap,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut root = PciRoot::new();
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let mut models = Vec::with_capacity(devices.len());
        for d in devices {
            let rid = d.requester_id();
            let (function, backend, model): (pci::SharedFunction, Subscriber, Model) = match d.kind
            {
                DeviceKind::ImsSlots { slots, queues } => {
                    let dev = Arc::new(Mutex::new(ImsSlots::new(
                        slots,
                        queues,
                        rid,
                        path.clone(),
                        mem.clone(),
                    )?));
                    (
                        dev.clone(),
                        Box::new(ImsBackend::new(dev.clone())?),
                        Model::Slots(dev),
                    )
                }
                DeviceKind::ImsQueues {
                    contexts,
                    command_timeout_ms,
                } => {
                    let mut q = ImsQueues::new(contexts, rid, path.clone(), mem.clone())?;
                    q.set_timeout(Duration::from_millis(u64::from(command_timeout_ms)));
                    let dev = Arc::new(Mutex::new(q));
                    (
                        dev.clone(),
                        Box::new(ImsBackend::new(dev.clone())?),
                        Model::Queues(dev),
                    )
                }
            };
            if root.add(d.pci_slot, 0, function).is_none() {
                return Err(std::io::Error::other(format!(
                    "PCI slot {} is taken",
                    d.pci_slot
                )));
            }
            events.add_subscriber(backend);
            models.push((*d, model));
        }
        root.assign_bars();
        let stopped = stop.clone();
        let thread = if models.is_empty() {
            None
        } else {
            Some(
                std::thread::Builder::new()
                    .name("ims-devices".into())
                    .spawn(move || {
                        while !stopped.load(Ordering::Acquire) {
                            // An error here is an interrupted wait; the loop tries again.
                            let _ = events.run_with_timeout(LOOP_TIMEOUT_MS);
                        }
                    })?,
            )
        };
        Ok(Self {
            root: Arc::new(Mutex::new(root)),
            models,
            thread,
            stop,
        })
    }

    /// The requester IDs of the devices (the hypercall's permitted requesters).
    #[must_use]
    pub fn requesters(&self) -> Vec<u16> {
        self.models.iter().map(|(d, _)| d.requester_id()).collect()
    }

    /// The slot-array devices, by requester ID (what the harness's benchmark requests
    /// raise).
    #[must_use]
    pub fn slot_devices(&self) -> Vec<(u16, Arc<Mutex<ImsSlots>>)> {
        self.models
            .iter()
            .filter_map(|(d, model)| match model {
                Model::Slots(dev) => Some((d.requester_id(), dev.clone())),
                Model::Queues(_) => None,
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
            .insert(
                u64::from(pci::CONFIG_ADDRESS_PORT),
                u64::from(pci::CONFIG_PORTS),
                Arc::new(Mutex::new(ConfigIo(self.root.clone()))),
            )
            .map_err(|e| ("PCI configuration ports", e))?;
        buses
            .mmio
            .insert(
                pci::ECAM_BASE,
                pci::ECAM_SIZE,
                Arc::new(Mutex::new(Ecam(self.root.clone()))),
            )
            .map_err(|e| ("PCI ECAM", e))?;
        buses
            .mmio
            .insert(
                pci::WINDOW_BASE,
                pci::WINDOW_SIZE,
                Arc::new(Mutex::new(MmioWindow(self.root.clone()))),
            )
            .map_err(|e| ("PCI MMIO window", e))
    }

    /// Stops the event loop and reports each device.
    #[must_use]
    pub fn finish(mut self) -> Vec<DeviceReport> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.models
            .iter()
            .map(|(device, model)| match model {
                Model::Slots(d) => {
                    let d = d.lock().unwrap_or_else(PoisonError::into_inner);
                    DeviceReport {
                        device: *device,
                        completions: d.completions(),
                        faults: d.faults(),
                        resets: 0,
                        dropped: 0,
                    }
                }
                Model::Queues(d) => {
                    let s = d.lock().unwrap_or_else(PoisonError::into_inner).stats();
                    DeviceReport {
                        device: *device,
                        completions: s.completions,
                        faults: s.faults,
                        resets: s.resets,
                        dropped: s.dropped,
                    }
                }
            })
            .collect()
    }
}
