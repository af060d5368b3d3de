//! Booting a new VM: the image (ELF test guest or Linux), where the VMM's structures go,
//! the boot information, ACPI, and each vCPU's CPUID and entry state.

use super::*;

pub(super) fn load_kernel(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
) -> Result<LoadedImage, VmError> {
    let low_end = memory::low_ram_end(config.machine.memory);
    match &config.machine.kernel {
        Kernel::BuiltIn => crate::loader::load(mem, &mut Cursor::new(TEST_GUEST_ELF), low_end)
            .map_err(|source| VmError::Load {
                name: "built-in test guest".into(),
                source,
            }),
        Kernel::Elf(path) => {
            let mut file = File::open(path).map_err(|source| VmError::OpenKernel {
                path: path.clone(),
                source,
            })?;
            crate::loader::load(mem, &mut file, low_end).map_err(|source| VmError::Load {
                name: path.display().to_string(),
                source,
            })
        }
    }
}

/// Where the vCPU areas and the mailbox go after an image ending at `image_end`.
pub(super) fn place(config: &VmConfig, image_end: u64) -> Result<Placement, VmError> {
    Placement::new(
        image_end,
        config.machine.cpus,
        memory::low_ram_end(config.machine.memory),
    )
    .ok_or(VmError::TooSmall {
        memory: config.machine.memory,
        cpus: config.machine.cpus,
        image_end,
    })
}

/// Page tables, vCPU areas, command line and boot information.
pub(super) fn write_boot_state(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    image_end: u64,
) -> Result<Placement, VmError> {
    let placement = place(config, image_end)?;
    x86::write_page_tables(
        mem,
        x86::identity_map_end(memory::ram_top(config.machine.memory)),
    )?;
    for cpu in 0..config.machine.cpus {
        x86::write_cpu_area(mem, placement.cpu_area(cpu))?;
    }
    // NUL-terminated (a Linux kernel wants the NUL; the boot information has the length).
    let mut cmdline = config.machine.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| VmError::BootInfo)?;
    let apic_ids: Vec<u32> = (0..config.machine.cpus).collect();
    let info = BootInfo {
        mem_size: config.machine.memory,
        cmdline: (CMDLINE_ADDR, config.machine.cmdline.len() as u64),
        // Without the harness there is no mailbox, and its place is free RAM.
        mailbox: match config.machine.harness {
            true => (placement.mailbox, placement.mailbox_size),
            false => (0, 0),
        },
        apic_ids: &apic_ids,
        free_start: match config.machine.harness {
            true => placement.mailbox + placement.mailbox_size,
            false => placement.mailbox,
        },
        // Known once a vCPU exists (`tell_tsc_khz`).
        tsc_khz: 0,
    };
    let mut page = vec![0u8; hypercall::boot::PAGE_SIZE];
    info.encode(&mut page).map_err(|_| VmError::BootInfo)?;
    mem.write_slice(&page, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|_| VmError::BootInfo)?;
    Ok(placement)
}

/// Writes the TSC frequency KVM gives the vCPUs into the boot information (left 0, "not
/// known", if KVM cannot say).
pub(super) fn tell_tsc_khz(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), VmError> {
    let Ok(khz) = vcpu.get_tsc_khz() else {
        return Ok(());
    };
    let at = BOOT_INFO_ADDR + hypercall::boot::offset::TSC_KHZ as u64;
    mem.write_obj(khz, GuestAddress(at))
        .map_err(|_| VmError::BootInfo)
}

/// A vCPU with its CPUID (which tells the guest the remapping table's size).
pub(super) fn create_vcpu(
    vm: &VmFd,
    supported: &CpuId,
    index: u32,
    cpus: u32,
    table_size: u32,
    hidden: &[String],
) -> Result<VcpuFd, VmError> {
    let fail = |what| {
        move |source| VmError::Vcpu {
            index,
            what,
            source,
        }
    };
    let mut vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(fail("KVM_CREATE_VCPU"))?;
    // Hypercalls answered through kvm_run, without an ioctl (where KVM offers it).
    irq::kvm::share_registers(vm, &mut vcpu);
    let mut entries = supported.as_slice().to_vec();
    crate::cpuid::patch(&mut entries, index, cpus, table_size);
    crate::cpuid::hide(&mut entries, hidden);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::Vcpu {
        index,
        what: "building CPUID",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// A new vCPU's boot state: long mode at the image's entry point.
/// Where a booted VM starts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Entry {
    /// This VMM's boot protocol (`hypercall::boot`): every vCPU at the image's entry.
    Guest(u64),
    /// Linux's 64-bit boot protocol: the BSP at `startup_64`; the others wait for SIPI.
    Linux(crate::linux::LinuxBoot),
}

/// The ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG, DMAR) in the BIOS area.
pub(super) fn write_acpi(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<(), VmError> {
    let platform = crate::acpi::Platform {
        apic_ids: (0..config.machine.cpus).collect(),
        vtd_base: platform::VTD_BASE,
        ecam_base: devices::pci::ECAM_BASE,
        scopes: Vec::new(),
    };
    for (at, table) in crate::acpi::tables(&platform) {
        mem.write_slice(&table, GuestAddress(at))
            .map_err(|_| VmError::BootInfo)?;
    }
    Ok(())
}

pub(super) fn boot_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    placement: &Placement,
    entry: Entry,
) -> Result<(), VmError> {
    let entry = match entry {
        Entry::Guest(at) => at,
        Entry::Linux(boot) => return boot_linux_vcpu(vcpu, index, placement, boot),
    };
    let fail = |what| {
        move |source| VmError::Vcpu {
            index,
            what,
            source,
        }
    };
    let area = placement.cpu_area(index);
    let sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&x86::long_mode_sregs(sregs, area))
        .map_err(fail("KVM_SET_SREGS"))?;
    vcpu.set_regs(&x86::entry_regs(entry, area, BOOT_INFO_ADDR, index))
        .map_err(fail("KVM_SET_REGS"))?;
    vcpu.set_fpu(&x86::initial_fpu())
        .map_err(fail("KVM_SET_FPU"))?;
    // Application processors of KVM's local APICs wait for INIT/SIPI; these start
    // directly at the entry point.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(fail("KVM_SET_MP_STATE"))
}

/// The BSP of a Linux boot in long mode at `startup_64` with `RSI` at the zero page, or
/// (PVH) in 32-bit protected mode at the PVH entry with `RBX` at the start-info page;
/// interrupts off; the other vCPUs keep KVM's reset state and wait for INIT/SIPI.
pub(super) fn boot_linux_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    placement: &Placement,
    boot: crate::linux::LinuxBoot,
) -> Result<(), VmError> {
    if index != 0 {
        return Ok(());
    }
    let fail = |what| {
        move |source| VmError::Vcpu {
            index,
            what,
            source,
        }
    };
    let sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    let area = placement.cpu_area(0);
    let sregs = if boot.pvh {
        x86::pvh_sregs(sregs, area, crate::linux::BOOT_GDT)
    } else {
        x86::linux_sregs(sregs, area, crate::linux::BOOT_GDT)
    };
    vcpu.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;
    // The 64-bit boot protocol takes the zero page in RSI, PVH its start info in RBX.
    let (rsi, rbx) = if boot.pvh {
        (0, boot.zero_page)
    } else {
        (boot.zero_page, 0)
    };
    let regs = kvm_bindings::kvm_regs {
        rip: boot.entry,
        rsi,
        rbx,
        rsp: area + hypercall::boot::STACK_SIZE - 8,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(fail("KVM_SET_REGS"))?;
    vcpu.set_fpu(&x86::initial_fpu())
        .map_err(fail("KVM_SET_FPU"))
}
