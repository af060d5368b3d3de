//! The `ims` scenario: drivers for both IMS devices, written from `docs/ims-device.md`
//! against the layouts in `hypercall::ims`, with their IRTEs from the hypercall (the
//! queue-memory driver in `queues`, the `snapshot` scenario in `snapshot`).
//!
//! Completions are counted from the used rings, in the interrupt handler: interrupts of
//! one vector merge in the LAPIC, so a handler reaps every queue of its vector and the
//! count of a (CPU, vector) cell is the number of completions reaped there. Each slot
//! vector belongs to one CPU, so a completion reaped anywhere else is counted as on the
//! wrong CPU.

use core::fmt::Write;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use hypercall::abi::{call, status, target, Registers};
use hypercall::ims::{queues as qd, slots as sd};

use crate::pci::{self, mmio_read, mmio_write};
use crate::scenario::expect;
use crate::{arch, count, println};

mod api;
mod queues;
mod snapshot;

pub use api::api;
pub(crate) use queues::command_status;
use queues::queue_device;
pub use snapshot::snapshot;

/// Vectors of the slot device's queues: queue `q` uses `SLOT_VECTOR + q % SLOT_VECTORS`,
/// which belongs to CPU `(q % SLOT_VECTORS) % cpus`.
const SLOT_VECTOR: u8 = 0xc0;
const SLOT_VECTORS: usize = 32;
/// The vector the retargeted entries use.
const RETARGET_VECTOR: u8 = 0xe1;
/// MSI-X vector 0 of the queue-memory device (admin completions and resets).
const ADMIN_VECTOR: u8 = 0xe2;
/// The entry of the other device, which the slot device must not reach.
const FOREIGN_VECTOR: u8 = 0xe3;
/// Queue-memory contexts: context `j` uses `QUEUE_VECTOR + j`.
const QUEUE_VECTOR: u8 = 0xe4;
const CONTEXTS: usize = 4;

/// Queues taking part in the retarget test, and the work items each gets.
const RETARGET_QUEUES: usize = 16;
const RETARGET_ITEMS: usize = 6;
/// Microseconds between completions while retargeting.
const RETARGET_DELAY_US: u32 = 2000;

/// Most slot-device queues this driver sets up.
pub const MAX_SLOT_QUEUES: usize = 4096;
pub(crate) const QSIZE: usize = 8;
const ADMIN_SIZE: usize = 8;
/// Spins before a wait is declared failed (the guest has no timer; this is seconds).
const WAIT_LIMIT: u32 = 3_000_000;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One virtio split queue: descriptor table, available ring, used ring.
#[repr(C, align(64))]
pub(crate) struct Ring {
    desc: [Desc; QSIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE],
    avail_event: u16,
    _pad: [u8; 42],
    used_flags: u16,
    used_idx: u16,
    used_ring: [[u32; 2]; QSIZE],
    used_event: u16,
}

impl Ring {
    /// Guest-physical addresses of its descriptor table, available ring and used ring.
    pub(crate) fn parts(ring: *const Ring) -> (u64, u64, u64) {
        // SAFETY: addresses of a ring's parts; nothing is read.
        unsafe {
            (
                addr_of!((*ring).desc) as u64,
                addr_of!((*ring).avail_flags) as u64,
                addr_of!((*ring).used_flags) as u64,
            )
        }
    }

    pub(crate) const EMPTY: Ring = Ring {
        desc: [const {
            Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }
        }; QSIZE],
        avail_flags: 0,
        avail_idx: 0,
        avail_ring: [0; QSIZE],
        avail_event: 0,
        _pad: [0; 42],
        used_flags: 0,
        used_idx: 0,
        used_ring: [[0; 2]; QSIZE],
        used_event: 0,
    };
}

#[repr(C, align(64))]
struct Context([u32; 16]);

#[repr(C, align(32))]
pub(crate) struct Command(pub(crate) [u32; 8]);

#[repr(C, align(16))]
struct Batch([[u64; 2]; MAX_SLOT_QUEUES]);

static mut SLOT_RINGS: [Ring; MAX_SLOT_QUEUES] = [const { Ring::EMPTY }; MAX_SLOT_QUEUES];
static SLOT_SEEN: [AtomicU16; MAX_SLOT_QUEUES] = [const { AtomicU16::new(0) }; MAX_SLOT_QUEUES];
static mut QUEUE_RINGS: [Ring; CONTEXTS] = [const { Ring::EMPTY }; CONTEXTS];
static QUEUE_SEEN: [AtomicU16; CONTEXTS] = [const { AtomicU16::new(0) }; CONTEXTS];
static mut CONTEXT: [Context; CONTEXTS] = [const { Context([0; 16]) }; CONTEXTS];
static mut ADMIN: [Command; ADMIN_SIZE] = [const { Command([0; 8]) }; ADMIN_SIZE];
static mut BATCH: Batch = Batch([[0; 2]; MAX_SLOT_QUEUES]);
/// What every work descriptor points at (the devices do not read it).
static WORK_BUFFER: [u8; 64] = [0; 64];

/// Slot-device queues with work (read by the handler).
static ACTIVE: AtomicU32 = AtomicU32::new(0);
static CPUS: AtomicU32 = AtomicU32::new(1);
static WRONG_CPU: AtomicU32 = AtomicU32::new(0);

fn slot_ring(q: usize) -> *mut Ring {
    // SAFETY: an in-bounds element of a static; only raw pointers are formed.
    unsafe { addr_of_mut!(SLOT_RINGS[q]) }
}

fn queue_ring(j: usize) -> *mut Ring {
    // SAFETY: as for `slot_ring`.
    unsafe { addr_of_mut!(QUEUE_RINGS[j]) }
}

pub(crate) fn used_idx(ring: *const Ring) -> u16 {
    // SAFETY: a ring of ours; the device writes `used_idx`, hence the volatile read.
    unsafe { read_volatile(addr_of!((*ring).used_idx)) }
}

fn avail_idx(ring: *const Ring) -> u16 {
    // SAFETY: a ring of ours.
    unsafe { read_volatile(addr_of!((*ring).avail_idx)) }
}

/// Makes one work item available on `ring`.
pub(crate) fn post(ring: *mut Ring) {
    let idx = avail_idx(ring);
    let slot = usize::from(idx) % QSIZE;
    // SAFETY: a ring of ours; the device reads the descriptor and the ring entry only
    // after it sees the new `avail_idx`, which is written last.
    unsafe {
        let d = addr_of_mut!((*ring).desc[slot]);
        write_volatile(addr_of_mut!((*d).addr), addr_of!(WORK_BUFFER) as u64);
        write_volatile(addr_of_mut!((*d).len), 64);
        write_volatile(addr_of_mut!((*d).flags), 0);
        write_volatile(addr_of_mut!((*d).next), 0);
        write_volatile(addr_of_mut!((*ring).avail_ring[slot]), slot as u16);
        compiler_fence(Ordering::Release);
        write_volatile(addr_of_mut!((*ring).avail_idx), idx.wrapping_add(1));
    }
}

/// Takes the completions on `ring` that nobody has counted yet.
fn reap(ring: *const Ring, seen: &AtomicU16) -> u32 {
    let used = used_idx(ring);
    loop {
        let old = seen.load(Ordering::Acquire);
        let new = used.wrapping_sub(old);
        if new == 0 || new > 0x8000 {
            return 0;
        }
        if seen
            .compare_exchange(old, used, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return u32::from(new);
        }
    }
}

/// Called by the interrupt entry for every vector: for the vectors of IMS queues, how
/// many completions to count (possibly 0); `None` for any other vector.
pub fn on_interrupt(vector: u8) -> Option<u32> {
    let base = SLOT_VECTOR as usize;
    let v = vector as usize;
    if (base..base + SLOT_VECTORS).contains(&v) {
        let off = v - base;
        let active = ACTIVE.load(Ordering::Acquire) as usize;
        let got: u32 = (off..active)
            .step_by(SLOT_VECTORS)
            .map(|q| reap(slot_ring(q), &SLOT_SEEN[q]))
            .sum();
        let cpus = CPUS.load(Ordering::Relaxed).max(1) as usize;
        if off % cpus != arch::cpu_index() {
            WRONG_CPU.fetch_add(got, Ordering::Relaxed);
        }
        return Some(got);
    }
    if vector == RETARGET_VECTOR {
        let queues = RETARGET_QUEUES.min(ACTIVE.load(Ordering::Acquire) as usize);
        return Some((0..queues).map(|q| reap(slot_ring(q), &SLOT_SEEN[q])).sum());
    }
    let qbase = QUEUE_VECTOR as usize;
    if (qbase..qbase + CONTEXTS).contains(&v) {
        let j = v - qbase;
        return Some(reap(queue_ring(j), &QUEUE_SEEN[j]));
    }
    None
}

/// The ID register of the device being driven (0: none): a wait gives up when it reads
/// all ones, as a driver's does for a device that is gone (its process died, or it was
/// surprise-removed).
static WATCHED: AtomicU64 = AtomicU64::new(0);

/// Waits on the device whose ID register is at `id` from now on.
fn watch(id: u64) {
    WATCHED.store(id, Ordering::Relaxed);
}

/// Whether the watched device reads all ones.
fn gone() -> bool {
    let id = WATCHED.load(Ordering::Relaxed);
    id != 0 && mmio_read(id) == u32::MAX
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> bool {
    for i in 0..WAIT_LIMIT {
        if done() {
            return true;
        }
        if i % 4096 == 0 && gone() {
            println!(
                "ims: FAIL: the device reads all ones (gone) while waiting for {}",
                what
            );
            return false;
        }
        core::hint::spin_loop();
    }
    println!("ims: FAIL: timed out waiting for {}", what);
    false
}

/// The remappable-format message of entry `index` (`docs/hypercall.md`, COMPOSE).
pub fn compose(index: u64) -> u32 {
    0xfee0_0010 | (((index & 0x7fff) as u32) << 5) | ((((index >> 15) & 1) as u32) << 2)
}

/// Hypercalls for one requester, retried while BUSY.
struct Hc {
    guest: crate::hc::Guest,
    ok: bool,
}

impl Hc {
    /// One call (retried while BUSY); a status other than OK is a failure.
    fn call(&mut self, what: &str, number: u32, requester: u16, a: u64, b: u64) -> Registers {
        let regs = self.guest.call(number, u64::from(requester), a, b);
        if regs.rax != status::OK {
            println!("ims: FAIL: {}: hypercall status {}", what, regs.rax);
            self.ok = false;
        }
        regs
    }
}

fn check(ok: &mut bool, what: &str, got: u64, want: u64) {
    if got != want {
        println!("ims: FAIL: {}: {} (expected {})", what, got, want);
        *ok = false;
    }
}

fn slot_vector_total(cpus: usize) -> u32 {
    (0..cpus)
        .map(|cpu| {
            (0..SLOT_VECTORS)
                .map(|off| count(cpu, SLOT_VECTOR + off as u8))
                .sum::<u32>()
        })
        .sum()
}

fn vector_total(cpus: usize, vector: u8) -> u32 {
    (0..cpus).map(|cpu| count(cpu, vector)).sum()
}

/// Runs the scenario. `required` makes an absent device a failure (scenario `ims`);
/// otherwise (scenario `all`) an absent device is skipped.
pub fn run(
    cpus: usize,
    apic: impl Fn(usize) -> u32 + Copy,
    slots: u32,
    rounds: u32,
    required: bool,
) -> bool {
    let Some(iface) = crate::hc::discover() else {
        println!("ims: FAIL: no hypercall interface");
        return false;
    };
    let mut hc = Hc {
        guest: crate::hc::Guest::new(iface.port),
        ok: true,
    };
    CPUS.store(cpus as u32, Ordering::Relaxed);
    let slot_dev = pci::find(sd::VENDOR_ID, sd::DEVICE_ID);
    let queue_dev = pci::find(qd::VENDOR_ID, qd::DEVICE_ID);
    let mut ok = true;
    match slot_dev {
        Some(dev) => ok &= slot_device(&mut hc, dev, queue_dev, cpus, apic, slots, rounds),
        None if required => {
            println!("ims: FAIL: no slot-array IMS device (1b36:1100)");
            ok = false;
        }
        None => println!("ims: no slot-array IMS device; skipped"),
    }
    match queue_dev {
        Some(dev) => ok &= queue_device(&mut hc, dev, cpus, apic),
        None if required => {
            println!("ims: FAIL: no queue-memory IMS device (1b36:1101)");
            ok = false;
        }
        None => println!("ims: no queue-memory IMS device; skipped"),
    }
    ok && hc.ok
}

/// Entries `rid` may still allocate (`QUERY` R8). Not inlined: zeroing the call's
/// registers in a larger frame makes the compiler reach for `xorps`, which the emulator
/// of the test machines cannot run.
#[inline(never)]
fn quota_left(hc: &mut Hc, rid: u16) -> usize {
    let none = core::hint::black_box(0);
    hc.call("query", call::QUERY, rid, none, none).r8 as usize
}

/// A slot device set up by [`setup_slots`]: `n` queues, queue `q` on slot
/// `slots - n + q` with entry `first + q`.
struct SlotSetup {
    bar: u64,
    rid: u16,
    first: u64,
    n: usize,
    slots: usize,
}

/// Allocates and activates `want` entries (at most the device's slots and queues) spread
/// over the CPUs' slot vectors, programs the slots and their queues, and makes them
/// active for the handler. `None` if the device has nothing to set up.
fn setup_slots(
    hc: &mut Hc,
    dev: u8,
    cpus: usize,
    apic: &impl Fn(usize) -> u32,
    want: u32,
    ok: &mut bool,
) -> Option<SlotSetup> {
    let bar = pci::bar0(dev);
    watch(bar + sd::reg::ID);
    let rid = pci::requester_id(dev);
    let reg = |off: u64| mmio_read(bar + off);
    let set = |off: u64, v: u32| mmio_write(bar + off, v);
    check(
        ok,
        "slot device ID",
        u64::from(reg(sd::reg::ID)),
        u64::from(sd::ID),
    );
    let slots = reg(sd::reg::SLOTS) as usize;
    let mut n = (want as usize)
        .min(slots)
        .min(reg(sd::reg::QUEUES) as usize)
        .min(MAX_SLOT_QUEUES);
    if n == 0 {
        println!("ims: FAIL: the slot device has no slots or queues");
        *ok = false;
        return None;
    }
    // The host caps the entries one requester may hold (QUERY R8): take no more, as a
    // driver falling back to fewer vectors would, and check that the cap holds.
    let quota = quota_left(hc, rid);
    let capped = quota < n;
    if capped {
        println!(
            "ims-slots: the host allows this requester {} entries; using {} of {}",
            quota, quota, n
        );
        n = quota;
        if n == 0 {
            return None;
        }
    }

    // One allocation, one batch that activates all of them, spread over the CPUs.
    let first = hc
        .call("allocate slot entries", call::ALLOCATE, rid, n as u64, 0)
        .rsi;
    if capped {
        let r = hc.guest.call(call::ALLOCATE, u64::from(rid), 1, 0);
        check(
            ok,
            "one entry beyond the quota",
            r.rax,
            status::QUOTA_EXCEEDED,
        );
        println!(
            "ims-slots: one entry beyond the quota: status {} (QUOTA_EXCEEDED)",
            r.rax
        );
    }
    for i in 0..n {
        let off = i % SLOT_VECTORS;
        let word = target::fixed(apic(off % cpus), SLOT_VECTOR + off as u8);
        // SAFETY: only the BSP runs this, and the host reads the array only during the
        // BATCH call below.
        unsafe { write_volatile(addr_of_mut!(BATCH.0[i]), [first + i as u64, word]) };
    }
    // The host may not back them all (a device in another process with fewer host
    // interrupts than slots): on NO_SPACE, nothing was applied; try half as many, as a
    // driver falling back to fewer vectors would, and give the rest back.
    let batch = addr_of!(BATCH) as u64;
    let mut live = n;
    loop {
        let r = hc
            .guest
            .call(call::BATCH, u64::from(rid), batch, live as u64);
        match r.rax {
            status::OK => {
                check(ok, "entries activated", r.rsi, live as u64);
                break;
            }
            status::NO_SPACE if live > 1 => {
                check(ok, "entries activated by a refused batch", r.rsi, 0);
                live /= 2;
            }
            other => {
                println!(
                    "ims: FAIL: activate slot entries: hypercall status {}",
                    other
                );
                *ok = false;
                break;
            }
        }
    }
    if live < n {
        println!(
            "ims-slots: the host backed {} of {} entries (NO_SPACE, nothing applied, for more); using {}",
            live, n, live
        );
        hc.call(
            "free the entries the host could not back",
            call::FREE,
            rid,
            first + live as u64,
            (n - live) as u64,
        );
        n = live;
    }
    let composed = hc.call("compose", call::COMPOSE, rid, first, 0);
    check(
        ok,
        "composed message",
        composed.rsi,
        u64::from(compose(first)),
    );

    // Slots: the message once, then unmask. Queues: one per slot.
    for i in 0..n {
        let at = slot_at(slots, n, i);
        set(at, compose(first + i as u64));
        set(at + 12, 0);
        let ring = slot_ring(i);
        set(sd::reg::QUEUE_SELECT, i as u32);
        set(sd::reg::QUEUE_SIZE, QSIZE as u32);
        set(sd::reg::QUEUE_SLOT, (slots - n + i) as u32);
        let (desc, avail, used) = Ring::parts(ring);
        set(sd::reg::QUEUE_DESC, desc as u32);
        set(sd::reg::QUEUE_AVAIL, avail as u32);
        set(sd::reg::QUEUE_USED, used as u32);
        set(sd::reg::QUEUE_READY, 1);
    }
    check(ok, "slot device status", u64::from(reg(sd::reg::STATUS)), 0);
    ACTIVE.store(n as u32, Ordering::Release);
    Some(SlotSetup {
        bar,
        rid,
        first,
        n,
        slots,
    })
}

fn slot_device(
    hc: &mut Hc,
    dev: u8,
    other: Option<u8>,
    cpus: usize,
    apic: impl Fn(usize) -> u32,
    want: u32,
    rounds: u32,
) -> bool {
    let mut ok = true;
    let Some(SlotSetup {
        bar,
        rid,
        first,
        n,
        slots,
    }) = setup_slots(hc, dev, cpus, &apic, want, &mut ok)
    else {
        return false;
    };
    let reg = |off: u64| mmio_read(bar + off);
    let set = |off: u64, v: u32| mmio_write(bar + off, v);

    // Work on every queue, all at once, `rounds` times.
    let before = slot_vector_total(cpus);
    for round in 0..rounds {
        for q in 0..n {
            post(slot_ring(q));
            let off = q % SLOT_VECTORS;
            expect(off % cpus, SLOT_VECTOR + off as u8, 1);
        }
        set(sd::reg::QUEUE_NOTIFY, sd::NOTIFY_ALL);
        let target = before + (n as u32) * (round + 1);
        ok &= wait_for("slot completions", || slot_vector_total(cpus) >= target);
    }
    let counted = slot_vector_total(cpus) - before;
    let completions = reg(sd::reg::COMPLETIONS);
    check(
        &mut ok,
        "completions counted",
        u64::from(counted),
        u64::from(completions),
    );
    check(
        &mut ok,
        "completions on the wrong CPU",
        u64::from(WRONG_CPU.load(Ordering::Relaxed)),
        0,
    );
    println!(
        "ims-slots: {} slots over {} vCPUs, {} rounds: {} completions, {} counted by the handlers",
        n, cpus, rounds, completions, counted
    );

    ok &= slot_format_and_mask(bar, slot_at(slots, n, n - 1), n - 1, cpus);
    ok &= retarget_under_load(hc, bar, rid, first, n, cpus, &apic);
    if let Some(other) = other {
        ok &= foreign_entry(hc, bar, slot_at(slots, n, 0), other, cpus, &apic);
    }
    ACTIVE.store(0, Ordering::Release);
    hc.call("free slot entries", call::FREE, rid, first, n as u64);
    ok
}

/// Register offset of the slot queue `q` uses: the driver takes the last `n` of the
/// device's `slots`, so the top of the array is exercised.
fn slot_at(slots: usize, n: usize, q: usize) -> u64 {
    sd::reg::SLOT_BASE + sd::reg::SLOT_SIZE * (slots - n + q) as u64
}

/// A compatibility-format message is refused with a device error and the slot keeps its
/// message; a masked slot latches its interrupt and delivers it on unmask.
fn slot_format_and_mask(bar: u64, at: u64, q: usize, cpus: usize) -> bool {
    let mut ok = true;
    let message = mmio_read(bar + at);
    mmio_write(bar + at, 0xfee0_0000);
    check(
        &mut ok,
        "STATUS after a compatibility message",
        u64::from(mmio_read(bar + sd::reg::STATUS)),
        u64::from(sd::STATUS_FORMAT_ERROR),
    );
    let slot = (at - sd::reg::SLOT_BASE) / sd::reg::SLOT_SIZE;
    check(
        &mut ok,
        "ERROR_SLOT",
        u64::from(mmio_read(bar + sd::reg::ERROR_SLOT)),
        slot,
    );
    check(
        &mut ok,
        "the refused slot's message",
        u64::from(mmio_read(bar + at)),
        u64::from(message),
    );
    mmio_write(bar + sd::reg::STATUS, sd::STATUS_FORMAT_ERROR);

    let off = q % SLOT_VECTORS;
    let (cpu, vector) = (off % cpus, SLOT_VECTOR + off as u8);
    let before = count(cpu, vector);
    let used = used_idx(slot_ring(q));
    mmio_write(bar + at + 12, sd::SLOT_MASK);
    post(slot_ring(q));
    expect(cpu, vector, 1);
    mmio_write(bar + sd::reg::QUEUE_NOTIFY, q as u32);
    ok &= wait_for("the masked slot's completion", || {
        used_idx(slot_ring(q)) != used
    });
    check(
        &mut ok,
        "masked slot control",
        u64::from(mmio_read(bar + at + 12)),
        u64::from(sd::SLOT_MASK | sd::SLOT_PENDING),
    );
    check(
        &mut ok,
        "interrupts while masked",
        u64::from(count(cpu, vector) - before),
        0,
    );
    mmio_write(bar + at + 12, 0);
    ok &= wait_for("the unmasked slot's interrupt", || {
        count(cpu, vector) > before
    });
    check(
        &mut ok,
        "slot control after unmask",
        u64::from(mmio_read(bar + at + 12)),
        0,
    );
    println!("ims-slots: a compatibility-format message was refused (STATUS, ERROR_SLOT {}); a masked slot latched and fired on unmask", slot);
    ok
}

/// Entries move between CPUs while the device completes work at a steady pace; every
/// completion must be counted.
fn retarget_under_load(
    hc: &mut Hc,
    bar: u64,
    rid: u16,
    first: u64,
    n: usize,
    cpus: usize,
    apic: &impl Fn(usize) -> u32,
) -> bool {
    let mut ok = true;
    let queues = RETARGET_QUEUES.min(n);
    for q in 0..queues {
        let word = target::fixed(apic(0), RETARGET_VECTOR);
        // SAFETY: as in `slot_device`.
        unsafe { write_volatile(addr_of_mut!(BATCH.0[q]), [first + q as u64, word]) };
    }
    let batch = addr_of!(BATCH) as u64;
    hc.call(
        "point entries at the retarget vector",
        call::BATCH,
        rid,
        batch,
        queues as u64,
    );
    let total = (queues * RETARGET_ITEMS) as u32;
    let before = vector_total(cpus, RETARGET_VECTOR);
    mmio_write(bar + sd::reg::INJECT_DELAY_US, RETARGET_DELAY_US);
    for q in 0..queues {
        for _ in 0..RETARGET_ITEMS {
            post(slot_ring(q));
        }
    }
    mmio_write(bar + sd::reg::QUEUE_NOTIFY, sd::NOTIFY_ALL);
    let mut retargets = 0u32;
    let mut spins = 0u32;
    while vector_total(cpus, RETARGET_VECTOR) - before < total && spins < 20_000 {
        let k = retargets as usize;
        let q = k % queues;
        let cpu = (k / queues + q + 1) % cpus;
        let word = target::fixed(apic(cpu), RETARGET_VECTOR);
        hc.call("retarget", call::UPDATE, rid, first + q as u64, word);
        retargets += 1;
        spins += 1;
    }
    ok &= wait_for("retargeted completions", || {
        vector_total(cpus, RETARGET_VECTOR) - before >= total
    });
    mmio_write(bar + sd::reg::INJECT_DELAY_US, 0);
    let counted = vector_total(cpus, RETARGET_VECTOR) - before;
    check(
        &mut ok,
        "completions counted while retargeting",
        u64::from(counted),
        u64::from(total),
    );
    for cpu in 0..cpus {
        expect(cpu, RETARGET_VECTOR, count(cpu, RETARGET_VECTOR));
    }
    crate::serial::with_lock(|out| {
        let _ = write!(
            out,
            "ims-slots: {} completions while {} retargets moved {} entries; counted:",
            total, retargets, queues
        );
        for cpu in 0..cpus {
            let sep = if cpu == 0 { " " } else { ", " };
            let _ = write!(
                out,
                "{}{} on vCPU {}",
                sep,
                count(cpu, RETARGET_VECTOR),
                cpu
            );
        }
        let _ = out.write_str("\n");
    });
    ok
}

/// A slot holding another device's entry: the interrupt is refused and recorded as a
/// remapping fault, never delivered.
fn foreign_entry(
    hc: &mut Hc,
    bar: u64,
    at: u64,
    other: u8,
    cpus: usize,
    apic: &impl Fn(usize) -> u32,
) -> bool {
    let mut ok = true;
    let other_rid = pci::requester_id(other);
    let idx = hc
        .call(
            "allocate for the other device",
            call::ALLOCATE,
            other_rid,
            1,
            0,
        )
        .rsi;
    hc.call(
        "activate the other device's entry",
        call::UPDATE,
        other_rid,
        idx,
        target::fixed(apic(0), FOREIGN_VECTOR),
    );
    let faults = mmio_read(bar + sd::reg::FAULTS);
    let completions = mmio_read(bar + sd::reg::COMPLETIONS);
    let (active, slot0) = (ACTIVE.load(Ordering::Acquire), mmio_read(bar + at));
    ACTIVE.store(0, Ordering::Release);
    mmio_write(bar + at, compose(idx));
    post(slot_ring(0));
    mmio_write(bar + sd::reg::QUEUE_NOTIFY, 0);
    ok &= wait_for("the foreign completion", || {
        mmio_read(bar + sd::reg::COMPLETIONS) != completions
    });
    check(
        &mut ok,
        "faults after the foreign slot fired",
        u64::from(mmio_read(bar + sd::reg::FAULTS)),
        u64::from(faults) + 1,
    );
    check(
        &mut ok,
        "foreign deliveries",
        u64::from(vector_total(cpus, FOREIGN_VECTOR)),
        0,
    );
    // That completion was never signalled: count it as seen, and put the slot back.
    SLOT_SEEN[0].store(used_idx(slot_ring(0)), Ordering::Release);
    mmio_write(bar + at, slot0);
    ACTIVE.store(active, Ordering::Release);
    hc.call(
        "free the other device's entry",
        call::FREE,
        other_rid,
        idx,
        1,
    );
    println!(
        "ims-slots: a slot holding another device's entry was refused ({} remapping fault)",
        mmio_read(bar + sd::reg::FAULTS) - faults
    );
    ok
}
