//! IMS-capable devices: interrupt messages stored by the device itself, thousands of them,
//! always in remappable format (IMS depends on interrupt remapping). `docs/ims-device.md`
//! has the register layout.
//!
//! - [`slots`]: the slot-array kind: a BAR of message slots, work on virtio queues, each
//!   queue's completions raising the interrupt of the slot bound to it.

pub mod slots;
