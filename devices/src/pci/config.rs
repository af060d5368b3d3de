//! A type-0 PCI configuration space: identity, command/status, BARs with the sizing
//! protocol, and a capability list.
//!
//! ```text
//! 0x00 vendor ID (2)   0x02 device ID (2)   0x04 command (2)   0x06 status (2)
//! 0x08 revision (1)    0x09 class code (3)  0x0e header type (1)
//! 0x10-0x27 BAR 0-5    0x2c subsystem vendor (2)  0x2e subsystem ID (2)
//! 0x34 capabilities pointer (1)             0x3c interrupt line (1)  0x3d pin (1)
//! ```

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list exists.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Offset of BAR 0.
pub const BAR0: usize = 0x10;
/// Size of the configuration space (the extended space reads as zero).
pub const SIZE: usize = 256;

/// A 64-bit, non-prefetchable memory BAR of `size` bytes (a power of two, at least 4 KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Which BAR (0, 2 or 4: a 64-bit BAR uses two slots).
    pub index: usize,
    /// Its size.
    pub size: u64,
}

/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;

/// What a configuration write changed that the bus must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigChange {
    /// A BAR address or memory decoding changed.
    pub bars: bool,
}

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    writable: [u8; SIZE],
    bars: Vec<Bar>,
    io_bars: Vec<Bar>,
    next_cap: usize,
    last_cap: usize,
}

impl ConfigSpace {
    /// A function with these IDs and class (class, subclass, programming interface).
    #[must_use]
    pub fn new(vendor: u16, device: u16, class: [u8; 3], revision: u8) -> Self {
        let mut c = Self {
            bytes: [0; SIZE],
            writable: [0; SIZE],
            bars: Vec::new(),
            io_bars: Vec::new(),
            next_cap: 0x40,
            last_cap: 0,
        };
        c.set16(0x00, vendor);
        c.set16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09] = class[2];
        c.bytes[0x0a] = class[1];
        c.bytes[0x0b] = class[0];
        c.set16(0x2c, vendor);
        c.set16(0x2e, device);
        // Command: memory decoding, bus mastering, INTx disable are the guest's.
        let cmd = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[0x04..0x06].copy_from_slice(&cmd.to_le_bytes());
        c.writable[0x3c] = 0xff; // interrupt line
        c
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.set_bytes(at, &v.to_le_bytes());
    }

    /// Makes the bits of `mask` at `at` writable by the guest.
    fn set_writable(&mut self, at: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(at..at + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Adds a 64-bit memory BAR (index 0 to 4, a power-of-two size of at least 16).
    pub fn add_bar(&mut self, bar: Bar) {
        let at = BAR0 + 4 * bar.index;
        self.set_bytes(at, &[0b100]); // 64-bit, memory, not prefetchable
        let mut mask = (!(bar.size.max(16) - 1)).to_le_bytes();
        mask[0] &= 0xf0;
        self.set_writable(at, &mask);
        self.bars.push(bar);
    }

    /// Adds an I/O BAR (index 0 to 5, a power-of-two size of at least 4 ports, at most
    /// 256) and makes I/O decoding the guest's to turn on.
    pub fn add_io_bar(&mut self, bar: Bar) {
        let at = BAR0 + 4 * bar.index;
        self.set_bytes(at, &[0b1]);
        let size = u32::try_from(bar.size.clamp(4, 256)).unwrap_or(256);
        let mut mask = (!(size - 1)).to_le_bytes();
        mask[0] &= 0xfc;
        self.set_writable(at, &mask);
        if let Some(w) = self.writable.get_mut(0x04) {
            *w |= 1; // COMMAND_IO
        }
        self.io_bars.push(bar);
    }

    /// Adds a capability with `body` (after the ID and next pointer), of which the bytes
    /// set in `writable` may be written. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        self.set_bytes(at, &[id]);
        self.set_bytes(at + 2, body);
        self.set_writable(at + 2, writable);
        let pointer = u8::try_from(at).unwrap_or(0);
        if self.last_cap == 0 {
            self.set_bytes(0x34, &[pointer]);
            let status = self.u16_at(0x06) | STATUS_CAP_LIST;
            self.set16(0x06, status);
        } else {
            self.set_bytes(self.last_cap + 1, &[pointer]);
        }
        self.last_cap = at;
        self.next_cap = (at + 2 + body.len() + 3) & !3;
        at
    }

    /// Reads `data.len()` bytes at `offset` (beyond the space: all ones).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i) {
                Some(at) if at < SIZE => self.bytes.get(at).copied().unwrap_or(0),
                Some(_) => 0,
                None => 0xff,
            };
        }
    }

    /// Writes `data` at `offset`, only where the space is writable.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> ConfigChange {
        let mut change = ConfigChange::default();
        for (i, b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                break;
            };
            let (Some(&w), Some(byte)) = (self.writable.get(at), self.bytes.get_mut(at)) else {
                break;
            };
            let old = *byte;
            *byte = (old & !w) | (b & w);
            if w != 0 && (at == 0x04 || (BAR0..BAR0 + 24).contains(&at)) && *byte != old {
                change.bars = true;
            }
        }
        change
    }

    /// The whole space, for a snapshot.
    #[must_use]
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }

    /// Puts back a snapshot's bytes (the writable mask, BARs and capabilities are the
    /// device's own and stay as built).
    ///
    /// # Errors
    /// A snapshot of another size.
    pub fn restore_raw(&mut self, bytes: &[u8]) -> Result<(), crate::restore::RestoreError> {
        if bytes.len() != SIZE {
            return Err(crate::restore::RestoreError(
                "configuration space of another size",
            ));
        }
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }

    /// Reads a little-endian u16.
    #[must_use]
    pub fn u16_at(&self, at: usize) -> u16 {
        self.bytes
            .get(at..at + 2)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u16::from_le_bytes)
    }

    /// Overwrites bytes the device itself owns (a capability's state).
    pub fn set_bytes(&mut self, at: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// The bytes at `at`.
    #[must_use]
    pub fn bytes(&self, at: usize, len: usize) -> &[u8] {
        self.bytes.get(at..at + len).unwrap_or(&[])
    }

    /// The memory BARs.
    #[must_use]
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// The I/O BARs.
    #[must_use]
    pub fn io_bars(&self) -> &[Bar] {
        &self.io_bars
    }

    /// Where each I/O BAR is, when I/O decoding is on: (BAR index, port, size).
    #[must_use]
    pub fn mapped_io_bars(&self) -> Vec<(usize, u64, u64)> {
        self.placed(&self.io_bars, COMMAND_IO, 4, !0x3)
    }

    /// Where each BAR is, when memory decoding is on: (BAR index, address, size).
    #[must_use]
    pub fn mapped_bars(&self) -> Vec<(usize, u64, u64)> {
        self.placed(&self.bars, COMMAND_MEMORY, 8, !0xf)
    }

    /// (index, base, size) of each of `bars` with a base, while `decoding` is on: the
    /// base is the BAR's `width` bytes under `mask`.
    fn placed(
        &self,
        bars: &[Bar],
        decoding: u16,
        width: usize,
        mask: u64,
    ) -> Vec<(usize, u64, u64)> {
        if self.u16_at(0x04) & decoding == 0 {
            return Vec::new();
        }
        bars.iter()
            .map(|bar| {
                let mut value = [0u8; 8];
                if let (Some(dst), Some(src)) = (
                    value.get_mut(..width),
                    self.bytes
                        .get(BAR0 + 4 * bar.index..BAR0 + 4 * bar.index + width),
                ) {
                    dst.copy_from_slice(src);
                }
                (bar.index, u64::from_le_bytes(value) & mask, bar.size)
            })
            .filter(|(_, base, _)| *base != 0)
            .collect()
    }
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test offsets are small")]
mod tests {
    use super::*;

    fn read32(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bars_size_and_map_as_the_sizing_protocol_says() {
        let mut c = ConfigSpace::new(0x1af4, 0x10ff, [0x08, 0x80, 0], 1);
        c.add_bar(Bar {
            index: 0,
            size: 0x1_0000,
        });
        c.write(BAR0, &u32::MAX.to_le_bytes());
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xffff_0004, "size 64 KiB, 64-bit memory");
        assert_eq!(read32(&c, BAR0 + 4), u32::MAX);
        c.write(BAR0, &0xc000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &0u32.to_le_bytes());
        assert!(c.mapped_bars().is_empty(), "memory decoding is off");
        let change = c.write(0x04, &COMMAND_MEMORY.to_le_bytes());
        assert!(change.bars);
        assert_eq!(c.mapped_bars(), vec![(0, 0xc000_0000, 0x1_0000)]);
        // IDs are read-only.
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x10ff_1af4);
    }

    #[test]
    fn capabilities_form_a_list() {
        let mut c = ConfigSpace::new(1, 2, [0, 0, 0], 0);
        let a = c.add_capability(0x11, &[0; 10], &[]);
        let b = c.add_capability(0x09, &[0; 2], &[]);
        assert_eq!(c.bytes(0x34, 1), &[a as u8]);
        assert_eq!(c.bytes(a, 2), &[0x11, b as u8]);
        assert_eq!(c.bytes(b, 2), &[0x09, 0]);
        assert_ne!(c.u16_at(6) & STATUS_CAP_LIST, 0);
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut c = ConfigSpace::new(1, 2, [0, 0, 0], 0);
        let mut b = [0u8; 8];
        c.read(252, &mut b);
        assert_eq!(&b[4..], &[0; 4]);
        c.read(usize::MAX - 2, &mut b);
        c.write(usize::MAX, &[1, 2, 3]);
        c.write(4095, &[1]);
    }
}
