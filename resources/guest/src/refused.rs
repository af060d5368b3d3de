//! The instructions a VMM may have to complete for KVM (`vmm::refused`): `int3`, `clac`,
//! `stac`, `popcnt` and `fwait`, each checked for its architectural result, whoever
//! executed it (the CPU, KVM's emulator, or the VMM after KVM gave up). And `unemulated`:
//! an instruction outside that set (`cmpxchg16b`), which a KVM that emulates ring 0 may
//! refuse; the VMM must then stop the vCPU with a clear error at its address.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{arch, code, exit, println};

/// Where the last `#BP` returned to (0: none yet), written by the exception path.
static BREAKPOINT_RIP: AtomicU64 = AtomicU64::new(0);

/// Called for vector 3 with the RIP the CPU saved; the handler returns there.
pub fn on_breakpoint(rip: u64) {
    BREAKPOINT_RIP.store(rip, Ordering::Release);
}

/// Where a `#GP` the scenario provokes on purpose resumes (0: none expected).
static GP_RESUME: AtomicU64 = AtomicU64::new(0);

/// Called for vector 13: the RIP to return to instead of the faulting one, when the
/// scenario expected this fault.
pub fn on_general_protection() -> Option<u64> {
    match GP_RESUME.swap(0, Ordering::AcqRel) {
        0 => None,
        resume => Some(resume),
    }
}

const IA32_LSTAR: u32 = 0xc000_0082;

/// `wrmsr IA32_LSTAR` (which a VMM may intercept): a canonical value reads back; a
/// non-canonical one faults with `#GP` and changes nothing.
fn lstar() -> bool {
    let before = arch::rdmsr(IA32_LSTAR);
    arch::wrmsr(IA32_LSTAR, 0xffff_ffff_8123_4560);
    let written = arch::rdmsr(IA32_LSTAR);
    let completed: u32;
    // SAFETY: the #GP handler resumes at label 2 when GP_RESUME names it, skipping the
    // `mov`; EDX:EAX = 0x0080_0000_0000_0000 is not canonical.
    unsafe {
        asm!(
            "lea {r}, [rip + 2f]",
            "mov [{resume}], {r}",
            "xor eax, eax",
            "wrmsr",
            "mov eax, 1",
            "2:",
            r = out(reg) _,
            resume = in(reg) GP_RESUME.as_ptr(),
            in("ecx") IA32_LSTAR,
            in("edx") 0x0080_0000u32,
            out("eax") completed,
            options(nostack)
        );
    }
    GP_RESUME.store(0, Ordering::Release);
    let after = arch::rdmsr(IA32_LSTAR);
    arch::wrmsr(IA32_LSTAR, before);
    println!(
        "refused: wrmsr IA32_LSTAR read back {:#x}; a non-canonical value {} and left {:#x}",
        written,
        if completed == 0 {
            "raised #GP"
        } else {
            "did not fault"
        },
        after
    );
    written == 0xffff_ffff_8123_4560 && completed == 0 && after == written
}

const AC: u64 = 1 << 18;
const ZF: u64 = 1 << 6;

fn rflags() -> u64 {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) }
    flags
}

fn int3() -> bool {
    BREAKPOINT_RIP.store(0, Ordering::Release);
    let after: u64;
    // SAFETY: the #BP handler records the saved RIP and returns past the int3.
    unsafe { asm!("lea {after}, [rip + 2f]", "int3", "2:", after = out(reg) after) }
    let rip = BREAKPOINT_RIP.load(Ordering::Acquire);
    println!(
        "refused: int3 raised #BP returning to {:#x} (the next instruction is {:#x})",
        rip, after
    );
    rip == after
}

fn clac_stac() -> bool {
    if arch::cpuid(7).1 & (1 << 20) == 0 {
        println!("refused: no SMAP in CPUID, clac/stac skipped");
        return true;
    }
    let (set, cleared): (u64, u64);
    // SAFETY: clac/stac only change RFLAGS.AC (CPUID says SMAP; this is ring 0).
    unsafe {
        asm!("stac", "pushfq", "pop {s}", "clac", "pushfq", "pop {c}", s = out(reg) set, c = out(reg) cleared);
    }
    println!(
        "refused: stac set AC {}, clac cleared it {}",
        set & AC != 0,
        cleared & AC == 0
    );
    set & AC != 0 && cleared & AC == 0
}

fn popcnt() -> bool {
    if arch::cpuid(1).2 & (1 << 23) == 0 {
        println!("refused: no POPCNT in CPUID, popcnt skipped");
        return true;
    }
    let (mut wide, mut narrow, mut short): (u64, u64, u64) =
        (u64::MAX, u64::MAX, 0x1234_5678_9abc_def0);
    let (zero_flags, flags): (u64, u64);
    // SAFETY: register-only popcnt (CPUID says POPCNT) and RFLAGS reads.
    unsafe {
        asm!(
            "popcnt {w}, {ws}",
            "popcnt {n:e}, {ns:e}",
            "popcnt {s:x}, {ss:x}",
            "pushfq",
            "pop {f}",
            "popcnt {z}, {zero}",
            "pushfq",
            "pop {zf}",
            w = inout(reg) wide,
            ws = in(reg) 0xf0f0_0000_0000_0001u64,
            n = inout(reg) narrow,
            ns = in(reg) 0xffff_ffff_0000_0003u64,
            s = inout(reg) short,
            ss = in(reg) 0xffff_0007u64,
            f = out(reg) flags,
            z = out(reg) _,
            zero = in(reg) 0u64,
            zf = out(reg) zero_flags,
        );
    }
    println!(
        "refused: popcnt gave {} (64-bit), {} (32-bit, zero-extended {:#x}), {:#x} (16-bit)",
        wide, narrow as u32, narrow, short
    );
    wide == 9
        && narrow == 2
        && short == 0x1234_5678_9abc_0003
        && flags & ZF == 0
        && zero_flags & ZF != 0
}

fn fwait() -> bool {
    // SAFETY: no x87 exception is pending and CR0.TS is clear in this guest.
    unsafe { asm!("fwait", options(nomem, nostack)) }
    println!("refused: fwait completed");
    true
}

/// The `refused` scenario (part of `all`).
pub fn run() -> bool {
    let ok = int3() & clac_stac() & popcnt() & fwait() & lstar() & (rflags() & AC == 0);
    if !ok {
        println!("FAIL: refused: an instruction's result is wrong");
    }
    ok
}

// `guest_cmpxchg16b(pair)`: its first instruction is the `cmpxchg16b`, so its address is
// the instruction's. It only reads RBX and RCX and changes RAX, RDX and the pair.
core::arch::global_asm!(
    ".section .text, \"ax\"",
    ".global guest_cmpxchg16b",
    "guest_cmpxchg16b:",
    "cmpxchg16b [rdi]",
    "ret",
);

unsafe extern "C" {
    fn guest_cmpxchg16b(pair: *mut u64);
}

/// The `unemulated` scenario: prints the address of a `cmpxchg16b` and executes it. Where
/// the CPU runs it, the guest reports `PASS`; where KVM refuses it, the run ends with the
/// VMM's vCPU-stopped error at that address.
pub fn unemulated() -> ! {
    #[repr(C, align(16))]
    struct Pair([u64; 2]);
    let mut pair = Pair([1, 2]);
    let at = guest_cmpxchg16b as *const () as u64;
    println!("unemulated: cmpxchg16b at {:#x}", at);
    if arch::cpuid(1).2 & (1 << 13) == 0 {
        println!("unemulated: no CMPXCHG16B in CPUID (--cpuid-hide cx16?)");
        exit(code::CHECK_FAILED)
    }
    // SAFETY: the pair is 16-byte aligned and ours; CPUID says CMPXCHG16B.
    unsafe { guest_cmpxchg16b(pair.0.as_mut_ptr()) }
    println!("unemulated: the CPU ran it: {:?}", pair.0);
    println!("verdict: PASS");
    exit(code::PASS)
}
