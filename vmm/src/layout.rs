//! Where the VMM puts things in guest-physical memory.
//!
//! ```text
//! 0x0000_1000  boot-information page            (hypercall::boot)
//! 0x0000_2000  command line (up to 4 KiB)
//! 0x0001_0000  PML4, then PDPT, then one page directory per GiB identity-mapped
//! 0x0010_0000  lowest address an image may load at (hypercall::boot::PAGE_TABLE_LIMIT)
//!   image      (the ELF's PT_LOAD segments, e.g. the test guest at 2 MiB)
//!   cpu areas  one per vCPU: stack, IST1 stack, GDT and TSS (CPU_AREA_SIZE each)
//!   mailbox    the test-harness mailbox (hypercall::harness)
//! 0xc000_0000  MMIO hole up to 4 GiB (LAPIC at 0xfee0_0000); RAM above 3 GiB moves to 4 GiB
//! ```

use hypercall::boot::{IST_STACK_SIZE, STACK_SIZE};

/// Boot-information page.
pub const BOOT_INFO_ADDR: u64 = 0x1000;
/// Command line.
pub const CMDLINE_ADDR: u64 = 0x2000;
/// Longest command line, in bytes.
pub const CMDLINE_MAX: usize = 4095;
/// The page-map level 4 table.
pub const PML4_ADDR: u64 = 0x1_0000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x1_1000;
/// The first page directory; one per GiB follows.
pub const PD_BASE: u64 = 0x1_2000;
/// The boot structures end here.
pub const BOOT_STRUCTURES_END: u64 = hypercall::boot::PAGE_TABLE_LIMIT;

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole (RAM resumes here).
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// Bytes per vCPU area: stack, then IST1 stack, then a page with the GDT and TSS.
pub const CPU_AREA_SIZE: u64 = STACK_SIZE + IST_STACK_SIZE + 0x1000;
/// Offset of the GDT in a vCPU area.
pub const CPU_AREA_GDT: u64 = STACK_SIZE + IST_STACK_SIZE;
/// Offset of the TSS in a vCPU area.
pub const CPU_AREA_TSS: u64 = CPU_AREA_GDT + 0x100;

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
#[must_use]
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// Where the per-boot pieces go, decided once the image is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// First vCPU area.
    pub cpu_areas: u64,
    /// The harness mailbox.
    pub mailbox: u64,
    /// Its size in bytes.
    pub mailbox_size: u64,
}

impl Placement {
    /// Places `cpus` vCPU areas and the mailbox after an image ending at `image_end`, in
    /// low RAM ending at `low_ram_end`. Returns `None` if they do not fit.
    #[must_use]
    pub fn new(image_end: u64, cpus: u32, low_ram_end: u64) -> Option<Self> {
        let cpu_areas = align_up(image_end.max(BOOT_STRUCTURES_END), 0x1000)?;
        let mailbox = cpu_areas.checked_add(CPU_AREA_SIZE.checked_mul(u64::from(cpus))?)?;
        let size = hypercall::harness::mailbox_size(usize::try_from(cpus).ok()?) as u64;
        let mailbox_size = align_up(size, 0x1000)?;
        (mailbox.checked_add(mailbox_size)? <= low_ram_end).then_some(Self {
            cpu_areas,
            mailbox,
            mailbox_size,
        })
    }

    /// Base of vCPU `cpu`'s area.
    #[must_use]
    pub fn cpu_area(&self, cpu: u32) -> u64 {
        self.cpu_areas + CPU_AREA_SIZE * u64::from(cpu)
    }

    /// First byte past everything placed.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.mailbox + self.mailbox_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_follows_the_image_and_checks_the_fit() {
        let p = Placement::new(0x20_5123, 2, 64 << 20).unwrap();
        assert_eq!(p.cpu_areas, 0x20_6000);
        assert_eq!(p.cpu_area(1), 0x20_6000 + CPU_AREA_SIZE);
        assert_eq!(p.mailbox, 0x20_6000 + 2 * CPU_AREA_SIZE);
        assert_eq!(p.mailbox_size, 0x2000);
        assert!(Placement::new(0x20_5123, 2, p.end()).is_some());
        assert!(Placement::new(0x20_5123, 2, p.end() - 1).is_none());
        // An image below the boot structures still places after them.
        assert_eq!(
            Placement::new(0, 1, 64 << 20).unwrap().cpu_areas,
            BOOT_STRUCTURES_END
        );
        assert!(Placement::new(u64::MAX - 10, 1, u64::MAX).is_none());
    }
}
