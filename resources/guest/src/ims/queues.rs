//! The queue-memory device's driver (`docs/ims-device.md`, "Queue-memory device"): admin
//! commands, queue contexts in RAM, MSI-X vector 0, and the checks of the `ims` scenario.

use super::*;

/// The queue-memory device's driver state.
pub(super) struct QueueDriver {
    bar: u64,
    tail: u32,
}

impl QueueDriver {
    pub(super) fn reg(&self, off: u64) -> u32 {
        mmio_read(self.bar + off)
    }

    pub(super) fn set(&self, off: u64, v: u32) {
        mmio_write(self.bar + off, v);
    }

    /// Writes a command at the tail and rings the doorbell; returns its entry.
    pub(super) fn submit(&mut self, opcode: u32, context: u32, address: u64) -> *mut Command {
        // SAFETY: an in-bounds element of our admin ring.
        let entry = unsafe { addr_of_mut!(ADMIN[self.tail as usize % ADMIN_SIZE]) };
        // SAFETY: the device reads the entry only after the doorbell below.
        unsafe {
            let w = addr_of_mut!((*entry).0);
            write_volatile(addr_of_mut!((*w)[0]), opcode);
            write_volatile(addr_of_mut!((*w)[1]), context);
            write_volatile(addr_of_mut!((*w)[2]), address as u32);
            write_volatile(addr_of_mut!((*w)[3]), (address >> 32) as u32);
            write_volatile(addr_of_mut!((*w)[4]), qd::command::PENDING);
        }
        self.tail = self.tail.wrapping_add(1);
        compiler_fence(Ordering::Release);
        self.set(qd::reg::ADMIN_TAIL, self.tail);
        entry
    }

    /// Runs a command to completion (status and admin interrupt); returns its status.
    pub(super) fn command(
        &mut self,
        ok: &mut bool,
        opcode: u32,
        context: u32,
        address: u64,
    ) -> u32 {
        let interrupts = count(0, ADMIN_VECTOR);
        let entry = self.submit(opcode, context, address);
        *ok &= wait_for("an admin command", || {
            command_status(entry) != qd::command::PENDING
        });
        *ok &= wait_for("the admin interrupt", || {
            count(0, ADMIN_VECTOR) > interrupts
        });
        expect(0, ADMIN_VECTOR, 1);
        command_status(entry)
    }

    pub(super) fn start_all(&mut self, ok: &mut bool) {
        for j in 0..CONTEXTS {
            let status = self.command(ok, qd::command::START, j as u32, context_address(j));
            check(ok, "START", u64::from(status), u64::from(qd::command::OK));
        }
    }

    /// Enables the admin ring (again, after a reset).
    pub(super) fn enable(&mut self) {
        let ring = addr_of!(ADMIN) as u64;
        self.set(qd::reg::ADMIN_BASE, ring as u32);
        self.set(qd::reg::ADMIN_BASE + 4, (ring >> 32) as u32);
        self.set(qd::reg::ADMIN_SIZE, ADMIN_SIZE as u32);
        self.set(qd::reg::ADMIN_ENABLE, 1);
        self.tail = 0;
    }

    /// Waits for the reset notification and brings the device back.
    /// `stalled`: a command the reset abandoned, which must still read as pending.
    pub(super) fn recover(
        &mut self,
        ok: &mut bool,
        interrupts: u32,
        resets: u32,
        cpus: usize,
        stalled: Option<*const Command>,
    ) {
        *ok &= wait_for("the reset interrupt", || {
            count(0, ADMIN_VECTOR) > interrupts
        });
        expect(0, ADMIN_VECTOR, 1);
        check(
            ok,
            "STATUS after reset",
            u64::from(self.reg(qd::reg::STATUS)),
            u64::from(qd::STATUS_RESET),
        );
        check(
            ok,
            "RESETS",
            u64::from(self.reg(qd::reg::RESETS)),
            u64::from(resets),
        );
        check(
            ok,
            "ADMIN_ENABLE after reset",
            u64::from(self.reg(qd::reg::ADMIN_ENABLE)),
            0,
        );
        if let Some(entry) = stalled {
            check(
                ok,
                "the abandoned command's status",
                u64::from(command_status(entry)),
                u64::from(qd::command::PENDING),
            );
        }
        self.set(qd::reg::STATUS, qd::STATUS_RESET);
        self.enable();
        self.start_all(ok);
        *ok &= self.work_each(cpus, 1);
    }
}

pub(crate) fn command_status(entry: *const Command) -> u32 {
    // SAFETY: an entry of our admin ring; the device writes the status word.
    unsafe { read_volatile(addr_of!((*entry).0[4])) }
}

pub(super) fn context_address(j: usize) -> u64 {
    // SAFETY: taking the address of a static's element.
    unsafe { addr_of!(CONTEXT[j]) as u64 }
}

pub(super) fn context_word(j: usize, word: usize) -> *mut u32 {
    // SAFETY: an in-bounds word of our context array.
    unsafe { addr_of_mut!(CONTEXT[j].0[word]) }
}

pub(super) fn queue_counted(cpus: usize) -> u32 {
    (0..CONTEXTS)
        .map(|j| vector_total(cpus, QUEUE_VECTOR + j as u8))
        .sum()
}

/// Allocates and activates the queue device's entries (MSI-X vector 0 for admin
/// completions, one per context), enables MSI-X and the admin queue, and starts
/// [`CONTEXTS`] queues from contexts in RAM. Returns the driver and the first entry.
pub(super) fn setup_queues(
    hc: &mut Hc,
    dev: u8,
    cpus: usize,
    apic: &impl Fn(usize) -> u32,
    ok: &mut bool,
) -> Option<(QueueDriver, u64)> {
    let rid = pci::requester_id(dev);
    watch(pci::bar0(dev) + qd::reg::ID);
    let mut d = QueueDriver {
        bar: pci::bar0(dev),
        tail: 0,
    };
    check(
        ok,
        "queue device ID",
        u64::from(d.reg(qd::reg::ID)),
        u64::from(qd::ID),
    );
    if (d.reg(qd::reg::CONTEXTS) as usize) < CONTEXTS {
        println!(
            "ims: FAIL: the queue device has fewer than {} contexts",
            CONTEXTS
        );
        *ok = false;
        return None;
    }
    // Entry `first` for MSI-X vector 0, then one per context.
    let first = hc
        .call(
            "allocate queue entries",
            call::ALLOCATE,
            rid,
            1 + CONTEXTS as u64,
            0,
        )
        .rsi;
    hc.call(
        "activate the admin entry",
        call::UPDATE,
        rid,
        first,
        target::fixed(apic(0), ADMIN_VECTOR),
    );
    for j in 0..CONTEXTS {
        let word = target::fixed(apic(j % cpus), QUEUE_VECTOR + j as u8);
        hc.call(
            "activate a context entry",
            call::UPDATE,
            rid,
            first + 1 + j as u64,
            word,
        );
    }
    // MSI-X: vector 0 gets the admin entry's message, then the function is enabled.
    let Some(cap) = pci::capability(dev, 0x11) else {
        println!("ims: FAIL: the queue device has no MSI-X capability");
        *ok = false;
        return None;
    };
    d.set(qd::reg::MSIX_TABLE, compose(first));
    d.set(qd::reg::MSIX_TABLE + 4, 0);
    d.set(qd::reg::MSIX_TABLE + 8, 0);
    d.set(qd::reg::MSIX_TABLE + 12, 0);
    pci::write32(dev, cap, pci::read32(dev, cap) | (1 << 31));

    // Contexts in RAM: the message composed once, the ring addresses, unmasked.
    for j in 0..CONTEXTS {
        let ring = queue_ring(j);
        let (desc, avail, used) = Ring::parts(ring);
        let words = [
            (0, compose(first + 1 + j as u64)),
            (1, 0),
            (2, 0),
            (3, 0),
            (4, desc as u32),
            (5, (desc >> 32) as u32),
            (6, avail as u32),
            (7, (avail >> 32) as u32),
            (8, used as u32),
            (9, (used >> 32) as u32),
            (10, QSIZE as u32),
        ];
        for (w, v) in words {
            // SAFETY: our context, not yet given to the device.
            unsafe { write_volatile(context_word(j, w), v) };
        }
    }
    d.enable();
    check(
        ok,
        "ADMIN_ENABLE",
        u64::from(d.reg(qd::reg::ADMIN_ENABLE)),
        1,
    );
    d.start_all(ok);
    Some((d, first))
}

pub(super) fn queue_device(hc: &mut Hc, dev: u8, cpus: usize, apic: impl Fn(usize) -> u32) -> bool {
    let mut ok = true;
    let rid = pci::requester_id(dev);
    let Some((mut d, first)) = setup_queues(hc, dev, cpus, &apic, &mut ok) else {
        return false;
    };
    let bad = d.command(&mut ok, qd::command::START, 0, context_address(0));
    check(
        &mut ok,
        "START of a running queue",
        u64::from(bad),
        u64::from(qd::command::BAD_STATE),
    );
    let bad = d.command(&mut ok, qd::command::STOP, 999, 0);
    check(
        &mut ok,
        "STOP of no such queue",
        u64::from(bad),
        u64::from(qd::command::BAD_INDEX),
    );
    ok &= d.work_each(cpus, 3);
    println!(
        "ims-queues: {} queues started from their contexts, 3 items each counted",
        CONTEXTS
    );

    // STOP drains: slow completions, four outstanding, then STOP.
    d.set(qd::reg::INJECT_DELAY_US, 1000);
    let counted = vector_total(cpus, QUEUE_VECTOR);
    for _ in 0..4 {
        post(queue_ring(0));
    }
    expect(0, QUEUE_VECTOR, 4);
    d.set(qd::reg::QUEUE_NOTIFY, 0);
    let stop = d.command(&mut ok, qd::command::STOP, 0, 0);
    check(&mut ok, "STOP", u64::from(stop), u64::from(qd::command::OK));
    check(
        &mut ok,
        "used entries when STOP completed",
        u64::from(used_idx(queue_ring(0))),
        u64::from(avail_idx(queue_ring(0))),
    );
    d.set(qd::reg::INJECT_DELAY_US, 0);
    ok &= wait_for("drained completions", || {
        vector_total(cpus, QUEUE_VECTOR) >= counted + 4
    });
    // Work made available while stopped waits for START.
    let used = used_idx(queue_ring(0));
    post(queue_ring(0));
    expect(0, QUEUE_VECTOR, 1);
    d.set(qd::reg::QUEUE_NOTIFY, 0);
    let _ = d.reg(qd::reg::COMPLETIONS);
    check(
        &mut ok,
        "completions while stopped",
        u64::from(used_idx(queue_ring(0)).wrapping_sub(used)),
        0,
    );
    let again = d.command(&mut ok, qd::command::STOP, 0, 0);
    check(
        &mut ok,
        "STOP of a stopped queue",
        u64::from(again),
        u64::from(qd::command::BAD_STATE),
    );
    let start = d.command(&mut ok, qd::command::START, 0, context_address(0));
    check(
        &mut ok,
        "START after STOP",
        u64::from(start),
        u64::from(qd::command::OK),
    );
    ok &= wait_for("the item posted while stopped", || {
        vector_total(cpus, QUEUE_VECTOR) >= counted + 5
    });
    println!("ims-queues: STOP drained 4 slow items before completing; START resumed the queue");

    // Lazy masking: the device latches the interrupt in the context; unmask and notify.
    let cpu1 = 1 % cpus;
    let before = count(cpu1, QUEUE_VECTOR + 1);
    let used = used_idx(queue_ring(1));
    // SAFETY: the control word is the guest's to write at any time.
    unsafe { write_volatile(context_word(1, 3), qd::context::MASK) };
    post(queue_ring(1));
    expect(cpu1, QUEUE_VECTOR + 1, 1);
    d.set(qd::reg::QUEUE_NOTIFY, 1);
    ok &= wait_for("the masked completion", || used_idx(queue_ring(1)) != used);
    // SAFETY: the device writes the pending word; read it volatile.
    let pending = unsafe { read_volatile(context_word(1, 11)) };
    check(
        &mut ok,
        "context pending while masked",
        u64::from(pending),
        1,
    );
    check(
        &mut ok,
        "interrupts while masked",
        u64::from(count(cpu1, QUEUE_VECTOR + 1) - before),
        0,
    );
    // SAFETY: as above.
    unsafe { write_volatile(context_word(1, 3), 0) };
    d.set(qd::reg::QUEUE_NOTIFY, 1);
    ok &= wait_for("the unmasked interrupt", || {
        count(cpu1, QUEUE_VECTOR + 1) > before
    });
    println!("ims-queues: a masked context latched its interrupt and delivered it on unmask");

    // A dropped interrupt: the next one reaps both completions.
    let cpu2 = 2 % cpus;
    let before = count(cpu2, QUEUE_VECTOR + 2);
    d.set(qd::reg::INJECT_DROP, 1);
    post(queue_ring(2));
    post(queue_ring(2));
    expect(cpu2, QUEUE_VECTOR + 2, 2);
    d.set(qd::reg::QUEUE_NOTIFY, 2);
    ok &= wait_for("completions after a dropped interrupt", || {
        count(cpu2, QUEUE_VECTOR + 2) >= before + 2
    });

    // A command that never completes: the device resets itself after the timeout.
    d.set(qd::reg::COMMAND_TIMEOUT_MS, 50);
    d.set(qd::reg::INJECT_STALL, 1);
    let interrupts = count(0, ADMIN_VECTOR);
    let stalled = d.submit(qd::command::STOP, 3, 0);
    d.recover(&mut ok, interrupts, 1, cpus, Some(stalled));
    println!(
        "ims-queues: a stalled command timed out into a reset; the driver restarted every queue"
    );
    // A reset forced by the fault-injection knob.
    let interrupts = count(0, ADMIN_VECTOR);
    d.set(qd::reg::INJECT_RESET, 1);
    d.recover(&mut ok, interrupts, 2, cpus, None);
    println!("ims-queues: a forced reset was recovered");

    let completions = d.reg(qd::reg::COMPLETIONS);
    check(
        &mut ok,
        "queue completions counted",
        u64::from(queue_counted(cpus)),
        u64::from(completions),
    );
    check(
        &mut ok,
        "queue device faults",
        u64::from(d.reg(qd::reg::FAULTS)),
        0,
    );
    for j in 0..CONTEXTS {
        let status = d.command(&mut ok, qd::command::STOP, j as u32, 0);
        check(
            &mut ok,
            "final STOP",
            u64::from(status),
            u64::from(qd::command::OK),
        );
    }
    d.set(qd::reg::ADMIN_ENABLE, 0);
    hc.call(
        "free queue entries",
        call::FREE,
        rid,
        first,
        1 + CONTEXTS as u64,
    );
    println!("ims-queues: {} completions, all counted", completions);
    ok
}

impl QueueDriver {
    /// `items` work items on every context; waits until each is counted.
    pub(super) fn work_each(&self, cpus: usize, items: u32) -> bool {
        let before = queue_counted(cpus);
        for j in 0..CONTEXTS {
            for _ in 0..items {
                post(queue_ring(j));
            }
            expect(j % cpus, QUEUE_VECTOR + j as u8, items);
            self.set(qd::reg::QUEUE_NOTIFY, j as u32);
        }
        wait_for("queue completions", || {
            queue_counted(cpus) >= before + items * CONTEXTS as u32
        })
    }
}
