//! The VT-d unit's registers and invalidation queue as a guest driver can program them:
//! any sequence of 4- and 8-byte register reads and writes, with the remapping table, the
//! queue's descriptors and the DMA-remapping tables (root, context and second-level
//! entries) in guest memory the input fills, interleaved with interrupts raised through
//! the data path and device DMA reads and writes through the unit (both of which fault
//! into the unit's fault registers). The memory can be rewritten between operations, as a
//! guest changes its tables while devices run.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::viommu::{regs, Vtd, VtdDevice, WeakVtd};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_fuzz::{core, lock, memory, Sink, MAX_OPS};

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        offset: u16,
        wide: bool,
        value: u64,
    },
    Read {
        offset: u16,
        wide: bool,
    },
    Signal {
        index: u16,
        sid: u16,
    },
    /// A device's access: requester `sid % 4` of four, `len % 4097` bytes at `iova`.
    Dma {
        sid: u8,
        iova: u64,
        len: u16,
        write: bool,
    },
    /// The guest rewrites a quadword of its memory (a table entry, a descriptor).
    Poke {
        at: u32,
        value: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<u8>,
    live: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory(&input.memory);
    let core = core(u32::from(input.live));
    let vtd = Arc::new(Mutex::new(Vtd::new(
        core.handle(),
        Arc::new(vm_memory::GuestMemoryAtomic::new(mem.clone())),
        Arc::new(Sink),
    )));
    let path = lock(&core).path();
    path.set_fault_sink(WeakVtd::to(&vtd));
    core.set_mirror(WeakVtd::to(&vtd));
    let dma = vtd
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .dma();
    dma.set_fault_sink(WeakVtd::to(&vtd));
    // Requesters on bus 0 and on another bus, two functions of one device.
    let devices: Vec<_> = [0x0018u16, 0x0019, 0x0100, 0xff00]
        .iter()
        .map(|&sid| dma.memory(sid, mem.clone()))
        .collect();
    let mut buf = vec![0u8; 4096];
    let mut dev = VtdDevice(vtd);
    let size = regs::SIZE;
    for op in input.ops.iter().take(MAX_OPS) {
        match *op {
            Op::Write {
                offset,
                wide,
                value,
            } => {
                let bytes = value.to_le_bytes();
                let len = if wide { 8 } else { 4 };
                dev.write(u64::from(offset) % size, &bytes[..len]);
            }
            Op::Read { offset, wide } => {
                let mut bytes = [0u8; 8];
                let len = if wide { 8 } else { 4 };
                dev.read(u64::from(offset) % size, &mut bytes[..len]);
            }
            Op::Signal { index, sid } => {
                let _ = path.signal(u32::from(index), sid);
            }
            Op::Dma {
                sid,
                iova,
                len,
                write,
            } => {
                let view = devices[usize::from(sid) % devices.len()].memory();
                let len = usize::from(len) % (buf.len() + 1);
                let slice = &mut buf[..len];
                let _ = if write {
                    view.write_slice(slice, GuestAddress(iova))
                } else {
                    view.read_slice(slice, GuestAddress(iova))
                };
            }
            Op::Poke { at, value } => {
                let _ = mem.write_obj(value, GuestAddress(u64::from(at & !7)));
            }
        }
    }
});
