//! CPUID discovery of this VMM's interface.
//!
//! Hypervisor leaves live at `0x4000_0000 + 0x100 * k`; software scans them for a
//! signature (Linux does the same in `hypervisor_cpuid_base`). KVM's own leaves stay at
//! [`KVM_BASE`] so a guest can use KVM paravirtual features; this project's leaves are at
//! [`BASE`]:
//!
//! | leaf        | EAX                 | EBX, ECX, EDX                |
//! |-------------|---------------------|------------------------------|
//! | `BASE`      | highest leaf in range (`BASE + 1`) | signature [`SIGNATURE`] |
//! | `BASE + 1`  | ABI version ([`ABI_VERSION`]) | EBX feature bits (`abi::features`), ECX hypercall doorbell port, EDX entries in the remapping table |
//!
//! A guest must treat version 0 as "no hypercall interface".

/// KVM's own hypervisor leaf (signature `"KVMKVMKVM\0\0\0"`).
pub const KVM_BASE: u32 = 0x4000_0000;
/// This project's leaf range.
pub const BASE: u32 = 0x4000_0100;
/// The interface leaf.
pub const INTERFACE_LEAF: u32 = BASE + 1;
/// Signature in EBX, ECX, EDX of [`BASE`] (12 ASCII bytes, EBX first).
pub const SIGNATURE: [u8; 12] = *b"IRQREMAPHYPV";
/// The hypercall ABI version advertised in EAX of [`INTERFACE_LEAF`]; 0 means none.
pub const ABI_VERSION: u32 = crate::abi::VERSION;

/// The signature split into the three registers, as CPUID returns it.
#[must_use]
pub const fn signature_registers() -> [u32; 3] {
    let s = SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// One CPUID leaf a host answers: function (EAX in), EAX, EBX, ECX, EDX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The function (leaf number).
    pub function: u32,
    /// EAX, EBX, ECX, EDX out.
    pub registers: [u32; 4],
}

/// The two leaves a host adds to a vCPU's CPUID to announce the hypercall: [`BASE`] and
/// [`INTERFACE_LEAF`], with `features` (`abi::features`), the doorbell `port` and the
/// remapping table's `table_size`. The host removes any other leaf of its range
/// (`BASE..BASE + 0x100`) and leaves [`KVM_BASE`] alone.
#[must_use]
pub const fn discovery_leaves(features: u32, port: u16, table_size: u32) -> [Leaf; 2] {
    let [b, c, d] = signature_registers();
    [
        Leaf {
            function: BASE,
            registers: [INTERFACE_LEAF, b, c, d],
        },
        Leaf {
            function: INTERFACE_LEAF,
            registers: [ABI_VERSION, features, port as u32, table_size],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_through_registers() {
        let [b, c, d] = signature_registers();
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&b.to_le_bytes());
        bytes[4..8].copy_from_slice(&c.to_le_bytes());
        bytes[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&bytes, b"IRQREMAPHYPV");
    }
}
