//! x86-64 primitives: port I/O, MSRs, CPUID, the IDT and its entry stubs, the local APIC.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

/// Writes `value` to an 8-bit port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

/// Reads an 8-bit port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

/// Writes `value` to a 32-bit port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) }
}

/// Reads a 32-bit port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack)) }
    value
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only architectural MSRs that exist on every x86-64 CPU are read.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    let lo = value as u32;
    let hi = (value >> 32) as u32;
    // SAFETY: callers write architectural MSRs with values they have checked.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nostack)) }
}

/// Executes CPUID for `leaf` (subleaf 0): (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Enables interrupts.
pub fn sti() {
    // SAFETY: the IDT is loaded before any CPU enables interrupts.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Runs `f` with interrupts disabled, enabling them afterwards (for code that runs with
/// them enabled).
pub fn without_interrupts<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: masking interrupts has no memory effects; no `nomem`, so it orders `f`'s
    // accesses after it.
    unsafe { asm!("cli", options(nostack)) }
    let result = f();
    sti();
    result
}

/// Waits for the next interrupt.
pub fn hlt() {
    // SAFETY: halting is always allowed in ring 0.
    unsafe { asm!("hlt", options(nomem, nostack)) }
}

/// Waits in `hlt` until `done` holds. `done` is checked with interrupts disabled and
/// `sti; hlt` is one step (an interrupt is taken only after the `hlt`), so an interrupt
/// that makes `done` true cannot slip in between the check and the halt.
pub fn halt_until(mut done: impl FnMut() -> bool) {
    loop {
        // SAFETY: masking interrupts has no memory effects; it is a compiler barrier
        // (no `nomem`) so that `done` reads memory after it.
        unsafe { asm!("cli", options(nostack)) }
        if done() {
            sti();
            return;
        }
        // SAFETY: as for `hlt`; interrupts are enabled again before the halt.
        unsafe { asm!("sti", "hlt", options(nostack)) }
    }
}

/// Halts with interrupts disabled, forever.
pub fn stop() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

const IA32_GS_BASE: u32 = 0xc000_0101;

/// Points GS at this CPU's per-CPU word (which holds its index).
pub fn set_percpu(base: u64) {
    wrmsr(IA32_GS_BASE, base);
}

/// This CPU's index, from its per-CPU word.
pub fn cpu_index() -> usize {
    let value: u64;
    // SAFETY: GS is set up by `set_percpu` before interrupts are enabled.
    unsafe { asm!("mov {}, gs:[0]", out(reg) value, options(nostack, readonly, preserves_flags)) }
    value as usize
}

// ---- IDT ------------------------------------------------------------------------------

// 256 entry stubs, 16 bytes apart. Each pushes a dummy error code (unless the CPU pushed
// one) and its vector, then joins the common path, which saves the caller-saved registers
// and the SSE state, calls `isr_dispatch(vector, frame)` and returns with IRETQ.
global_asm!(
    ".section .text.isr, \"ax\"",
    ".global isr_stubs",
    ".balign 16",
    "isr_stubs:",
    ".set vec, 0",
    ".rept 256",
    ".balign 16",
    ".if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)",
    ".else",
    "push 0",
    ".endif",
    ".byte 0x68",
    ".long vec",
    "jmp isr_common",
    ".set vec, vec + 1",
    ".endr",
    "isr_common:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push rbp",
    "mov rbp, rsp",
    "mov rdi, [rbp + 80]",
    "lea rsi, [rbp + 88]",
    "and rsp, -16",
    "sub rsp, 512",
    "fxsave64 [rsp]",
    "call {dispatch}",
    "fxrstor64 [rsp]",
    "mov rsp, rbp",
    "pop rbp",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 16",
    "iretq",
    dispatch = sym crate::isr_dispatch,
);

unsafe extern "C" {
    static isr_stubs: u8;
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);
static IDT_READY: AtomicBool = AtomicBool::new(false);

/// Fills the IDT (once, on the BSP). Every gate is a ring-0 interrupt gate on IST1, so a
/// handler never writes below the interrupted code's stack pointer (the red zone).
pub fn build_idt() {
    let base = core::ptr::addr_of!(isr_stubs) as u64;
    let code_selector = u64::from(hypercall::boot::CODE_SELECTOR);
    for vector in 0..256u64 {
        let handler = base + vector * 16;
        let low = (handler & 0xffff)
            | (code_selector << 16)
            | (1u64 << 32) // IST1
            | (0x8eu64 << 40) // present, DPL 0, 64-bit interrupt gate
            | ((handler >> 16) & 0xffff) << 48;
        let high = handler >> 32;
        // SAFETY: the BSP writes the IDT before IDT_READY is published; nobody reads it
        // until then.
        unsafe {
            let idt = &mut *core::ptr::addr_of_mut!(IDT);
            idt.0[2 * vector as usize] = low;
            idt.0[2 * vector as usize + 1] = high;
        }
    }
    IDT_READY.store(true, Ordering::Release);
}

/// Waits for the BSP's IDT and loads it on this CPU.
pub fn load_idt() {
    while !IDT_READY.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is complete (IDT_READY) and static.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack)) }
}

// ---- Local APIC -------------------------------------------------------------------------

const IA32_APIC_BASE: u32 = 0x1b;
const XAPIC_BASE: u64 = 0xfee0_0000;
/// Vector the LAPIC uses for spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;

static X2APIC: AtomicBool = AtomicBool::new(false);

/// Whether the CPU offers x2APIC mode.
pub fn has_x2apic() -> bool {
    cpuid(1).2 & (1 << 21) != 0
}

/// Enables this CPU's local APIC, in x2APIC mode when `x2apic`, with the spurious vector.
pub fn lapic_enable(x2apic: bool) {
    X2APIC.store(x2apic, Ordering::Relaxed);
    let mut base = rdmsr(IA32_APIC_BASE) | (1 << 11);
    if x2apic {
        base |= 1 << 10;
    }
    wrmsr(IA32_APIC_BASE, base);
    lapic_write(0x80, 0); // TPR: accept every priority
    lapic_write(0xf0, 0x100 | u32::from(SPURIOUS_VECTOR)); // SVR: enabled
}

fn lapic_write(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(0x800 + (reg >> 4), u64::from(value));
    } else {
        // SAFETY: the xAPIC page is identity-mapped and its registers are 32 bits wide.
        unsafe { core::ptr::write_volatile((XAPIC_BASE + u64::from(reg)) as *mut u32, value) }
    }
}

fn lapic_read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        rdmsr(0x800 + (reg >> 4)) as u32
    } else {
        // SAFETY: the xAPIC page is identity-mapped and its registers are 32 bits wide.
        unsafe { core::ptr::read_volatile((XAPIC_BASE + u64::from(reg)) as *const u32) }
    }
}

/// Signals end of interrupt.
pub fn lapic_eoi() {
    lapic_write(0xb0, 0);
}

/// This CPU's APIC ID.
pub fn lapic_id() -> u32 {
    let id = lapic_read(0x20);
    if X2APIC.load(Ordering::Relaxed) {
        id
    } else {
        id >> 24
    }
}

/// Sends a fixed, edge-triggered IPI with `vector` to the CPU with APIC ID `dest`.
pub fn send_ipi(dest: u32, vector: u8) {
    let low = u32::from(vector) | (1 << 14); // fixed, physical, assert
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low));
    } else {
        lapic_write(0x310, dest << 24);
        lapic_write(0x300, low);
        while lapic_read(0x300) & (1 << 12) != 0 {
            core::hint::spin_loop();
        }
    }
}
