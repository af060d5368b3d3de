//! A VT-d remapping unit that offers interrupt remapping only: the register front end to
//! the interrupt core's remapping table, through the core's front door
//! (`irq::control::CoreHandle`; the unit never sees KVM or the route table). What a stock Linux VT-d driver
//! programs for interrupt remapping works as on hardware; `docs/viommu.md` lists the
//! subset.
//!
//! - The remapping table lives in guest memory at IRTA. It is latched by `GCMD.SIRTP` and
//!   its entries are read when the guest invalidates them through the invalidation queue
//!   (interrupt-entry-cache descriptors, global or index-selective with a mask), not on
//!   every interrupt. The entries of one batch of descriptors are applied to the core in
//!   one transaction (one KVM route commit at most) before the next wait descriptor
//!   completes.
//! - Interrupts go through the core's data path: a device's remappable message is checked
//!   against the entry and its requester; a fault (reasons 0x20-0x26) is recorded in the
//!   fault recording registers and raises the fault event interrupt, and the interrupt is
//!   not delivered. Compatibility-format interrupts are blocked while IR is on and CFI is
//!   clear.
//! - Malformed register writes are ignored and counted; malformed descriptors stop the
//!   queue with `FSTS.IQE`, as the spec says. Nothing a guest writes panics the VMM.
//!
//! Files: the registers and the unit here, `regs` (offsets and bits), `descriptor` (the
//! typed invalidation descriptors), `queue` (the invalidation queue and the loading of
//! the guest's table), `testing` (a fake guest driver, feature `test-utils`).
//!
//! The IRTE hypercall writes the same core table. The rule: the last writer of an entry
//! wins, and both front ends see the same state. A hypercall update changes the core at
//! once and is written through to the guest's table at IRTA ([`Vtd::mirror_entry`], which
//! the core calls through the [`WeakVtd`] registered as its mirror); a guest's write to its
//! table takes effect when it invalidates the entry.

pub mod descriptor;
pub mod dma;
pub mod dmar;
mod queue;
pub mod regs;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod view;
pub mod walk;

use std::sync::{Arc, Mutex, PoisonError};

use irq::backing::FaultSink;
use irq::control::{CoreHandle, EntryMirror, Setting};
use irq::irte::Irte;
use irq::port::MsiInjector;
use irq::remap::Fault;
use irq::MsiMessage;
use vm_memory::GuestAddress;

use crate::memory::{write_obj, SharedRam};

use crate::bus::BusDevice;
use descriptor::{ContextScope, IotlbScope};
use dma::{DmaFaultSink, DmaUnit};
use regs::{event, fsts, global};
use walk::DmaFault;

/// Where the unit's registers are (QEMU's intel-iommu uses the same base).
pub const DEFAULT_BASE: u64 = 0xfed9_0000;

/// The guest-visible register state (what a snapshot holds).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VtdSnapshot {
    /// Global status.
    pub gsts: u32,
    /// Root table address as last written.
    pub rtaddr: u64,
    /// The root table address latched by `GCMD.SRTP` (translation uses it while
    /// `GSTS.TES` is set).
    #[serde(default)]
    pub root: u64,
    /// The context command register (CAIG of the last invalidation).
    #[serde(default)]
    pub ccmd: u64,
    /// The invalidate address register (IVA).
    #[serde(default)]
    pub iva: u64,
    /// The IOTLB invalidate register (IAIG of the last invalidation).
    #[serde(default)]
    pub iotlb: u64,
    /// IRTA as last written.
    pub irta: u64,
    /// The latched table: base, entries, EIM.
    pub table: Option<(u64, u32, bool)>,
    /// Invalidation queue address, head and tail.
    pub iqa: u64,
    /// Head (byte offset).
    pub iqh: u64,
    /// Tail (byte offset).
    pub iqt: u64,
    /// Sticky fault status bits (PFO, IQE, ICE, ITE) and FRI.
    pub fsts: u32,
    /// Fault event control, data, address, upper address.
    pub fectl: u32,
    /// Fault event data.
    pub fedata: u32,
    /// Fault event address.
    pub feaddr: u32,
    /// Fault event upper address.
    pub feuaddr: u32,
    /// Invalidation completion status.
    pub ics: u32,
    /// Invalidation event control.
    pub iectl: u32,
    /// Invalidation event data.
    pub iedata: u32,
    /// Invalidation event address.
    pub ieaddr: u32,
    /// Invalidation event upper address.
    pub ieuaddr: u32,
    /// Fault recording registers (low, high quadwords).
    pub frcd: [[u64; 2]; regs::NFR],
    /// Where the next fault is recorded.
    pub next_frcd: usize,
}

/// Why a unit's state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VtdRestoreError {
    /// A field out of range.
    #[error("VT-d state: {0}")]
    Invalid(&'static str),
}

impl VtdSnapshot {
    /// Checks what the unit relies on: the latched table's size, the queue pointers, the
    /// next fault record.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), VtdRestoreError> {
        let bad = |why| Err(VtdRestoreError::Invalid(why));
        if let Some((_, entries, _)) = self.table {
            if !(2..=1 << 16).contains(&entries) || !entries.is_power_of_two() {
                return bad("the table size is not a power of two from 2 to 65536");
            }
        }
        let bytes = 16 * (256u64 << (self.iqa & regs::iqa::QS_MASK));
        if self.iqh % 16 != 0 || self.iqh >= bytes || self.iqt % 16 != 0 || self.iqt >= bytes {
            return bad("a queue pointer is unaligned or beyond the queue");
        }
        if self.next_frcd >= regs::NFR {
            return bad("the next fault record is beyond the registers");
        }
        if self.rtaddr & 0x3ff != 0 || self.root & 0x3ff != 0 {
            return bad("a root table address has bits 9:0 set");
        }
        if self.iva & (0x3f << 6) != 0 {
            return bad("IVA has bits 11:6 set");
        }
        if (self.ccmd >> 63) | (self.iotlb >> 63) != 0 {
            return bad("an invalidation is still in progress (ICC or IVT set)");
        }
        Ok(())
    }
}

/// What the unit did, for statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VtdCounters {
    /// Descriptors processed.
    pub descriptors: u64,
    /// Entries read from the guest's table on invalidation.
    pub entries_loaded: u64,
    /// Transactions the entries were applied in.
    pub commits: u64,
    /// Transactions the core refused (the previous entries stay in force).
    pub commit_failures: u64,
    /// Queue errors (IQE).
    pub queue_errors: u64,
    /// Faults recorded in a fault recording register.
    pub faults_recorded: u64,
    /// Faults dropped because every fault recording register was full (PFO).
    pub faults_overflowed: u64,
    /// Fault and invalidation event interrupts sent.
    pub events: u64,
    /// Register accesses of a wrong size or offset, and writes to read-only fields.
    pub bad_accesses: u64,
    /// Commands this model does not offer (GCMD.SFL, GCMD.WBF).
    pub unsupported: u64,
    /// DMA faults recorded in a fault recording register (also in `faults_recorded`).
    pub dma_faults_recorded: u64,
}

/// The remapping unit.
pub struct Vtd {
    state: VtdSnapshot,
    counters: VtdCounters,
    core: CoreHandle,
    /// The core's table size (fixed when the core is made).
    core_size: u32,
    mem: SharedRam,
    events: Arc<dyn MsiInjector>,
    dma: Arc<DmaUnit>,
}

impl std::fmt::Debug for Vtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtd")
            .field("state", &self.state)
            .field("counters", &self.counters)
            .finish()
    }
}

/// Low half of a 64-bit register value.
fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// High half of a 64-bit register value.
fn hi32(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(0)
}

/// An event control register (FECTL, IECTL) is written: IM follows the write, IP is
/// read-only. Returns whether a held interrupt is now to be sent (unmasked while pending).
fn unmask(control: &mut u32, value: u32) -> bool {
    *control = (*control & event::IP) | (value & event::IM);
    if *control & (event::IM | event::IP) == event::IP {
        *control &= !event::IP;
        return true;
    }
    false
}

fn msi(addr_lo: u32, addr_hi: u32, data: u32) -> MsiMessage {
    MsiMessage {
        address: (u64::from(addr_hi) << 32) | u64::from(addr_lo),
        data,
    }
}

impl Vtd {
    /// A unit over the interrupt core `core`, reading the guest's tables from `mem` and sending its own
    /// event interrupts through `events`. Interrupt remapping starts disabled, so
    /// compatibility-format interrupts pass.
    pub fn new(core: CoreHandle, mem: SharedRam, events: Arc<dyn MsiInjector>) -> Self {
        // Setting a flag cannot fail.
        let _ = core.configure(Setting::BlockCompatibility(false));
        Self {
            state: VtdSnapshot::default(),
            counters: VtdCounters::default(),
            core_size: core.capacity(0).table_size,
            core,
            dma: DmaUnit::new(mem.clone()),
            mem,
            events,
        }
    }

    /// The unit's DMA remapping: devices' memory is made from it
    /// ([`DmaUnit::memory`]), and its faults come back through [`WeakVtd`]
    /// ([`DmaUnit::set_fault_sink`]).
    #[must_use]
    pub fn dma(&self) -> Arc<DmaUnit> {
        self.dma.clone()
    }

    /// The unit's state, for a snapshot ([`Vtd::restore`] takes it back).
    #[must_use]
    pub fn snapshot(&self) -> VtdSnapshot {
        self.state.clone()
    }

    /// A unit in `state` (from a snapshot), over an interrupt core already restored from
    /// the same snapshot (which carries the table and compatibility blocking).
    ///
    /// # Errors
    /// A state no unit could be in; nothing is built.
    pub fn restore(
        core: CoreHandle,
        mem: SharedRam,
        events: Arc<dyn MsiInjector>,
        state: VtdSnapshot,
    ) -> Result<Self, VtdRestoreError> {
        state.validate()?;
        let dma = DmaUnit::new(mem.clone());
        dma.set_root(state.root);
        dma.set_enabled(state.gsts & global::TE != 0);
        Ok(Self {
            state,
            counters: VtdCounters::default(),
            core_size: core.capacity(0).table_size,
            core,
            dma,
            mem,
            events,
        })
    }

    /// The counters.
    #[must_use]
    pub fn counters(&self) -> VtdCounters {
        self.counters
    }

    fn fsts(&self) -> u32 {
        let pending = self.state.frcd.iter().any(|r| r[1] >> 63 != 0);
        self.state.fsts | if pending { fsts::PPF } else { 0 }
    }

    fn reg32(&self, offset: u64) -> Option<u32> {
        let s = &self.state;
        Some(match offset {
            regs::VER => regs::VER_VALUE,
            regs::GCMD => 0,
            regs::GSTS => s.gsts,
            regs::FSTS => self.fsts(),
            regs::FECTL => s.fectl,
            regs::FEDATA => s.fedata,
            regs::FEADDR => s.feaddr,
            regs::FEUADDR => s.feuaddr,
            regs::ICS => s.ics,
            regs::IECTL => s.iectl,
            regs::IEDATA => s.iedata,
            regs::IEADDR => s.ieaddr,
            regs::IEUADDR => s.ieuaddr,
            _ => return None,
        })
    }

    fn reg64(&self, offset: u64) -> Option<u64> {
        let s = &self.state;
        Some(match offset {
            regs::CAP => regs::CAP_VALUE,
            regs::ECAP => regs::ECAP_VALUE,
            regs::RTADDR => s.rtaddr,
            regs::CCMD => s.ccmd,
            regs::IQH => s.iqh,
            regs::IQT => s.iqt,
            regs::IQA => s.iqa,
            regs::IRTA => s.irta,
            regs::IOTLB => s.iva,
            regs::IOTLB_REG => s.iotlb,
            o if (regs::FRCD..regs::FRCD + 16 * regs::NFR as u64).contains(&o) => {
                let record = ((o - regs::FRCD) / 16) as usize;
                let half = ((o - regs::FRCD) % 16 / 8) as usize;
                s.frcd
                    .get(record)
                    .and_then(|r| r.get(half))
                    .copied()
                    .unwrap_or(0)
            }
            _ => return None,
        })
    }

    /// Reads `len` (4 or 8) bytes at `offset`.
    fn read(&mut self, offset: u64, len: usize) -> Option<u64> {
        match len {
            8 if offset % 8 == 0 => self.reg64(offset).or_else(|| {
                Some(u64::from(self.reg32(offset)?) | (u64::from(self.reg32(offset + 4)?) << 32))
            }),
            4 if offset % 4 == 0 => self.reg32(offset).map(u64::from).or_else(|| {
                let whole = self.reg64(offset & !7)?;
                Some(if offset % 8 == 0 {
                    whole & 0xffff_ffff
                } else {
                    whole >> 32
                })
            }),
            _ => None,
        }
    }

    /// Writes `len` (4 or 8) bytes at `offset`; returns false for a bad access.
    fn write(&mut self, offset: u64, len: usize, value: u64) -> bool {
        match len {
            8 if offset % 8 == 0 => {
                if self.reg64(offset).is_some() {
                    self.write64(offset, value)
                } else {
                    self.write32(offset, lo32(value)) & self.write32(offset + 4, hi32(value))
                }
            }
            4 if offset % 4 == 0 => {
                if self.reg32(offset).is_some() {
                    self.write32(offset, lo32(value))
                } else if let Some(whole) = self.reg64(offset & !7) {
                    let merged = if offset % 8 == 0 {
                        (whole & !0xffff_ffff) | (value & 0xffff_ffff)
                    } else {
                        (whole & 0xffff_ffff) | (value << 32)
                    };
                    self.write64(offset & !7, merged)
                } else {
                    false
                }
            }
            _ => false,
        }
    }

    fn write32(&mut self, offset: u64, value: u32) -> bool {
        match offset {
            regs::GCMD => self.command(value),
            regs::FSTS => {
                let clear = value & (fsts::PFO | fsts::IQE | fsts::ICE | fsts::ITE);
                self.state.fsts &= !clear;
                if clear & fsts::IQE != 0 {
                    // The queue resumes from the descriptor that stopped it.
                    self.process_queue();
                }
            }
            regs::FECTL => {
                if unmask(&mut self.state.fectl, value) {
                    let s = &self.state;
                    let m = msi(s.feaddr, s.feuaddr, s.fedata);
                    self.send(m);
                }
            }
            regs::FEDATA => self.state.fedata = value,
            regs::FEADDR => self.state.feaddr = value & !3,
            regs::FEUADDR => self.state.feuaddr = value,
            regs::ICS => self.state.ics &= !(value & 1),
            regs::IECTL => {
                if unmask(&mut self.state.iectl, value) {
                    let s = &self.state;
                    let m = msi(s.ieaddr, s.ieuaddr, s.iedata);
                    self.send(m);
                }
            }
            regs::IEDATA => self.state.iedata = value,
            regs::IEADDR => self.state.ieaddr = value & !3,
            regs::IEUADDR => self.state.ieuaddr = value,
            _ => return false,
        }
        true
    }

    fn write64(&mut self, offset: u64, value: u64) -> bool {
        let s = &mut self.state;
        match offset {
            regs::RTADDR => s.rtaddr = value & !0x3ff,
            regs::CCMD => self.context_command(value),
            regs::IOTLB => s.iva = value & !(0x3f << 6),
            regs::IOTLB_REG => self.iotlb_command(value),
            regs::IQT => {
                s.iqt = value & 0x7_fff0;
                self.process_queue();
            }
            regs::IQA => {
                if s.gsts & global::QIE != 0 {
                    return false;
                }
                s.iqa = value & iqa_mask();
            }
            regs::IRTA => {
                if value & regs::irta::RESERVED != 0 {
                    return false;
                }
                s.irta = value;
            }
            o if (regs::FRCD..regs::FRCD + 16 * regs::NFR as u64).contains(&o) => {
                // Only F (bit 127) is writable: write 1 to clear.
                if (o - regs::FRCD) % 16 == 8 && value >> 63 != 0 {
                    let record = ((o - regs::FRCD) / 16) as usize;
                    if let Some(r) = s.frcd.get_mut(record) {
                        r[1] &= !(1 << 63);
                    }
                }
            }
            _ => return false,
        }
        true
    }

    /// GCMD: one command at a time, the other bits restating the current state.
    fn command(&mut self, value: u32) {
        let s = &mut self.state;
        if value & (global::SFL | global::WBF) != 0 {
            self.counters.unsupported += 1;
        }
        if value & global::SRTP != 0 {
            s.root = s.rtaddr;
            s.gsts |= global::SRTP;
            self.dma.set_root(s.root);
        }
        let te = value & global::TE != 0;
        if te != (s.gsts & global::TE != 0) {
            s.gsts ^= global::TE;
            self.dma.set_enabled(te);
        }
        if value & global::SIRTP != 0 {
            let entries = 2u32 << (s.irta & regs::irta::S_MASK);
            let eim = s.irta & regs::irta::EIME != 0;
            s.table = Some((s.irta & regs::irta::ADDR_MASK, entries, eim));
            s.gsts |= global::SIRTP;
            // A new table: nothing of the old one is cached any more.
            self.clear_core(entries);
        }
        let s = &mut self.state;
        let qie = value & global::QIE != 0;
        if qie && s.gsts & global::QIE == 0 {
            s.iqh = 0;
            s.gsts |= global::QIE;
        } else if !qie && s.gsts & global::QIE != 0 && s.iqh == s.iqt {
            s.gsts &= !global::QIE;
        }
        let ire = value & global::IRE != 0 && s.table.is_some();
        s.gsts = (s.gsts & !global::IRE) | if ire { global::IRE } else { 0 };
        s.gsts = (s.gsts & !global::CFI) | (value & global::CFI);
        let block = ire && value & global::CFI == 0;
        // Setting a flag cannot fail.
        let _ = self.core.configure(Setting::BlockCompatibility(block));
        tracing::info!(
            target: "irvm::vtd",
            kind = "gcmd",
            value = %format_args!("{value:#010x}"),
            gsts = %format_args!("{:#010x}", s.gsts),
            table = ?s.table,
        );
    }

    /// Makes every core entry absent and limits the core to `entries` (a new table).
    fn clear_core(&mut self, entries: u32) {
        if self.core.configure(Setting::NewTable { entries }).is_err() {
            self.counters.commit_failures += 1;
        }
    }

    fn send(&mut self, msg: MsiMessage) {
        self.counters.events += 1;
        // A failed injection (no vCPU accepts it) is the guest's lookout, as on hardware.
        let _ = self.events.inject(&msg);
    }

    /// A status bit or fault record became pending: raise the fault event interrupt if
    /// nothing was pending before.
    fn fault_event(&mut self, was_pending: bool) {
        if was_pending {
            return;
        }
        if self.state.fectl & event::IM != 0 {
            self.state.fectl |= event::IP;
        } else {
            let s = &self.state;
            let m = msi(s.feaddr, s.feuaddr, s.fedata);
            self.send(m);
        }
    }

    fn anything_pending(&self) -> bool {
        self.fsts() & (fsts::PFO | fsts::PPF | fsts::IQE | fsts::ICE | fsts::ITE) != 0
    }

    fn queue_error(&mut self) {
        self.counters.queue_errors += 1;
        irq::warn_limited!(
            "VT-d invalidation queue error at IQH {:#x}: the queue stops until FSTS.IQE is cleared",
            self.state.iqh
        );
        tracing::info!(target: "irvm::vtd", kind = "queue_error", iqh = self.state.iqh);
        let was = self.anything_pending();
        self.state.fsts |= fsts::IQE;
        self.fault_event(was);
    }

    /// Records a fault from the data path in the next free fault recording register.
    /// Only while interrupt remapping is enabled: before that the unit remaps nothing,
    /// so faults of the core (its hypercall front end) are not the unit's to record.
    pub fn record_fault(&mut self, fault: &Fault) {
        if self.state.gsts & global::IRE == 0 {
            return;
        }
        let index = u64::from(fault.index.unwrap_or(0) & 0xffff);
        self.record(
            index << 48,
            u64::from(fault.source_id) | (u64::from(fault.reason.code()) << 32),
        );
    }

    /// Records a DMA fault: the page address, the requester, the reason and the kind of
    /// request (T: 1 for a read).
    pub fn record_dma_fault(&mut self, fault: &DmaFault) {
        let read = if fault.write { 0 } else { 1 << 62 };
        if self.record(
            fault.address & !0xfff,
            u64::from(fault.source_id) | (u64::from(fault.reason.code()) << 32) | read,
        ) {
            self.counters.dma_faults_recorded += 1;
        }
    }

    /// Records a fault (`high` without F) in the next free fault recording register;
    /// false if every one was full (PFO).
    fn record(&mut self, low: u64, high: u64) -> bool {
        tracing::info!(
            target: "irvm::vtd",
            kind = "fault_record",
            reason = %format_args!("{:#x}", (high >> 32) & 0xff),
            source_id = %format_args!("{:#06x}", high & 0xffff),
            info = %format_args!("{low:#x}"),
        );
        let was = self.anything_pending();
        let s = &mut self.state;
        let free = (0..regs::NFR)
            .map(|k| (s.next_frcd + k) % regs::NFR)
            .find(|&i| s.frcd.get(i).is_some_and(|r| r[1] >> 63 == 0));
        let recorded = match free.and_then(|i| s.frcd.get_mut(i).map(|r| (i, r))) {
            Some((i, record)) => {
                *record = [low, high | (1 << 63)];
                if !was {
                    s.fsts = (s.fsts & !(0xff << fsts::FRI_SHIFT))
                        | (u32::try_from(i).unwrap_or(0) << fsts::FRI_SHIFT);
                }
                s.next_frcd = (i + 1) % regs::NFR;
                self.counters.faults_recorded += 1;
                true
            }
            None => {
                s.fsts |= fsts::PFO;
                self.counters.faults_overflowed += 1;
                false
            }
        };
        self.fault_event(was);
        recorded
    }

    /// CCMD: with ICC set, invalidates the context cache at the requested granularity
    /// and reports it in CAIG (0 for a granularity of 0: nothing done).
    fn context_command(&mut self, value: u64) {
        use regs::ccmd;
        if value & ccmd::ICC == 0 {
            self.state.ccmd = value;
            return;
        }
        let did = u16::try_from(value & 0xffff).unwrap_or(0);
        let scope = match (value >> ccmd::CIRG_SHIFT) & 3 {
            1 => Some(ContextScope::Global),
            2 => Some(ContextScope::Domain(did)),
            3 => Some(ContextScope::Device {
                did,
                sid: u16::try_from((value >> ccmd::SID_SHIFT) & 0xffff).unwrap_or(0),
                fm: u8::try_from((value >> ccmd::FM_SHIFT) & 3).unwrap_or(0),
            }),
            _ => None,
        };
        let actual = scope.map_or(0, |s| {
            self.dma.invalidate_context(s);
            s.code()
        });
        self.state.ccmd =
            (value & !ccmd::ICC & !(3 << ccmd::CAIG_SHIFT)) | (actual << ccmd::CAIG_SHIFT);
    }

    /// The IOTLB invalidate register: with IVT set, invalidates at the requested
    /// granularity (page-selective takes IVA's address and mask) and reports it in IAIG
    /// (0: a granularity of 0 or a mask beyond MAMV, nothing done).
    fn iotlb_command(&mut self, value: u64) {
        use regs::iotlb;
        if value & iotlb::IVT == 0 {
            self.state.iotlb = value;
            return;
        }
        let did = u16::try_from((value >> iotlb::DID_SHIFT) & 0xffff).unwrap_or(0);
        let iva = self.state.iva;
        let am = iva & iotlb::AM_MASK;
        let scope = match (value >> iotlb::IIRG_SHIFT) & 3 {
            1 => Some(IotlbScope::Global),
            2 => Some(IotlbScope::Domain(did)),
            3 if am <= regs::cap::MAMV => Some(IotlbScope::Page {
                did,
                address: iva & !0xfff,
                am: u8::try_from(am).unwrap_or(0),
                hint: iva & (1 << 6) != 0,
            }),
            _ => None,
        };
        let actual = scope.map_or(0, |s| {
            self.dma.invalidate_iotlb(s);
            s.code()
        });
        self.state.iotlb =
            (value & !iotlb::IVT & !(3 << iotlb::IAIG_SHIFT)) | (actual << iotlb::IAIG_SHIFT);
    }

    /// Writes an entry the core received from another front end (the IRTE hypercall) into
    /// the guest's table too, in the table's format, so that both see the same state.
    /// `raw` is in the core's (x2APIC) encoding; entries beyond the table are not written.
    pub fn mirror_entry(&mut self, index: u32, raw: [u64; 2]) {
        let Some((base, entries, eim)) = self.state.table else {
            return;
        };
        if index >= entries {
            return;
        }
        let raw = if eim {
            raw
        } else {
            match Irte::decode(raw, true) {
                Ok(entry) if entry.target.dest <= 0xff => entry.encode(false),
                _ => raw,
            }
        };
        // The table is the guest's memory; if it is not RAM the guest sees nothing.
        let _ = write_obj(&*self.mem, raw, GuestAddress(base + 16 * u64::from(index)));
    }
}

fn iqa_mask() -> u64 {
    regs::iqa::ADDR_MASK | regs::iqa::DW | regs::iqa::QS_MASK
}

/// The unit on the MMIO bus and as the data path's fault sink.
pub struct VtdDevice(pub Arc<Mutex<Vtd>>);

impl std::fmt::Debug for VtdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VtdDevice")
    }
}

impl VtdDevice {
    fn unit(&self) -> std::sync::MutexGuard<'_, Vtd> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BusDevice for VtdDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut unit = self.unit();
        let value = unit.read(offset, data.len());
        if value.is_none() {
            unit.counters.bad_accesses += 1;
        }
        let bytes = value.unwrap_or(0).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        for (b, d) in bytes.iter_mut().zip(data) {
            *b = *d;
        }
        let mut unit = self.unit();
        if !unit.write(offset, data.len(), u64::from_le_bytes(bytes)) {
            unit.counters.bad_accesses += 1;
        }
    }
}

impl FaultSink for VtdDevice {
    fn fault(&self, fault: &Fault) {
        self.unit().record_fault(fault);
    }
}

/// The unit as the interrupt core knows it, held weakly: the data path's fault sink
/// (`InterruptPath::set_fault_sink`) and the core's entry mirror
/// (`InterruptCore::set_mirror`: what a requester writes through the hypercall is written
/// through into the guest's table, so both show one table). The unit holds the core,
/// which holds these, so a strong link would keep both alive (and their eventfds open)
/// after the VM is gone. Faults and writes after the unit is dropped go nowhere.
pub struct WeakVtd(pub std::sync::Weak<Mutex<Vtd>>);

impl std::fmt::Debug for WeakVtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakVtd")
    }
}

impl WeakVtd {
    /// The link to `unit`.
    #[must_use]
    pub fn to(unit: &Arc<Mutex<Vtd>>) -> Arc<Self> {
        Arc::new(Self(Arc::downgrade(unit)))
    }

    fn with(&self, f: impl FnOnce(&mut Vtd)) {
        if let Some(unit) = self.0.upgrade() {
            f(&mut unit.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }
}

impl FaultSink for WeakVtd {
    fn fault(&self, fault: &Fault) {
        self.with(|unit| unit.record_fault(fault));
    }
}

impl DmaFaultSink for WeakVtd {
    fn dma_fault(&self, fault: &DmaFault) {
        self.with(|unit| unit.record_dma_fault(fault));
    }
}

impl EntryMirror for WeakVtd {
    fn mirror(&self, index: u32, raw: [u64; 2]) {
        self.with(|unit| unit.mirror_entry(index, raw));
    }
}

#[cfg(test)]
mod tests;
