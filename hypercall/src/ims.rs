//! Register and memory layouts of the IMS devices (`docs/ims-device.md`): shared by the
//! device models and by guest drivers, so that both read the same numbers.

/// The slot-array IMS device (PCI `1b36:1100`): registers and slots in BAR 0.
pub mod slots {
    /// PCI vendor ID.
    pub const VENDOR_ID: u16 = 0x1b36;
    /// PCI device ID.
    pub const DEVICE_ID: u16 = 0x1100;
    /// Value of the ID register: `"IMS1"`.
    pub const ID: u32 = u32::from_le_bytes(*b"IMS1");

    /// Register offsets.
    pub mod reg {
        /// `"IMS1"`.
        pub const ID: u64 = 0x000;
        /// Layout version.
        pub const VERSION: u64 = 0x004;
        /// Number of slots.
        pub const SLOTS: u64 = 0x008;
        /// Number of work queues.
        pub const QUEUES: u64 = 0x00c;
        /// Error status (write 1 to clear).
        pub const STATUS: u64 = 0x010;
        /// The last slot that refused a message.
        pub const ERROR_SLOT: u64 = 0x014;
        /// Completions so far (low 32 bits).
        pub const COMPLETIONS: u64 = 0x018;
        /// Interrupts the remapping core refused (low 32 bits).
        pub const FAULTS: u64 = 0x01c;
        /// Which queue the queue registers show.
        pub const QUEUE_SELECT: u64 = 0x020;
        /// Its size (a power of two up to the maximum).
        pub const QUEUE_SIZE: u64 = 0x024;
        /// The slot its completions raise.
        pub const QUEUE_SLOT: u64 = 0x028;
        /// Ready (1) or not (0).
        pub const QUEUE_READY: u64 = 0x02c;
        /// Descriptor table address (low, high at +4).
        pub const QUEUE_DESC: u64 = 0x030;
        /// Available ring address.
        pub const QUEUE_AVAIL: u64 = 0x038;
        /// Used ring address.
        pub const QUEUE_USED: u64 = 0x040;
        /// Queue notification.
        pub const QUEUE_NOTIFY: u64 = 0x048;
        /// Fault injection: microseconds between completions.
        pub const INJECT_DELAY_US: u64 = 0x050;
        /// Device reset (write-only: bit 0 resets every queue and slot).
        pub const RESET: u64 = 0x054;
        /// First slot.
        pub const SLOT_BASE: u64 = 0x1000;
        /// Bytes per slot.
        pub const SLOT_SIZE: u64 = 16;
    }

    /// STATUS: a compatibility-format message was refused.
    pub const STATUS_FORMAT_ERROR: u32 = 1 << 0;
    /// STATUS: a queue was malformed.
    pub const STATUS_QUEUE_ERROR: u32 = 1 << 1;
    /// Slot control: masked.
    pub const SLOT_MASK: u32 = 1 << 0;
    /// Slot control: an interrupt is pending (read-only).
    pub const SLOT_PENDING: u32 = 1 << 1;
    /// The largest queue.
    pub const MAX_QUEUE_SIZE: u16 = 256;
    /// The most slots a device may have.
    pub const MAX_SLOTS: u32 = 32_768;
    /// `QUEUE_NOTIFY` value that notifies every queue.
    pub const NOTIFY_ALL: u32 = u32::MAX;
}

/// The queue-memory IMS device (PCI `1b36:1101`): registers and the MSI-X table in BAR 0,
/// queue contexts and the admin ring in guest RAM.
pub mod queues {
    /// PCI vendor ID.
    pub const VENDOR_ID: u16 = 0x1b36;
    /// PCI device ID.
    pub const DEVICE_ID: u16 = 0x1101;
    /// Value of the ID register: `"IMSQ"`.
    pub const ID: u32 = u32::from_le_bytes(*b"IMSQ");

    /// Register offsets.
    pub mod reg {
        /// `"IMSQ"`.
        pub const ID: u64 = 0x000;
        /// Layout version.
        pub const VERSION: u64 = 0x004;
        /// Number of queue contexts.
        pub const CONTEXTS: u64 = 0x008;
        /// Status (write 1 to clear).
        pub const STATUS: u64 = 0x00c;
        /// Admin ring address (low; high at +4).
        pub const ADMIN_BASE: u64 = 0x010;
        /// Admin ring entries.
        pub const ADMIN_SIZE: u64 = 0x018;
        /// Admin ring producer index (the doorbell).
        pub const ADMIN_TAIL: u64 = 0x01c;
        /// Admin ring consumer index.
        pub const ADMIN_HEAD: u64 = 0x020;
        /// Admin ring enable.
        pub const ADMIN_ENABLE: u64 = 0x024;
        /// Device resets so far.
        pub const RESETS: u64 = 0x028;
        /// Guest-requested reset.
        pub const RESET: u64 = 0x02c;
        /// Command timeout in milliseconds.
        pub const COMMAND_TIMEOUT_MS: u64 = 0x030;
        /// Completions so far (low 32 bits).
        pub const COMPLETIONS: u64 = 0x034;
        /// Queue notification: a context index.
        pub const QUEUE_NOTIFY: u64 = 0x038;
        /// Interrupts the remapping core refused.
        pub const FAULTS: u64 = 0x03c;
        /// Fault injection: microseconds between completions.
        pub const INJECT_DELAY_US: u64 = 0x040;
        /// Fault injection: the next N completions are not signalled.
        pub const INJECT_DROP: u64 = 0x044;
        /// Fault injection: the next N admin commands never complete.
        pub const INJECT_STALL: u64 = 0x048;
        /// Fault injection: reset now, as after a command timeout.
        pub const INJECT_RESET: u64 = 0x04c;
        /// MSI-X table.
        pub const MSIX_TABLE: u64 = 0x1000;
        /// MSI-X pending bits.
        pub const MSIX_PBA: u64 = 0x1800;
        /// BAR size.
        pub const BAR_SIZE: u64 = 0x2000;
    }

    /// STATUS: the device reset itself (timeout or injected reset).
    pub const STATUS_RESET: u32 = 1 << 0;
    /// STATUS: the admin ring's size or address was refused.
    pub const STATUS_ADMIN_ERROR: u32 = 1 << 1;

    /// Admin command layout and codes.
    pub mod command {
        /// Bytes per command.
        pub const SIZE: u64 = 32;
        /// Offset of the opcode (u32).
        pub const OPCODE: u64 = 0;
        /// Offset of the context index (u32).
        pub const CONTEXT: u64 = 4;
        /// Offset of the context's guest-physical address (u64, `START`).
        pub const ADDRESS: u64 = 8;
        /// Offset of the status the device writes (u32; the guest writes 0 before submitting).
        pub const STATUS: u64 = 16;
        /// Start a queue from its context.
        pub const START: u32 = 1;
        /// Drain and stop a queue.
        pub const STOP: u32 = 2;
        /// Status: not completed yet.
        pub const PENDING: u32 = 0;
        /// Status: done.
        pub const OK: u32 = 1;
        /// Status: unknown opcode.
        pub const BAD_OPCODE: u32 = 2;
        /// Status: no such context index.
        pub const BAD_INDEX: u32 = 3;
        /// Status: `START` of a running queue or `STOP` of a stopped one.
        pub const BAD_STATE: u32 = 4;
        /// Status: the context is unreadable, its queue invalid, or its message not in
        /// remappable format.
        pub const BAD_CONTEXT: u32 = 5;
    }

    /// Queue context layout in guest RAM (64 bytes, 64-byte aligned).
    pub mod context {
        /// Bytes per context.
        pub const SIZE: u64 = 64;
        /// Message address, low (u32).
        pub const ADDRESS_LO: u64 = 0;
        /// Message address, high (u32).
        pub const ADDRESS_HI: u64 = 4;
        /// Message data (u32).
        pub const DATA: u64 = 8;
        /// Control (u32), the guest's: bit 0 mask.
        pub const CONTROL: u64 = 12;
        /// Descriptor table (u64).
        pub const DESC: u64 = 16;
        /// Available ring (u64).
        pub const AVAIL: u64 = 24;
        /// Used ring (u64).
        pub const USED: u64 = 32;
        /// Queue size (u16).
        pub const QUEUE_SIZE: u64 = 40;
        /// Pending (u32), the device's: 1 while a masked interrupt waits.
        pub const PENDING: u64 = 44;
        /// Control: masked.
        pub const MASK: u32 = 1 << 0;
    }

    /// The largest queue.
    pub const MAX_QUEUE_SIZE: u16 = 256;
    /// The largest admin ring.
    pub const MAX_ADMIN_SIZE: u32 = 256;
    /// The most contexts a device may have.
    pub const MAX_CONTEXTS: u32 = 4096;
}
