//! The slot-array IMS device as a guest driver can program it: any sequence of BAR 0
//! reads and writes (registers, slots, queue set-up, notifications) and configuration
//! writes, with the work queues' descriptors and rings in guest memory the input fills,
//! interleaved with the device doing its work and raising its slots.
//!
//! Each run of the device must do bounded work, whatever the rings' indices and however
//! the queues are stopped, re-programmed, made ready again or reset: never more than a
//! queue's worth of items per queue taken and not completed.

#![no_main]

use std::time::{Duration, Instant};

use devices::ims::slots::{reg, ImsSlots, MAX_QUEUE_SIZE};
use devices::ims::ImsEngine;
use devices::pci::PciFunction;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{core, lock, memory, most_in_flight, DEVICE_A, MAX_OPS};

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        offset: u16,
        value: u32,
        len: u8,
    },
    Read {
        offset: u16,
        len: u8,
    },
    Config {
        offset: u8,
        value: u32,
    },
    Run {
        later_us: u16,
    },
    Raise {
        slot: u16,
    },
    /// Queue `queue` selected and made ready (or not).
    Ready {
        queue: u16,
        on: bool,
    },
    /// The device reset.
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<u8>,
    live: u8,
    slots: u8,
    queues: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory(&input.memory);
    let core = core(u32::from(input.live));
    let path = lock(&core).path();
    let Ok(mut dev) = ImsSlots::new(
        u32::from(input.slots),
        u32::from(input.queues),
        DEVICE_A,
        path,
        vm_memory::GuestMemoryAtomic::new(mem),
    ) else {
        return;
    };
    // Registers, and the slots of up to 256 entries.
    let span = 0x1000 + 16 * 256;
    let start = Instant::now();
    for op in input.ops.iter().take(MAX_OPS) {
        match *op {
            Op::Write { offset, value, len } => {
                let bytes = value.to_le_bytes();
                let n = usize::from(len % 4) + 1;
                dev.bar_write(0, u64::from(offset) % span, &bytes[..n]);
            }
            Op::Read { offset, len } => {
                let mut bytes = [0u8; 4];
                let n = usize::from(len % 4) + 1;
                dev.bar_read(0, u64::from(offset) % span, &mut bytes[..n]);
            }
            Op::Config { offset, value } => {
                let _ = dev.config_write(usize::from(offset), &value.to_le_bytes());
            }
            Op::Run { later_us } => {
                let now = start + Duration::from_micros(u64::from(later_us) * 64);
                let _ = dev.run(now);
                let taken = most_in_flight(&dev.snapshot(now).deferred);
                assert!(
                    taken <= usize::from(MAX_QUEUE_SIZE),
                    "{taken} items of one queue in flight"
                );
            }
            Op::Ready { queue, on } => {
                dev.bar_write(0, reg::QUEUE_SELECT, &u32::from(queue).to_le_bytes());
                dev.bar_write(0, reg::QUEUE_READY, &u32::from(on).to_le_bytes());
            }
            Op::Reset => dev.bar_write(0, reg::RESET, &1u32.to_le_bytes()),
            Op::Raise { slot } => dev.raise(usize::from(slot)),
        }
    }
});
