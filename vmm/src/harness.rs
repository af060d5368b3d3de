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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::harness::DoorbellSink;
use hypercall::harness::{self, offset, request, status};
use irq::{Gsi, KvmRouting, MsiMessage, RouteTable};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The routing table, shared by everything that programs routes.
pub type SharedRoutes = Arc<Mutex<RouteTable<KvmRouting>>>;

/// How long the host waits for the guest to count one interrupt.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(10);

/// Forwards doorbell rings to the harness thread.
#[derive(Debug)]
pub struct Doorbell(pub Sender<u32>);

impl DoorbellSink for Doorbell {
    fn ring(&self, seq: u32) {
        // If the harness thread is gone the VM is stopping; the ring has no one to serve.
        let _ = self.0.send(seq);
    }
}

/// The harness service.
#[derive(Debug)]
pub struct Harness {
    mem: GuestMemoryMmap,
    mailbox: u64,
    apic_ids: Vec<u32>,
    routes: SharedRoutes,
    stop: Arc<AtomicBool>,
    fired: Arc<Vec<AtomicU64>>,
}

impl Harness {
    /// A harness for the mailbox at `mailbox`, firing at vCPUs with `apic_ids`.
    #[must_use]
    pub fn new(
        mem: GuestMemoryMmap,
        mailbox: u64,
        apic_ids: Vec<u32>,
        routes: SharedRoutes,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let fired = Arc::new(apic_ids.iter().map(|_| AtomicU64::new(0)).collect());
        Self {
            mem,
            mailbox,
            apic_ids,
            routes,
            stop,
            fired,
        }
    }

    /// Interrupts fired at each vCPU so far (over all requests).
    #[must_use]
    pub fn fired(&self) -> Arc<Vec<AtomicU64>> {
        self.fired.clone()
    }

    /// Serves rings until every doorbell sender is gone.
    ///
    /// # Errors
    /// The error of spawning the thread.
    pub fn spawn(self, rings: Receiver<u32>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("harness".into())
            .spawn(move || {
                for seq in rings {
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
        let mut fired = vec![0u32; self.apic_ids.len()];
        let result = match code {
            request::FIRE_MSI_EACH_CPU => match u8::try_from(vector) {
                Ok(v) if vector >= harness::MIN_VECTOR && count <= harness::MAX_COUNT => {
                    self.fire_each_cpu(v, count, &mut fired)
                }
                _ => status::BAD_ARGUMENT,
            },
            _ => status::UNKNOWN_REQUEST,
        };
        for (cpu, n) in fired.iter().enumerate() {
            self.write(offset::FIRED + 4 * cpu, *n);
        }
        self.write(offset::STATUS, result);
        self.write(offset::DONE_SEQ, seq);
    }

    fn fire_each_cpu(&self, vector: u8, count: u32, fired: &mut [u32]) -> u32 {
        let Ok(lines) = self.attach(vector) else {
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
                fired[cpu] += 1;
                if let Some(n) = self.fired.get(cpu) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
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

    /// One route and one irqfd per vCPU, committed together.
    fn attach(&self, vector: u8) -> Result<Vec<(Gsi, EventFd)>, ()> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut gsis = Vec::with_capacity(self.apic_ids.len());
        for &apic in &self.apic_ids {
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
                    drop(routes);
                    let _ = self.detach(lines);
                    // Routes without irqfds (the rest of `gsis`) go too.
                    let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
