//! The interrupt core: what a guest interrupt is on its way from a device model to a vCPU.
//!
//! A device model decides to interrupt and writes an eventfd. KVM's irqfd mechanism turns
//! that write into the injection of the MSI route the eventfd is attached to, in the
//! kernel, without a VMM thread on the way. This crate owns both halves of that picture:
//!
//! - [`msi`]: the MSI message a route carries (address/data, compatibility format).
//! - [`routes`]: KVM's GSI routing table, owned in one place: the route limit read from
//!   KVM, the legacy IOAPIC/PIC GSIs kept routed and out of allocation, staged changes
//!   committed with one `KVM_SET_GSI_ROUTING`, and the kernel's ordering rules (a route
//!   exists before an irqfd is attached to it; irqfds are detached before a route goes).
//!
//! - [`control`]: the front door. Every front end (the hypercall dispatcher, the VT-d unit,
//!   the IOAPIC's level pins, an embedder) changes the core through one object-safe trait,
//!   [`InterruptControl`], held as a [`CoreHandle`]; [`InterruptCore`] implements it over
//!   [`backing::Backing`] (entries, lines, the route cache, transactions) and owns its lock.
//!   Device models signal through the data path, [`backing::InterruptPath`], beside it.
//!
//! KVM is reached only through the [`routes::RoutingBackend`] trait; [`routes::KvmRouting`]
//! is the real implementation, and unit tests use a fake that can fail any call.
//! No device, bus or CLI knowledge lives here.

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

pub mod backing;
pub mod control;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod fdlimit;
pub mod irte;
pub mod msi;
pub mod remap;
pub mod routes;
pub mod storm;

pub use control::{CoreHandle, InterruptControl, InterruptCore};
pub use msi::{MsiError, MsiMessage};
pub use routes::{Gsi, Irqchip, KvmRouting, RouteError, RouteTable, RoutingBackend};
