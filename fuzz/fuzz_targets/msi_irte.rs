//! MSI and IRTE decoding, and translation through a remapping table: any message address
//! and data from any requester, any 128-bit entry in either interrupt mode. A decoded
//! entry must encode back to itself.

#![no_main]

use irq::irte::Irte;
use irq::remap::RemapTable;
use irq::MsiMessage;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{MAX_OPS, TABLE_SIZE};

#[derive(Arbitrary, Debug)]
struct Input {
    eim: bool,
    entries: Vec<(u16, u64, u64)>,
    messages: Vec<(u64, u32, u16)>,
}

fuzz_target!(|input: Input| {
    let Ok(mut table) = RemapTable::new(TABLE_SIZE, input.eim) else {
        return;
    };
    for &(index, lo, hi) in input.entries.iter().take(MAX_OPS) {
        if let Ok(irte) = Irte::decode([lo, hi], input.eim) {
            let again = Irte::decode(irte.encode(input.eim), input.eim);
            assert_eq!(
                again.ok(),
                Some(irte),
                "an entry does not encode back to itself"
            );
        }
        let _ = table.write(u32::from(index), [lo, hi]);
        let _ = table.entry(u32::from(index));
    }
    for &(address, data, sid) in input.messages.iter().take(MAX_OPS) {
        let msg = MsiMessage { address, data };
        let _ = msg.decode();
        let _ = table.translate(&msg, sid);
    }
});
