//! The invalidation queue: descriptors read from guest memory at each `IQT` write, the
//! interrupt-entry-cache invalidations that load the guest's table into the core (each
//! entry at most once per pass), and wait descriptors.

use std::collections::BTreeMap;

use vm_memory::GuestAddress;

use super::descriptor::{Descriptor, IecScope};
use super::regs::{self, event, fsts, global};
use super::{msi, Vtd};
use crate::memory::{read_obj, write_obj};
use irq::control::{EntryWrite, Writer};
use irq::irte::Irte;

impl Vtd {
    /// Processes descriptors from IQH to IQT.
    pub(super) fn process_queue(&mut self) {
        let s = &self.state;
        if s.gsts & global::QIE == 0 || s.fsts & fsts::IQE != 0 || s.iqh == s.iqt {
            return;
        }
        if s.iqa & regs::iqa::DW != 0 {
            self.queue_error();
            return;
        }
        let base = s.iqa & regs::iqa::ADDR_MASK;
        let size = 256u64 << (s.iqa & regs::iqa::QS_MASK);
        if s.iqt / 16 >= size {
            self.queue_error();
            return;
        }
        let mut staged: BTreeMap<u32, [u64; 2]> = BTreeMap::new();
        let mut loaded = Loaded::default();
        while self.state.iqh != self.state.iqt {
            let at = base + self.state.iqh;
            let Ok(d) = read_obj::<[u64; 2]>(&*self.mem, GuestAddress(at)) else {
                self.queue_error();
                break;
            };
            if !self.descriptor(d, &mut staged, &mut loaded) {
                self.queue_error();
                break;
            }
            self.counters.descriptors += 1;
            self.state.iqh = (self.state.iqh + 16) % (size * 16);
        }
        self.apply(&mut staged);
    }

    /// Carries out one descriptor; false if it is malformed.
    fn descriptor(
        &mut self,
        d: [u64; 2],
        staged: &mut BTreeMap<u32, [u64; 2]>,
        loaded: &mut Loaded,
    ) -> bool {
        let Ok(descriptor) = Descriptor::decode(d) else {
            tracing::info!(
                target: "irvm::vtd",
                kind = "descriptor",
                raw = %format_args!("{:#018x}_{:016x}", d[1], d[0]),
                ok = false,
            );
            return false;
        };
        if !matches!(descriptor, Descriptor::InterruptEntryCache(_)) {
            tracing::info!(target: "irvm::vtd", kind = "descriptor", descriptor = ?descriptor, ok = true);
        }
        match descriptor {
            Descriptor::ContextCache(scope) => {
                self.dma.invalidate_context(scope);
                true
            }
            Descriptor::Iotlb(scope) => {
                self.dma.invalidate_iotlb(scope);
                true
            }
            Descriptor::DeviceTlb => true,
            Descriptor::InterruptEntryCache(scope) => {
                let Some((_, entries, _)) = self.state.table else {
                    return true;
                };
                let (first, mask) = match scope {
                    IecScope::Selective { index, mask } => {
                        let mask = u32::from(mask).min(Loaded::ALL);
                        (u32::from(index) & !((1u32 << mask) - 1), mask)
                    }
                    IecScope::Global => (0, Loaded::ALL),
                };
                if !loaded.block(first, mask) {
                    return true;
                }
                let end = first.saturating_add(1u32 << mask).min(entries);
                let mut count = 0u32;
                for index in first..end {
                    if loaded.entry(index) {
                        let raw = self.load_entry(index);
                        staged.insert(index, raw);
                        count += 1;
                    }
                }
                tracing::info!(
                    target: "irvm::vtd",
                    kind = "iec_invalidation",
                    scope = if matches!(scope, IecScope::Global) { "global" } else { "index" },
                    first,
                    mask,
                    loaded = count,
                );
                true
            }
            Descriptor::Wait {
                status_write,
                interrupt,
            } => {
                // A wait completes after everything before it.
                self.apply(staged);
                if let Some((address, data)) = status_write {
                    if write_obj(&*self.mem, data, GuestAddress(address)).is_err() {
                        return false;
                    }
                }
                if interrupt {
                    self.state.ics |= 1;
                    if self.state.iectl & event::IM != 0 {
                        self.state.iectl |= event::IP;
                    } else {
                        let s = &self.state;
                        let m = msi(s.ieaddr, s.ieuaddr, s.iedata);
                        self.send(m);
                    }
                }
                true
            }
        }
    }

    /// Reads entry `index` from the guest's table, in the core's (x2APIC) encoding.
    fn load_entry(&mut self, index: u32) -> [u64; 2] {
        let Some((base, _, eim)) = self.state.table else {
            return [0, 0];
        };
        self.counters.entries_loaded += 1;
        let Ok(raw) = read_obj::<[u64; 2]>(&*self.mem, GuestAddress(base + 16 * u64::from(index)))
        else {
            // Unreadable table memory: the entry faults when used (as 0x24: a hardware
            // table-access error would be 0x23, recorded when the request comes).
            return [1 | (1 << 13), 0];
        };
        if eim {
            return raw;
        }
        match Irte::decode(raw, false) {
            Ok(entry) => entry.encode(true),
            // Keep it faulting: a reserved bit stays set.
            Err(_) => [raw[0] | 1 | (1 << 13), raw[1]],
        }
    }

    fn apply(&mut self, staged: &mut BTreeMap<u32, [u64; 2]>) {
        if staged.is_empty() {
            return;
        }
        // Entries beyond the core's table (a core smaller than the unit's) are not written.
        let size = self.core_size;
        let writes: Vec<(u32, EntryWrite)> = std::mem::take(staged)
            .into_iter()
            .filter(|(index, _)| *index < size)
            .map(|(index, raw)| (index, EntryWrite::Raw(raw)))
            .collect();
        let ok = self.core.write(Writer::Platform, &writes).is_ok();
        self.counters.commits += 1;
        if !ok {
            self.counters.commit_failures += 1;
        }
    }
}

/// What one pass over the invalidation queue has loaded from the guest's table. Within a
/// pass (one `IQT` write) the table's memory is what it is: loading an entry a second
/// time would read what the first load read, so each entry is loaded at most once and a
/// block of entries invalidated again costs nothing. One pass therefore reads the table
/// at most once, whatever the guest queued (32,768 global invalidations would otherwise
/// read a 65,536-entry table 32,768 times while the vCPU waits).
#[derive(Debug, Default)]
struct Loaded {
    /// Blocks invalidated so far: (first index, log2 of the size).
    blocks: std::collections::BTreeSet<(u32, u32)>,
    /// Entries loaded so far.
    entries: std::collections::BTreeSet<u32>,
}

impl Loaded {
    /// The block size (log2) standing for the whole table.
    const ALL: u32 = 16;

    /// Notes block (`first`, `mask`); false if it, or a block containing it, was
    /// invalidated before in this pass.
    fn block(&mut self, first: u32, mask: u32) -> bool {
        let covered = (mask..=Self::ALL).any(|m| {
            let base = first & !((1u32 << m) - 1);
            self.blocks.contains(&(base, m))
        });
        !covered && self.blocks.insert((first, mask))
    }

    /// Notes entry `index`; false if it was loaded before in this pass.
    fn entry(&mut self, index: u32) -> bool {
        self.entries.insert(index)
    }
}
