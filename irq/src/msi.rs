//! MSI messages: the compatibility format (Intel SDM vol. 3, 11.11) and the remappable
//! format (VT-d spec 5.1.5.2).
//!
//! Compatibility format, as a device writes it without interrupt remapping:
//!
//! ```text
//! address[31:20] = 0xFEE    address[19:12] = destination ID   address[11:5] = extended
//! address[4] = 0 (format)   address[3] = redirection hint     address[2] = destination mode
//! data[7:0] = vector        data[10:8] = delivery mode        data[15] = trigger mode
//! ```
//!
//! Remappable format, a handle into the interrupt-remapping table:
//!
//! ```text
//! address[31:20] = 0xFEE    address[19:5] = handle[14:0]      address[4] = 1 (format)
//! address[3] = SHV          address[2] = handle[15]           address[1:0] = ignored
//! data[15:0] = subhandle when SHV = 1; data[31:16] reserved (0) when SHV = 1
//! interrupt index = handle + (SHV ? subhandle : 0)
//! ```
//!
//! For a KVM MSI route, destinations above 255 are carried in `address_hi[31:8]`, the
//! layout KVM accepts once `KVM_X2APIC_API_USE_32BIT_IDS` is enabled on the VM.

use thiserror::Error;

/// The fixed upper bits of every MSI address.
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const ADDRESS_BASE_MASK: u64 = 0xfff0_0000;
/// Address bit 4: set for a remappable-format message (a handle into the remapping table).
pub const ADDRESS_REMAPPABLE: u64 = 1 << 4;
const ADDRESS_SHV: u64 = 1 << 3;
const ADDRESS_HANDLE_15: u64 = 1 << 2;
/// Lowest vector a fixed interrupt may use; 0-15 are reserved and 16-31 are exceptions
/// when raised as interrupts (the SDM calls delivery of 0-15 illegal).
pub const MIN_VECTOR: u8 = 16;

/// Why an MSI message cannot be built or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MsiError {
    /// The vector is one the architecture reserves.
    #[error("vector {0:#x} is reserved (vectors below 0x10 cannot be delivered)")]
    ReservedVector(u8),
    /// The destination does not fit the 8-bit compatibility-format field.
    #[error("APIC ID {0} does not fit a compatibility-format MSI (at most 255)")]
    DestinationTooWide(u32),
    /// The address is not in the `0xFEEx_xxxx` interrupt range.
    #[error("address {0:#x} is not an MSI address")]
    NotAnInterruptAddress(u64),
    /// A remappable-format message with reserved bits set.
    #[error("remappable-format message has reserved bits set")]
    ReservedBits,
}

/// An MSI message: the address and data a device writes to raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsiMessage {
    /// 64-bit message address.
    pub address: u64,
    /// 32-bit message data.
    pub data: u32,
}

/// Delivery modes (the 3-bit field of MSI data and of an IRTE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DeliveryMode {
    /// Fixed: the vector on the destination(s).
    Fixed = 0,
    /// Lowest priority among the destinations.
    LowestPriority = 1,
    /// System management interrupt.
    Smi = 2,
    /// Non-maskable interrupt.
    Nmi = 4,
    /// INIT.
    Init = 5,
    /// External interrupt (8259-compatible).
    ExtInt = 7,
}

impl DeliveryMode {
    /// The mode for a 3-bit field value; 3 and 6 are reserved.
    #[must_use]
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            7 => Self::ExtInt,
            _ => return None,
        })
    }
}

/// Where an interrupt goes once translated: everything a compatibility-format MSI (and a
/// KVM MSI route) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// Destination APIC ID (physical) or logical destination.
    pub dest: u32,
    /// Vector.
    pub vector: u8,
    /// Delivery mode.
    pub delivery: DeliveryMode,
    /// Level-triggered (else edge).
    pub level: bool,
    /// Logical destination mode (else physical).
    pub logical: bool,
    /// Redirection hint.
    pub redirection_hint: bool,
}

impl Target {
    /// A fixed, physical, edge-triggered interrupt with `vector` to APIC ID `dest`.
    #[must_use]
    pub fn fixed(dest: u32, vector: u8) -> Self {
        Self {
            dest,
            vector,
            delivery: DeliveryMode::Fixed,
            level: false,
            logical: false,
            redirection_hint: false,
        }
    }

    /// The compatibility-format message a KVM MSI route needs for this target
    /// (destinations above 255 in `address_hi[31:8]`, see the module documentation).
    #[must_use]
    pub fn to_msi(&self) -> MsiMessage {
        let mut address = MSI_ADDRESS_BASE | (u64::from(self.dest & 0xff) << 12);
        address |= u64::from(self.dest & 0xffff_ff00) << 32;
        if self.redirection_hint {
            address |= 1 << 3;
        }
        if self.logical {
            address |= 1 << 2;
        }
        let mut data = u32::from(self.vector) | (u32::from(self.delivery as u8) << 8);
        if self.level {
            data |= (1 << 15) | (1 << 14);
        }
        MsiMessage { address, data }
    }
}

/// A decoded MSI message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodedMsi {
    /// A compatibility-format message: the target is in the message itself.
    Compatibility(Target),
    /// A remappable-format message: an index into the remapping table.
    Remappable {
        /// The 16-bit handle.
        handle: u16,
        /// The subhandle, when SHV is set.
        subhandle: Option<u16>,
    },
}

impl DecodedMsi {
    /// The interrupt index of a remappable message (`handle + subhandle`), which may
    /// exceed 16 bits.
    #[must_use]
    pub fn index(&self) -> Option<u32> {
        match *self {
            Self::Remappable { handle, subhandle } => {
                Some(u32::from(handle) + u32::from(subhandle.unwrap_or(0)))
            }
            Self::Compatibility(_) => None,
        }
    }
}

impl MsiMessage {
    /// A compatibility-format message: fixed delivery, physical destination mode,
    /// edge-triggered, to the CPU whose APIC ID is `dest`.
    ///
    /// # Errors
    /// [`MsiError::ReservedVector`] or [`MsiError::DestinationTooWide`].
    pub fn compatibility(dest: u32, vector: u8) -> Result<Self, MsiError> {
        if vector < MIN_VECTOR {
            return Err(MsiError::ReservedVector(vector));
        }
        if dest > 0xff {
            return Err(MsiError::DestinationTooWide(dest));
        }
        Ok(Target::fixed(dest, vector).to_msi())
    }

    /// The remappable-format message for `handle`, with a subhandle if given (SHV).
    #[must_use]
    pub fn remappable(handle: u16, subhandle: Option<u16>) -> Self {
        let h = u64::from(handle);
        let mut address = MSI_ADDRESS_BASE | ADDRESS_REMAPPABLE | ((h & 0x7fff) << 5);
        if h & 0x8000 != 0 {
            address |= ADDRESS_HANDLE_15;
        }
        let mut data = 0;
        if let Some(sub) = subhandle {
            address |= ADDRESS_SHV;
            data = u32::from(sub);
        }
        Self { address, data }
    }

    /// Decodes either format.
    ///
    /// # Errors
    /// [`MsiError::NotAnInterruptAddress`], or [`MsiError::ReservedBits`] for a
    /// remappable message with reserved bits set (VT-d fault reason 0x20).
    pub fn decode(&self) -> Result<DecodedMsi, MsiError> {
        if self.address & ADDRESS_BASE_MASK != MSI_ADDRESS_BASE
            || (self.is_remappable() && self.address >> 32 != 0)
        {
            return Err(MsiError::NotAnInterruptAddress(self.address));
        }
        if self.is_remappable() {
            let mut handle = ((self.address >> 5) & 0x7fff) as u16;
            if self.address & ADDRESS_HANDLE_15 != 0 {
                handle |= 0x8000;
            }
            let subhandle = if self.address & ADDRESS_SHV != 0 {
                if self.data >> 16 != 0 {
                    return Err(MsiError::ReservedBits);
                }
                Some((self.data & 0xffff) as u16)
            } else {
                None
            };
            return Ok(DecodedMsi::Remappable { handle, subhandle });
        }
        let dest = self.destination() | ((self.address >> 32) as u32 & 0xffff_ff00);
        let delivery =
            DeliveryMode::from_bits(((self.data >> 8) & 7) as u8).ok_or(MsiError::ReservedBits)?;
        Ok(DecodedMsi::Compatibility(Target {
            dest,
            vector: self.vector(),
            delivery,
            level: self.data & (1 << 15) != 0,
            logical: self.address & (1 << 2) != 0,
            redirection_hint: self.address & (1 << 3) != 0,
        }))
    }

    /// Low 32 bits of the address.
    #[must_use]
    pub fn address_lo(&self) -> u32 {
        (self.address & 0xffff_ffff) as u32
    }

    /// High 32 bits of the address.
    #[must_use]
    pub fn address_hi(&self) -> u32 {
        (self.address >> 32) as u32
    }

    /// Whether the message is in remappable format (address bit 4).
    #[must_use]
    pub fn is_remappable(&self) -> bool {
        self.address & ADDRESS_REMAPPABLE != 0
    }

    /// The 8-bit destination field of a compatibility-format message.
    #[must_use]
    pub fn destination(&self) -> u32 {
        ((self.address >> 12) & 0xff) as u32
    }

    /// Vector of a compatibility-format message.
    #[must_use]
    pub fn vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_message_encodes_destination_and_vector() {
        let m = MsiMessage::compatibility(3, 0x50).unwrap();
        assert_eq!(m.address, 0xfee0_3000);
        assert_eq!(m.data, 0x50);
        assert_eq!((m.address_lo(), m.address_hi()), (0xfee0_3000, 0));
        assert_eq!((m.destination(), m.vector()), (3, 0x50));
        assert!(!m.is_remappable());
        assert_eq!(
            m.decode().unwrap(),
            DecodedMsi::Compatibility(Target::fixed(3, 0x50))
        );
    }

    #[test]
    fn reserved_vectors_and_wide_destinations_are_refused() {
        assert_eq!(
            MsiMessage::compatibility(0, 15).unwrap_err(),
            MsiError::ReservedVector(15)
        );
        assert_eq!(
            MsiMessage::compatibility(256, 0x40).unwrap_err(),
            MsiError::DestinationTooWide(256)
        );
        assert_eq!(
            MsiMessage::compatibility(255, 16).unwrap().destination(),
            255
        );
    }

    #[test]
    fn remappable_handles_use_bit_2_for_handle_15() {
        let m = MsiMessage::remappable(0x8001, None);
        assert_eq!(m.address, 0xfee0_0000 | 0x10 | (1 << 5) | (1 << 2));
        assert!(m.is_remappable());
        let d = m.decode().unwrap();
        assert_eq!(
            d,
            DecodedMsi::Remappable {
                handle: 0x8001,
                subhandle: None
            }
        );
        assert_eq!(d.index(), Some(0x8001));
        for handle in [0, 1, 0x7fff, 0x8000, 0xffff] {
            let back = MsiMessage::remappable(handle, Some(3)).decode().unwrap();
            assert_eq!(
                back,
                DecodedMsi::Remappable {
                    handle,
                    subhandle: Some(3)
                }
            );
        }
        // handle + subhandle may pass 16 bits; the table lookup then faults.
        assert_eq!(
            MsiMessage::remappable(0xffff, Some(2))
                .decode()
                .unwrap()
                .index(),
            Some(0x1_0001)
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        let mut m = MsiMessage::remappable(5, Some(1));
        m.data |= 1 << 16;
        assert_eq!(m.decode().unwrap_err(), MsiError::ReservedBits);
        let outside = MsiMessage {
            address: 0xfed0_0000,
            data: 0x40,
        };
        assert!(matches!(
            outside.decode(),
            Err(MsiError::NotAnInterruptAddress(_))
        ));
        let high = MsiMessage {
            address: (1 << 32) | 0xfee0_0010,
            data: 0,
        };
        assert!(matches!(
            high.decode(),
            Err(MsiError::NotAnInterruptAddress(_))
        ));
        let reserved_mode = MsiMessage {
            address: 0xfee0_0000,
            data: 0x340,
        };
        assert_eq!(reserved_mode.decode().unwrap_err(), MsiError::ReservedBits);
    }

    #[test]
    fn targets_round_trip_through_compatibility_messages() {
        let t = Target {
            dest: 0x1_2345,
            vector: 0x99,
            delivery: DeliveryMode::LowestPriority,
            level: true,
            logical: true,
            redirection_hint: true,
        };
        let m = t.to_msi();
        assert_eq!(m.address_hi(), 0x1_2300);
        assert_eq!(m.decode().unwrap(), DecodedMsi::Compatibility(t));
    }
}
