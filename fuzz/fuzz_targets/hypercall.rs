//! The IRTE hypercall as a guest can call it: any call number, requester and arguments,
//! with batch arrays and their entries taken from guest memory the input fills. Every
//! call must answer one of the documented statuses; afterwards the data path is raised
//! for arbitrary entries and requesters.

#![no_main]

use hypercall::abi::{status, Registers};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm::hypercall::{Dispatcher, HypercallHandler};
use vmm_fuzz::{core, lock, memory, DEVICE_A, DEVICE_B, MAX_OPS};

#[derive(Arbitrary, Debug)]
struct Call {
    number: u8,
    requester: u8,
    a: u64,
    b: u64,
    /// Use the arguments as they are, rather than folded into the table and memory.
    wide: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<u8>,
    live: u8,
    calls: Vec<Call>,
    signals: Vec<(u16, u16)>,
}

fuzz_target!(|input: Input| {
    let mem = memory(&input.memory);
    let core = core(u32::from(input.live));
    let d = Dispatcher::new(
        core.handle(),
        mem,
        vec![0, 1],
        vec![DEVICE_A, DEVICE_B],
        u32::MAX,
    );
    for c in input.calls.iter().take(MAX_OPS) {
        let rcx = match c.requester % 4 {
            0 => u64::from(DEVICE_A),
            1 => u64::from(DEVICE_B),
            2 => 0x00f8,
            _ => u64::from(c.requester) << 8,
        };
        let (a, b) = if c.wide {
            (c.a, c.b)
        } else {
            (c.a % 0x4_0000, c.b % 2048)
        };
        let mut regs = Registers {
            rax: u64::from(c.number % 8),
            rcx,
            rsi: a,
            rdi: b,
            r8: 0,
            r9: 0,
        };
        d.call(&mut regs);
        assert!(
            regs.rax <= status::NOT_APPLIED,
            "undocumented status {}",
            regs.rax
        );
    }
    let path = lock(&core).path();
    for &(index, sid) in input.signals.iter().take(MAX_OPS) {
        let _ = path.signal(u32::from(index), sid);
    }
});
