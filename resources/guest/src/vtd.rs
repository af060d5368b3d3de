//! The `vtd` scenario: the guest drives the VT-d unit through its registers, as Linux's
//! interrupt-remapping code does, with its remapping table and invalidation queue in its
//! own memory; a device (the host harness) raises messages through it, and so does the
//! IOAPIC, whose redirection entries the guest writes in remappable format as Linux does
//! once remapping is on.

use core::sync::atomic::{AtomicU32, Ordering};

use hypercall::abi::status;
use hypercall::harness::status as harness_status;
use hypercall::harness::{offset, request, FOREIGN_SOURCE_ID, HARNESS_SOURCE_ID};
use hypercall::platform::{COM1_IOAPIC_PIN, COM1_PORT, IOAPIC_BASE, IOAPIC_SOURCE_ID, VTD_BASE};

use hypercall::abi::{call, invoke, target, Registers};
use hypercall::platform::HYPERCALL_PORT;

use crate::scenario::{expect, harness_finish, harness_request, harness_start};
use crate::{arch, count, mailbox_cell, println};

pub(crate) const GCMD: u64 = 0x18;
pub(crate) const GSTS: u64 = 0x1c;
pub(crate) const ECAP: u64 = 0x10;
pub(crate) const FSTS: u64 = 0x34;
pub(crate) const FECTL: u64 = 0x38;
pub(crate) const FEDATA: u64 = 0x3c;
pub(crate) const FEADDR: u64 = 0x40;
pub(crate) const FEUADDR: u64 = 0x44;
const IQH: u64 = 0x80;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;
const IRTA: u64 = 0xb8;
const FRCD: u64 = 0x200;
pub(crate) const TE: u32 = 1 << 31;
pub(crate) const QIE: u32 = 1 << 26;
pub(crate) const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;
pub(crate) const CFI: u32 = 1 << 23;
const PPF: u32 = 1 << 1;
const IQE: u32 = 1 << 4;

const VECTOR: u8 = 0x74;
const COMPAT_VECTOR: u8 = 0x75;
const FAULT_VECTOR: u8 = 0xe0;
const AGREE_VECTOR: u8 = 0x76;
const SID: u32 = HARNESS_SOURCE_ID as u32;
/// The IOAPIC part: COM1's edge-triggered pin, a level-triggered pin the harness drives,
/// a pin whose entry verifies another requester, a compatibility-format pin.
const SERIAL_VECTOR: u8 = 0x77;
const LEVEL_VECTOR: u8 = 0x78;
const FOREIGN_VECTOR: u8 = 0x79;
const COMPAT_PIN_VECTOR: u8 = 0x7a;
const MISMATCH_VECTOR: u8 = 0x7b;
const MISMATCH_RTE_VECTOR: u8 = 0x7c;
const LEVEL_PIN: u32 = 9;
const MISMATCH_PIN: u32 = 12;
const FOREIGN_PIN: u32 = 10;
const COMPAT_PIN: u32 = 11;
const IOAPIC_SID: u32 = IOAPIC_SOURCE_ID as u32;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_REMOTE_IRR: u64 = 1 << 14;

#[repr(C, align(4096))]
struct Page([[u64; 2]; 256]);

static mut TABLE: Page = Page([[0; 2]; 256]);
static mut QUEUE: Page = Page([[0; 2]; 256]);
static STATUS: AtomicU32 = AtomicU32::new(0);
fn ioapic_select(reg: u32) {
    // SAFETY: the IOAPIC's register page, identity-mapped; callers keep interrupts off
    // between selecting and accessing the window.
    unsafe { core::ptr::write_volatile(IOAPIC_BASE as *mut u32, reg) }
}

fn ioapic_read(reg: u32) -> u32 {
    ioapic_select(reg);
    // SAFETY: as in `ioapic_select`.
    unsafe { core::ptr::read_volatile((IOAPIC_BASE + 0x10) as *const u32) }
}

fn ioapic_write(reg: u32, value: u32) {
    ioapic_select(reg);
    // SAFETY: as in `ioapic_select`.
    unsafe { core::ptr::write_volatile((IOAPIC_BASE + 0x10) as *mut u32, value) }
}

/// Redirection entry `pin` (call with interrupts off, or from a handler).
fn rte(pin: u32) -> u64 {
    u64::from(ioapic_read(0x10 + 2 * pin)) | (u64::from(ioapic_read(0x11 + 2 * pin)) << 32)
}

/// Writes redirection entry `pin`, high half first as Linux does (call with interrupts
/// off, or from a handler).
pub fn set_rte(pin: u32, value: u64) {
    ioapic_write(0x11 + 2 * pin, (value >> 32) as u32);
    ioapic_write(0x10 + 2 * pin, value as u32);
}

/// A remappable-format redirection entry naming IRTE `index` (VT-d 5.1.5.1): the
/// vector must equal the IRTE's, for EOIs to find the pin.
fn remappable_rte(index: u32, vector: u8, level: bool) -> u64 {
    (u64::from(index & 0x7fff) << 49)
        | (1 << 48)
        | (u64::from((index >> 15) & 1) << 11)
        | if level { RTE_LEVEL } else { 0 }
        | u64::from(vector)
}

fn ioapic_line(pin: u32, mode: u32) -> (u32, u32) {
    harness_request(request::IOAPIC_LINE, 0, pin, mode)
}

fn reg(offset: u64) -> u64 {
    VTD_BASE + offset
}

pub(crate) fn r32(offset: u64) -> u32 {
    // SAFETY: the unit's register page is identity-mapped (uncached) MMIO.
    unsafe { core::ptr::read_volatile(reg(offset) as *const u32) }
}

pub(crate) fn w32(offset: u64, value: u32) {
    // SAFETY: as in `r32`.
    unsafe { core::ptr::write_volatile(reg(offset) as *mut u32, value) }
}

pub(crate) fn r64(offset: u64) -> u64 {
    // SAFETY: as in `r32`; 64-bit registers are 8-byte aligned.
    unsafe { core::ptr::read_volatile(reg(offset) as *const u64) }
}

pub(crate) fn w64(offset: u64, value: u64) {
    // SAFETY: as in `r64`.
    unsafe { core::ptr::write_volatile(reg(offset) as *mut u64, value) }
}

fn spin_until(done: impl FnMut() -> bool) -> bool {
    // Each poll of a register is an exit: a few seconds at most.
    spin_at_most(300_000, done)
}

/// Polls `done` up to `polls` times; whether it came true.
pub(crate) fn spin_at_most(polls: u32, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..polls {
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
    /// A driver for the unit as it stands (queue tail, wait sequence, fault events).
    fn attach(x2apic: bool) -> Self {
        Self {
            tail: (r64(IQH) / 16) as usize,
            seq: STATUS.load(Ordering::Relaxed),
            events: count(0, FAULT_VECTOR),
            ok: true,
            eim: x2apic,
        }
    }

    /// Linux's order: table pointer, queued invalidation, global IEC flush, IR on with
    /// compatibility format blocked.
    fn enable_remapping(&mut self) {
        let table = core::ptr::addr_of!(TABLE) as u64;
        let eime = if self.eim { 1 << 11 } else { 0 };
        w64(IRTA, table | eime | 7); // 256 entries
        self.command(SIRTP, 0, SIRTP);
        w64(IQT, 0);
        w64(IQA, core::ptr::addr_of!(QUEUE) as u64);
        self.tail = 0;
        self.command(QIE, 0, QIE);
        self.submit([4, 0]);
        if !self.wait() {
            self.fail("global invalidation");
        }
        self.command(IRE, CFI, IRE);
    }

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

/// Routes IOAPIC input `pin` through interrupt remapping to the CPU with APIC ID `apic`,
/// edge-triggered with `vector`, as Linux does: turns remapping on if it is off (table,
/// queued invalidation, a global invalidation, IR with compatibility format blocked),
/// writes IRTE `index` for the IOAPIC's requester, invalidates it, then writes the pin's
/// remappable redirection entry. False when a step fails (said on the console).
pub fn remap_ioapic_pin(pin: u32, vector: u8, index: u32, apic: u32, x2apic: bool) -> bool {
    let mut d = Driver::attach(x2apic);
    if r32(GSTS) & IRE == 0 {
        d.enable_remapping();
    }
    d.set_entry(index as usize, d.entry(apic, vector, IOAPIC_SID));
    d.invalidate(index, 0);
    arch::without_interrupts(|| set_rte(pin, remappable_rte(index, vector, false)));
    d.ok
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
    let mut d = Driver::attach(x2apic);
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

    d.enable_remapping();
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
    ioapic(&mut d, apic(0));
    agreement(&mut d, apic(0), apic(last), (0, last));
    expect(0, FAULT_VECTOR, d.events);
    if d.ok {
        println!("vtd: a malformed descriptor stopped the queue (IQE) until repaired; PASS");
    }
    d.ok
}

/// The IOAPIC's pins through the unit: redirection entries in remappable format name
/// IRTEs that verify the IOAPIC's requester ID.
fn ioapic(d: &mut Driver, apic0: u32) {
    let version = arch::without_interrupts(|| ioapic_read(1));
    if version != 0x0017_0020 {
        println!("vtd: FAIL: IOAPIC version register {:#x}", version);
        d.ok = false;
        return;
    }

    // COM1 (edge, pin 4): enabling the UART's transmitter-empty interrupt raises it once.
    d.set_entry(20, d.entry(apic0, SERIAL_VECTOR, IOAPIC_SID));
    d.invalidate(20, 0);
    arch::without_interrupts(|| set_rte(COM1_IOAPIC_PIN, remappable_rte(20, SERIAL_VECTOR, false)));
    for round in 1..=2 {
        arch::outb(COM1_PORT + 1, 0x02);
        if !spin_until(|| count(0, SERIAL_VECTOR) >= round) {
            d.fail("the UART's interrupt did not arrive through pin 4");
        }
        // Reading IIR acknowledges it; the next enable raises it again.
        arch::inb(COM1_PORT + 2);
    }
    arch::outb(COM1_PORT + 1, 0);
    arch::inb(COM1_PORT + 2);
    expect(0, SERIAL_VECTOR, 2);

    // A level pin: sent again after an EOI while its line is high (KVM reports the EOI
    // of the vector its route names); once the line is low, the next EOI clears remote
    // IRR and nothing more comes. (How many arrive while high depends on how soon EOIs
    // are reported; each wait polls IOAPIC registers, which are exits.)
    let mut level = d.entry(apic0, LEVEL_VECTOR, IOAPIC_SID);
    level[0] |= 1 << 4; // trigger mode: level
    d.set_entry(21, level);
    d.invalidate(21, 0);
    arch::without_interrupts(|| set_rte(LEVEL_PIN, remappable_rte(21, LEVEL_VECTOR, true)));
    let irr = |pin| arch::without_interrupts(|| rte(pin)) & RTE_REMOTE_IRR != 0;
    let (host, sent) = ioapic_line(LEVEL_PIN, 1);
    let again = spin_until(|| {
        irr(LEVEL_PIN);
        count(0, LEVEL_VECTOR) >= 2
    });
    ioapic_line(LEVEL_PIN, 0);
    let cleared = spin_until(|| !irr(LEVEL_PIN));
    let got = count(0, LEVEL_VECTOR);
    for _ in 0..200 {
        irr(LEVEL_PIN);
    }
    let still = count(0, LEVEL_VECTOR) == got;
    expect(0, LEVEL_VECTOR, got);

    // The entry's vector differs from its IRTE's: the local APIC's EOI (of the IRTE's
    // vector) does not match the entry, so remote IRR holds the pin until the guest
    // writes the entry's vector to the IOAPIC's EOI register (directed EOI).
    let mut mismatch = d.entry(apic0, MISMATCH_VECTOR, IOAPIC_SID);
    mismatch[0] |= 1 << 4;
    d.set_entry(23, mismatch);
    d.invalidate(23, 0);
    arch::without_interrupts(|| {
        set_rte(MISMATCH_PIN, remappable_rte(23, MISMATCH_RTE_VECTOR, true));
    });
    ioapic_line(MISMATCH_PIN, 1);
    let arrived = spin_until(|| count(0, MISMATCH_VECTOR) >= 1);
    for _ in 0..200 {
        irr(MISMATCH_PIN);
    }
    let held = irr(MISMATCH_PIN) && count(0, MISMATCH_VECTOR) == 1;
    ioapic_line(MISMATCH_PIN, 0);
    arch::without_interrupts(|| {
        // SAFETY: the IOAPIC's EOI register, identity-mapped.
        unsafe {
            core::ptr::write_volatile(
                (IOAPIC_BASE + 0x40) as *mut u32,
                u32::from(MISMATCH_RTE_VECTOR),
            );
        }
    });
    let released = !irr(MISMATCH_PIN) && count(0, MISMATCH_VECTOR) == 1;
    expect(0, MISMATCH_VECTOR, 1);
    let checks = [
        host == harness_status::OK && sent == 1,
        again,
        cleared && still,
        arrived && held,
        released,
    ];
    if let Some(check) = checks.iter().position(|ok| !ok) {
        println!(
            "vtd: FAIL: IOAPIC level pins, check {}: status {}, sent {}, {} and {} arrived",
            check,
            host,
            sent,
            got,
            count(0, MISMATCH_VECTOR)
        );
        d.ok = false;
    }

    // An entry that verifies another requester, and a compatibility-format entry while
    // compatibility format is blocked: each faults as the IOAPIC's requester.
    d.set_entry(22, d.entry(apic0, FOREIGN_VECTOR, SID));
    d.invalidate(22, 0);
    arch::without_interrupts(|| {
        set_rte(FOREIGN_PIN, remappable_rte(22, FOREIGN_VECTOR, false));
        set_rte(
            COMPAT_PIN,
            (u64::from(apic0 & 0xff) << 56) | u64::from(COMPAT_PIN_VECTOR),
        );
    });
    ioapic_line(FOREIGN_PIN, 2);
    d.fault(
        0x26,
        Some(22),
        IOAPIC_SID,
        "IOAPIC pin with another requester's entry",
    );
    ioapic_line(COMPAT_PIN, 2);
    d.fault(0x25, None, IOAPIC_SID, "IOAPIC pin in compatibility format");
    arch::without_interrupts(|| {
        for pin in [
            COM1_IOAPIC_PIN,
            LEVEL_PIN,
            FOREIGN_PIN,
            COMPAT_PIN,
            MISMATCH_PIN,
        ] {
            set_rte(pin, RTE_MASKED);
        }
    });
    if d.ok {
        println!(
            "vtd: IOAPIC pins remapped: COM1 (edge) 2 of 2; a level pin sent {} times while high, none after; remote IRR held until the IOAPIC's EOI register; faults 0x26 and 0x25 as ff:00.0",
            got
        );
    }
}
