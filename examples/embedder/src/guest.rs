//! The guest: a few dozen x86-64 instructions, assembled here, that allocate remapping
//! entries with the hypercall, program the IMS device's slot, and count the interrupts
//! of both sources until each has delivered `count`. Also the 64-bit state it starts in
//! (identity page tables, GDT and TSS, an IDT), as any VMM writes it.

use irvm_hypercall::abi::{call, TargetWord};
use irvm_hypercall::ims::slots::reg;
use irvm_hypercall::platform::HYPERCALL_PORT;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest RAM.
pub const RAM: u64 = 2 << 20;
/// Page tables: PML4, PDPT, then four page directories (4 GiB in 2-MiB pages).
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x8000;
const TSS: u64 = 0x8100;
const IDT: u64 = 0x9000;
/// Counters the guest's handlers increment: IMS at +0, MSI-X at +4; the VT-d version
/// the guest read at +8.
pub const COUNTERS: u64 = 0xa000;
/// Where the code is loaded and entered.
pub const CODE: u64 = 0x1_0000;
const STACK_TOP: u64 = 0x2_0000;
/// Vectors of the two sources.
pub const IMS_VECTOR: u8 = 0x40;
/// Vector of the MSI-X device's vector 0.
pub const MSIX_VECTOR: u8 = 0x41;
/// The guest writes the entry for the MSI-X device's vector 0 here when it is set up.
pub const READY_PORT: u16 = 0x600;
/// The guest writes 0 here when both sources delivered, or a failed call's status.
pub const EXIT_PORT: u16 = 0x601;
const LAPIC: u64 = 0xfee0_0000;

#[derive(Clone, Copy)]
#[repr(u8)]
enum Reg {
    Eax = 0,
    Ecx = 1,
    Edx = 2,
    Ebp = 5,
    Esi = 6,
    Edi = 7,
}

/// Just enough of an x86-64 assembler for the guest below: 32-bit operations, RDI as the
/// one address register, rel32 jumps to labels.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    fn imm(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.code.len()));
        self
    }
    /// `mov r32, imm32`.
    fn mov(&mut self, r: Reg, v: u32) -> &mut Self {
        self.bytes(&[0xb8 + r as u8]).imm(v)
    }
    /// `mov rdi, imm64`.
    fn rdi(&mut self, v: u64) -> &mut Self {
        self.bytes(&[0x48, 0xbf]).bytes(&v.to_le_bytes())
    }
    /// `mov dword [rdi + disp], imm32`.
    fn store(&mut self, disp: u32, v: u32) -> &mut Self {
        self.bytes(&[0xc7, 0x87]).imm(disp).imm(v)
    }
    /// `mov [rdi + disp], eax`.
    fn store_eax(&mut self, disp: u32) -> &mut Self {
        self.bytes(&[0x89, 0x87]).imm(disp)
    }
    /// `mov eax, [rdi + disp]`.
    fn load_eax(&mut self, disp: u32) -> &mut Self {
        self.bytes(&[0x8b, 0x87]).imm(disp)
    }
    /// `inc dword [rdi + disp]`.
    fn inc(&mut self, disp: u32) -> &mut Self {
        self.bytes(&[0xff, 0x87]).imm(disp)
    }
    /// `cmp dword [rdi + disp], imm32`.
    fn cmp(&mut self, disp: u32, v: u32) -> &mut Self {
        self.bytes(&[0x81, 0xbf]).imm(disp).imm(v)
    }
    /// `test eax, eax`.
    fn test_eax(&mut self) -> &mut Self {
        self.bytes(&[0x85, 0xc0])
    }
    /// `mov dst32, src32`.
    fn copy(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.bytes(&[0x89, 0xc0 | ((src as u8) << 3) | dst as u8])
    }
    /// `mov rdi, rbx`.
    fn rdi_from_rbx(&mut self) -> &mut Self {
        self.bytes(&[0x48, 0x89, 0xdf])
    }
    /// `mov rdi, r12`.
    fn rdi_from_r12(&mut self) -> &mut Self {
        self.bytes(&[0x4c, 0x89, 0xe7])
    }
    /// `shl eax, n`, then `or eax, imm32`.
    fn shl_or(&mut self, n: u8, v: u32) -> &mut Self {
        self.bytes(&[0xc1, 0xe0, n, 0x0d]).imm(v)
    }
    /// `out dx, eax`.
    fn out(&mut self) -> &mut Self {
        self.bytes(&[0xef])
    }
    fn jump(&mut self, opcode: &[u8], to: &'static str) -> &mut Self {
        self.bytes(opcode);
        self.fixups.push((self.code.len(), to));
        self.imm(0)
    }
    /// `jne label`.
    fn jne(&mut self, to: &'static str) -> &mut Self {
        self.jump(&[0x0f, 0x85], to)
    }
    /// `jb label`.
    fn jb(&mut self, to: &'static str) -> &mut Self {
        self.jump(&[0x0f, 0x82], to)
    }
    /// `jmp label`.
    fn jmp(&mut self, to: &'static str) -> &mut Self {
        self.jump(&[0xe9], to)
    }
    fn finish(mut self) -> (Vec<u8>, Vec<(&'static str, usize)>) {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| *n == to)
                .map_or(0, |l| l.1);
            let rel = i64::try_from(target).unwrap_or(0) - i64::try_from(at + 4).unwrap_or(0);
            let rel = i32::try_from(rel).unwrap_or(0).to_le_bytes();
            if let Some(slot) = self.code.get_mut(at..at + 4) {
                slot.copy_from_slice(&rel);
            }
        }
        (self.code, self.labels)
    }
}

/// The hypercall `number` for `requester` with RSI and RDI; a failure goes to `fail`
/// with the status in EAX.
fn hypercall(a: &mut Asm, number: u32, requester: u16, rsi: Option<u32>, rdi: u32) {
    a.mov(Reg::Eax, number).mov(Reg::Ecx, u32::from(requester));
    if let Some(v) = rsi {
        a.mov(Reg::Esi, v);
    }
    a.mov(Reg::Edi, rdi)
        .mov(Reg::Edx, u32::from(HYPERCALL_PORT))
        .out()
        .test_eax()
        .jne("fail");
}

/// Allocates one entry for `requester` and points it at vCPU 0 with `vector`; the entry
/// is left in EBP.
fn entry_for(a: &mut Asm, requester: u16, vector: u8) {
    hypercall(a, call::ALLOCATE, requester, Some(1), 0);
    a.copy(Reg::Ebp, Reg::Esi);
    let target = u32::try_from(TargetWord::fixed(0, vector).encode()).unwrap_or(0);
    hypercall(a, call::UPDATE, requester, None, target);
}

/// The assembled guest and where its interrupt handlers are.
#[derive(Debug)]
pub struct Program {
    /// The code, loaded at [`CODE`].
    pub code: Vec<u8>,
    /// (vector, handler address) for the IDT.
    pub handlers: [(u8, u64); 3],
}

/// The program, entered with RBX = the IMS device's BAR 0 and R12 = the VT-d unit's
/// registers; `ims` and `msix` are the two devices' requester IDs.
#[must_use]
pub fn program(ims: u16, msix: u16, count: u32) -> Program {
    let mut a = Asm::default();
    // The local APIC on (spurious vector 0xff), the VT-d unit's version noted.
    a.rdi(LAPIC).store(0xf0, 0x1ff);
    a.rdi_from_r12().load_eax(0).rdi(COUNTERS).store_eax(8);
    // The IMS device's slot 0 gets the remappable message of a new entry.
    entry_for(&mut a, ims, IMS_VECTOR);
    a.copy(Reg::Eax, Reg::Ebp).shl_or(5, 0xfee0_0010);
    let slot = u32::try_from(reg::SLOT_BASE).unwrap_or(0);
    a.rdi_from_rbx()
        .store_eax(slot)
        .store(slot + 4, 0)
        .store(slot + 8, 0)
        .store(slot + 12, 0);
    // The MSI-X device's vector 0: its entry goes to the VMM, which programs the vector.
    entry_for(&mut a, msix, MSIX_VECTOR);
    a.copy(Reg::Eax, Reg::Ebp)
        .mov(Reg::Edx, u32::from(READY_PORT))
        .out();
    // Sleep until both sources delivered `count` (sti; hlt cannot miss a wake-up).
    a.rdi(COUNTERS).label("wait").bytes(&[0xfa]);
    a.cmp(0, count).jb("sleep").cmp(4, count).jb("sleep");
    a.mov(Reg::Eax, 0)
        .label("fail")
        .mov(Reg::Edx, u32::from(EXIT_PORT))
        .out();
    a.label("stop").bytes(&[0xf4]).jmp("stop");
    a.label("sleep").bytes(&[0xfb, 0xf4]).jmp("wait");
    for (name, disp) in [("ims", 0), ("msix", 4)] {
        // push rdi; count; EOI; pop rdi; iretq
        a.label(name).bytes(&[0x57]).rdi(COUNTERS).inc(disp);
        a.rdi(LAPIC).store(0xb0, 0).bytes(&[0x5f, 0x48, 0xcf]);
    }
    a.label("spurious").bytes(&[0x48, 0xcf]);
    let (code, labels) = a.finish();
    let at = |name| CODE + labels.iter().find(|(n, _)| *n == name).map_or(0, |l| l.1) as u64;
    Program {
        code,
        handlers: [
            (IMS_VECTOR, at("ims")),
            (MSIX_VECTOR, at("msix")),
            (0xff, at("spurious")),
        ],
    }
}

/// Writes the page tables, GDT, TSS, IDT and `program` into `mem`.
///
/// # Errors
/// A write outside RAM.
pub fn load(mem: &GuestMemoryMmap, program: &Program) -> Result<(), GuestMemoryError> {
    const PRESENT_RW: u64 = 0b11;
    mem.write_obj(PDPT | PRESENT_RW, GuestAddress(PML4))?;
    for gib in 0..4u64 {
        let pd = PD + gib * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPT + gib * 8))?;
        for e in 0..512u64 {
            let addr = (gib << 30) + (e << 21);
            // 2-MiB pages; the MMIO hole above 3 GiB uncached.
            let uncached = if gib == 3 { 0b1_1000 } else { 0 };
            mem.write_obj(
                addr | PRESENT_RW | 1 << 7 | uncached,
                GuestAddress(pd + e * 8),
            )?;
        }
    }
    for (i, d) in gdt().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64))?;
    }
    // A TSS with no I/O bitmap.
    mem.write_obj(0x68u16, GuestAddress(TSS + 0x66))?;
    for (vector, at) in program.handlers {
        let gate = [
            (at & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((at >> 16) & 0xffff) << 48,
            at >> 32,
        ];
        mem.write_obj(gate, GuestAddress(IDT + 16 * u64::from(vector)))?;
    }
    mem.write_slice(&program.code, GuestAddress(CODE))
}

/// Null, 64-bit code (0x08), data (0x10), and a 64-bit TSS (0x18).
fn gdt() -> [u64; 5] {
    [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x67 | (TSS & 0xff_ffff) << 16 | 0x8b << 40,
        0,
    ]
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: if selector == 0x18 { TSS } else { 0 },
        limit: if selector == 0x18 { 0x67 } else { 0xffff_ffff },
        selector,
        type_,
        present: 1,
        s: u8::from(selector != 0x18),
        l: u8::from(long),
        db: u8::from(!long && selector != 0x18),
        g: u8::from(selector != 0x18),
        ..Default::default()
    }
}

/// 64-bit mode with paging, the GDT, TSS and IDT above; `base` is the vCPU's state.
#[must_use]
pub fn sregs(mut base: kvm_sregs) -> kvm_sregs {
    base.cs = segment(0x08, 0xb, true);
    let data = segment(0x10, 0x3, false);
    (base.ds, base.es, base.fs, base.gs, base.ss) = (data, data, data, data, data);
    base.tr = segment(0x18, 0xb, false);
    base.gdt.base = GDT;
    base.gdt.limit = 5 * 8 - 1;
    base.idt.base = IDT;
    base.idt.limit = 256 * 16 - 1;
    // PE, MP, ET, NE, WP, PG; PAE; LME and LMA.
    base.cr0 = 0x8001_0033;
    base.cr3 = PML4;
    base.cr4 = 1 << 5;
    base.efer |= (1 << 8) | (1 << 10);
    base
}

/// The registers at entry: RBX = the IMS device's BAR 0, R12 = the VT-d unit's base.
#[must_use]
pub fn regs(bar0: u64, vtd: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 2,
        rbx: bar0,
        r12: vtd,
        ..Default::default()
    }
}
