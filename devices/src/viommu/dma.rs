//! DMA remapping: what a device's memory accesses go through while the guest has turned
//! translation on (`GCMD.TE`).
//!
//! The unit's translation state ([`DmaUnit`]: translation on or off, the latched root
//! table) is shared by the VT-d registers, which change it, and by one [`RequesterDma`]
//! per requester ID, which a device's memory goes through. A device takes its memory as
//! a [`DmaMemory`]: vm-memory's `IommuMemory` over the guest's RAM with the requester as
//! its IOMMU, so `virtio-queue` and every other vm-memory access is translated without
//! the device knowing.
//!
//! Each requester caches what it found (vm-memory's `Iotlb`: IOVA ranges to guest
//! addresses with their permissions, filled page by page from the guest's tables on a
//! miss, plus the requester's context entry), and keeps it until the guest invalidates it
//! (context-cache and IOTLB invalidations, by register or queue), as the hardware's caches
//! do: a change to a present mapping takes effect for the device only after the guest
//! invalidates it. Nothing not present is cached (caching mode is clear), so a mapping
//! the guest adds is seen at once. Steady-state DMA costs one cache lookup per access.
//!
//! A request the tables refuse faults: the access fails (the device sees a memory error
//! and handles it), and the fault is recorded in the unit's fault recording registers
//! unless the context entry's FPD says not to.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, Iommu,
    IommuMemory, Iotlb, Permissions,
};

use super::descriptor::{ContextScope, IotlbScope};
use super::walk::{self, Context, DmaFault, DmaFaultReason, Leaf, HAW};
use crate::memory::SharedRam;

/// Where a requester's DMA faults go (the unit's fault recording registers).
pub trait DmaFaultSink: Send + Sync {
    /// Records `fault`.
    fn dma_fault(&self, fault: &DmaFault);
}

/// A device's memory behind the unit: its requester's translation over guest RAM `B`.
pub type DmaMemory<B = GuestMemoryMmap> = GuestMemoryAtomic<IommuMemory<B, RequesterDma>>;

/// Pages one access may fill from the tables at most (an access spans a few pages; this
/// bounds the work a guest-chosen length can cause).
const MAX_FILL_PAGES: u64 = 4096;

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
    identity: Arc<Iotlb>,
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
        let mut identity = Iotlb::new();
        // The whole address space, as is: what a request sees with translation off.
        let _ = identity.set_mapping(
            GuestAddress(0),
            GuestAddress(0),
            usize::try_from(u64::MAX).unwrap_or(usize::MAX),
            Permissions::ReadWrite,
        );
        Arc::new(Self {
            enabled: AtomicBool::new(false),
            root: AtomicU64::new(0),
            mem,
            identity: Arc::new(identity),
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
        });
        let mut all = lock(&self.requesters);
        all.retain(|r| r.strong_count() > 0);
        all.push(Arc::downgrade(&inner));
        RequesterDma(inner)
    }

    /// Requester `sid`'s memory: guest RAM `backend` seen through the unit.
    #[must_use]
    pub fn memory<B>(self: &Arc<Self>, sid: u16, backend: B) -> DmaMemory<B>
    where
        B: GuestMemoryBackend,
        <B::R as GuestMemoryRegion>::B: Default,
    {
        GuestMemoryAtomic::new(IommuMemory::new(
            backend,
            self.requester(sid),
            true,
            Default::default(),
        ))
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
            f(r.sid, &mut lock(&r.cache));
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

/// One cached page: where it is and what it allows.
type Page = (u64, u64, Permissions);

/// What one requester has cached.
#[derive(Debug, Default)]
struct Cache {
    /// Translations (IOVA ranges), shared with accesses in progress; replaced rather than
    /// changed while one holds it.
    iotlb: Arc<Iotlb>,
    /// The same translations as whole pages, by IOVA: (guest address, size, permissions).
    pages: std::collections::BTreeMap<u64, Page>,
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
        self.iotlb = Arc::new(Iotlb::new());
        self.pages.clear();
        self.generation += 1;
    }

    /// Changes the translations with `f`; rebuilt from the pages first if an access
    /// holds them (the pages are changed before `f` runs).
    fn with_iotlb(&mut self, f: impl FnOnce(&mut Iotlb)) {
        if let Some(tlb) = Arc::get_mut(&mut self.iotlb) {
            f(tlb);
            return;
        }
        let mut fresh = Iotlb::new();
        for (&iova, &(phys, size, perm)) in &self.pages {
            let _ = fresh.set_mapping(GuestAddress(iova), GuestAddress(phys), len(size), perm);
        }
        f(&mut fresh);
        self.iotlb = Arc::new(fresh);
    }

    /// The cached pages overlapping `[first, end)`.
    fn overlapping(&self, first: u64, end: u64) -> Vec<u64> {
        let before = self
            .pages
            .range(..first)
            .next_back()
            .filter(|(iova, (_, size, _))| iova.saturating_add(*size) > first)
            .map(|(iova, _)| *iova);
        before
            .into_iter()
            .chain(self.pages.range(first..end).map(|(iova, _)| *iova))
            .collect()
    }

    fn remove(&mut self, first: u64, end: u64) {
        for iova in self.overlapping(first, end) {
            if let Some((_, size, _)) = self.pages.remove(&iova) {
                self.with_iotlb(|t| t.invalidate_mapping(GuestAddress(iova), len(size)));
            }
        }
    }

    fn insert(&mut self, leaf: &Leaf, perm: Permissions) {
        let end = leaf.iova.saturating_add(leaf.size);
        self.remove(leaf.iova, end);
        self.pages.insert(leaf.iova, (leaf.phys, leaf.size, perm));
        self.with_iotlb(|t| {
            let _ = t.set_mapping(
                GuestAddress(leaf.iova),
                GuestAddress(leaf.phys),
                len(leaf.size),
                perm,
            );
        });
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

fn len(size: u64) -> usize {
    usize::try_from(size).unwrap_or(usize::MAX)
}

#[derive(Debug)]
struct Requester {
    sid: u16,
    unit: Arc<DmaUnit>,
    cache: Mutex<Cache>,
}

/// One requester's translation: vm-memory's `Iommu` for a [`DmaMemory`].
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

    /// The context, from the cache or the tables.
    fn context(&self, iova: u64, write: bool) -> Result<Context, ()> {
        let r = &self.0;
        if let Some(c) = lock(&r.cache).context {
            return Ok(c);
        }
        let root = r.unit.root.load(Ordering::Acquire);
        match walk::context(&*r.unit.mem, root, r.sid) {
            Ok(c) => {
                lock(&r.cache).context = Some(c);
                Ok(c)
            }
            Err(f) => {
                self.fault(f.reason, iova, write, !f.fpd);
                Err(())
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

    /// Resolves the page holding `iova` for `access` and caches it; false if refused.
    fn fill(&self, iova: u64, access: Permissions) -> Option<u64> {
        let r = &self.0;
        let write = access.has_write();
        let generation = lock(&r.cache).generation;
        let context = self.context(iova, write).ok()?;
        r.unit.counters.walks.fetch_add(1, Ordering::Relaxed);
        let leaf = match context {
            Context::PassThrough { .. } => Leaf {
                iova: 0,
                phys: 0,
                size: 1 << HAW,
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
        Some(leaf.iova + leaf.size)
    }
}

impl Iommu for RequesterDma {
    type IotlbGuard<'a> = Arc<Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Arc<Iotlb>>, IommuError> {
        let r = &self.0;
        let end = iova
            .0
            .checked_add(u64::try_from(length).unwrap_or(u64::MAX))
            .ok_or_else(|| refused(iova.0, length, "the range wraps"))?;
        if !r.unit.enabled() {
            return Iotlb::lookup(r.unit.identity.clone(), iova, length, access)
                .map_err(|_| refused(iova.0, length, "beyond the address space"));
        }
        let cached = lock(&r.cache).iotlb.clone();
        let fails = match Iotlb::lookup(cached, iova, length, access) {
            Ok(found) => return Ok(found),
            Err(fails) => fails,
        };
        let mut pages = 0;
        for range in fails.misses.iter().chain(&fails.access_fails) {
            let mut at = range.base.0;
            let stop = at
                .saturating_add(u64::try_from(range.length).unwrap_or(u64::MAX))
                .min(end);
            while at < stop {
                pages += 1;
                if pages > MAX_FILL_PAGES {
                    return Err(refused(iova.0, length, "too long"));
                }
                match self.fill(at, access) {
                    Some(next) => at = next,
                    None => return Err(refused(at, length, "DMA remapping fault")),
                }
            }
        }
        let cached = lock(&r.cache).iotlb.clone();
        Iotlb::lookup(cached, iova, length, access)
            .map_err(|_| refused(iova.0, length, "invalidated during the access"))
    }
}
