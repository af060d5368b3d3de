//! The VT-d unit's registers and invalidation queue as a guest driver can program them:
//! any sequence of 4- and 8-byte register reads and writes, with the remapping table and
//! the queue's descriptors in guest memory the input fills, interleaved with interrupts
//! raised through the data path (which fault into the unit's fault registers).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::viommu::{regs, Vtd, VtdDevice, WeakVtd};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{core, lock, memory, Sink, MAX_OPS};

#[derive(Arbitrary, Debug)]
enum Op {
    Write { offset: u16, wide: bool, value: u64 },
    Read { offset: u16, wide: bool },
    Signal { index: u16, sid: u16 },
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
        Arc::new(vm_memory::GuestMemoryAtomic::new(mem)),
        Arc::new(Sink),
    )));
    let path = lock(&core).path();
    path.set_fault_sink(WeakVtd::to(&vtd));
    core.set_mirror(WeakVtd::to(&vtd));
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
        }
    }
});
