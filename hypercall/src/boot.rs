//! The boot protocol: the state every vCPU starts in and the boot-information page.
//!
//! The VMM loads an ELF image and starts **every** vCPU directly at its entry point in
//! 64-bit mode (no INIT/SIPI dance), with:
//!
//! - paging on: an identity map of `[0, max(4 GiB, top of RAM))` with 2 MiB pages, built
//!   by the VMM below [`PAGE_TABLE_LIMIT`];
//! - a per-vCPU GDT with a 64-bit code segment at selector [`CODE_SELECTOR`], data at
//!   [`DATA_SELECTOR`] and a per-vCPU 64-bit TSS at [`TSS_SELECTOR`], loaded in TR. The
//!   TSS's IST1 points at the top of a per-vCPU interrupt stack of [`IST_STACK_SIZE`]
//!   bytes: a guest whose code uses the red zone (as code built for the host's Linux
//!   target does) should put its interrupt gates on IST1. No IDT: interrupts are disabled
//!   (`RFLAGS = 0x2`) and the guest installs its own;
//! - `CR0.MP` and `CR0.NE` set, `CR0.EM` clear, `CR4.OSFXSR` and `CR4.OSXMMEXCPT` set, so
//!   SSE code runs;
//! - `RDI` = guest-physical address of the boot-information page, `RSI` = the vCPU's index
//!   (0 is the bootstrap processor), `RSP` = 8 below a 16-byte aligned per-vCPU stack top
//!   (as if the entry had been called), stacks of [`STACK_SIZE`] bytes each.
//!
//! The boot-information page (layout below, all little-endian) describes the machine.

/// Size of the per-vCPU stack the VMM provides.
pub const STACK_SIZE: u64 = 64 * 1024;
/// Size of the per-vCPU interrupt stack that IST1 points at.
pub const IST_STACK_SIZE: u64 = 16 * 1024;
/// The VMM's boot structures (GDT, TSS, boot information, page tables) sit below this
/// address; a guest image must be linked above it.
pub const PAGE_TABLE_LIMIT: u64 = 0x10_0000;
/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the 64-bit TSS (16-byte descriptor).
pub const TSS_SELECTOR: u16 = 0x18;

/// `"IRQVMBI1"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"IRQVMBI1");
/// Layout version of the boot-information page.
pub const VERSION: u32 = 1;
/// The most vCPUs the page can describe.
pub const MAX_CPUS: usize = 512;
/// Size of the boot-information page.
pub const PAGE_SIZE: usize = 4096;

/// Byte offsets of the fields in the boot-information page.
pub mod offset {
    /// u64: [`super::MAGIC`].
    pub const MAGIC: usize = 0x00;
    /// u32: [`super::VERSION`].
    pub const VERSION: usize = 0x08;
    /// u32: number of vCPUs.
    pub const CPU_COUNT: usize = 0x0c;
    /// u64: bytes of guest RAM.
    pub const MEM_SIZE: usize = 0x10;
    /// u64: guest-physical address of the command line (its length is [`CMDLINE_LEN`]; a NUL
    /// follows it).
    pub const CMDLINE_ADDR: usize = 0x18;
    /// u64: length of the command line in bytes.
    pub const CMDLINE_LEN: usize = 0x20;
    /// u64: guest-physical address of the harness mailbox; 0 when there is no harness.
    pub const MAILBOX_ADDR: usize = 0x28;
    /// u64: size of the harness mailbox in bytes.
    pub const MAILBOX_SIZE: usize = 0x30;
    /// u64: the first free guest-physical byte: the page-aligned end of everything the
    /// VMM placed at or above 1 MiB (the image, the vCPU areas, the harness mailbox).
    /// RAM from here to the end of low RAM is the guest's. 0: not given.
    pub const FREE_START: usize = 0x38;
    /// `[u32; MAX_CPUS]`: the local APIC ID of each vCPU, by vCPU index.
    pub const APIC_IDS: usize = 0x40;
    /// u32: the TSC frequency in kHz, as KVM reports it for the vCPUs; 0: not known.
    pub const TSC_KHZ: usize = APIC_IDS + 4 * super::MAX_CPUS;
}

/// What the VMM tells the guest about the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo<'a> {
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// Guest-physical address and length of the command line.
    pub cmdline: (u64, u64),
    /// Guest-physical address and size of the harness mailbox (0, 0 when absent).
    pub mailbox: (u64, u64),
    /// Local APIC ID of each vCPU; its length is the vCPU count.
    pub apic_ids: &'a [u32],
    /// The first free guest-physical byte ([`offset::FREE_START`]).
    pub free_start: u64,
    /// The TSC frequency in kHz (0: not known).
    pub tsc_khz: u32,
}

/// Why a boot-information page could not be written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// More vCPUs than [`MAX_CPUS`].
    TooManyCpus,
    /// The buffer is shorter than [`PAGE_SIZE`].
    ShortBuffer,
    /// The page does not start with [`MAGIC`] and [`VERSION`].
    BadMagic,
}

impl BootInfo<'_> {
    /// Writes the page into `page` (zeroing what it does not use).
    ///
    /// # Errors
    /// [`BootInfoError::TooManyCpus`] or [`BootInfoError::ShortBuffer`].
    pub fn encode(&self, page: &mut [u8]) -> Result<(), BootInfoError> {
        if self.apic_ids.len() > MAX_CPUS {
            return Err(BootInfoError::TooManyCpus);
        }
        let page = page
            .get_mut(..PAGE_SIZE)
            .ok_or(BootInfoError::ShortBuffer)?;
        page.fill(0);
        put(page, offset::MAGIC, &MAGIC.to_le_bytes());
        put(page, offset::VERSION, &VERSION.to_le_bytes());
        let count = u32::try_from(self.apic_ids.len()).map_err(|_| BootInfoError::TooManyCpus)?;
        put(page, offset::CPU_COUNT, &count.to_le_bytes());
        put(page, offset::MEM_SIZE, &self.mem_size.to_le_bytes());
        put(page, offset::CMDLINE_ADDR, &self.cmdline.0.to_le_bytes());
        put(page, offset::CMDLINE_LEN, &self.cmdline.1.to_le_bytes());
        put(page, offset::MAILBOX_ADDR, &self.mailbox.0.to_le_bytes());
        put(page, offset::MAILBOX_SIZE, &self.mailbox.1.to_le_bytes());
        put(page, offset::FREE_START, &self.free_start.to_le_bytes());
        put(page, offset::TSC_KHZ, &self.tsc_khz.to_le_bytes());
        for (i, id) in self.apic_ids.iter().enumerate() {
            put(page, offset::APIC_IDS + 4 * i, &id.to_le_bytes());
        }
        Ok(())
    }
}

/// Writes `bytes` at `at` (the encoder checked the page is big enough for every field).
fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = page.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// A read-only view of a boot-information page, for guests (and tests).
#[derive(Debug, Clone, Copy)]
pub struct BootInfoView<'a> {
    page: &'a [u8],
}

impl<'a> BootInfoView<'a> {
    /// Checks the magic and version of `page`.
    ///
    /// # Errors
    /// [`BootInfoError::ShortBuffer`] or [`BootInfoError::BadMagic`].
    pub fn new(page: &'a [u8]) -> Result<Self, BootInfoError> {
        let page = page.get(..PAGE_SIZE).ok_or(BootInfoError::ShortBuffer)?;
        let view = Self { page };
        if view.u64_at(offset::MAGIC) != MAGIC || view.u32_at(offset::VERSION) != VERSION {
            return Err(BootInfoError::BadMagic);
        }
        Ok(view)
    }

    /// The u32 at `at` (0 beyond the page).
    fn u32_at(&self, at: usize) -> u32 {
        self.page
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    /// The u64 at `at` (0 beyond the page).
    fn u64_at(&self, at: usize) -> u64 {
        self.page
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// Number of vCPUs (at most [`MAX_CPUS`]).
    #[must_use]
    pub fn cpu_count(&self) -> usize {
        (self.u32_at(offset::CPU_COUNT) as usize).min(MAX_CPUS)
    }

    /// Bytes of guest RAM.
    #[must_use]
    pub fn mem_size(&self) -> u64 {
        self.u64_at(offset::MEM_SIZE)
    }

    /// Guest-physical address and length of the command line.
    #[must_use]
    pub fn cmdline(&self) -> (u64, u64) {
        (
            self.u64_at(offset::CMDLINE_ADDR),
            self.u64_at(offset::CMDLINE_LEN),
        )
    }

    /// Guest-physical address and size of the harness mailbox; `None` without a harness.
    #[must_use]
    pub fn mailbox(&self) -> Option<(u64, u64)> {
        let addr = self.u64_at(offset::MAILBOX_ADDR);
        (addr != 0).then(|| (addr, self.u64_at(offset::MAILBOX_SIZE)))
    }

    /// The first free guest-physical byte; `None` if the VMM did not say.
    #[must_use]
    pub fn free_start(&self) -> Option<u64> {
        Some(self.u64_at(offset::FREE_START)).filter(|at| *at != 0)
    }

    /// The TSC frequency in kHz; `None` if the VMM did not say.
    #[must_use]
    pub fn tsc_khz(&self) -> Option<u32> {
        Some(self.u32_at(offset::TSC_KHZ)).filter(|khz| *khz != 0)
    }

    /// Local APIC ID of vCPU `cpu`, if it exists.
    #[must_use]
    pub fn apic_id(&self, cpu: usize) -> Option<u32> {
        (cpu < self.cpu_count()).then(|| self.u32_at(offset::APIC_IDS + 4 * cpu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_view_round_trips() {
        let ids = [0, 1, 2, 7];
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline: (0x3000, 12),
            mailbox: (0x40_0000, 0x2000),
            apic_ids: &ids,
            free_start: 0x40_2000,
            tsc_khz: 2_100_000,
        };
        let mut page = [0xaau8; PAGE_SIZE];
        info.encode(&mut page).unwrap();
        let view = BootInfoView::new(&page).unwrap();
        assert_eq!(view.cpu_count(), 4);
        assert_eq!(view.mem_size(), 64 << 20);
        assert_eq!(view.cmdline(), (0x3000, 12));
        assert_eq!(view.mailbox(), Some((0x40_0000, 0x2000)));
        assert_eq!(view.apic_id(3), Some(7));
        assert_eq!(view.apic_id(4), None);
        assert_eq!(view.free_start(), Some(0x40_2000));
        assert_eq!(view.tsc_khz(), Some(2_100_000));
        assert_eq!(offset::TSC_KHZ, 0x840);
        // Unused bytes are zeroed, not left over.
        assert_eq!(page[PAGE_SIZE - 1], 0);
    }

    #[test]
    fn too_many_cpus_and_short_buffers_are_errors() {
        let ids = [0u32; MAX_CPUS + 1];
        let info = BootInfo {
            mem_size: 0,
            cmdline: (0, 0),
            mailbox: (0, 0),
            apic_ids: &ids,
            free_start: 0,
            tsc_khz: 0,
        };
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(info.encode(&mut page), Err(BootInfoError::TooManyCpus));
        let info = BootInfo {
            apic_ids: &ids[..1],
            ..info
        };
        assert_eq!(
            info.encode(&mut page[..100]),
            Err(BootInfoError::ShortBuffer)
        );
        assert_eq!(
            BootInfoView::new(&page).unwrap_err(),
            BootInfoError::BadMagic
        );
    }

    #[test]
    fn absent_mailbox_reads_as_none() {
        let ids = [0u32];
        let info = BootInfo {
            mem_size: 1,
            cmdline: (0, 0),
            mailbox: (0, 0),
            apic_ids: &ids,
            free_start: 0,
            tsc_khz: 0,
        };
        let mut page = [0u8; PAGE_SIZE];
        info.encode(&mut page).unwrap();
        assert_eq!(BootInfoView::new(&page).unwrap().mailbox(), None);
    }
}
