//! Fixed I/O ports of the platform.
//!
//! Port I/O is used (rather than MMIO) because a port access exits to the VMM with the
//! value in a register and costs no page-table set-up in the guest.

/// COM1: a 16550A UART. Output goes to the VMM's console (stdout or a file).
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports the 16550A occupies.
pub const COM1_LEN: u16 = 8;

/// Debug-exit: a write of 1, 2 or 4 bytes ends the VM with that value as the guest's
/// verdict. `0` means success; any other value is a failure code. Reads return
/// [`DEBUG_EXIT_SIGNATURE`] so a guest can check that the port exists.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// Value read back from [`DEBUG_EXIT_PORT`].
pub const DEBUG_EXIT_SIGNATURE: u32 = 0x4445_5854; // "DEXT"

/// Test-harness doorbell: a 4-byte write of a request sequence number tells the host that
/// a request is waiting in the harness mailbox (see [`crate::harness`]). Reads return
/// [`HARNESS_SIGNATURE`] when the harness is present and all ones when it is not.
pub const HARNESS_PORT: u16 = 0x502;
/// Value read back from [`HARNESS_PORT`] when the harness is present.
pub const HARNESS_SIGNATURE: u32 = 0x4841_524e; // "HARN"

/// The IRTE hypercall doorbell: a 4-byte `out` of a call number (see [`crate::abi`]).
/// Advertised in ECX of the CPUID interface leaf.
pub const HYPERCALL_PORT: u16 = 0x510;

/// The exit floor (test harness only): an access the VMM answers with nothing at all, not
/// even a device, so that `vmm bench` can time the round trip of a bare port-I/O exit
/// beside the hypercall's, made by the same guest code. Reads return all ones. Without
/// the harness it is an unmapped port.
pub const NULL_PORT: u16 = 0x511;

/// Base of the VT-d remapping unit's 4-KiB register page (interrupt remapping only; see
/// `docs/viommu.md`).
pub const VTD_BASE: u64 = 0xfed9_0000;

/// Base of the IOAPIC's register page (`IOREGSEL` at 0, `IOWIN` at 0x10, `EOI` at 0x40;
/// 24 pins, version 0x20). Its interrupts go through interrupt remapping as requester
/// [`IOAPIC_SOURCE_ID`]; COM1 is its pin 4. See `docs/viommu.md`.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The requester ID of the IOAPIC's interrupts (bus 0xff, device 0, function 0; the DMAR
/// lists it under the VT-d unit).
pub const IOAPIC_SOURCE_ID: u16 = 0xff00;
/// The IOAPIC pin of COM1's interrupt.
pub const COM1_IOAPIC_PIN: u32 = 4;

/// PCI configuration space of bus 0 (ECAM: `ECAM_BASE + (device << 15 | function << 12
/// | register)`); ports `0xcf8`/`0xcfc` reach the same space.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// The MMIO window the VMM places BARs in.
pub const PCI_WINDOW_BASE: u64 = 0xc000_0000;
/// Size of that window.
pub const PCI_WINDOW_SIZE: u64 = 0x2000_0000;

/// Success verdict for [`DEBUG_EXIT_PORT`].
pub const EXIT_SUCCESS: u32 = 0;
