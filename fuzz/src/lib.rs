//! What the fuzz targets share: an interrupt core over a fake KVM (every routing call
//! succeeds unless told otherwise, eventfds are real), guest memory filled from the input,
//! and a few live entries to aim at. Each target feeds one guest-facing parser with what a
//! hostile guest could write and checks that it answers without panicking, and where
//! cheap, that what it answers is one of the documented outcomes.

use std::sync::Arc;

use irq::backing::{Backing, Limits};
use irq::control::{EntryWrite, InterruptControl, Writer};
use irq::fake::FakeRouting;
use irq::irte::{Irte, SourceValidation};
use irq::msi::Target;
use irq::port::MsiInjector;
use irq::{Irqchip, MsiMessage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of every target.
pub const MEM_SIZE: usize = 256 << 10;
/// Remapping-table entries of every target (small, so that indexes often hit).
pub const TABLE_SIZE: u32 = 1024;
/// The requester IDs of the devices the targets model.
pub const DEVICE_A: u16 = 0x0018;
/// Another device.
pub const DEVICE_B: u16 = 0x0020;
/// The most operations one input runs (longer inputs are cut, so each run stays fast).
pub const MAX_OPS: usize = 128;

/// The interrupt core of a target.
pub type Core = irq::fake::FakeCore;

/// Guest RAM with `fill` at address 0 (cut at [`MEM_SIZE`]).
///
/// # Panics
/// If the host cannot map 256 KiB (not an input's doing).
#[must_use]
pub fn memory(fill: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("256 KiB of anonymous memory");
    let n = fill.len().min(MEM_SIZE);
    mem.write_slice(&fill[..n], GuestAddress(0))
        .expect("the fill fits");
    mem
}

/// An interrupt core whose entries `0..live` are present for [`DEVICE_A`], spread over
/// two CPUs and four vectors.
///
/// # Panics
/// If the fake refuses a set-up that it always accepts.
#[must_use]
pub fn core(live: u32) -> Core {
    core_for(live, Irqchip::InKernel)
}

/// As [`core`], for a VM with `irqchip`.
///
/// # Panics
/// If the fake refuses a set-up that it always accepts.
#[must_use]
pub fn core_for(live: u32, irqchip: Irqchip) -> Core {
    let limits = Limits {
        table_size: TABLE_SIZE,
        ..Limits::default()
    };
    let (core, _) = irq::fake::core(irqchip, 256, limits);
    let writes: Vec<(u32, EntryWrite)> = (0..live.min(TABLE_SIZE))
        .map(|i| {
            let target = Target::fixed(i % 2, 0x30 + u8::try_from(i % 4).unwrap_or(0));
            let validation = SourceValidation::RequesterId {
                sid: DEVICE_A,
                qualifier: 0,
            };
            (i, EntryWrite::Entry(Irte::new(target, validation)))
        })
        .collect();
    core.write(Writer::Platform, &writes).expect("entries");
    core
}

/// Locks a core's backing (for what front ends do not see: snapshots, raw transactions).
pub fn lock(core: &Core) -> std::sync::MutexGuard<'_, Backing<Arc<FakeRouting>>> {
    core.lock()
}

/// An injector for compatibility-format messages and event interrupts that accepts all.
#[derive(Debug, Default)]
pub struct Sink;

impl MsiInjector for Sink {
    fn inject(&self, _msg: &MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

/// The most items one queue of an IMS device has taken and not completed, from its
/// snapshot's deferred work (queue, head, time left).
#[must_use]
pub fn most_in_flight(deferred: &[(u32, u16, u64)]) -> usize {
    let mut per_queue = std::collections::BTreeMap::new();
    for (queue, ..) in deferred {
        *per_queue.entry(*queue).or_insert(0usize) += 1;
    }
    per_queue.into_values().max().unwrap_or(0)
}
