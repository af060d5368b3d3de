//! A stock kernel accepts our vIOMMU: Debian's cloud kernel (fetched from Debian's archive
//! by `resources/linux/fetch-kernel`) boots from its bzImage with our ACPI tables, finds
//! the DMAR unit and the IOAPIC under it, and enables interrupt remapping in x2APIC mode.
//! On this machine's nested KVM the boot later stops at an instruction the nested KVM
//! cannot emulate, so the run stops (`until`) as soon as the console shows the line.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration_tests::boot;
use vmm::{Kernel, MachineConfig, Outcome, RunConfig, VmConfig};

const ENABLED: &str = "DMAR-IR: Enabled IRQ remapping in x2apic mode";

fn debian_kernel() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/linux/fetch-kernel"
    );
    let out = Command::new(script)
        .output()
        .expect("resources/linux/fetch-kernel runs");
    assert!(
        out.status.success(),
        "fetching Debian's cloud kernel failed (this test needs Debian's archive):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn a_stock_debian_kernel_enables_interrupt_remapping_in_x2apic_mode_on_our_dmar_unit() {
    let config = VmConfig {
        machine: MachineConfig {
            kernel: Kernel::Elf(debian_kernel()),
            cpus: 2,
            memory: 512 << 20,
            cmdline: "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr noxsave intel_iommu=on"
                .into(),
            cpuid_hide: vec!["cx16".into()],
            ..MachineConfig::default()
        },
        run: RunConfig {
            until: Some(ENABLED.into()),
            watchdog: Some(Duration::from_secs(900)),
            ..RunConfig::default()
        },
    };
    let (report, console) = boot(&config);
    assert_eq!(
        report.outcome,
        Outcome::ConsoleMatched {
            text: ENABLED.into()
        },
        "{report}\n{console}"
    );
    for line in [
        "ACPI: DMAR 0x00000000000E0",
        // The IOAPIC the kernel reads is ours (version 0x20; KVM's in-kernel one is 0x11).
        "IOAPIC[0]: apic_id 0, version 32, address 0xfec00000, GSI 0-23",
        "DMAR: DRHD base: 0x000000fed90000 flags: 0x1",
        "DMAR-IR: IOAPIC id 0 under DRHD base  0xfed90000 IOMMU 0",
        "DMAR-IR: Queued invalidation will be enabled to support x2apic and Intr-remapping.",
    ] {
        assert!(console.contains(line), "`{line}` missing:\n{console}");
    }
}
