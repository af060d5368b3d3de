//! The queue-memory IMS device as a guest driver can program it: any sequence of BAR
//! reads and writes (registers, admin queue set-up, doorbells, MSI-X table) with the admin
//! commands, queue contexts and rings in guest memory the input fills, interleaved with
//! the device doing its work (commands, completions, timeouts) at arbitrary times.
//!
//! Each run of the device must do bounded work, whatever the indices: at most one admin
//! ring of commands (a tail more than a ring ahead of the head is refused), and never
//! more than a queue's worth of items per context taken and not completed.

#![no_main]

use std::time::{Duration, Instant};

use devices::ims::queues::{reg, ImsQueues, MAX_ADMIN_SIZE, MAX_QUEUE_SIZE};
use devices::ims::ImsEngine;
use devices::pci::PciFunction;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{core, lock, memory, most_in_flight, DEVICE_A, MAX_OPS};

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        bar: bool,
        offset: u16,
        value: u32,
        len: u8,
    },
    Read {
        bar: bool,
        offset: u16,
        len: u8,
    },
    Config {
        offset: u8,
        value: u32,
    },
    Run {
        later_ms: u16,
    },
    /// `ADMIN_TAIL` written `ahead` entries past the current head.
    Tail {
        ahead: u32,
    },
    /// A context notified.
    Notify {
        context: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<u8>,
    live: u8,
    contexts: u8,
    timeout_ms: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory(&input.memory);
    let core = core(u32::from(input.live));
    let path = lock(&core).path();
    let Ok(mut dev) = ImsQueues::new(
        u32::from(input.contexts),
        DEVICE_A,
        path,
        vm_memory::GuestMemoryAtomic::new(mem),
    ) else {
        return;
    };
    dev.set_timeout(Duration::from_millis(u64::from(input.timeout_ms)));
    let start = Instant::now();
    for op in input.ops.iter().take(MAX_OPS) {
        match *op {
            Op::Write {
                bar,
                offset,
                value,
                len,
            } => {
                let bytes = value.to_le_bytes();
                let n = usize::from(len % 4) + 1;
                dev.bar_write(usize::from(bar), u64::from(offset), &bytes[..n]);
            }
            Op::Read { bar, offset, len } => {
                let mut bytes = [0u8; 4];
                let n = usize::from(len % 4) + 1;
                dev.bar_read(usize::from(bar), u64::from(offset), &mut bytes[..n]);
            }
            Op::Config { offset, value } => {
                let _ = dev.config_write(usize::from(offset), &value.to_le_bytes());
            }
            Op::Run { later_ms } => {
                let now = start + Duration::from_millis(u64::from(later_ms));
                let before = dev.stats().commands;
                let _ = dev.run(now);
                let commands = dev.stats().commands - before;
                assert!(
                    commands <= u64::from(MAX_ADMIN_SIZE),
                    "{commands} commands in one run"
                );
                let taken = most_in_flight(&dev.snapshot(now).deferred);
                assert!(
                    taken <= usize::from(MAX_QUEUE_SIZE),
                    "{taken} items of one queue in flight"
                );
            }
            Op::Tail { ahead } => {
                let mut head = [0u8; 4];
                dev.bar_read(0, reg::ADMIN_HEAD, &mut head);
                let tail = u32::from_le_bytes(head).wrapping_add(ahead);
                dev.bar_write(0, reg::ADMIN_TAIL, &tail.to_le_bytes());
            }
            Op::Notify { context } => {
                dev.bar_write(0, reg::QUEUE_NOTIFY, &u32::from(context).to_le_bytes());
            }
        }
    }
});
