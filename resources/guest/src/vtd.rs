//! The `vtd` scenario: the guest drives the VT-d unit through its registers, as Linux's
//! interrupt-remapping code does, with its remapping table and invalidation queue in its
//! own memory; a device (the host harness) raises messages through it.

use core::sync::atomic::{AtomicU32, Ordering};

use hypercall::abi::status;
use hypercall::harness::status as harness_status;
use hypercall::harness::{offset, request, FOREIGN_SOURCE_ID, HARNESS_SOURCE_ID};
use hypercall::platform::VTD_BASE;

use hypercall::abi::{call, invoke, target, Registers};
use hypercall::platform::HYPERCALL_PORT;

use crate::scenario::{expect, harness_finish, harness_request, harness_start};
use crate::{count, mailbox_cell, println};

const GCMD: u64 = 0x18;
const GSTS: u64 = 0x1c;
const ECAP: u64 = 0x10;
const FSTS: u64 = 0x34;
const FECTL: u64 = 0x38;
const FEDATA: u64 = 0x3c;
const FEADDR: u64 = 0x40;
const FEUADDR: u64 = 0x44;
const IQH: u64 = 0x80;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;
const IRTA: u64 = 0xb8;
const FRCD: u64 = 0x200;
const TE: u32 = 1 << 31;
const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;
const CFI: u32 = 1 << 23;
const PPF: u32 = 1 << 1;
const IQE: u32 = 1 << 4;

const VECTOR: u8 = 0x74;
const COMPAT_VECTOR: u8 = 0x75;
const FAULT_VECTOR: u8 = 0xe0;
const AGREE_VECTOR: u8 = 0x76;
const SID: u32 = HARNESS_SOURCE_ID as u32;

#[repr(C, align(4096))]
struct Page([[u64; 2]; 256]);

static mut TABLE: Page = Page([[0; 2]; 256]);
static mut QUEUE: Page = Page([[0; 2]; 256]);
static STATUS: AtomicU32 = AtomicU32::new(0);

fn reg(offset: u64) -> u64 {
    VTD_BASE + offset
}

fn r32(offset: u64) -> u32 {
    // SAFETY: the unit's register page is identity-mapped (uncached) MMIO.
    unsafe { core::ptr::read_volatile(reg(offset) as *const u32) }
}

fn w32(offset: u64, value: u32) {
    // SAFETY: as in `r32`.
    unsafe { core::ptr::write_volatile(reg(offset) as *mut u32, value) }
}

fn r64(offset: u64) -> u64 {
    // SAFETY: as in `r32`; 64-bit registers are 8-byte aligned.
    unsafe { core::ptr::read_volatile(reg(offset) as *const u64) }
}

fn w64(offset: u64, value: u64) {
    // SAFETY: as in `r64`.
    unsafe { core::ptr::write_volatile(reg(offset) as *mut u64, value) }
}

fn spin_until(mut done: impl FnMut() -> bool) -> bool {
    // Each poll of a register is an exit: a few seconds at most.
    for _ in 0..300_000 {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

struct Driver {
    tail: usize,
    seq: u32,
    events: u32,
    ok: bool,
    eim: bool,
}

impl Driver {
    fn fail(&mut self, what: &str) {
        println!("vtd: FAIL: {}", what);
        self.ok = false;
    }

    /// One GCMD command on top of the current state, then wait for its status bit.
    fn command(&mut self, set: u32, clear: u32, status_bit: u32) {
        let now = r32(GSTS) & (TE | QIE | IRE | CFI);
        w32(GCMD, (now | set) & !clear);
        if status_bit != 0 && !spin_until(|| r32(GSTS) & status_bit != 0) {
            self.fail("command status not set");
        }
    }

    fn set_entry(&self, index: usize, raw: [u64; 2]) {
        // SAFETY: the BSP alone writes the table; the unit reads it during invalidations
        // this CPU starts.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(TABLE.0[index]), raw) }
    }

    fn entry(&self, dest: u32, vector: u8, sid: u32) -> [u64; 2] {
        let dst = if self.eim {
            u64::from(dest)
        } else {
            u64::from(dest & 0xff) << 8
        };
        [
            1 | (u64::from(vector) << 16) | (dst << 32),
            u64::from(sid) | (1 << 18),
        ]
    }

    fn submit(&mut self, d: [u64; 2]) -> usize {
        let slot = self.tail;
        // SAFETY: as in `set_entry`, for the queue.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(QUEUE.0[slot]), d) }
        self.tail = (self.tail + 1) % 256;
        w64(IQT, (self.tail as u64) * 16);
        slot
    }

    fn wait(&mut self) -> bool {
        self.seq += 1;
        let seq = self.seq;
        let status = &STATUS as *const AtomicU32 as u64;
        self.submit([5 | (1 << 5) | (u64::from(seq) << 32), status]);
        spin_until(|| STATUS.load(Ordering::Acquire) == seq)
    }

    fn invalidate(&mut self, index: u32, mask: u32) {
        self.submit([
            4 | (1 << 4) | (u64::from(mask) << 27) | (u64::from(index) << 32),
            0,
        ]);
        if !self.wait() {
            self.fail("invalidation wait");
        }
    }

    /// Checks the next fault record and the fault event, then clears the record.
    fn fault(&mut self, reason: u8, index: Option<u64>, sid: u32, what: &str) {
        if !spin_until(|| r32(FSTS) & PPF != 0) {
            self.fail(what);
            return;
        }
        let fri = u64::from((r32(FSTS) >> 8) & 0xff);
        let (low, high) = (r64(FRCD + 16 * fri), r64(FRCD + 16 * fri + 8));
        let ok = (high >> 32) as u8 == reason
            && (high & 0xffff) as u32 == sid
            && high >> 63 == 1
            && index.is_none_or(|i| low >> 48 == i);
        w64(FRCD + 16 * fri + 8, 1 << 63);
        self.events += 1;
        let events = self.events;
        let event_seen = spin_until(|| count(0, FAULT_VECTOR) >= events);
        if !ok || !event_seen || r32(FSTS) & PPF != 0 {
            println!(
                "vtd: FAIL: {}: record {:#x} {:#x}, event {}",
                what, low, high, event_seen
            );
            self.ok = false;
        }
    }
}

fn hypercall(number: u32, a: u64, b: u64) -> Registers {
    let mut regs = Registers {
        rax: u64::from(number),
        rcx: u64::from(SID),
        rsi: a,
        rdi: b,
        r8: 0,
        r9: 0,
    };
    // SAFETY: the doorbell of this VMM; no memory is passed.
    unsafe { invoke(HYPERCALL_PORT, &mut regs) };
    regs
}

fn table_entry(index: usize) -> [u64; 2] {
    // SAFETY: as in `Driver::set_entry`; the host writes through during hypercalls this
    // CPU makes.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(TABLE.0[index])) }
}

/// The hypercall and the registers write one table, and both see the same state.
fn agreement(d: &mut Driver, first: u32, last: u32, cpus: (usize, usize)) {
    let r = hypercall(call::ALLOCATE, 1, 0);
    let index = r.rsi;
    let slot = index as usize;
    if r.rax != status::OK || slot >= 256 {
        d.fail("agreement: allocate");
        return;
    }
    // A hypercall update shows in the guest's table.
    let r = hypercall(call::UPDATE, index, target::fixed(last, AGREE_VECTOR));
    let raw = table_entry(slot);
    let dest = if d.eim {
        raw[0] >> 32
    } else {
        (raw[0] >> 40) & 0xff
    };
    if r.rax != status::OK
        || raw[0] & 1 == 0
        || (raw[0] >> 16) & 0xff != u64::from(AGREE_VECTOR)
        || dest != u64::from(last)
    {
        println!(
            "vtd: FAIL: agreement: the table holds {:#x} {:#x} after the hypercall",
            raw[0], raw[1]
        );
        d.ok = false;
    }
    let (_, got) = harness_request(request::RAISE, 0, 1, index as u32);
    expect(cpus.1, AGREE_VECTOR, 1);
    // A guest write plus invalidation wins over it, and the hypercall side sees it.
    d.set_entry(slot, d.entry(first, AGREE_VECTOR, SID));
    d.invalidate(index as u32, 0);
    let (_, got_after) = harness_request(request::RAISE, 0, 1, index as u32);
    expect(cpus.0, AGREE_VECTOR, 1);
    // Freeing through the hypercall clears the guest's entry.
    let r = hypercall(call::FREE, index, 1);
    if (got, got_after) != (1, 1) || r.rax != status::OK || table_entry(slot)[0] & 1 != 0 {
        d.fail("agreement: delivery or free");
    } else {
        println!(
            "vtd: the hypercall and the registers agree on entry {}: last writer wins",
            index
        );
    }
}

fn remappable(handle: u32) -> (u32, u32) {
    (
        0xfee0_0010 | ((handle & 0x7fff) << 5) | (((handle >> 15) & 1) << 2),
        0,
    )
}

fn raise_start(address: u32, data: u32, sid: u32, n: u32) -> u32 {
    mailbox_cell(offset::ARG_ADDR_LO).store(address, Ordering::Relaxed);
    mailbox_cell(offset::ARG_ADDR_HI).store(0, Ordering::Relaxed);
    mailbox_cell(offset::ARG_DATA).store(data, Ordering::Relaxed);
    mailbox_cell(offset::ARG_SID).store(sid, Ordering::Relaxed);
    harness_start(request::RAISE_MSI, 0, n, 0)
}

/// Raises (address, data) `n` times as `sid`; returns how many were delivered.
fn raise(address: u32, data: u32, sid: u32, n: u32) -> u32 {
    let seq = raise_start(address, data, sid, n);
    let (host, delivered) = harness_finish(seq);
    if host != harness_status::OK {
        println!("vtd: harness status {}", host);
    }
    delivered
}

fn fired(cpu: usize) -> u32 {
    mailbox_cell(offset::FIRED + 4 * cpu).load(Ordering::Acquire)
}

/// Runs the scenario; `apic` maps vCPU index to APIC ID.
pub fn run(cpus: usize, apic: impl Fn(usize) -> u32, x2apic: bool) -> bool {
    // Counted from what the unit and the counters say now (also keeps the compiler from
    // zeroing the struct with an SSE instruction the nested emulator cannot run).
    let mut d = Driver {
        tail: (r64(IQH) / 16) as usize,
        seq: STATUS.load(Ordering::Relaxed),
        events: count(0, FAULT_VECTOR),
        ok: true,
        eim: x2apic,
    };
    let ecap = r64(ECAP);
    if ecap & (1 << 3) == 0 || ecap & (1 << 1) == 0 || (x2apic && ecap & (1 << 4) == 0) {
        println!("vtd: FAIL: ECAP {:#x} lacks IR, QI or EIM", ecap);
        return false;
    }
    let last = cpus - 1;
    // The fault event goes to vCPU 0.
    w32(FEDATA, u32::from(FAULT_VECTOR));
    w32(FEADDR, 0xfee0_0000 | ((apic(0) & 0xff) << 12));
    w32(FEUADDR, 0);
    w32(FECTL, 0);

    // Linux's order: table pointer, queued invalidation, global IEC flush, IR on with
    // compatibility format blocked.
    let table = core::ptr::addr_of!(TABLE) as u64;
    let eime = if x2apic { 1 << 11 } else { 0 };
    w64(IRTA, table | eime | 7); // 256 entries
    d.command(SIRTP, 0, SIRTP);
    w64(IQT, 0);
    w64(IQA, core::ptr::addr_of!(QUEUE) as u64);
    d.command(QIE, 0, QIE);
    d.submit([4, 0]);
    if !d.wait() {
        d.fail("global invalidation");
    }
    d.command(IRE, CFI, IRE);
    if r32(GSTS) & CFI != 0 {
        d.fail("CFI still set");
    }
    println!(
        "vtd: interrupt remapping enabled ({} mode), compatibility format blocked",
        if x2apic { "x2APIC" } else { "xAPIC" }
    );

    // A remapped interrupt arrives where its entry says.
    d.set_entry(5, d.entry(apic(0), VECTOR, SID));
    d.invalidate(5, 0);
    let (address, data) = remappable(5);
    let got = raise(address, data, SID, 20);
    expect(0, VECTOR, 20);
    if got != 20 || count(0, VECTOR) != 20 {
        d.fail("remapped delivery");
    }

    // Retarget under load, through an index-selective invalidation.
    let seq = raise_start(address, data, SID, 400);
    spin_until(|| count(0, VECTOR) >= 60);
    d.set_entry(5, d.entry(apic(last), VECTOR, SID));
    d.invalidate(5, 0);
    let (host, delivered) = harness_finish(seq);
    let total: u32 = (0..cpus).map(|c| count(c, VECTOR)).sum();
    for c in 0..cpus {
        expect(c, VECTOR, fired(c));
    }
    if host != harness_status::OK
        || delivered != 400
        || total != 420
        || (cpus > 1 && fired(last) == 0)
    {
        println!(
            "vtd: FAIL: retarget: status {}, {} delivered, {} counted",
            host, delivered, total
        );
        d.ok = false;
    } else {
        println!(
            "vtd: retarget by invalidation under load: 400 of 400 counted, {} after the move",
            fired(last)
        );
    }

    // Faults: each recorded, each raising the fault event, none delivered.
    let compat = 0xfee0_0000 | ((apic(0) & 0xff) << 12);
    if raise(compat, u32::from(COMPAT_VECTOR), SID, 1) != 0 {
        d.fail("a compatibility-format interrupt was delivered");
    }
    d.fault(0x25, None, SID, "compatibility format blocked");
    let (beyond, _) = remappable(300);
    raise(beyond, 0, SID, 1);
    d.fault(0x21, Some(300), SID, "index beyond the table");
    let (absent, _) = remappable(6);
    raise(absent, 0, SID, 1);
    d.fault(0x22, Some(6), SID, "entry not present");
    let mut reserved = d.entry(apic(0), VECTOR, SID);
    reserved[0] |= 1 << 13;
    d.set_entry(7, reserved);
    d.invalidate(7, 0);
    let (bad, _) = remappable(7);
    raise(bad, 0, SID, 1);
    d.fault(0x24, Some(7), SID, "reserved bits");
    raise(address, data, u32::from(FOREIGN_SOURCE_ID), 1);
    d.fault(
        0x26,
        Some(5),
        u32::from(FOREIGN_SOURCE_ID),
        "source-id mismatch",
    );
    println!("vtd: faults 0x25, 0x21, 0x22, 0x24, 0x26 recorded, each with a fault event");

    // A malformed descriptor stops the queue; the guest repairs it and goes on.
    let head = r64(IQH);
    let slot = d.submit([0xf, 0]);
    if !spin_until(|| r32(FSTS) & IQE != 0) || r64(IQH) != head {
        d.fail("queue error");
    }
    d.events += 1;
    let events = d.events;
    if !spin_until(|| count(0, FAULT_VECTOR) >= events) {
        d.fail("queue error event");
    }
    d.seq += 1;
    let seq = d.seq;
    let status_addr = &STATUS as *const AtomicU32 as u64;
    // SAFETY: as in `submit`.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!(QUEUE.0[slot]),
            [5 | (1 << 5) | (u64::from(seq) << 32), status_addr],
        );
    }
    w32(FSTS, IQE);
    if !spin_until(|| STATUS.load(Ordering::Acquire) == seq) || r64(IQH) != r64(IQT) {
        d.fail("queue did not resume");
    }
    agreement(&mut d, apic(0), apic(last), (0, last));
    expect(0, FAULT_VECTOR, d.events);
    if d.ok {
        println!("vtd: a malformed descriptor stopped the queue (IQE) until repaired; PASS");
    }
    d.ok
}
