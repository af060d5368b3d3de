//! PCI configuration access through ECAM (bus 0), as a kernel's early PCI code does it.

use hypercall::platform::ECAM_BASE;

fn config_address(device: u8, offset: u16) -> u64 {
    ECAM_BASE + (u64::from(device & 0x1f) << 15) + u64::from(offset & 0xffc)
}

/// Reads a 32-bit configuration register of 00:`device`.0.
pub fn read32(device: u8, offset: u16) -> u32 {
    // SAFETY: ECAM is identity-mapped MMIO; an absent function reads as all ones.
    unsafe { core::ptr::read_volatile(config_address(device, offset) as *const u32) }
}

/// Writes a 32-bit configuration register of 00:`device`.0.
pub fn write32(device: u8, offset: u16, value: u32) {
    // SAFETY: as for `read32`; the write reaches only that function's configuration space.
    unsafe { core::ptr::write_volatile(config_address(device, offset) as *mut u32, value) }
}

/// The device number of the first function with these IDs.
pub fn find(vendor: u16, device: u16) -> Option<u8> {
    let want = u32::from(vendor) | (u32::from(device) << 16);
    (1..32u8).find(|&d| read32(d, 0) == want)
}

/// The next function with these IDs after 00:`after`.0.
pub fn find_after(vendor: u16, device: u16, after: u8) -> Option<u8> {
    let want = u32::from(vendor) | (u32::from(device) << 16);
    (after.saturating_add(1)..32u8).find(|&d| read32(d, 0) == want)
}

/// Where 64-bit memory BAR 0 of 00:`device`.0 is (the VMM placed it, as firmware would).
pub fn bar0(device: u8) -> u64 {
    let lo = read32(device, 0x10);
    let hi = read32(device, 0x14);
    (u64::from(hi) << 32) | u64::from(lo & !0xf)
}

/// The offset of capability `id` of 00:`device`.0.
pub fn capability(device: u8, id: u8) -> Option<u16> {
    let mut at = (read32(device, 0x34) & 0xfc) as u16;
    for _ in 0..48 {
        if at == 0 {
            return None;
        }
        let header = read32(device, at);
        if header as u8 == id {
            return Some(at);
        }
        at = ((header >> 8) & 0xfc) as u16;
    }
    None
}

/// The requester ID of 00:`device`.0.
pub fn requester_id(device: u8) -> u16 {
    u16::from(device) << 3
}

/// 32-bit MMIO read.
pub fn mmio_read(addr: u64) -> u32 {
    // SAFETY: callers pass registers inside a BAR, identity-mapped uncached.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// 32-bit MMIO write.
pub fn mmio_write(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}
