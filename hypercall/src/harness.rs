//! The test-harness mailbox: how a test guest asks the host to fire interrupts at it.
//!
//! The VMM allocates the mailbox in guest RAM and passes its address in the
//! boot-information page ([`crate::boot::offset::MAILBOX_ADDR`]). The guest fills in a
//! request, increments [`offset::REQUEST_SEQ`], and writes the new sequence number to
//! [`crate::platform::HARNESS_PORT`]. The host services the request on its own thread (the
//! vCPU is not held) and, when done, writes [`offset::STATUS`] and then copies the sequence
//! number into [`offset::DONE_SEQ`]. The guest waits for `DONE_SEQ` to match.
//!
//! The counter table is written by the guest's interrupt handlers: one u32 per vector per
//! vCPU, at `COUNTERS + cpu * COUNTERS_STRIDE + vector * 4`. The host reads it to pace what
//! it fires (so that two interrupts never merge in the LAPIC) and to report what the guest
//! received. A guest that keeps the table sets [`offset::COUNTS_VALID`] to 1.
//!
//! | offset   | size | writer | field |
//! |----------|------|--------|-------|
//! | `0x000`  | 4    | guest  | request sequence number |
//! | `0x004`  | 4    | guest  | request code ([`request`]) |
//! | `0x008`  | 4    | guest  | argument: vector |
//! | `0x00c`  | 4    | guest  | argument: count |
//! | `0x010`  | 4    | host   | sequence number of the last completed request |
//! | `0x014`  | 4    | host   | status of that request ([`status`]) |
//! | `0x018`  | 4    | guest  | 1 when the counter table is maintained |
//! | `0x400`  | 4 × cpus | host | interrupts fired at each vCPU by the last request |
//! | `0x1000` | 1024 × cpus | guest | counter table |

/// Byte offsets in the mailbox.
pub mod offset {
    /// u32, guest: request sequence number.
    pub const REQUEST_SEQ: usize = 0x000;
    /// u32, guest: request code.
    pub const REQUEST: usize = 0x004;
    /// u32, guest: vector argument.
    pub const ARG_VECTOR: usize = 0x008;
    /// u32, guest: count argument.
    pub const ARG_COUNT: usize = 0x00c;
    /// u32, host: sequence number of the last completed request.
    pub const DONE_SEQ: usize = 0x010;
    /// u32, host: status of the last completed request.
    pub const STATUS: usize = 0x014;
    /// u32, guest: 1 when the counter table is maintained.
    pub const COUNTS_VALID: usize = 0x018;
    /// `[u32; cpus]`, host: interrupts fired at each vCPU by the last request.
    pub const FIRED: usize = 0x400;
    /// Start of the counter table.
    pub const COUNTERS: usize = 0x1000;
}

// The FIRED array for every vCPU the boot information can describe fits below the
// counter table.
const _: () = assert!(offset::FIRED + 4 * crate::boot::MAX_CPUS <= offset::COUNTERS);

/// Bytes per vCPU in the counter table (256 vectors × u32).
pub const COUNTERS_STRIDE: usize = 256 * 4;

/// Size of the mailbox for `cpus` vCPUs.
#[must_use]
pub const fn mailbox_size(cpus: usize) -> usize {
    offset::COUNTERS + cpus * COUNTERS_STRIDE
}

/// Offset of the counter for `vector` on vCPU `cpu`.
#[must_use]
pub const fn counter_offset(cpu: usize, vector: u8) -> usize {
    offset::COUNTERS + cpu * COUNTERS_STRIDE + vector as usize * 4
}

/// Request codes.
pub mod request {
    /// For every vCPU: program a plain (compatibility-format, fixed, edge) MSI route to
    /// that vCPU's APIC ID with the requested vector, attach an irqfd, fire it `count`
    /// times, each time waiting until the guest's counter for (vCPU, vector) has grown by
    /// one, then detach and remove the route. `FIRED[cpu]` reports what was fired.
    pub const FIRE_MSI_EACH_CPU: u32 = 1;
}

/// Status codes written by the host.
pub mod status {
    /// The request completed as asked.
    pub const OK: u32 = 0;
    /// The request code is not known.
    pub const UNKNOWN_REQUEST: u32 = 1;
    /// An argument is out of range (vector below 32, count above [`super::MAX_COUNT`]).
    pub const BAD_ARGUMENT: u32 = 2;
    /// An interrupt was fired but the guest's counter did not grow within the host's
    /// patience (it arrived elsewhere, or not at all). `FIRED` says how far it got.
    pub const NOT_DELIVERED: u32 = 3;
    /// The host could not set up the interrupt (route or irqfd failure).
    pub const HOST_ERROR: u32 = 4;
}

/// The largest `count` a request may ask for.
pub const MAX_COUNT: u32 = 100_000;
/// The lowest vector a request may use (0-31 are exceptions).
pub const MIN_VECTOR: u32 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_table_follows_the_header() {
        assert_eq!(counter_offset(0, 0), 0x1000);
        assert_eq!(counter_offset(1, 0x40), 0x1000 + 1024 + 0x100);
        assert_eq!(mailbox_size(2), 0x1000 + 2048);
    }
}
