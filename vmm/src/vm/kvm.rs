//! The VM's KVM set-up beyond the interrupt core: the split irqchip, 32-bit APIC IDs, and
//! the routing backend the core runs over.

use super::*;

/// vCPUs beyond this many have APIC IDs only x2APIC can address.
pub(super) const X2APIC_ONLY_ABOVE: u32 = 255;

/// Creates the split irqchip (KVM_CAP_SPLIT_IRQCHIP): local APICs in KVM, the IOAPIC
/// here, no PIC or PIT. KVM reserves GSIs 0-23 for the IOAPIC's pins and reports the EOIs
/// of their level-triggered vectors (`KVM_EXIT_IOAPIC_EOI`).
pub(super) fn create_split_irqchip(vm: &VmFd) -> Result<(), VmError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        args: [u64::from(irq::routes::LEGACY_GSI_COUNT), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| VmError::Kvm("create the split irqchip (KVM_CAP_SPLIT_IRQCHIP)", e))
}

/// Turns on 32-bit APIC IDs for MSI routes and LAPIC state (KVM_CAP_X2APIC_API): an MSI
/// route then carries destination bits 31:8 in `address_hi`, which is how the interrupt
/// core already writes them, so remapped interrupts reach vCPUs above 255. Broadcast
/// quirks of xAPIC destination 0xff are off (0xff is an ordinary x2APIC ID).
pub(super) fn enable_x2apic_api(vm: &VmFd) -> Result<(), VmError> {
    let wanted = u64::from(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
    let supported = u64::try_from(vm.check_extension_int(Cap::X2ApicApi)).unwrap_or(0);
    if supported & wanted != wanted {
        return Err(VmError::MissingCapability(
            "32-bit APIC IDs (KVM_CAP_X2APIC_API), needed for more than 255 vCPUs",
        ));
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X2APIC_API,
        args: [wanted, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| VmError::Kvm("enable 32-bit APIC IDs (KVM_CAP_X2APIC_API)", e))
}
