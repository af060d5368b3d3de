//! MSI-X of a vfio-user device that leaves its table to the client (VFIO's MSI-X
//! interrupt index, as SPDK's and libvfio-user's devices do): the table and the message
//! control live here, and each vector gets a host interrupt **only when the remapping
//! entry its message names is present** for the device's requester.
//!
//! A vector *names* entry `i` while MSI-X is enabled, the function and the vector are
//! unmasked, and its message is remappable with handle `i` (plus the subhandle when SHV is
//! set). The core is told of every change of what the vectors name
//! ([`irq::InterruptControl::name_entries`]); it hands over an entry's eventfd when the
//! entry is named, present and verifies the requester (an `UPDATE`, a `BATCH`, a VT-d
//! invalidation, or a table write naming a present entry), and takes it back when not.
//! Here each vector follows its entry: `SET_IRQS` on the MSI-X index gives vector `v` the
//! eventfd of the entry it names. VFIO cannot take one vector's eventfd back through
//! vfio-user (a descriptor of -1 cannot be sent), so a take-back disables the index
//! (`DATA_NONE`, count 0) and gives the vectors that keep theirs their eventfds again.
//!
//! Not offered: the pending-bit array reads as zero (a masked vector has no eventfd, so
//! what the device raises meanwhile is not latched), and compatibility-format messages
//! (interrupt remapping off) get no host interrupt.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use irq::control::{HostInterrupts, HostRefusal};
use irq::msi::DecodedMsi;
use irq::{CoreHandle, MsiMessage};
use vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
use vmm_sys_util::eventfd::EventFd;

use super::Client;

/// Message control: MSI-X enable, function mask.
const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry.
const ENTRY: u64 = 16;

/// Where the device's MSI-X capability says its table and pending bits are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Offset of the capability in configuration space.
    pub cap: usize,
    /// Vectors.
    pub vectors: u16,
    /// BAR and offset of the table.
    pub table: (usize, u64),
    /// BAR and offset of the pending-bit array.
    pub pba: (usize, u64),
}

impl MsixLayout {
    /// The layout the MSI-X capability in `config` (a whole configuration space) gives,
    /// if it has one.
    #[must_use]
    pub fn find(config: &[u8]) -> Option<Self> {
        let byte = |at: usize| config.get(at).copied().unwrap_or(0);
        let dword =
            |at: usize| u32::from_le_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
        let mut at = usize::from(byte(0x34) & !3);
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            if byte(at) == devices::pci::msix::CAP_ID {
                let control = u16::from_le_bytes([byte(at + 2), byte(at + 3)]);
                let (table, pba) = (dword(at + 4), dword(at + 8));
                return Some(Self {
                    cap: at,
                    vectors: (control & 0x7ff) + 1,
                    table: ((table & 7) as usize, u64::from(table & !7)),
                    pba: ((pba & 7) as usize, u64::from(pba & !7)),
                });
            }
            at = usize::from(byte(at + 1) & !3);
        }
        None
    }

    fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// What the vectors name and what the device holds, shared by the function and the host.
#[derive(Debug)]
struct State {
    table: Vec<[u32; 4]>,
    control: u16,
    /// The entry each vector names now (as the core was told).
    names: Vec<Option<u32>>,
    /// Entries the core handed over, with their eventfds.
    held: BTreeMap<u32, EventFd>,
    /// The entry whose eventfd the device has for each vector.
    device: Vec<Option<u32>>,
}

impl State {
    /// The entry vector `v` names with the table and control as they are.
    fn naming(&self, v: usize) -> Option<u32> {
        let [lo, hi, data, ctrl] = *self.table.get(v)?;
        if self.control & ENABLE == 0 || self.control & FUNCTION_MASK != 0 || ctrl & 1 != 0 {
            return None;
        }
        let msg = MsiMessage {
            address: (u64::from(hi) << 32) | u64::from(lo),
            data,
        };
        match msg.decode() {
            Ok(DecodedMsi::Compatibility(_)) | Err(_) => None,
            Ok(decoded) => decoded.index(),
        }
    }

    /// Recomputes what every vector names; returns the changes for the core.
    fn rename(&mut self) -> Vec<(u32, bool)> {
        let mut changes = Vec::new();
        for v in 0..self.names.len() {
            let now = self.naming(v);
            if let Some(slot) = self.names.get_mut(v) {
                if *slot != now {
                    changes.extend(slot.map(|e| (e, false)));
                    changes.extend(now.map(|e| (e, true)));
                    *slot = now;
                }
            }
        }
        changes
    }

    /// Gives the device, for each vector, the eventfd of the entry it names if that entry
    /// is held, and none otherwise.
    fn sync(&mut self, client: &mut Client) -> Result<u64, super::VfioUserError> {
        let want: Vec<Option<u32>> = self
            .names
            .iter()
            .map(|n| n.filter(|e| self.held.contains_key(e)))
            .collect();
        let mut messages = 0;
        // Vectors that must lose theirs: disable the index, then every vector is to set.
        if want
            .iter()
            .zip(&self.device)
            .any(|(w, d)| w.is_none() && d.is_some())
        {
            messages += 1;
            client.clear_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, 0)?;
            self.device.iter_mut().for_each(|d| *d = None);
        }
        for (v, w) in want.iter().enumerate() {
            let Some(entry) = *w else { continue };
            if self.device.get(v).copied().flatten() == Some(entry) {
                continue;
            }
            let Some(fd) = self.held.get(&entry) else {
                continue;
            };
            messages += 1;
            let v32 = u32::try_from(v).unwrap_or(u32::MAX);
            client.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, v32, &[fd.as_raw_fd()])?;
            if let Some(d) = self.device.get_mut(v) {
                *d = Some(entry);
            }
        }
        Ok(messages)
    }
}

/// The MSI-X table of one device, on the function's side.
pub struct MsixTable {
    layout: MsixLayout,
    state: Arc<Mutex<State>>,
    client: Arc<Mutex<Client>>,
    core: Option<(CoreHandle, u16)>,
    /// Table writes whose naming the core or the device refused.
    pub(super) refused: u64,
}

impl std::fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTable")
            .field("layout", &self.layout)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

/// The host of a device's named entries: the core hands entries here.
#[derive(Debug)]
pub struct MsixHost {
    state: Arc<Mutex<State>>,
    client: Arc<Mutex<Client>>,
    messages: std::sync::atomic::AtomicU64,
}

/// Table byte `o`: (vector, word, byte).
fn locate(o: u64) -> (usize, usize, usize) {
    let at = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
    (at(o / ENTRY), at((o % ENTRY) / 4), at(o % 4))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MsixTable {
    /// The table of `layout`, with the device behind `client`; the capability's message
    /// control starts as `control`.
    #[must_use]
    pub fn new(layout: MsixLayout, control: u16, client: Arc<Mutex<Client>>) -> Self {
        let n = usize::from(layout.vectors);
        Self {
            layout,
            state: Arc::new(Mutex::new(State {
                // Vectors start masked.
                table: vec![[0, 0, 0, 1]; n],
                control: control & (ENABLE | FUNCTION_MASK),
                names: vec![None; n],
                held: BTreeMap::new(),
                device: vec![None; n],
            })),
            client,
            core: None,
            refused: 0,
        }
    }

    /// The layout.
    #[must_use]
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// The host to attach to the core for the device's requester; from now on table
    /// changes are told to `core` as `requester`'s.
    pub fn host(&mut self, core: CoreHandle, requester: u16) -> Arc<MsixHost> {
        self.core = Some((core, requester));
        Arc::new(MsixHost {
            state: self.state.clone(),
            client: self.client.clone(),
            messages: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Whether BAR `bar` at `offset` is the table's or the pending bits'.
    #[must_use]
    pub fn claims(&self, bar: usize, offset: u64) -> bool {
        let table_len = u64::from(self.layout.vectors) * ENTRY;
        let within = |(b, at): (usize, u64), len: u64| {
            b == bar && offset >= at && offset < at.saturating_add(len)
        };
        within(self.layout.table, table_len) || within(self.layout.pba, self.layout.pba_len())
    }

    /// A read of the table or the pending bits (which read as zero).
    pub fn read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (tb, at) = self.layout.table;
        if bar != tb || offset < at {
            return;
        }
        let state = lock(&self.state);
        for (k, byte) in data.iter_mut().enumerate() {
            let (v, w, b) = locate(offset - at + k as u64);
            if let Some(got) = state
                .table
                .get(v)
                .and_then(|e| e.get(w))
                .and_then(|word| word.to_le_bytes().get(b).copied())
            {
                *byte = got;
            }
        }
    }

    /// A write of the table (the pending bits are read-only).
    pub fn write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let (tb, at) = self.layout.table;
        if bar != tb || offset < at {
            return;
        }
        let changes = {
            let mut state = lock(&self.state);
            for (k, byte) in data.iter().enumerate() {
                let (v, w, b) = locate(offset - at + k as u64);
                if let Some(word) = state.table.get_mut(v).and_then(|e| e.get_mut(w)) {
                    let mut bytes = word.to_le_bytes();
                    if let Some(slot) = bytes.get_mut(b) {
                        *slot = *byte;
                    }
                    *word = u32::from_le_bytes(bytes);
                }
            }
            state.rename()
        };
        self.renamed(&changes);
    }

    /// The guest wrote message control.
    pub fn set_control(&mut self, control: u16) {
        let changes = {
            let mut state = lock(&self.state);
            state.control = control & (ENABLE | FUNCTION_MASK);
            state.rename()
        };
        self.renamed(&changes);
    }

    /// Message control as the guest reads it (table size from the layout).
    #[must_use]
    pub fn control(&self) -> u16 {
        lock(&self.state).control | (self.layout.vectors - 1)
    }

    /// Tells the core what changed, then gives the device what it now needs.
    fn renamed(&mut self, changes: &[(u32, bool)]) {
        if changes.is_empty() {
            return;
        }
        if let Some((core, requester)) = &self.core {
            if core.name_entries(*requester, changes).is_err() {
                self.refused += 1;
            }
        }
        let mut state = lock(&self.state);
        if state.sync(&mut lock(&self.client)).is_err() {
            self.refused += 1;
        }
    }
}

impl MsixHost {
    /// `SET_IRQS` messages sent for the vectors.
    #[must_use]
    pub fn messages(&self) -> u64 {
        self.messages.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gives the device what the vectors need now, counting the messages.
    fn sync(&self, state: &mut State, client: &mut Client) -> Result<(), HostRefusal> {
        let n = state
            .sync(client)
            .map_err(|e| super::entries::refusal(client, &e))?;
        self.messages
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl HostInterrupts for MsixHost {
    fn hand_over(&self, entries: &[(u32, EventFd)]) -> Result<(), HostRefusal> {
        let mut state = lock(&self.state);
        for (index, fd) in entries {
            let copy = fd
                .try_clone()
                .map_err(|e| HostRefusal::Refused(format!("duplicating an eventfd: {e}")))?;
            state.held.insert(*index, copy);
        }
        let mut client = lock(&self.client);
        let answer = self.sync(&mut state, &mut client);
        if answer.is_err() {
            for (index, _) in entries {
                state.held.remove(index);
            }
            // Back to what the device had before this call, as far as it listens.
            let _ = state.sync(&mut client);
        }
        answer
    }

    fn take_back(&self, entries: &[u32]) -> Result<(), HostRefusal> {
        let mut state = lock(&self.state);
        for index in entries {
            state.held.remove(index);
        }
        let mut client = lock(&self.client);
        self.sync(&mut state, &mut client)
    }
}
