//! The CPUID each vCPU sees: KVM's supported set, with the per-vCPU topology filled in,
//! the hypervisor bit set, and this project's hypervisor leaves (`hypercall::cpuid`).

use kvm_bindings::kvm_cpuid_entry2;

/// KVM's own signature, `"KVMKVMKVM\0\0\0"`, for when KVM's list lacks its leaf.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

fn leaf(function: u32, eax: u32, [ebx, ecx, edx]: [u32; 3]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Where a CPU feature's bit is: leaf, register (0 EAX .. 3 EDX, subleaf 0), bit.
type FeatureBit = (u32, usize, u32);

/// CPU features a VM may hide from its guest (`--cpuid-hide`), by the names Linux's
/// `/proc/cpuinfo` uses, with the bits that go with each (hiding XSAVE hides what needs it).
pub const HIDEABLE: &[(&str, &[FeatureBit])] = &[
    (
        "xsave",
        &[
            (1, 2, 26), // XSAVE
            (1, 2, 27), // OSXSAVE
            (1, 2, 28), // AVX
            (1, 2, 12), // FMA
            (1, 2, 29), // F16C
            (7, 1, 5),  // AVX2
            (7, 1, 16), // AVX512F
        ],
    ),
    ("cx16", &[(1, 2, 13)]),
    (
        "avx",
        &[(1, 2, 28), (1, 2, 12), (1, 2, 29), (7, 1, 5), (7, 1, 16)],
    ),
    ("avx2", &[(7, 1, 5)]),
    ("avx512f", &[(7, 1, 16)]),
    ("pcid", &[(1, 2, 17)]),
    ("invpcid", &[(7, 1, 10)]),
    ("tsc_deadline_timer", &[(1, 2, 24)]),
    ("rdrand", &[(1, 2, 30)]),
    ("rdseed", &[(7, 1, 18)]),
    ("pdpe1gb", &[(0x8000_0001, 3, 26)]),
    ("la57", &[(7, 2, 16)]),
    ("umip", &[(7, 2, 2)]),
    // Without SMAP a kernel executes no `clac`/`stac`; without POPCNT it counts bits in
    // software (both instructions the VMM can otherwise complete: `refused`).
    ("smap", &[(7, 1, 20)]),
    ("popcnt", &[(1, 2, 23)]),
    // SSSE3 and what builds on it (SSE4.1, SSE4.2, AVX and up).
    (
        "ssse3",
        &[
            (1, 2, 9),
            (1, 2, 19),
            (1, 2, 20),
            (1, 2, 28),
            (1, 2, 12),
            (1, 2, 29),
            (7, 1, 5),
            (7, 1, 16),
        ],
    ),
];

/// The bits of a hideable feature, by name.
#[must_use]
pub fn hideable(name: &str) -> Option<&'static [FeatureBit]> {
    HIDEABLE
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bits)| *bits)
}

/// Clears the bits of the named features (names from [`HIDEABLE`]; others are ignored,
/// the configuration having checked them), and XSAVE's leaf 0xd with XSAVE.
pub fn hide(entries: &mut Vec<kvm_cpuid_entry2>, features: &[String]) {
    for name in features {
        for &(function, register, bit) in hideable(name).unwrap_or_default() {
            for e in entries
                .iter_mut()
                .filter(|e| e.function == function && e.index == 0)
            {
                let r = match register {
                    0 => &mut e.eax,
                    1 => &mut e.ebx,
                    2 => &mut e.ecx,
                    _ => &mut e.edx,
                };
                *r &= !(1 << bit);
            }
        }
        if name == "xsave" {
            entries.retain(|e| e.function != 0xd);
        }
    }
}

/// Adjusts KVM's supported CPUID for vCPU `cpu` (its APIC ID) of `cpus`, advertising the
/// hypercall with a remapping table of `table_size` entries.
pub fn patch(entries: &mut Vec<kvm_cpuid_entry2>, cpu: u32, cpus: u32, table_size: u32) {
    let logical = cpus.min(0xff);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC ID, logical processor count, hypervisor present.
                e.ebx = (e.ebx & 0x0000_ffff) | ((cpu & 0xff) << 24) | (logical << 16);
                e.ecx |= 1 << 31;
            }
            // x2APIC topology: EDX holds the x2APIC ID on every subleaf.
            0xb | 0x1f => e.edx = cpu,
            _ => {}
        }
    }
    if !entries
        .iter()
        .any(|e| e.function == hypercall::cpuid::KVM_BASE)
    {
        entries.push(leaf(
            hypercall::cpuid::KVM_BASE,
            hypercall::cpuid::KVM_BASE + 1,
            KVM_SIGNATURE,
        ));
    }
    entries.retain(|e| {
        !(hypercall::cpuid::BASE..hypercall::cpuid::BASE + 0x100).contains(&e.function)
    });
    let leaves = hypercall::cpuid::discovery_leaves(
        hypercall::abi::features::V1_1,
        hypercall::platform::HYPERCALL_PORT,
        table_size,
    );
    for l in leaves {
        let [eax, ebx, ecx, edx] = l.registers;
        entries.push(leaf(l.function, eax, [ebx, ecx, edx]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(entries: &[kvm_cpuid_entry2], function: u32) -> &kvm_cpuid_entry2 {
        entries.iter().find(|e| e.function == function).unwrap()
    }

    #[test]
    fn per_vcpu_ids_hypervisor_bit_and_our_leaves() {
        let mut entries = vec![
            leaf(1, 0x806f8, [0xffff_0800, 0x1234, 0]),
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 99,
                ..Default::default()
            },
        ];
        patch(&mut entries, 3, 8, 65536);
        let l1 = find(&entries, 1);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 8);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_eq!(l1.ecx, 0x1234 | (1 << 31));
        assert_eq!(find(&entries, 0xb).edx, 3);
        assert_eq!(find(&entries, 0x4000_0000).ebx, KVM_SIGNATURE[0]);
        let base = find(&entries, hypercall::cpuid::BASE);
        assert_eq!(base.eax, hypercall::cpuid::INTERFACE_LEAF);
        let mut sig = Vec::new();
        for r in [base.ebx, base.ecx, base.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(sig, b"IRQREMAPHYPV");
        let iface = find(&entries, hypercall::cpuid::INTERFACE_LEAF);
        assert_eq!((iface.eax, iface.ecx, iface.edx), (1, 0x510, 65536));
        assert_eq!(iface.ebx, hypercall::abi::features::V1_1);
    }

    #[test]
    fn hidden_features_lose_their_bits_and_xsave_its_leaf() {
        let mut entries = vec![
            leaf(
                1,
                0,
                [0, (1 << 26) | (1 << 27) | (1 << 28) | (1 << 13) | 1, 0],
            ),
            leaf(7, 0, [1 << 5, 0, 0]),
            leaf(0xd, 7, [0; 3]),
        ];
        hide(&mut entries, &["xsave".into(), "cx16".into()]);
        assert_eq!(find(&entries, 1).ecx, 1, "only SSE3 is left");
        assert_eq!(find(&entries, 7).ebx, 0, "AVX2 goes with XSAVE");
        assert!(entries.iter().all(|e| e.function != 0xd));
        assert!(hideable("xsave").is_some() && hideable("sse").is_none());
    }

    #[test]
    fn smap_popcnt_and_ssse3_with_what_builds_on_it() {
        let sse3 = 1;
        let mut entries = vec![
            leaf(
                1,
                0,
                [0, (1 << 23) | (1 << 9) | (1 << 19) | (1 << 20) | sse3, 0],
            ),
            leaf(7, 0, [(1 << 20) | (1 << 7), 0, 0]),
        ];
        hide(
            &mut entries,
            &["smap".into(), "popcnt".into(), "ssse3".into()],
        );
        assert_eq!(find(&entries, 1).ecx, sse3);
        assert_eq!(find(&entries, 7).ebx, 1 << 7, "SMEP stays");
    }

    #[test]
    fn patching_twice_does_not_duplicate_leaves() {
        let mut entries = vec![leaf(1, 0, [0; 3])];
        patch(&mut entries, 0, 1, 16);
        patch(&mut entries, 0, 1, 16);
        let ours = entries
            .iter()
            .filter(|e| e.function == hypercall::cpuid::BASE)
            .count();
        assert_eq!(ours, 1);
    }
}
