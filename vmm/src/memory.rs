//! Guest RAM: laid out around the MMIO hole, mmap'd by vm-memory, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::os::fd::FromRawFd;
use thiserror::Error;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Why guest RAM could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {size} bytes of guest RAM")]
    Allocate {
        /// Requested size.
        size: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}")]
    Register {
        /// The slot.
        slot: u32,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A region's host address could not be found.
    #[error("guest RAM region at {0:#x} has no host mapping")]
    NoHostAddress(u64),
    /// The memory file RAM shared with device processes lives in could not be made.
    #[error("cannot create a memory file of {size} bytes for guest RAM")]
    MemoryFile {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Allocates `size` bytes of guest RAM in one memory file (`memfd`), mapped shared, so
/// that device processes can map it for DMA (vfio-user's `DMA_MAP` hands them the file
/// and each region's offset in it).
///
/// # Errors
/// [`MemoryError::MemoryFile`] or [`MemoryError::Allocate`].
pub fn allocate_shared(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file_error = |source| MemoryError::MemoryFile { size, source };
    let name = c"guest-ram";
    // SAFETY: `name` is a NUL-terminated string; the call only creates a descriptor, whose
    // ownership is taken at once below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(file_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).map_err(file_error)?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, len) in ram_ranges(size) {
        let clone = file.try_clone().map_err(file_error)?;
        ranges.push((
            start,
            usize::try_from(len).unwrap_or(usize::MAX),
            Some(FileOffset::new(clone, offset)),
        ));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|source| MemoryError::Allocate { size, source })
}

/// The RAM ranges for `size` bytes: below the MMIO hole, and the rest from 4 GiB.
#[must_use]
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    ranges
}

/// End of RAM below the MMIO hole.
#[must_use]
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Highest RAM address plus one.
#[must_use]
pub fn ram_top(size: u64) -> u64 {
    ram_ranges(size)
        .last()
        .map_or(0, |(start, len)| start.0 + len)
}

/// Allocates `size` bytes of guest RAM.
///
/// # Errors
/// [`MemoryError::Allocate`].
pub fn allocate(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, usize::try_from(len).unwrap_or(usize::MAX)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate { size, source })
}

/// Registers every RAM region with KVM as a memory slot.
///
/// # Errors
/// [`MemoryError::Register`] or [`MemoryError::NoHostAddress`].
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::NoHostAddress(region.start_addr().0))?;
        let slot_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which outlives every use KVM makes of it:
        // the VM (`vm::assemble::Vm`) owns the memory and the VM fd and declares the fd
        // first, so the fd (and every part holding a clone of it) is dropped before the
        // memory; KVM reaches guest memory only while a vCPU runs, and none runs then (a
        // vCPU thread left inside a device call at the end holds a clone of the memory
        // through the devices, and returns without entering the guest again).
        unsafe { vm.set_user_memory_region(slot_region) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// KVM memory slots for device memory mapped into the guest (a vfio-user device's
/// mappable BAR areas): each mapping is the file mapped shared in this process and a
/// slot from [`BarSlots::FIRST_SLOT`] on, beyond RAM's.
pub struct BarSlots {
    vm: std::sync::Arc<VmFd>,
    /// Slot -> (host address, length) of its mapping.
    maps: std::sync::Mutex<std::collections::BTreeMap<u32, (usize, usize)>>,
}

impl std::fmt::Debug for BarSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarSlots").finish_non_exhaustive()
    }
}

impl BarSlots {
    /// The first slot used (RAM takes the first few).
    pub const FIRST_SLOT: u32 = 256;
    /// The most mappings at once.
    pub const MAX_SLOTS: u32 = 128;

    /// Slots of `vm`.
    #[must_use]
    pub fn new(vm: std::sync::Arc<VmFd>) -> Self {
        Self {
            vm,
            maps: std::sync::Mutex::default(),
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u32, (usize, usize)>> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl crate::vfio_user::function::BarMapper for BarSlots {
    fn map(&self, gpa: u64, size: u64, file: &std::fs::File, offset: u64) -> std::io::Result<u32> {
        use std::os::fd::AsRawFd;
        let invalid =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string());
        let len = usize::try_from(size).map_err(|_| invalid("size"))?;
        let at = libc::off_t::try_from(offset).map_err(|_| invalid("offset"))?;
        let mut maps = self.maps();
        let slot = (Self::FIRST_SLOT..Self::FIRST_SLOT + Self::MAX_SLOTS)
            .find(|s| !maps.contains_key(s))
            .ok_or_else(|| invalid("no memory slot left for device memory"))?;
        // SAFETY: a new shared mapping of a file the device sent; nothing else is at the
        // address the kernel picks, and it is unmapped only in `unmap` (or never).
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                at,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping stays until `unmap` removes the slot first.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
            // SAFETY: the mapping made above, used by nothing.
            unsafe { libc::munmap(host, len) };
            return Err(std::io::Error::from_raw_os_error(e.errno()));
        }
        maps.insert(slot, (host as usize, len));
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        let Some((host, len)) = self.maps().remove(&slot) else {
            return;
        };
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: deleting a slot this type made; KVM stops using the mapping.
        let removed = unsafe { self.vm.set_user_memory_region(region) }.is_ok();
        if removed {
            // SAFETY: the mapping `map` made; KVM no longer refers to it.
            unsafe { libc::munmap(host as *mut libc::c_void, len) };
        }
    }
}

/// The host's total memory in bytes, from `/proc/meminfo`.
#[must_use]
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_the_hole_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        assert_eq!(ram_top(64 << 20), 64 << 20);
        assert_eq!(low_ram_end(64 << 20), 64 << 20);
    }

    #[test]
    fn ram_beyond_3gib_continues_at_4gib() {
        let size = 5u64 << 30;
        assert_eq!(
            ram_ranges(size),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
        assert_eq!(ram_top(size), 6 << 30);
        assert_eq!(low_ram_end(size), 3 << 30);
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory().unwrap() > 1 << 20);
    }
}
