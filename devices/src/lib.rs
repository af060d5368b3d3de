//! Device models, and the contract that puts them on a bus.
//!
//! A device sees guest accesses as `read`/`write` calls at an offset into the range it was
//! registered at ([`BusDevice`]); it never sees KVM, the vCPU or the bus itself. What a
//! device does to the outside world goes through a small trait it is given (an interrupt
//! trigger, an exit sink, a doorbell sink), so each model is testable on its own.
//!
//! - [`serial`]: the 16550A console on COM1 (vm-superio), output to any writer.
//! - [`debug_exit`]: the port through which a guest reports its verdict.
//! - [`harness`]: the doorbell of the test harness (see `hypercall::harness`).
//! - [`viommu`]: the VT-d interrupt-remapping register model over the interrupt core.
//! - [`pci`]: the PCI root bus, configuration space, BARs and MSI-X.
//! - [`ims`]: the IMS devices (slot-array and queue-memory) and their event-loop backend.
//! - [`ioapic`]: the IOAPIC, whose pins send through interrupt remapping.
//! - [`restore`]: the one error every device's restore returns.
//! - [`dispatch`]: the IRTE hypercall's dispatcher and the doorbell helper of an exit loop.
//! - [`memory`]: guest memory as the devices take it (any vm-memory address space).
//!
//! Interrupts go through the interrupt core's front door (`irq::control::CoreHandle`) and
//! its data path; no device names a KVM type or the core's routing (CI checks it).

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

pub mod bus;
pub mod debug_exit;
pub mod dispatch;
pub mod harness;
pub mod ims;
pub mod ioapic;
pub mod memory;
pub mod pci;
pub mod restore;
pub mod serial;
pub mod viommu;

pub use bus::{BusDevice, ConcurrentBusDevice};
