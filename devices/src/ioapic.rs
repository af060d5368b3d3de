//! A userspace IOAPIC (82093AA register model, version 0x20) whose interrupts are MSI
//! writes with the IOAPIC's requester ID, so they go through interrupt remapping like any
//! device's: a redirection entry in remappable format (bit 48, Intel VT-d 5.1.5.1) names
//! an IRTE; one in compatibility format is a plain MSI (refused once remapping blocks
//! compatibility-format interrupts).
//!
//! Registers (MMIO): `IOREGSEL` at 0x00, `IOWIN` at 0x10, `EOI` at 0x40. Indirect
//! registers: 0x00 ID, 0x01 version (0x20, 24 entries), 0x02 arbitration, 0x10 + 2n and
//! 0x11 + 2n the low and high halves of redirection entry n.
//!
//! Inputs: [`IoApic::set_level`] for a level (or edge) line. An edge-triggered entry
//! sends on each rising edge; a level-triggered one sends while its line is high and
//! remote IRR is clear, sets remote IRR, and sends again after the EOI of its vector
//! ([`IoApic::eoi`], from the `EOI` register or the local APIC's EOI exit) if the line
//! is still high. A masked entry sends nothing; a level entry unmasked with its line high
//! sends then.
//!
//! Outputs: [`IoApicOutput`]. [`RemappingOutput`] sends through the interrupt core's data
//! path and hands the core each level pin's message (`Setting::LevelPin`): the core keeps
//! the split irqchip's pin route (so that KVM reports the EOIs of level-triggered pins)
//! equal to what that message translates to. The IOAPIC never touches KVM routing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use irq::backing::InterruptPath;
use irq::control::{CoreHandle, Setting};
use irq::MsiMessage;
use serde::{Deserialize, Serialize};

use crate::bus::{le_u32, put_le_u32, BusDevice};

/// Redirection entries (pins).
pub const PINS: usize = LAST_PIN as usize + 1;
/// The highest entry's index (in the version register).
const LAST_PIN: u32 = 23;
/// The MMIO window's size.
pub const SIZE: u64 = 0x1000;
/// Version register value: version 0x20, highest entry `PINS - 1`.
const VERSION: u32 = 0x20 | (LAST_PIN << 16);

const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_MODE: u64 = 0x700;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_REMAPPABLE: u64 = 1 << 48;
/// Bits the guest may not set: delivery status and remote IRR.
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;

/// Where the IOAPIC's interrupts go: an MSI write with its requester ID.
pub trait IoApicOutput: Send + Sync {
    /// Sends `msg` (whatever becomes of it, a delivery or a remapping fault, is the
    /// receiver's business).
    fn send(&self, msg: &MsiMessage);

    /// Pin `pin` delivers `msg` level-triggered, or (`None`) is edge-triggered: told when
    /// its entry is written or restored and before each level-triggered send, for
    /// whoever must know which vectors' EOIs the IOAPIC needs.
    fn level_message(&self, pin: usize, msg: Option<&MsiMessage>) {
        let _ = (pin, msg);
    }
}

/// Sends through the interrupt core with the IOAPIC's requester ID and tells the core of
/// level pins' messages, so that it keeps their pin routes (the target each message
/// translates to, when level-triggered: KVM then exits on its vector's EOI).
pub struct RemappingOutput {
    path: Arc<InterruptPath>,
    core: CoreHandle,
    source_id: u16,
    route_errors: AtomicU64,
}

impl std::fmt::Debug for RemappingOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemappingOutput")
            .field("source_id", &self.source_id)
            .field("route_errors", &self.route_errors)
            .finish_non_exhaustive()
    }
}

impl RemappingOutput {
    /// Output into `core`'s data path as requester `source_id`.
    #[must_use]
    pub fn new(core: CoreHandle, source_id: u16) -> Self {
        Self {
            path: core.path(),
            core,
            source_id,
            route_errors: AtomicU64::new(0),
        }
    }

    /// Pin route commits KVM refused (the pin kept its previous route).
    #[must_use]
    pub fn route_errors(&self) -> u64 {
        self.route_errors.load(Ordering::Relaxed)
    }
}

impl IoApicOutput for RemappingOutput {
    fn send(&self, msg: &MsiMessage) {
        // A refusal is a remapping fault, recorded by the data path for the guest to read.
        let sent = self.path.signal_msi(msg, self.source_id);
        tracing::info!(target: "irvm::ioapic", kind = "send", message = ?msg, ok = sent.is_ok());
    }

    fn level_message(&self, pin: usize, msg: Option<&MsiMessage>) {
        let Ok(pin) = u32::try_from(pin) else {
            return;
        };
        let setting = Setting::LevelPin {
            pin,
            message: msg.copied(),
            source_id: self.source_id,
        };
        let configured = self.core.configure(setting);
        tracing::info!(
            target: "irvm::ioapic",
            kind = "level_pin",
            pin,
            message = ?msg,
            ok = configured.is_ok(),
        );
        if configured.is_err() {
            self.route_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The IOAPIC's state, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoApicSnapshot {
    /// The selected indirect register.
    pub select: u32,
    /// The ID register.
    pub id: u32,
    /// The redirection entries.
    pub entries: Vec<u64>,
    /// The input lines' levels.
    pub lines: Vec<bool>,
}

/// The IOAPIC.
pub struct IoApic {
    state: IoApicSnapshot,
    output: Arc<dyn IoApicOutput>,
    sent: u64,
    /// Per pin: what to call after an end of interrupt of a level entry, the line lowered
    /// first (a source that re-asserts if it still needs service, as VFIO INTx does).
    resample: Vec<Option<Resample>>,
}

/// Called after an end of interrupt of a resampled level pin.
pub type Resample = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for IoApic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoApic")
            .field("state", &self.state)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

/// Where a redirection entry sends: its format-specific fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RteFormat {
    /// Compatibility format (bit 48 clear): an 8-bit destination (bits 63:56), physical
    /// or logical (bit 11), and a delivery mode (bits 10:8).
    Compatibility {
        /// Destination APIC ID or logical destination.
        dest: u8,
        /// Logical destination mode.
        logical: bool,
        /// Delivery mode.
        delivery_mode: u8,
    },
    /// Remappable format (bit 48 set, VT-d 5.1.5.1): the IRTE handle, index 14:0 in bits
    /// 63:49 and index bit 15 in bit 11.
    Remappable {
        /// The IRTE index.
        handle: u16,
    },
}

/// A redirection table entry, typed: decoded from and encoded to the 64-bit register pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectionEntry {
    /// Vector (bits 7:0; for a remappable entry, what the IOAPIC matches EOIs against).
    pub vector: u8,
    /// Level-triggered (bit 15).
    pub level: bool,
    /// Masked (bit 16).
    pub masked: bool,
    /// Remote IRR (bit 14, read-only to the guest).
    pub remote_irr: bool,
    /// Where it sends.
    pub format: RteFormat,
}

impl RedirectionEntry {
    /// Decodes the 64-bit entry (bits no field names are dropped).
    #[must_use]
    pub fn decode(raw: u64) -> Self {
        let field = |shift: u32, mask: u64| (raw >> shift) & mask;
        let format = if raw & RTE_REMAPPABLE != 0 {
            let handle = field(49, 0x7fff) | (field(11, 1) << 15);
            RteFormat::Remappable {
                handle: u16::try_from(handle).unwrap_or(0),
            }
        } else {
            RteFormat::Compatibility {
                dest: u8::try_from(field(56, 0xff)).unwrap_or(0),
                logical: raw & RTE_DEST_LOGICAL != 0,
                delivery_mode: u8::try_from((raw & RTE_DELIVERY_MODE) >> 8).unwrap_or(0),
            }
        };
        Self {
            vector: u8::try_from(raw & RTE_VECTOR).unwrap_or(0),
            level: raw & RTE_LEVEL != 0,
            masked: raw & RTE_MASKED != 0,
            remote_irr: raw & RTE_REMOTE_IRR != 0,
            format,
        }
    }

    /// The 64-bit entry.
    #[must_use]
    pub fn encode(&self) -> u64 {
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        let common = u64::from(self.vector)
            | flag(self.level, RTE_LEVEL)
            | flag(self.masked, RTE_MASKED)
            | flag(self.remote_irr, RTE_REMOTE_IRR);
        match self.format {
            RteFormat::Compatibility {
                dest,
                logical,
                delivery_mode,
            } => {
                common
                    | ((u64::from(delivery_mode) << 8) & RTE_DELIVERY_MODE)
                    | flag(logical, RTE_DEST_LOGICAL)
                    | (u64::from(dest) << 56)
            }
            RteFormat::Remappable { handle } => {
                let handle = u64::from(handle);
                common | RTE_REMAPPABLE | ((handle & 0x7fff) << 49) | (((handle >> 15) & 1) << 11)
            }
        }
    }

    /// The MSI the entry sends: for a remappable entry the remappable-format message of
    /// its handle (the same encoder as every device's), with the vector and trigger mode
    /// in the data; for a compatibility entry a plain MSI (edge or level, asserted).
    #[must_use]
    pub fn message(&self) -> MsiMessage {
        let vector = u32::from(self.vector);
        let level = u32::from(self.level) << 15;
        match self.format {
            RteFormat::Remappable { handle } => MsiMessage {
                data: vector | level,
                ..MsiMessage::remappable(handle, None)
            },
            RteFormat::Compatibility {
                dest,
                logical,
                delivery_mode,
            } => MsiMessage {
                address: irq::msi::MSI_ADDRESS_BASE
                    | (u64::from(dest) << 12)
                    | (u64::from(logical) << 2),
                data: vector | (u32::from(delivery_mode & 7) << 8) | level | (1 << 14),
            },
        }
    }
}

/// The MSI an entry sends ([`RedirectionEntry::message`]).
#[must_use]
pub fn message(entry: u64) -> MsiMessage {
    RedirectionEntry::decode(entry).message()
}

impl IoApic {
    /// An IOAPIC with every entry masked, sending through `output`.
    #[must_use]
    pub fn new(output: Arc<dyn IoApicOutput>) -> Self {
        Self {
            state: IoApicSnapshot {
                select: 0,
                id: 0,
                entries: vec![RTE_MASKED; PINS],
                lines: vec![false; PINS],
            },
            output,
            sent: 0,
            resample: vec![None; PINS],
        }
    }

    /// An IOAPIC sending through `output`, in `state` (from its snapshot): the constructor's
    /// arguments, then the saved state, as every layer's `restore`.
    ///
    /// # Errors
    /// A state with another number of entries or lines.
    pub fn restore(
        output: Arc<dyn IoApicOutput>,
        state: IoApicSnapshot,
    ) -> Result<Self, crate::restore::RestoreError> {
        if state.entries.len() != PINS || state.lines.len() != PINS {
            return Err(crate::restore::RestoreError(
                "an IOAPIC with another number of pins",
            ));
        }
        let io = Self {
            state,
            output,
            sent: 0,
            resample: vec![None; PINS],
        };
        for pin in 0..PINS {
            io.tell_level(pin);
        }
        Ok(io)
    }

    /// Tells the output what pin `pin` delivers while level-triggered.
    fn tell_level(&self, pin: usize) {
        let entry = self.entry(pin);
        let msg = (entry & RTE_LEVEL != 0).then(|| message(entry));
        self.output.level_message(pin, msg.as_ref());
    }

    /// Its state, for a snapshot ([`IoApic::restore`] takes it back).
    #[must_use]
    pub fn snapshot(&self) -> IoApicSnapshot {
        self.state.clone()
    }

    /// Interrupts sent so far.
    #[must_use]
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Redirection entry `pin` (0 beyond the last).
    #[must_use]
    pub fn entry(&self, pin: usize) -> u64 {
        self.state.entries.get(pin).copied().unwrap_or(0)
    }

    /// Drives input `pin` to `high` (a pin beyond the last is ignored).
    pub fn set_level(&mut self, pin: usize, high: bool) {
        let Some(line) = self.state.lines.get_mut(pin) else {
            return;
        };
        let rising = high && !*line;
        *line = high;
        let entry = self.entry(pin);
        if entry & RTE_LEVEL == 0 {
            if rising {
                self.send(pin);
            }
        } else if high {
            self.service(pin);
        }
    }

    /// Makes `pin` resampled (`Some`) or not: after an end of interrupt of its level
    /// entry the line is lowered and `hook` called, and the source asserts it again if it
    /// still needs service. Hooks are not part of a snapshot.
    pub fn set_resample(&mut self, pin: usize, hook: Option<Resample>) {
        if let Some(slot) = self.resample.get_mut(pin) {
            *slot = hook;
        }
    }

    /// A source asserts `pin`: a level entry's line goes high (until the end of
    /// interrupt, for a resampled pin); an edge entry gets a pulse. Returns whether the
    /// entry is edge-triggered (the source may assert again at once).
    pub fn assert_line(&mut self, pin: usize) -> bool {
        if self.entry(pin) & RTE_LEVEL != 0 {
            self.set_level(pin, true);
            false
        } else {
            // A line left high by a level entry before would hide the edge.
            self.set_level(pin, false);
            self.pulse(pin);
            true
        }
    }

    /// A pulse on `pin` (an edge-triggered source's interrupt).
    pub fn pulse(&mut self, pin: usize) {
        self.set_level(pin, true);
        self.set_level(pin, false);
    }

    /// The end of interrupt `vector`: clears remote IRR of the level entries with that
    /// vector and sends again for those whose line is still high.
    pub fn eoi(&mut self, vector: u8) {
        let mut resampled = Vec::new();
        for pin in 0..PINS {
            let entry = self.entry(pin);
            if entry & RTE_REMOTE_IRR != 0 && entry & RTE_VECTOR == u64::from(vector) {
                if let Some(e) = self.state.entries.get_mut(pin) {
                    *e &= !RTE_REMOTE_IRR;
                }
                if let Some(hook) = self.resample.get(pin).cloned().flatten() {
                    if let Some(line) = self.state.lines.get_mut(pin) {
                        *line = false;
                    }
                    resampled.push(hook);
                }
                self.service(pin);
            }
        }
        for hook in resampled {
            hook();
        }
    }

    /// Sends for level pin `pin` if its line is high, it is unmasked and remote IRR is
    /// clear.
    fn service(&mut self, pin: usize) {
        let entry = self.entry(pin);
        let high = self.state.lines.get(pin).copied().unwrap_or(false);
        if entry & RTE_LEVEL != 0 && high && entry & RTE_REMOTE_IRR == 0 && self.send(pin) {
            if let Some(e) = self.state.entries.get_mut(pin) {
                *e |= RTE_REMOTE_IRR;
            }
        }
    }

    /// Sends pin `pin`'s interrupt unless masked; whether it was sent.
    fn send(&mut self, pin: usize) -> bool {
        let entry = self.entry(pin);
        if entry & RTE_MASKED != 0 {
            return false;
        }
        let msg = message(entry);
        if entry & RTE_LEVEL != 0 {
            // The entry it names may have changed since the route was set.
            self.output.level_message(pin, Some(&msg));
        }
        self.output.send(&msg);
        self.sent = self.sent.saturating_add(1);
        true
    }

    fn read_indirect(&self) -> u32 {
        let select = self.state.select;
        match select {
            0x00 => self.state.id,
            0x01 => VERSION,
            0x02 => self.state.id,
            0x10..=0x3f => {
                let entry = self.entry(((select - 0x10) / 2) as usize);
                let half = if select % 2 == 0 { entry } else { entry >> 32 };
                u32::try_from(half & 0xffff_ffff).unwrap_or(0)
            }
            _ => 0,
        }
    }

    fn write_indirect(&mut self, value: u32) {
        let select = self.state.select;
        match select {
            0x00 => self.state.id = value & 0x0f00_0000,
            0x10..=0x3f => {
                let pin = ((select - 0x10) / 2) as usize;
                let Some(old) = self.state.entries.get(pin).copied() else {
                    return;
                };
                let written = if select % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let new = (written & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
                // An edge entry has no remote IRR.
                let new = if new & RTE_LEVEL == 0 {
                    new & !RTE_REMOTE_IRR
                } else {
                    new
                };
                if let Some(e) = self.state.entries.get_mut(pin) {
                    *e = new;
                }
                tracing::info!(
                    target: "irvm::ioapic",
                    kind = "rte_write",
                    pin,
                    old = %format_args!("{old:#018x}"),
                    new = %format_args!("{new:#018x}"),
                    masked = new & RTE_MASKED != 0,
                    level = new & RTE_LEVEL != 0,
                );
                // A level entry's message (or its being level) changed.
                let message_changed = (old ^ new) & !(RTE_MASKED | RTE_READ_ONLY) != 0;
                if message_changed && (old | new) & RTE_LEVEL != 0 {
                    self.tell_level(pin);
                }
                // Unmasking a level entry whose line is high sends it.
                if old & RTE_MASKED != 0 && new & RTE_MASKED == 0 {
                    self.service(pin);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for IoApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0x00 => self.state.select,
            0x10 => self.read_indirect(),
            _ => 0,
        };
        put_le_u32(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = le_u32(data);
        match offset {
            0x00 => self.state.select = value & 0xff,
            0x10 => self.write_indirect(value),
            0x40 => self.eoi(u8::try_from(value & 0xff).unwrap_or(0)),
            _ => {}
        }
    }
}

#[cfg(test)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "test values are split on purpose"
)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Sent(Mutex<Vec<MsiMessage>>);

    impl IoApicOutput for Sent {
        fn send(&self, msg: &MsiMessage) {
            self.0.lock().unwrap().push(*msg);
        }
    }

    fn rig() -> (IoApic, Arc<Sent>) {
        let sent = Arc::new(Sent::default());
        (IoApic::new(sent.clone()), sent)
    }

    fn program(io: &mut IoApic, pin: u32, entry: u64) {
        io.write(0, &(0x10 + 2 * pin + 1).to_le_bytes());
        io.write(0x10, &((entry >> 32) as u32).to_le_bytes());
        io.write(0, &(0x10 + 2 * pin).to_le_bytes());
        io.write(0x10, &(entry as u32).to_le_bytes());
    }

    /// A remappable entry for IRTE `index` with `vector`.
    fn remappable(index: u64, vector: u64, level: bool) -> u64 {
        ((index & 0x7fff) << 49)
            | (((index >> 15) & 1) << 11)
            | RTE_REMAPPABLE
            | vector
            | if level { RTE_LEVEL } else { 0 }
    }

    #[test]
    fn registers_read_back_and_entries_start_masked() {
        let (mut io, _) = rig();
        let mut v = [0u8; 4];
        io.write(0, &1u32.to_le_bytes());
        io.read(0x10, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0017_0020);
        io.write(0, &0x10u32.to_le_bytes());
        io.read(0x10, &mut v);
        assert_eq!(u32::from_le_bytes(v), 1 << 16, "masked");
        program(&mut io, 23, 0xff00_0000_0000_0031 | RTE_REMOTE_IRR);
        assert_eq!(
            io.entry(23),
            0xff00_0000_0000_0031,
            "remote IRR is read-only"
        );
        // Beyond the entries: nothing, no panic.
        io.write(0, &0xffu32.to_le_bytes());
        io.write(0x10, &1u32.to_le_bytes());
        io.read(0x10, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0);
        io.set_level(99, true);
        io.read(0x7, &mut v);
    }

    #[test]
    fn an_edge_entry_in_remappable_format_names_its_irte() {
        let (mut io, sent) = rig();
        program(&mut io, 4, remappable(0x8005, 0x24, false));
        io.pulse(4);
        io.pulse(4);
        let msgs = sent.0.lock().unwrap().clone();
        assert_eq!(msgs.len(), 2);
        let m = msgs[0];
        assert_eq!(m.address & 0xfff0_0000, 0xfee0_0000);
        assert_eq!(m.address & 0x10, 0x10, "remappable format");
        assert_eq!((m.address >> 5) & 0x7fff, 5);
        assert_eq!((m.address >> 2) & 1, 1, "index bit 15");
        let decoded = m.decode().unwrap();
        assert_eq!(decoded.index(), Some(0x8005));
        assert!(matches!(
            decoded,
            irq::msi::DecodedMsi::Remappable {
                subhandle: None,
                ..
            }
        ));
    }

    #[test]
    fn a_level_entry_waits_for_its_eoi_and_fires_again_while_high() {
        let (mut io, sent) = rig();
        program(&mut io, 9, remappable(7, 0x41, true) | RTE_MASKED);
        io.set_level(9, true);
        assert_eq!(sent.0.lock().unwrap().len(), 0, "masked");
        program(&mut io, 9, remappable(7, 0x41, true));
        assert_eq!(sent.0.lock().unwrap().len(), 1, "unmasked while high");
        assert_ne!(io.entry(9) & RTE_REMOTE_IRR, 0);
        io.set_level(9, true);
        assert_eq!(sent.0.lock().unwrap().len(), 1, "remote IRR holds it");
        io.eoi(0x40);
        assert_eq!(sent.0.lock().unwrap().len(), 1, "another vector's EOI");
        io.write(0x40, &0x41u32.to_le_bytes());
        assert_eq!(sent.0.lock().unwrap().len(), 2, "still high after the EOI");
        io.set_level(9, false);
        io.eoi(0x41);
        assert_eq!(sent.0.lock().unwrap().len(), 2);
        assert_eq!(io.entry(9) & RTE_REMOTE_IRR, 0);
    }

    /// A resampled pin (VFIO INTx): level entries keep the line high until the EOI, which
    /// lowers it and calls the hook (the source asserts again if it must); edge entries
    /// get a pulse and say the source may assert again at once.
    #[test]
    fn a_resampled_level_pin_is_lowered_at_its_eoi_and_its_source_told() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (mut io, sent) = rig();
        let told = Arc::new(AtomicUsize::new(0));
        let hook = told.clone();
        io.set_resample(
            17,
            Some(Arc::new(move || {
                hook.fetch_add(1, Ordering::SeqCst);
            })),
        );
        program(&mut io, 17, remappable(3, 0x50, true));
        assert!(!io.assert_line(17), "level");
        assert_eq!(sent.0.lock().unwrap().len(), 1);
        assert!(!io.assert_line(17));
        assert_eq!(sent.0.lock().unwrap().len(), 1, "already high");
        io.eoi(0x50);
        assert_eq!(told.load(Ordering::SeqCst), 1, "the source is told");
        assert_eq!(
            sent.0.lock().unwrap().len(),
            1,
            "the line was lowered first"
        );
        assert!(!io.assert_line(17));
        assert_eq!(sent.0.lock().unwrap().len(), 2, "asserted again");
        program(&mut io, 17, remappable(3, 0x50, false));
        assert!(io.assert_line(17), "edge: a pulse");
        assert_eq!(sent.0.lock().unwrap().len(), 3);
    }

    mod through_the_core {
        use irq::backing::Limits;
        use irq::control::{EntryWrite, InterruptControl, Writer};
        use irq::fake::FakeCore;
        use irq::irte::{Irte, SourceValidation};
        use irq::msi::Target;
        use irq::remap::FaultReason;
        use irq::routes::Irqchip;

        use super::*;

        const IOAPIC_SID: u16 = 0xff00;

        fn level(dest: u32, vector: u8) -> Target {
            Target {
                level: true,
                ..Target::fixed(dest, vector)
            }
        }

        fn set(core: &FakeCore, index: u32, target: Target, sid: u16) {
            let validation = SourceValidation::RequesterId { sid, qualifier: 0 };
            let entry = EntryWrite::Entry(Irte::new(target, validation));
            core.handle()
                .write(Writer::Platform, &[(index, entry)])
                .unwrap();
        }

        #[test]
        fn pins_send_through_their_irtes_and_level_pins_keep_routes_for_their_eois() {
            let (core, kvm) = irq::fake::core(Irqchip::Split, 4096, Limits::default());
            set(&core, 5, level(1, 0x41), IOAPIC_SID);
            set(&core, 6, Target::fixed(1, 0x42), IOAPIC_SID);
            set(&core, 7, level(1, 0x43), 0x0010);
            let out = Arc::new(RemappingOutput::new(core.handle(), IOAPIC_SID));
            let path = core.path();
            let mut io = IoApic::new(out.clone());

            // A level pin gets its translated target as its route as soon as it is written.
            program(&mut io, 9, remappable(5, 0x41, true));
            assert_eq!(kvm.route(9), Some(level(1, 0x41).to_msi()));
            io.set_level(9, true);
            assert_eq!(path.delivered(5), 1);
            let line = path.line_fd(5).unwrap();
            assert_eq!(kvm.fire(line), Some(level(1, 0x41)));

            // An edge pin has no route of its own.
            program(&mut io, 4, remappable(6, 0x42, false));
            assert_eq!(kvm.route(4), None);
            io.pulse(4);
            assert_eq!(path.delivered(6), 1);

            // An entry that does not verify the IOAPIC: no route, and its send faults.
            program(&mut io, 10, remappable(7, 0x43, true));
            assert_eq!(kvm.route(10), None);
            io.set_level(10, true);
            assert_eq!(path.delivered(7), 0);
            let log = path.fault_log();
            assert_eq!(log.count(FaultReason::SourceIdMismatch), 1);

            // The IRTE moves; the next send (after the EOI, line still high) moves the route.
            set(&core, 5, level(2, 0x41), IOAPIC_SID);
            io.eoi(0x41);
            assert_eq!(path.delivered(5), 2);
            assert_eq!(kvm.route(9), Some(level(2, 0x41).to_msi()));

            // Edge-triggered again: the route goes.
            program(&mut io, 9, remappable(5, 0x41, false));
            assert_eq!(kvm.route(9), None);
            assert_eq!(out.route_errors(), 0);

            // A restored IOAPIC sets its level pins' routes again.
            program(&mut io, 11, remappable(5, 0x41, true));
            let forget = Setting::LevelPin {
                pin: 11,
                message: None,
                source_id: IOAPIC_SID,
            };
            core.handle().configure(forget).unwrap();
            let state = io.snapshot();
            let _restored = IoApic::restore(out.clone(), state).unwrap();
            assert_eq!(kvm.route(11), Some(level(2, 0x41).to_msi()));
        }
    }

    /// The entry's fields at their bits, and the messages they send, pinned.
    #[test]
    fn redirection_entries_decode_encode_and_send_as_the_spec_says() {
        let table: [(u64, RedirectionEntry, u64, u32); 4] = [
            (
                0x0300_0000_0000_0830,
                RedirectionEntry {
                    vector: 0x30,
                    level: false,
                    masked: false,
                    remote_irr: false,
                    format: RteFormat::Compatibility {
                        dest: 3,
                        logical: true,
                        delivery_mode: 0,
                    },
                },
                0xfee0_3004,
                0x4030,
            ),
            (
                0xff00_0000_0001_c141,
                RedirectionEntry {
                    vector: 0x41,
                    level: true,
                    masked: true,
                    remote_irr: true,
                    format: RteFormat::Compatibility {
                        dest: 0xff,
                        logical: false,
                        delivery_mode: 1,
                    },
                },
                0xfeef_f000,
                0xc141,
            ),
            (
                (5u64 << 49) | (1 << 48) | (1 << 15) | 0x41,
                RedirectionEntry {
                    vector: 0x41,
                    level: true,
                    masked: false,
                    remote_irr: false,
                    format: RteFormat::Remappable { handle: 5 },
                },
                0xfee0_0010 | (5 << 5),
                0x8041,
            ),
            (
                (0x7fffu64 << 49) | (1 << 48) | (1 << 11) | 0x22,
                RedirectionEntry {
                    vector: 0x22,
                    level: false,
                    masked: false,
                    remote_irr: false,
                    format: RteFormat::Remappable { handle: 0xffff },
                },
                0xfee0_0010 | (0x7fff << 5) | (1 << 2),
                0x22,
            ),
        ];
        for (raw, typed, address, data) in table {
            assert_eq!(RedirectionEntry::decode(raw), typed, "{raw:#x}");
            assert_eq!(typed.encode(), raw, "{typed:?}");
            let m = typed.message();
            assert_eq!((m.address, m.data), (address, data), "{typed:?}");
        }
    }

    #[test]
    fn a_compatibility_entry_is_a_plain_msi() {
        let m = message((3u64 << 56) | 0x30 | RTE_DEST_LOGICAL);
        assert_eq!(m.address, 0xfee0_3004);
        assert_eq!(m.data & 0xff, 0x30);
        let snap = IoApic::new(Arc::new(Sent::default())).snapshot();
        IoApic::restore(Arc::new(Sent::default()), snap.clone()).unwrap();
        let short = IoApicSnapshot {
            entries: vec![0; 3],
            ..snap
        };
        IoApic::restore(Arc::new(Sent::default()), short).unwrap_err();
    }
}
