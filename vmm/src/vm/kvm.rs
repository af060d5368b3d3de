//! The VM's KVM set-up beyond the interrupt core: the split irqchip, 32-bit APIC IDs, and
//! the routing backend the core runs over.

use super::*;

/// vCPUs beyond this many have APIC IDs only x2APIC can address.
pub(super) const X2APIC_ONLY_ABOVE: u32 = 255;

/// Creates the split irqchip (`irq::kvm::create_split_irqchip`): KVM reserves GSIs 0-23
/// for the IOAPIC's pins and reports the EOIs of their level-triggered vectors
/// (`KVM_EXIT_IOAPIC_EOI`).
pub(super) fn create_split_irqchip(vm: &VmFd) -> Result<(), VmError> {
    irq::kvm::create_split_irqchip(vm).map_err(|e| {
        VmError::Kvm(
            "create the split irqchip (KVM_CAP_SPLIT_IRQCHIP)",
            kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EINVAL)),
        )
    })
}

/// Turns on 32-bit APIC IDs (`irq::kvm::enable_x2apic_api`), which remapped interrupts
/// to vCPUs above 255 need.
pub(super) fn enable_x2apic_api(vm: &VmFd) -> Result<(), VmError> {
    irq::kvm::enable_x2apic_api(vm).map_err(|e| match e.kind() {
        io::ErrorKind::Unsupported => VmError::MissingCapability(
            "32-bit APIC IDs (KVM_CAP_X2APIC_API), needed for more than 255 vCPUs",
        ),
        _ => VmError::Kvm(
            "enable 32-bit APIC IDs (KVM_CAP_X2APIC_API)",
            kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EINVAL)),
        ),
    })
}
