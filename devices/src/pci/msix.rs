//! MSI-X (PCI Local Bus spec 6.8.2): a table of messages in a BAR, a pending-bit array,
//! and the capability that says where they are.
//!
//! ```text
//! capability: ID 0x11 | next | message control: 10:0 table size - 1, 14 function mask,
//!             15 enable | table offset | BIR (2:0) | PBA offset | BIR (2:0)
//! table entry (16 bytes): address low | address high | data | vector control (bit 0 mask)
//! ```
//!
//! A vector raised while it or the whole function is masked sets its pending bit; it is
//! sent when unmasked. Entries start masked.

use irq::MsiMessage;

/// The MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Message control: enable.
pub const ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors MSI-X allows.
pub const MAX_VECTORS: u16 = 2048;

/// One function's MSI-X state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msix {
    table: Vec<[u32; 4]>,
    pending: Vec<u64>,
    control: u16,
}

/// An MSI-X capability's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixSnapshot {
    /// Each entry: address low, high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// Pending bits.
    pub pending: Vec<u64>,
    /// Message control.
    pub control: u16,
}

impl Msix {
    /// The state, for a snapshot.
    #[must_use]
    pub fn snapshot(&self) -> MsixSnapshot {
        MsixSnapshot {
            table: self.table.clone(),
            pending: self.pending.clone(),
            control: self.control,
        }
    }

    /// A capability of `vectors` entries in the state `snap` describes.
    ///
    /// # Errors
    /// A table or pending array of another size.
    pub fn restore(
        snap: &MsixSnapshot,
        vectors: u16,
    ) -> Result<Self, crate::restore::RestoreError> {
        let mut m = Self::new(vectors);
        if snap.table.len() != m.table.len() || snap.pending.len() != m.pending.len() {
            return Err(crate::restore::RestoreError(
                "an MSI-X table of another size",
            ));
        }
        m.table.clone_from(&snap.table);
        m.pending.clone_from(&snap.pending);
        m.control = snap.control;
        Ok(m)
    }

    /// `vectors` entries (1 to 2048; clamped), all masked.
    #[must_use]
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Self {
            table: vec![[0, 0, 0, 1]; n],
            pending: vec![0; n.div_ceil(64)],
            control: 0,
        }
    }

    /// Number of vectors.
    #[must_use]
    pub fn vectors(&self) -> usize {
        self.table.len()
    }

    /// The capability body (after ID and next) for a table and PBA in `bar`, and which of
    /// its bytes the guest may write.
    #[must_use]
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let size = u16::try_from(self.table.len() - 1).unwrap_or(MAX_VECTORS - 1);
        let mut body = [0u8; 10];
        body[..2].copy_from_slice(&size.to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[6..].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[1] = 0xc0; // enable and function mask
        (body, writable)
    }

    /// The guest wrote message control; returns vectors now deliverable that were pending.
    pub fn set_control(&mut self, control: u16) -> Vec<u16> {
        self.control = control & (ENABLE | FUNCTION_MASK);
        self.deliverable_pending()
    }

    /// Whether MSI-X is enabled.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.control & ENABLE != 0
    }

    fn masked(&self, vector: usize) -> bool {
        self.control & FUNCTION_MASK != 0 || self.table.get(vector).is_none_or(|e| e[3] & 1 != 0)
    }

    fn deliverable_pending(&mut self) -> Vec<u16> {
        if !self.enabled() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for v in 0..self.table.len() {
            let bit = 1u64 << (v % 64);
            let pending = self.pending.get(v / 64).is_some_and(|w| w & bit != 0);
            if pending && !self.masked(v) {
                if let Some(w) = self.pending.get_mut(v / 64) {
                    *w &= !bit;
                }
                out.push(u16::try_from(v).unwrap_or(u16::MAX));
            }
        }
        out
    }

    /// The message of `vector`.
    #[must_use]
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.table.get(usize::from(vector))?;
        Some(MsiMessage {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        })
    }

    /// The device raises `vector`: its message if it may be sent now; otherwise it is
    /// latched pending (masked) or dropped (MSI-X disabled, no such vector).
    pub fn trigger(&mut self, vector: u16) -> Option<MsiMessage> {
        let v = usize::from(vector);
        if !self.enabled() || v >= self.table.len() {
            return None;
        }
        if self.masked(v) {
            if let Some(w) = self.pending.get_mut(v / 64) {
                *w |= 1 << (v % 64);
            }
            return None;
        }
        self.message(vector)
    }

    /// Reads the table at `offset`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.table_bytes(offset, data.len());
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn table_bytes(&self, offset: u64, len: usize) -> [u8; 8] {
        let mut out = [0u8; 8];
        for (i, b) in out.iter_mut().take(len.min(8)).enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                continue;
            };
            let Ok(entry) = usize::try_from(at / ENTRY_SIZE) else {
                continue;
            };
            let word = ((at % ENTRY_SIZE) / 4) as usize;
            if let Some(w) = self.table.get(entry).and_then(|e| e.get(word)) {
                *b = w.to_le_bytes().get((at % 4) as usize).copied().unwrap_or(0);
            }
        }
        out
    }

    /// Writes the table at `offset`; returns vectors now deliverable that were pending.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Vec<u16> {
        for (i, b) in data.iter().enumerate().take(8) {
            let Some(at) = offset.checked_add(i as u64) else {
                continue;
            };
            let Ok(entry) = usize::try_from(at / ENTRY_SIZE) else {
                continue;
            };
            let word = ((at % ENTRY_SIZE) / 4) as usize;
            if let Some(w) = self.table.get_mut(entry).and_then(|e| e.get_mut(word)) {
                let mut bytes = w.to_le_bytes();
                if let Some(byte) = bytes.get_mut((at % 4) as usize) {
                    *byte = *b;
                }
                *w = u32::from_le_bytes(bytes);
                if word == 3 {
                    *w &= 1; // only the mask bit exists
                }
            }
        }
        self.deliverable_pending()
    }

    /// Reads the pending-bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                continue;
            };
            let word = usize::try_from(at / 8)
                .ok()
                .and_then(|w| self.pending.get(w));
            *b = word.map_or(0, |w| {
                w.to_le_bytes().get((at % 8) as usize).copied().unwrap_or(0)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(m: &mut Msix, vector: u64, addr: u32, data: u32, masked: bool) -> Vec<u16> {
        let base = vector * ENTRY_SIZE;
        m.table_write(base, &addr.to_le_bytes());
        m.table_write(base + 4, &0u32.to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes())
    }

    #[test]
    fn masked_vectors_latch_pending_and_fire_on_unmask() {
        let mut m = Msix::new(4);
        assert_eq!(m.trigger(1), None, "disabled");
        m.set_control(ENABLE);
        program(&mut m, 1, 0xfee0_0010, 0, true);
        assert_eq!(m.trigger(1), None);
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        let fired = program(&mut m, 1, 0xfee0_0010, 0, false);
        assert_eq!(fired, vec![1]);
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert_eq!(
            m.trigger(1),
            Some(MsiMessage {
                address: 0xfee0_0010,
                data: 0
            })
        );
        // Function mask holds every vector.
        assert!(m.set_control(ENABLE | FUNCTION_MASK).is_empty());
        assert_eq!(m.trigger(1), None);
        assert_eq!(m.set_control(ENABLE), vec![1]);
    }

    #[test]
    fn the_table_reads_back_and_odd_accesses_are_harmless() {
        let mut m = Msix::new(2);
        program(&mut m, 0, 0x1234_5678, 0x9a, false);
        let mut b = [0u8; 4];
        m.table_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
        m.table_read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        m.table_write(u64::MAX - 2, &[1, 2, 3, 4]);
        m.table_write(1 << 40, &[1; 8]);
        let mut wide = [0u8; 8];
        m.table_read(1 << 40, &mut wide);
        m.pba_read(u64::MAX, &mut wide);
        assert_eq!(m.trigger(7), None);
        assert_eq!(Msix::new(0).vectors(), 1);
        assert_eq!(Msix::new(u16::MAX).vectors(), 2048);
    }

    #[test]
    fn the_capability_says_where_table_and_pba_are() {
        let m = Msix::new(16);
        let (body, writable) = m.capability(0, 0x1000, 0x2000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 15);
        assert_eq!(
            u32::from_le_bytes([body[2], body[3], body[4], body[5]]),
            0x1000
        );
        assert_eq!(
            u32::from_le_bytes([body[6], body[7], body[8], body[9]]),
            0x2000
        );
        assert_eq!(writable[1], 0xc0);
    }
}
