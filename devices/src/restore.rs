//! Why a device model's saved state cannot be restored: one error for every device (the
//! IMS devices, PCI configuration spaces and MSI-X, the IOAPIC, the UART), naming the field
//! that is wrong. Nothing is built when it is returned.

/// A saved state no device could be in: the field that is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device state: {0}")]
pub struct RestoreError(pub &'static str);
