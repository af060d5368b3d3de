//! The test guest: a freestanding 64-bit program that runs on every vCPU.
//!
//! Every CPU installs the IDT (built once by the BSP), enables its local APIC (x2APIC
//! when offered) and checks in. Interrupt handlers count interrupts per vector per CPU in
//! the harness mailbox's counter table. The BSP then runs the scenario named on the
//! command line (`scenario=smoke|msi|...|bench|all|fail|hang`, default `all`; `msi_count=N`;
//! `apic=xapic` to stay in xAPIC mode) and reports a verdict
//! through the debug-exit port; the APs idle in `hlt`.
//!
//! Exit codes: 0 pass, 1 a check failed, 2 bad boot information, 3 the `fail` scenario,
//! 4 bad command line, 0x70 panic, 0x80 + v an unexpected exception with vector v.

#![no_std]
#![no_main]
#![expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "x86-64 only: register halves, descriptor fields and vectors are narrowed on purpose"
)]
#![expect(
    clippy::too_many_lines,
    reason = "the guest's checks are checklists, read top to bottom like the docs they test"
)]

mod arch;
mod bench;
mod dma;
mod faults;
mod hc;
mod hostile;
mod ims;
mod mem;
mod pci;
mod refused;
mod scenario;
mod serial;
mod touch;
mod vtd;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hypercall::boot::{self, BootInfoView};
use hypercall::harness;
use hypercall::platform::DEBUG_EXIT_PORT;

/// Guest verdicts reported through the debug-exit port.
pub mod code {
    pub const PASS: u32 = 0;
    pub const CHECK_FAILED: u32 = 1;
    pub const BAD_BOOT_INFO: u32 = 2;
    pub const FAIL_ON_PURPOSE: u32 = 3;
    pub const BAD_CMDLINE: u32 = 4;
    pub const PANIC: u32 = 0x70;
    pub const EXCEPTION_BASE: u32 = 0x80;
}

/// Address of the harness mailbox (0 until the BSP has read the boot information).
static MAILBOX: AtomicU64 = AtomicU64::new(0);
/// CPUs that have enabled interrupts.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// CPUs whose LAPIC reported another ID than the boot information says.
static APIC_ID_MISMATCHES: AtomicU32 = AtomicU32::new(0);
/// One word per CPU holding its index; GS points at it.
static mut PERCPU: [u64; boot::MAX_CPUS] = [0; boot::MAX_CPUS];

/// Ends the VM with `code` as the verdict.
pub fn exit(code: u32) -> ! {
    arch::outl(DEBUG_EXIT_PORT, code);
    arch::stop()
}

/// The mailbox, as 32-bit cells.
pub fn mailbox_cell(offset: usize) -> &'static AtomicU32 {
    let base = MAILBOX.load(Ordering::Relaxed);
    // SAFETY: the VMM sized the mailbox for every CPU (boot information) and it is
    // identity-mapped, 4-byte aligned RAM that lives as long as the guest.
    unsafe { &*((base + offset as u64) as *const AtomicU32) }
}

/// The number of interrupts with `vector` counted on `cpu`.
pub fn count(cpu: usize, vector: u8) -> u32 {
    mailbox_cell(harness::counter_offset(cpu, vector)).load(Ordering::Acquire)
}

/// Entry point of every vCPU (see the boot protocol in the `hypercall` crate).
#[unsafe(no_mangle)]
pub extern "C" fn _start(boot_info: u64, cpu: u64) -> ! {
    // SAFETY: the VMM passes the identity-mapped address of the boot-information page.
    let page = unsafe { core::slice::from_raw_parts(boot_info as *const u8, boot::PAGE_SIZE) };
    let Ok(info) = BootInfoView::new(page) else {
        serial::write_unlocked(format_args!("test-guest: bad boot information\n"));
        exit(code::BAD_BOOT_INFO)
    };
    let cpu = cpu as usize;
    if cpu >= info.cpu_count() {
        exit(code::BAD_BOOT_INFO)
    }
    // SAFETY: each CPU writes only its own slot, before it enables interrupts.
    let slot = unsafe {
        let percpu = &mut *core::ptr::addr_of_mut!(PERCPU);
        percpu[cpu] = cpu as u64;
        core::ptr::addr_of!(percpu[cpu]) as u64
    };
    arch::set_percpu(slot);
    if cpu == 0 {
        // Without a harness (no mailbox) only scenarios that need none can run; the
        // scenario code says so.
        if let Some((mailbox, size)) = info.mailbox() {
            if (size as usize) < harness::mailbox_size(info.cpu_count()) {
                exit(code::BAD_BOOT_INFO)
            }
            MAILBOX.store(mailbox, Ordering::Relaxed);
            mailbox_cell(harness::offset::COUNTS_VALID).store(1, Ordering::Release);
        }
        scenario::configure(&info);
        arch::build_idt();
    }
    arch::load_idt();
    arch::lapic_enable(scenario::use_x2apic());
    if Some(arch::lapic_id()) != info.apic_id(cpu) {
        APIC_ID_MISMATCHES.fetch_add(1, Ordering::Relaxed);
    }
    arch::sti();
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
    if cpu == 0 {
        scenario::run_bsp(&info)
    }
    println!("cpu {} checked in (APIC ID {})", cpu, arch::lapic_id());
    loop {
        arch::hlt();
    }
}

/// Called by the entry stubs with the vector and a pointer to
/// `[error code, RIP, CS, RFLAGS, RSP, SS]`.
///
/// # Safety
/// Only the entry stubs call it, with `frame` pointing at those six words.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn isr_dispatch(vector: u64, frame: *const u64) {
    if vector < 32 {
        // SAFETY: the stub passes a pointer to the six words the CPU and stub pushed.
        let (error, rip) = unsafe { (*frame, *frame.add(1)) };
        if vector == 3 {
            // A trap: `rip` is past the int3; return there.
            refused::on_breakpoint(rip);
            return;
        }
        if let (13, Some(resume)) = (vector, refused::on_general_protection()) {
            // SAFETY: the frame's RIP word (the stub's pointer + 1) is where IRETQ returns.
            unsafe { *(frame.add(1) as *mut u64) = resume };
            return;
        }
        serial::write_unlocked(format_args!(
            "\ncpu {}: exception {vector} (error code {error:#x}) at {rip:#x}\n",
            arch::cpu_index()
        ));
        exit(code::EXCEPTION_BASE + vector as u32)
    }
    let vector = vector as u8;
    // IMS queue vectors count the completions their handler reaped (interrupts of one
    // vector merge in the LAPIC); every other vector counts interrupts.
    let n = ims::on_interrupt(vector).unwrap_or(1);
    if n > 0 && MAILBOX.load(Ordering::Relaxed) != 0 {
        mailbox_cell(harness::counter_offset(arch::cpu_index(), vector))
            .fetch_add(n, Ordering::AcqRel);
    }
    if vector != arch::SPURIOUS_VECTOR {
        arch::lapic_eoi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    serial::write_unlocked(format_args!("\ntest-guest panic: {info}\n"));
    exit(code::PANIC)
}
