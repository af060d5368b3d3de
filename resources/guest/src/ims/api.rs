//! The `api` scenario: a guest for the control API's tests (`docs/api.md`). It sets up
//! the slot-array device's queues as `ims` does, runs one round of work, prints what it
//! programmed and counted, then waits, for as long as it takes, for an interrupt only the
//! host can send: slot `go` of the device, raised through the API's `test/raise`. Then it
//! retargets one entry with the hypercall, reporting the status (the driver accepts ABI
//! 1.1's `HOST_ERROR`: an injected routing failure answers it, and the retry succeeds),
//! and runs one more item on it.
//!
//! The lines the tests read:
//!
//! ```text
//! api: ready: requester 24 first 0 count 16 go 16 slot 2031 completions 16
//! api: go received
//! api: retarget: status 0 (OK)
//! ```

use super::*;

/// Queues set up.
const QUEUES: u32 = 16;
/// The vector of the entry the host raises to let the guest go on (CPU 0).
const GO_VECTOR: u8 = 0xea;

/// Runs the scenario.
pub fn api(cpus: usize, apic: impl Fn(usize) -> u32 + Copy) -> bool {
    let Some(iface) = crate::hc::discover() else {
        println!("api: FAIL: no hypercall interface");
        return false;
    };
    let mut hc = Hc {
        guest: crate::hc::Guest::new(iface.port),
        ok: true,
    };
    // An ABI 1.1 driver: a host failure is HOST_ERROR, which it retries.
    let accept = u64::from(hypercall::abi::features::HOST_ERROR);
    CPUS.store(cpus as u32, Ordering::Relaxed);
    let Some(dev) = pci::find(sd::VENDOR_ID, sd::DEVICE_ID) else {
        println!("api: FAIL: no slot-array IMS device (1b36:1100)");
        return false;
    };
    let mut ok = true;
    let r = hc.call(
        "accept HOST_ERROR",
        call::SET_FEATURES,
        pci::requester_id(dev),
        accept,
        0,
    );
    check(&mut ok, "features in force", r.rsi, accept);
    let Some(SlotSetup {
        bar,
        rid,
        first,
        n,
        slots,
    }) = setup_slots(&mut hc, dev, cpus, &apic, QUEUES, &mut ok)
    else {
        return false;
    };
    let set = |off: u64, v: u32| mmio_write(bar + off, v);

    // One round of work on every queue.
    let before = slot_vector_total(cpus);
    for q in 0..n {
        post(slot_ring(q));
        let off = q % SLOT_VECTORS;
        expect(off % cpus, SLOT_VECTOR + off as u8, 1);
    }
    set(sd::reg::QUEUE_NOTIFY, sd::NOTIFY_ALL);
    ok &= wait_for("slot completions", || {
        slot_vector_total(cpus) >= before + n as u32
    });
    let counted = slot_vector_total(cpus) - before;

    // The go entry, on the slot below the queues' slots.
    let go = hc
        .call("allocate the go entry", call::ALLOCATE, rid, 1, 0)
        .rsi;
    hc.call(
        "aim the go entry",
        call::UPDATE,
        rid,
        go,
        target::fixed(apic(0), GO_VECTOR),
    );
    let go_slot = slots - n - 1;
    let at = sd::reg::SLOT_BASE + sd::reg::SLOT_SIZE * go_slot as u64;
    set(at, compose(go));
    set(at + 12, 0);
    expect(0, GO_VECTOR, 1);
    if !(ok && hc.ok) {
        return false;
    }
    println!(
        "api: ready: requester {} first {} count {} go {} slot {} completions {}",
        rid, first, n, go, go_slot, counted
    );
    // Halted between interrupts: a paused or snapshotted VM resumes here.
    arch::halt_until(|| count(0, GO_VECTOR) > 0);
    println!("api: go received");

    // Queue 0's entry moves to the last CPU and a vector of its own: a new KVM route.
    let last = cpus - 1;
    let word = target::fixed(apic(last), RETARGET_VECTOR);
    let mut r = hc.guest.call(call::UPDATE, u64::from(rid), first, word);
    if status::retryable(r.rax) {
        println!(
            "api: retarget: status {} (HOST_ERROR, the host failed; the driver retries)",
            r.rax
        );
        r = hc.guest.call(call::UPDATE, u64::from(rid), first, word);
    }
    let name = if r.rax == status::OK { "OK" } else { "FAIL" };
    println!("api: retarget: status {} ({})", r.rax, name);
    check(&mut ok, "the retarget", r.rax, status::OK);
    let used = used_idx(slot_ring(0));
    post(slot_ring(0));
    expect(last, RETARGET_VECTOR, 1);
    set(sd::reg::QUEUE_NOTIFY, 0);
    ok &= wait_for("the retargeted queue's completion", || {
        used_idx(slot_ring(0)) != used && vector_total(cpus, RETARGET_VECTOR) >= 1
    });

    ACTIVE.store(0, Ordering::Release);
    set(at + 12, sd::SLOT_MASK);
    hc.call("free the go entry", call::FREE, rid, go, 1);
    hc.call("free slot entries", call::FREE, rid, first, n as u64);
    ok && hc.ok
}
