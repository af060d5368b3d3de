//! Instructions KVM gave up on, completed by the VMM with their architectural effect.
//!
//! Some KVMs run guest ring-0 code in KVM's instruction emulator (the nested KVM of the
//! machines this project is developed on does, see `docs/boot.md`), and that emulator
//! refuses a few instructions a stock Linux kernel executes. KVM then stops the vCPU with
//! `KVM_EXIT_INTERNAL_ERROR`, suberror `KVM_INTERNAL_ERROR_EMULATION`, and (when it has
//! them) the instruction's bytes. For a small, documented set the VMM completes the
//! instruction itself and enters the guest again:
//!
//! | instruction | effect |
//! |---|---|
//! | `int3` (`CC`) | `#BP` delivered as a trap: RIP past the instruction, then the exception |
//! | `clac` / `stac` (`0F 01 CA` / `CB`) | RFLAGS.AC cleared / set; `#UD` outside ring 0 |
//! | `popcnt r, r` (`F3 [REX] 0F B8`, register form) | population count, ZF on a zero source, other arithmetic flags cleared |
//! | `fwait` (`9B`) | `#NM` when CR0.MP and CR0.TS are set, `#MF` when an unmasked x87 exception is pending (CR0.NE), otherwise nothing |
//!
//! Anything else (including `popcnt` with a memory operand) keeps the clear
//! "KVM could not emulate an instruction" stop. The code only ever runs after KVM has given
//! up on an instruction, so it changes nothing where KVM runs guest code itself. Each kind
//! completed is counted in the run report.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    kvm_regs, KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub mod syscall;

/// The kinds of instruction the VMM completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `int3`.
    Int3,
    /// `clac`.
    Clac,
    /// `stac`.
    Stac,
    /// `popcnt` between registers.
    Popcnt,
    /// `fwait` / `wait`.
    Fwait,
    /// `syscall` from user space whose transition to ring 0 KVM left undone
    /// ([`syscall`]).
    Syscall,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Self; 6] = [
        Self::Int3,
        Self::Clac,
        Self::Stac,
        Self::Popcnt,
        Self::Fwait,
        Self::Syscall,
    ];

    /// Its mnemonic.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Int3 => "int3",
            Self::Clac => "clac",
            Self::Stac => "stac",
            Self::Popcnt => "popcnt",
            Self::Fwait => "fwait",
            Self::Syscall => "syscall",
        }
    }

    fn slot(self) -> usize {
        match self {
            Self::Int3 => 0,
            Self::Clac => 1,
            Self::Stac => 2,
            Self::Popcnt => 3,
            Self::Fwait => 4,
            Self::Syscall => 5,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded instruction the VMM can complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// What it is.
    pub kind: Kind,
    /// Its length in bytes.
    pub len: u8,
    /// For `popcnt`: destination and source register numbers (0 RAX .. 15 R15) and the
    /// operand size in bytes (2, 4 or 8).
    pub operands: Option<(u8, u8, u8)>,
}

/// Decodes the start of `bytes` as one of the instructions of the set, or `None`.
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<Decoded> {
    let simple = |kind, len| {
        Some(Decoded {
            kind,
            len,
            operands: None,
        })
    };
    match bytes {
        [0xcc, ..] => return simple(Kind::Int3, 1),
        [0x9b, ..] => return simple(Kind::Fwait, 1),
        [0x0f, 0x01, 0xca, ..] => return simple(Kind::Clac, 3),
        [0x0f, 0x01, 0xcb, ..] => return simple(Kind::Stac, 3),
        _ => {}
    }
    decode_popcnt(bytes)
}

/// `[66] F3 [66] [REX] 0F B8 /r` with a register operand (ModRM.mod = 3).
fn decode_popcnt(bytes: &[u8]) -> Option<Decoded> {
    let mut at = 0usize;
    let (mut rep, mut operand16) = (false, false);
    loop {
        match bytes.get(at) {
            Some(0xf3) if !rep => rep = true,
            Some(0x66) if !operand16 => operand16 = true,
            _ => break,
        }
        at += 1;
    }
    if !rep {
        return None;
    }
    let rex = match bytes.get(at) {
        Some(&b) if b & 0xf0 == 0x40 => {
            at += 1;
            b
        }
        _ => 0,
    };
    let (Some(0x0f), Some(0xb8), Some(&modrm)) =
        (bytes.get(at), bytes.get(at + 1), bytes.get(at + 2))
    else {
        return None;
    };
    if modrm >> 6 != 3 {
        return None;
    }
    let dst = ((modrm >> 3) & 7) | ((rex & 0b100) << 1);
    let src = (modrm & 7) | ((rex & 0b001) << 3);
    let size = if rex & 0b1000 != 0 {
        8
    } else if operand16 {
        2
    } else {
        4
    };
    Some(Decoded {
        kind: Kind::Popcnt,
        len: u8::try_from(at + 3).ok()?,
        operands: Some((dst, src, size)),
    })
}

/// How many of each kind the VMM completed, shared by the vCPU threads.
#[derive(Debug, Default)]
pub struct Completions([AtomicU64; 6]);

impl Completions {
    /// Counts one completion of `kind`.
    pub fn count(&self, kind: Kind) {
        if let Some(c) = self.0.get(kind.slot()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far, by kind (kinds never completed left out).
    #[must_use]
    pub fn counts(&self) -> Vec<(Kind, u64)> {
        Kind::ALL
            .iter()
            .filter_map(|&k| {
                let n = self.0.get(k.slot())?.load(Ordering::Relaxed);
                (n > 0).then_some((k, n))
            })
            .collect()
    }
}

/// The architectural flags `popcnt` writes: OF SF ZF AF PF CF.
const POPCNT_FLAGS: u64 = (1 << 11) | (1 << 7) | (1 << 6) | (1 << 4) | (1 << 2) | 1;
const ZF: u64 = 1 << 6;
const AC: u64 = 1 << 18;
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
/// x87 status word: error summary.
const FSW_ES: u16 = 1 << 7;

const UD: u8 = 6;
const NM: u8 = 7;
const MF: u8 = 16;
const BP: u8 = 3;

/// A general-purpose register by number (0 RAX .. 15 R15).
fn gpr(regs: &mut kvm_regs, n: u8) -> Option<&mut u64> {
    Some(match n {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        15 => &mut regs.r15,
        _ => return None,
    })
}

/// What completing an instruction does to the vCPU beyond its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Registers changed (RIP past the instruction); nothing else.
    Done,
    /// Registers changed, then this exception is delivered (a trap: `int3`).
    Trap(u8),
    /// The instruction faults: RIP stays, this exception is delivered.
    Fault(u8),
}

/// The state the effect of an instruction depends on beyond the general registers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    /// The current privilege level.
    pub cpl: u8,
    /// CR0.
    pub cr0: u64,
    /// The x87 status word.
    pub fsw: u16,
}

/// Applies `insn`'s architectural effect to `regs`, given `ctx`.
pub fn apply(insn: &Decoded, regs: &mut kvm_regs, ctx: &Context) -> Effect {
    let next = regs.rip.wrapping_add(u64::from(insn.len));
    match insn.kind {
        Kind::Int3 => {
            regs.rip = next;
            return Effect::Trap(BP);
        }
        Kind::Clac | Kind::Stac if ctx.cpl != 0 => return Effect::Fault(UD),
        Kind::Clac => regs.rflags &= !AC,
        Kind::Stac => regs.rflags |= AC,
        Kind::Fwait if ctx.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS => return Effect::Fault(NM),
        Kind::Fwait if ctx.fsw & FSW_ES != 0 && ctx.cr0 & CR0_NE != 0 => return Effect::Fault(MF),
        Kind::Fwait | Kind::Syscall => {}
        Kind::Popcnt => {
            let Some((dst, src, size)) = insn.operands else {
                return Effect::Fault(UD);
            };
            let mask = match size {
                2 => 0xffff,
                4 => 0xffff_ffff,
                _ => u64::MAX,
            };
            let value = gpr(regs, src).map_or(0, |r| *r) & mask;
            let count = u64::from(value.count_ones());
            if let Some(r) = gpr(regs, dst) {
                // A 32-bit result clears the upper half; a 16-bit one keeps the rest.
                *r = if size == 2 {
                    (*r & !0xffff) | count
                } else {
                    count
                };
            }
            regs.rflags &= !POPCNT_FLAGS;
            if value == 0 {
                regs.rflags |= ZF;
            }
        }
    }
    regs.rip = next;
    Effect::Done
}

/// Why KVM stopped, read from `kvm_run` after an internal-error exit: its suberror and,
/// for an emulation failure that carries them, the instruction's bytes.
fn emulation_failure(vcpu: &mut VcpuFd) -> (u32, Option<Vec<u8>>) {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return (0, None);
    }
    // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member of the
    // exit union, and for suberror KVM_INTERNAL_ERROR_EMULATION the `emulation_failure`
    // view of it; both are plain data, and the flag says whether the bytes are valid.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return (failure.suberror, None);
    }
    if failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 {
        return (failure.suberror, None);
    }
    // SAFETY: as above; the union has one member.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    let size = usize::from(insn.insn_size).min(insn.insn_bytes.len());
    (
        failure.suberror,
        insn.insn_bytes.get(..size).map(<[u8]>::to_vec),
    )
}

/// Reads up to `len` bytes of guest-virtual memory at `at` through the guest's page
/// tables (`KVM_TRANSLATE`), stopping at the first page that does not translate.
fn read_virtual(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mut at: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let Ok(t) = vcpu.translate_gva(at) else {
            break;
        };
        if t.valid == 0 {
            break;
        }
        let in_page = 0x1000 - (at & 0xfff);
        let want = (len - out.len()).min(usize::try_from(in_page).unwrap_or(len));
        let mut buf = vec![0u8; want];
        if mem
            .read_slice(&mut buf, GuestAddress(t.physical_address))
            .is_err()
        {
            break;
        }
        out.extend_from_slice(&buf);
        at = at.wrapping_add(in_page);
    }
    out
}

/// Completes the instruction KVM gave up on, if it is one of the set. `Ok(kind)` when it
/// was completed (the vCPU can run again); `Err(suberror)` when it was not.
///
/// # Errors
/// KVM's suberror, when the exit was not an emulation failure of an instruction in the set
/// or the vCPU's state could not be read or written.
pub fn complete(
    vcpu: &mut VcpuFd,
    mem: Option<&GuestMemoryMmap>,
    completions: &Completions,
) -> Result<Kind, u32> {
    let (suberror, bytes) = emulation_failure(vcpu);
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(suberror);
    }
    let mut regs = vcpu.get_regs().map_err(|_| suberror)?;
    let bytes = match (bytes, mem) {
        (Some(b), _) if !b.is_empty() => b,
        (_, Some(mem)) => read_virtual(vcpu, mem, regs.rip, 15),
        _ => return Err(suberror),
    };
    let insn = decode(&bytes).ok_or(suberror)?;
    let ctx = context(vcpu, insn.kind).ok_or(suberror)?;
    let effect = apply(&insn, &mut regs, &ctx);
    if !matches!(effect, Effect::Fault(_)) {
        vcpu.set_regs(&regs).map_err(|_| suberror)?;
    }
    match effect {
        Effect::Done => {}
        Effect::Trap(vector) | Effect::Fault(vector) => {
            inject(vcpu, vector).map_err(|_| suberror)?;
        }
    }
    completions.count(insn.kind);
    Ok(insn.kind)
}

/// Reads what `kind`'s effect depends on (only what it needs: `int3` and `popcnt` need
/// nothing).
fn context(vcpu: &VcpuFd, kind: Kind) -> Option<Context> {
    let mut ctx = Context::default();
    match kind {
        Kind::Int3 | Kind::Popcnt | Kind::Syscall => {}
        Kind::Clac | Kind::Stac => ctx.cpl = vcpu.get_sregs().ok()?.cs.dpl,
        Kind::Fwait => {
            ctx.cr0 = vcpu.get_sregs().ok()?.cr0;
            ctx.fsw = vcpu.get_fpu().ok()?.fsw;
        }
    }
    Some(ctx)
}

/// Delivers exception `vector` (one without an error code) at the next entry.
fn inject(vcpu: &VcpuFd, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let mut events = vcpu.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_decodes_and_nothing_else_does() {
        assert_eq!(
            decode(&[0xcc, 0x90]).map(|d| (d.kind, d.len)),
            Some((Kind::Int3, 1))
        );
        assert_eq!(decode(&[0x9b]).map(|d| d.kind), Some(Kind::Fwait));
        assert_eq!(
            decode(&[0x0f, 0x01, 0xca]).map(|d| d.kind),
            Some(Kind::Clac)
        );
        assert_eq!(
            decode(&[0x0f, 0x01, 0xcb]).map(|d| d.kind),
            Some(Kind::Stac)
        );
        // popcnt %rdi, %rax (Linux's __arch_hweight64).
        let p = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(
            (p.kind, p.len, p.operands),
            (Kind::Popcnt, 5, Some((0, 7, 8)))
        );
        // popcnt %r9d, %r10d.
        let p = decode(&[0xf3, 0x45, 0x0f, 0xb8, 0xd1]).unwrap();
        assert_eq!(p.operands, Some((10, 9, 4)));
        // popcnt %cx, %dx (66 before or after F3).
        for bytes in [
            [0x66, 0xf3, 0x0f, 0xb8, 0xd1],
            [0xf3, 0x66, 0x0f, 0xb8, 0xd1],
        ] {
            assert_eq!(decode(&bytes).unwrap().operands, Some((2, 1, 2)));
        }
        for other in [
            &[][..],
            &[0x0f, 0x01],             // truncated
            &[0x0f, 0x01, 0xd0],       // xgetbv
            &[0xf3, 0x0f, 0xb8, 0x07], // popcnt (%rdi), %eax: memory operand
            &[0x0f, 0xb8, 0xc0],       // jmpe, not popcnt
            &[0xf3, 0x48, 0x0f, 0xb8], // no ModRM
            &[0x0f, 0xc7, 0x0e],       // cmpxchg16b
            &[0xf3, 0xf3, 0x0f, 0xb8, 0xc0],
        ] {
            assert_eq!(decode(other), None, "{other:x?}");
        }
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0x1000,
            rflags: 0x2 | POPCNT_FLAGS,
            ..kvm_regs::default()
        }
    }

    #[test]
    fn popcnt_counts_sets_zf_only_for_zero_and_sizes_its_result() {
        let mut r = regs();
        r.rdi = 0xf0f0_0000_0000_0001;
        r.rax = u64::MAX;
        let insn = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(apply(&insn, &mut r, &Context::default()), Effect::Done);
        assert_eq!((r.rax, r.rip, r.rflags), (9, 0x1005, 0x2));
        r.rdi = 0;
        apply(&insn, &mut r, &Context::default());
        assert_eq!((r.rax, r.rflags), (0, 0x2 | ZF));
        // 32-bit: upper half of the source ignored, destination zero-extended.
        let mut r = regs();
        r.rcx = 0xffff_ffff_0000_0003;
        r.rdx = u64::MAX;
        apply(
            &decode(&[0xf3, 0x0f, 0xb8, 0xd1]).unwrap(),
            &mut r,
            &Context::default(),
        );
        assert_eq!(r.rdx, 2);
        // 16-bit: the destination's upper bits kept.
        let mut r = regs();
        r.rcx = 0xffff_0007;
        r.rdx = 0x1234_5678_9abc_def0;
        apply(
            &decode(&[0x66, 0xf3, 0x0f, 0xb8, 0xd1]).unwrap(),
            &mut r,
            &Context::default(),
        );
        assert_eq!(r.rdx, 0x1234_5678_9abc_0003);
    }

    #[test]
    fn int3_is_a_trap_and_clac_stac_fault_outside_ring_0() {
        let mut r = regs();
        let int3 = decode(&[0xcc]).unwrap();
        assert_eq!(apply(&int3, &mut r, &Context::default()), Effect::Trap(BP));
        assert_eq!(r.rip, 0x1001, "a trap: the saved RIP is past the int3");
        let (clac, stac) = (
            decode(&[0x0f, 0x01, 0xca]).unwrap(),
            decode(&[0x0f, 0x01, 0xcb]).unwrap(),
        );
        let mut r = regs();
        apply(&stac, &mut r, &Context::default());
        assert_eq!((r.rflags & AC, r.rip), (AC, 0x1003));
        apply(&clac, &mut r, &Context::default());
        assert_eq!((r.rflags & AC, r.rip), (0, 0x1006));
        let user = Context {
            cpl: 3,
            ..Context::default()
        };
        assert_eq!(apply(&stac, &mut r, &user), Effect::Fault(UD));
        assert_eq!(
            (r.rflags & AC, r.rip),
            (0, 0x1006),
            "a fault changes nothing"
        );
    }

    #[test]
    fn fwait_faults_as_the_x87_state_says() {
        let fwait = decode(&[0x9b]).unwrap();
        let mut r = regs();
        let ctx = |cr0, fsw| Context { cpl: 0, cr0, fsw };
        assert_eq!(
            apply(&fwait, &mut r, &ctx(CR0_MP | CR0_TS, 0)),
            Effect::Fault(NM)
        );
        assert_eq!(
            apply(&fwait, &mut r, &ctx(CR0_NE, FSW_ES)),
            Effect::Fault(MF)
        );
        assert_eq!(r.rip, 0x1000);
        assert_eq!(
            apply(&fwait, &mut r, &ctx(CR0_TS | CR0_NE, 0)),
            Effect::Done
        );
        assert_eq!(r.rip, 0x1001);
    }

    #[test]
    fn completions_are_counted_by_kind() {
        let c = Completions::default();
        c.count(Kind::Clac);
        c.count(Kind::Clac);
        c.count(Kind::Int3);
        assert_eq!(c.counts(), vec![(Kind::Int3, 1), (Kind::Clac, 2)]);
    }
}
