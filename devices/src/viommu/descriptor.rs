//! Invalidation-queue descriptors (VT-d 6.5.2), typed: the 128-bit descriptor a guest
//! queues, decoded once into what the unit does with it, and encoded the same way (for
//! drivers and tests). Legacy-mode descriptors only: type bits 3:0 name the kind, and the
//! descriptor's upper type bits (type bits 6:4, in bits 11:9) must be 0.

use super::regs::desc;

/// One descriptor, as the unit acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// Context-cache invalidation (type 1): accepted, nothing to do (no DMA remapping).
    ContextCache,
    /// IOTLB invalidation (type 2): accepted, nothing to do.
    Iotlb,
    /// Device-TLB invalidation (type 3): accepted, nothing to do.
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

/// A descriptor the unit refuses (a queue error, `FSTS.IQE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// A type this unit does not know, or type bits 6:4 (bits 11:9) not zero.
    #[error("unknown descriptor type {0:#x}")]
    UnknownType(u64),
    /// A reserved bit is set.
    #[error("reserved bits set in a descriptor of type {0}")]
    Reserved(u64),
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
            desc::CONTEXT => Ok(Self::ContextCache),
            desc::IOTLB => Ok(Self::Iotlb),
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
            Self::ContextCache => [desc::CONTEXT, 0],
            Self::Iotlb => [desc::IOTLB, 0],
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
        let table: [([u64; 2], Descriptor); 6] = [
            ([0x1, 0], Descriptor::ContextCache),
            ([0x2, 0], Descriptor::Iotlb),
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
        let refused: [([u64; 2], DescriptorError); 5] = [
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
