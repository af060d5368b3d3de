//! Host-side figures: a real KVM VM with an in-kernel irqchip, no vCPU; our dispatcher
//! and data path beside raw KVM routing and irqfds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypercall::abi::{call, status, target, BatchEntry, Registers};
use irq::backing::{Backing, InterruptPath, Limits};
use irq::fdlimit::raise_fd_limit;
use irq::port::{RouteEntry, RouteKind};
use irq::{KvmRouting, MsiMessage, RouteTable, RoutingBackend};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Figure, BATCH_ADDR, CPUS, REQUESTER, VECTORS};
use crate::vm::VmError;
use devices::dispatch::{Dispatcher, HypercallHandler};
use devices::memory::SharedRam;
use devices::viommu::{Vtd, WeakVtd};

/// A VM with an in-kernel irqchip, and the dispatcher over its interrupt core, which
/// mirrors requester writes into a VT-d unit as the VMM's does.
pub(super) struct Rig {
    dispatcher: Dispatcher,
    path: Arc<InterruptPath>,
    mem: GuestMemoryMmap,
    /// The mirror's unit (the core holds it weakly).
    _vtd: Arc<Mutex<Vtd>>,
}

/// A VM with an in-kernel irqchip and nothing else.
pub(super) fn irqchip_vm(kvm: &Kvm) -> Result<Arc<VmFd>, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create the VM", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
    Ok(Arc::new(vm))
}

pub(super) fn new_rig(kvm: &Kvm) -> Result<Rig, VmError> {
    let vm = irqchip_vm(kvm)?;
    let routing = KvmRouting::new(vm.clone());
    let limit = routing.route_limit();
    raise_fd_limit(u64::from(limit) + 256)?;
    let backing = Backing::new(RouteTable::new(routing, limit)?, Limits::default())?;
    let path = backing.path();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])
        .map_err(|e| VmError::Os("allocate benchmark memory", std::io::Error::other(e)))?;
    let ram: SharedRam = Arc::new(vm_memory::GuestMemoryAtomic::new(mem.clone()));
    let core = irq::InterruptCore::new(backing);
    let vtd = Arc::new(Mutex::new(Vtd::new(
        core.handle(),
        ram.clone(),
        Arc::new(KvmRouting::new(vm)),
    )));
    core.set_mirror(WeakVtd::to(&vtd));
    let dispatcher = Dispatcher::new(
        core.handle(),
        ram,
        (0..CPUS).collect(),
        vec![REQUESTER],
        u32::MAX,
    );
    Ok(Rig {
        dispatcher,
        path,
        mem,
        _vtd: vtd,
    })
}

/// Target `k` of the spread: APIC `k % CPUS`, vector `0x30 + (k / CPUS) % VECTORS`.
pub(super) fn spread(k: u32) -> u64 {
    let vector = 0x30 + (k / CPUS) % VECTORS;
    target::fixed(k % CPUS, u8::try_from(vector).unwrap_or(0x30))
}

impl Rig {
    fn call(&self, number: u32, a: u64, b: u64) -> Registers {
        let mut regs = Registers {
            rax: u64::from(number),
            rcx: u64::from(REQUESTER),
            rsi: a,
            rdi: b,
            r8: 0,
            r9: 0,
        };
        self.dispatcher.call(&mut regs);
        regs
    }

    pub(super) fn checked(
        &self,
        what: &'static str,
        number: u32,
        a: u64,
        b: u64,
    ) -> Result<Registers, VmError> {
        let regs = self.call(number, a, b);
        if regs.rax == status::OK {
            Ok(regs)
        } else {
            Err(VmError::Os(
                what,
                std::io::Error::other(format!("hypercall status {}", regs.rax)),
            ))
        }
    }

    /// Writes entries `first..first + count` with `word(k)` into the batch array and
    /// applies them with one BATCH; returns how long the call took.
    pub(super) fn batch(
        &self,
        first: u64,
        count: u32,
        word: impl Fn(u32) -> u64,
    ) -> Result<Duration, VmError> {
        for k in 0..count {
            let entry = BatchEntry {
                index: u32::try_from(first + u64::from(k)).unwrap_or(u32::MAX),
                status: 0,
                target: word(k),
            };
            self.mem
                .write_slice(
                    &entry.to_bytes(),
                    GuestAddress(BATCH_ADDR + 16 * u64::from(k)),
                )
                .map_err(|e| VmError::Os("write the batch array", std::io::Error::other(e)))?;
        }
        let begin = Instant::now();
        self.checked("apply a batch", call::BATCH, BATCH_ADDR, u64::from(count))?;
        Ok(begin.elapsed())
    }

    /// Activates `live` entries spread over the targets; returns the first.
    /// The data path the rig's entries deliver through.
    pub(super) fn path(&self) -> Arc<InterruptPath> {
        self.path.clone()
    }

    pub(super) fn populate(&self, live: u32) -> Result<u64, VmError> {
        let first = self
            .checked("allocate", call::ALLOCATE, u64::from(live), 0)?
            .rsi;
        let mut done = 0;
        while done < live {
            let n = (live - done).min(4096);
            self.batch(first + u64::from(done), n, |k| spread(done + k))?;
            done += n;
        }
        Ok(first)
    }
}

/// `count` MSI routes, as a VMM that keeps one route per interrupt would have them.
fn raw_table(count: u32) -> Vec<RouteEntry> {
    (0..count)
        .map(|gsi| RouteEntry {
            gsi,
            kind: RouteKind::Msi(MsiMessage {
                address: 0xfee0_0000 | (u64::from(gsi % CPUS) << 12),
                data: 0x30 + (gsi / CPUS) % VECTORS,
            }),
        })
        .collect()
}

pub(super) fn time_set_routes(
    vm: &Arc<VmFd>,
    count: u32,
    samples: usize,
) -> Result<Figure, VmError> {
    let routing = KvmRouting::new(vm.clone());
    let table = raw_table(count);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let begin = Instant::now();
        routing
            .set_routes(&table)
            .map_err(|e| VmError::Os("set a whole routing table", e))?;
        times.push(begin.elapsed());
    }
    Ok(Figure::of(times))
}

/// What one interrupt costs the device model: a live entry's remappable message through
/// our data path, beside an eventfd write to a raw irqfd (on VMs without vCPUs, so KVM's
/// injection finds no one to deliver to, the same for both).
pub(super) fn signal_cost(kvm: &Kvm, samples: usize) -> Result<(Figure, Figure), VmError> {
    let rig = new_rig(kvm)?;
    let first = rig.populate(1)?;
    let msg = MsiMessage::remappable(u16::try_from(first).unwrap_or(0), None);
    let mut routes = RouteTable::new(KvmRouting::new(irqchip_vm(kvm)?), 64)?;
    // APIC 0, vector 0x30, fixed, edge: the target of the first entry of the spread.
    let gsi = routes.allocate(MsiMessage {
        address: 0xfee0_0000,
        data: 0x30,
    })?;
    routes.commit()?;
    let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Os("create an eventfd", e))?;
    routes.attach_irqfd(&fd, gsi)?;
    let mut ours = Vec::with_capacity(samples);
    let mut raw = Vec::with_capacity(samples);
    // Interleaved, so that both see the same state of the machine.
    for _ in 0..samples {
        let begin = Instant::now();
        let signalled = rig.path.signal_msi(&msg, REQUESTER);
        ours.push(begin.elapsed());
        signalled.map_err(|f| {
            VmError::Os(
                "signal a live entry",
                std::io::Error::other(format!("{f:?}")),
            )
        })?;
        let begin = Instant::now();
        let written = fd.write(1);
        raw.push(begin.elapsed());
        written.map_err(|e| VmError::Os("write a raw irqfd", e))?;
    }
    routes.detach_irqfd(&fd, gsi)?;
    Ok((Figure::of(ours), Figure::of(raw)))
}
