//! DMA remapping through the unit's registers: a device's memory (a `DmaMemory`) as the
//! guest's tables and invalidations say.

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::descriptor::{ContextScope, Descriptor, IotlbScope};
use super::regs::{self, global};
use super::Rig;
use crate::viommu::dma::DmaMemory;

const SID: u16 = 0x0018;
const ROOT: u64 = 0x10_0000;
const CTX: u64 = 0x10_1000;
const SL: u64 = 0x11_0000;
/// Data pages the tables map.
const PAGE_A: u64 = 0x20_0000;
const PAGE_B: u64 = 0x20_1000;
const IOVA: u64 = 0x8000_0000;

struct Dma {
    rig: Rig,
    dev: DmaMemory,
}

fn put(mem: &GuestMemoryMmap, at: u64, v: u64) {
    mem.write_obj(v, GuestAddress(at)).unwrap();
}

impl Dma {
    /// Root, context (domain 3, 4-level) and a table mapping IOVA -> PAGE_A read-write and
    /// IOVA + 4K -> PAGE_B read-only; translation on the way Linux turns it on.
    fn new() -> Self {
        let mut rig = Rig::enabled(true);
        let mem = rig.driver.mem.clone();
        put(&mem, ROOT, CTX | 1);
        put(&mem, CTX + 16 * u64::from(SID & 0xff), SL | 1);
        put(&mem, CTX + 16 * u64::from(SID & 0xff) + 8, 2 | (3 << 8));
        put(&mem, SL, (SL + 0x1000) | 3);
        put(&mem, SL + 0x1000 + 8 * 2, (SL + 0x2000) | 3);
        put(&mem, SL + 0x2000, (SL + 0x3000) | 3);
        put(&mem, SL + 0x3000, PAGE_A | 3);
        put(&mem, SL + 0x3000 + 8, PAGE_B | 1);
        let dev = rig.unit.lock().unwrap().dma().memory(SID, mem);
        let d = &mut rig.driver;
        d.write64(regs::RTADDR, ROOT);
        d.command(global::SRTP, 0);
        d.submit(Descriptor::ContextCache(ContextScope::Global).encode());
        d.submit(Descriptor::Iotlb(IotlbScope::Global).encode());
        assert!(d.wait());
        d.command(global::TE, 0);
        assert_ne!(d.read32(regs::GSTS) & global::TE, 0, "TES");
        Self { rig, dev }
    }

    fn read(&self, iova: u64) -> Option<u32> {
        self.dev.memory().read_obj(GuestAddress(iova)).ok()
    }

    fn write(&self, iova: u64, v: u32) -> bool {
        self.dev.memory().write_obj(v, GuestAddress(iova)).is_ok()
    }

    fn phys(&self, at: u64) -> u32 {
        self.rig.driver.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Fault record `i`: (page address, requester, reason, read, F).
    fn record(&mut self, i: usize) -> (u64, u16, u8, bool, bool) {
        let base = regs::FRCD + 16 * i as u64;
        let low = self.rig.driver.read64(base);
        let high = self.rig.driver.read64(base + 8);
        (
            low,
            (high & 0xffff) as u16,
            ((high >> 32) & 0xff) as u8,
            high & (1 << 62) != 0,
            high >> 63 != 0,
        )
    }

    fn dma_faults(&self) -> u64 {
        self.rig.unit.lock().unwrap().counters().dma_faults_recorded
    }
}

#[test]
fn translated_dma_lands_where_the_tables_map_it() {
    let dma = Dma::new();
    assert!(dma.write(IOVA + 0x10, 0xabcd));
    assert_eq!(dma.phys(PAGE_A + 0x10), 0xabcd);
    dma.rig
        .driver
        .mem
        .write_obj(0x1234u32, GuestAddress(PAGE_B + 8))
        .unwrap();
    assert_eq!(dma.read(IOVA + 0x1008), Some(0x1234));
    // An access across the two pages.
    dma.dev
        .memory()
        .read_obj::<u64>(GuestAddress(IOVA + 0xffc))
        .unwrap();
    assert_eq!(dma.dma_faults(), 0);
    // Translation off: the same address is guest-physical again.
    let mut dma = dma;
    dma.rig.driver.command(0, global::TE);
    assert_eq!(dma.rig.driver.read32(regs::GSTS) & global::TE, 0);
    assert!(dma.write(PAGE_A + 0x20, 7));
    assert_eq!(dma.phys(PAGE_A + 0x20), 7);
}

#[test]
fn unmapped_and_read_only_accesses_fault_with_their_reasons() {
    let mut dma = Dma::new();
    let events = dma.rig.events().len();
    assert_eq!(dma.read(IOVA + 0x5000), None);
    assert_eq!(
        dma.record(0),
        (IOVA + 0x5000, SID, 0x6, true, true),
        "a read of a page not present"
    );
    assert_eq!(dma.rig.events().len(), events + 1, "the fault event");
    assert!(!dma.write(IOVA + 0x1000, 1));
    assert_eq!(dma.record(1), (IOVA + 0x1000, SID, 0x5, false, true));
    assert_eq!(dma.phys(PAGE_B), 0, "the faulting write did not happen");
    assert!(!dma.write(1 << 48, 1));
    assert_eq!(dma.record(2).2, 0x4, "beyond the address width");
    assert_eq!(dma.dma_faults(), 3);
    // The device goes on: mapped accesses still work.
    assert!(dma.write(IOVA, 5));
    // FPD: faults of the context are not recorded.
    let mem = dma.rig.driver.mem.clone();
    put(&mem, CTX + 16 * u64::from(SID & 0xff), SL | 1 | 2);
    dma.rig
        .driver
        .submit(Descriptor::ContextCache(ContextScope::Global).encode());
    assert!(dma.rig.driver.wait());
    assert_eq!(dma.read(IOVA + 0x5000), None);
    assert_eq!(dma.dma_faults(), 3);
    // Another requester with no context entry: 0x2.
    let other = dma.rig.unit.lock().unwrap().dma().memory(0x0020, mem);
    other.memory().read_obj::<u32>(GuestAddress(0)).unwrap_err();
    assert_eq!(dma.record(3), (0, 0x20, 0x2, true, true));
}

#[test]
fn a_remap_is_seen_only_after_its_invalidation() {
    let mut dma = Dma::new();
    dma.rig
        .driver
        .mem
        .write_obj(1u32, GuestAddress(PAGE_A))
        .unwrap();
    dma.rig
        .driver
        .mem
        .write_obj(2u32, GuestAddress(PAGE_B))
        .unwrap();
    assert_eq!(dma.read(IOVA), Some(1));
    // Point IOVA at PAGE_B: the cached translation stays until invalidated.
    put(&dma.rig.driver.mem, SL + 0x3000, PAGE_B | 3);
    assert_eq!(dma.read(IOVA), Some(1), "not invalidated yet");
    // A page-selective invalidation of another domain does nothing.
    let page = |did| IotlbScope::Page {
        did,
        address: IOVA,
        am: 0,
        hint: false,
    };
    dma.rig.driver.submit(Descriptor::Iotlb(page(4)).encode());
    assert!(dma.rig.driver.wait());
    assert_eq!(dma.read(IOVA), Some(1));
    dma.rig.driver.submit(Descriptor::Iotlb(page(3)).encode());
    assert!(dma.rig.driver.wait());
    assert_eq!(dma.read(IOVA), Some(2));
    // The register-based invalidation: back to PAGE_A, domain-selective.
    put(&dma.rig.driver.mem, SL + 0x3000, PAGE_A | 3);
    assert_eq!(dma.read(IOVA), Some(2));
    let d = &mut dma.rig.driver;
    d.write64(regs::IOTLB_REG, regs::iotlb::IVT | (2 << 60) | (3 << 32));
    let reg = d.read64(regs::IOTLB_REG);
    assert_eq!(reg & regs::iotlb::IVT, 0, "done");
    assert_eq!((reg >> 57) & 3, 2, "IAIG: domain");
    assert_eq!(dma.read(IOVA), Some(1));
    // A page the guest adds is seen at once (nothing not present is cached).
    put(&dma.rig.driver.mem, SL + 0x3000 + 16, PAGE_A | 3);
    assert_eq!(dma.read(IOVA + 0x2000), Some(1));
}

#[test]
fn pass_through_and_context_invalidation() {
    let mut dma = Dma::new();
    dma.rig
        .driver
        .mem
        .write_obj(9u32, GuestAddress(PAGE_B))
        .unwrap();
    assert_eq!(dma.read(PAGE_B), None, "not mapped at its own address");
    // Pass-through (TT 2), visible after a device-selective context invalidation.
    put(
        &dma.rig.driver.mem,
        CTX + 16 * u64::from(SID & 0xff),
        1 | (2 << 2),
    );
    let d = &mut dma.rig.driver;
    let ccmd = regs::ccmd::ICC | (3 << 61) | (u64::from(SID) << 16) | 3;
    d.write64(regs::CCMD, ccmd);
    let reg = d.read64(regs::CCMD);
    assert_eq!(
        (reg >> 63, (reg >> 59) & 3),
        (0, 3),
        "done, device-selective"
    );
    assert_eq!(dma.read(PAGE_B), Some(9));
    // IOVA is now a guest-physical address beyond RAM: an error, not a DMA fault.
    assert_eq!(dma.read(IOVA), None);
    assert_eq!(dma.dma_faults(), 1, "only the read before pass-through");
    // Addresses far beyond RAM, up to the top: errors, never a wrap or a panic.
    for at in [1 << 48, (1 << 63) - 8, 1 << 63, u64::MAX - 3] {
        assert_eq!(dma.read(at), None, "{at:#x}");
        assert!(!dma.write(at, 1), "{at:#x}");
    }
}

#[test]
fn translation_state_survives_a_snapshot() {
    let dma = Dma::new();
    let state = dma.rig.unit.lock().unwrap().snapshot();
    assert_eq!(state.root, ROOT);
    assert_ne!(state.gsts & global::TE, 0);
    let restored = super::Vtd::restore(
        dma.rig.core.handle(),
        std::sync::Arc::new(vm_memory::GuestMemoryAtomic::new(
            dma.rig.driver.mem.clone(),
        )),
        dma.rig.injected.clone(),
        state,
    )
    .unwrap();
    let dev = restored.dma().memory(SID, dma.rig.driver.mem.clone());
    dma.rig
        .driver
        .mem
        .write_obj(4u32, GuestAddress(PAGE_A))
        .unwrap();
    assert_eq!(
        dev.memory().read_obj::<u32>(GuestAddress(IOVA)).ok(),
        Some(4)
    );
}
