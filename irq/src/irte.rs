//! The VT-d interrupt-remapping table entry (IRTE), remapped format (VT-d spec 9.10).
//!
//! ```text
//! bit  0      P    present                 bits  7:5   DLM  delivery mode
//! bit  1      FPD  fault processing disable bits 11:8   AVAIL (software)
//! bit  2      DM   destination mode        bits 14:12  reserved
//! bit  3      RH   redirection hint        bit  15     IM   mode: 0 remapped, 1 posted
//! bit  4      TM   trigger mode            bits 23:16  V    vector
//! bits 31:24  reserved                     bits 63:32  DST  destination ID
//! bits 79:64  SID  source ID               bits 81:80  SQ   source-id qualifier
//! bits 83:82  SVT  source validation type  bits 127:84 reserved
//! ```
//!
//! In xAPIC mode (EIM off) the destination is `DST[15:8]` and `DST[31:16]`, `DST[7:0]` are
//! reserved; in x2APIC mode (EIM on) all 32 bits are the destination. Posted-format
//! entries (IM = 1) are recognized and refused: this model does not offer posted
//! interrupts, so such an entry has a reserved bit set (fault reason 0x24).

use crate::msi::{DeliveryMode, Target};

/// Source validation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceValidation {
    /// No check: any requester may use the entry.
    None,
    /// The requester ID must match SID, under the SQ mask.
    RequesterId {
        /// The expected requester (bus << 8 | device << 3 | function).
        sid: u16,
        /// Which low function bits to ignore (SQ: 0 none, 1 bit 2, 2 bits 2:1, 3 bits 2:0).
        qualifier: u8,
    },
    /// The requester's bus must lie in `[first, last]`.
    BusRange {
        /// First bus (`SID[15:8]`).
        first: u8,
        /// Last bus (`SID[7:0]`).
        last: u8,
    },
}

impl SourceValidation {
    /// Whether `requester` may use an entry with this validation.
    #[must_use]
    pub fn allows(&self, requester: u16) -> bool {
        match *self {
            Self::None => true,
            Self::RequesterId { sid, qualifier } => {
                let ignore: u16 = match qualifier & 3 {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                (sid & !ignore) == (requester & !ignore)
            }
            Self::BusRange { first, last } => (first..=last).contains(&((requester >> 8) as u8)),
        }
    }

    fn fields(&self) -> (u16, u8, u8) {
        match *self {
            Self::None => (0, 0, 0),
            Self::RequesterId { sid, qualifier } => (sid, qualifier & 3, 1),
            Self::BusRange { first, last } => ((u16::from(first) << 8) | u16::from(last), 0, 2),
        }
    }
}

/// A decoded remapped-format IRTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Irte {
    /// P: the entry may be used.
    pub present: bool,
    /// FPD: faults through this entry are not recorded.
    pub fault_processing_disable: bool,
    /// Where and how the interrupt is delivered.
    pub target: Target,
    /// AVAIL: four bits for software.
    pub available: u8,
    /// Who may use the entry.
    pub validation: SourceValidation,
}

/// Why a raw IRTE cannot be used (both are VT-d fault reason 0x24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IrteError {
    /// Reserved bits, a reserved delivery mode, or SVT = 3.
    #[error("reserved field set in IRTE")]
    Reserved,
    /// IM = 1: a posted-interrupt entry, which this model does not support.
    #[error("posted-format IRTE (posted interrupts are not supported)")]
    Posted,
}

const LOW_RESERVED: u64 = (0b111 << 12) | (0xff << 24);
const HIGH_RESERVED: u64 = !0 << 20;
const IM_POSTED: u64 = 1 << 15;

impl Irte {
    /// A present entry delivering to `target` with `validation`.
    #[must_use]
    pub fn new(target: Target, validation: SourceValidation) -> Self {
        Self {
            present: true,
            fault_processing_disable: false,
            target,
            available: 0,
            validation,
        }
    }

    /// Decodes the two 64-bit halves of an entry; `eim` is the table's extended
    /// interrupt mode (x2APIC destinations). A non-present entry decodes without checks.
    ///
    /// # Errors
    /// [`IrteError::Posted`] or [`IrteError::Reserved`].
    pub fn decode(raw: [u64; 2], eim: bool) -> Result<Self, IrteError> {
        let [low, high] = raw;
        let bit = |n: u32| low & (1 << n) != 0;
        let present = bit(0);
        let dst = (low >> 32) as u32;
        if present {
            if low & IM_POSTED != 0 {
                return Err(IrteError::Posted);
            }
            if low & LOW_RESERVED != 0 || high & HIGH_RESERVED != 0 {
                return Err(IrteError::Reserved);
            }
            if !eim && dst & 0xffff_00ff != 0 {
                return Err(IrteError::Reserved);
            }
        }
        let delivery = DeliveryMode::from_bits(((low >> 5) & 7) as u8);
        let delivery = match (delivery, present) {
            (Some(d), _) => d,
            (None, true) => return Err(IrteError::Reserved),
            (None, false) => DeliveryMode::Fixed,
        };
        let sid = (high & 0xffff) as u16;
        let qualifier = ((high >> 16) & 3) as u8;
        let validation = match (high >> 18) & 3 {
            0 => SourceValidation::None,
            1 => SourceValidation::RequesterId { sid, qualifier },
            2 => SourceValidation::BusRange {
                first: (sid >> 8) as u8,
                last: (sid & 0xff) as u8,
            },
            _ if present => return Err(IrteError::Reserved),
            _ => SourceValidation::None,
        };
        Ok(Self {
            present,
            fault_processing_disable: bit(1),
            target: Target {
                dest: if eim { dst } else { (dst >> 8) & 0xff },
                vector: ((low >> 16) & 0xff) as u8,
                delivery,
                level: bit(4),
                logical: bit(2),
                redirection_hint: bit(3),
            },
            available: ((low >> 8) & 0xf) as u8,
            validation,
        })
    }

    /// Encodes the entry for a table in `eim` mode.
    #[must_use]
    pub fn encode(&self, eim: bool) -> [u64; 2] {
        let t = &self.target;
        let flag = |on: bool, n: u32| if on { 1u64 << n } else { 0 };
        let dst = if eim { t.dest } else { (t.dest & 0xff) << 8 };
        let low = flag(self.present, 0)
            | flag(self.fault_processing_disable, 1)
            | flag(t.logical, 2)
            | flag(t.redirection_hint, 3)
            | flag(t.level, 4)
            | (u64::from(t.delivery as u8) << 5)
            | (u64::from(self.available & 0xf) << 8)
            | (u64::from(t.vector) << 16)
            | (u64::from(dst) << 32);
        let (sid, sq, svt) = self.validation.fields();
        let high = u64::from(sid) | (u64::from(sq) << 16) | (u64::from(svt) << 18);
        [low, high]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Irte {
        Irte::new(
            Target::fixed(3, 0x41),
            SourceValidation::RequesterId {
                sid: 0x0010,
                qualifier: 0,
            },
        )
    }

    #[test]
    fn entries_round_trip_in_both_modes() {
        for eim in [false, true] {
            let e = entry();
            assert_eq!(Irte::decode(e.encode(eim), eim).unwrap(), e);
        }
        let wide = Irte {
            target: Target::fixed(300, 0x41),
            ..entry()
        };
        assert_eq!(Irte::decode(wide.encode(true), true).unwrap(), wide);
    }

    #[test]
    fn layout_matches_the_spec() {
        let [low, high] = entry().encode(false);
        assert_eq!(low & 1, 1);
        assert_eq!((low >> 16) & 0xff, 0x41);
        assert_eq!(
            (low >> 32) & 0xffff_ffff,
            0x0300,
            "xAPIC destination in DST[15:8]"
        );
        assert_eq!(high, 0x0010 | (1 << 18), "SID, SQ 0, SVT 1");
        let bus = Irte {
            validation: SourceValidation::BusRange { first: 2, last: 5 },
            ..entry()
        };
        assert_eq!(bus.encode(true)[1], 0x0205 | (2 << 18));
    }

    #[test]
    fn posted_and_reserved_entries_are_refused() {
        let [low, high] = entry().encode(false);
        assert_eq!(
            Irte::decode([low | IM_POSTED, high], false),
            Err(IrteError::Posted)
        );
        for bad_low in [
            low | (1 << 13),
            low | (1 << 30),
            low | (3 << 5),
            low | (1 << 32),
        ] {
            assert_eq!(
                Irte::decode([bad_low, high], false),
                Err(IrteError::Reserved),
                "{bad_low:#x}"
            );
        }
        assert_eq!(
            Irte::decode([low, high | (1 << 20)], false),
            Err(IrteError::Reserved)
        );
        assert_eq!(
            Irte::decode([low, high | (3 << 18)], false),
            Err(IrteError::Reserved)
        );
        // A non-present entry is not checked.
        assert!(
            !Irte::decode([IM_POSTED | (1 << 13), !0], false)
                .unwrap()
                .present
        );
    }

    #[test]
    fn source_validation_follows_sq_and_bus_ranges() {
        let exact = SourceValidation::RequesterId {
            sid: 0x0108,
            qualifier: 0,
        };
        assert!(exact.allows(0x0108));
        assert!(!exact.allows(0x0109));
        let ignore_bit2 = SourceValidation::RequesterId {
            sid: 0x0108,
            qualifier: 1,
        };
        assert!(ignore_bit2.allows(0x010c));
        assert!(!ignore_bit2.allows(0x010a));
        let ignore_all = SourceValidation::RequesterId {
            sid: 0x0108,
            qualifier: 3,
        };
        assert!(ignore_all.allows(0x010f));
        assert!(!ignore_all.allows(0x0110));
        let buses = SourceValidation::BusRange { first: 2, last: 4 };
        assert!(buses.allows(0x0400) && buses.allows(0x02ff));
        assert!(!buses.allows(0x0500) && !buses.allows(0x01ff));
        assert!(SourceValidation::None.allows(0xffff));
    }
}
