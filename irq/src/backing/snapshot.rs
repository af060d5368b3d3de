//! Snapshot and restore of the interrupt core: the remapping table, who allocated each
//! entry, the table's active size, compatibility blocking and storm control.
//!
//! A snapshot is plain data (serde), versioned by [`VERSION`]. What it does not hold is
//! rebuilt on restore: the KVM routes, eventfds and irqfds behind the live entries are
//! created again by one transaction in the new VM, so a restored core delivers exactly
//! where the old one did. [`Backing::restore`] checks everything before it changes
//! anything (version, limits, indexes in range and strictly ascending, quotas), so a
//! tampered or truncated snapshot is an error, never a panic or a half-restored core.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Backing, BackingError, Limits, Owner};
use crate::port::RoutingBackend;
use crate::routes::RouteTable;

/// The snapshot format this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest remapping table (VT-d's IRTA.S allows 2^16 entries).
pub const MAX_TABLE_SIZE: u32 = 1 << 16;

/// One allocated entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerSnapshot {
    /// The entry.
    pub index: u32,
    /// The requester that allocated it.
    pub source_id: u16,
    /// Whether its activation was guaranteed at allocation.
    pub managed: bool,
}

/// The interrupt core's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingSnapshot {
    /// [`VERSION`].
    pub version: u32,
    /// The limits the core was built with.
    pub limits: Limits,
    /// Entries in use by the front end's table.
    pub active_size: u32,
    /// Whether compatibility-format requests are blocked.
    pub block_compatibility: bool,
    /// Storm control, interrupts per second per entry (0: off).
    pub storm_rate: u32,
    /// Allocated entries, by ascending index.
    pub owners: Vec<OwnerSnapshot>,
    /// Every entry that is not all zeros, raw as the table holds it, by ascending index.
    pub entries: Vec<(u32, [u64; 2])>,
}

/// Why a snapshot cannot be restored. Nothing was changed.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// Another format version.
    #[error("snapshot version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// Limits no core can have.
    #[error("snapshot limits are invalid: {0}")]
    Limits(&'static str),
    /// An index beyond the table.
    #[error("snapshot {what} index {index} is beyond the table of {size} entries")]
    IndexOutOfRange {
        /// Which list.
        what: &'static str,
        /// The index.
        index: u32,
        /// The table size.
        size: u32,
    },
    /// Indexes not strictly ascending (a duplicate or an unsorted list).
    #[error("snapshot {what} index {index} is repeated or out of order")]
    NotAscending {
        /// Which list.
        what: &'static str,
        /// The index.
        index: u32,
    },
    /// A requester holds more entries than its quota.
    #[error("requester {source_id:#06x} holds {held} entries, over its quota of {quota}")]
    Quota {
        /// The requester.
        source_id: u16,
        /// Entries it holds in the snapshot.
        held: u32,
        /// The quota.
        quota: u32,
    },
    /// The core could not be rebuilt (routes, eventfds, live-entry quota).
    #[error("cannot rebuild the interrupt core")]
    Backing(#[from] BackingError),
}

fn ascending<'a>(
    what: &'static str,
    size: u32,
    indexes: impl Iterator<Item = &'a u32>,
) -> Result<(), RestoreError> {
    let mut previous: Option<u32> = None;
    for &index in indexes {
        if index >= size {
            return Err(RestoreError::IndexOutOfRange { what, index, size });
        }
        if previous.is_some_and(|p| p >= index) {
            return Err(RestoreError::NotAscending { what, index });
        }
        previous = Some(index);
    }
    Ok(())
}

impl BackingSnapshot {
    /// Checks everything that can be checked without building a core.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), RestoreError> {
        if self.version != VERSION {
            return Err(RestoreError::Version(self.version));
        }
        let l = &self.limits;
        if l.table_size == 0 || l.table_size > MAX_TABLE_SIZE {
            return Err(RestoreError::Limits("table size must be 1 to 65536"));
        }
        if self.active_size > l.table_size {
            return Err(RestoreError::Limits("active size beyond the table"));
        }
        ascending("owner", l.table_size, self.owners.iter().map(|o| &o.index))?;
        ascending("entry", l.table_size, self.entries.iter().map(|(i, _)| i))?;
        let mut held: std::collections::BTreeMap<u16, u32> = std::collections::BTreeMap::new();
        for o in &self.owners {
            let n = held.entry(o.source_id).or_insert(0);
            *n += 1;
            if *n > l.max_per_device {
                return Err(RestoreError::Quota {
                    source_id: o.source_id,
                    held: *n,
                    quota: l.max_per_device,
                });
            }
        }
        Ok(())
    }
}

impl<B: RoutingBackend> Backing<B> {
    /// The core's state, for a snapshot.
    #[must_use]
    pub fn snapshot(&self) -> BackingSnapshot {
        let owners = (0u32..)
            .zip(&self.entries)
            .filter_map(|(index, e)| {
                e.owner.map(|o| OwnerSnapshot {
                    index,
                    source_id: o.source_id,
                    managed: o.managed,
                })
            })
            .collect();
        let entries = (0..self.limits.table_size)
            .filter_map(|i| self.table.raw(i).filter(|r| *r != [0, 0]).map(|r| (i, r)))
            .collect();
        BackingSnapshot {
            version: VERSION,
            limits: self.limits,
            active_size: self
                .path
                .active_size
                .load(std::sync::atomic::Ordering::Relaxed),
            block_compatibility: self.path.blocks_compatibility(),
            storm_rate: self.path.storm_stats().rate,
            owners,
            entries,
        }
    }

    /// A core over `routes` in the state `snapshot` describes, with the routes and lines
    /// of its live entries committed in one transaction.
    ///
    /// # Errors
    /// [`RestoreError`]: the snapshot is invalid or the core could not be rebuilt; nothing
    /// is left behind in `routes`' VM beyond what a failed transaction leaves.
    pub fn restore(
        routes: RouteTable<B>,
        snapshot: &BackingSnapshot,
    ) -> Result<Self, RestoreError> {
        snapshot.validate()?;
        let mut backing = Self::new(routes, snapshot.limits)?;
        let managed = snapshot.owners.iter().filter(|o| o.managed).count();
        backing.reserve_managed(u32::try_from(managed).unwrap_or(u32::MAX))?;
        for o in &snapshot.owners {
            if let Some(e) = backing.entries.get_mut(o.index as usize) {
                e.owner = Some(Owner {
                    source_id: o.source_id,
                    managed: o.managed,
                });
                *backing.per_device.entry(o.source_id).or_insert(0) += 1;
                backing.allocated += 1;
            }
        }
        let mut txn = backing.transaction();
        for &(index, raw) in &snapshot.entries {
            txn.write(index, raw)?;
        }
        txn.commit()?;
        backing.set_active_size(snapshot.active_size);
        backing.set_block_compatibility(snapshot.block_compatibility);
        backing.path.set_storm_rate(snapshot.storm_rate);
        Ok(backing)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backing::AllocFlags;
    use crate::fake::FakeRouting;
    use crate::irte::{Irte, SourceValidation};
    use crate::msi::Target;

    const SID: u16 = 0x18;

    type Edit = &'static dyn Fn(&mut BackingSnapshot);

    fn core() -> (Backing<Arc<FakeRouting>>, Arc<FakeRouting>) {
        let kvm = Arc::new(FakeRouting::new());
        let backing = Backing::new(
            RouteTable::new(kvm.clone(), 256).unwrap(),
            Limits::default(),
        );
        (backing.unwrap(), kvm)
    }

    fn busy_core() -> Backing<Arc<FakeRouting>> {
        let (mut b, _) = core();
        let first = b.allocate(8, SID, AllocFlags::default()).unwrap();
        let managed = AllocFlags {
            managed: true,
            ..AllocFlags::default()
        };
        let m = b.allocate(2, 0x20, managed).unwrap();
        let mut txn = b.transaction();
        for i in 0..6 {
            let entry = Irte::new(
                Target::fixed(i % 2, 0x40 + u8::try_from(i).unwrap()),
                SourceValidation::RequesterId {
                    sid: SID,
                    qualifier: 0,
                },
            );
            txn.set(first + i, &entry).unwrap();
        }
        // A malformed entry (reserved bits) is kept as the guest wrote it.
        txn.write(first + 6, [1 | (1 << 20), 0]).unwrap();
        txn.set(
            m,
            &Irte::new(Target::fixed(1, 0x60), SourceValidation::None),
        )
        .unwrap();
        txn.commit().unwrap();
        b.set_active_size(4096);
        b.set_block_compatibility(true);
        b.path().set_storm_rate(1234);
        b
    }

    #[test]
    fn a_restored_core_is_the_same_and_delivers() {
        let old = busy_core();
        let snap = old.snapshot();
        assert_eq!(snap.owners.len(), 10);
        assert_eq!(snap.entries.len(), 8);
        let (kvm_routes, kvm) = {
            let kvm = Arc::new(FakeRouting::new());
            (RouteTable::new(kvm.clone(), 256).unwrap(), kvm)
        };
        let new = Backing::restore(kvm_routes, &snap).unwrap();
        assert_eq!(new.snapshot(), snap);
        assert_eq!(new.stats().live, old.stats().live);
        assert!(
            kvm.irqfds() > 0,
            "the live entries have lines in the new VM"
        );
        let path = new.path();
        path.signal(snap.owners[0].index, SID).unwrap();
        path.signal(snap.owners[0].index, 0x99)
            .expect_err("the SID check came along");
    }

    #[test]
    fn tampered_snapshots_are_refused_before_anything_is_built() {
        let snap = busy_core().snapshot();
        let refuse = |edit: &dyn Fn(&mut BackingSnapshot)| {
            let mut s = snap.clone();
            edit(&mut s);
            let (routes, kvm) = {
                let kvm = Arc::new(FakeRouting::new());
                (RouteTable::new(kvm.clone(), 256).unwrap(), kvm)
            };
            let Err(err) = Backing::restore(routes, &s) else {
                panic!("a tampered snapshot was restored");
            };
            (err.to_string(), kvm.set_calls())
        };
        let cases: [(Edit, &str); 7] = [
            (&|s| s.version = 2, "version 2"),
            (&|s| s.limits.table_size = 0, "table size"),
            (&|s| s.limits.table_size = 1 << 20, "table size"),
            (&|s| s.active_size = 1 << 17, "active size"),
            (&|s| s.entries.push((70_000, [1, 0])), "beyond the table"),
            (&|s| s.owners.push(s.owners[0]), "repeated or out of order"),
            (&|s| s.limits.max_per_device = 3, "over its quota"),
        ];
        for (edit, want) in cases {
            let (why, calls) = refuse(edit);
            assert!(why.contains(want), "{why} (wanted {want})");
            // The route table's own initial commit, and nothing after it.
            assert_eq!(calls, 1, "something reached KVM for: {why}");
        }
        // Too many live entries for the limits: the rebuild fails, as an error.
        let mut s = snap.clone();
        s.limits.max_live = 2;
        let kvm = Arc::new(FakeRouting::new());
        Backing::restore(RouteTable::new(kvm, 256).unwrap(), &s).unwrap_err();
    }
}
