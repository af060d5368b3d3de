//! The `snapshot` scenario: both IMS devices at work across a snapshot.

use super::queues::{queue_counted, setup_queues};
use super::*;

/// Slot-device queues and items each in the `snapshot` scenario, and the pacing.
const SNAP_QUEUES: u32 = 64;
const SNAP_SLOT_ITEMS: usize = 4;
const SNAP_SLOT_DELAY_US: u32 = 3000;
/// Queue-device items per context, and their pacing.
const SNAP_QUEUE_ITEMS: usize = 6;
const SNAP_QUEUE_DELAY_US: u32 = 20_000;
/// Slot completions counted before the snapshot is asked for.
const SNAP_AFTER: u32 = 32;

/// The `snapshot` scenario: both IMS devices complete paced work; part-way the guest asks
/// the host for a snapshot of the VM (harness `SNAPSHOT`), then waits for the rest. Run
/// with `--snapshot FILE`, the VM stops there and a restored VM finishes the work: every
/// completion counted by the handlers once, and each device's COMPLETIONS register equal
/// to the work posted (nothing lost, nothing doubled across the snapshot).
pub fn snapshot(cpus: usize, apic: impl Fn(usize) -> u32) -> bool {
    let Some(iface) = crate::hc::discover() else {
        println!("snapshot: FAIL: no hypercall interface");
        return false;
    };
    let (Some(slot_dev), Some(queue_dev)) = (
        pci::find(sd::VENDOR_ID, sd::DEVICE_ID),
        pci::find(qd::VENDOR_ID, qd::DEVICE_ID),
    ) else {
        println!("snapshot: FAIL: both IMS devices are needed (the default device list)");
        return false;
    };
    let mut hc = Hc {
        guest: crate::hc::Guest::new(iface.port),
        ok: true,
    };
    CPUS.store(cpus as u32, Ordering::Relaxed);
    let mut ok = true;
    let Some(slots) = setup_slots(&mut hc, slot_dev, cpus, &apic, SNAP_QUEUES, &mut ok) else {
        return false;
    };
    let Some((d, queue_first)) = setup_queues(&mut hc, queue_dev, cpus, &apic, &mut ok) else {
        return false;
    };
    let slot_reg = |off: u64| mmio_read(slots.bar + off);
    let slot_before = (slot_vector_total(cpus), slot_reg(sd::reg::COMPLETIONS));
    let queue_before = (queue_counted(cpus), d.reg(qd::reg::COMPLETIONS));

    // Paced work on both devices.
    mmio_write(slots.bar + sd::reg::INJECT_DELAY_US, SNAP_SLOT_DELAY_US);
    d.set(qd::reg::INJECT_DELAY_US, SNAP_QUEUE_DELAY_US);
    for q in 0..slots.n {
        for _ in 0..SNAP_SLOT_ITEMS {
            post(slot_ring(q));
        }
        let off = q % SLOT_VECTORS;
        expect(off % cpus, SLOT_VECTOR + off as u8, SNAP_SLOT_ITEMS as u32);
    }
    for j in 0..CONTEXTS {
        for _ in 0..SNAP_QUEUE_ITEMS {
            post(queue_ring(j));
        }
        expect(j % cpus, QUEUE_VECTOR + j as u8, SNAP_QUEUE_ITEMS as u32);
    }
    mmio_write(slots.bar + sd::reg::QUEUE_NOTIFY, sd::NOTIFY_ALL);
    for j in 0..CONTEXTS {
        d.set(qd::reg::QUEUE_NOTIFY, j as u32);
    }
    let slot_total = (slots.n * SNAP_SLOT_ITEMS) as u32;
    let queue_total = (CONTEXTS * SNAP_QUEUE_ITEMS) as u32;

    ok &= wait_for("the first slot completions", || {
        slot_vector_total(cpus) - slot_before.0 >= SNAP_AFTER
    });
    let at_slot = slot_vector_total(cpus) - slot_before.0;
    let at_queue = queue_counted(cpus) - queue_before.0;
    let (host, _) =
        crate::scenario::harness_request(hypercall::harness::request::SNAPSHOT, 0, 0, 0);
    if host == hypercall::harness::status::UNAVAILABLE {
        println!("snapshot: FAIL: the VM has no snapshot file (run with --snapshot FILE)");
        ok = false;
    } else {
        check(&mut ok, "SNAPSHOT request status", u64::from(host), 0);
    }
    println!(
        "snapshot: taken with {} of {} slot and {} of {} queue completions counted",
        at_slot, slot_total, at_queue, queue_total
    );
    if at_slot >= slot_total || at_queue >= queue_total {
        println!("snapshot: FAIL: all work was done before the snapshot; nothing was in flight");
        ok = false;
    }

    ok &= wait_for("the slot completions after the snapshot", || {
        slot_vector_total(cpus) - slot_before.0 >= slot_total
    });
    ok &= wait_for("the queue completions after the snapshot", || {
        queue_counted(cpus) - queue_before.0 >= queue_total
    });
    mmio_write(slots.bar + sd::reg::INJECT_DELAY_US, 0);
    d.set(qd::reg::INJECT_DELAY_US, 0);
    let slot_counted = slot_vector_total(cpus) - slot_before.0;
    let slot_done = slot_reg(sd::reg::COMPLETIONS) - slot_before.1;
    let queue_counted_now = queue_counted(cpus) - queue_before.0;
    let queue_done = d.reg(qd::reg::COMPLETIONS) - queue_before.1;
    check(
        &mut ok,
        "slot completions counted",
        u64::from(slot_counted),
        u64::from(slot_total),
    );
    check(
        &mut ok,
        "slot device COMPLETIONS",
        u64::from(slot_done),
        u64::from(slot_total),
    );
    check(
        &mut ok,
        "queue completions counted",
        u64::from(queue_counted_now),
        u64::from(queue_total),
    );
    check(
        &mut ok,
        "queue device COMPLETIONS",
        u64::from(queue_done),
        u64::from(queue_total),
    );
    check(
        &mut ok,
        "completions on the wrong CPU",
        u64::from(WRONG_CPU.load(Ordering::Relaxed)),
        0,
    );
    println!(
        "snapshot: after it, {} slot and {} queue completions, each counted once",
        slot_done, queue_done
    );
    ACTIVE.store(0, Ordering::Release);
    hc.call(
        "free slot entries",
        call::FREE,
        slots.rid,
        slots.first,
        slots.n as u64,
    );
    hc.call(
        "free queue entries",
        call::FREE,
        pci::requester_id(queue_dev),
        queue_first,
        1 + CONTEXTS as u64,
    );
    ok && hc.ok
}
