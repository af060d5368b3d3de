//! The x86-64 state every vCPU starts in: identity page tables, a per-vCPU GDT and TSS,
//! and the register values of the boot protocol (`hypercall::boot`).
//!
//! The tables are written into guest memory by plain functions, and the register
//! structures are computed by plain functions, so both are unit-tested without KVM.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CPU_AREA_GDT, CPU_AREA_TSS, MMIO_HOLE_END, MMIO_HOLE_START, PDPT_ADDR, PD_BASE, PML4_ADDR,
};
use hypercall::boot::{CODE_SELECTOR, DATA_SELECTOR, IST_STACK_SIZE, STACK_SIZE, TSS_SELECTOR};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const PAGE_SIZE_2M: u64 = 1 << 7;

/// The largest identity map the page directories below the image can describe.
pub const MAX_IDENTITY_MAP: u64 = ((crate::layout::BOOT_STRUCTURES_END - PD_BASE) / 0x1000) * GIB;

/// Why the boot state could not be written.
#[derive(Debug, Error)]
pub enum BootStateError {
    /// The identity map would need more page directories than fit below the image.
    #[error("cannot identity-map {0:#x} bytes (at most {MAX_IDENTITY_MAP:#x})")]
    MapTooLarge(u64),
    /// Guest memory refused a write (the address is not RAM).
    #[error("cannot write boot structure at {addr:#x}")]
    Write {
        /// Where.
        addr: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn write_u64(mem: &GuestMemoryMmap, addr: u64, value: u64) -> Result<(), BootStateError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootStateError::Write { addr, source })
}

/// How far the identity map reaches: all RAM and at least the 4 GiB that hold the LAPIC.
#[must_use]
pub fn identity_map_end(ram_top: u64) -> u64 {
    ram_top.max(1 << 32).div_ceil(GIB) * GIB
}

/// Writes PML4, PDPT and page directories mapping `[0, map_end)` 1:1 with 2 MiB pages
/// (1 GiB pages fault on the nested KVM of the test machines). The MMIO hole is mapped
/// uncached.
///
/// # Errors
/// [`BootStateError::MapTooLarge`] or [`BootStateError::Write`].
pub fn write_page_tables(mem: &GuestMemoryMmap, map_end: u64) -> Result<(), BootStateError> {
    if map_end > MAX_IDENTITY_MAP || map_end > 512 * GIB {
        return Err(BootStateError::MapTooLarge(map_end));
    }
    write_u64(mem, PML4_ADDR, PDPT_ADDR | PRESENT | WRITABLE)?;
    for gib in 0..map_end.div_ceil(GIB) {
        let pd = PD_BASE + gib * 0x1000;
        write_u64(mem, PDPT_ADDR + gib * 8, pd | PRESENT | WRITABLE)?;
        for entry in 0..512 {
            let addr = gib * GIB + entry * MIB2;
            let mut flags = PRESENT | WRITABLE | PAGE_SIZE_2M;
            if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&addr) {
                flags |= CACHE_DISABLE | WRITE_THROUGH;
            }
            write_u64(mem, pd + entry * 8, addr | flags)?;
        }
    }
    Ok(())
}

/// GDT of one vCPU: null, 64-bit code, data, and a busy 64-bit TSS at `tss` (16 bytes).
#[must_use]
pub fn gdt_entries(tss: u64) -> [u64; 5] {
    let limit = 0x67u64;
    let tss_low = (limit & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x8bu64 << 40) // present, DPL 0, busy 64-bit TSS
        | (((tss >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff, // code: present, DPL 0, execute/read, accessed, L, G
        0x00cf_9300_0000_ffff, // data: present, DPL 0, read/write, accessed, D/B, G
        tss_low,
        tss >> 32,
    ]
}

/// Writes vCPU `area`'s GDT and TSS (IST1 at the top of its interrupt stack).
///
/// # Errors
/// [`BootStateError::Write`].
pub fn write_cpu_area(mem: &GuestMemoryMmap, area: u64) -> Result<(), BootStateError> {
    let tss = area + CPU_AREA_TSS;
    for (i, entry) in gdt_entries(tss).iter().enumerate() {
        write_u64(mem, area + CPU_AREA_GDT + 8 * i as u64, *entry)?;
    }
    let mut tss_bytes = [0u8; 0x68];
    let ist1 = area + STACK_SIZE + IST_STACK_SIZE;
    tss_bytes[0x24..0x2c].copy_from_slice(&ist1.to_le_bytes());
    // No I/O permission bitmap: its offset points past the limit.
    tss_bytes[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    mem.write_slice(&tss_bytes, GuestAddress(tss))
        .map_err(|source| BootStateError::Write { addr: tss, source })
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "every value is masked to its descriptor field's width first"
)]
fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let flag = |bit: u32| ((descriptor >> bit) & 1) as u8;
    let raw_limit = (descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000);
    let granular = flag(55) == 1;
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24),
        limit: if granular {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: flag(47),
        dpl: ((descriptor >> 45) & 3) as u8,
        db: flag(54),
        s: flag(44),
        l: flag(53),
        g: flag(55),
        avl: flag(52),
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Limit of the five-entry GDT (bytes minus one).
const GDT_LIMIT: u16 = 5 * 8 - 1;

/// Special registers for a vCPU whose area is at `area`: long mode with paging, its own
/// GDT and TSS, SSE enabled. `base` is the vCPU's current state (fields not set here,
/// such as the APIC base, keep their values).
#[must_use]
pub fn long_mode_sregs(mut base: kvm_sregs, area: u64) -> kvm_sregs {
    let gdt = gdt_entries(area + CPU_AREA_TSS);
    let code = segment(CODE_SELECTOR, gdt[1]);
    let data = segment(DATA_SELECTOR, gdt[2]);
    let mut tr = segment(TSS_SELECTOR, gdt[3]);
    tr.base |= gdt[4] << 32;
    base.cs = code;
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = tr;
    base.gdt.base = area + CPU_AREA_GDT;
    base.gdt.limit = GDT_LIMIT;
    base.idt.base = 0;
    base.idt.limit = 0;
    base.cr0 = (base.cr0 | CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG) & !CR0_EM;
    base.cr3 = PML4_ADDR;
    base.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    base.efer |= EFER_LME | EFER_LMA;
    base
}

/// The GDT the Linux 64-bit boot protocol asks for: flat code at selector 0x10 and data at
/// 0x18 (then the vCPU's TSS at 0x20), written at `at` for the TSS at `tss`.
///
/// # Errors
/// [`BootStateError::Write`].
pub fn write_linux_gdt(mem: &GuestMemoryMmap, at: u64, tss: u64) -> Result<(), BootStateError> {
    let [_, code, data, tss_low, tss_high] = gdt_entries(tss);
    for (i, entry) in [0, 0, code, data, tss_low, tss_high].iter().enumerate() {
        write_u64(mem, at + 8 * i as u64, *entry)?;
    }
    Ok(())
}

/// [`long_mode_sregs`] with the boot protocol's selectors and the GDT of
/// [`write_linux_gdt`] at `gdt`.
#[must_use]
pub fn linux_sregs(base: kvm_sregs, area: u64, gdt: u64) -> kvm_sregs {
    let mut s = long_mode_sregs(base, area);
    s.cs.selector = 0x10;
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        seg.selector = 0x18;
    }
    s.tr.selector = 0x20;
    s.gdt.base = gdt;
    s.gdt.limit = 6 * 8 - 1;
    s
}

/// The PVH entry state (xen/include/public/arch-x86/hvm/start_info.h): 32-bit protected
/// mode with paging off, flat 4 GiB code (selector 0x10) and data (0x18) segments as
/// [`write_linux_gdt`] describes them, the vCPU's TSS, `CR4` and `EFER` clear.
#[must_use]
pub fn pvh_sregs(base: kvm_sregs, area: u64, gdt: u64) -> kvm_sregs {
    let mut s = linux_sregs(base, area, gdt);
    s.cs.l = 0;
    s.cs.db = 1;
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        seg.db = 1;
    }
    s.cr0 = CR0_PE | CR0_ET;
    s.cr3 = 0;
    s.cr4 = 0;
    s.efer = 0;
    s
}

/// General registers at entry: `RIP` = entry, `RSP` 8 below the stack top (as after a
/// call), `RDI` = boot information, `RSI` = vCPU index, interrupts off.
#[must_use]
pub fn entry_regs(entry: u64, area: u64, boot_info: u64, cpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: area + STACK_SIZE - 8,
        rdi: boot_info,
        rsi: u64::from(cpu),
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87 and SSE control state as after FNINIT, with all SSE exceptions masked.
#[must_use]
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn page_tables_identity_map_with_2mib_pages() {
        let mem = memory(2 << 20);
        write_page_tables(&mem, identity_map_end(64 << 20)).unwrap();
        assert_eq!(read_u64(&mem, PML4_ADDR), PDPT_ADDR | 3);
        for gib in 0..4 {
            assert_eq!(
                read_u64(&mem, PDPT_ADDR + gib * 8),
                (PD_BASE + gib * 0x1000) | 3
            );
        }
        assert_eq!(read_u64(&mem, PDPT_ADDR + 4 * 8), 0);
        // 0x20_0000 is the second 2 MiB page of the first GiB.
        assert_eq!(read_u64(&mem, PD_BASE + 8), 0x20_0000 | 0x83);
        // The LAPIC page sits in the uncached MMIO hole.
        let lapic_pde = read_u64(
            &mem,
            PD_BASE + 3 * 0x1000 + ((0xfee0_0000u64 % GIB) >> 21) * 8,
        );
        assert_eq!(
            lapic_pde,
            0xfee0_0000 | 0x83 | CACHE_DISABLE | WRITE_THROUGH
        );
    }

    #[test]
    fn identity_map_covers_ram_above_4gib_and_refuses_too_much() {
        assert_eq!(identity_map_end(64 << 20), 4 * GIB);
        assert_eq!(identity_map_end(5 * GIB + 1), 6 * GIB);
        let mem = memory(2 << 20);
        assert!(matches!(
            write_page_tables(&mem, MAX_IDENTITY_MAP + GIB),
            Err(BootStateError::MapTooLarge(_))
        ));
    }

    #[test]
    fn cpu_area_holds_gdt_and_tss_with_ist1() {
        let mem = memory(4 << 20);
        let area = 0x20_0000;
        write_cpu_area(&mem, area).unwrap();
        assert_eq!(
            read_u64(&mem, area + CPU_AREA_GDT + 8),
            0x00af_9b00_0000_ffff
        );
        let ist1 = read_u64(&mem, area + CPU_AREA_TSS + 0x24);
        assert_eq!(ist1, area + STACK_SIZE + IST_STACK_SIZE);
    }

    #[test]
    fn sregs_describe_long_mode_with_the_cpu_areas_tss() {
        let area = 0x1234_5000;
        let s = long_mode_sregs(kvm_sregs::default(), area);
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.type_, s.cs.present),
            (8, 1, 0, 11, 1)
        );
        assert_eq!(s.cs.limit, 0xffff_ffff);
        assert_eq!((s.ss.selector, s.ss.type_, s.ss.db), (0x10, 3, 1));
        assert_eq!(
            (s.tr.selector, s.tr.type_, s.tr.s, s.tr.limit),
            (0x18, 11, 0, 0x67)
        );
        assert_eq!(s.tr.base, area + CPU_AREA_TSS);
        assert_eq!(s.gdt.base, area + CPU_AREA_GDT);
        assert_eq!(
            s.cr0 & (CR0_PG | CR0_PE | CR0_MP | CR0_EM),
            CR0_PG | CR0_PE | CR0_MP
        );
        assert_eq!(s.cr4 & (CR4_PAE | CR4_OSFXSR), CR4_PAE | CR4_OSFXSR);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
    }

    #[test]
    fn entry_registers_follow_the_boot_protocol() {
        let r = entry_regs(0x20_0000, 0x30_0000, 0x1000, 3);
        assert_eq!((r.rip, r.rdi, r.rsi, r.rflags), (0x20_0000, 0x1000, 3, 2));
        assert_eq!(r.rsp, 0x30_0000 + STACK_SIZE - 8);
        assert_eq!(r.rsp % 16, 8);
    }
}
