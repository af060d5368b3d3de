//! The `dma` scenario: DMA remapping as a guest kernel drives it (VT-d legacy mode,
//! written from docs/viommu.md): a root table, a context entry for the slot-array IMS
//! device, a 4-level second-level table mapping the device's virtqueue at I/O virtual
//! addresses that are not RAM, translation turned on the way Linux does (root pointer,
//! global context and IOTLB invalidations, then TE). Then:
//!
//! - work completes and the used ring lands where the IOVA is mapped;
//! - a remap of the used ring's page takes effect only after its page-selective IOTLB
//!   invalidation;
//! - a write to a read-only page and a read of an unmapped IOVA each fault, recorded in a
//!   fault recording register with reason, requester, address and kind, each with a fault
//!   event; the device goes on working;
//! - a pass-through context entry lets the device use guest-physical addresses;
//! - translation off again.
//!
//! With `dma_snapshot=1` it asks for a snapshot (harness `SNAPSHOT`) while translation is
//! on with the used ring remapped, so a restored VM must carry the unit's DMA-remapping
//! state for the rest to pass.
//!
//! The entry encoders here are this guest's own (from the spec), not the VMM's.

use core::ptr::{addr_of, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use hypercall::abi::{call, status, target};
use hypercall::ims::slots as sd;

use crate::pci::{self, mmio_read, mmio_write};
use crate::scenario::expect;
use crate::vtd::{
    r32, r64, w32, w64, CFI, ECAP, FEADDR, FECTL, FEDATA, FEUADDR, FSTS, GCMD, GSTS, IRE, QIE, TE,
};
use crate::{count, println};

/// Vector of the device's completions (through an IRTE from the hypercall); the `ims`
/// scenario's vectors end at 0xe7.
const DMA_VECTOR: u8 = 0xe8;
/// Vector of the unit's fault event.
const DMA_FAULT_VECTOR: u8 = 0xe9;
/// The domain the device is put in.
const DOMAIN: u64 = 1;
/// Where the device's rings are mapped: 2 GiB, far above this guest's RAM.
const IOVA_BASE: u64 = 0x8000_0000;
const IOVA_DESC: u64 = IOVA_BASE;
const IOVA_AVAIL: u64 = IOVA_BASE + 0x1000;
const IOVA_USED: u64 = IOVA_BASE + 0x2000;
/// An IOVA nothing maps.
const IOVA_UNMAPPED: u64 = IOVA_BASE + 0x10_000;
const QSIZE: usize = 8;

// The registers `vtd` does not use; the rest are its.
const RTADDR: u64 = 0x20;
const CCMD: u64 = 0x28;
const CAP: u64 = 0x08;
const RTPS: u32 = 1 << 30;
/// GCMD bits a command restates (as `vtd`'s driver does).
const PERSISTENT: u32 = TE | QIE | IRE | CFI;
const R: u64 = 1;
const W: u64 = 2;

/// The pages the scenario uses, from the start of free RAM (boot information): the
/// tables, then the rings. Indices into them:
const ROOT: u64 = 0;
const CONTEXT: u64 = 1;
const PML4: u64 = 2;
const PDPT: u64 = 3;
const PD: u64 = 4;
const PT: u64 = 5;
const DESC: u64 = 6;
const AVAIL: u64 = 7;
const USED_A: u64 = 8;
const USED_B: u64 = 9;
const PAGES: u64 = 10;
/// Where they start (set once by `run`).
static BASE: AtomicU64 = AtomicU64::new(0);
static WORK: [u8; 64] = [0; 64];

/// Guest-physical (identity-mapped) address of page `k`.
fn page(k: u64) -> u64 {
    BASE.load(Ordering::Relaxed) + 4096 * k
}

/// Writes quadword `i` (< 512) of page `k`.
fn set(k: u64, i: usize, v: u64) {
    // SAFETY: one of the scenario's pages in free RAM, identity-mapped; `i % 512` keeps
    // the write inside it.
    unsafe { write_volatile((page(k) as *mut u64).add(i % 512), v) };
    compiler_fence(Ordering::SeqCst);
}

/// Polls `done` (a device completes on another thread: up to a few seconds).
fn spin_until(done: impl FnMut() -> bool) -> bool {
    crate::vtd::spin_at_most(3_000_000, done)
}

/// The used index the device wrote in used-ring page `k`.
fn used_idx(k: u64) -> u16 {
    // SAFETY: one of our pages; the device writes the index (bytes 2-3) by DMA.
    unsafe { read_volatile((page(k) as *const u16).add(1)) }
}

fn set_used_idx(k: u64, v: u16) {
    // SAFETY: as in `used_idx`.
    unsafe { write_volatile((page(k) as *mut u16).add(1), v) };
}

/// Makes one work item available (descriptor `idx % QSIZE`, pointing at `WORK`).
fn post() {
    // SAFETY: our descriptor table and available ring; the device reads them after the
    // new available index, written last.
    unsafe {
        let avail = page(AVAIL) as *mut u16;
        let idx = read_volatile(avail.add(1));
        let slot = usize::from(idx) % QSIZE;
        let desc = (page(DESC) as *mut u64).add(2 * slot);
        write_volatile(desc, addr_of!(WORK) as u64);
        write_volatile(desc.add(1), 64);
        write_volatile(avail.add(2 + slot), slot as u16);
        compiler_fence(Ordering::SeqCst);
        write_volatile(avail.add(1), idx.wrapping_add(1));
    }
}

fn avail_idx() -> u16 {
    // SAFETY: our available ring.
    unsafe { read_volatile((page(AVAIL) as *const u16).add(1)) }
}

struct Dma {
    bar: u64,
    rid: u16,
    ok: bool,
    completions: u32,
    faults: u32,
}

impl Dma {
    fn fail(&mut self, what: &str) {
        println!("dma: FAIL: {}", what);
        self.ok = false;
    }

    fn check(&mut self, what: &str, got: u64, want: u64) {
        if got != want {
            println!("dma: FAIL: {}: {:#x} (expected {:#x})", what, got, want);
            self.ok = false;
        }
    }

    fn dev(&self, off: u64) -> u32 {
        mmio_read(self.bar + off)
    }

    fn set_dev(&self, off: u64, v: u32) {
        mmio_write(self.bar + off, v)
    }

    fn command(&mut self, set: u32, clear: u32) {
        let now = r32(GSTS) & PERSISTENT;
        w32(GCMD, (now | set) & !clear);
    }

    /// CCMD with ICC: `cirg` 1 global, 3 device-selective (this requester).
    fn invalidate_context(&mut self, cirg: u64) {
        let sid = u64::from(self.rid) << 16;
        w64(CCMD, (1 << 63) | (cirg << 61) | sid | DOMAIN);
        if !spin_until(|| r64(CCMD) >> 63 == 0) {
            self.fail("context invalidation never completed");
        }
        self.check("CCMD.CAIG", (r64(CCMD) >> 59) & 3, cirg);
    }

    /// The IOTLB registers: `iirg` 1 global, 3 the page at `iova`.
    fn invalidate_iotlb(&mut self, iirg: u64, iova: u64) {
        let iro = ((r64(ECAP) >> 8) & 0x3ff) * 16;
        w64(iro, iova);
        w64(iro + 8, (1 << 63) | (iirg << 60) | (DOMAIN << 32));
        if !spin_until(|| r64(iro + 8) >> 63 == 0) {
            self.fail("IOTLB invalidation never completed");
        }
        self.check("IOTLB.IAIG", (r64(iro + 8) >> 57) & 3, iirg);
    }

    /// Posts one item and waits for its completion interrupt; true if it came.
    fn work(&mut self) -> bool {
        let before = count(0, DMA_VECTOR);
        post();
        self.set_dev(sd::reg::QUEUE_NOTIFY, 0);
        let came = spin_until(|| count(0, DMA_VECTOR) != before);
        if came {
            self.completions += 1;
            expect(0, DMA_VECTOR, 1);
        }
        came
    }

    /// Waits for a fault event and checks the pending record: reason, requester, page
    /// address, read (T = 1) or write; then clears it.
    fn fault(&mut self, events: u32, reason: u64, address: u64, read: bool, what: &str) {
        if !spin_until(|| count(0, DMA_FAULT_VECTOR) > events) {
            self.fail(what);
            return;
        }
        self.faults += 1;
        expect(0, DMA_FAULT_VECTOR, 1);
        let fro = ((r64(CAP) >> 24) & 0x3ff) * 16;
        let index = u64::from((r32(FSTS) >> 8) & 0xff);
        let low = r64(fro + 16 * index);
        let high = r64(fro + 16 * index + 8);
        self.check("fault: F", high >> 63, 1);
        self.check("fault: reason", (high >> 32) & 0xff, reason);
        self.check("fault: requester", high & 0xffff, u64::from(self.rid));
        self.check("fault: address", low, address);
        self.check("fault: T (1 read)", (high >> 62) & 1, u64::from(read));
        w64(fro + 16 * index + 8, 1 << 63);
        self.check("FSTS after clearing", u64::from(r32(FSTS) & 3), 0);
    }
}

/// Builds the tables: context entry for `rid` (domain 1, 4-level) and the rings' pages at
/// IOVA_DESC, IOVA_AVAIL, IOVA_USED (-> USED_A), all read-write.
fn build_tables(rid: u16) {
    let devfn = usize::from(rid & 0xff);
    set(ROOT, 2 * usize::from(rid >> 8), page(CONTEXT) | 1);
    set(CONTEXT, 2 * devfn, page(PML4) | 1);
    set(CONTEXT, 2 * devfn + 1, 2 | (DOMAIN << 8));
    set(PML4, 0, page(PDPT) | R | W);
    set(PDPT, 2, page(PD) | R | W);
    set(PD, 0, page(PT) | R | W);
    set(PT, 0, page(DESC) | R | W);
    set(PT, 1, page(AVAIL) | R | W);
    set(PT, 2, page(USED_A) | R | W);
}

fn program_queue(d: &Dma, q: u32, desc: u64, avail: u64, used: u64) {
    d.set_dev(sd::reg::QUEUE_SELECT, q);
    d.set_dev(sd::reg::QUEUE_SIZE, QSIZE as u32);
    d.set_dev(sd::reg::QUEUE_SLOT, 0);
    for (reg, at) in [
        (sd::reg::QUEUE_DESC, desc),
        (sd::reg::QUEUE_AVAIL, avail),
        (sd::reg::QUEUE_USED, used),
    ] {
        d.set_dev(reg, at as u32);
        d.set_dev(reg + 4, (at >> 32) as u32);
    }
    d.set_dev(sd::reg::QUEUE_READY, 1);
}

/// Runs the scenario with its pages at `free` (4-KiB aligned free RAM); an absent slot
/// device fails it only if `required`.
pub fn run(apic0: u32, free: u64, required: bool, snapshot: bool) -> bool {
    let Some(dev) = pci::find(sd::VENDOR_ID, sd::DEVICE_ID) else {
        println!("dma: no slot-array IMS device; skipped");
        return !required;
    };
    let Some(iface) = crate::hc::discover() else {
        println!("dma: FAIL: no hypercall interface");
        return false;
    };
    let mut hc = crate::hc::Guest::new(iface.port);
    let mut d = Dma {
        bar: pci::bar0(dev),
        rid: pci::requester_id(dev),
        ok: true,
        completions: 0,
        faults: 0,
    };
    BASE.store(free, Ordering::Relaxed);
    for k in 0..PAGES {
        for i in 0..512 {
            set(k, i, 0);
        }
    }
    let cap = r64(CAP);
    if (cap >> 8) & 0b100 == 0 || r64(ECAP) & (1 << 6) == 0 {
        println!(
            "dma: FAIL: CAP {:#x} lacks 4-level tables or ECAP lacks pass-through",
            cap
        );
        return false;
    }
    d.set_dev(sd::reg::RESET, 1);
    // One interrupt for the device's slot 0, to this CPU.
    let rid = u64::from(d.rid);
    let alloc = hc.call(call::ALLOCATE, rid, 1, 0);
    let first = alloc.rsi;
    let active = hc.call(call::UPDATE, rid, first, target::fixed(apic0, DMA_VECTOR));
    if alloc.rax != status::OK || active.rax != status::OK {
        println!(
            "dma: FAIL: interrupt entry: status {} {}",
            alloc.rax, active.rax
        );
        return false;
    }
    d.set_dev(sd::reg::SLOT_BASE, crate::ims::compose(first));
    d.set_dev(sd::reg::SLOT_BASE + 4, 0);
    d.set_dev(sd::reg::SLOT_BASE + 8, 0);
    d.set_dev(sd::reg::SLOT_BASE + 12, 0);
    w32(FEDATA, u32::from(DMA_FAULT_VECTOR));
    w32(FEADDR, 0xfee0_0000 | ((apic0 & 0xff) << 12));
    w32(FEUADDR, 0);
    w32(FECTL, 0);

    // Linux's order: root pointer, global context and IOTLB invalidations, TE.
    build_tables(d.rid);
    w64(RTADDR, page(ROOT));
    d.command(RTPS, 0);
    if !spin_until(|| r32(GSTS) & RTPS != 0) {
        d.fail("root table pointer status");
    }
    d.invalidate_context(1);
    d.invalidate_iotlb(1, 0);
    d.command(TE, 0);
    if !spin_until(|| r32(GSTS) & TE != 0) {
        d.fail("translation enable status");
        return false;
    }
    println!(
        "dma: translation on: device {:#06x} in domain 1, 4-level table",
        d.rid
    );

    // The rings at IOVAs: completions land in the page the used ring's IOVA maps.
    program_queue(&d, 0, IOVA_DESC, IOVA_AVAIL, IOVA_USED);
    d.check(
        "status after queue ready",
        u64::from(d.dev(sd::reg::STATUS)),
        0,
    );
    for _ in 0..2 {
        if !d.work() {
            d.fail("a completion at mapped IOVAs");
        }
    }
    d.check(
        "used index at the mapped page",
        u64::from(used_idx(USED_A)),
        2,
    );

    // Remap the used ring to USED_B: seen only after the page's invalidation.
    set(PT, 2, page(USED_B) | R | W);
    if !d.work() {
        d.fail("a completion before the invalidation");
    }
    d.check(
        "before invalidation: old page",
        u64::from(used_idx(USED_A)),
        3,
    );
    d.check(
        "before invalidation: new page",
        u64::from(used_idx(USED_B)),
        0,
    );
    d.invalidate_iotlb(3, IOVA_USED);
    if !d.work() {
        d.fail("a completion after the invalidation");
    }
    d.check(
        "after invalidation: old page",
        u64::from(used_idx(USED_A)),
        3,
    );
    d.check(
        "after invalidation: new page",
        u64::from(used_idx(USED_B)),
        4,
    );
    println!("dma: a remap of the used ring took effect at its IOTLB invalidation, not before");
    if snapshot {
        let (host, _) =
            crate::scenario::harness_request(hypercall::harness::request::SNAPSHOT, 0, 0, 0);
        d.check("SNAPSHOT request status", u64::from(host), 0);
        // The host pauses the VM just after completing the request: idle on register
        // reads (an exit each, a few hundred milliseconds) so that the snapshot finds
        // the scenario here, not further on.
        for _ in 0..50_000 {
            let _ = r32(GSTS);
        }
        println!("dma: snapshot taken with translation on");
    }

    // The used ring read-only: the device's write faults (0x5) and does not happen.
    set(PT, 2, page(USED_B) | R);
    d.invalidate_iotlb(3, IOVA_USED);
    let events = count(0, DMA_FAULT_VECTOR);
    let slot_before = count(0, DMA_VECTOR);
    post();
    d.set_dev(sd::reg::QUEUE_NOTIFY, 0);
    d.fault(
        events,
        0x5,
        IOVA_USED,
        false,
        "no fault event for a write to a read-only page",
    );
    d.check(
        "used index after the faulting write",
        u64::from(used_idx(USED_B)),
        4,
    );
    d.check(
        "completion interrupts for the faulting write",
        u64::from(count(0, DMA_VECTOR) - slot_before),
        0,
    );
    let st = d.dev(sd::reg::STATUS);
    d.check(
        "device status after the fault",
        u64::from(st & sd::STATUS_QUEUE_ERROR),
        u64::from(sd::STATUS_QUEUE_ERROR),
    );
    d.set_dev(sd::reg::STATUS, st);
    // The device goes on once the page is writable again.
    set(PT, 2, page(USED_B) | R | W);
    d.invalidate_iotlb(3, IOVA_USED);
    if !d.work() {
        d.fail("the device after a fault");
    }
    d.check("used index after recovery", u64::from(used_idx(USED_B)), 5);

    // An unmapped IOVA: queue 1's descriptor table; the read faults (0x6), the queue is
    // refused.
    let events = count(0, DMA_FAULT_VECTOR);
    program_queue(&d, 1, IOVA_UNMAPPED, IOVA_AVAIL, IOVA_USED);
    d.fault(
        events,
        0x6,
        IOVA_UNMAPPED,
        true,
        "no fault event for an unmapped IOVA",
    );
    d.check("queue 1 ready", u64::from(d.dev(sd::reg::QUEUE_READY)), 0);
    let st = d.dev(sd::reg::STATUS);
    d.check(
        "status after the refused queue",
        u64::from(st & sd::STATUS_QUEUE_ERROR),
        u64::from(sd::STATUS_QUEUE_ERROR),
    );
    d.set_dev(sd::reg::STATUS, st);
    println!(
        "dma: faults 0x5 (write to a read-only page) and 0x6 (unmapped IOVA) recorded, each with a fault event; the device went on"
    );

    // Pass-through: guest-physical addresses after a device-selective context
    // invalidation (and the IOTLB's, as the spec asks).
    let devfn = usize::from(d.rid & 0xff);
    set(CONTEXT, 2 * devfn, 1 | (2 << 2));
    d.invalidate_context(3);
    d.invalidate_iotlb(1, 0);
    d.set_dev(sd::reg::QUEUE_SELECT, 0);
    d.set_dev(sd::reg::QUEUE_READY, 0);
    set_used_idx(USED_A, avail_idx());
    program_queue(&d, 0, page(DESC), page(AVAIL), page(USED_A));
    let want = avail_idx().wrapping_add(1);
    if !d.work() {
        d.fail("a completion through a pass-through context");
    }
    d.check(
        "used index through pass-through",
        u64::from(used_idx(USED_A)),
        u64::from(want),
    );
    println!("dma: pass-through context: the device used guest-physical addresses");

    d.command(0, TE);
    if !spin_until(|| r32(GSTS) & TE == 0) {
        d.fail("translation disable status");
    }
    d.set_dev(sd::reg::RESET, 1);
    let freed = hc.call(call::FREE, rid, first, 1);
    d.check("free", freed.rax, status::OK);
    println!(
        "dma: {} completions, {} DMA faults, translation off; {}",
        d.completions,
        d.faults,
        if d.ok { "PASS" } else { "FAIL" }
    );
    d.ok
}
