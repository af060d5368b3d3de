//! Restoring the interrupt core from a snapshot someone may have tampered with: any
//! version, limits, owners and raw entries. A restore either fails with an error or yields
//! a core whose own snapshot restores to the same core again.

#![no_main]

use std::sync::Arc;

use irq::backing::snapshot::{BackingSnapshot, OwnerSnapshot};
use irq::backing::{Backing, Limits};
use irq::fake::FakeRouting;
use irq::RouteTable;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::MAX_OPS;

#[derive(Arbitrary, Debug)]
struct Input {
    version: u8,
    table_size: u32,
    wide: bool,
    eim: bool,
    max_live: u32,
    max_per_device: u32,
    active_size: u32,
    block_compatibility: bool,
    storm_rate: u32,
    owners: Vec<(u32, u16, bool)>,
    entries: Vec<(u32, u64, u64)>,
}

fn restore(snap: &BackingSnapshot) -> Option<Backing<Arc<FakeRouting>>> {
    let routes = RouteTable::new(Arc::new(FakeRouting::new()), 256).ok()?;
    Backing::restore(routes, snap).ok()
}

fuzz_target!(|input: Input| {
    // Mostly small tables, so that indexes hit and each run stays quick.
    let wide = input.wide;
    let size = if wide {
        input.table_size
    } else {
        1 + input.table_size % 512
    };
    let index = |i: u32| if wide { i } else { i % 600 };
    let snap = BackingSnapshot {
        version: u32::from(input.version % 3),
        limits: Limits {
            table_size: size,
            eim: input.eim,
            max_live: input.max_live,
            max_per_device: input.max_per_device,
        },
        active_size: input.active_size,
        block_compatibility: input.block_compatibility,
        storm_rate: input.storm_rate,
        owners: input
            .owners
            .iter()
            .take(MAX_OPS)
            .map(|&(i, source_id, managed)| OwnerSnapshot {
                index: index(i),
                source_id,
                managed,
            })
            .collect(),
        entries: input
            .entries
            .iter()
            .take(MAX_OPS)
            .map(|&(i, lo, hi)| (index(i), [lo, hi]))
            .collect(),
    };
    if let Some(core) = restore(&snap) {
        let again = core.snapshot();
        let twice = restore(&again).expect("a core's own snapshot restores");
        assert_eq!(twice.snapshot(), again, "restore is not idempotent");
    }
});
