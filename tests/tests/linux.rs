//! A stock kernel accepts our vIOMMU: Debian's kernels (fetched from Debian's archive by
//! `resources/linux/fetch-kernel`) boot with our ACPI tables, find the DMAR unit and the
//! IOAPIC under it, and enable interrupt remapping in x2APIC mode: the cloud kernel from its
//! bzImage, and both the cloud and the generic kernel as an uncompressed `vmlinux` (made by
//! `resources/linux/extract-vmlinux`) through the PVH entry point, as cloud-hypervisor and
//! Firecracker boot them; each run stops (`until`) as soon as the console shows the line.
//! And the cloud kernel all the way to user space: the `/init` of
//! `resources/linux/make-initramfs` reports the interrupt-remapping state the kernel shows
//! in `/proc/interrupts` and ends the run with its verdict (on this machine's nested KVM
//! that needs the VMM to complete the instructions KVM refuses, `vmm::refused`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration_tests::boot;
use vmm::{Kernel, MachineConfig, Outcome, RunConfig, VmConfig};

const ENABLED: &str = "DMAR-IR: Enabled IRQ remapping in x2apic mode";

/// Runs `resources/linux/NAME` (with `args` and `env`) and returns the path it prints;
/// fails the test, saying `failing` and the script's error output, when it fails.
fn script(name: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)], failing: &str) -> PathBuf {
    let path = format!("{}/../resources/linux/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&path)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("resources/linux/{name} does not run: {e}"));
    assert!(
        out.status.success(),
        "{failing}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The bzImage of Debian's `flavour` kernel (`cloud` or `generic`).
fn debian_kernel(flavour: &str) -> PathBuf {
    let failing =
        format!("fetching Debian's {flavour} kernel failed (this test needs Debian's archive)");
    script("fetch-kernel", &[], &[("FLAVOUR", flavour)], &failing)
}

/// The `vmlinux` inside that bzImage.
fn debian_vmlinux(flavour: &str) -> PathBuf {
    let bzimage = debian_kernel(flavour);
    let failing = format!("extracting the {flavour} vmlinux failed");
    script("extract-vmlinux", &[bzimage.as_os_str()], &[], &failing)
}

/// The initramfs with the reporting `/init`.
fn initramfs() -> PathBuf {
    let failing = "building the initramfs failed (it needs gcc, Debian's static glibc and python3)";
    script("make-initramfs", &[], &[], failing)
}

/// Boots `kernel` until interrupt remapping is enabled and checks what the kernel said of
/// our platform on the way.
fn boots_to_interrupt_remapping(kernel: PathBuf) -> String {
    let config = VmConfig {
        machine: MachineConfig {
            kernel: Kernel::Elf(kernel),
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
    console
}

#[test]
fn a_stock_debian_kernel_enables_interrupt_remapping_in_x2apic_mode_on_our_dmar_unit() {
    boots_to_interrupt_remapping(debian_kernel("cloud"));
}

/// The same kernel, uncompressed, through its PVH entry: the start-info page carries the
/// memory map, command line and RSDP (no decompression in the guest: about half the time
/// on this machine).
#[test]
fn the_cloud_vmlinux_boots_through_pvh_to_interrupt_remapping() {
    let console = boots_to_interrupt_remapping(debian_vmlinux("cloud"));
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "the memory map from the start-info page:\n{console}"
    );
}

/// Debian's generic kernel (XZ-compressed: beyond reach when it decompresses itself under
/// this machine's emulation) reaches interrupt remapping through PVH.
#[test]
fn the_generic_vmlinux_boots_through_pvh_to_interrupt_remapping() {
    boots_to_interrupt_remapping(debian_vmlinux("generic"));
}

/// The README's command line for user space on a KVM that emulates guest ring 0: DMA
/// remapping on, no XSAVE (the emulator refuses it), no SMAP (a `clac` the VMM would
/// complete at every interrupt and exception entry), and the initcalls that cost minutes
/// here and nothing the test needs left out (the BTF parse behind `cubictcp_register`
/// alone is over two minutes).
const USER_SPACE_CMDLINE: &str = "console=ttyS0 nokaslr noxsave clearcpuid=smap intel_iommu=on \
    cryptomgr.notests initcall_blacklist=blake2s_mod_init,ftrace_check_for_weak_functions,\
    tracer_init_tracefs,cubictcp_register,init_blk_tracer,load_system_certificate_list";

/// A stock kernel with `intel_iommu=on` turns DMA translation on (TE, then TES: no "DMAR
/// hardware is malfunctioning" panic) and puts our PCI devices in translated IOMMU
/// domains; it reaches user space, where its `/init` finds every IOAPIC interrupt in use
/// remapped (`IR-IO-APIC`, the console's among them), the DMAR unit's fault interrupt, the
/// ACPI DMAR table and every PCI device behind `dmar0`, and reports PASS on the
/// debug-exit port from ring 3.
#[test]
fn the_cloud_kernel_reaches_user_space_and_its_init_sees_remapped_interrupts() {
    let config = VmConfig {
        machine: MachineConfig {
            kernel: Kernel::Elf(debian_vmlinux("cloud")),
            initrd: Some(initramfs()),
            cpus: 2,
            memory: 512 << 20,
            cmdline: USER_SPACE_CMDLINE.into(),
            cpuid_hide: vec!["cx16".into()],
            ..MachineConfig::default()
        },
        run: RunConfig {
            watchdog: Some(Duration::from_secs(1500)),
            ..RunConfig::default()
        },
    };
    let (report, console) = boot(&config);
    assert!(report.passed(), "{report}\n{console}");
    for line in [
        "iommu: Default domain type: Translated",
        "pci 0000:00:03.0: Adding to iommu group",
        "pci 0000:00:04.0: Adding to iommu group",
        "DMAR: Intel(R) Virtualization Technology for Directed I/O",
        "Run /init as init process",
        "init: stock kernel reached user space",
        "init: ACPI DMAR table: present",
        "init: DMA remapping unit: dmar0 registered",
        "init: DMA remapping: 3 of 3 PCI devices in translated domains behind dmar0",
        "init: verdict PASS",
    ] {
        assert!(console.contains(line), "`{line}` missing:\n{console}");
    }
    let interrupt = |what: &[&str]| {
        console
            .lines()
            .any(|l| l.starts_with("init: interrupts:") && what.iter().all(|w| l.contains(w)))
    };
    assert!(interrupt(&["IR-IO-APIC", "4-edge", "ttyS0"]), "{console}");
    assert!(interrupt(&["DMAR-MSI", "dmar0"]), "{console}");
    assert!(
        console.lines().any(|l| l.starts_with("init: irq ")
            && l.ends_with("chip IR-IO-APIC, hwirq 4, handlers ttyS0")),
        "/sys/kernel/irq shows the console's interrupt remapped:\n{console}"
    );
    assert!(!console.contains("init: verdict FAIL"), "{console}");
}
