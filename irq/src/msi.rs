//! MSI messages (Intel SDM vol. 3, "Message Signalled Interrupts").
//!
//! Compatibility format, as a device writes it without interrupt remapping:
//!
//! ```text
//! address[31:20] = 0xFEE         address[19:12] = destination APIC ID
//! address[4]     = 0 (format)    address[3] = redirection hint, address[2] = dest mode
//! data[7:0]      = vector        data[10:8] = delivery mode, data[15] = trigger mode
//! ```

use thiserror::Error;

/// The fixed upper bits of every MSI address.
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
/// Address bit 4: set for a remappable-format message (a handle into the remapping table).
pub const ADDRESS_REMAPPABLE: u64 = 1 << 4;
/// Lowest vector a fixed interrupt may use; 0-15 are reserved and 16-31 are exceptions
/// when raised as interrupts (the SDM calls delivery of 0-15 illegal).
pub const MIN_VECTOR: u8 = 16;

/// Why an MSI message cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MsiError {
    /// The vector is one the architecture reserves.
    #[error("vector {0:#x} is reserved (vectors below 0x10 cannot be delivered)")]
    ReservedVector(u8),
    /// The destination does not fit the 8-bit compatibility-format field.
    #[error("APIC ID {0} does not fit a compatibility-format MSI (at most 255)")]
    DestinationTooWide(u32),
}

/// An MSI message: the address and data a device writes to raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsiMessage {
    /// 64-bit message address.
    pub address: u64,
    /// 32-bit message data.
    pub data: u32,
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
        Ok(Self {
            address: MSI_ADDRESS_BASE | (u64::from(dest) << 12),
            data: u32::from(vector),
        })
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

    /// Destination APIC ID of a compatibility-format message.
    #[must_use]
    pub fn destination(&self) -> u32 {
        ((self.address >> 12) & 0xff) as u32
    }

    /// Vector of the message.
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
}
