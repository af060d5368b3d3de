//! The test-harness mailbox: how a test guest asks the host to fire interrupts at it.
//!
//! The VMM allocates the mailbox in guest RAM and passes its address in the
//! boot-information page ([`crate::boot::offset::MAILBOX_ADDR`]). The guest fills in a
//! request, increments [`offset::REQUEST_SEQ`], and writes the new sequence number to
//! [`crate::platform::HARNESS_PORT`]. The host services the request on its own thread (the
//! vCPU is not held) and, when done, writes [`offset::STATUS`] and then copies the sequence
//! number into [`offset::DONE_SEQ`]. The guest waits for `DONE_SEQ` to match.
//!
//! When a `BENCH_*` request with valid arguments is done, whatever its status, the host
//! raises one more interrupt after writing `DONE_SEQ`: a plain MSI with the request's
//! vector at vCPU 0 (not in `FIRED`). The guest may therefore wait for such a request in
//! `hlt` rather than spinning, and vCPU 0 is idle when the timed interrupts reach it.
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
//! | `0x01c`  | 4    | guest  | argument: mode (per request) |
//! | `0x020`  | 4    | host   | result of the last request (per request) |
//! | `0x024`  | 12   | guest  | `RAISE_MSI`: message address low, high, data |
//! | `0x030`  | 4    | guest  | `RAISE_MSI`, `BENCH_*`: requester ID |
//! | `0x034`  | 4    | guest  | `BENCH_THROUGHPUT`: window |
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
    /// u32, guest: mode argument (meaning per request).
    pub const ARG_MODE: usize = 0x01c;
    /// u32, host: result of the last request (meaning per request).
    pub const RESULT: usize = 0x020;
    /// u32, guest: message address, low half (`RAISE_MSI`).
    pub const ARG_ADDR_LO: usize = 0x024;
    /// u32, guest: message address, high half (`RAISE_MSI`).
    pub const ARG_ADDR_HI: usize = 0x028;
    /// u32, guest: message data (`RAISE_MSI`).
    pub const ARG_DATA: usize = 0x02c;
    /// u32, guest: requester ID (`RAISE_MSI`; the IMS device of `BENCH_*`).
    pub const ARG_SID: usize = 0x030;
    /// u32, guest: interrupts in flight at once (`BENCH_THROUGHPUT`).
    pub const ARG_WINDOW: usize = 0x034;
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
    /// Remapped interrupts through the interrupt core: allocate `count` IRTEs for the
    /// harness's requester ([`super::HARNESS_SOURCE_ID`]), make entry `i` deliver to vCPU
    /// `i % cpus` with vector `vector + (i / cpus) % mode` (`mode` vectors, 1 to 64; 0
    /// means 1), all live at once (one transaction), then raise each entry once through
    /// the data path, and free them. Entries with distinct (vCPU, vector) are raised
    /// together and the host waits for all of them to be counted before the next round.
    /// `FIRED[cpu]` reports what was raised at each vCPU; `RESULT` the `KVM_SET_GSI_ROUTING`
    /// calls the activation took.
    pub const REMAP_EACH_CPU: u32 = 2;
    /// Retarget under load: one IRTE with `vector`, raised `count` times back to back
    /// (each waiting until some vCPU counted it), while another host thread retargets it
    /// to the next vCPU every millisecond. With `mode` 1, every vCPU also holds an anchor
    /// IRTE with the same vector (never raised), so each retarget joins a routed target
    /// (a pointer swap); with `mode` 0 the entry is alone and each retarget rewrites its
    /// route. `FIRED[cpu]` reports where each interrupt was counted, `RESULT` the number
    /// of retargets made.
    pub const REMAP_RETARGET: u32 = 3;
    /// Interrupt isolation: one IRTE for vCPU 0 with `vector` that only the harness's
    /// requester may use (SVT 1, SQ 0). It is raised `count` times by another requester
    /// ([`super::FOREIGN_SOURCE_ID`]), which must fault and deliver nothing, then once by
    /// the harness. `FIRED[0]` is 1; `RESULT` the source-id faults recorded.
    pub const REMAP_SOURCE_ID: u32 = 4;
    /// Raises entry `mode` (an IRTE the guest programmed, for example through the IRTE
    /// hypercall) `count` times as the harness's requester, each time waiting until its
    /// target vCPU counted it. An entry that is not live faults and delivers nothing.
    /// `FIRED[cpu]` and `RESULT` say how many were delivered. `vector` is not used.
    pub const RAISE: u32 = 5;
    /// Raises the MSI message at `ARG_ADDR_LO/HI`, `ARG_DATA` as requester `ARG_SID`,
    /// `count` times, as a device behind the remapping unit would: through the
    /// remapping core's data path (remappable messages translate through their entry,
    /// compatibility-format ones pass only while not blocked). After each delivered one
    /// the host waits until some vCPU counted its vector (the entry's, looked up at each
    /// raise, so the entry may be retargeted meanwhile). `FIRED[cpu]` says where each was
    /// counted; `RESULT` how many were delivered (faults are not).
    pub const RAISE_MSI: u32 = 6;
    /// Delivery latency, for `vmm bench`: `count` samples, each made of two interrupts
    /// delivering `vector` to vCPU 0, one after the other. The first is slot `mode` of the
    /// slot-array IMS device whose requester ID is `ARG_SID`, raised as a completion raises
    /// it (through the slot's message and the remapping core); the guest must have
    /// programmed that slot's entry to deliver `vector` to vCPU 0. The second is a raw
    /// irqfd on a plain MSI route to vCPU 0 with `vector`, set up by the host for the
    /// request. The host times each from the raise until the guest's counter for
    /// (vCPU 0, `vector`) has grown, spinning meanwhile. `FIRED[0]` is `2 × count` when
    /// everything was delivered; the timings stay with the host.
    pub const BENCH_DELIVERY: u32 = 7;
    /// Throughput, for `vmm bench`: [`super::BENCH_RUNS`] runs through each path,
    /// alternating, each of `count` interrupts over `ARG_WINDOW` vectors (1 to
    /// [`super::MAX_BENCH_WINDOW`]): interrupt `i` of a run delivers `vector + i % window`
    /// to vCPU 0, through slot `mode + i % window` of the device at `ARG_SID` (whose
    /// entries the guest programmed so) or through one of `window` raw irqfds on plain MSI
    /// routes. A vector is raised again only once the guest counted its previous
    /// interrupt, so none merge. `FIRED[0]` is `2 × BENCH_RUNS × count` when everything
    /// was delivered.
    pub const BENCH_THROUGHPUT: u32 = 8;
    /// Hypercall timing, for `vmm bench`: with `mode` 1 the host starts recording, for
    /// every hypercall and every `out` to [`crate::platform::NULL_PORT`], the host time
    /// from its exit to the guest's re-entry and to the vCPU's next exit (dropping what it
    /// had); with `mode` 0 it stops and keeps the `UPDATE` calls recorded, labelled with
    /// `count` (the live interrupts they ran with), with `mode` 2 the `BATCH` calls, with
    /// `mode` 3 the exits to the null port. `RESULT` is the number kept. `vector` is not
    /// used.
    pub const BENCH_HYPERCALLS: u32 = 9;
    /// Interrupt storm: two IRTEs for vCPU 0 (the harness's requester), the storm with
    /// `vector` and the bystander with `vector + 1`. The storm entry is raised `count`
    /// times back to back, without waiting; spread among those raises, the bystander is
    /// raised `mode` times (1 to [`super::MAX_BYSTANDERS`]), each time waiting until the
    /// guest counted it. Then the host waits until the storm's counter has been still for
    /// 50 ms (its coalesced interrupt delivered). `FIRED[0]` counts the raises
    /// (`count + mode`); `RESULT` the storm's signals that storm control coalesced.
    pub const STORM: u32 = 10;
    /// Fault injection into the interrupt core's KVM calls: with `mode` 1 the next `count`
    /// `KVM_SET_GSI_ROUTING` calls fail, with `mode` 2 the next `count` irqfd
    /// registrations (0 disarms). `vector` is not used. A failed call must leave the
    /// previous state working, and the hypercall or register write that needed it must
    /// report the failure.
    pub const INJECT: u32 = 11;
    /// A snapshot of the whole VM, to the file the VM was started with
    /// (`vmm run --snapshot FILE`). The host completes the request (`DONE_SEQ`, status OK)
    /// and then pauses the VM and writes the snapshot, so a restored VM finds the request
    /// done; what the VM does next (stop, or go on) is the run's choice. Arguments are not
    /// used. Without a snapshot file: [`super::status::UNAVAILABLE`].
    ///
    /// A request rung before a snapshot and not yet done when it was taken (`REQUEST_SEQ`
    /// ahead of `DONE_SEQ`) is served by the restored VM.
    pub const SNAPSHOT: u32 = 12;
    /// Drives input `count` (0-23) of the IOAPIC
    /// ([`crate::platform::IOAPIC_BASE`]) low (`mode` 0), high (1) or pulses it (2, an
    /// edge-triggered source's interrupt). What the pin then sends follows its
    /// redirection entry: an edge entry on the rising edge, a level entry while the line
    /// is high and remote IRR is clear (again after each EOI of its vector while high).
    /// `RESULT` is the number of interrupts the IOAPIC sent during the request. `vector`
    /// is not used.
    pub const IOAPIC_LINE: u32 = 13;
    /// Holds a device (test machinery for the watchdog): the host takes the lock of the
    /// PCI device whose requester ID is at [`super::offset::ARG_SID`] and holds it for
    /// `count` milliseconds (1 to [`super::MAX_HOLD_MS`]) on a thread of its own. The
    /// request completes once the lock is held, so a vCPU that then touches that
    /// device's BAR or configuration space waits inside the VMM until the hold ends.
    /// `vector` and `mode` are not used.
    pub const HOLD_DEVICE: u32 = 14;
    /// An interrupt source outside the VMM: as [`REMAP_RETARGET`] (`mode` 0 or 1), but the
    /// IRTE is bound to an eventfd the host writes, as a device in another process would,
    /// so KVM delivers each interrupt with no VMM code on the way while the entry is
    /// retargeted every millisecond (each interrupt is written after at least one
    /// retarget since the one before, so `RESULT` is at least `count`). Then the host checks the binding's rules: binding the
    /// entry for another requester, or binding an entry that validates another requester,
    /// is refused; with the entry not present a write delivers nothing and is dropped (a
    /// not-present fault) when the entry is present again; then one more write is
    /// delivered at vCPU 0. `FIRED[cpu]` and `RESULT` as for [`REMAP_RETARGET`]; status
    /// [`super::status::NOT_DELIVERED`] when a rule is broken.
    pub const REMAP_EXTERNAL: u32 = 15;
}

/// The longest `HOLD_DEVICE` hold, in milliseconds.
pub const MAX_HOLD_MS: u32 = 60_000;

/// The most bystander interrupts a `STORM` request raises.
pub const MAX_BYSTANDERS: u32 = 1000;

/// Runs through each path in a `BENCH_THROUGHPUT` request.
pub const BENCH_RUNS: u32 = 5;
/// The most vectors a `BENCH_THROUGHPUT` request keeps in flight.
pub const MAX_BENCH_WINDOW: u32 = 64;

/// The requester ID (bus 0, device 31, function 0) the harness raises interrupts as.
pub const HARNESS_SOURCE_ID: u16 = 0x00f8;
/// Another requester (bus 1, device 0, function 0), for isolation tests.
pub const FOREIGN_SOURCE_ID: u16 = 0x0100;
/// The most vectors `REMAP_EACH_CPU` spreads its entries over.
pub const MAX_REMAP_VECTORS: u32 = 64;

/// Status codes written by the host.
pub mod status {
    /// The request completed as asked.
    pub const OK: u32 = 0;
    /// The request code is not known.
    pub const UNKNOWN_REQUEST: u32 = 1;
    /// An argument is out of range (vector below 32 or beyond 255 with its spread, count
    /// above [`super::MAX_COUNT`], mode out of range).
    pub const BAD_ARGUMENT: u32 = 2;
    /// An interrupt was fired but the guest's counter did not grow within the host's
    /// patience (it arrived elsewhere, or not at all). `FIRED` says how far it got.
    pub const NOT_DELIVERED: u32 = 3;
    /// The host could not set up the interrupt (route or irqfd failure).
    pub const HOST_ERROR: u32 = 4;
    /// The VM cannot do this (`SNAPSHOT` without a snapshot file).
    pub const UNAVAILABLE: u32 = 5;
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
