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
//! `REMAP_EACH_CPU`, `REMAP_RETARGET` and `REMAP_SOURCE_ID` go through the interrupt core
//! (`irq::backing`): the harness programs IRTEs as a front end would, and raises them as a
//! device would, through the data path with its requester ID.
//!
//! `BENCH_DELIVERY` and `BENCH_THROUGHPUT` time interrupts for `vmm bench` ([`bench`]).

mod bench;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::harness::DoorbellSink;
use devices::ims::slots::ImsSlots;
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

pub use bench::Measurements;

/// The interrupt core of the VM (remapping table, routes, lines) as the VMM that owns it
/// holds it: front ends get its [`irq::CoreHandle`]; the VMM keeps this for statistics,
/// snapshots and the harness (whose plain MSI routes share KVM's routing table).
pub type SharedBacking = Arc<irq::InterruptCore<crate::vm::VmRouting>>;

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

/// How often the harness thread, waiting for a ring, looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// The harness service.
#[derive(Debug)]
pub struct Harness {
    mem: GuestMemoryMmap,
    mailbox: u64,
    apic_ids: Vec<u32>,
    backing: SharedBacking,
    path: Arc<InterruptPath>,
    stop: Arc<AtomicBool>,
    fired: Arc<Vec<AtomicU64>>,
    /// Slot-array IMS devices by requester ID, for the benchmark requests.
    slot_devices: Vec<(u16, Arc<Mutex<ImsSlots>>)>,
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
        Self {
            mem,
            mailbox,
            apic_ids,
            backing,
            path,
            stop,
            fired,
            slot_devices: Vec::new(),
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
    pub fn with_slot_devices(mut self, devices: Vec<(u16, Arc<Mutex<ImsSlots>>)>) -> Self {
        self.slot_devices = devices;
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
        std::thread::Builder::new()
            .name("harness".into())
            .spawn(move || loop {
                match rings.recv_timeout(STOP_POLL) {
                    Ok(()) => {}
                    Err(RecvTimeoutError::Timeout) if !self.stop.load(Ordering::Acquire) => {
                        continue;
                    }
                    Err(_) => return,
                }
                let idle = self.idle.clone();
                let _serving = idle.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(seq) = self.unserved() {
                    self.serve(seq);
                }
            })
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
                self.remap_retarget(v, count, mode == 1, &mut fired, &mut result)
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
            request::REMAP_RETARGET => status::BAD_ARGUMENT,
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

    fn entry(&self, cpu: usize, vector: u8) -> Irte {
        let dest = self.apic_ids.get(cpu).copied().unwrap_or(0);
        Irte::new(
            Target::fixed(dest, vector),
            SourceValidation::RequesterId {
                sid: HARNESS_SOURCE_ID,
                qualifier: 0,
            },
        )
    }

    /// Allocates `count` entries and makes entry `i` what `entry_for(i)` says, in one
    /// transaction. Returns the first index and the route commits it took.
    fn activate(&self, count: u32, entry_for: impl Fn(u32) -> Irte) -> Option<(u32, u64)> {
        let mut backing = self.backing.lock();
        let before = backing.stats().route_commits;
        let first = backing
            .allocate(count, HARNESS_SOURCE_ID, AllocFlags::default())
            .ok()?;
        let mut txn = backing.transaction();
        for i in 0..count {
            if txn.set(first + i, &entry_for(i)).is_err() {
                return None;
            }
        }
        if txn.commit().is_err() {
            let _ = backing.free(first, count, HARNESS_SOURCE_ID);
            return None;
        }
        Some((first, backing.stats().route_commits - before))
    }

    fn release(&self, first: u32, count: u32) -> bool {
        let mut backing = self.backing.lock();
        backing.free(first, count, HARNESS_SOURCE_ID).is_ok()
    }

    fn remap_each_cpu(
        &self,
        vector: u8,
        count: u32,
        spread: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let cpus = self.cpus();
        if count == 0 {
            return status::OK;
        }
        // `vector + spread - 1 <= 255` was checked with the request.
        let place = |i: u32| {
            let offset = u8::try_from((i / cpus) % spread).unwrap_or(0);
            (i % cpus, vector.wrapping_add(offset))
        };
        let Some((first, commits)) = self.activate(count, |i| {
            let (cpu, v) = place(i);
            self.entry(cpu as usize, v)
        }) else {
            return status::HOST_ERROR;
        };
        *result = u32::try_from(commits).unwrap_or(u32::MAX);
        let mut outcome = status::OK;
        // Rounds of entries with distinct (vCPU, vector): they cannot merge in a LAPIC.
        let round = cpus * spread;
        'rounds: for start in (0..count).step_by(round as usize) {
            let end = (start + round).min(count);
            let before: Vec<u32> = (start..end)
                .map(|i| {
                    let (cpu, v) = place(i);
                    self.counter(cpu as usize, v)
                })
                .collect();
            for i in start..end {
                if self.path.signal(first + i, HARNESS_SOURCE_ID).is_err() {
                    outcome = status::HOST_ERROR;
                    break 'rounds;
                }
                self.count_fired(place(i).0 as usize, fired);
            }
            for (&start, i) in before.iter().zip(start..end) {
                let (cpu, v) = place(i);
                if !self.wait_for(|| self.counter(cpu as usize, v).wrapping_sub(start) >= 1) {
                    outcome = status::NOT_DELIVERED;
                    break 'rounds;
                }
            }
        }
        if !self.release(first, count) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        if outcome == status::OK {
            let mut m = self
                .measurements
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            m.max_live_delivered = m.max_live_delivered.max(count);
        }
        outcome
    }

    fn total(&self, vector: u8) -> Vec<u32> {
        (0..self.apic_ids.len())
            .map(|cpu| self.counter(cpu, vector))
            .collect()
    }

    fn remap_retarget(
        &self,
        vector: u8,
        count: u32,
        anchors: bool,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let cpus = self.cpus();
        // Entry 0 moves; entries 1..=cpus (with anchors) hold a line on every vCPU.
        let n = if anchors { cpus + 1 } else { 1 };
        let Some((first, _)) =
            self.activate(n, |i| self.entry(i.saturating_sub(1) as usize, vector))
        else {
            return status::HOST_ERROR;
        };
        let done = AtomicBool::new(false);
        let retargets = AtomicU64::new(0);
        let mut outcome = status::OK;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut cpu = 0u32;
                while !done.load(Ordering::Acquire) && !self.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    cpu = (cpu + 1) % cpus;
                    let mut backing = self.backing.lock();
                    let mut txn = backing.transaction();
                    if txn.set(first, &self.entry(cpu as usize, vector)).is_ok()
                        && txn.commit().is_ok()
                    {
                        retargets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            for _ in 0..count {
                let before = self.total(vector);
                if self.path.signal(first, HARNESS_SOURCE_ID).is_err() {
                    outcome = status::HOST_ERROR;
                    break;
                }
                let mut landed = None;
                let counted = self.wait_for(|| {
                    let now = self.total(vector);
                    landed = now.iter().zip(&before).position(|(a, b)| a != b);
                    landed.is_some()
                });
                match landed {
                    Some(cpu) if counted => self.count_fired(cpu, fired),
                    _ => {
                        outcome = status::NOT_DELIVERED;
                        break;
                    }
                }
            }
            done.store(true, Ordering::Release);
        });
        *result = u32::try_from(retargets.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        if !self.release(first, n) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    fn raise(&self, index: u32, count: u32, fired: &mut [u32], result: &mut u32) -> u32 {
        let entry = self.backing.lock().table().entry(index);
        let target = entry.ok().and_then(|e| {
            let cpu = self.apic_ids.iter().position(|&id| id == e.target.dest)?;
            (!e.target.logical).then_some((cpu, e.target.vector))
        });
        for _ in 0..count {
            let start = target.map(|(cpu, v)| self.counter(cpu, v));
            if self.path.signal(index, HARNESS_SOURCE_ID).is_err() {
                continue;
            }
            let (Some((cpu, v)), Some(start)) = (target, start) else {
                return status::BAD_ARGUMENT;
            };
            self.count_fired(cpu, fired);
            *result += 1;
            if !self.wait_for(|| self.counter(cpu, v).wrapping_sub(start) >= 1) {
                return status::NOT_DELIVERED;
            }
        }
        status::OK
    }

    /// The vector `msg` delivers with right now (through its entry when remappable).
    fn vector_of(&self, msg: &MsiMessage) -> Option<u8> {
        match msg.decode().ok()? {
            irq::msi::DecodedMsi::Compatibility(t) => Some(t.vector),
            d => {
                let backing = self.backing.lock();
                backing
                    .table()
                    .entry(d.index()?)
                    .ok()
                    .map(|e| e.target.vector)
            }
        }
    }

    fn raise_msi(
        &self,
        msg: MsiMessage,
        sid: u16,
        count: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        for _ in 0..count {
            let vector = self.vector_of(&msg);
            let before = vector.map(|v| self.total(v));
            if self.path.signal_msi(&msg, sid).is_err() {
                continue;
            }
            *result += 1;
            let (Some(v), Some(before)) = (vector, before) else {
                continue;
            };
            let mut landed = None;
            let counted = self.wait_for(|| {
                landed = self.total(v).iter().zip(&before).position(|(a, b)| a != b);
                landed.is_some()
            });
            match landed {
                Some(cpu) if counted => self.count_fired(cpu, fired),
                _ => return status::NOT_DELIVERED,
            }
        }
        status::OK
    }

    fn storm(
        &self,
        vector: u8,
        count: u32,
        bystanders: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let bystander = vector.wrapping_add(1);
        let Some((first, _)) = self.activate(2, |i| {
            self.entry(0, if i == 0 { vector } else { bystander })
        }) else {
            return status::HOST_ERROR;
        };
        let stats = self.path.storm_stats();
        let before = stats.throttled;
        let every = (count / bystanders).max(1);
        // The bystander stays at half the limit however fast the host raises the storm,
        // so none of its interrupts may be coalesced.
        let pace = match stats.rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs(2) / rate,
        };
        let mut last_bystander: Option<Instant> = None;
        let mut raised = 0;
        let mut outcome = status::OK;
        let raise_bystander = |this: &Self, fired: &mut [u32], last: &mut Option<Instant>| {
            if let Some(wait) = last.and_then(|t| pace.checked_sub(t.elapsed())) {
                std::thread::sleep(wait);
            }
            *last = Some(Instant::now());
            let start = this.counter(0, bystander);
            if this.path.signal(first + 1, HARNESS_SOURCE_ID).is_err() {
                return status::HOST_ERROR;
            }
            this.count_fired(0, fired);
            if this.wait_for(|| this.counter(0, bystander).wrapping_sub(start) >= 1) {
                status::OK
            } else {
                status::NOT_DELIVERED
            }
        };
        for i in 1..=count {
            if self.path.signal(first, HARNESS_SOURCE_ID).is_err() {
                outcome = status::HOST_ERROR;
                break;
            }
            self.count_fired(0, fired);
            if i % every == 0
                && raised < bystanders
                && last_bystander.is_none_or(|t| t.elapsed() >= pace)
            {
                raised += 1;
                outcome = raise_bystander(self, fired, &mut last_bystander);
                if outcome != status::OK {
                    break;
                }
            }
        }
        while outcome == status::OK && raised < bystanders {
            raised += 1;
            outcome = raise_bystander(self, fired, &mut last_bystander);
        }
        // The storm's last, coalesced interrupt arrives with the next flush.
        let settle = Instant::now();
        let mut last = self.counter(0, vector);
        let mut still = Instant::now();
        while settle.elapsed() < Duration::from_secs(2) && still.elapsed() < STORM_SETTLE {
            std::thread::sleep(Duration::from_millis(1));
            let now = self.counter(0, vector);
            if now != last {
                last = now;
                still = Instant::now();
            }
        }
        *result = u32::try_from(self.path.storm_stats().throttled - before).unwrap_or(u32::MAX);
        if !self.release(first, 2) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    /// Holds device `sid`'s lock for `ms` milliseconds on a thread of its own (which
    /// outlives the VM if the VM ends first); answers once the lock is held.
    fn hold_device(&self, sid: u16, ms: u32) -> u32 {
        let function = self.functions.0.iter().find(|(rid, _)| *rid == sid);
        let Some(function) = function
            .map(|(_, f)| f.clone())
            .filter(|_| (1..=harness::MAX_HOLD_MS).contains(&ms))
        else {
            return status::BAD_ARGUMENT;
        };
        let (held, is_held) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("harness-hold".into())
            .spawn(move || {
                let _device = function.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = held.send(());
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
            });
        match spawned.map(|_| is_held.recv()) {
            Ok(Ok(())) => status::OK,
            _ => status::HOST_ERROR,
        }
    }

    fn ioapic_line(&self, pin: u32, mode: u32, result: &mut u32) -> u32 {
        let Some(chip) = &self.ioapic else {
            return status::UNAVAILABLE;
        };
        let pin = match usize::try_from(pin) {
            Ok(p) if p < ioapic::PINS && mode <= 2 => p,
            _ => return status::BAD_ARGUMENT,
        };
        let mut io = chip.lock().unwrap_or_else(PoisonError::into_inner);
        let before = io.sent();
        match mode {
            0 => io.set_level(pin, false),
            1 => io.set_level(pin, true),
            _ => io.pulse(pin),
        }
        *result = u32::try_from(io.sent().saturating_sub(before)).unwrap_or(u32::MAX);
        status::OK
    }

    fn remap_source_id(&self, vector: u8, count: u32, fired: &mut [u32], result: &mut u32) -> u32 {
        let Some((first, _)) = self.activate(1, |_| self.entry(0, vector)) else {
            return status::HOST_ERROR;
        };
        let log = self.path.fault_log();
        let before = log.count(FaultReason::SourceIdMismatch);
        let mut outcome = status::OK;
        for _ in 0..count {
            if self.path.signal(first, harness::FOREIGN_SOURCE_ID).is_ok() {
                outcome = status::HOST_ERROR;
            }
        }
        *result =
            u32::try_from(log.count(FaultReason::SourceIdMismatch) - before).unwrap_or(u32::MAX);
        let start = self.counter(0, vector);
        if self.path.signal(first, HARNESS_SOURCE_ID).is_ok() {
            self.count_fired(0, fired);
            if !self.wait_for(|| self.counter(0, vector).wrapping_sub(start) >= 1) {
                outcome = status::NOT_DELIVERED;
            }
        } else {
            outcome = status::HOST_ERROR;
        }
        if !self.release(first, 1) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    fn fire_each_cpu(&self, vector: u8, count: u32, fired: &mut [u32]) -> u32 {
        let targets: Vec<(u32, u8)> = self.apic_ids.iter().map(|&a| (a, vector)).collect();
        let Ok(lines) = self.attach(&targets) else {
            return status::HOST_ERROR;
        };
        let mut result = status::OK;
        'cpus: for (cpu, (_, fd)) in lines.iter().enumerate() {
            let start = self.counter(cpu, vector);
            for k in 1..=count {
                if fd.write(1).is_err() {
                    result = status::HOST_ERROR;
                    break 'cpus;
                }
                self.count_fired(cpu, fired);
                if !self.wait_for(|| self.counter(cpu, vector).wrapping_sub(start) >= k) {
                    result = status::NOT_DELIVERED;
                    break 'cpus;
                }
            }
        }
        if self.detach(lines).is_err() && result == status::OK {
            result = status::HOST_ERROR;
        }
        result
    }

    /// One plain MSI route and one irqfd per (APIC ID, vector), committed together.
    fn attach(&self, targets: &[(u32, u8)]) -> Result<Vec<(Gsi, EventFd)>, ()> {
        let mut backing = self.backing.lock();
        let routes = backing.routes_mut();
        let mut gsis = Vec::with_capacity(targets.len());
        for &(apic, vector) in targets {
            let allocated = MsiMessage::compatibility(apic, vector)
                .map_err(|_| ())
                .and_then(|msg| routes.allocate(msg).map_err(|_| ()));
            match allocated {
                Ok(gsi) => gsis.push(gsi),
                Err(()) => {
                    routes.rollback();
                    return Err(());
                }
            }
        }
        routes.commit().map_err(|_| ())?;
        let mut lines = Vec::with_capacity(gsis.len());
        for gsi in gsis.iter().copied() {
            let attached = EventFd::new(EFD_NONBLOCK)
                .map_err(|_| ())
                .and_then(|fd| routes.attach_irqfd(&fd, gsi).map(|()| fd).map_err(|_| ()));
            match attached {
                Ok(fd) => lines.push((gsi, fd)),
                Err(()) => {
                    drop(backing);
                    let _ = self.detach(lines);
                    // Routes without irqfds (the rest of `gsis`) go too.
                    let mut backing = self.backing.lock();
                    let routes = backing.routes_mut();
                    for gsi in gsis {
                        let _ = routes.remove(gsi);
                    }
                    let _ = routes.commit();
                    return Err(());
                }
            }
        }
        Ok(lines)
    }

    /// Detaches every irqfd, then removes the routes in one commit.
    fn detach(&self, lines: Vec<(Gsi, EventFd)>) -> Result<(), ()> {
        let mut backing = self.backing.lock();
        let routes = backing.routes_mut();
        let mut ok = true;
        for (gsi, fd) in &lines {
            ok &= routes.detach_irqfd(fd, *gsi).is_ok();
        }
        for (gsi, _) in &lines {
            ok &= routes.remove(*gsi).is_ok();
        }
        ok &= routes.commit().is_ok();
        ok.then_some(()).ok_or(())
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
