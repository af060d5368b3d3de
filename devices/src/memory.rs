//! Guest memory as the devices take it: any vm-memory address space. A plain
//! `GuestMemoryMmap` behind an `Arc` or a `GuestMemoryAtomic` does; so does
//! cloud-hypervisor's `GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>>`, and then every
//! write a device makes into guest memory (a used ring, a VT-d status write, an entry the
//! hypercall writes through, a cleared pending word) goes through vm-memory and is marked
//! in the dirty bitmap that live migration reads. Each access loads the address space's
//! current memory, so a device sees memory hot-plugged after it was made.
//!
//! Devices that only move bytes (the VT-d unit, the hypercall dispatcher) hold the memory
//! as a [`GuestRam`] trait object; the IMS devices, whose queues are `virtio-queue`'s, are
//! generic over the address space, with [`DefaultMemory`] as the default.

use std::sync::Arc;

use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryError, GuestMemoryMmap,
};

/// The address space the devices default to: plain mmap'ed memory, swappable.
pub type DefaultMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// An address space a device can hold and share with its threads.
pub trait AddressSpace: GuestAddressSpace<M: Send + Sync> + Clone + Send + Sync + 'static {}

impl<T> AddressSpace for T where T: GuestAddressSpace<M: Send + Sync> + Clone + Send + Sync + 'static
{}

/// Byte access to guest memory, object-safe.
pub trait GuestRam: Send + Sync {
    /// Reads `buf.len()` bytes at `addr`, all or nothing.
    ///
    /// # Errors
    /// Part of the range is not guest memory.
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), GuestMemoryError>;

    /// Writes `buf` at `addr`, all or nothing (a dirty bitmap marks the pages).
    ///
    /// # Errors
    /// Part of the range is not guest memory.
    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), GuestMemoryError>;

    /// Whether `len` bytes at `addr` are all guest memory the device may read and write.
    fn contains(&self, addr: GuestAddress, len: usize) -> bool;
}

impl<S: AddressSpace> GuestRam for S {
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.memory().read_slice(buf, addr)
    }

    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.memory().write_slice(buf, addr)
    }

    fn contains(&self, addr: GuestAddress, len: usize) -> bool {
        self.memory()
            .check_range(addr, len, vm_memory::Permissions::ReadWrite)
    }
}

/// Shared byte access to guest memory.
pub type SharedRam = Arc<dyn GuestRam>;

/// Reads a `T` at `addr`.
///
/// # Errors
/// Part of it is not guest memory.
pub fn read_obj<T: ByteValued + Default>(
    ram: &dyn GuestRam,
    addr: GuestAddress,
) -> Result<T, GuestMemoryError> {
    let mut value = T::default();
    ram.read(addr, value.as_mut_slice())?;
    Ok(value)
}

/// Writes `value` at `addr`.
///
/// # Errors
/// Part of it is not guest memory.
pub fn write_obj<T: ByteValued>(
    ram: &dyn GuestRam,
    value: T,
    addr: GuestAddress,
) -> Result<(), GuestMemoryError> {
    ram.write(addr, value.as_slice())
}

#[cfg(test)]
mod tests {
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

    use super::*;

    #[test]
    fn writes_through_a_trait_object_are_marked_dirty() {
        let mem =
            vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)])
                .unwrap();
        let ram: SharedRam = Arc::new(GuestMemoryAtomic::new(mem.clone()));
        write_obj(&*ram, 0xabcd_u32, GuestAddress(0x3004)).unwrap();
        assert_eq!(
            read_obj::<u32>(&*ram, GuestAddress(0x3004)).unwrap(),
            0xabcd
        );
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(0x3004));
        assert!(!region.bitmap().dirty_at(0x5000));
        assert!(ram.contains(GuestAddress(0xfff0), 16));
        assert!(!ram.contains(GuestAddress(0xfff8), 16));
        read_obj::<u64>(&*ram, GuestAddress(0x10000)).unwrap_err();
    }
}
