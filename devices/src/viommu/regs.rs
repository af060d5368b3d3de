//! VT-d register offsets and bits (VT-d spec, chapter 11), for the subset this model
//! implements: interrupt remapping and legacy-mode DMA remapping.

/// Version (32): major in bits 7:4, minor in 3:0.
pub const VER: u64 = 0x000;
/// Capabilities (64).
pub const CAP: u64 = 0x008;
/// Extended capabilities (64).
pub const ECAP: u64 = 0x010;
/// Global command (32, write-only).
pub const GCMD: u64 = 0x018;
/// Global status (32, read-only).
pub const GSTS: u64 = 0x01c;
/// Root table address (64): latched by `GCMD.SRTP`.
pub const RTADDR: u64 = 0x020;
/// Context command (64): register-based context-cache invalidation.
pub const CCMD: u64 = 0x028;
/// Fault status (32).
pub const FSTS: u64 = 0x034;
/// Fault event control (32).
pub const FECTL: u64 = 0x038;
/// Fault event data (32).
pub const FEDATA: u64 = 0x03c;
/// Fault event address (32).
pub const FEADDR: u64 = 0x040;
/// Fault event upper address (32).
pub const FEUADDR: u64 = 0x044;
/// Invalidation queue head (64, read-only).
pub const IQH: u64 = 0x080;
/// Invalidation queue tail (64).
pub const IQT: u64 = 0x088;
/// Invalidation queue address (64).
pub const IQA: u64 = 0x090;
/// Invalidation completion status (32).
pub const ICS: u64 = 0x09c;
/// Invalidation event control (32).
pub const IECTL: u64 = 0x0a0;
/// Invalidation event data (32).
pub const IEDATA: u64 = 0x0a4;
/// Invalidation event address (32).
pub const IEADDR: u64 = 0x0a8;
/// Invalidation event upper address (32).
pub const IEUADDR: u64 = 0x0ac;
/// Interrupt remapping table address (64).
pub const IRTA: u64 = 0x0b8;
/// First fault recording register (128 bits each).
pub const FRCD: u64 = 0x200;
/// Number of fault recording registers.
pub const NFR: usize = 8;
/// IOTLB registers (ECAP.IRO): the invalidate address register (IVA) here, the IOTLB
/// invalidate register at `IOTLB + 8`.
pub const IOTLB: u64 = 0x300;
/// The IOTLB invalidate register.
pub const IOTLB_REG: u64 = IOTLB + 8;
/// Size of the register page.
pub const SIZE: u64 = 0x1000;

/// GCMD / GSTS bits (command bit in GCMD, status bit at the same position in GSTS).
pub mod global {
    /// Translation enable (DMA remapping).
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer.
    pub const SRTP: u32 = 1 << 30;
    /// Set fault log.
    pub const SFL: u32 = 1 << 29;
    /// Write buffer flush.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remapping table pointer.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupts allowed.
    pub const CFI: u32 = 1 << 23;
}

/// FSTS bits.
pub mod fsts {
    /// Primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault (read-only: some FRCD has F set).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// Fault record index, bits 15:8.
    pub const FRI_SHIFT: u32 = 8;
}

/// FECTL / IECTL bits.
pub mod event {
    /// Interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt pending.
    pub const IP: u32 = 1 << 30;
}

/// ECAP bits offered.
pub mod ecap {
    /// Queued invalidation.
    pub const QI: u64 = 1 << 1;
    /// Interrupt remapping.
    pub const IR: u64 = 1 << 3;
    /// Extended interrupt mode (x2APIC destinations).
    pub const EIM: u64 = 1 << 4;
    /// Page-walk coherency: the unit snoops the paging structures (no cache flushes).
    pub const C: u64 = 1 << 0;
    /// Pass-through (context entries with TT = 2).
    pub const PT: u64 = 1 << 6;
    /// IOTLB register offset, in 16-byte units, bits 17:8.
    pub const IRO_SHIFT: u32 = 8;
    /// Maximum handle mask value, bits 23:20.
    pub const MHMV_SHIFT: u32 = 20;
}

/// CAP fields.
pub mod cap {
    /// Number of domains: 2 = 256 (8-bit domain IDs).
    pub const ND: u64 = 2;
    /// Supported adjusted guest address widths, bits 12:8: 39-bit 3-level (bit 1) and
    /// 48-bit 4-level (bit 2).
    pub const SAGAW: u64 = (1 << 1) | (1 << 2);
    /// Maximum guest address width minus one, bits 21:16.
    pub const MGAW: u64 = 47;
    /// Second-level large pages, bits 37:34: 2 MiB (bit 0) and 1 GiB (bit 1).
    pub const SLLPS: u64 = 0b11;
    /// Page-selective invalidation (bit 39).
    pub const PSI: u64 = 1 << 39;
    /// Maximum address mask value of a page-selective invalidation, bits 53:48.
    pub const MAMV: u64 = 18;
}

/// The capability register: 256 domains, 39-bit 3-level and 48-bit 4-level second-level
/// tables (SAGAW), 48-bit guest addresses (MGAW 47), 2 MiB and 1 GiB pages, page-selective
/// IOTLB invalidation up to 2^18 pages, fault records at [`FRCD`], [`NFR`] of them.
/// Caching mode is clear: non-present entries are never cached.
pub const CAP_VALUE: u64 = cap::ND
    | (cap::SAGAW << 8)
    | (cap::MGAW << 16)
    | ((FRCD / 16) << 24)
    | (cap::SLLPS << 34)
    | cap::PSI
    | (((NFR as u64) - 1) << 40)
    | (cap::MAMV << 48);

/// The extended capability register: coherent page walks, QI, IR, EIM, pass-through,
/// IOTLB registers at [`IOTLB`], handle masks up to 15.
pub const ECAP_VALUE: u64 = ecap::C
    | ecap::QI
    | ecap::IR
    | ecap::EIM
    | ecap::PT
    | ((IOTLB / 16) << ecap::IRO_SHIFT)
    | (0xf << ecap::MHMV_SHIFT);

/// CCMD fields.
pub mod ccmd {
    /// Invalidate context cache (set by software, cleared when done).
    pub const ICC: u64 = 1 << 63;
    /// Requested granularity, bits 62:61 (1 global, 2 domain, 3 device).
    pub const CIRG_SHIFT: u32 = 61;
    /// Actual granularity, bits 60:59.
    pub const CAIG_SHIFT: u32 = 59;
    /// Function mask, bits 33:32.
    pub const FM_SHIFT: u32 = 32;
    /// Source ID, bits 31:16.
    pub const SID_SHIFT: u32 = 16;
}

/// IOTLB invalidate register fields (and IVA's).
pub mod iotlb {
    /// Invalidate IOTLB (set by software, cleared when done).
    pub const IVT: u64 = 1 << 63;
    /// Requested granularity, bits 61:60 (1 global, 2 domain, 3 page).
    pub const IIRG_SHIFT: u32 = 60;
    /// Actual granularity, bits 58:57.
    pub const IAIG_SHIFT: u32 = 57;
    /// Domain ID, bits 47:32.
    pub const DID_SHIFT: u32 = 32;
    /// IVA: address mask, bits 5:0.
    pub const AM_MASK: u64 = 0x3f;
}

/// Version 1.0.
pub const VER_VALUE: u32 = 0x10;

/// IRTA fields.
pub mod irta {
    /// Extended interrupt mode enable.
    pub const EIME: u64 = 1 << 11;
    /// Size: the table has `2^(S + 1)` entries.
    pub const S_MASK: u64 = 0xf;
    /// Reserved bits 10:4.
    pub const RESERVED: u64 = 0x7f0;
    /// Table address.
    pub const ADDR_MASK: u64 = !0xfff;
}

/// IQA fields.
pub mod iqa {
    /// Descriptor width: 1 = 256-bit (scalable mode; not offered).
    pub const DW: u64 = 1 << 11;
    /// Queue size: `2^QS` 4-KiB pages.
    pub const QS_MASK: u64 = 7;
    /// Queue address.
    pub const ADDR_MASK: u64 = !0xfff;
}

/// Invalidation descriptor types (bits 3:0 of the first quadword; 11:9 hold type bits
/// 6:4 and must be 0 for these).
pub mod desc {
    /// Context-cache invalidate: bits 5:4 G (1 global, 2 domain, 3 device), 31:16 DID,
    /// 47:32 SID, 49:48 FM.
    pub const CONTEXT: u64 = 0x1;
    /// IOTLB invalidate: bits 5:4 G (1 global, 2 domain, 3 page), 6 DW, 7 DR, 31:16 DID;
    /// second quadword: 5:0 AM, 6 IH, 63:12 ADDR.
    pub const IOTLB: u64 = 0x2;
    /// Device-TLB invalidate (accepted, no effect: the unit offers no device TLBs).
    pub const DEVICE_TLB: u64 = 0x3;
    /// Context-cache reserved bits of the first quadword (8:6, 15:12, 63:50).
    pub const CONTEXT_RESERVED: u64 = (0x7 << 6) | (0xf << 12) | (0x3fff << 50);
    /// IOTLB reserved bits of the first quadword (8, 15:12, 63:32).
    pub const IOTLB_RESERVED: u64 = (1 << 8) | (0xf << 12) | (0xffff_ffff << 32);
    /// IOTLB reserved bits of the second quadword (11:7).
    pub const IOTLB_HIGH_RESERVED: u64 = 0x1f << 7;
    /// Interrupt entry cache invalidate: bit 4 G (1 index-selective), 31:27 IM (index
    /// mask), 47:32 IIDX (index).
    pub const IEC: u64 = 0x4;
    /// Invalidation wait: bit 4 IF (interrupt), 5 SW (status write), 6 FN (fence), 7 PD;
    /// 63:32 status data; second quadword: status address (4-byte aligned).
    pub const WAIT: u64 = 0x5;
    /// IEC bit 4: index-selective (else global).
    pub const IEC_SELECTIVE: u64 = 1 << 4;
    /// IEC reserved bits of the first quadword (26:5 and 63:48).
    pub const IEC_RESERVED: u64 = (0x3f_ffff << 5) | (0xffff << 48);
    /// Wait: interrupt flag.
    pub const WAIT_IF: u64 = 1 << 4;
    /// Wait: status write.
    pub const WAIT_SW: u64 = 1 << 5;
    /// Wait reserved bits of the first quadword (31:8).
    pub const WAIT_RESERVED: u64 = 0xff_ffff << 8;
}
