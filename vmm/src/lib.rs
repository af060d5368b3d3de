//! The VMM: one KVM VM with a split irqchip (KVM's local APICs, our IOAPIC), guest RAM,
//! vCPU threads, port and MMIO buses with the platform devices, and the `vmm` command line.
//!
//! A run goes: [`config`] resolves defaults, a TOML file and flags into a [`VmConfig`];
//! [`vm::run`] opens KVM, creates the VM and its irqchip, maps RAM ([`memory`]), loads the
//! ELF image ([`loader`]), writes the boot state every vCPU starts in ([`x86`], at the
//! addresses of [`layout`]), takes ownership of the GSI routing table (`irq`), puts the
//! devices on the buses ([`bus`]), creates the vCPUs with their CPUID ([`cpuid`]) and
//! starts one thread per vCPU ([`vcpu`]), whose exits [`exit::handle_exit`] dispatches.
//! The test harness thread ([`harness`]) fires interrupts a test guest asks for. The
//! controller then waits for the guest's verdict, for every vCPU to stop, or for the
//! watchdog, stops the vCPUs and returns a [`RunReport`].

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

pub mod acpi;
pub mod api;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod exit;
pub mod harness;
pub mod layout;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod pci;
pub mod refused;
pub mod report;
pub mod routing;
pub mod seccomp;
pub mod snapshot;
pub mod threads;
pub mod trace;
pub mod vcpu;
pub mod vfio_user;
pub mod vm;
pub mod x86;

pub use config::{Console, Kernel, MachineConfig, RunConfig, Settings, VmConfig};
pub use report::{Outcome, RunReport};
pub use vm::{
    restore, restore_with_console, run, run_with_console, CapturedConsole, VmError, TEST_GUEST_ELF,
};
