//! The `hostile` scenario: the sequences a guest written from the docs alone once used to
//! stall or confuse the VMM, each checked against its documented outcome
//! (`docs/ims-device.md`, `docs/hypercall.md`, `docs/boot-protocol.md`); and the `stuck`
//! scenario, which leaves a vCPU inside a device call for the watchdog to deal with.

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, write_volatile};
use core::sync::atomic::Ordering;

use hypercall::abi::{call, status};
use hypercall::boot::BootInfoView;
use hypercall::harness::{offset, request, status as host_status, HARNESS_SOURCE_ID};
use hypercall::ims::{queues as qd, slots as sd};
use hypercall::platform::HARNESS_PORT;

use crate::ims::{command_status, post, used_idx, Command, Ring, QSIZE};
use crate::pci::{self, mmio_read, mmio_write};
use crate::scenario::{expect, harness_request};
use crate::{arch, code, count, exit, mailbox_cell, println};

/// Vector of the plain MSIs the harness fires before the junk rings.
const JUNK_VECTOR: u8 = 0x6c;
const ME: u64 = HARNESS_SOURCE_ID as u64;
/// Spins before a wait is declared failed.
const WAIT_LIMIT: u32 = 3_000_000;
/// The MSI-X capability ID.
const MSIX_CAP: u8 = 0x11;
/// MSI-X enable, in the capability's first dword.
const MSIX_ENABLE: u32 = 1 << 31;

/// The junk admin ring: four zeroed commands (opcode 0 is no command).
static mut JUNK_RING: [Command; 4] = [const { Command([0; 8]) }; 4];
/// The slot-device queue that is stopped and re-initialised.
static mut REINIT_RING: Ring = Ring::EMPTY;

fn check(ok: &mut bool, what: &str, got: u64, want: u64) {
    if got != want {
        println!("hostile: FAIL: {}: {:#x} (expected {:#x})", what, got, want);
        *ok = false;
    }
}

fn wait_for(ok: &mut bool, what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..WAIT_LIMIT {
        if done() {
            return;
        }
        core::hint::spin_loop();
    }
    println!("hostile: FAIL: timed out waiting for {}", what);
    *ok = false;
}

/// Runs the scenario.
pub fn run(info: &BootInfoView<'_>) -> bool {
    let mut ok = boot_information(info);
    ok &= runaway_admin_tail();
    ok &= slot_queue_reinitialised();
    ok &= narrow_hypercall_rings();
    ok &= junk_doorbell_rings(info.cpu_count());
    ok
}

/// The boot information says where free RAM starts (after the mailbox) and the TSC
/// frequency.
fn boot_information(info: &BootInfoView<'_>) -> bool {
    let mut ok = true;
    let (mailbox, size) = info.mailbox().unwrap_or((0, 0));
    let free = info.free_start().unwrap_or(0);
    check(
        &mut ok,
        "free RAM starts after the mailbox",
        u64::from(free >= mailbox + size),
        1,
    );
    check(&mut ok, "free RAM starts on a page", free % 4096, 0);
    match info.tsc_khz() {
        Some(khz) => println!(
            "hostile: boot information: free RAM from {:#x}, TSC {} kHz",
            free, khz
        ),
        None => println!(
            "hostile: boot information: free RAM from {:#x}, TSC frequency not given",
            free
        ),
    }
    ok
}

/// Turns `device`'s MSI-X off (so that its notifications are dropped, not latched) and
/// returns how to restore it.
fn msix_off(device: u8) -> Option<(u16, u32)> {
    let cap = pci::capability(device, MSIX_CAP)?;
    let header = pci::read32(device, cap);
    pci::write32(device, cap, header & !MSIX_ENABLE);
    Some((cap, header))
}

/// The queue-memory device's admin ring: a tail written 0xfffffffe ahead of its head
/// is refused at once (STATUS admin error, ring disabled, tail not taken), every
/// register still answers, and the ring runs again once re-enabled.
fn runaway_admin_tail() -> bool {
    let mut ok = true;
    let Some(device) = pci::find(qd::VENDOR_ID, qd::DEVICE_ID) else {
        println!("hostile: FAIL: no queue-memory IMS device");
        return false;
    };
    let bar = pci::bar0(device);
    let reg = |off| mmio_read(bar + off);
    let set = |off, value| mmio_write(bar + off, value);
    let msix = msix_off(device);
    let ring = addr_of!(JUNK_RING) as u64;
    set(qd::reg::ADMIN_ENABLE, 0);
    set(qd::reg::STATUS, u32::MAX);
    set(qd::reg::ADMIN_BASE, ring as u32);
    set(qd::reg::ADMIN_BASE + 4, (ring >> 32) as u32);
    set(qd::reg::ADMIN_SIZE, 4);
    set(qd::reg::ADMIN_ENABLE, 1);
    check(
        &mut ok,
        "ADMIN_ENABLE",
        u64::from(reg(qd::reg::ADMIN_ENABLE)),
        1,
    );
    set(qd::reg::ADMIN_TAIL, 0xffff_fffe);
    // The next access answers at once: the device has not gone off to run junk.
    check(
        &mut ok,
        "STATUS after the runaway tail",
        u64::from(reg(qd::reg::STATUS)),
        u64::from(qd::STATUS_ADMIN_ERROR),
    );
    check(
        &mut ok,
        "ADMIN_ENABLE after it",
        u64::from(reg(qd::reg::ADMIN_ENABLE)),
        0,
    );
    check(
        &mut ok,
        "ADMIN_TAIL after it",
        u64::from(reg(qd::reg::ADMIN_TAIL)),
        0,
    );
    check(
        &mut ok,
        "ADMIN_HEAD after it",
        u64::from(reg(qd::reg::ADMIN_HEAD)),
        0,
    );
    // Recovery: clear, enable, a tail exactly a ring ahead.
    set(qd::reg::STATUS, qd::STATUS_ADMIN_ERROR);
    set(qd::reg::ADMIN_ENABLE, 1);
    set(qd::reg::ADMIN_TAIL, 4);
    wait_for(&mut ok, "the four junk commands", || {
        reg(qd::reg::ADMIN_HEAD) == 4
    });
    let first = addr_of!(JUNK_RING).cast::<Command>();
    for k in 0..4 {
        // SAFETY: an element of our four-entry ring; only a raw pointer is formed.
        let entry = unsafe { first.add(k) };
        check(
            &mut ok,
            "a junk command's status",
            u64::from(command_status(entry)),
            u64::from(qd::command::BAD_OPCODE),
        );
    }
    set(qd::reg::ADMIN_ENABLE, 0);
    if let Some((cap, header)) = msix {
        pci::write32(device, cap, header);
    }
    if ok {
        println!(
            "hostile: ims-queues: ADMIN_TAIL 0xfffffffe refused at once (admin error, ring off); 4 commands ran after re-enabling"
        );
    }
    ok
}

/// Programs the selected slot-device queue on `REINIT_RING` and makes it ready.
fn program_queue(bar: u64) {
    let (desc, avail, used) = Ring::parts(addr_of!(REINIT_RING));
    let set = |off, value| mmio_write(bar + off, value);
    set(sd::reg::QUEUE_SIZE, QSIZE as u32);
    for (off, at) in [
        (sd::reg::QUEUE_DESC, desc),
        (sd::reg::QUEUE_AVAIL, avail),
        (sd::reg::QUEUE_USED, used),
    ] {
        set(off, at as u32);
        set(off + 4, (at >> 32) as u32);
    }
    set(sd::reg::QUEUE_READY, 1);
}

/// A slot-device queue stopped, its rings zeroed, programmed again and made ready
/// completes its first new item; RESET leaves every queue stopped and slot masked.
fn slot_queue_reinitialised() -> bool {
    let mut ok = true;
    let Some(device) = pci::find(sd::VENDOR_ID, sd::DEVICE_ID) else {
        println!("hostile: FAIL: no slot-array IMS device");
        return false;
    };
    let bar = pci::bar0(device);
    let reg = |off| mmio_read(bar + off);
    let set = |off, value| mmio_write(bar + off, value);
    let ring = addr_of_mut!(REINIT_RING);
    let queue = reg(sd::reg::QUEUES) - 1;
    let completions = reg(sd::reg::COMPLETIONS);
    set(sd::reg::QUEUE_SELECT, queue);
    program_queue(bar);
    post(ring);
    set(sd::reg::QUEUE_NOTIFY, queue);
    wait_for(&mut ok, "the first item", || used_idx(ring) == 1);

    set(sd::reg::QUEUE_READY, 0);
    check(
        &mut ok,
        "QUEUE_READY after 0",
        u64::from(reg(sd::reg::QUEUE_READY)),
        0,
    );
    // SAFETY: our ring, which the device no longer touches once QUEUE_READY reads 0.
    unsafe { write_volatile(ring, Ring::EMPTY) };
    program_queue(bar);
    check(
        &mut ok,
        "QUEUE_READY again",
        u64::from(reg(sd::reg::QUEUE_READY)),
        1,
    );
    set(sd::reg::QUEUE_SIZE, 4);
    check(
        &mut ok,
        "QUEUE_SIZE written while ready",
        u64::from(reg(sd::reg::QUEUE_SIZE)),
        QSIZE as u64,
    );
    post(ring);
    set(sd::reg::QUEUE_NOTIFY, queue);
    wait_for(&mut ok, "the first item after re-initialising", || {
        used_idx(ring) == 1
    });
    check(
        &mut ok,
        "COMPLETIONS",
        u64::from(reg(sd::reg::COMPLETIONS).wrapping_sub(completions)),
        2,
    );

    set(sd::reg::RESET, 1);
    check(
        &mut ok,
        "QUEUE_SELECT after RESET",
        u64::from(reg(sd::reg::QUEUE_SELECT)),
        0,
    );
    set(sd::reg::QUEUE_SELECT, queue);
    check(
        &mut ok,
        "QUEUE_READY after RESET",
        u64::from(reg(sd::reg::QUEUE_READY)),
        0,
    );
    check(
        &mut ok,
        "QUEUE_SIZE after RESET",
        u64::from(reg(sd::reg::QUEUE_SIZE)),
        u64::from(sd::MAX_QUEUE_SIZE),
    );
    check(
        &mut ok,
        "slot 0's control after RESET",
        u64::from(reg(sd::reg::SLOT_BASE + 12)),
        u64::from(sd::SLOT_MASK),
    );
    set(sd::reg::QUEUE_SELECT, 0);
    if ok {
        println!(
            "hostile: ims-slots: a stopped, zeroed and re-programmed queue completed its first new item; RESET stopped every queue"
        );
    }
    ok
}

/// `ALLOCATE` of one entry rung with an `out` of `width` bytes: (RAX, RSI, RDI) after.
fn narrow_ring(port: u16, width: u8) -> (u64, u64, u64) {
    let mut rax = u64::from(call::ALLOCATE);
    let mut rsi = 1u64;
    let mut rdi = 0u64;
    // SAFETY: the hypercall doorbell; a narrow `out` is documented not to be a call, and
    // even a call would touch no guest memory for ALLOCATE.
    unsafe {
        if width == 1 {
            asm!("out dx, al", inout("rax") rax, in("rcx") ME, inout("rsi") rsi,
                 inout("rdi") rdi, in("dx") port, options(nostack));
        } else {
            asm!("out dx, ax", inout("rax") rax, in("rcx") ME, inout("rsi") rsi,
                 inout("rdi") rdi, in("dx") port, options(nostack));
        }
    }
    (rax, rsi, rdi)
}

/// 1- and 2-byte `out`s to the hypercall doorbell are not calls: RAX = UNSUPPORTED,
/// nothing else changes (no entry allocated); an `in` reads all ones.
fn narrow_hypercall_rings() -> bool {
    let mut ok = true;
    let Some(iface) = crate::hc::discover() else {
        println!("hostile: FAIL: no hypercall interface");
        return false;
    };
    let mut hc = crate::hc::Guest::new(iface.port);
    let before = hc.call(call::QUERY, ME, 0, 0);
    for width in [1, 2] {
        let (rax, rsi, rdi) = narrow_ring(iface.port, width);
        check(&mut ok, "RAX after a narrow ring", rax, status::UNSUPPORTED);
        check(&mut ok, "RSI after a narrow ring", rsi, 1);
        check(&mut ok, "RDI after a narrow ring", rdi, 0);
    }
    check(
        &mut ok,
        "an in from the doorbell",
        u64::from(arch::inl(iface.port)),
        0xffff_ffff,
    );
    let after = hc.call(call::QUERY, ME, 0, 0);
    check(&mut ok, "QUERY", after.rax, status::OK);
    check(&mut ok, "entries unallocated", after.rdi, before.rdi);
    check(
        &mut ok,
        "entries the requester may allocate",
        after.r8,
        before.r8,
    );
    if ok {
        println!(
            "hostile: hypercall: 1- and 2-byte outs answered UNSUPPORTED with nothing allocated; an in read all ones"
        );
    }
    ok
}

/// Writes `value` to a 16-bit port.
fn outw(port: u16, value: u16) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack)) }
}

/// Junk rung at the harness doorbell (any value, any width, many times) serves nothing:
/// the request before it is not served again (its interrupts would be counted twice)
/// and `DONE_SEQ` keeps its number; the next request completes as usual.
fn junk_doorbell_rings(cpus: usize) -> bool {
    let mut ok = true;
    let before: u32 = (0..cpus).map(|cpu| count(cpu, JUNK_VECTOR)).sum();
    let (host, _) = harness_request(request::FIRE_MSI_EACH_CPU, JUNK_VECTOR, 1, 0);
    check(&mut ok, "the request before the junk", u64::from(host), 0);
    for cpu in 0..cpus {
        expect(cpu, JUNK_VECTOR, 1);
    }
    let done = mailbox_cell(offset::DONE_SEQ).load(Ordering::Acquire);
    for k in 0..1000u32 {
        arch::outl(HARNESS_PORT, 0xffff_fffe ^ k);
    }
    arch::outb(HARNESS_PORT, 7);
    outw(HARNESS_PORT, 0x1234);
    arch::outl(HARNESS_PORT, done.wrapping_add(1));
    check(
        &mut ok,
        "DONE_SEQ after junk rings",
        u64::from(mailbox_cell(offset::DONE_SEQ).load(Ordering::Acquire)),
        u64::from(done),
    );
    // Served in order behind the junk: once it is done, the junk was looked at.
    let (host, _) = harness_request(request::INJECT, 0, 0, 1);
    check(
        &mut ok,
        "a request after the junk",
        u64::from(host),
        u64::from(host_status::OK),
    );
    check(
        &mut ok,
        "DONE_SEQ after it",
        u64::from(mailbox_cell(offset::DONE_SEQ).load(Ordering::Acquire)),
        u64::from(mailbox_cell(offset::REQUEST_SEQ).load(Ordering::Acquire)),
    );
    let after: u32 = (0..cpus).map(|cpu| count(cpu, JUNK_VECTOR)).sum();
    check(
        &mut ok,
        "interrupts of the request before the junk",
        u64::from(after - before),
        cpus as u64,
    );
    if ok {
        println!("hostile: harness: 1002 junk rings served nothing; the next request completed");
    }
    ok
}

/// The `stuck` scenario: the host holds the slot-array device (harness `HOLD_DEVICE`,
/// 30 s) and this vCPU reads one of its registers, so it waits inside the VMM; the
/// watchdog must end the run on time all the same.
pub fn stuck() -> ! {
    let Some(device) = pci::find(sd::VENDOR_ID, sd::DEVICE_ID) else {
        println!("stuck: FAIL: no slot-array IMS device");
        exit(code::CHECK_FAILED)
    };
    mailbox_cell(offset::ARG_SID).store(u32::from(pci::requester_id(device)), Ordering::Relaxed);
    let (host, _) = harness_request(request::HOLD_DEVICE, 0, 30_000, 0);
    if host != host_status::OK {
        println!("stuck: FAIL: HOLD_DEVICE: status {}", host);
        exit(code::CHECK_FAILED)
    }
    println!("stuck: the host holds the slot-array device; reading its ID register");
    let _ = mmio_read(pci::bar0(device) + sd::reg::ID);
    println!("stuck: FAIL: the read returned before the watchdog");
    exit(code::CHECK_FAILED)
}
