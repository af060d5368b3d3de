//! DMA remapping: what a device's memory accesses go through while the guest has turned
//! translation on (`GCMD.TE`).
//!
//! The unit's translation state ([`DmaUnit`]: translation on or off, the latched root
//! table) is shared by the VT-d registers, which change it, and by one [`RequesterDma`]
//! per requester ID, which a device's memory goes through. A device takes its memory as
//! a [`DmaMemory`]: a vm-memory `GuestMemory` ([`DmaView`]) over the guest's RAM that
//! translates every access by its requester, so `virtio-queue` and every other vm-memory
//! access is translated without the device knowing. What the device writes is marked in
//! the guest-physical pages' dirty bitmap, where live migration looks.
//!
//! Each requester caches what it found (the pages it translated, with their guest
//! addresses and permissions, filled page by page from the guest's tables on a miss, and
//! its context entry) and keeps it until the guest invalidates it (context-cache and
//! IOTLB invalidations, by register or queue), as the hardware's caches do: a change to a
//! present mapping takes effect for the device only after the guest invalidates it.
//! Nothing not present is cached (caching mode is clear), so a mapping the guest adds is
//! seen at once. With translation off an access costs one atomic load more than plain
//! memory; with it on, a steady-state access costs one cache lookup.
//!
//! A request the tables refuse faults: the access fails as a whole before any byte moves
//! (the device sees a memory error and handles it), and the fault is recorded in the
//! unit's fault recording registers unless the context entry's FPD says not to.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use std::collections::BTreeMap;

use vm_memory::iommu::{Error as IommuError, IovaRange};
use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, Permissions,
};

use super::descriptor::{ContextScope, IotlbScope};
use super::view::{DmaView, Pieces};
use super::walk::{self, Context, DmaFault, DmaFaultReason, Leaf};
use crate::memory::SharedRam;

/// Where a requester's DMA faults go (the unit's fault recording registers).
pub trait DmaFaultSink: Send + Sync {
    /// Records `fault`.
    fn dma_fault(&self, fault: &DmaFault);
}

/// A device's memory behind the unit: its requester's translation over guest RAM `B`.
pub type DmaMemory<B = GuestMemoryMmap> = GuestMemoryAtomic<DmaView<B>>;

/// Pages one access may span at most (an access spans a few pages; this bounds the work a
/// guest-chosen length can cause).
const MAX_FILL_PAGES: u64 = 4096;

/// What a pass-through context maps, as one page: the lower half of the address space.
const PASS_THROUGH_SIZE: u64 = 1 << 63;

/// What the unit's DMA remapping did, for statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaCounters {
    /// Pages walked in the guest's tables (cache misses filled).
    pub walks: u64,
    /// Requests refused (recorded or not).
    pub faults: u64,
    /// Context-cache invalidations carried out.
    pub context_invalidations: u64,
    /// IOTLB invalidations carried out.
    pub iotlb_invalidations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    /// Faults by reason code (index = code, 0x1-0xD).
    by_reason: [AtomicU64; 14],
    walks: AtomicU64,
    faults: AtomicU64,
    context_invalidations: AtomicU64,
    iotlb_invalidations: AtomicU64,
}

/// The unit's translation state, shared by its registers and its requesters.
pub struct DmaUnit {
    enabled: AtomicBool,
    root: AtomicU64,
    mem: SharedRam,
    sink: Mutex<Option<Arc<dyn DmaFaultSink>>>,
    requesters: Mutex<Vec<Weak<Requester>>>,
    counters: Counters,
}

impl std::fmt::Debug for DmaUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaUnit")
            .field("enabled", &self.enabled)
            .field("root", &self.root)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DmaUnit {
    /// A unit reading the guest's tables from `mem`, with translation off.
    #[must_use]
    pub fn new(mem: SharedRam) -> Arc<Self> {
        Arc::new(Self {
            enabled: AtomicBool::new(false),
            root: AtomicU64::new(0),
            mem,
            sink: Mutex::new(None),
            requesters: Mutex::new(Vec::new()),
            counters: Counters::default(),
        })
    }

    /// Where faults are recorded (the unit registers itself through `WeakVtd`).
    pub fn set_fault_sink(&self, sink: Arc<dyn DmaFaultSink>) {
        *lock(&self.sink) = Some(sink);
    }

    /// The translation of requester `sid` (bus in bits 15:8, device and function in 7:0).
    #[must_use]
    pub fn requester(self: &Arc<Self>, sid: u16) -> RequesterDma {
        let inner = Arc::new(Requester {
            sid,
            unit: self.clone(),
            cache: Mutex::new(Cache::default()),
            hot: Hot::default(),
        });
        let mut all = lock(&self.requesters);
        all.retain(|r| r.strong_count() > 0);
        all.push(Arc::downgrade(&inner));
        RequesterDma(inner)
    }

    /// Requester `sid`'s memory: guest RAM `backend` seen through the unit.
    #[must_use]
    pub fn memory<B: GuestMemoryBackend>(self: &Arc<Self>, sid: u16, backend: B) -> DmaMemory<B> {
        GuestMemoryAtomic::new(DmaView::new(backend, self.requester(sid)))
    }

    /// Whether translation is on.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The counters.
    #[must_use]
    pub fn counters(&self) -> DmaCounters {
        let c = &self.counters;
        DmaCounters {
            walks: c.walks.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            context_invalidations: c.context_invalidations.load(Ordering::Relaxed),
            iotlb_invalidations: c.iotlb_invalidations.load(Ordering::Relaxed),
        }
    }

    /// Turns translation on or off (`GCMD.TE`); every cache starts empty.
    pub(super) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
        self.each(|c| c.clear());
    }

    /// Latches the root table (`GCMD.SRTP`); every cache starts empty.
    pub(super) fn set_root(&self, rtaddr: u64) {
        self.root.store(rtaddr, Ordering::Release);
        self.each(|c| c.clear());
    }

    /// Drops the cached contexts `scope` covers (and their translations).
    pub(super) fn invalidate_context(&self, scope: ContextScope) {
        self.counters
            .context_invalidations
            .fetch_add(1, Ordering::Relaxed);
        self.each_requester(|sid, c| {
            if scope.covers(sid, c.context.map(|x| x.did())) {
                c.clear();
            }
        });
    }

    /// Drops the cached translations `scope` covers.
    pub(super) fn invalidate_iotlb(&self, scope: IotlbScope) {
        self.counters
            .iotlb_invalidations
            .fetch_add(1, Ordering::Relaxed);
        self.each(|c| {
            let did = c.context.map(|x| x.did());
            match scope {
                IotlbScope::Global => c.drop_translations(),
                IotlbScope::Domain(d) => {
                    if did.is_none_or(|x| x == d) {
                        c.drop_translations();
                    }
                }
                IotlbScope::Page {
                    did: d,
                    address,
                    am,
                    ..
                } => {
                    if did.is_none_or(|x| x == d) {
                        c.drop_range(address, am);
                    }
                }
            }
        });
    }

    fn each(&self, mut f: impl FnMut(&mut Cache)) {
        self.each_requester(|_, c| f(c));
    }

    fn each_requester(&self, mut f: impl FnMut(u16, &mut Cache)) {
        let all: Vec<Arc<Requester>> = lock(&self.requesters)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for r in all {
            let mut cache = lock(&r.cache);
            let generation = cache.generation;
            f(r.sid, &mut cache);
            if cache.generation != generation {
                r.hot.clear();
            }
        }
    }

    /// Faults so far (recorded or not), by reason code, the reasons that occurred only.
    #[must_use]
    pub fn faults_by_reason(&self) -> Vec<(u8, u64)> {
        (1u8..=0xd)
            .filter_map(|code| {
                let n = self.counters.by_reason.get(usize::from(code))?;
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((code, n))
            })
            .collect()
    }

    fn record(&self, fault: &DmaFault, recorded: bool) {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        irq::warn_limited!(
            "DMA remapping fault {:#x} ({:?}): requester {:04x}, {} at {:#x}; the access did not happen{}",
            fault.reason.code(),
            fault.reason,
            fault.source_id,
            if fault.write { "write" } else { "read" },
            fault.address,
            if recorded { "" } else { " (FPD: not recorded)" }
        );
        tracing::info!(
            target: "irvm::faults",
            kind = "dma",
            reason = %format_args!("{:#x}", fault.reason.code()),
            name = ?fault.reason,
            requester = %format_args!("{:#06x}", fault.source_id),
            address = %format_args!("{:#x}", fault.address),
            write = fault.write,
            recorded,
        );
        if let Some(n) = self
            .counters
            .by_reason
            .get(usize::from(fault.reason.code()))
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
        if !recorded {
            return;
        }
        let sink = lock(&self.sink).clone();
        if let Some(sink) = sink {
            sink.dma_fault(fault);
        }
    }
}

/// One cached page: its guest address, size and permissions.
type Page = (u64, u64, Permissions);

/// Pages in a requester's lock-free hot set.
const HOT: usize = 4;
/// A hot slot's metadata word: size (a power of two of at least 4 KiB) | valid | perm.
const HOT_VALID: u64 = 1 << 2;

fn perm_bits(p: Permissions) -> u64 {
    match p {
        Permissions::No => 0,
        Permissions::Read => 1,
        Permissions::Write => 2,
        Permissions::ReadWrite => 3,
    }
}

fn perm_of(bits: u64) -> Permissions {
    match bits & 3 {
        1 => Permissions::Read,
        2 => Permissions::Write,
        3 => Permissions::ReadWrite,
        _ => Permissions::No,
    }
}

/// The last pages a requester used, read without a lock: a sequence lock whose writers
/// hold the requester's cache mutex (and keep it a subset of the cache), so a steady
/// stream of accesses to a few pages costs a few atomic loads each.
#[derive(Debug, Default)]
struct Hot {
    seq: AtomicU64,
    /// IOVA, guest address, metadata.
    slots: [[AtomicU64; 3]; HOT],
}

impl Hot {
    fn lookup(&self, iova: u64, access: Permissions) -> Option<(u64, Page)> {
        let before = self.seq.load(Ordering::Acquire);
        if before & 1 != 0 {
            return None;
        }
        let mut found = None;
        for [first, phys, meta] in &self.slots {
            let meta = meta.load(Ordering::Relaxed);
            let first = first.load(Ordering::Relaxed);
            let size = meta & !0xfff;
            if meta & HOT_VALID != 0 && iova.wrapping_sub(first) < size {
                found = Some((first, (phys.load(Ordering::Relaxed), size, perm_of(meta))));
                break;
            }
        }
        fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != before {
            return None;
        }
        found.filter(|(_, (_, _, perm))| perm.allow(access))
    }

    /// Writers hold the cache mutex.
    fn write(&self, f: impl FnOnce(&[[AtomicU64; 3]; HOT])) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        f(&self.slots);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    fn install(&self, index: usize, first: u64, (phys, size, perm): Page) {
        self.write(|slots| {
            if let Some([f, p, m]) = slots.get(index % HOT) {
                f.store(first, Ordering::Relaxed);
                p.store(phys, Ordering::Relaxed);
                m.store(size | HOT_VALID | perm_bits(perm), Ordering::Relaxed);
            }
        });
    }

    fn clear(&self) {
        self.write(|slots| {
            for [_, _, m] in slots {
                m.store(0, Ordering::Relaxed);
            }
        });
    }
}

/// What one requester has cached.
#[derive(Debug, Default)]
struct Cache {
    /// The hot slot the next page goes to.
    hot_next: usize,
    /// Translated pages, by IOVA.
    pages: BTreeMap<u64, Page>,
    /// The context entry.
    context: Option<Context>,
    /// Bumped at every invalidation: a walk that raced one does not fill the cache.
    generation: u64,
}

impl Cache {
    fn clear(&mut self) {
        self.context = None;
        self.drop_translations();
    }

    fn drop_translations(&mut self) {
        self.pages.clear();
        self.generation += 1;
    }

    /// The cached page holding `iova`: (its IOVA, guest address, size, permissions).
    fn lookup(&self, iova: u64) -> Option<(u64, Page)> {
        let (&first, &page) = self.pages.range(..=iova).next_back()?;
        (iova - first < page.1).then_some((first, page))
    }

    /// Drops every cached page overlapping `[first, end)`, whole.
    fn remove(&mut self, first: u64, end: u64) {
        let before = self
            .pages
            .range(..first)
            .next_back()
            .filter(|(iova, (_, size, _))| iova.saturating_add(*size) > first)
            .map(|(iova, _)| *iova);
        let gone: Vec<u64> = before
            .into_iter()
            .chain(self.pages.range(first..end).map(|(iova, _)| *iova))
            .collect();
        for iova in gone {
            self.pages.remove(&iova);
        }
    }

    fn insert(&mut self, leaf: &Leaf, perm: Permissions) {
        self.remove(leaf.iova, leaf.iova.saturating_add(leaf.size));
        self.pages.insert(leaf.iova, (leaf.phys, leaf.size, perm));
    }

    /// A page-selective invalidation: every cached page overlapping the `2^am` pages at
    /// `address` is dropped whole.
    fn drop_range(&mut self, address: u64, am: u8) {
        let span = 1u64 << (12 + u32::from(am.min(51)));
        let first = address & !(span - 1);
        self.remove(first, first.saturating_add(span));
        self.generation += 1;
    }
}

#[derive(Debug)]
struct Requester {
    sid: u16,
    unit: Arc<DmaUnit>,
    cache: Mutex<Cache>,
    hot: Hot,
}

/// One requester's translation, as a [`DmaView`] uses it.
#[derive(Debug, Clone)]
pub struct RequesterDma(Arc<Requester>);

fn refused(iova: u64, length: usize, reason: &str) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange {
            base: GuestAddress(iova),
            length,
        },
        reason: reason.to_owned(),
    }
}

impl RequesterDma {
    /// The requester ID.
    #[must_use]
    pub fn source_id(&self) -> u16 {
        self.0.sid
    }

    /// Whether the unit translates (else accesses go to guest memory as they are).
    #[must_use]
    pub fn translating(&self) -> bool {
        self.0.unit.enabled()
    }

    /// The context, from the cache or the tables.
    fn context(&self, iova: u64, write: bool) -> Option<Context> {
        let r = &self.0;
        if let Some(c) = lock(&r.cache).context {
            return Some(c);
        }
        let root = r.unit.root.load(Ordering::Acquire);
        match walk::context(&*r.unit.mem, root, r.sid) {
            Ok(c) => {
                lock(&r.cache).context = Some(c);
                Some(c)
            }
            Err(f) => {
                self.fault(f.reason, iova, write, !f.fpd);
                None
            }
        }
    }

    fn fault(&self, reason: DmaFaultReason, address: u64, write: bool, recorded: bool) {
        let fault = DmaFault {
            source_id: self.0.sid,
            reason,
            address,
            write,
        };
        self.0.unit.record(&fault, recorded);
    }

    /// The cached page holding `iova` if it allows `access`, made hot.
    fn cached(&self, iova: u64, access: Permissions) -> Option<(u64, Page)> {
        let mut cache = lock(&self.0.cache);
        let hit = cache
            .lookup(iova)
            .filter(|(_, (_, _, perm))| perm.allow(access))?;
        let index = cache.hot_next;
        cache.hot_next = cache.hot_next.wrapping_add(1);
        self.0.hot.install(index, hit.0, hit.1);
        Some(hit)
    }

    /// Walks the tables for the page holding `iova` and caches it; `None` (after
    /// recording the fault) if the request is refused.
    fn fill(&self, iova: u64, access: Permissions) -> Option<(u64, Page)> {
        let r = &self.0;
        let write = access.has_write();
        let generation = lock(&r.cache).generation;
        let context = self.context(iova, write)?;
        r.unit.counters.walks.fetch_add(1, Ordering::Relaxed);
        let leaf = match context {
            // Every address as it is (beyond the guest's RAM the access fails there).
            Context::PassThrough { .. } => Leaf {
                iova: 0,
                phys: 0,
                size: PASS_THROUGH_SIZE,
                read: true,
                write: true,
            },
            Context::Translate { table, levels, .. } => {
                match walk::walk(&*r.unit.mem, table, levels, iova, write) {
                    Ok(leaf) => leaf,
                    Err(reason) => {
                        self.fault(reason, iova, write, context.records_faults());
                        return None;
                    }
                }
            }
        };
        let perm = match (leaf.read, leaf.write) {
            (true, true) => Permissions::ReadWrite,
            (true, false) => Permissions::Read,
            (false, true) => Permissions::Write,
            (false, false) => Permissions::No,
        };
        {
            let mut cache = lock(&r.cache);
            if cache.generation == generation && perm != Permissions::No {
                cache.insert(&leaf, perm);
                // The insert may have dropped pages the hot set holds.
                r.hot.clear();
            }
        }
        if !perm.allow(access) {
            let reason = if write && !leaf.write {
                DmaFaultReason::Write
            } else {
                DmaFaultReason::Read
            };
            self.fault(reason, iova, write, context.records_faults());
            return None;
        }
        Some((leaf.iova, (leaf.phys, leaf.size, perm)))
    }

    /// The guest-physical pieces `length` bytes at `iova` are, for `access`: the whole
    /// range is translated (and every page checked) before anything is accessed, so a
    /// refused request moves no byte.
    ///
    /// # Errors
    /// The range wraps, spans too many pages, or a page of it faulted (recorded).
    pub(super) fn resolve(
        &self,
        iova: u64,
        length: usize,
        access: Permissions,
    ) -> Result<Pieces, IommuError> {
        if !self.translating() {
            return Ok(Pieces::one(iova, length));
        }
        let end = iova
            .checked_add(u64::try_from(length).unwrap_or(u64::MAX))
            .ok_or_else(|| refused(iova, length, "the range wraps"))?;
        let mut pieces = Pieces::default();
        let mut at = iova;
        let mut pages = 0;
        while at < end {
            pages += 1;
            if pages > MAX_FILL_PAGES {
                return Err(refused(iova, length, "too long"));
            }
            let hit = self
                .0
                .hot
                .lookup(at, access)
                .or_else(|| self.cached(at, access));
            let (first, (phys, size, _)) = match hit {
                Some(hit) => hit,
                None => self
                    .fill(at, access)
                    .ok_or_else(|| refused(at, length, "DMA remapping fault"))?,
            };
            // A page always holds `at`; an address no page can hold (pass-through's
            // covers the lower half of the address space) is refused, not wrapped.
            let offset = at.wrapping_sub(first);
            if offset >= size {
                return Err(refused(at, length, "beyond what a page can map"));
            }
            let stop = first.saturating_add(size).min(end);
            pieces.push(phys.saturating_add(offset), stop - at);
            at = stop;
        }
        Ok(pieces)
    }
}
