//! The IRTE hypercall as a guest can call it: any call number, requester and arguments,
//! with batch arrays and their entries taken from guest memory the input fills. Every
//! call must answer one of the documented statuses. Between calls, entries are bound to
//! and unbound from external eventfds through the core's front door, as an embedder's
//! device outside the VMM would; a bound eventfd is attached exactly while its entry is
//! live. Afterwards the data path is raised for arbitrary entries and requesters.

#![no_main]

use devices::dispatch::{Dispatcher, HypercallHandler};
use hypercall::abi::{status, Registers};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{core, lock, memory, DEVICE_A, DEVICE_B, MAX_OPS};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
        std::sync::Arc::new(vm_memory::GuestMemoryAtomic::new(mem)),
        vec![0, 1],
        vec![DEVICE_A, DEVICE_B],
        u32::MAX,
    );
    let handle = core.handle();
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
        let requester = u16::try_from(rcx).unwrap_or(u16::MAX);
        let index = u32::try_from(b).unwrap_or(u32::MAX);
        match c.number % 10 {
            8 => {
                let fd = EventFd::new(EFD_NONBLOCK).unwrap();
                let _ = handle.bind_source(requester, index, fd);
                continue;
            }
            9 => {
                let _ = handle.unbind_source(requester, index);
                continue;
            }
            _ => {}
        }
        let mut regs = Registers {
            rax: u64::from(c.number % 9),
            rcx,
            rsi: a,
            rdi: b,
            r8: 0,
            r9: 0,
        };
        d.call(&mut regs);
        assert!(
            regs.rax <= status::HOST_ERROR,
            "undocumented status {}",
            regs.rax
        );
    }
    {
        let backing = lock(&core);
        for index in 0..backing.limits().table_size {
            if let Some((requester, attached)) = backing.binding(index) {
                assert_eq!(backing.owner(index).map(|o| o.0), Some(requester));
                let live = irq::irte::Irte::decode(backing.table().raw(index).unwrap(), true)
                    .is_ok_and(|e| e.present && e.validation.allows(requester));
                assert_eq!(attached.is_some(), live, "entry {index}");
            }
        }
    }
    let path = lock(&core).path();
    for &(index, sid) in input.signals.iter().take(MAX_OPS) {
        let _ = path.signal(u32::from(index), sid);
    }
});
