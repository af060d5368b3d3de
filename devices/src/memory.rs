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

    /// Writes each little-endian word at its address, with one look at the memory map
    /// for all of them; returns how many could not be written.
    fn write_words(&self, words: &[(GuestAddress, u32)]) -> usize;
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

    fn write_words(&self, words: &[(GuestAddress, u32)]) -> usize {
        let mem = self.memory();
        words
            .iter()
            .filter(|(at, word)| mem.write_obj(*word, *at).is_err())
            .count()
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
    use std::sync::Mutex;

    use hypercall::abi::{call, status, BatchEntry, Registers, TargetWord};
    use irq::control::InterruptControl;
    use irq::msi::MsiMessage;
    use irq::port::MsiInjector;
    use irq::Irqchip;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

    use super::*;
    use crate::bus::BusDevice;
    use crate::dispatch::{Dispatcher, HypercallHandler};
    use crate::ims::slots::{reg, ImsSlots};
    use crate::ims::testing::w;
    use crate::viommu::{regs, Vtd, VtdDevice, WeakVtd};

    type Dirty = GuestMemoryMmap<AtomicBitmap>;

    fn dirty(mem: &Dirty, at: u64) -> bool {
        mem.find_region(GuestAddress(at)).is_some_and(|r| {
            r.bitmap()
                .dirty_at(usize::try_from(at - r.start_addr().0).unwrap())
        })
    }

    fn clean(mem: &Dirty) {
        let region: &vm_memory::MmapRegion<AtomicBitmap> =
            mem.find_region(GuestAddress(0)).unwrap();
        region.bitmap().reset();
    }

    struct NoEvents;

    impl MsiInjector for NoEvents {
        fn inject(&self, _: &MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Cloud-hypervisor's memory type under the VT-d unit, an IMS device and the
    /// dispatcher: what each writes into guest memory is in the dirty bitmap.
    #[test]
    fn device_writes_into_dirty_tracked_memory_are_marked() {
        const DEV: u16 = 0x0018;
        const TABLE: u64 = 0x1_0000;
        const BATCH: u64 = 0x3_0000;
        let mem = Dirty::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let space = GuestMemoryAtomic::new(mem.clone());
        let (core, _kvm) =
            irq::fake::core(Irqchip::InKernel, 4096, irq::backing::Limits::default());
        // The VT-d unit with its table at TABLE: requesters' writes go through into it.
        let unit = Arc::new(Mutex::new(Vtd::new(
            core.handle(),
            Arc::new(space.clone()),
            Arc::new(NoEvents),
        )));
        core.set_mirror(WeakVtd::to(&unit));
        let mut bus = VtdDevice(unit.clone());
        bus.write(regs::IRTA, &(TABLE | 7).to_le_bytes());
        bus.write(regs::GCMD, &regs::global::SIRTP.to_le_bytes());
        // The dispatcher: allocate, then a batch that activates entry 0.
        let d = Dispatcher::new(
            core.handle(),
            Arc::new(space.clone()),
            vec![0, 1],
            vec![DEV],
            1000,
        );
        let mut regs = Registers {
            rax: u64::from(call::ALLOCATE),
            rcx: u64::from(DEV),
            rsi: 1,
            ..Registers::default()
        };
        d.call(&mut regs);
        assert_eq!(regs.rax, status::OK);
        let entry = BatchEntry {
            index: 0,
            status: 0xffff,
            target: TargetWord::fixed(1, 0x40).encode(),
        };
        mem.write_slice(&entry.to_bytes(), GuestAddress(BATCH))
            .unwrap();
        clean(&mem);
        let mut regs = Registers {
            rax: u64::from(call::BATCH),
            rcx: u64::from(DEV),
            rsi: BATCH,
            rdi: 1,
            ..Registers::default()
        };
        d.call(&mut regs);
        assert_eq!(regs.rax, status::OK);
        assert!(dirty(&mem, BATCH + 4), "the batch's status word");
        assert!(
            dirty(&mem, TABLE),
            "the entry written through into the unit's table"
        );
        assert!(!dirty(&mem, 0x8_0000));
        // A slot-array device completing work: its used ring.
        let mut dev = ImsSlots::new(8, 1, DEV, core.path(), space).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
        mock.build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x6_0000, 64, 0, 0))])
            .unwrap();
        let msg = MsiMessage::remappable(0, None);
        w(&mut dev, reg::SLOT_BASE, msg.address_lo());
        w(&mut dev, reg::SLOT_BASE + 4, msg.address_hi());
        w(&mut dev, reg::SLOT_BASE + 8, msg.data);
        w(&mut dev, reg::SLOT_BASE + 12, 0);
        w(&mut dev, reg::QUEUE_SELECT, 0);
        w(&mut dev, reg::QUEUE_SIZE, 16);
        w(&mut dev, reg::QUEUE_SLOT, 0);
        let low = |a: GuestAddress| u32::try_from(a.0).unwrap();
        w(&mut dev, reg::QUEUE_DESC, low(mock.desc_table_addr()));
        w(&mut dev, reg::QUEUE_AVAIL, low(mock.avail_addr()));
        w(&mut dev, reg::QUEUE_USED, low(mock.used_addr()));
        w(&mut dev, reg::QUEUE_READY, 1);
        clean(&mem);
        w(&mut dev, reg::QUEUE_NOTIFY, 0);
        assert_eq!(dev.process(std::time::Instant::now()), 1);
        assert!(dirty(&mem, mock.used_addr().0), "the used ring");
        assert!(!dirty(&mem, TABLE));
    }

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
