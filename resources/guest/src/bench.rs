//! The `bench` scenario: the guest side of `vmm bench`.
//!
//! The guest programs `window` IRTEs through the hypercall for the slot-array IMS device
//! (entry `k` delivers `VECTOR + k` to vCPU 0) and puts their messages in the device's
//! first `window` slots, unmasked. Then it asks the host harness to time interrupts
//! through those slots beside raw irqfds to the same vectors (`BENCH_DELIVERY`,
//! `BENCH_THROUGHPUT`), and to make as many remapped interrupts live at once as it can
//! deliver (`REMAP_EACH_CPU` with `bench_live` entries, halved until one succeeds).
//! Finally it retargets entries with the `UPDATE` hypercall, and with one-entry `BATCH`
//! calls, while 1, 512, 4,096 and 65,536 (up to `bench_retarget_max`) are live, and makes
//! the same loop's exits to the null port (the floor under them), with the host recording
//! each exit's time to re-entry and to the next exit (`BENCH_HYPERCALLS`). The host keeps the timings; the guest checks
//! that every interrupt arrived, on vCPU 0, once, and that every call succeeded.

use core::ptr::{addr_of, addr_of_mut, write_volatile};

use hypercall::abi::{call, status, target};
use hypercall::harness::{offset, request, status as host_status, BENCH_RUNS, MAX_BENCH_WINDOW};
use hypercall::ims::slots as sd;
use hypercall::platform;

use crate::pci::{self, mmio_read, mmio_write};
use crate::scenario::{expect, harness_request, harness_start};
use crate::{arch, count, mailbox_cell, println};

/// First vector of the timed interrupts (vCPU 0).
const VECTOR: u8 = 0x40;
/// First vector of the live-interrupt run; it spreads over `REMAP_VECTORS` from here.
const REMAP_VECTOR: u8 = 0x80;
const REMAP_VECTORS: u32 = 64;
/// First vector of the retargeted entries (never raised); they spread over 32.
const RETARGET_VECTOR: u8 = 0xc0;
const RETARGET_VECTORS: u32 = 32;
/// Live-interrupt counts the retarget hypercall is timed at.
const RETARGET_SIZES: [u32; 4] = [1, 512, 4096, 65_536];
/// Rounds the timed calls are made in (each kind once a round), at most: fewer when
/// there are fewer samples.
const TIMED_ROUNDS: u32 = 20;
/// Entries per BATCH call.
const BATCH_ENTRIES: usize = 4096;

#[repr(C, align(16))]
struct Batch([[u64; 2]; BATCH_ENTRIES]);

static mut BATCH: Batch = Batch([[0; 2]; BATCH_ENTRIES]);

/// What to ask the host for.
pub struct Options {
    /// Delivery-latency samples (each one interrupt per path).
    pub samples: u32,
    /// Interrupts per throughput run.
    pub interrupts: u32,
    /// Vectors in flight in a throughput run.
    pub window: u32,
    /// Remapped interrupts to make live at once.
    pub live: u32,
    /// The largest live count the retarget hypercall is timed at.
    pub retarget_max: u32,
}

fn fired(cpu: usize) -> u32 {
    mailbox_cell(offset::FIRED + 4 * cpu).load(core::sync::atomic::Ordering::Acquire)
}

/// Sends a `BENCH_*` request and waits for it in `hlt` (the host raises `vector` at vCPU
/// 0 when done; that interrupt is expected here); returns the host's status.
fn bench_request(code: u32, vector: u8, count: u32) -> u32 {
    use core::sync::atomic::Ordering::Acquire;
    let seq = harness_start(code, vector, count, 0);
    arch::halt_until(|| mailbox_cell(offset::DONE_SEQ).load(Acquire) == seq);
    expect(0, vector, 1);
    mailbox_cell(offset::STATUS).load(Acquire)
}

fn set_device_args(sid: u16, window: u32) {
    use core::sync::atomic::Ordering::Relaxed;
    mailbox_cell(offset::ARG_SID).store(u32::from(sid), Relaxed);
    mailbox_cell(offset::ARG_WINDOW).store(window, Relaxed);
}

/// Runs the scenario; `apic` maps vCPU index to APIC ID.
pub fn run(cpus: usize, apic: impl Fn(usize) -> u32, o: &Options) -> bool {
    let apic0 = apic(0);
    let Some(iface) = crate::hc::discover() else {
        println!("bench: FAIL: no hypercall interface");
        return false;
    };
    let mut hc = crate::hc::Guest::new(iface.port);
    let Some(dev) = pci::find(sd::VENDOR_ID, sd::DEVICE_ID) else {
        println!("bench: FAIL: no slot-array IMS device (1b36:1100)");
        return false;
    };
    let bar = pci::bar0(dev);
    let rid = pci::requester_id(dev);
    let window = o
        .window
        .min(mmio_read(bar + sd::reg::SLOTS))
        .clamp(1, MAX_BENCH_WINDOW);
    let sid = u64::from(rid);

    let r = hc.call(call::ALLOCATE, sid, u64::from(window), 0);
    if r.rax != status::OK {
        println!("bench: FAIL: allocate {} entries: status {}", window, r.rax);
        return false;
    }
    let first = r.rsi;
    let mut ok = true;
    for k in 0..window {
        let word = target::fixed(apic0, VECTOR + k as u8);
        let r = hc.call(call::UPDATE, sid, first + u64::from(k), word);
        if r.rax != status::OK {
            println!("bench: FAIL: program entry {}: status {}", k, r.rax);
            ok = false;
        }
        let at = bar + sd::reg::SLOT_BASE + sd::reg::SLOT_SIZE * u64::from(k);
        mmio_write(at, crate::ims::compose(first + u64::from(k)));
        mmio_write(at + 4, 0);
        mmio_write(at + 8, 0);
        mmio_write(at + 12, 0);
    }
    set_device_args(rid, window);

    // Delivery latency: two interrupts per sample on VECTOR.
    let host = bench_request(request::BENCH_DELIVERY, VECTOR, o.samples);
    expect(0, VECTOR, 2 * o.samples);
    if host == host_status::OK && fired(0) == 2 * o.samples {
        println!(
            "bench: delivery: {} samples through an IMS slot and through a raw irqfd, all counted",
            o.samples
        );
    } else {
        println!(
            "bench: FAIL: delivery: host status {}, {} fired",
            host,
            fired(0)
        );
        ok = false;
    }

    // The same through a slot-array device in another process, if there is one (`vmm
    // bench` serves one): its interrupt is its entry's eventfd, written by that process.
    if let Some(other) = pci::find_after(sd::VENDOR_ID, sd::DEVICE_ID, dev) {
        ok &= remote_delivery(&mut hc, other, apic0, o.samples);
        set_device_args(rid, window);
    }

    // Throughput: interrupt i of a run goes to VECTOR + i % window.
    let host = bench_request(request::BENCH_THROUGHPUT, VECTOR, o.interrupts);
    let runs = 2 * BENCH_RUNS;
    for k in 0..window {
        let per_run = (o.interrupts + window - 1 - k) / window;
        expect(0, VECTOR + k as u8, runs * per_run);
    }
    if host == host_status::OK && fired(0) == runs * o.interrupts {
        println!(
            "bench: throughput: {} runs of {} interrupts over {} vectors, all counted",
            runs, o.interrupts, window
        );
    } else {
        println!(
            "bench: FAIL: throughput: host status {}, {} fired",
            host,
            fired(0)
        );
        ok = false;
    }
    for k in 0..window {
        mmio_write(
            bar + sd::reg::SLOT_BASE + sd::reg::SLOT_SIZE * u64::from(k) + 12,
            1,
        );
    }
    hc.call(call::FREE, sid, first, u64::from(window));

    ok &= live(cpus, o.live);
    for size in RETARGET_SIZES.into_iter().filter(|&n| n <= o.retarget_max) {
        ok &= retarget(&mut hc, sid, size, o.samples, |k| {
            let cpu = k as usize % cpus;
            let v = RETARGET_VECTOR + ((k / cpus as u32) % RETARGET_VECTORS) as u8;
            target::fixed(apic(cpu), v)
        });
    }
    ok
}

/// Delivery latency through slot 0 of the slot-array device `dev` in another process,
/// with one entry delivering `VECTOR` to vCPU 0.
fn remote_delivery(hc: &mut crate::hc::Guest, dev: u8, apic0: u32, samples: u32) -> bool {
    let bar = pci::bar0(dev);
    let rid = pci::requester_id(dev);
    let sid = u64::from(rid);
    let r = hc.call(call::ALLOCATE, sid, 1, 0);
    if r.rax != status::OK {
        println!(
            "bench: FAIL: allocate the remote device's entry: status {}",
            r.rax
        );
        return false;
    }
    let entry = r.rsi;
    let r = hc.call(call::UPDATE, sid, entry, target::fixed(apic0, VECTOR));
    if r.rax != status::OK {
        println!(
            "bench: FAIL: program the remote device's entry: status {}",
            r.rax
        );
        return false;
    }
    let at = bar + sd::reg::SLOT_BASE;
    mmio_write(at, crate::ims::compose(entry));
    mmio_write(at + 4, 0);
    mmio_write(at + 8, 0);
    mmio_write(at + 12, 0);
    set_device_args(rid, 1);
    let host = bench_request(request::BENCH_DELIVERY, VECTOR, samples);
    expect(0, VECTOR, 2 * samples);
    let ok = host == host_status::OK && fired(0) == 2 * samples;
    if ok {
        println!(
            "bench: delivery: {} samples through a slot of a device in another process and through a raw irqfd, all counted",
            samples
        );
    } else {
        println!(
            "bench: FAIL: remote delivery: host status {}, {} fired",
            host,
            fired(0)
        );
    }
    mmio_write(at + 12, 1);
    hc.call(call::FREE, sid, entry, 1);
    ok
}

/// What a timed loop calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Timed {
    /// `UPDATE` of entry `k` to the target of another entry (a target with a route).
    Update,
    /// The same change through `BATCH` with one entry.
    BatchOfOne,
    /// The same registers as `Update`, written to the exit floor's port, which the host
    /// answers with nothing (RAX comes back as it went).
    Null,
}

impl Timed {
    /// The harness mode that keeps this loop's timings, and its name.
    fn mode(self) -> (u32, &'static str) {
        match self {
            Self::Update => (0, "retargets"),
            Self::BatchOfOne => (2, "one-entry batches"),
            Self::Null => (3, "null exits"),
        }
    }
}

/// Makes `live` entries live, spread by `spread`, and times `samples` calls of each
/// [`Timed`] kind with them, the host recording each exit.
fn retarget(
    hc: &mut crate::hc::Guest,
    sid: u64,
    live: u32,
    samples: u32,
    spread: impl Fn(u32) -> u64,
) -> bool {
    let r = hc.call(call::ALLOCATE, sid, u64::from(live), 0);
    if r.rax != status::OK {
        println!("bench: FAIL: allocate {} entries: status {}", live, r.rax);
        return false;
    }
    let first = r.rsi;
    let mut ok = true;
    let mut done = 0;
    while done < live {
        let n = (live - done).min(BATCH_ENTRIES as u32);
        for i in 0..n {
            let k = done + i;
            // SAFETY: only the BSP runs this; the host reads the array only during the
            // BATCH call below.
            unsafe {
                write_volatile(
                    addr_of_mut!(BATCH.0[i as usize]),
                    [first + u64::from(k), spread(k)],
                );
            }
        }
        let batch = addr_of!(BATCH) as u64;
        let r = hc.call(call::BATCH, sid, batch, u64::from(n));
        if r.rax != status::OK {
            println!("bench: FAIL: activate {} entries: status {}", live, r.rax);
            ok = false;
            break;
        }
        done += n;
    }
    // In rounds, each kind in turn, so that the floor and the calls beside it see the
    // same machine (a busy spell on the other core lands on all three).
    let rounds = samples.clamp(1, TIMED_ROUNDS);
    let per = samples.div_ceil(rounds);
    for round in 0..rounds {
        for what in [Timed::Null, Timed::Update, Timed::BatchOfOne] {
            if ok {
                let from = u64::from(round * per);
                ok = timed_calls(hc, sid, (first, live), (from, per), &spread, what);
            }
        }
    }
    if ok {
        for what in [Timed::Null, Timed::Update, Timed::BatchOfOne] {
            println!(
                "bench: {} {} timed with {} live interrupts",
                per * rounds,
                what.mode().1,
                live
            );
        }
    }
    hc.call(call::FREE, sid, first, u64::from(live));
    ok
}

/// `samples` calls of kind `what`, made by the same guest code whatever the kind (so
/// that the null exits time the floor under the calls): each loop computes the move,
/// writes it to the batch array, and rings the doorbell (or the null port) with the same
/// registers but for `BATCH`'s two.
fn timed_calls(
    hc: &mut crate::hc::Guest,
    sid: u64,
    (first, live): (u64, u32),
    (from, samples): (u64, u32),
    spread: &impl Fn(u32) -> u64,
    what: Timed,
) -> bool {
    let mut null = crate::hc::Guest::new(platform::NULL_PORT);
    // The batch loop follows the update loop over the same entries: its moves are one
    // target further, so that each is a move too.
    let (caller, number, expected, offset) = match what {
        Timed::Update => (&mut *hc, call::UPDATE, status::OK, 1),
        Timed::BatchOfOne => (&mut *hc, call::BATCH, status::OK, 2),
        Timed::Null => (&mut null, call::UPDATE, u64::from(call::UPDATE), 1),
    };
    let by_batch = what == Timed::BatchOfOne;
    let batch = addr_of!(BATCH) as u64;
    let (mode, name) = what.mode();
    let (host, _) = harness_request(request::BENCH_HYPERCALLS, 0, 0, 1);
    let mut ok = host == host_status::OK;
    let moves = u64::from(live.max(2));
    for s in from..from + u64::from(samples) {
        let k = (s * 7919) % u64::from(live);
        let to = spread(((k + offset + s) % moves) as u32);
        // SAFETY: only the BSP runs this; the host reads the array only during a BATCH
        // call, which this CPU makes synchronously.
        unsafe { write_volatile(addr_of_mut!(BATCH.0[0]), [first + k, to]) };
        let (a, b) = if by_batch {
            (batch, 1)
        } else {
            (first + k, to)
        };
        let r = caller.call(number, sid, a, b);
        if r.rax != expected {
            println!("bench: FAIL: {} at {} live: status {}", name, live, r.rax);
            ok = false;
            break;
        }
    }
    let (host, kept) = harness_request(request::BENCH_HYPERCALLS, 0, live, mode);
    ok &= host == host_status::OK && (kept == samples || !ok);
    if !ok {
        println!(
            "bench: FAIL: {} at {} live (host status {}, {} timed)",
            name, live, host, kept
        );
    }
    ok
}

/// As many remapped interrupts live at once as the host can deliver, from `want` down by
/// halves. The counters of the spread's vectors are accepted as counted: a failed attempt
/// delivers an unknown part of its entries, and the host's status already says whether
/// every entry of an attempt was counted on its vCPU.
fn live(cpus: usize, want: u32) -> bool {
    let mut n = want;
    let mut delivered = 0;
    while n > 0 {
        let (host, commits) =
            harness_request(request::REMAP_EACH_CPU, REMAP_VECTOR, n, REMAP_VECTORS);
        if host == host_status::OK {
            println!(
                "bench: {} remapped interrupts live at once ({} route commits), each delivered once",
                n, commits
            );
            delivered = n;
            break;
        }
        println!(
            "bench: {} live interrupts not all delivered (host status {}); trying {}",
            n,
            host,
            n / 2
        );
        n /= 2;
    }
    for cpu in 0..cpus {
        for k in 0..REMAP_VECTORS {
            let v = REMAP_VECTOR + k as u8;
            expect(cpu, v, count(cpu, v));
        }
    }
    if delivered < want {
        println!(
            "bench: only {} of the {} live interrupts asked for were delivered",
            delivered, want
        );
    }
    want == 0 || delivered > 0
}
