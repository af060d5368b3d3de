//! Invalidation-queue descriptors (VT-d 6.5.2), typed: the 128-bit descriptor a guest
//! queues, decoded once into what the unit does with it, and encoded the same way (for
//! drivers and tests). Legacy-mode descriptors only: type bits 3:0 name the kind, and the
//! descriptor's upper type bits (type bits 6:4, in bits 11:9) must be 0.

use super::regs::{self, desc};

/// Bits 15:0 of `v`.
fn field16(v: u64) -> u16 {
    u16::try_from(v & 0xffff).unwrap_or(0)
}

/// One descriptor, as the unit acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// Context-cache invalidation (type 1).
    ContextCache(ContextScope),
    /// IOTLB invalidation (type 2).
    Iotlb(IotlbScope),
    /// Device-TLB invalidation (type 3): accepted, nothing to do (no device TLBs).
    DeviceTlb,
    /// Interrupt-entry-cache invalidation (type 4).
    InterruptEntryCache(IecScope),
    /// Invalidation wait (type 5).
    Wait {
        /// Write `data` to the 4-byte aligned `address` when the wait completes (SW).
        status_write: Option<(u64, u32)>,
        /// Raise the invalidation event (IF).
        interrupt: bool,
    },
}

/// Which entries an interrupt-entry-cache invalidation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IecScope {
    /// Every entry (G = 0).
    Global,
    /// The aligned block of `2^mask` entries holding `index` (G = 1, IM = `mask`, IIDX).
    Selective {
        /// IIDX (bits 47:32).
        index: u16,
        /// IM (bits 31:27); the unit covers at most 2^16 entries whatever its value.
        mask: u8,
    },
}

/// Which context entries a context-cache invalidation covers (also CCMD's granularity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextScope {
    /// Every entry (G = 1).
    Global,
    /// The entries of domain `did` (G = 2).
    Domain(u16),
    /// The entry of requester `sid` with the low `fm` bits of its function ignored
    /// (G = 3, FM 0-3: 0 exact, 1 the low bit, 2 the low two, 3 all three).
    Device {
        /// The domain (DID).
        did: u16,
        /// The requester (SID).
        sid: u16,
        /// Function mask (FM).
        fm: u8,
    },
}

impl ContextScope {
    /// Whether it covers requester `sid` whose cached context is in domain `did`
    /// (`None`: nothing cached, covered by any scope).
    #[must_use]
    pub fn covers(&self, sid: u16, did: Option<u16>) -> bool {
        match *self {
            Self::Global => true,
            Self::Domain(d) => did.is_none_or(|x| x == d),
            Self::Device { sid: s, fm, .. } => {
                let ignore = match fm {
                    0 => 0,
                    1 => 0b1,
                    2 => 0b11,
                    _ => 0b111,
                };
                sid & !ignore == s & !ignore
            }
        }
    }

    /// The granularity code (1, 2, 3).
    #[must_use]
    pub fn code(&self) -> u64 {
        match self {
            Self::Global => 1,
            Self::Domain(_) => 2,
            Self::Device { .. } => 3,
        }
    }
}

/// Which translations an IOTLB invalidation covers (also the IOTLB register's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbScope {
    /// Every translation (G = 1).
    Global,
    /// The translations of domain `did` (G = 2).
    Domain(u16),
    /// The aligned range of `2^am` 4-KiB pages holding `address` in domain `did` (G = 3).
    Page {
        /// The domain (DID).
        did: u16,
        /// The address (ADDR, bits 63:12).
        address: u64,
        /// Address mask (AM): the range is `2^am` pages.
        am: u8,
        /// Invalidation hint (IH): only leaf entries changed.
        hint: bool,
    },
}

impl IotlbScope {
    /// The granularity code (1, 2, 3).
    #[must_use]
    pub fn code(&self) -> u64 {
        match self {
            Self::Global => 1,
            Self::Domain(_) => 2,
            Self::Page { .. } => 3,
        }
    }
}

/// A descriptor the unit refuses (a queue error, `FSTS.IQE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// A type this unit does not know, or type bits 6:4 (bits 11:9) not zero.
    #[error("unknown descriptor type {0:#x}")]
    UnknownType(u64),
    /// A reserved bit is set.
    #[error("reserved bits set in a descriptor of type {0}")]
    Reserved(u64),
    /// A granularity of 0, or an address mask beyond what CAP.MAMV offers.
    #[error("invalid granularity or address mask in a descriptor of type {0}")]
    Granularity(u64),
}

impl Descriptor {
    /// Decodes `[low, high]`.
    ///
    /// # Errors
    /// [`DescriptorError`]: the unit stops its queue on it.
    pub fn decode(d: [u64; 2]) -> Result<Self, DescriptorError> {
        let [low, high] = d;
        let kind = low & 0xf;
        if (low >> 9) & 7 != 0 {
            return Err(DescriptorError::UnknownType(kind | (((low >> 9) & 7) << 4)));
        }
        match kind {
            desc::CONTEXT => {
                if low & desc::CONTEXT_RESERVED != 0 || high != 0 {
                    return Err(DescriptorError::Reserved(kind));
                }
                let did = field16(low >> 16);
                Ok(Self::ContextCache(match (low >> 4) & 3 {
                    1 => ContextScope::Global,
                    2 => ContextScope::Domain(did),
                    3 => ContextScope::Device {
                        did,
                        sid: field16(low >> 32),
                        fm: u8::try_from((low >> 48) & 3).unwrap_or(0),
                    },
                    _ => return Err(DescriptorError::Granularity(kind)),
                }))
            }
            desc::IOTLB => {
                if low & desc::IOTLB_RESERVED != 0 || high & desc::IOTLB_HIGH_RESERVED != 0 {
                    return Err(DescriptorError::Reserved(kind));
                }
                let did = field16(low >> 16);
                Ok(Self::Iotlb(match (low >> 4) & 3 {
                    1 => IotlbScope::Global,
                    2 => IotlbScope::Domain(did),
                    3 => {
                        let am = high & regs::iotlb::AM_MASK;
                        if am > regs::cap::MAMV {
                            return Err(DescriptorError::Granularity(kind));
                        }
                        IotlbScope::Page {
                            did,
                            address: high & !0xfff,
                            am: u8::try_from(am).unwrap_or(0),
                            hint: high & (1 << 6) != 0,
                        }
                    }
                    _ => return Err(DescriptorError::Granularity(kind)),
                }))
            }
            desc::DEVICE_TLB => Ok(Self::DeviceTlb),
            desc::IEC => {
                if low & desc::IEC_RESERVED != 0 || high != 0 {
                    return Err(DescriptorError::Reserved(kind));
                }
                let scope = if low & desc::IEC_SELECTIVE != 0 {
                    IecScope::Selective {
                        index: u16::try_from((low >> 32) & 0xffff).unwrap_or(0),
                        mask: u8::try_from((low >> 27) & 0x1f).unwrap_or(0),
                    }
                } else {
                    IecScope::Global
                };
                Ok(Self::InterruptEntryCache(scope))
            }
            desc::WAIT => {
                if low & desc::WAIT_RESERVED != 0 {
                    return Err(DescriptorError::Reserved(kind));
                }
                let data = u32::try_from(low >> 32).unwrap_or(0);
                Ok(Self::Wait {
                    status_write: (low & desc::WAIT_SW != 0).then_some((high & !3, data)),
                    interrupt: low & desc::WAIT_IF != 0,
                })
            }
            other => Err(DescriptorError::UnknownType(other)),
        }
    }

    /// The 128-bit descriptor.
    #[must_use]
    pub fn encode(&self) -> [u64; 2] {
        match *self {
            Self::ContextCache(scope) => {
                let (did, sid, fm) = match scope {
                    ContextScope::Global => (0, 0, 0),
                    ContextScope::Domain(did) => (did, 0, 0),
                    ContextScope::Device { did, sid, fm } => (did, sid, fm),
                };
                [
                    desc::CONTEXT
                        | (scope.code() << 4)
                        | (u64::from(did) << 16)
                        | (u64::from(sid) << 32)
                        | (u64::from(fm & 3) << 48),
                    0,
                ]
            }
            Self::Iotlb(scope) => {
                let (did, high) = match scope {
                    IotlbScope::Global => (0, 0),
                    IotlbScope::Domain(did) => (did, 0),
                    IotlbScope::Page {
                        did,
                        address,
                        am,
                        hint,
                    } => (
                        did,
                        (address & !0xfff) | u64::from(am & 0x3f) | (u64::from(hint) << 6),
                    ),
                };
                [
                    desc::IOTLB | (scope.code() << 4) | (u64::from(did) << 16),
                    high,
                ]
            }
            Self::DeviceTlb => [desc::DEVICE_TLB, 0],
            Self::InterruptEntryCache(IecScope::Global) => [desc::IEC, 0],
            Self::InterruptEntryCache(IecScope::Selective { index, mask }) => [
                desc::IEC
                    | desc::IEC_SELECTIVE
                    | (u64::from(mask & 0x1f) << 27)
                    | (u64::from(index) << 32),
                0,
            ],
            Self::Wait {
                status_write,
                interrupt,
            } => {
                let (address, data) = status_write.unwrap_or((0, 0));
                let sw = if status_write.is_some() {
                    desc::WAIT_SW
                } else {
                    0
                };
                let irq = if interrupt { desc::WAIT_IF } else { 0 };
                [
                    desc::WAIT | sw | irq | (u64::from(data) << 32),
                    address & !3,
                ]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields at their bits (VT-d 6.5.2.5 and 6.5.2.8), both ways.
    #[test]
    fn descriptors_decode_and_encode_at_their_bits() {
        let table: [([u64; 2], Descriptor); 10] = [
            ([0x11, 0], Descriptor::ContextCache(ContextScope::Global)),
            (
                [0x21 | (7 << 16), 0],
                Descriptor::ContextCache(ContextScope::Domain(7)),
            ),
            (
                [0x31 | (7 << 16) | (0x18 << 32) | (2 << 48), 0],
                Descriptor::ContextCache(ContextScope::Device {
                    did: 7,
                    sid: 0x18,
                    fm: 2,
                }),
            ),
            ([0x12, 0], Descriptor::Iotlb(IotlbScope::Global)),
            (
                [0x22 | (9 << 16), 0],
                Descriptor::Iotlb(IotlbScope::Domain(9)),
            ),
            (
                [0x32 | (9 << 16), 0x1234_5000 | 0x40 | 3],
                Descriptor::Iotlb(IotlbScope::Page {
                    did: 9,
                    address: 0x1234_5000,
                    am: 3,
                    hint: true,
                }),
            ),
            ([0x3, 0], Descriptor::DeviceTlb),
            ([0x4, 0], Descriptor::InterruptEntryCache(IecScope::Global)),
            (
                [0x4 | 0x10 | (5 << 27) | (0x1234 << 32), 0],
                Descriptor::InterruptEntryCache(IecScope::Selective {
                    index: 0x1234,
                    mask: 5,
                }),
            ),
            (
                [0x5 | 0x10 | 0x20 | (0xdead_beef << 32), 0x3_0000],
                Descriptor::Wait {
                    status_write: Some((0x3_0000, 0xdead_beef)),
                    interrupt: true,
                },
            ),
        ];
        for (raw, typed) in table {
            assert_eq!(Descriptor::decode(raw), Ok(typed), "{raw:x?}");
            assert_eq!(typed.encode(), raw, "{typed:?}");
        }
    }

    #[test]
    fn malformed_descriptors_are_refused() {
        let refused: [([u64; 2], DescriptorError); 10] = [
            ([0x1, 0], DescriptorError::Granularity(1)),
            ([0x2, 0], DescriptorError::Granularity(2)),
            ([0x11 | (1 << 60), 0], DescriptorError::Reserved(1)),
            ([0x12 | (1 << 40), 0], DescriptorError::Reserved(2)),
            ([0x32, 19], DescriptorError::Granularity(2)),
            ([0x0, 0], DescriptorError::UnknownType(0)),
            ([0x6, 0], DescriptorError::UnknownType(6)),
            ([0x4 | (1 << 9), 0], DescriptorError::UnknownType(0x14)),
            ([0x4 | (1 << 20), 0], DescriptorError::Reserved(4)),
            ([0x5 | (1 << 8), 0], DescriptorError::Reserved(5)),
        ];
        for (raw, why) in refused {
            assert_eq!(Descriptor::decode(raw), Err(why), "{raw:x?}");
        }
        assert_eq!(
            Descriptor::decode([0x4, 1]),
            Err(DescriptorError::Reserved(4)),
            "an IEC's second quadword is reserved"
        );
    }
}
