//! The device side of a PIO or MMIO bus.

/// A device that answers guest accesses to one address range.
///
/// `offset` is relative to the start of the range; `data.len()` is the access size the
/// guest chose (1, 2, 4 or 8 for port and most MMIO accesses, but a device must accept any
/// length without panicking).
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device that serialises its own state, so the bus calls it with no lock of the
/// bus's: a router in front of devices that have locks of their own (the PCI root's
/// configuration and BAR accesses), so that a vCPU waiting for one device behind it does
/// not hold up accesses to the others.
pub trait ConcurrentBusDevice: Send + Sync {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Little-endian value of up to the first 4 bytes of `data` (shorter accesses zero-extend).
#[must_use]
pub fn le_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, d) in bytes.iter_mut().zip(data) {
        *b = *d;
    }
    u32::from_le_bytes(bytes)
}

/// Fills `data` with the little-endian bytes of `value`, repeated as zeros past 4 bytes.
pub fn put_le_u32(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_helpers_accept_any_length() {
        assert_eq!(le_u32(&[]), 0);
        assert_eq!(le_u32(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_u32(&[1, 2, 3, 4, 5, 6, 7, 8]), 0x0403_0201);
        let mut d = [0xffu8; 6];
        put_le_u32(&mut d, 0x0403_0201);
        assert_eq!(d, [1, 2, 3, 4, 0, 0]);
        let mut one = [0u8; 1];
        put_le_u32(&mut one, 0xab);
        assert_eq!(one, [0xab]);
    }
}
