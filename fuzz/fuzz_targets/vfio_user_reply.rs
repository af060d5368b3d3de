//! What a vfio-user device process sends back: any bytes as a reply to any command, then
//! every payload parser on whatever the header check let through. Nothing may panic, and
//! a taken reply is exactly as long as its header says.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm::vfio_user::protocol::{self, command, HEADER_SIZE};

#[derive(Arbitrary, Debug)]
struct Input {
    id: u16,
    command: u8,
    index: u32,
    offset: u64,
    count: u16,
    message: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let command = u16::from(input.command % 16);
    let Ok(payload) = protocol::parse_reply(&input.message, input.id, command) else {
        return;
    };
    assert_eq!(payload.len() + HEADER_SIZE, input.message.len());
    match command {
        command::VERSION => {
            if let Ok(caps) = protocol::parse_version(payload) {
                assert!(caps.max_msg_fds >= 1 && caps.max_msg_fds as usize <= protocol::MAX_FDS);
            }
        }
        command::DEVICE_GET_INFO => {
            let _ = protocol::parse_device_info(payload);
        }
        command::DEVICE_GET_REGION_INFO => {
            let _ = protocol::parse_region_info(payload, input.index);
        }
        command::DEVICE_GET_IRQ_INFO => {
            let _ = protocol::parse_irq_info(payload, input.index);
        }
        _ => {
            let count = u32::from(input.count);
            if let Ok(data) = protocol::parse_region_read(payload, input.index, input.offset, count)
            {
                assert_eq!(data.len(), count as usize);
            }
        }
    }
});
