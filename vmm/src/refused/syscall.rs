//! `syscall` from user space on a KVM that leaves the vCPU in ring 3 at the kernel's entry.
//!
//! The nested KVM of these machines runs guest user code natively and carries out most of
//! `syscall` for it (RCX gets the return address, R11 the flags, RFLAGS is masked with
//! `IA32_FMASK`, RIP becomes `IA32_LSTAR`) but keeps the user's CS and SS. The kernel's
//! entry instruction is then fetched at CPL 3, from a supervisor page: a page fault, which
//! KVM delivers to the guest, and the task dies. The VMM watches for exactly that:
//!
//! 1. Writes of `IA32_LSTAR` exit to the VMM (an MSR filter that denies only that write;
//!    the VMM writes the value itself), so it knows the entry point. It reads the page-fault
//!    handler's address from the guest's IDT (vector 14) at the same moment.
//! 2. Hardware breakpoints (`KVM_SET_GUEST_DEBUG`) on both: breakpoint 0 on the entry, which
//!    fires only where KVM runs the entry in ring 0 (it did the whole transition: the watch
//!    turns itself off for good on that vCPU), and breakpoint 1 on the page-fault handler.
//! 3. At the page-fault handler, a fault whose saved RIP and CR2 are the entry point and
//!    whose saved CS is a user segment is that failed `syscall`: the VMM undoes the fault
//!    (RSP and RFLAGS from the frame the CPU pushed; RCX and R11 are untouched by the fault)
//!    and completes the transition as the architecture defines it: CS is `IA32_STAR[47:32]`
//!    (a flat 64-bit ring-0 code segment), SS that plus 8 (flat data), RIP the entry. From
//!    then on only breakpoint 1 stays armed on that vCPU. Any other page fault goes on: the
//!    VMM steps over the handler's first instruction (`KVM_GUESTDBG_SINGLESTEP`, since KVM's
//!    emulator takes a user-space breakpoint again whatever RFLAGS.RF says) and re-arms.
//!
//! Costs: two exits per ordinary page fault and one per `syscall` while armed. While it is
//! armed the guest's own hardware breakpoints are the VMM's (a kernel debugger in the guest
//! would not get them); on a KVM that does `syscall` right the watch costs the page faults
//! before the first system call and one exit.

use kvm_bindings::{
    kvm_guest_debug, kvm_msr_entry, kvm_segment, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::read_virtual;

/// `IA32_LSTAR`: the 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `IA32_STAR`: the `syscall`/`sysret` selectors.
const MSR_STAR: u32 = 0xc000_0081;
/// RFLAGS.RF.
const RF: u64 = 1 << 16;
/// DR7: breakpoint 0 / 1 enabled (local and global), on execution (RW = LEN = 0).
const DR7_BP0: u64 = 0b0011;
const DR7_BP1: u64 = 0b1100;
/// The page-fault vector.
const PF: u64 = 14;

/// Makes the guest's writes of `IA32_LSTAR` exit to the VMM. `false` when this KVM cannot
/// (no `KVM_CAP_X86_USER_SPACE_MSR` or MSR filter): then there is no watch.
pub fn install(vm: &VmFd) -> bool {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    if vm.enable_cap(&cap).is_err() {
        return false;
    }
    // One MSR, its bit clear: writes denied (to user space), reads untouched.
    let deny = [0u8];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::WRITE,
        base: MSR_LSTAR,
        msr_count: 1,
        bitmap: &deny,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .is_ok()
}

/// What a debug exit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// The entry was reached in ring 0: KVM does `syscall` itself; the watch is off.
    Native,
    /// A `syscall` KVM left in ring 3, completed by the VMM.
    Completed,
    /// Another page fault, or the end of a step over the handler's first instruction: the
    /// guest goes on as it would have.
    Passed,
}

/// What the watch knows about this vCPU's KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Verdict {
    /// Nothing yet: both breakpoints armed.
    #[default]
    Unknown,
    /// KVM left a `syscall` in ring 3: only the page-fault breakpoint stays.
    Broken,
    /// KVM reached the entry in ring 0: no breakpoints.
    Native,
}

/// One vCPU's watch on the kernel's `syscall` entry.
#[derive(Debug, Default)]
pub struct SyscallWatch {
    entry: Option<u64>,
    fault_handler: Option<u64>,
    verdict: Verdict,
    stepping: bool,
    /// Whether the vCPU's debug state may hold breakpoints of the watch.
    programmed: bool,
}

fn msr(index: u32, data: u64) -> Result<Msrs, kvm_ioctls::Error> {
    Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> Result<u64, kvm_ioctls::Error> {
    let mut msrs = msr(index, 0)?;
    vcpu.get_msrs(&mut msrs)?;
    Ok(msrs.as_slice().first().map_or(0, |e| e.data))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let word = bytes.get(at..at + 8)?;
    Some(u64::from_le_bytes(word.try_into().ok()?))
}

/// The handler of `vector` in the guest's current IDT (a 64-bit gate's offset fields).
fn idt_handler(vcpu: &VcpuFd, mem: &GuestMemoryMmap, vector: u64) -> Option<u64> {
    let idt = vcpu.get_sregs().ok()?.idt;
    if u64::from(idt.limit) < vector * 16 + 15 {
        return None;
    }
    let gate = read_virtual(vcpu, mem, idt.base.wrapping_add(vector * 16), 16);
    let (low, high) = (u64_at(&gate, 0)?, u64_at(&gate, 8)?);
    let present = low & (1 << 47) != 0;
    let offset = (low & 0xffff) | ((low >> 32) & 0xffff_0000) | ((high & 0xffff_ffff) << 32);
    present.then_some(offset)
}

impl SyscallWatch {
    /// Arms the watch on the entry point the vCPU already has (after a restore or a
    /// pause), if any.
    ///
    /// # Errors
    /// KVM's, reading the MSR. Where KVM cannot set breakpoints there is no watch.
    pub fn resume(
        &mut self,
        vcpu: &VcpuFd,
        mem: Option<&GuestMemoryMmap>,
    ) -> Result<(), kvm_ioctls::Error> {
        let entry = read_msr(vcpu, MSR_LSTAR)?;
        self.arm(vcpu, mem, entry);
        Ok(())
    }

    /// The guest wrote `IA32_LSTAR` (the filter stopped the write): writes it and moves
    /// the watch there. A value KVM refuses (a non-canonical address) makes the guest's
    /// `wrmsr` fault with `#GP`, as the CPU's would, and changes nothing.
    ///
    /// # Errors
    /// KVM's, writing the MSR.
    pub fn lstar_written(
        &mut self,
        vcpu: &mut VcpuFd,
        mem: Option<&GuestMemoryMmap>,
        value: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        if vcpu.set_msrs(&msr(MSR_LSTAR, value)?)? != 1 {
            let run = vcpu.get_kvm_run();
            if run.exit_reason == kvm_bindings::KVM_EXIT_X86_WRMSR {
                // The exit's `msr` member: an `error` makes KVM inject #GP on the next entry.
                run.__bindgen_anon_1.msr.error = 1;
            }
            return Ok(());
        }
        self.arm(vcpu, mem, value);
        Ok(())
    }

    fn arm(&mut self, vcpu: &VcpuFd, mem: Option<&GuestMemoryMmap>, entry: u64) {
        // LSTAR 0 is "no entry point" (a kernel clearing it, a guest without `syscall`).
        self.entry = (entry != 0).then_some(entry);
        self.fault_handler = self
            .entry
            .and(mem)
            .and_then(|mem| idt_handler(vcpu, mem, PF));
        if self.program(vcpu).is_err() {
            // A KVM without guest debugging: no watch (its `syscall` is then the guest's
            // and KVM's business, as without this module).
            self.verdict = Verdict::Native;
            self.programmed = false;
        }
    }

    /// Sets the vCPU's debug state for the watch's state (no ioctl when there is nothing
    /// to set or clear).
    fn program(&mut self, vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        let mut debug = kvm_guest_debug::default();
        if self.stepping {
            debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
            self.programmed = true;
            return vcpu.set_guest_debug(&debug);
        }
        let mut dr7 = 0;
        if let (Some(entry), Verdict::Unknown) = (self.entry, self.verdict) {
            debug.arch.debugreg[0] = entry;
            dr7 |= DR7_BP0;
        }
        if let (Some(handler), Verdict::Unknown | Verdict::Broken) =
            (self.fault_handler, self.verdict)
        {
            debug.arch.debugreg[1] = handler;
            dr7 |= DR7_BP1;
        }
        if dr7 == 0 && !self.programmed {
            return Ok(());
        }
        if dr7 != 0 {
            debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            debug.arch.debugreg[7] = dr7;
        }
        self.programmed = dr7 != 0;
        vcpu.set_guest_debug(&debug)
    }

    /// A debug exit at `pc`: `Ok(Some(hit))` when it was the watch's and the vCPU can run
    /// on, `Ok(None)` when it was not the watch's.
    ///
    /// # Errors
    /// KVM's, reading or writing the vCPU's state.
    pub fn hit(
        &mut self,
        vcpu: &VcpuFd,
        mem: Option<&GuestMemoryMmap>,
        pc: u64,
    ) -> Result<Option<Hit>, kvm_ioctls::Error> {
        if self.stepping {
            self.stepping = false;
            self.program(vcpu)?;
            return Ok(Some(Hit::Passed));
        }
        if self.verdict == Verdict::Unknown && self.entry == Some(pc) {
            if vcpu.get_sregs()?.cs.selector & 3 == 0 {
                self.verdict = Verdict::Native;
                self.program(vcpu)?;
                return Ok(Some(Hit::Native));
            }
            // A KVM that takes the breakpoint in ring 3: complete the transition here and
            // step over the entry's first instruction.
            self.complete(vcpu, None)?;
            self.stepping = true;
            self.program(vcpu)?;
            return Ok(Some(Hit::Completed));
        }
        if self.verdict == Verdict::Native || self.fault_handler != Some(pc) {
            return Ok(None);
        }
        if let Some(mem) = mem {
            if let Some(frame) = self.failed_syscall(vcpu, mem)? {
                self.complete(vcpu, Some(frame))?;
                self.verdict = Verdict::Broken;
                self.program(vcpu)?;
                return Ok(Some(Hit::Completed));
            }
        }
        self.stepping = true;
        self.program(vcpu)?;
        Ok(Some(Hit::Passed))
    }

    /// At the page-fault handler's first instruction: the frame the CPU pushed (RSP,
    /// RFLAGS) when the fault is a fetch of the `syscall` entry at CPL 3.
    fn failed_syscall(
        &self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<Frame>, kvm_ioctls::Error> {
        // Most page faults are not at the entry: CR2 tells without reading the frame.
        if self.entry != Some(vcpu.get_sregs()?.cr2) {
            return Ok(None);
        }
        let words = read_virtual(vcpu, mem, vcpu.get_regs()?.rsp, 48);
        // [error code, RIP, CS, RFLAGS, RSP, SS]
        let (Some(rip), Some(cs), Some(rflags), Some(rsp)) = (
            u64_at(&words, 8),
            u64_at(&words, 16),
            u64_at(&words, 24),
            u64_at(&words, 32),
        ) else {
            return Ok(None);
        };
        let ours = self.entry == Some(rip) && cs & 3 == 3;
        Ok(ours.then_some(Frame { rsp, rflags }))
    }

    /// Puts the vCPU at the entry in ring 0, as `syscall` would have; with `frame`, the
    /// page fault is undone first.
    fn complete(&self, vcpu: &VcpuFd, frame: Option<Frame>) -> Result<(), kvm_ioctls::Error> {
        let star = read_msr(vcpu, MSR_STAR)?;
        let mut sregs = vcpu.get_sregs()?;
        (sregs.cs, sregs.ss) = ring0_segments(star);
        vcpu.set_sregs(&sregs)?;
        if let (Some(frame), Some(entry)) = (frame, self.entry) {
            let mut regs = vcpu.get_regs()?;
            regs.rip = entry;
            regs.rsp = frame.rsp;
            regs.rflags = frame.rflags & !RF;
            vcpu.set_regs(&regs)?;
        }
        Ok(())
    }
}

/// What the page fault saved of the `syscall`'s state.
#[derive(Debug, Clone, Copy)]
struct Frame {
    rsp: u64,
    rflags: u64,
}

/// The flat ring-0 code and stack segments `syscall` loads from `IA32_STAR`.
#[must_use]
pub fn ring0_segments(star: u64) -> (kvm_segment, kvm_segment) {
    let selector = u16::try_from((star >> 32) & 0xfffc).unwrap_or(0);
    let flat = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        present: 1,
        dpl: 0,
        s: 1,
        g: 1,
        ..Default::default()
    };
    let cs = kvm_segment {
        selector,
        type_: 0b1011, // execute/read, accessed
        l: 1,
        db: 0,
        ..flat
    };
    let ss = kvm_segment {
        selector: selector.wrapping_add(8),
        type_: 0b0011, // read/write, accessed
        l: 0,
        db: 1,
        ..flat
    };
    (cs, ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_segments_are_linuxs_kernel_code_and_data() {
        // Linux: STAR = __USER32_CS << 48 | __KERNEL_CS << 32.
        let star = (0x23u64 << 48) | (0x10u64 << 32);
        let (cs, ss) = ring0_segments(star);
        assert_eq!(
            (cs.selector, cs.dpl, cs.l, cs.db, cs.type_),
            (0x10, 0, 1, 0, 11)
        );
        assert_eq!(
            (ss.selector, ss.dpl, ss.l, ss.db, ss.type_),
            (0x18, 0, 0, 1, 3)
        );
        // The RPL bits of the MSR are not the CPL.
        assert_eq!(ring0_segments(0x13u64 << 32).0.selector, 0x10);
    }
}
