//! The legacy-mode translation structures (VT-d 9.1-9.2, 3.6-3.7): root entries,
//! context entries and second-level paging entries, read from guest memory and checked
//! field by field. A walk either ends at a leaf (a 4-KiB, 2-MiB or 1-GiB page and its
//! permissions) or at a fault with the spec's reason code.

use vm_memory::GuestAddress;

use super::regs;
use crate::memory::{read_obj, GuestRam};

/// Host address width: bits of a table pointer or page address (MGAW + 1).
pub const HAW: u32 = 48;
const _: () = assert!(HAW as u64 == regs::cap::MGAW + 1);
/// Bits 63:HAW of an address field are reserved.
const ABOVE_HAW: u64 = !((1u64 << HAW) - 1);
/// Bits 51:HAW of a paging entry are reserved (62:52 are ignored, 63 is TM).
const PTE_ABOVE_HAW: u64 = ((1u64 << 52) - 1) & ABOVE_HAW;

/// Why a DMA request faulted (VT-d 7.1.3, the legacy reasons 0x1-0xD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DmaFaultReason {
    /// 0x1: the root entry is not present.
    RootNotPresent,
    /// 0x2: the context entry is not present.
    ContextNotPresent,
    /// 0x3: the context entry is programmed with an address width or translation type
    /// the unit does not offer.
    ContextInvalid,
    /// 0x4: the address is beyond the context's address width.
    AddressBeyondWidth,
    /// 0x5: a write to a page that is not writable (or not present).
    Write,
    /// 0x6: a read of a page that is not readable (or not present).
    Read,
    /// 0x7: a second-level paging entry is not in guest memory.
    PagingEntryAccess,
    /// 0x8: the root entry is not in guest memory.
    RootAccess,
    /// 0x9: the context entry is not in guest memory.
    ContextAccess,
    /// 0xA: a reserved field of the root entry is set.
    RootReserved,
    /// 0xB: a reserved field of the context entry is set.
    ContextReserved,
    /// 0xC: a reserved field of a second-level paging entry is set.
    PagingEntryReserved,
    /// 0xD: the request is blocked by the context's translation type.
    Blocked,
}

impl DmaFaultReason {
    /// The reason code the fault recording register holds.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Self::RootNotPresent => 0x1,
            Self::ContextNotPresent => 0x2,
            Self::ContextInvalid => 0x3,
            Self::AddressBeyondWidth => 0x4,
            Self::Write => 0x5,
            Self::Read => 0x6,
            Self::PagingEntryAccess => 0x7,
            Self::RootAccess => 0x8,
            Self::ContextAccess => 0x9,
            Self::RootReserved => 0xa,
            Self::ContextReserved => 0xb,
            Self::PagingEntryReserved => 0xc,
            Self::Blocked => 0xd,
        }
    }
}

/// A DMA request the unit refused: what a fault recording register holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    /// The requester (bus, device, function).
    pub source_id: u16,
    /// Why.
    pub reason: DmaFaultReason,
    /// The address the request used.
    pub address: u64,
    /// A write (else a read).
    pub write: bool,
}

/// What a context entry tells the unit to do with a requester's DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Untranslated requests pass through (TT = 2).
    PassThrough {
        /// The domain.
        did: u16,
    },
    /// Untranslated requests go through the second-level table (TT = 0).
    Translate {
        /// The domain.
        did: u16,
        /// The second-level table's root.
        table: u64,
        /// Levels: 3 (39-bit) or 4 (48-bit).
        levels: u32,
        /// Fault processing disable: faults are not recorded.
        fpd: bool,
    },
}

impl Context {
    /// The domain.
    #[must_use]
    pub fn did(&self) -> u16 {
        match *self {
            Self::PassThrough { did } | Self::Translate { did, .. } => did,
        }
    }

    /// Whether faults of this context are recorded.
    #[must_use]
    pub fn records_faults(&self) -> bool {
        !matches!(self, Self::Translate { fpd: true, .. })
    }
}

/// A context lookup that failed: the reason, and whether the context entry asked for
/// its faults not to be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextFault {
    /// Why.
    pub reason: DmaFaultReason,
    /// FPD of a present context entry.
    pub fpd: bool,
}

fn fail(reason: DmaFaultReason) -> ContextFault {
    ContextFault { reason, fpd: false }
}

/// Reads requester `sid`'s context through the root table at `root` (RTADDR as latched:
/// bits 11:10 are the translation table mode, which must be legacy).
///
/// # Errors
/// The fault the request gets.
pub fn context(mem: &dyn GuestRam, root: u64, sid: u16) -> Result<Context, ContextFault> {
    if root & (3 << 10) != 0 {
        // Scalable mode is not offered: the root table is not in a mode the unit knows.
        return Err(fail(DmaFaultReason::RootReserved));
    }
    let bus = u64::from(sid >> 8);
    let devfn = u64::from(sid & 0xff);
    let at = (root & !0xfff) + 16 * bus;
    let [lo, hi] = read_obj::<[u64; 2]>(mem, GuestAddress(at))
        .map_err(|_| fail(DmaFaultReason::RootAccess))?;
    if lo & 1 == 0 {
        return Err(fail(DmaFaultReason::RootNotPresent));
    }
    if lo & 0xffe != 0 || lo & ABOVE_HAW != 0 || hi != 0 {
        return Err(fail(DmaFaultReason::RootReserved));
    }
    let at = (lo & !0xfff) + 16 * devfn;
    let [lo, hi] = read_obj::<[u64; 2]>(mem, GuestAddress(at))
        .map_err(|_| fail(DmaFaultReason::ContextAccess))?;
    if lo & 1 == 0 {
        return Err(fail(DmaFaultReason::ContextNotPresent));
    }
    let fpd = lo & 2 != 0;
    let reserved_lo = 0xff0 | ABOVE_HAW;
    // High: 2:0 AW, 6:3 ignored, 7 reserved, 23:8 DID (ND = 256: 15:8 of it reserved).
    let reserved_hi = (1 << 7) | (0xff << 16) | (!0u64 << 24);
    if lo & reserved_lo != 0 || hi & reserved_hi != 0 {
        return Err(ContextFault {
            reason: DmaFaultReason::ContextReserved,
            fpd,
        });
    }
    let did = u16::try_from((hi >> 8) & 0xff).unwrap_or(0);
    match (lo >> 2) & 3 {
        0 => {
            let levels = match hi & 7 {
                1 => 3,
                2 => 4,
                _ => {
                    return Err(ContextFault {
                        reason: DmaFaultReason::ContextInvalid,
                        fpd,
                    })
                }
            };
            Ok(Context::Translate {
                did,
                table: lo & !0xfff,
                levels,
                fpd,
            })
        }
        2 => Ok(Context::PassThrough { did }),
        // 1 (device TLBs: ECAP.DT clear) and 3 are not offered.
        _ => Err(ContextFault {
            reason: DmaFaultReason::ContextInvalid,
            fpd,
        }),
    }
}

/// Where a walk ended: the page holding the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The page's first address (IOVA).
    pub iova: u64,
    /// Where it is in guest memory.
    pub phys: u64,
    /// Its size: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Readable at every level.
    pub read: bool,
    /// Writable at every level.
    pub write: bool,
}

/// Walks the second-level table at `table` (`levels` deep) for `iova`. Permissions are
/// those of every level together; a page readable and writable by none of them is not
/// present, and the request's own kind decides the reason (0x6 read, 0x5 write).
///
/// # Errors
/// The reason the request faults.
pub fn walk(
    mem: &dyn GuestRam,
    table: u64,
    levels: u32,
    iova: u64,
    write: bool,
) -> Result<Leaf, DmaFaultReason> {
    let width = 12 + 9 * levels;
    if iova >> width != 0 {
        return Err(DmaFaultReason::AddressBeyondWidth);
    }
    let denied = if write {
        DmaFaultReason::Write
    } else {
        DmaFaultReason::Read
    };
    let (mut read_ok, mut write_ok) = (true, true);
    let mut base = table;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (iova >> shift) & 0x1ff;
        let entry: u64 = read_obj(mem, GuestAddress(base + 8 * index))
            .map_err(|_| DmaFaultReason::PagingEntryAccess)?;
        if entry & 3 == 0 {
            return Err(denied);
        }
        read_ok &= entry & 1 != 0;
        write_ok &= entry & 2 != 0;
        let large = entry & (1 << 7) != 0 && level > 1;
        let large_ok = match level {
            2 => regs::cap::SLLPS & 1 != 0,
            3 => regs::cap::SLLPS & 2 != 0,
            _ => false,
        };
        let leaf = level == 1 || large;
        let mut reserved = PTE_ABOVE_HAW;
        if leaf {
            // SNP (bit 11) is reserved: ECAP.SC is clear.
            reserved |= 1 << 11;
            if large {
                reserved |= ((1u64 << shift) - 1) & !0xfff;
            }
        }
        if (large && !large_ok) || entry & reserved != 0 {
            return Err(DmaFaultReason::PagingEntryReserved);
        }
        let next = entry & !0xfff & !ABOVE_HAW;
        if leaf {
            let size = 1u64 << shift;
            return Ok(Leaf {
                iova: iova & !(size - 1),
                phys: next & !(size - 1),
                size,
                read: read_ok,
                write: write_ok,
            });
        }
        base = next;
    }
    // Not reached: level 1 is always a leaf.
    Err(DmaFaultReason::PagingEntryAccess)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    const ROOT: u64 = 0x1000;
    const CTX: u64 = 0x2000;
    const SL: u64 = 0x10_000;
    const SID: u16 = 0x0018;

    fn rig() -> (GuestMemoryMmap, Arc<dyn GuestRam>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let ram: Arc<dyn GuestRam> = Arc::new(GuestMemoryAtomic::new(mem.clone()));
        mem.write_obj([CTX | 1, 0u64], GuestAddress(ROOT)).unwrap();
        (mem, ram)
    }

    fn set_context(mem: &GuestMemoryMmap, lo: u64, hi: u64) {
        mem.write_obj([lo, hi], GuestAddress(CTX + 16 * u64::from(SID & 0xff)))
            .unwrap();
    }

    /// Four levels at SL, SL + 0x1000, ...: IOVA 0x40_0000 -> 0x20_0000 read-only, a 2-MiB
    /// page at IOVA 0x60_0000 -> 0x20_0000 read-write.
    fn tables(mem: &GuestMemoryMmap) {
        let put = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).unwrap();
        put(SL, (SL + 0x1000) | 3);
        put(SL + 0x1000, (SL + 0x2000) | 3);
        put(SL + 0x2000 + 8 * 2, (SL + 0x3000) | 3);
        put(SL + 0x2000 + 8 * 3, 0x20_0000 | (1 << 7) | 3);
        put(SL + 0x3000, 0x20_0000 | 1);
    }

    #[test]
    fn contexts_decode_and_refuse_what_the_unit_does_not_offer() {
        let (mem, ram) = rig();
        set_context(&mem, SL | 1, 2 | (5 << 8));
        let ok = context(&*ram, ROOT, SID).unwrap();
        assert_eq!(
            ok,
            Context::Translate {
                did: 5,
                table: SL,
                levels: 4,
                fpd: false
            }
        );
        set_context(&mem, 1 | (2 << 2), 9 << 8);
        assert_eq!(
            context(&*ram, ROOT, SID),
            Ok(Context::PassThrough { did: 9 })
        );
        let cases: [(u64, u64, DmaFaultReason, bool); 6] = [
            (0, 0, DmaFaultReason::ContextNotPresent, false),
            (SL | 1 | 2, 3, DmaFaultReason::ContextInvalid, true),
            (SL | 1 | (1 << 2), 2, DmaFaultReason::ContextInvalid, false),
            (SL | 1 | (3 << 2), 2, DmaFaultReason::ContextInvalid, false),
            (SL | 1 | (1 << 4), 2, DmaFaultReason::ContextReserved, false),
            (
                SL | 1,
                2 | (0x100 << 8),
                DmaFaultReason::ContextReserved,
                false,
            ),
        ];
        for (lo, hi, reason, fpd) in cases {
            set_context(&mem, lo, hi);
            assert_eq!(
                context(&*ram, ROOT, SID),
                Err(ContextFault { reason, fpd }),
                "{lo:#x} {hi:#x}"
            );
        }
        mem.write_obj([0u64, 0], GuestAddress(ROOT)).unwrap();
        assert_eq!(
            context(&*ram, ROOT, SID).unwrap_err().reason,
            DmaFaultReason::RootNotPresent
        );
        mem.write_obj([CTX | 1 | 4, 0u64], GuestAddress(ROOT))
            .unwrap();
        assert_eq!(
            context(&*ram, ROOT, SID).unwrap_err().reason,
            DmaFaultReason::RootReserved
        );
        assert_eq!(
            context(&*ram, 0x1000_0000, SID).unwrap_err().reason,
            DmaFaultReason::RootAccess
        );
        assert_eq!(
            context(&*ram, ROOT | (1 << 10), SID).unwrap_err().reason,
            DmaFaultReason::RootReserved
        );
    }

    #[test]
    fn walks_reach_pages_and_large_pages_with_their_permissions() {
        let (mem, ram) = rig();
        tables(&mem);
        let leaf = walk(&*ram, SL, 4, 0x40_0123, false).unwrap();
        assert_eq!(
            leaf,
            Leaf {
                iova: 0x40_0000,
                phys: 0x20_0000,
                size: 0x1000,
                read: true,
                write: false
            }
        );
        let large = walk(&*ram, SL, 4, 0x7f_f000, true).unwrap();
        assert_eq!(
            (large.iova, large.phys, large.size),
            (0x60_0000, 0x20_0000, 2 << 20)
        );
        assert!(large.read && large.write);
        assert_eq!(
            walk(&*ram, SL, 4, 0x40_1000, false),
            Err(DmaFaultReason::Read)
        );
        assert_eq!(
            walk(&*ram, SL, 4, 0x40_1000, true),
            Err(DmaFaultReason::Write)
        );
        assert_eq!(
            walk(&*ram, SL, 4, 1 << 48, false),
            Err(DmaFaultReason::AddressBeyondWidth)
        );
        assert_eq!(
            walk(&*ram, SL + 0x1000, 3, 1 << 39, false),
            Err(DmaFaultReason::AddressBeyondWidth)
        );
        // Three levels from the second table: the same pages.
        let leaf = walk(&*ram, SL + 0x1000, 3, 0x40_0000, false).unwrap();
        assert_eq!(leaf.phys, 0x20_0000);
        // Reserved bits: above the host address width, SNP in a leaf, a large PML4E.
        mem.write_obj(0x20_0000u64 | 1 | (1 << 50), GuestAddress(SL + 0x3000))
            .unwrap();
        assert_eq!(
            walk(&*ram, SL, 4, 0x40_0000, false),
            Err(DmaFaultReason::PagingEntryReserved)
        );
        mem.write_obj(0x20_0000u64 | 1 | (1 << 11), GuestAddress(SL + 0x3000))
            .unwrap();
        assert_eq!(
            walk(&*ram, SL, 4, 0x40_0000, false),
            Err(DmaFaultReason::PagingEntryReserved)
        );
        mem.write_obj((SL + 0x1000) | 3 | (1 << 7), GuestAddress(SL))
            .unwrap();
        assert_eq!(
            walk(&*ram, SL, 4, 0x40_0000, false),
            Err(DmaFaultReason::PagingEntryReserved)
        );
        // A table beyond memory.
        mem.write_obj(0x1000_0000u64 | 3, GuestAddress(SL)).unwrap();
        assert_eq!(
            walk(&*ram, SL, 4, 0x40_0000, false),
            Err(DmaFaultReason::PagingEntryAccess)
        );
    }
}
