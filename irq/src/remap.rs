//! The interrupt-remapping table and translation (VT-d spec 5.1.4).
//!
//! One table serves both front ends: the IRTE hypercall writes entries directly, the
//! VT-d register model copies them from the guest's table when it is told to invalidate.
//! [`RemapTable::translate`] is what the hardware does with an interrupt request: decode
//! the message, find the entry, check it, check the requester, and produce a [`Target`]
//! or a [`Fault`] with the VT-d fault reason.

use crate::irte::{Irte, IrteError};
use crate::msi::{DecodedMsi, MsiMessage, Target};

/// The most entries a table may have (16-bit handles).
pub const MAX_ENTRIES: u32 = 1 << 16;

/// VT-d interrupt-remapping fault reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FaultReason {
    /// 0x20: reserved bits set in the remappable interrupt request.
    RequestReserved = 0x20,
    /// 0x21: the interrupt index is beyond the table.
    IndexOutOfRange = 0x21,
    /// 0x22: the entry's present bit is clear.
    NotPresent = 0x22,
    /// 0x23: the table could not be read.
    TableAccess = 0x23,
    /// 0x24: reserved bits set in the entry (including a posted-format entry).
    EntryReserved = 0x24,
    /// 0x25: a compatibility-format request while those are blocked.
    CompatibilityBlocked = 0x25,
    /// 0x26: the requester failed the entry's source-id verification.
    SourceIdMismatch = 0x26,
}

impl FaultReason {
    /// Every reason, in code order.
    pub const ALL: [Self; 7] = [
        Self::RequestReserved,
        Self::IndexOutOfRange,
        Self::NotPresent,
        Self::TableAccess,
        Self::EntryReserved,
        Self::CompatibilityBlocked,
        Self::SourceIdMismatch,
    ];

    /// The VT-d fault reason code.
    #[must_use]
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An interrupt request that was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    /// Why.
    pub reason: FaultReason,
    /// The requester.
    pub source_id: u16,
    /// The interrupt index, when the request had one.
    pub index: Option<u32>,
    /// The entry has FPD set: the fault blocks delivery but is not to be recorded.
    pub suppressed: bool,
}

/// What a request translates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// A remappable request, through entry `index`.
    Remapped {
        /// The entry.
        index: u32,
        /// Where it goes.
        target: Target,
    },
    /// A compatibility-format request, passed through (compatibility not blocked).
    Compatibility(Target),
}

/// Why the table itself refused an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RemapError {
    /// A table size of 0 or more than [`MAX_ENTRIES`].
    #[error("table size {0} is not between 1 and 65536")]
    BadSize(u32),
    /// An index beyond the table.
    #[error("index {index} is beyond the table of {size} entries")]
    IndexOutOfRange {
        /// The index.
        index: u32,
        /// The table size.
        size: u32,
    },
}

/// The remapping table: raw entries as the guest wrote them, and the table's modes.
#[derive(Debug, Clone)]
pub struct RemapTable {
    raw: Vec<[u64; 2]>,
    eim: bool,
    block_compatibility: bool,
}

impl RemapTable {
    /// An empty (all not-present) table of `size` entries; `eim` selects x2APIC
    /// destinations.
    ///
    /// # Errors
    /// [`RemapError::BadSize`].
    pub fn new(size: u32, eim: bool) -> Result<Self, RemapError> {
        if size == 0 || size > MAX_ENTRIES {
            return Err(RemapError::BadSize(size));
        }
        Ok(Self {
            raw: vec![[0, 0]; size as usize],
            eim,
            block_compatibility: true,
        })
    }

    /// Number of entries.
    #[must_use]
    pub fn size(&self) -> u32 {
        // At most MAX_ENTRIES, checked in `new`.
        u32::try_from(self.raw.len()).unwrap_or(MAX_ENTRIES)
    }

    /// Whether destinations are x2APIC IDs.
    #[must_use]
    pub fn eim(&self) -> bool {
        self.eim
    }

    /// Blocks (or passes) compatibility-format requests.
    pub fn set_block_compatibility(&mut self, block: bool) {
        self.block_compatibility = block;
    }

    /// Whether compatibility-format requests are blocked.
    #[must_use]
    pub fn blocks_compatibility(&self) -> bool {
        self.block_compatibility
    }

    /// The raw entry at `index`.
    #[must_use]
    pub fn raw(&self, index: u32) -> Option<[u64; 2]> {
        self.raw.get(index as usize).copied()
    }

    /// Stores a raw entry (no check: a malformed entry faults when it is used).
    ///
    /// # Errors
    /// [`RemapError::IndexOutOfRange`].
    pub fn write(&mut self, index: u32, raw: [u64; 2]) -> Result<(), RemapError> {
        let size = self.size();
        let slot = self
            .raw
            .get_mut(index as usize)
            .ok_or(RemapError::IndexOutOfRange { index, size })?;
        *slot = raw;
        Ok(())
    }

    /// The decoded entry at `index`, or the fault reason using it would raise.
    ///
    /// # Errors
    /// [`FaultReason::IndexOutOfRange`], [`FaultReason::EntryReserved`] or
    /// [`FaultReason::NotPresent`].
    pub fn entry(&self, index: u32) -> Result<Irte, FaultReason> {
        let raw = self.raw(index).ok_or(FaultReason::IndexOutOfRange)?;
        let entry = Irte::decode(raw, self.eim).map_err(|e| match e {
            IrteError::Reserved | IrteError::Posted => FaultReason::EntryReserved,
        })?;
        if entry.present {
            Ok(entry)
        } else {
            Err(FaultReason::NotPresent)
        }
    }

    /// Translates a request through entry `index` from `source_id`.
    ///
    /// # Errors
    /// The [`Fault`] the request raises.
    pub fn translate_index(&self, index: u32, source_id: u16) -> Result<Target, Fault> {
        let fault = |reason, suppressed| Fault {
            reason,
            source_id,
            index: Some(index),
            suppressed,
        };
        let entry = self.entry(index).map_err(|reason| fault(reason, false))?;
        if !entry.validation.allows(source_id) {
            return Err(fault(
                FaultReason::SourceIdMismatch,
                entry.fault_processing_disable,
            ));
        }
        Ok(entry.target)
    }

    /// Translates an MSI request from `source_id`.
    ///
    /// # Errors
    /// The [`Fault`] the request raises.
    pub fn translate(&self, msg: &MsiMessage, source_id: u16) -> Result<Translation, Fault> {
        let decoded = msg.decode().map_err(|_| Fault {
            reason: FaultReason::RequestReserved,
            source_id,
            index: None,
            suppressed: false,
        })?;
        match decoded {
            DecodedMsi::Compatibility(target) if !self.block_compatibility => {
                Ok(Translation::Compatibility(target))
            }
            DecodedMsi::Compatibility(_) => Err(Fault {
                reason: FaultReason::CompatibilityBlocked,
                source_id,
                index: None,
                suppressed: false,
            }),
            DecodedMsi::Remappable { .. } => {
                let index = decoded.index().unwrap_or(u32::MAX);
                let target = self.translate_index(index, source_id)?;
                Ok(Translation::Remapped { index, target })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irte::SourceValidation;

    const DEVICE: u16 = 0x0010;

    fn table() -> RemapTable {
        let mut t = RemapTable::new(256, false).unwrap();
        let e = Irte::new(
            Target::fixed(1, 0x41),
            SourceValidation::RequesterId {
                sid: DEVICE,
                qualifier: 0,
            },
        );
        t.write(7, e.encode(false)).unwrap();
        t
    }

    fn reason(r: Result<Translation, Fault>) -> FaultReason {
        r.unwrap_err().reason
    }

    #[test]
    fn a_remappable_request_translates_through_its_entry() {
        let t = table();
        let got = t
            .translate(&MsiMessage::remappable(7, None), DEVICE)
            .unwrap();
        assert_eq!(
            got,
            Translation::Remapped {
                index: 7,
                target: Target::fixed(1, 0x41)
            }
        );
        // handle + subhandle.
        let got = t
            .translate(&MsiMessage::remappable(5, Some(2)), DEVICE)
            .unwrap();
        assert_eq!(
            got,
            Translation::Remapped {
                index: 7,
                target: Target::fixed(1, 0x41)
            }
        );
    }

    #[test]
    fn every_fault_reason_is_reported() {
        let mut t = table();
        let req = |h| MsiMessage::remappable(h, None);
        assert_eq!(
            reason(t.translate(&req(256), DEVICE)),
            FaultReason::IndexOutOfRange
        );
        assert_eq!(
            reason(t.translate(&req(8), DEVICE)),
            FaultReason::NotPresent
        );
        assert_eq!(
            reason(t.translate(&req(7), 0x0018)),
            FaultReason::SourceIdMismatch
        );
        let mut bad = t.raw(7).unwrap();
        bad[0] |= 1 << 13;
        t.write(9, bad).unwrap();
        assert_eq!(
            reason(t.translate(&req(9), DEVICE)),
            FaultReason::EntryReserved
        );
        let mut posted = t.raw(7).unwrap();
        posted[0] |= 1 << 15;
        t.write(10, posted).unwrap();
        assert_eq!(
            reason(t.translate(&req(10), DEVICE)),
            FaultReason::EntryReserved
        );
        let mut reserved_request = MsiMessage::remappable(7, Some(0));
        reserved_request.data |= 1 << 20;
        assert_eq!(
            reason(t.translate(&reserved_request, DEVICE)),
            FaultReason::RequestReserved
        );
        let compat = MsiMessage::compatibility(0, 0x30).unwrap();
        assert_eq!(
            reason(t.translate(&compat, DEVICE)),
            FaultReason::CompatibilityBlocked
        );
        t.set_block_compatibility(false);
        assert_eq!(
            t.translate(&compat, DEVICE).unwrap(),
            Translation::Compatibility(Target::fixed(0, 0x30))
        );
        let f = t.translate(&req(7), 0x0018).unwrap_err();
        assert_eq!(
            (f.source_id, f.index, f.suppressed),
            (0x0018, Some(7), false)
        );
    }

    #[test]
    fn fpd_suppresses_recording_but_not_blocking() {
        let mut t = table();
        let mut e = Irte::decode(t.raw(7).unwrap(), false).unwrap();
        e.fault_processing_disable = true;
        t.write(7, e.encode(false)).unwrap();
        let f = t.translate_index(7, 0x0099).unwrap_err();
        assert_eq!(
            (f.reason, f.suppressed),
            (FaultReason::SourceIdMismatch, true)
        );
    }

    #[test]
    fn sizes_and_indexes_are_checked() {
        assert_eq!(
            RemapTable::new(0, false).unwrap_err(),
            RemapError::BadSize(0)
        );
        assert_eq!(
            RemapTable::new(65537, true).unwrap_err(),
            RemapError::BadSize(65537)
        );
        let mut t = RemapTable::new(65536, true).unwrap();
        assert_eq!(t.size(), 65536);
        t.write(65536, [0, 0]).unwrap_err();
        assert_eq!(
            FaultReason::ALL.map(FaultReason::code),
            [0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26]
        );
    }
}
