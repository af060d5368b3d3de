//! A fake VT-d driver: programs the unit the way Linux's intel-iommu interrupt-remapping
//! code does, through its registers and an invalidation queue in guest memory. For tests
//! of the unit and of code that sits on it (feature `test-utils`).

#![cfg_attr(
    not(test),
    expect(
        clippy::expect_used,
        reason = "a test driver: memory the test set up that cannot be written is a broken test"
    )
)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::descriptor::{Descriptor, IecScope};
use super::regs::{self, global};
use crate::bus::BusDevice;

/// The driver: the unit's register page, and its table and queue in guest memory.
#[derive(Debug)]
pub struct FakeDriver<D> {
    /// The unit, as a bus device.
    pub device: D,
    /// Guest memory holding the table, the queue and the wait status word.
    pub mem: GuestMemoryMmap,
    /// The remapping table.
    pub table: u64,
    /// The invalidation queue (256 descriptors).
    pub queue: u64,
    /// Where wait descriptors write their status.
    pub status: u64,
    tail: u64,
    seq: u32,
}

impl<D: BusDevice> FakeDriver<D> {
    /// A driver whose table, queue and status word sit at the given addresses.
    pub fn new(device: D, mem: GuestMemoryMmap, table: u64, queue: u64, status: u64) -> Self {
        Self {
            device,
            mem,
            table,
            queue,
            status,
            tail: 0,
            seq: 0,
        }
    }

    /// Reads a 32-bit register.
    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.device.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Reads a 64-bit register.
    pub fn read64(&mut self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.device.read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write32(&mut self, offset: u64, value: u32) {
        self.device.write(offset, &value.to_le_bytes());
    }

    /// Writes a 64-bit register.
    pub fn write64(&mut self, offset: u64, value: u64) {
        self.device.write(offset, &value.to_le_bytes());
    }

    /// Issues one GCMD command on top of the current state (as Linux's `iommu->gcmd`).
    pub fn command(&mut self, set: u32, clear: u32) {
        let persistent = global::TE | global::QIE | global::IRE | global::CFI;
        let now = self.read32(regs::GSTS) & persistent;
        self.write32(regs::GCMD, (now | set) & !clear);
    }

    /// Linux's order: table pointer, queued invalidation, global IEC flush, IR on with
    /// compatibility format blocked. `size_bits` is IRTA.S (2^(S+1) entries).
    pub fn enable(&mut self, size_bits: u64, eim: bool) {
        let eime = if eim { regs::irta::EIME } else { 0 };
        self.write64(regs::IRTA, self.table | eime | size_bits);
        self.command(global::SIRTP, 0);
        self.write64(regs::IQT, 0);
        self.tail = 0;
        self.write64(regs::IQA, self.queue);
        self.command(global::QIE, 0);
        self.invalidate_all();
        self.command(global::IRE, global::CFI);
    }

    /// Writes a raw entry into the guest's table.
    pub fn write_entry(&mut self, index: u32, raw: [u64; 2]) {
        let at = GuestAddress(self.table + 16 * u64::from(index));
        self.mem
            .write_obj(raw, at)
            .expect("the table is in guest memory");
    }

    /// Appends a descriptor and moves the tail (the unit processes it at once).
    pub fn submit(&mut self, descriptor: [u64; 2]) {
        let at = GuestAddress(self.queue + self.tail);
        self.mem
            .write_obj(descriptor, at)
            .expect("the queue is in guest memory");
        self.tail = (self.tail + 16) % (256 * 16);
        self.write64(regs::IQT, self.tail);
    }

    /// Appends `descriptors` and moves the tail once, past all of them (at most 255: the
    /// queue holds 256).
    pub fn submit_all(&mut self, descriptors: &[[u64; 2]]) {
        for d in descriptors.iter().take(255) {
            let at = GuestAddress(self.queue + self.tail);
            self.mem
                .write_obj(*d, at)
                .expect("the queue is in guest memory");
            self.tail = (self.tail + 16) % (256 * 16);
        }
        self.write64(regs::IQT, self.tail);
    }

    /// A wait descriptor writing a fresh status; true when the status arrived.
    pub fn wait(&mut self) -> bool {
        self.seq += 1;
        let wait = Descriptor::Wait {
            status_write: Some((self.status, self.seq)),
            interrupt: false,
        };
        self.submit(wait.encode());
        self.mem.read_obj::<u32>(GuestAddress(self.status)).ok() == Some(self.seq)
    }

    /// Index-selective IEC flush of `2^mask` entries from `index`, then a wait.
    pub fn invalidate(&mut self, index: u32, mask: u32) -> bool {
        let scope = IecScope::Selective {
            index: u16::try_from(index & 0xffff).unwrap_or(0),
            mask: u8::try_from(mask & 0x1f).unwrap_or(0),
        };
        self.submit(Descriptor::InterruptEntryCache(scope).encode());
        self.wait()
    }

    /// Global IEC flush, then a wait.
    pub fn invalidate_all(&mut self) -> bool {
        self.submit(Descriptor::InterruptEntryCache(IecScope::Global).encode());
        self.wait()
    }

    /// Fault record `i`: (interrupt index, requester, reason, F).
    pub fn fault_record(&mut self, i: usize) -> (u64, u16, u8, bool) {
        let base = regs::FRCD + 16 * i as u64;
        let low = self.read64(base);
        let high = self.read64(base + 8);
        let sid = u16::try_from(high & 0xffff).unwrap_or(0);
        let reason = u8::try_from((high >> 32) & 0xff).unwrap_or(0);
        (low >> 48, sid, reason, high >> 63 != 0)
    }

    /// Clears fault record `i` (write 1 to F).
    pub fn clear_fault(&mut self, i: usize) {
        let base = regs::FRCD + 16 * i as u64;
        self.write64(base + 8, 1 << 63);
    }
}
