//! The IOAPIC as a guest drives it: any access to its register page (IOREGSEL, IOWIN,
//! EOI, and everything else), with its input lines raised, lowered and pulsed, local
//! APIC EOIs of any vector, and the IRTEs its pins name rewritten under it, on a split
//! irqchip whose pin routes follow. Checked after every step: only level-triggered pins
//! have routes, and those are level-triggered (a route may lag an IRTE rewrite until the
//! pin's next send); only level entries hold remote IRR; the state restores to itself.

#![no_main]

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::ioapic::{IoApic, RemappingOutput, PINS};
use irq::irte::{Irte, SourceValidation};
use irq::msi::Target;
use irq::Irqchip;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{core_for, lock, MAX_OPS, TABLE_SIZE};

const IOAPIC_SID: u16 = 0xff00;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;

#[derive(Arbitrary, Debug)]
enum Op {
    Access {
        write: bool,
        offset: u16,
        value: u32,
        len: u8,
    },
    Line {
        pin: u8,
        high: bool,
    },
    Pulse {
        pin: u8,
    },
    Eoi {
        vector: u8,
    },
    /// Rewrites IRTE `index` (small, so that pins name it often).
    Irte {
        index: u8,
        vector: u8,
        level: bool,
        ioapic: bool,
        present: bool,
    },
    Restore,
}

fuzz_target!(|ops: Vec<Op>| {
    let core = core_for(0, Irqchip::Split);
    let out = Arc::new(RemappingOutput::new(core.handle(), IOAPIC_SID));
    let mut io = IoApic::new(out.clone());
    for op in ops.iter().take(MAX_OPS) {
        match *op {
            Op::Access {
                write,
                offset,
                value,
                len,
            } => {
                let n = [1, 2, 4, 8][usize::from(len % 4)];
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(&value.to_le_bytes());
                let offset = u64::from(offset) % devices::ioapic::SIZE;
                if write {
                    io.write(offset, &bytes[..n]);
                } else {
                    io.read(offset, &mut bytes[..n]);
                }
            }
            Op::Line { pin, high } => io.set_level(usize::from(pin), high),
            Op::Pulse { pin } => io.pulse(usize::from(pin)),
            Op::Eoi { vector } => io.eoi(vector),
            Op::Irte {
                index,
                vector,
                level,
                ioapic,
                present,
            } => {
                let index = u32::from(index % 32).min(TABLE_SIZE - 1);
                let mut backing = lock(&core);
                let mut txn = backing.transaction();
                let staged = if present {
                    let target = Target {
                        level,
                        ..Target::fixed(0, vector.max(0x20))
                    };
                    let sid = if ioapic { IOAPIC_SID } else { 0x0018 };
                    let validation = SourceValidation::RequesterId { sid, qualifier: 0 };
                    txn.set(index, &Irte::new(target, validation))
                } else {
                    txn.clear(index)
                };
                if staged.is_ok() {
                    let _ = txn.commit();
                }
            }
            Op::Restore => {
                let state = io.snapshot();
                io = IoApic::restore(out.clone(), state.clone()).expect("its own state");
                assert_eq!(io.snapshot(), state);
            }
        }
        assert_eq!(out.route_errors(), 0, "the fake accepts every route");
        let backing = lock(&core);
        for pin in 0..PINS {
            let entry = io.entry(pin);
            let route = backing
                .routes()
                .pin_route(u32::try_from(pin).expect("24 pins"));
            if entry & RTE_LEVEL == 0 {
                assert_eq!(route, None, "edge pin {pin} has a route");
                assert_eq!(entry & RTE_REMOTE_IRR, 0, "edge pin {pin} holds remote IRR");
            } else if let Some(route) = route {
                assert_ne!(route.data & (1 << 15), 0, "a pin route that is not level");
            }
        }
    }
});
