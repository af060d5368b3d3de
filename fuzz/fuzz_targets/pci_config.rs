//! PCI configuration space as a guest kernel reaches it: CF8/CFC port accesses, ECAM
//! reads and writes of any function, and accesses to the BAR window, with one IMS device
//! of each kind on the root bus, so that BAR moves, command-register changes and MSI-X
//! capability writes all follow the guest's writes.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::ConcurrentBusDevice;
use devices::ims::queues::ImsQueues;
use devices::ims::slots::ImsSlots;
use devices::pci::{self, ConfigIo, Ecam, MmioWindow, PciRoot};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{core, lock, memory, DEVICE_A, DEVICE_B, MAX_OPS};

#[derive(Arbitrary, Debug)]
enum Op {
    Port {
        write: bool,
        offset: u8,
        value: u32,
        len: u8,
    },
    Ecam {
        write: bool,
        offset: u32,
        value: u32,
        len: u8,
    },
    Window {
        write: bool,
        offset: u32,
        value: u32,
        len: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<u8>,
    ops: Vec<Op>,
}

fn access(dev: &dyn ConcurrentBusDevice, write: bool, offset: u64, value: u32, len: u8) {
    let n = match len % 3 {
        0 => 1,
        1 => 2,
        _ => 4,
    };
    let mut bytes = value.to_le_bytes();
    if write {
        dev.write(offset, &bytes[..n]);
    } else {
        dev.read(offset, &mut bytes[..n]);
    }
}

fuzz_target!(|input: Input| {
    let mem = memory(&input.memory);
    let core = core(8);
    let path = lock(&core).path();
    let mut root = PciRoot::new(devices::pci::PciLayout::default());
    let (Ok(slots), Ok(queues)) = (
        ImsSlots::new(
            64,
            8,
            DEVICE_A,
            path.clone(),
            vm_memory::GuestMemoryAtomic::new(mem.clone()),
        ),
        ImsQueues::new(8, DEVICE_B, path, vm_memory::GuestMemoryAtomic::new(mem)),
    ) else {
        return;
    };
    root.add(3, 0, Arc::new(Mutex::new(slots)));
    root.add(4, 0, Arc::new(Mutex::new(queues)));
    root.assign_bars();
    let root = Arc::new(Mutex::new(root));
    let ports = ConfigIo(root.clone());
    let ecam = Ecam(root.clone());
    let window = MmioWindow(root);
    for op in input.ops.iter().take(MAX_OPS) {
        match *op {
            Op::Port {
                write,
                offset,
                value,
                len,
            } => {
                let offset = u64::from(offset) % u64::from(pci::CONFIG_PORTS);
                access(&ports, write, offset, value, len);
            }
            Op::Ecam {
                write,
                offset,
                value,
                len,
            } => access(&ecam, write, u64::from(offset) % pci::ECAM_SIZE, value, len),
            Op::Window {
                write,
                offset,
                value,
                len,
            } => access(
                &window,
                write,
                u64::from(offset) % pci::WINDOW_SIZE,
                value,
                len,
            ),
        }
    }
});
