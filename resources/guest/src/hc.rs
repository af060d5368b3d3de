//! The `hypercall` scenario: the IRTE hypercall driven through its documented ABI only
//! (`hypercall::abi`), as a guest kernel would.

use hypercall::abi::{alloc, batch, call, invoke, status, target, Registers};
use hypercall::cpuid::{signature_registers, KVM_BASE};
use hypercall::harness::{request, FOREIGN_SOURCE_ID, HARNESS_SOURCE_ID};

use crate::arch::cpuid;
use crate::println;
use crate::scenario::{expect, harness_request};

/// Vectors used here.
const VECTOR: u8 = 0x70;
const BATCH_VECTOR: u8 = 0x71;
const EXHAUST_VECTOR: u8 = 0x90;
const MANAGED_VECTOR: u8 = 0xf0;
const ME: u64 = HARNESS_SOURCE_ID as u64;
const OTHER: u64 = FOREIGN_SOURCE_ID as u64;

#[repr(C, align(16))]
struct BatchArray([[u64; 2]; 16]);

static mut BATCH: BatchArray = BatchArray([[0; 2]; 16]);

fn batch_base() -> u64 {
    core::ptr::addr_of!(BATCH) as u64
}

fn set_batch(i: usize, index: u64, word: u64) {
    // SAFETY: only the BSP runs this scenario, and the host touches the array only
    // during a BATCH call, which this CPU is executing synchronously.
    unsafe {
        let b = &mut *core::ptr::addr_of_mut!(BATCH);
        b.0[i] = [index, word];
    }
}

fn batch_status(i: usize) -> u64 {
    // SAFETY: as in `set_batch`; the host wrote the status during the call.
    let entry = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(BATCH.0[i])) };
    entry[0] >> 32
}

/// What CPUID says about the interface.
pub struct Interface {
    version: u32,
    pub features: u32,
    pub port: u16,
    table: u32,
}

pub fn discover() -> Option<Interface> {
    let signature = signature_registers();
    (0..16u32).map(|k| KVM_BASE + 0x100 * k).find_map(|leaf| {
        let (max, b, c, d) = cpuid(leaf);
        if [b, c, d] != signature || max < leaf + 1 {
            return None;
        }
        let (version, features, port, table) = cpuid(leaf + 1);
        Some(Interface {
            version,
            features,
            port: port as u16,
            table,
        })
    })
}

pub struct Guest {
    port: u16,
    ok: bool,
    retries: u64,
}

impl Guest {
    /// A caller of the doorbell at `port`.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            ok: true,
            retries: 0,
        }
    }

    /// One call, without retrying.
    fn call_once(&self, number: u32, requester: u64, a: u64, b: u64) -> Registers {
        let mut regs = Registers {
            rax: u64::from(number),
            rcx: requester,
            rsi: a,
            rdi: b,
            r8: 0,
            r9: 0,
        };
        // SAFETY: the doorbell of this VMM, found through CPUID; the batch array is the
        // only memory passed, and it is ours.
        unsafe { invoke(self.port, &mut regs) };
        regs
    }

    /// One call, tried again while the host answers BUSY (as a driver should).
    pub fn call(&mut self, number: u32, requester: u64, a: u64, b: u64) -> Registers {
        loop {
            let regs = self.call_once(number, requester, a, b);
            if regs.rax != status::BUSY {
                return regs;
            }
            self.retries += 1;
            for _ in 0..1000 {
                core::hint::spin_loop();
            }
        }
    }

    fn check(&mut self, what: &str, got: u64, want: u64) {
        if got != want {
            println!(
                "hypercall: FAIL: {}: status {} (expected {})",
                what, got, want
            );
            self.ok = false;
        }
    }

    /// Raises entry `index` `count` times through the harness; returns how many arrived.
    fn raise(&mut self, index: u64, count: u32) -> u32 {
        let (host, delivered) = harness_request(request::RAISE, 0, count, index as u32);
        self.check("raise", u64::from(host), 0);
        delivered
    }
}

/// Runs the scenario; `apic` maps vCPU index to APIC ID.
pub fn run(cpus: usize, apic: impl Fn(usize) -> u32, mem_size: u64, hammer: u32) -> bool {
    let Some(iface) = discover() else {
        println!("hypercall: FAIL: no interface signature in the CPUID hypervisor leaves");
        return false;
    };
    println!(
        "hypercall: ABI v{} at port {:#x}, features {:#x}, {} entries",
        iface.version, iface.port, iface.features, iface.table
    );
    let mut g = Guest {
        port: iface.port,
        ok: iface.version == 1 && iface.port != 0,
        retries: 0,
    };
    let last = cpus - 1;

    // Allocate, activate on vCPU 0, raise, retarget, raise, deactivate, free.
    let r = g.call(call::ALLOCATE, ME, 1, 0);
    g.check("allocate", r.rax, status::OK);
    let idx = r.rsi;
    let r = g.call(call::UPDATE, ME, idx, target::fixed(apic(0), VECTOR));
    g.check("activate on vCPU 0", r.rax, status::OK);
    let got = g.raise(idx, 5);
    expect(0, VECTOR, 5);
    let r = g.call(call::UPDATE, ME, idx, target::fixed(apic(last), VECTOR));
    g.check("retarget", r.rax, status::OK);
    let moved = g.raise(idx, 5);
    expect(last, VECTOR, 5);
    let r = g.call(call::UPDATE, ME, idx, 0);
    g.check("deactivate", r.rax, status::OK);
    let after = g.raise(idx, 3);
    if (got, moved, after) != (5, 5, 0) {
        println!(
            "hypercall: FAIL: delivered {} / {} / {} (expected 5 / 5 / 0)",
            got, moved, after
        );
        g.ok = false;
    }
    let r = g.call(call::COMPOSE, ME, idx, 0);
    g.check("compose", r.rax, status::OK);
    if r.rsi & 0x10 == 0 || (r.rsi >> 5) & 0x7fff != idx & 0x7fff || r.rdi != 0 {
        println!(
            "hypercall: FAIL: composed {:#x}/{:#x} for entry {}",
            r.rsi, r.rdi, idx
        );
        g.ok = false;
    }
    let r = g.call(call::FREE, ME, idx, 1);
    g.check("free", r.rax, status::OK);
    let r = g.call(call::UPDATE, ME, idx, target::fixed(apic(0), VECTOR));
    g.check("update after free", r.rax, status::NOT_ALLOCATED);
    println!("hypercall: allocate, activate, retarget, deactivate, compose, free: done");

    // A batch of 16 in one call, then a batch with one bad entry: nothing applied.
    let r = g.call(call::ALLOCATE, ME, 16, alloc::ALIGNED);
    g.check("allocate 16", r.rax, status::OK);
    let first = r.rsi;
    for i in 0..16 {
        set_batch(
            i,
            first + i as u64,
            target::fixed(apic(i % cpus), BATCH_VECTOR),
        );
    }
    let r = g.call(call::BATCH, ME, batch_base(), 16);
    g.check("batch", r.rax, status::OK);
    if r.rsi != 16 || (0..16).any(|i| batch_status(i) != status::OK) {
        println!("hypercall: FAIL: batch applied {}", r.rsi);
        g.ok = false;
    }
    for i in 0..cpus.min(16) {
        if g.raise(first + i as u64, 1) != 1 {
            g.ok = false;
        }
        expect(i % cpus, BATCH_VECTOR, 1);
    }
    for i in 0..4 {
        set_batch(i, first + i as u64, 0);
    }
    set_batch(2, first + 2, target::fixed(apic(0), 15));
    let r = g.call(call::BATCH, ME, batch_base(), 4);
    g.check("batch with a bad entry", r.rax, status::INVALID_ARGUMENT);
    let statuses = [0, 1, 2, 3].map(batch_status);
    let na = status::NOT_APPLIED;
    if statuses != [na, na, status::INVALID_ARGUMENT, na] || r.rsi != 0 {
        println!("hypercall: FAIL: batch statuses {:?}", statuses);
        g.ok = false;
    }
    if g.raise(first, 1) != 1 {
        println!("hypercall: FAIL: a failed batch changed an entry");
        g.ok = false;
    }
    expect(0, BATCH_VECTOR, 1);
    let r = g.call(call::FREE, ME, first, 16);
    g.check("free 16", r.rax, status::OK);
    println!(
        "hypercall: batch of 16 applied in one call; a batch with a bad entry applied nothing"
    );

    // Every kind of bad input gets its documented error, and nothing breaks.
    let idx = g.call(call::ALLOCATE, ME, 1, 0).rsi;
    let good = target::fixed(apic(0), VECTOR);
    // One call per line (an array of cases would be zeroed with SSE instructions the
    // nested KVM's emulator cannot run).
    let mut bad = |what, number, requester, a, b, want| {
        let r = g.call(number, requester, a, b);
        g.check(what, r.rax, want);
    };
    bad(
        "index beyond the table",
        call::UPDATE,
        ME,
        70_000,
        good,
        status::INVALID_ARGUMENT,
    );
    bad(
        "vector below 16",
        call::UPDATE,
        ME,
        idx,
        target::fixed(apic(0), 15),
        status::INVALID_ARGUMENT,
    );
    bad(
        "APIC ID with no vCPU",
        call::UPDATE,
        ME,
        idx,
        target::fixed(250, VECTOR),
        status::INVALID_ARGUMENT,
    );
    bad(
        "reserved bits",
        call::UPDATE,
        ME,
        idx,
        good | (1 << 14),
        status::INVALID_ARGUMENT,
    );
    bad(
        "SMI delivery",
        call::UPDATE,
        ME,
        idx,
        good | (2 << 8),
        status::UNSUPPORTED,
    );
    bad(
        "another device's entry",
        call::UPDATE,
        OTHER,
        idx,
        good,
        status::SOURCE_ID_NOT_PERMITTED,
    );
    bad(
        "not a device",
        call::ALLOCATE,
        0x1234,
        1,
        0,
        status::SOURCE_ID_NOT_PERMITTED,
    );
    bad(
        "batch outside RAM",
        call::BATCH,
        ME,
        mem_size + 0x1000,
        1,
        status::BAD_GUEST_ADDRESS,
    );
    bad(
        "batch unaligned",
        call::BATCH,
        ME,
        batch_base() + 8,
        1,
        status::BAD_GUEST_ADDRESS,
    );
    bad(
        "batch of 2^30",
        call::BATCH,
        ME,
        batch_base(),
        1 << 30,
        status::INVALID_ARGUMENT,
    );
    bad(
        "batch of 0",
        call::BATCH,
        ME,
        batch_base(),
        0,
        status::INVALID_ARGUMENT,
    );
    bad(
        "allocate 0",
        call::ALLOCATE,
        ME,
        0,
        0,
        status::INVALID_ARGUMENT,
    );
    bad(
        "allocate 2^31",
        call::ALLOCATE,
        ME,
        1 << 31,
        0,
        status::INVALID_ARGUMENT,
    );
    bad(
        "reserved allocation flag",
        call::ALLOCATE,
        ME,
        1,
        1 << 7,
        status::INVALID_ARGUMENT,
    );
    bad("unknown call", 99, ME, 0, 0, status::UNSUPPORTED);
    let r = g.call(call::FREE, ME, idx, 1);
    g.check("free", r.rax, status::OK);
    println!("hypercall: 15 bad inputs refused with their documented errors");

    // A managed allocation activates even when best-effort routes are exhausted.
    let r = g.call(call::ALLOCATE, ME, 1, alloc::MANAGED);
    g.check("managed allocate", r.rax, status::OK);
    let managed = r.rsi;
    let left = g.call(call::QUERY, ME, 0, 0).r9;
    if left + 64 < u64::from(0xffu8 - EXHAUST_VECTOR) {
        let block = g.call(call::ALLOCATE, ME, left + 64, 0).rsi;
        let mut live = 0u64;
        let mut last_status = status::OK;
        while live < left + 64 {
            let word = target::fixed(apic(0), EXHAUST_VECTOR + live as u8);
            last_status = g.call(call::UPDATE, ME, block + live, word).rax;
            if last_status != status::OK {
                break;
            }
            live += 1;
        }
        g.check("best-effort exhaustion", last_status, status::NO_SPACE);
        if g.raise(block, 1) != 1 {
            println!("hypercall: FAIL: an earlier entry stopped delivering at exhaustion");
            g.ok = false;
        }
        expect(0, EXHAUST_VECTOR, 1);
        let r = g.call(
            call::UPDATE,
            ME,
            managed,
            target::fixed(apic(last), MANAGED_VECTOR),
        );
        g.check("managed activation at exhaustion", r.rax, status::OK);
        if g.raise(managed, 1) != 1 {
            g.ok = false;
        }
        expect(last, MANAGED_VECTOR, 1);
        let r = g.call(call::FREE, ME, block, left + 64);
        g.check("free block", r.rax, status::OK);
        println!(
            "hypercall: {} best-effort targets until NO_SPACE; earlier ones still deliver; the managed entry activated",
            live
        );
    } else {
        println!(
            "hypercall: {} best-effort routes: exhaustion part skipped (run with --max-routes 16)",
            left
        );
    }
    let r = g.call(call::FREE, ME, managed, 1);
    g.check("free managed", r.rax, status::OK);

    // A guest hammering the port is throttled with BUSY and recovers.
    if hammer > 0 {
        let busy = (0..hammer)
            .filter(|_| g.call_once(call::QUERY, ME, 0, 0).rax == status::BUSY)
            .count();
        let mut tries = 0u32;
        while g.call_once(call::QUERY, ME, 0, 0).rax != status::OK && tries < 1_000_000 {
            tries += 1;
        }
        println!(
            "hypercall: {} of {} hammering calls answered BUSY; then served again",
            busy, hammer
        );
        if busy == 0 || tries == 1_000_000 {
            g.ok = false;
        }
    }
    let _ = batch::MAX_ENTRIES;
    if g.ok {
        println!("hypercall: PASS ({} calls retried after BUSY)", g.retries);
    }
    g.ok
}
