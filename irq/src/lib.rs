//! The interrupt core: what a guest interrupt is on its way from a device model to a vCPU.
//!
//! A device model decides to interrupt and writes an eventfd. KVM's irqfd mechanism turns
//! that write into the injection of the MSI route the eventfd is attached to, in the
//! kernel, without a VMM thread on the way. This crate owns both halves of that picture:
//!
//! Where each concept lives:
//!
//! - [`msi`], [`irte`]: the formats: the MSI message (compatibility and remappable) and the
//!   remapping table entry, each one type with encode and decode.
//! - [`remap`]: the remapping table: `translate(message, requester)` to a target or a
//!   fault (VT-d fault reasons), source-id checks.
//! - [`port`]: the KVM port's traits: [`RoutingBackend`] (routing table and irqfds),
//!   [`port::MsiInjector`] and [`port::DoorbellVcpu`] (a vCPU at the hypercall's doorbell),
//!   with [`port::FaultInjecting`] the test machinery in front of a backend.
//! - `kvm` (feature `kvm`, on by default): their KVM implementations (`KvmRouting`, the
//!   only place KVM is named) and the VM set-up the core needs (split irqchip, x2APIC API).
//! - [`routes`]: KVM's GSI routing table, owned in one place: the route limit read from
//!   KVM, the legacy IOAPIC/PIC GSIs, staged changes committed with one
//!   `KVM_SET_GSI_ROUTING` per owner (the core and others with budgets), and the kernel's
//!   ordering rules (a route exists before an irqfd is attached to it; irqfds are detached
//!   before a route goes).
//! - [`path`]: the data path, per interrupt: signal the entry `i` as requester `s`
//!   (requester check, then the line's eventfd); [`faults`]: what it records.
//! - [`backing`]: the control path: entries, allocation and quotas, managed reservations,
//!   the route cache of translated targets and their lines; `backing::commit`: the
//!   transaction and its numbered commit steps; [`backing::bound`]: eventfds of sources
//!   outside the core bound to entries; `backing::snapshot`: save and restore.
//! - [`control`]: the front door. Every front end (the hypercall dispatcher, the VT-d unit,
//!   the IOAPIC's level pins, an embedder) changes the core through one object-safe trait,
//!   [`InterruptControl`], held as a [`CoreHandle`]; [`InterruptCore`] implements it over
//!   [`backing::Backing`] and owns its lock. Device models signal through the data path
//!   beside it ([`InterruptControl::path`]); owners of plain MSI routes share KVM's table
//!   through [`control::RouteControl`].
//! - [`storm`]: storm control (per-entry rate limits, coalesced deliveries);
//!   [`fdlimit`]: the descriptor limit thousands of lines need; `fake` (feature
//!   `test-utils`): a fake KVM and the core fixture every crate's tests share.
//!
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
pub mod faults;
pub mod fdlimit;
pub mod irte;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod logging;
pub mod msi;
pub mod path;
pub mod port;
pub mod remap;
pub mod routes;
pub mod storm;

pub use control::{CoreHandle, InterruptControl, InterruptCore};
#[cfg(feature = "kvm")]
pub use kvm::KvmRouting;
pub use msi::{MsiError, MsiMessage};
pub use path::MessageSink;
pub use port::{Gsi, RoutingBackend};
pub use routes::{Irqchip, RouteError, RouteTable};
