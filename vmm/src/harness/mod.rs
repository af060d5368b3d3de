//! The host side of the test harness (`hypercall::harness`): services the requests a test
//! guest leaves in its mailbox, on a thread of its own.
//!
//! `FIRE_MSI_EACH_CPU` is the first interrupt path end to end: for every vCPU, a plain MSI
//! route to its APIC ID is committed through [`irq::RouteTable`] (one commit for all of
//! them), an eventfd is attached as an irqfd, and the eventfd is written `count` times.
//! After each write the thread waits until the guest's counter for that vCPU and vector
//! has grown, so that no two interrupts merge in the target LAPIC and an interrupt that
//! lands on the wrong vCPU is noticed. Afterwards the irqfds are detached and the routes
//! removed, in the kernel's order.
//!
//! `REMAP_EACH_CPU`, `REMAP_RETARGET` and `REMAP_SOURCE_ID` go through the interrupt
//! core's front door (`irq::control`): the harness programs IRTEs as a front end would,
//! and raises them as a device would, through the data path with its requester ID
//! (`remap`). Plain MSI routes (`msi`) share KVM's routing table with the core through
//! the route table itself; `platform` holds devices and drives the IOAPIC's lines.
//!
//! `BENCH_DELIVERY` and `BENCH_THROUGHPUT` time interrupts for `vmm bench` (`bench`).

mod bench;
mod msi;
mod platform;
mod remap;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::harness::DoorbellSink;
use devices::ims::slots::RaiseSlot;
use devices::ioapic::{self, IoApic};
use devices::pci::SharedFunction;

use crate::vcpu::{HypercallTimes, VmEvent};
use hypercall::harness::{self, offset, request, status, HARNESS_SOURCE_ID};
use irq::backing::{AllocFlags, InterruptPath};
use irq::irte::{Irte, SourceValidation};
use irq::msi::Target;
use irq::port::InjectedFaults;
use irq::remap::FaultReason;
use irq::{Gsi, MsiMessage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use bench::{ExitTimes, Measurements};

pub use crate::routing::SharedBacking;

/// How long a storm's counter must stay still before the storm is over.
const STORM_SETTLE: Duration = Duration::from_millis(50);
/// How long the host waits for the guest to count one interrupt.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(10);

/// Forwards doorbell rings to the harness thread. The channel holds one ring: rings
/// while one is waiting add nothing (the thread looks at the mailbox once for all of
/// them), so a guest ringing in a loop costs no memory.
#[derive(Debug)]
pub struct Doorbell(pub SyncSender<()>);

impl DoorbellSink for Doorbell {
    fn ring(&self) {
        // Full: a look at the mailbox is already due. Disconnected: the VM is stopping.
        let _ = self.0.try_send(());
    }
}

/// The harness service.
#[derive(Debug)]
pub struct Harness {
    mem: GuestMemoryMmap,
    mailbox: u64,
    apic_ids: Vec<u32>,
    backing: SharedBacking,
    /// Its plain MSI routes' owner in KVM's table.
    routes: irq::routes::OwnerId,
    path: Arc<InterruptPath>,
    stop: Arc<AtomicBool>,
    fired: Arc<Vec<AtomicU64>>,
    /// Slot-array IMS devices by requester ID, for the benchmark requests.
    slot_devices: Vec<(u16, Arc<dyn RaiseSlot>)>,
    /// Which of them are in another process.
    remote_sids: Vec<u16>,
    hypercall_times: Option<Arc<HypercallTimes>>,
    faults: Option<Arc<InjectedFaults>>,
    measurements: Arc<Mutex<Measurements>>,
    /// Where `SNAPSHOT` requests go, if the VM takes snapshots.
    snapshots: Option<Sender<VmEvent>>,
    /// Held while a request is served: whoever holds it knows the harness is idle.
    idle: Arc<Mutex<()>>,
    /// The IOAPIC whose inputs `IOAPIC_LINE` drives.
    ioapic: Option<Arc<Mutex<IoApic>>>,
    /// The PCI devices `HOLD_DEVICE` may hold.
    functions: Functions,
}

/// PCI devices by requester ID.
#[derive(Default)]
struct Functions(Vec<(u16, SharedFunction)>);

impl std::fmt::Debug for Functions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(rid, _)| rid))
            .finish()
    }
}

impl Harness {
    /// A harness for the mailbox at `mailbox`, firing at vCPUs with `apic_ids`.
    #[must_use]
    pub fn new(
        mem: GuestMemoryMmap,
        mailbox: u64,
        apic_ids: Vec<u32>,
        backing: SharedBacking,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let fired = Arc::new(apic_ids.iter().map(|_| AtomicU64::new(0)).collect());
        let path = backing.lock().path();
        // Plain MSI routes: one per vCPU (request 1), or a window of vectors (the
        // throughput benchmark, request 8).
        let budget = u32::try_from(apic_ids.len())
            .unwrap_or(u32::MAX)
            .max(harness::MAX_BENCH_WINDOW);
        let routes = irq::InterruptControl::routes(&*backing).add_owner("test harness", budget);
        Self {
            mem,
            mailbox,
            apic_ids,
            backing,
            routes,
            path,
            stop,
            fired,
            slot_devices: Vec::new(),
            remote_sids: Vec::new(),
            hypercall_times: None,
            faults: None,
            measurements: Arc::default(),
            snapshots: None,
            idle: Arc::default(),
            ioapic: None,
            functions: Functions::default(),
        }
    }

    /// The slot-array IMS devices the benchmark requests may raise, by requester ID.
    #[must_use]
    pub fn with_slot_devices(mut self, devices: Vec<(u16, Arc<dyn RaiseSlot>)>) -> Self {
        self.slot_devices = devices;
        self
    }

    /// Slot-array IMS devices in another process (served by this process on a thread)
    /// that the benchmark requests may raise: their delivery is measured apart.
    #[must_use]
    pub fn with_remote_slot_devices(mut self, devices: Vec<(u16, Arc<dyn RaiseSlot>)>) -> Self {
        self.remote_sids = devices.iter().map(|(sid, _)| *sid).collect();
        self.slot_devices.extend(devices);
        self
    }

    /// Where the vCPUs record hypercall times (for `BENCH_HYPERCALLS`).
    #[must_use]
    pub fn with_hypercall_times(mut self, times: Arc<HypercallTimes>) -> Self {
        self.hypercall_times = Some(times);
        self
    }

    /// The interrupt core's fault-injection switches (for `INJECT`).
    #[must_use]
    pub fn with_faults(mut self, faults: Arc<InjectedFaults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Where `SNAPSHOT` requests are passed on (without it they are answered
    /// `UNAVAILABLE`).
    #[must_use]
    pub fn with_snapshots(mut self, to: Sender<VmEvent>) -> Self {
        self.snapshots = Some(to);
        self
    }

    /// The PCI devices `HOLD_DEVICE` may hold, by requester ID.
    #[must_use]
    pub fn with_pci_functions(mut self, functions: Vec<(u16, SharedFunction)>) -> Self {
        self.functions = Functions(functions);
        self
    }

    /// The IOAPIC whose input lines `IOAPIC_LINE` drives (without it the request is
    /// answered `UNAVAILABLE`).
    #[must_use]
    pub fn with_ioapic(mut self, ioapic: Arc<Mutex<IoApic>>) -> Self {
        self.ioapic = Some(ioapic);
        self
    }

    /// A lock the harness holds while it serves a request: holding it keeps the harness
    /// between requests (a snapshot pauses it so).
    #[must_use]
    pub fn idle_lock(&self) -> Arc<Mutex<()>> {
        self.idle.clone()
    }

    /// The request the guest rang for but the host has not done (the mailbox's
    /// `REQUEST_SEQ` ahead of `DONE_SEQ`), as after a restore: its sequence number.
    #[must_use]
    pub fn unserved(&self) -> Option<u32> {
        let seq = self.read(offset::REQUEST_SEQ);
        (seq != self.read(offset::DONE_SEQ)).then_some(seq)
    }

    /// What the benchmark requests measured (and the largest remapped set delivered).
    #[must_use]
    pub fn measurements(&self) -> Arc<Mutex<Measurements>> {
        self.measurements.clone()
    }

    /// Interrupts fired at each vCPU so far (over all requests).
    #[must_use]
    pub fn fired(&self) -> Arc<Vec<AtomicU64>> {
        self.fired.clone()
    }

    /// Serves rings until every doorbell sender is gone or the VM stops. At each ring the
    /// mailbox's `REQUEST_SEQ` is the request's number: a ring whose `REQUEST_SEQ`
    /// equals `DONE_SEQ` has nothing to serve (junk rings, a ring for a request already
    /// done, as after a restore that served it on its own: see `unserved`).
    ///
    /// # Errors
    /// The error of spawning the thread.
    pub fn spawn(self, rings: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
        crate::threads::spawn(
            crate::seccomp::ThreadKind::Harness,
            "harness".into(),
            move || loop {
                // No timeout: the VM's stop sends a ring too (the stop flag tells them
                // apart), and a VM gone is a disconnection.
                if rings.recv().is_err() || self.stop.load(Ordering::Acquire) {
                    return;
                }
                let idle = self.idle.clone();
                let _serving = idle.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(seq) = self.unserved() {
                    self.serve(seq);
                }
            },
        )
    }

    fn read(&self, at: usize) -> u32 {
        // The mailbox was placed by the VMM inside RAM; a failed read means the VM is
        // gone, and 0 is then as good as anything.
        self.mem
            .read_obj(GuestAddress(self.mailbox + at as u64))
            .unwrap_or(0)
    }

    fn write(&self, at: usize, value: u32) {
        let _ = self.mem.store(
            value,
            GuestAddress(self.mailbox + at as u64),
            Ordering::Release,
        );
    }

    fn counter(&self, cpu: usize, vector: u8) -> u32 {
        let at = GuestAddress(self.mailbox + harness::counter_offset(cpu, vector) as u64);
        self.mem.load(at, Ordering::Acquire).unwrap_or(0)
    }

    /// Handles the request the guest rang for with `seq`.
    pub fn serve(&self, seq: u32) {
        let code = self.read(offset::REQUEST);
        let vector = self.read(offset::ARG_VECTOR);
        let count = self.read(offset::ARG_COUNT);
        let mode = self.read(offset::ARG_MODE);
        let mut fired = vec![0u32; self.apic_ids.len()];
        let mut result = 0;
        let window = self.read(offset::ARG_WINDOW);
        let spread = match code {
            request::REMAP_EACH_CPU => mode.max(1),
            request::BENCH_THROUGHPUT => window,
            request::STORM => 2,
            _ => 1,
        };
        let args_ok = matches!(
            code,
            request::RAISE
                | request::RAISE_MSI
                | request::BENCH_HYPERCALLS
                | request::INJECT
                | request::SNAPSHOT
                | request::IOAPIC_LINE
                | request::HOLD_DEVICE
        ) && count <= harness::MAX_COUNT
            || vector >= harness::MIN_VECTOR
                && (1..=harness::MAX_REMAP_VECTORS).contains(&spread)
                && vector
                    .checked_add(spread - 1)
                    .is_some_and(|top| top <= 0xff)
                && count <= harness::MAX_COUNT;
        let sid = u16::try_from(self.read(offset::ARG_SID)).unwrap_or(u16::MAX);
        let v = u8::try_from(vector).unwrap_or(0);
        let outcome = match code {
            _ if !args_ok => status::BAD_ARGUMENT,
            request::FIRE_MSI_EACH_CPU => self.fire_each_cpu(v, count, &mut fired),
            request::REMAP_EACH_CPU => {
                self.remap_each_cpu(v, count, spread, &mut fired, &mut result)
            }
            request::REMAP_RETARGET if mode <= 1 => {
                self.remap_retarget(v, count, mode == 1, false, &mut fired, &mut result)
            }
            request::REMAP_EXTERNAL if mode <= 1 => {
                self.remap_retarget(v, count, mode == 1, true, &mut fired, &mut result)
            }
            request::REMAP_SOURCE_ID => self.remap_source_id(v, count, &mut fired, &mut result),
            request::RAISE => self.raise(mode, count, &mut fired, &mut result),
            request::RAISE_MSI => {
                let address = u64::from(self.read(offset::ARG_ADDR_LO))
                    | (u64::from(self.read(offset::ARG_ADDR_HI)) << 32);
                let msg = MsiMessage {
                    address,
                    data: self.read(offset::ARG_DATA),
                };
                self.raise_msi(msg, sid, count, &mut fired, &mut result)
            }
            request::BENCH_DELIVERY => self.bench_delivery(v, count, mode, sid, &mut fired),
            request::BENCH_THROUGHPUT => {
                self.bench_throughput(v, count, mode, window, sid, &mut fired)
            }
            request::BENCH_HYPERCALLS => self.bench_hypercalls(mode, count, &mut result),
            request::STORM if (1..=harness::MAX_BYSTANDERS).contains(&mode) => {
                self.storm(v, count, mode, &mut fired, &mut result)
            }
            request::STORM => status::BAD_ARGUMENT,
            request::INJECT => match (mode, &self.faults) {
                (1, Some(f)) => {
                    f.fail_route_commits(count);
                    status::OK
                }
                (2, Some(f)) => {
                    f.fail_irqfd_assigns(count);
                    status::OK
                }
                (1 | 2, None) => status::HOST_ERROR,
                _ => status::BAD_ARGUMENT,
            },
            request::REMAP_RETARGET | request::REMAP_EXTERNAL => status::BAD_ARGUMENT,
            request::SNAPSHOT if self.snapshots.is_some() => status::OK,
            request::SNAPSHOT => status::UNAVAILABLE,
            request::IOAPIC_LINE => self.ioapic_line(count, mode, &mut result),
            request::HOLD_DEVICE => self.hold_device(sid, count),
            _ => status::UNKNOWN_REQUEST,
        };
        for (cpu, n) in fired.iter().enumerate() {
            self.write(offset::FIRED + 4 * cpu, *n);
        }
        self.write(offset::RESULT, result);
        self.write(offset::STATUS, outcome);
        self.write(offset::DONE_SEQ, seq);
        if args_ok && matches!(code, request::BENCH_DELIVERY | request::BENCH_THROUGHPUT) {
            self.wake(v);
        }
        if code == request::SNAPSHOT && outcome == status::OK {
            if let Some(to) = &self.snapshots {
                // Done first: the snapshot (taken once this request has returned) finds
                // it done.
                let _ = to.send(VmEvent::SnapshotRequested);
            }
        }
    }

    fn cpus(&self) -> u32 {
        // At most 255 vCPUs (the configuration's limit).
        u32::try_from(self.apic_ids.len())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    fn count_fired(&self, cpu: usize, fired: &mut [u32]) {
        if let Some(n) = fired.get_mut(cpu) {
            *n += 1;
        }
        if let Some(n) = self.fired.get(cpu) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Polls `done` until it holds, the VM stops, or patience runs out.
    fn wait_for(&self, mut done: impl FnMut() -> bool) -> bool {
        let begin = Instant::now();
        loop {
            if done() {
                return true;
            }
            if self.stop.load(Ordering::Relaxed) || begin.elapsed() > DELIVERY_PATIENCE {
                return false;
            }
            if begin.elapsed() < Duration::from_micros(200) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}
