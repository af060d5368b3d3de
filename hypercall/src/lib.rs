//! The guest/host ABI of this VMM, in one `no_std` crate with no dependencies.
//!
//! Both sides compile against this crate: the host (`vmm`, `devices`) when it builds the
//! machine and services exits, and every guest written in Rust (the test guest in
//! `resources/guest`) when it reads its boot information and talks to the platform. A
//! guest in another language implements the same layouts from `docs/boot-protocol.md` and
//! `docs/hypercall.md`.
//!
//! - [`platform`]: the fixed I/O ports (serial console, debug-exit, test-harness doorbell).
//! - [`cpuid`]: the hypervisor CPUID leaves that advertise this project's interface.
//! - [`boot`]: the boot-information page handed to every vCPU at entry.
//! - [`abi`]: the IRTE hypercall: call numbers, registers, status codes, the target word,
//!   the batch array, and the guest's `invoke`.
//! - [`harness`]: the mailbox through which the test guest asks the host to fire
//!   interrupts at it and reports what it counted.
//! - [`ims`]: the register and memory layouts of the two IMS devices.
//!
//! All multi-byte values are little-endian. Layouts are given as byte offsets so that
//! neither side depends on the other's struct layout rules.

#![no_std]
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

pub mod abi;
pub mod boot;
pub mod cpuid;
pub mod harness;
pub mod ims;
pub mod platform;
