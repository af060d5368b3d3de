//! ACPI tables this VMM generates: RSDP, XSDT, FADT, DSDT, MADT, MCFG, and the DMAR table
//! of the VT-d unit (`devices::viommu::dmar`, a library item).

use acpi_tables::sdt::Sdt;
use devices::viommu::dmar::{dmar, DeviceScope, IOAPIC_SOURCE_ID, OEM_ID};

/// Where the RSDP goes: in the BIOS area an OS searches (0xe0000-0xfffff), followed by
/// the other tables.
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// The end of the area the tables may fill.
pub const TABLES_END: u64 = 0x0010_0000;
/// The IOAPIC's MMIO base and its APIC ID.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the IOAPIC's base is below 4 GiB (the MADT field is 32 bits)"
)]
pub const IOAPIC_ADDR: u32 = hypercall::platform::IOAPIC_BASE as u32;
/// The IOAPIC's ID (in MADT and DMAR).
pub const IOAPIC_ID: u8 = 0;
/// The local APIC's base.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// FADT flag: hardware-reduced ACPI (no PM timer, SCI or fixed hardware).
const FADT_HW_REDUCED: u32 = 1 << 20;

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct Platform {
    /// The vCPUs' APIC IDs, by index (APIC IDs above 254 get x2APIC entries).
    pub apic_ids: Vec<u32>,
    /// The VT-d unit's register base.
    pub vtd_base: u64,
    /// PCI ECAM base (bus 0 only).
    pub ecam_base: u64,
    /// Devices the DMAR lists by scope (beside the IOAPIC and include-all).
    pub scopes: Vec<DeviceScope>,
}

fn header(signature: [u8; 4], length: u32, revision: u8, table: [u8; 4]) -> Sdt {
    let mut oem_table = *b"IRQVM   ";
    if let Some(tail) = oem_table.get_mut(4..) {
        tail.copy_from_slice(&table);
    }
    Sdt::new(signature, length, revision, OEM_ID, oem_table, 1)
}

/// A hardware-reduced FADT pointing at the DSDT at `dsdt`.
#[must_use]
pub fn fadt(dsdt: u64) -> Vec<u8> {
    let mut t = header(*b"FACP", 276, 6, *b"FADT");
    t.write_u32(40, u32::try_from(dsdt).unwrap_or(0));
    t.write_u16(109, 0); // IAPC_BOOT_ARCH: no legacy devices, no 8042
    t.write_u32(112, FADT_HW_REDUCED);
    t.write_u8(131, 5); // FADT minor version (6.5)
    t.write_u64(140, dsdt);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// The DSDT: COM1 as an ACPI device (`PNP0501`) with its ports and its edge-triggered,
/// active-high interrupt. There is no PIC, so legacy IRQs are not set up for an OS
/// without being named: through this, Linux's ACPI PNP maps GSI 4 and its 8250 driver
/// gets the interrupt it drives transmission with (printk's console polls instead, so
/// without it a kernel prints but user space's console writes fail).
///
/// And the PCI host bridge (`PNP0A08`, compatible `PNP0A03`): segment 0, bus 0, the
/// configuration ports, the I/O and MMIO windows the BARs are placed in. Without it an
/// ACPI kernel scans no PCI bus, and so finds neither our devices nor their requester
/// IDs under the DMAR unit.
#[must_use]
pub fn dsdt() -> Vec<u8> {
    use acpi_tables::aml::{
        AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, ResourceTemplate,
        Scope, IO,
    };
    use acpi_tables::Aml;
    use hypercall::platform::{COM1_IOAPIC_PIN, COM1_PORT};
    let (hid, uid) = (EISAName::new("PNP0501"), 0u8);
    let (io, irq) = (
        IO::new(COM1_PORT, COM1_PORT, 1, 8),
        Interrupt::new(true, true, false, false, COM1_IOAPIC_PIN),
    );
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_UID".into(), &uid),
        Name::new("_CRS".into(), &crs),
    ];
    let com1 = Device::new("COM1".into(), names.iter().map(|n| n as &dyn Aml).collect());

    let layout = devices::pci::PciLayout::default();
    let (bridge, compatible, zero) = (EISAName::new("PNP0A08"), EISAName::new("PNP0A03"), 0u8);
    let buses = AddressSpace::<u16>::new_bus_number(0, 0);
    let config = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_last = layout.io_base + layout.io_size - 1;
    let io = AddressSpace::<u16>::new_io(
        u16::try_from(layout.io_base).unwrap_or(0),
        u16::try_from(io_last).unwrap_or(u16::MAX),
        None,
    );
    let window_last = layout.window_base + layout.window_size - 1;
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(layout.window_base).unwrap_or(0),
        u32::try_from(window_last).unwrap_or(u32::MAX),
        None,
    );
    let pci_crs = ResourceTemplate::new(vec![&buses, &config, &io, &mmio]);
    let pci_names = [
        Name::new("_HID".into(), &bridge),
        Name::new("_CID".into(), &compatible),
        Name::new("_SEG".into(), &zero),
        Name::new("_BBN".into(), &zero),
        Name::new("_UID".into(), &zero),
        Name::new("_CRS".into(), &pci_crs),
    ];
    let pci0 = Device::new(
        "PCI0".into(),
        pci_names.iter().map(|n| n as &dyn Aml).collect(),
    );
    let mut aml = Vec::new();
    Scope::new("\\_SB_".into(), vec![&com1, &pci0]).to_aml_bytes(&mut aml);
    let mut t = header(*b"DSDT", 36, 2, *b"DSDT");
    t.append_slice(&aml);
    t.as_slice().to_vec()
}

/// The MADT: every vCPU's local APIC (x2APIC entries for IDs above 254), the IOAPIC, the
/// legacy timer's override to GSI 2 and LINT1 as NMI.
#[must_use]
pub fn madt(apic_ids: &[u32]) -> Vec<u8> {
    let mut t = header(*b"APIC", 44, 5, *b"MADT");
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, 0); // flags: no dual 8259
    for (uid, &id) in (0u32..).zip(apic_ids) {
        match u8::try_from(id) {
            Ok(id8) if id8 < 0xff && uid < 0xff => {
                // Processor local APIC: UID, APIC ID, enabled.
                t.append_slice(&[0, 8, u8::try_from(uid).unwrap_or(0), id8, 1, 0, 0, 0]);
            }
            _ => {
                let mut e = vec![9u8, 16, 0, 0];
                e.extend_from_slice(&id.to_le_bytes());
                e.extend_from_slice(&1u32.to_le_bytes());
                e.extend_from_slice(&uid.to_le_bytes());
                t.append_slice(&e);
            }
        }
    }
    let mut ioapic = vec![1u8, 12, IOAPIC_ID, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // ISA IRQ 0 is GSI 2; flags 0: bus-conforming.
    t.append_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    // Local APIC NMI: all processors, active high, edge, LINT1.
    t.append_slice(&[4, 6, 0xff, 5, 0, 1]);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// The MCFG: ECAM for segment 0, bus 0.
#[must_use]
pub fn mcfg(ecam_base: u64) -> Vec<u8> {
    let mut t = header(*b"MCFG", 44, 1, *b"MCFG");
    let mut e = ecam_base.to_le_bytes().to_vec();
    e.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // segment 0, buses 0-0, reserved
    t.append_slice(&e);
    t.as_slice().to_vec()
}

/// Every table, laid out from [`RSDP_ADDR`]: (address, bytes), RSDP first.
#[must_use]
pub fn tables(platform: &Platform) -> Vec<(u64, Vec<u8>)> {
    let mut scopes = vec![DeviceScope::IoApic {
        id: IOAPIC_ID,
        source_id: IOAPIC_SOURCE_ID,
    }];
    scopes.extend_from_slice(&platform.scopes);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = RSDP_ADDR + 64;
    let mut place = |bytes: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = (next + bytes.len() as u64 + 15) & !15;
        out.push((at, bytes));
        at
    };
    let dsdt_at = place(dsdt(), &mut out);
    let fadt_at = place(fadt(dsdt_at), &mut out);
    let madt_at = place(madt(&platform.apic_ids), &mut out);
    let mcfg_at = place(mcfg(platform.ecam_base), &mut out);
    let dmar_at = place(dmar(platform.vtd_base, &scopes, true), &mut out);
    let mut xsdt = header(*b"XSDT", 36, 1, *b"XSDT");
    for at in [fadt_at, madt_at, mcfg_at, dmar_at] {
        xsdt.append_slice(&at.to_le_bytes());
    }
    let xsdt_at = place(xsdt.as_slice().to_vec(), &mut out);
    let mut rsdp = Vec::new();
    acpi_tables::Aml::to_aml_bytes(&acpi_tables::rsdp::Rsdp::new(OEM_ID, xsdt_at), &mut rsdp);
    out.insert(0, (RSDP_ADDR, rsdp));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn the_table_set_links_up_and_sums_to_zero() {
        let platform = Platform {
            apic_ids: (0..300).collect(),
            vtd_base: 0xfed9_0000,
            ecam_base: 0xe000_0000,
            scopes: Vec::new(),
        };
        let all = tables(&platform);
        let (rsdp_at, rsdp) = &all[0];
        assert_eq!(*rsdp_at, RSDP_ADDR);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let find = |at: u64| all.iter().find(|(a, _)| *a == at).map(|(_, t)| t).unwrap();
        let xsdt = find(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let t = find(u64::from_le_bytes(entry.try_into().unwrap()));
            assert!(checksum_ok(t), "{:?}", &t[..4]);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            signatures.push(t[..4].to_vec());
        }
        assert_eq!(signatures, [b"FACP", b"APIC", b"MCFG", b"DMAR"]);
        let fadt = find(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt = find(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        // COM1's device, `PNP0501` in EISA encoding, its resources: I/O 0x3f8-0x3ff and
        // an extended interrupt descriptor for GSI 4 (consumer, edge, active high).
        let body = &dsdt[36..];
        let has = |bytes: &[u8]| body.windows(bytes.len()).any(|w| w == bytes);
        assert!(has(b"_SB_") && has(b"COM1") && has(b"_CRS") && has(b"_HID"));
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), "EISAID PNP0501");
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]));
        let (last_at, last) = all.last().unwrap();
        assert!(last_at + last.len() as u64 <= TABLES_END);
    }

    #[test]
    fn the_madt_uses_x2apic_entries_above_254() {
        let t = madt(&[0, 1, 254, 255, 287]);
        let mut kinds = Vec::new();
        let mut at = 44;
        while at < t.len() {
            kinds.push((t[at], t[at + 1]));
            at += usize::from(t[at + 1]);
        }
        assert_eq!(
            kinds,
            [
                (0, 8),
                (0, 8),
                (0, 8),
                (9, 16),
                (9, 16),
                (1, 12),
                (2, 10),
                (4, 6)
            ]
        );
        assert!(checksum_ok(&t));
    }
}
