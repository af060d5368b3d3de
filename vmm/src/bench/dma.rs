//! IMS-device throughput with DMA remapping on and off: the slot-array device's work on
//! one virtqueue (take the available items, return them on the used ring, raise the
//! queue's slot) with its ring at IOVAs the VT-d unit translates through a 4-level table,
//! beside the same device with translation off and beside a device on plain guest memory
//! (no vIOMMU at all). Each completion's interrupt goes through the remapping core to a
//! real KVM irqfd. The same again with the slot masked: the device's ring DMA alone, the
//! part translation changes, undiluted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::ims::slots::ImsSlots;
use devices::memory::AddressSpace;
use devices::pci::PciFunction;
use devices::viommu::{regs, Vtd, VtdDevice};
use hypercall::ims::slots::reg;
use irq::backing::{Backing, Limits};
use irq::routes::RouteTable;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::host::{irqchip_vm, new_rig};
use super::Figure;
use crate::vm::VmError;
use irq::kvm::KvmRouting;

/// The device's requester ID.
const RID: u16 = 0x0018;
/// Queue size and items per sample (one notification's worth).
const QSIZE: u16 = 256;
pub(super) const ITEMS: u16 = 64;
/// Guest-physical pages: each device's rings (descriptor table, available ring, used
/// ring in three pages from here, one device every 64 KiB), the tables.
const RINGS: u64 = 0x10_0000;
const ROOT: u64 = 0x1000;
const CONTEXT: u64 = 0x2000;
const SL: u64 = 0x3000;
/// Where the translated device sees its rings.
const IOVA: u64 = 0x8000_0000;

/// What one run measured: time per work item, with its interrupt and without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFigures {
    /// Each item completed with its interrupt.
    pub delivered: DevicePaths,
    /// The ring work alone (the slot masked).
    pub ring_only: DevicePaths,
}

/// One figure per memory path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePaths {
    /// Translation on: the ring at IOVAs through the unit's tables (cached).
    pub translated: Figure,
    /// The same device with translation off.
    pub untranslated: Figure,
    /// A device on plain guest memory, no vIOMMU in its path.
    pub plain: Figure,
}

fn os(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> VmError {
    move |e| VmError::Os(what, std::io::Error::other(e))
}

/// The tables: requester RID in domain 1, 4-level, IOVA.. -> the three ring pages.
fn tables(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let put = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).map_err(os("DMA tables"));
    put(ROOT, CONTEXT | 1)?;
    put(CONTEXT + 16 * u64::from(RID & 0xff), SL | 1)?;
    put(CONTEXT + 16 * u64::from(RID & 0xff) + 8, 2 | (1 << 8))?;
    put(SL, (SL + 0x1000) | 3)?;
    put(SL + 0x1000 + 8 * (IOVA >> 30), (SL + 0x2000) | 3)?;
    put(SL + 0x2000, (SL + 0x3000) | 3)?;
    for k in 0..3 {
        put(SL + 0x3000 + 8 * k, (RINGS + 0x1000 * k) | 3)?;
    }
    Ok(())
}

/// A slot-array device over `space` with queue 0 at `base` (its three pages in a row),
/// its slot holding `message` and unmasked (`None`: masked).
fn device<M: AddressSpace>(
    space: M,
    path: Arc<irq::backing::InterruptPath>,
    base: u64,
    message: Option<irq::MsiMessage>,
) -> Result<ImsSlots<M>, VmError> {
    let mut dev = ImsSlots::new(1, 1, RID, path, space)
        .map_err(|e| VmError::Os("benchmark device", std::io::Error::other(e)))?;
    let mut w = |off: u64, v: u32| dev.bar_write(0, off, &v.to_le_bytes());
    if let Some(m) = message {
        w(reg::SLOT_BASE, m.address_lo());
        w(reg::SLOT_BASE + 4, m.address_hi());
        w(reg::SLOT_BASE + 8, m.data);
        w(reg::SLOT_BASE + 12, 0);
    }
    w(reg::QUEUE_SELECT, 0);
    w(reg::QUEUE_SIZE, u32::from(QSIZE));
    for (r, at) in [
        (reg::QUEUE_DESC, base),
        (reg::QUEUE_AVAIL, base + 0x1000),
        (reg::QUEUE_USED, base + 0x2000),
    ] {
        w(r, u32::try_from(at & 0xffff_ffff).unwrap_or(0));
        w(r + 4, u32::try_from(at >> 32).unwrap_or(0));
    }
    w(reg::QUEUE_READY, 1);
    Ok(dev)
}

/// One device's rings in guest-physical memory, as its driver keeps them.
struct Rings {
    base: u64,
    posted: u16,
}

impl Rings {
    fn new(mem: &GuestMemoryMmap, k: u64) -> Result<Self, VmError> {
        let base = RINGS + 0x1_0000 * k;
        mem.write_obj(0u32, GuestAddress(base + 0x1000))
            .map_err(os("rings"))?;
        mem.write_obj(0u32, GuestAddress(base + 0x2000))
            .map_err(os("rings"))?;
        Ok(Self { base, posted: 0 })
    }

    /// Makes `ITEMS` more items available.
    fn post(&mut self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        let avail = self.base + 0x1000;
        for _ in 0..ITEMS {
            let slot = u64::from(self.posted % QSIZE);
            mem.write_obj([0x20_0000u64, 64], GuestAddress(self.base + 16 * slot))
                .map_err(os("post"))?;
            let entry = u16::try_from(slot).unwrap_or(0);
            mem.write_obj(entry, GuestAddress(avail + 4 + 2 * slot))
                .map_err(os("post"))?;
            self.posted = self.posted.wrapping_add(1);
        }
        mem.write_obj(self.posted, GuestAddress(avail + 2))
            .map_err(os("post"))
    }
}

/// One sample: `ITEMS` items posted, notified, processed; the processing timed, per item.
fn sample<M: AddressSpace>(
    dev: &mut ImsSlots<M>,
    rings: &mut Rings,
    mem: &GuestMemoryMmap,
) -> Result<Duration, VmError> {
    rings.post(mem)?;
    dev.bar_write(0, reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
    let begin = Instant::now();
    let done = dev.process(begin);
    let took = begin.elapsed();
    if done != u64::from(ITEMS) {
        return Err(VmError::Os(
            "benchmark device",
            std::io::Error::other(format!("{done} of {ITEMS} items completed")),
        ));
    }
    Ok(took / u32::from(ITEMS))
}

/// Measures both ways: with interrupts, then the ring alone.
///
/// # Errors
/// KVM, memory or a device could not be set up, or a device did not complete its work.
pub(super) fn dma_figures(kvm: &Kvm, samples: usize) -> Result<DmaFigures, VmError> {
    Ok(DmaFigures {
        delivered: measure(kvm, samples, true)?,
        ring_only: measure(kvm, samples, false)?,
    })
}

/// Measures the three devices, `samples` rounds of `ITEMS` items each, interleaved
/// (each device on its own rings), with their slots' interrupts live or masked.
fn measure(kvm: &Kvm, samples: usize, interrupts: bool) -> Result<DevicePaths, VmError> {
    let vm = irqchip_vm(kvm)?;
    let routing = KvmRouting::new(vm.clone());
    let limit = routing.route_limit();
    let backing = Backing::new(RouteTable::new(routing, limit)?, Limits::default())?;
    let core = irq::InterruptCore::new(backing);
    // The devices' interrupts: one live entry each, through a real KVM irqfd.
    let rig = new_rig(kvm)?;
    let path = rig.path();
    let first = rig.populate(3)?;
    let message = |k: u64| {
        interrupts.then(|| {
            irq::MsiMessage::remappable(u16::try_from(first + k).unwrap_or(u16::MAX), None)
        })
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)])
        .map_err(|e| VmError::Os("allocate benchmark memory", std::io::Error::other(e)))?;
    let space = GuestMemoryAtomic::new(mem.clone());
    tables(&mem)?;
    // Two units: one the guest turned translation on in, one it did not.
    let unit = |te: bool| {
        let vtd = Arc::new(std::sync::Mutex::new(Vtd::new(
            core.handle(),
            Arc::new(space.clone()),
            Arc::new(KvmRouting::new(vm.clone())),
        )));
        let mut regs_page = VtdDevice(vtd.clone());
        regs_page.write(regs::RTADDR, &ROOT.to_le_bytes());
        regs_page.write(regs::GCMD, &regs::global::SRTP.to_le_bytes());
        if te {
            regs_page.write(regs::GCMD, &regs::global::TE.to_le_bytes());
        }
        let dma = vtd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dma();
        dma
    };
    let (on, off) = (unit(true), unit(false));
    let mut rings = [
        Rings::new(&mem, 0)?,
        Rings::new(&mem, 1)?,
        Rings::new(&mem, 2)?,
    ];
    let mut translated = device(on.memory(RID, mem.clone()), path.clone(), IOVA, message(0))?;
    let mut untranslated = device(
        off.memory(RID, mem.clone()),
        path.clone(),
        rings[1].base,
        message(1),
    )?;
    let mut plain = device(space.clone(), path, rings[2].base, message(2))?;
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let [ra, rb, rc] = &mut rings;
    for _ in 0..samples.max(1) {
        a.push(sample(&mut translated, ra, &mem)?);
        b.push(sample(&mut untranslated, rb, &mem)?);
        c.push(sample(&mut plain, rc, &mem)?);
    }
    Ok(DevicePaths {
        translated: Figure::of(a),
        untranslated: Figure::of(b),
        plain: Figure::of(c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every device completes every item (the figures themselves are `vmm bench`'s).
    #[test]
    fn the_three_devices_complete_their_work() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let f = dma_figures(&kvm, 200).unwrap();
        assert_eq!(f.delivered.translated.samples, 200);
        println!("{f:?}");
    }
}
