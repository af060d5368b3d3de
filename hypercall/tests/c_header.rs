//! `resources/include/irq_hypercall.h` says what the Rust ABI says: every `#define` has a
//! Rust counterpart with the same value, and every ABI constant is in the header.

use std::collections::BTreeMap;

use irvm_hypercall::abi::{alloc, batch, call, features, status, target, MINOR_VERSION, VERSION};
use irvm_hypercall::{cpuid, platform};

fn header() -> BTreeMap<String, u64> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/include/irq_hypercall.h"
    );
    let text = std::fs::read_to_string(path).expect("the C header exists");
    let mut defines = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("#define ") else {
            continue;
        };
        let Some(name) = rest.split_whitespace().next() else {
            continue;
        };
        let value = line_value(rest, name);
        if value.is_empty() || name.contains('(') {
            continue; // the include guard; IRQ_HC_RETRYABLE, checked by the C compiler
        }
        // A name defined as another (an alias) has that one's value.
        let number = match defines.get(value.as_str()) {
            Some(aliased) => *aliased,
            None => evaluate(&value),
        };
        defines.insert(name.to_string(), number);
    }
    defines
}

fn line_value(rest: &str, name: &str) -> String {
    rest[name.len()..]
        .split("/*")
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Evaluates the header's value forms: `0x..u`, `12u`, `(1u << 3)`, `(1ull << 11)`.
fn evaluate(text: &str) -> u64 {
    let t = text.trim_start_matches('(').trim_end_matches(')');
    if let Some((a, b)) = t.split_once("<<") {
        return evaluate(a.trim()) << evaluate(b.trim());
    }
    let t = t.trim_end_matches(['u', 'l', 'U', 'L']);
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => t.parse().unwrap_or_else(|_| panic!("cannot read {text:?}")),
    }
}

#[test]
fn the_c_header_matches_the_rust_abi() {
    let sig = cpuid::signature_registers();
    let rust: Vec<(&str, u64)> = vec![
        ("IRQ_HC_CPUID_BASE", cpuid::BASE.into()),
        ("IRQ_HC_CPUID_INTERFACE", cpuid::INTERFACE_LEAF.into()),
        ("IRQ_HC_SIGNATURE_EBX", sig[0].into()),
        ("IRQ_HC_SIGNATURE_ECX", sig[1].into()),
        ("IRQ_HC_SIGNATURE_EDX", sig[2].into()),
        ("IRQ_HC_ABI_VERSION", VERSION.into()),
        ("IRQ_HC_ABI_MINOR_VERSION", MINOR_VERSION.into()),
        ("IRQ_HC_PORT", platform::HYPERCALL_PORT.into()),
        ("IRQ_HC_FEATURE_BATCH", features::BATCH.into()),
        ("IRQ_HC_FEATURE_MANAGED", features::MANAGED.into()),
        ("IRQ_HC_FEATURE_COMPOSE", features::COMPOSE.into()),
        ("IRQ_HC_FEATURE_X2APIC_DEST", features::X2APIC_DEST.into()),
        ("IRQ_HC_FEATURE_HOST_ERROR", features::HOST_ERROR.into()),
        ("IRQ_HC_FEATURES_NEGOTIABLE", features::NEGOTIABLE.into()),
        ("IRQ_HC_QUERY", call::QUERY.into()),
        ("IRQ_HC_ALLOCATE", call::ALLOCATE.into()),
        ("IRQ_HC_UPDATE", call::UPDATE.into()),
        ("IRQ_HC_FREE", call::FREE.into()),
        ("IRQ_HC_BATCH", call::BATCH.into()),
        ("IRQ_HC_COMPOSE", call::COMPOSE.into()),
        ("IRQ_HC_SET_FEATURES", call::SET_FEATURES.into()),
        ("IRQ_HC_OK", status::OK),
        ("IRQ_HC_INVALID_ARGUMENT", status::INVALID_ARGUMENT),
        ("IRQ_HC_NO_SPACE", status::NO_SPACE),
        ("IRQ_HC_QUOTA_EXCEEDED", status::QUOTA_EXCEEDED),
        ("IRQ_HC_BUSY", status::BUSY),
        (
            "IRQ_HC_SOURCE_ID_NOT_PERMITTED",
            status::SOURCE_ID_NOT_PERMITTED,
        ),
        ("IRQ_HC_NOT_ALLOCATED", status::NOT_ALLOCATED),
        ("IRQ_HC_BAD_GUEST_ADDRESS", status::BAD_GUEST_ADDRESS),
        ("IRQ_HC_UNSUPPORTED", status::UNSUPPORTED),
        ("IRQ_HC_NOT_APPLIED", status::NOT_APPLIED),
        ("IRQ_HC_HOST_ERROR", status::HOST_ERROR),
        ("IRQ_HC_ALLOC_MANAGED", alloc::MANAGED),
        ("IRQ_HC_ALLOC_ALIGNED", alloc::ALIGNED),
        ("IRQ_HC_TARGET_VECTOR", target::VECTOR),
        (
            "IRQ_HC_TARGET_DELIVERY_SHIFT",
            target::DELIVERY_SHIFT.into(),
        ),
        ("IRQ_HC_TARGET_DELIVERY_MASK", target::DELIVERY_MASK),
        ("IRQ_HC_TARGET_LEVEL", target::LEVEL),
        ("IRQ_HC_TARGET_LOGICAL", target::LOGICAL),
        ("IRQ_HC_TARGET_REDIRECTION_HINT", target::REDIRECTION_HINT),
        ("IRQ_HC_TARGET_PRESENT", target::PRESENT),
        ("IRQ_HC_TARGET_DEST_SHIFT", target::DEST_SHIFT.into()),
        ("IRQ_HC_TARGET_RESERVED", target::RESERVED),
        ("IRQ_HC_TARGET_MIN_VECTOR", target::MIN_VECTOR),
        ("IRQ_HC_BATCH_ENTRY_SIZE", batch::ENTRY_SIZE),
        ("IRQ_HC_BATCH_ALIGN", batch::ALIGN),
        ("IRQ_HC_BATCH_MAX_ENTRIES", batch::MAX_ENTRIES),
    ];
    let c = header();
    for (name, value) in &rust {
        assert_eq!(c.get(*name), Some(value), "{name} in the C header");
    }
    // The same statuses are worth a retry in both (the C macro is checked by the compiler).
    let retry: Vec<u64> = (0..=status::HOST_ERROR)
        .filter(|s| status::retryable(*s))
        .collect();
    assert_eq!(retry, vec![status::BUSY, status::HOST_ERROR]);
    let known: Vec<&str> = rust.iter().map(|(n, _)| *n).collect();
    for name in c.keys() {
        assert!(
            known.contains(&name.as_str()),
            "{name} is in the header but not checked"
        );
    }
}

#[test]
fn the_c_header_compiles_and_has_the_batch_layout() {
    // A C compiler is on the build machines (gcc); check the struct layout with it.
    let dir = std::env::temp_dir().join(format!("irq-hc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("check.c");
    std::fs::write(
        &src,
        "#include <stddef.h>\n#include \"irq_hypercall.h\"\n\
         _Static_assert(sizeof(struct irq_hc_batch_entry) == IRQ_HC_BATCH_ENTRY_SIZE, \"size\");\n\
         _Static_assert(offsetof(struct irq_hc_batch_entry, status) == 4, \"status\");\n\
         _Static_assert(offsetof(struct irq_hc_batch_entry, target) == 8, \"target\");\n\
         _Static_assert(IRQ_HC_RETRYABLE(IRQ_HC_BUSY) && IRQ_HC_RETRYABLE(IRQ_HC_HOST_ERROR), \"retry\");\n\
         _Static_assert(!IRQ_HC_RETRYABLE(IRQ_HC_NO_SPACE) && !IRQ_HC_RETRYABLE(IRQ_HC_OK), \"final\");\n\
         int main(void) { return 0; }\n",
    )
    .unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/include");
    let out = std::process::Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Werror",
            "-fsyntax-only",
            "-I",
            include,
        ])
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
