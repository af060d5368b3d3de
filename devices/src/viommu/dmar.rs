//! The DMAR table (Intel VT-d spec, chapter 8): where a VT-d unit is and which devices it
//! remaps, for a guest OS to find it. An embedder places it with its other ACPI tables.
//!
//! ```text
//! DMAR: header (36) | host address width (1) | flags (1) | reserved (10) | DRHD...
//! DRHD: type 0 (2) | length (2) | flags (1: INCLUDE_PCI_ALL) | size (1) | segment (2)
//!       | register base (8) | device scopes...
//! scope: type (1: 1 PCI endpoint, 3 IOAPIC) | length (1) | flags (1) | reserved (1)
//!        | enumeration ID (1: the IOAPIC ID) | start bus (1) | path: (device, function)...
//! ```

use acpi_tables::sdt::Sdt;

/// DMAR flag: the platform supports interrupt remapping.
pub const DMAR_INTR_REMAP: u8 = 1 << 0;
/// DMAR flag: the OS should not use x2APIC (not set: x2APIC is fine).
pub const DMAR_X2APIC_OPT_OUT: u8 = 1 << 1;
/// DRHD flag: the unit covers every PCI device of its segment not listed elsewhere.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// The requester ID the IOAPIC's interrupts carry (bus 0xff, device 0, function 0, the
/// pseudo bus QEMU's q35 uses too).
pub const IOAPIC_SOURCE_ID: u16 = hypercall::platform::IOAPIC_SOURCE_ID;

/// The OEM ID of the tables.
pub const OEM_ID: [u8; 6] = *b"IRQVMM";
const OEM_TABLE: [u8; 8] = *b"IRQVMDMR";

/// A device a remapping unit covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceScope {
    /// A PCI endpoint.
    PciEndpoint {
        /// Bus.
        bus: u8,
        /// Device.
        device: u8,
        /// Function.
        function: u8,
    },
    /// An IOAPIC, by its APIC ID, with the requester ID its interrupts carry.
    IoApic {
        /// The IOAPIC's ID.
        id: u8,
        /// Its requester ID.
        source_id: u16,
    },
}

impl DeviceScope {
    fn bytes(&self) -> [u8; 8] {
        let (kind, enumeration, source_id) = match *self {
            Self::PciEndpoint {
                bus,
                device,
                function,
            } => (
                1u8,
                0u8,
                (u16::from(bus) << 8) | (u16::from(device & 0x1f) << 3) | u16::from(function & 7),
            ),
            Self::IoApic { id, source_id } => (3, id, source_id),
        };
        let [devfn, bus] = source_id.to_le_bytes();
        [kind, 8, 0, 0, enumeration, bus, devfn >> 3, devfn & 7]
    }
}

/// The DMAR table for one remapping unit at `base` covering `scopes` (and, with
/// `include_all`, every other PCI device of segment 0).
#[must_use]
pub fn dmar(base: u64, scopes: &[DeviceScope], include_all: bool) -> Vec<u8> {
    let mut table = Sdt::new(*b"DMAR", 48, 1, OEM_ID, OEM_TABLE, 1);
    table.write_u8(36, 47); // host address width: 48 bits
    table.write_u8(37, DMAR_INTR_REMAP);
    let mut drhd = Vec::with_capacity(16 + 8 * scopes.len());
    let length = u16::try_from(16 + 8 * scopes.len()).unwrap_or(u16::MAX);
    drhd.extend_from_slice(&0u16.to_le_bytes());
    drhd.extend_from_slice(&length.to_le_bytes());
    drhd.push(if include_all { DRHD_INCLUDE_PCI_ALL } else { 0 });
    drhd.push(0); // one 4-KiB page of registers
    drhd.extend_from_slice(&0u16.to_le_bytes());
    drhd.extend_from_slice(&base.to_le_bytes());
    for scope in scopes {
        drhd.extend_from_slice(&scope.bytes());
    }
    table.append_slice(&drhd);
    table.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(t: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([t[at], t[at + 1]])
    }

    #[test]
    fn the_dmar_table_describes_the_unit_and_its_scopes() {
        let scopes = [
            DeviceScope::IoApic {
                id: 0,
                source_id: IOAPIC_SOURCE_ID,
            },
            DeviceScope::PciEndpoint {
                bus: 0,
                device: 3,
                function: 1,
            },
        ];
        let t = dmar(0xfed9_0000, &scopes, true);
        assert_eq!(&t[..4], b"DMAR");
        assert_eq!(
            u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        assert_eq!((t[36], t[37]), (47, DMAR_INTR_REMAP));
        let drhd = &t[48..];
        assert_eq!((u16_at(drhd, 0), u16_at(drhd, 2)), (0, 32));
        assert_eq!(drhd[4], DRHD_INCLUDE_PCI_ALL);
        let mut base = [0u8; 8];
        base.copy_from_slice(&drhd[8..16]);
        assert_eq!(u64::from_le_bytes(base), 0xfed9_0000);
        assert_eq!(
            &drhd[16..24],
            &[3, 8, 0, 0, 0, 0xff, 0, 0],
            "IOAPIC 0 at ff:00.0"
        );
        assert_eq!(&drhd[24..32], &[1, 8, 0, 0, 0, 0, 3, 1], "endpoint 00:03.1");
        assert_eq!(t.len(), 48 + 32);
    }
}
