//! The host side of the IRTE hypercall (`hypercall::abi`, `docs/hypercall.md`).
//!
//! A vCPU's `out` to the doorbell port reaches [`Dispatcher::call`] with the vCPU's
//! registers. Each call is validated completely before anything changes, then carried
//! out through the interrupt core's front door (`irq::control`), which allocates, moves
//! or frees the host interrupt behind the entry and can fail; its error reaches the guest
//! in RAX with the previous state intact.
//!
//! The requester a guest names must be one of the VM's devices, and an entry can be
//! changed only by the requester it was allocated to. Every entry the hypercall writes
//! verifies that requester (SVT 1, SQ 0), so a device can never raise another device's
//! interrupt.
//!
//! Calls are counted, timed, and rate-limited per VM: a guest hammering the port gets
//! `BUSY`, and the throttling is counted, never logged per call.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hypercall::abi::{alloc, batch, call, features, status, BatchEntry, Registers, TargetWord};
use irq::backing::{AllocFlags, BackingError};
use irq::control::{CoreHandle, EntryWrite, Writer};
use irq::irte::{Irte, SourceValidation};
use irq::msi::{DeliveryMode, MsiMessage, Target};
use irq::port::DoorbellVcpu;
use irq::RouteError;
use vm_memory::GuestAddress;

use crate::memory::SharedRam;

/// Answers a doorbell `out` that stopped `vcpu`, in the order KVM requires
/// ([`DoorbellVcpu::answer_call`]): reads the call's registers, has `handler` answer (a
/// 4-byte `out`, `is_call`), or answers `UNSUPPORTED` (a 1- or 2-byte `out`, counted by
/// the handler; also without a handler), and writes the results back. Returns the call
/// number (RAX's low 32 bits), for timing. An embedder's exit loop calls this for every
/// `out` to [`hypercall::platform::HYPERCALL_PORT`] and goes on running the vCPU. A
/// `VcpuFd` given `irq::kvm::share_registers` answers without an ioctl (the next
/// `KVM_RUN` carries the answer); otherwise the `out` is completed first and the
/// registers exchanged with two more.
///
/// # Errors
/// The kernel's error completing the `out` or exchanging the registers; the guest's
/// registers are unchanged then.
pub fn answer_doorbell(
    vcpu: &mut (impl DoorbellVcpu + ?Sized),
    handler: Option<&dyn HypercallHandler>,
    is_call: bool,
) -> std::io::Result<u32> {
    let mut number = 0;
    vcpu.answer_call(&mut |r: &mut [u64; 6]| {
        let [rax, rcx, rsi, rdi, r8, r9] = *r;
        number = u32::try_from(rax & 0xffff_ffff).unwrap_or(u32::MAX);
        let mut call = Registers {
            rax,
            rcx,
            rsi,
            rdi,
            r8,
            r9,
        };
        match handler {
            Some(h) if is_call => h.call(&mut call),
            Some(h) => {
                h.refused();
                call.rax = status::UNSUPPORTED;
            }
            None => call.rax = status::UNSUPPORTED,
        }
        *r = [call.rax, rcx, call.rsi, call.rdi, call.r8, call.r9];
    })?;
    Ok(number)
}

/// Something that answers hypercalls (the vCPU loop's view of the dispatcher).
pub trait HypercallHandler: Send + Sync {
    /// Handles one call: `regs` holds the guest's registers in and the results out.
    fn call(&self, regs: &mut Registers);
    /// The doorbell was rung with an `out` that is not a call (1 or 2 bytes); the guest
    /// is answered `UNSUPPORTED` without the handler. Counted by handlers that count.
    fn refused(&self) {}
}

impl std::fmt::Debug for dyn HypercallHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HypercallHandler")
    }
}

const CALLS: usize = 7;
const CALL_NAMES: [&str; CALLS] = [
    "query",
    "allocate",
    "update",
    "free",
    "batch",
    "compose",
    "set_features",
];

/// Counters of one call number.
#[derive(Debug, Default)]
struct CallCounters {
    calls: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
    max_nanos: AtomicU64,
}

/// What one call number did, for the run summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStats {
    /// The call's name.
    pub name: &'static str,
    /// Calls handled (throttled ones excluded).
    pub calls: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Mean host time per call.
    pub mean: Duration,
    /// Longest host time of one call.
    pub max: Duration,
}

/// The dispatcher's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HypercallStats {
    /// Per call number, for those that were called.
    pub calls: Vec<CallStats>,
    /// Calls with an unknown number, and doorbell rings of 1 or 2 bytes (not calls).
    pub unknown: u64,
    /// Calls refused with `BUSY` by the rate limit.
    pub throttled: u64,
}

/// A token bucket: `rate` calls per second, bursts of up to `rate / 10 + 1`.
#[derive(Debug)]
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = rate / 10.0 + 1.0;
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Maps an interrupt-core error to the status the guest sees.
/// Whether `e` is the host failing (a KVM call, an eventfd) rather than a limit: the
/// status `HOST_ERROR` names, for a driver that accepted it.
fn host_failure(e: &BackingError) -> bool {
    matches!(
        e,
        BackingError::EventFd(_)
            | BackingError::Route(
                RouteError::Commit(_) | RouteError::Assign { .. } | RouteError::Deassign { .. }
            )
    )
}

fn status_of(e: &BackingError) -> u64 {
    match e {
        BackingError::BadCount(_)
        | BackingError::IndexOutOfRange(_)
        | BackingError::AlreadyBound(_)
        | BackingError::NotBound(_) => status::INVALID_ARGUMENT,
        BackingError::NoSpace(_)
        | BackingError::RoutesExhausted
        | BackingError::EventFd(_)
        | BackingError::Route(_)
        | BackingError::HostRefused { .. } => status::NO_SPACE,
        BackingError::DeviceQuota { .. } | BackingError::VmQuota(_) => status::QUOTA_EXCEEDED,
        BackingError::NotAllocated(_) => status::NOT_ALLOCATED,
        BackingError::NotOwner { .. } | BackingError::NotVerified { .. } => {
            status::SOURCE_ID_NOT_PERMITTED
        }
    }
}

/// The hypercall dispatcher of one VM: a front end of the interrupt core, through its
/// front door (the core writes what a requester changes through to the VT-d unit's table,
/// `irq::control`).
pub struct Dispatcher {
    core: CoreHandle,
    mem: SharedRam,
    apic_ids: Vec<u32>,
    requesters: Vec<u16>,
    limit: Mutex<RateLimit>,
    /// The core's table size (fixed when the core is made).
    table_size: u32,
    counters: [CallCounters; CALLS],
    unknown: AtomicU64,
    throttled: AtomicU64,
    /// The negotiable features each requester's driver accepted (`SET_FEATURES`), in the
    /// order of `requesters`.
    accepted: Vec<AtomicU32>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("requesters", &self.requesters)
            .field("table_size", &self.table_size)
            .finish_non_exhaustive()
    }
}

type Outcome = Result<(), u64>;

/// A batch entry that passed its checks: its index and what it becomes.
type Parsed = (u32, Option<Irte>);

impl Dispatcher {
    /// A dispatcher over the interrupt core `core` for a VM with vCPUs `apic_ids`, guest
    /// RAM `mem`, the devices `requesters`, and at most `rate` calls per second.
    pub fn new(
        core: CoreHandle,
        mem: SharedRam,
        apic_ids: Vec<u32>,
        requesters: Vec<u16>,
        rate: u32,
    ) -> Self {
        Self {
            table_size: core.capacity(0).table_size,
            core,
            mem,
            apic_ids,
            accepted: requesters.iter().map(|_| AtomicU32::new(0)).collect(),
            requesters,
            limit: Mutex::new(RateLimit::new(rate)),
            counters: Default::default(),
            unknown: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        }
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> HypercallStats {
        let calls = self
            .counters
            .iter()
            .zip(CALL_NAMES)
            .filter(|(c, _)| c.calls.load(Ordering::Relaxed) > 0)
            .map(|(c, name)| {
                let calls = c.calls.load(Ordering::Relaxed);
                CallStats {
                    name,
                    calls,
                    errors: c.errors.load(Ordering::Relaxed),
                    mean: Duration::from_nanos(c.nanos.load(Ordering::Relaxed) / calls.max(1)),
                    max: Duration::from_nanos(c.max_nanos.load(Ordering::Relaxed)),
                }
            })
            .collect();
        HypercallStats {
            calls,
            unknown: self.unknown.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
        }
    }

    /// The negotiable features each requester's driver accepted (for a snapshot); only
    /// requesters with some.
    #[must_use]
    pub fn accepted_features(&self) -> Vec<(u16, u32)> {
        self.requesters
            .iter()
            .zip(&self.accepted)
            .map(|(r, a)| (*r, a.load(Ordering::Relaxed)))
            .filter(|(_, a)| *a != 0)
            .collect()
    }

    /// Restores what [`Self::accepted_features`] saved.
    ///
    /// # Errors
    /// A requester that is not a device of this VM, or a feature that is not negotiable;
    /// nothing is changed then.
    pub fn restore_accepted_features(&self, saved: &[(u16, u32)]) -> Result<(), String> {
        for (requester, features) in saved {
            if !self.requesters.contains(requester) || features & !features::NEGOTIABLE != 0 {
                return Err(format!(
                    "requester {requester:#06x} with features {features:#x} cannot be restored"
                ));
            }
        }
        for (requester, features) in saved {
            if let Some(a) = self.slot_of(*requester) {
                a.store(*features, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn slot_of(&self, requester: u16) -> Option<&AtomicU32> {
        let at = self.requesters.iter().position(|r| *r == requester)?;
        self.accepted.get(at)
    }

    /// The status of a refused change for `requester`: a host failure is `HOST_ERROR` to
    /// a driver that accepted it and `NO_SPACE` (ABI 1.0) to any other.
    fn status_for(&self, requester: u16, e: &BackingError) -> u64 {
        let accepted = self
            .slot_of(requester)
            .is_some_and(|a| a.load(Ordering::Relaxed) & features::HOST_ERROR != 0);
        if accepted && host_failure(e) {
            status::HOST_ERROR
        } else {
            status_of(e)
        }
    }

    fn set_features(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let wanted = u32::try_from(regs.rsi)
            .ok()
            .filter(|f| f & !features::NEGOTIABLE == 0)
            .ok_or(status::INVALID_ARGUMENT)?;
        if let Some(a) = self.slot_of(requester) {
            a.store(wanted, Ordering::Relaxed);
        }
        regs.rsi = u64::from(wanted);
        regs.rdi = u64::from(hypercall::abi::MINOR_VERSION);
        Ok(())
    }

    fn requester(&self, regs: &Registers) -> Result<u16, u64> {
        u16::try_from(regs.rcx)
            .ok()
            .filter(|r| self.requesters.contains(r))
            .ok_or(status::SOURCE_ID_NOT_PERMITTED)
    }

    fn index(&self, value: u64) -> Result<u32, u64> {
        u32::try_from(value)
            .ok()
            .filter(|&i| i < self.table_size)
            .ok_or(status::INVALID_ARGUMENT)
    }

    /// The entry `word` describes for `requester`: `None` to deactivate.
    fn parse_target(&self, word: u64, requester: u16) -> Result<Option<Irte>, u64> {
        let word = TargetWord::decode(word).map_err(|_| status::INVALID_ARGUMENT)?;
        if !word.present {
            return Ok(None);
        }
        let delivery = DeliveryMode::from_bits(word.delivery).ok_or(status::INVALID_ARGUMENT)?;
        if matches!(
            delivery,
            DeliveryMode::Smi | DeliveryMode::Init | DeliveryMode::ExtInt
        ) {
            return Err(status::UNSUPPORTED);
        }
        if !word.logical && !self.apic_ids.contains(&word.dest) {
            return Err(status::INVALID_ARGUMENT);
        }
        let target = Target {
            dest: word.dest,
            vector: word.vector,
            delivery,
            level: word.level,
            logical: word.logical,
            redirection_hint: word.redirection_hint,
        };
        let validation = SourceValidation::RequesterId {
            sid: requester,
            qualifier: 0,
        };
        Ok(Some(Irte::new(target, validation)))
    }

    /// Checks that `index` is allocated to `requester`.
    fn owned(&self, index: u32, requester: u16) -> Outcome {
        match self.core.entry(index).owner {
            None => Err(status::NOT_ALLOCATED),
            Some((owner, _)) if owner != requester => Err(status::SOURCE_ID_NOT_PERMITTED),
            Some(_) => Ok(()),
        }
    }

    fn query(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let capacity = self.core.capacity(requester);
        regs.rsi = u64::from(capacity.table_size);
        regs.rdi = u64::from(capacity.free_entries);
        regs.r8 = u64::from(capacity.quota_left);
        regs.r9 = u64::from(capacity.best_effort_routes_left);
        Ok(())
    }

    fn allocate(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let count = u32::try_from(regs.rsi).map_err(|_| status::INVALID_ARGUMENT)?;
        if regs.rdi & !alloc::ALL != 0 {
            return Err(status::INVALID_ARGUMENT);
        }
        let flags = AllocFlags {
            managed: regs.rdi & alloc::MANAGED != 0,
            aligned: regs.rdi & alloc::ALIGNED != 0,
        };
        let first = self
            .core
            .allocate(requester, count, flags)
            .map_err(|e| self.status_for(requester, &e))?;
        regs.rsi = u64::from(first);
        Ok(())
    }

    fn update(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let index = self.index(regs.rsi)?;
        let entry = self.parse_target(regs.rdi, requester)?;
        // The core checks the entry is the requester's, then applies it (or nothing).
        self.core
            .write(Writer::Requester(requester), &[(index, write_of(entry))])
            .map_err(|e| self.status_for(requester, &e))
    }

    fn free(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let first = self.index(regs.rsi)?;
        let count = u32::try_from(regs.rdi).map_err(|_| status::INVALID_ARGUMENT)?;
        if count == 0 {
            return Err(status::INVALID_ARGUMENT);
        }
        self.core
            .free(requester, first, count)
            .map_err(|e| self.status_for(requester, &e))
    }

    fn compose(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let index = self.index(regs.rsi)?;
        self.owned(index, requester)?;
        let handle = u16::try_from(index).map_err(|_| status::INVALID_ARGUMENT)?;
        let msg = MsiMessage::remappable(handle, None);
        regs.rsi = msg.address;
        regs.rdi = u64::from(msg.data);
        Ok(())
    }

    /// Checks each batch entry (index, target, and with `ownership` its owner); returns
    /// each entry's status and the parsed entries, or the first entry's error.
    fn check_batch(
        &self,
        entries: &[(u32, u64)],
        requester: u16,
        ownership: bool,
    ) -> (Vec<u64>, Result<Vec<Parsed>, u64>) {
        let mut statuses = vec![status::OK; entries.len()];
        let mut first_error = None;
        let mut parsed = Vec::with_capacity(entries.len());
        for (i, &(index, word)) in entries.iter().enumerate() {
            let checked = if index < self.table_size {
                let owned = if ownership {
                    self.owned(index, requester)
                } else {
                    Ok(())
                };
                owned.and_then(|()| self.parse_target(word, requester))
            } else {
                Err(status::INVALID_ARGUMENT)
            };
            match checked {
                Ok(entry) => parsed.push((index, entry)),
                Err(e) => {
                    if let Some(s) = statuses.get_mut(i) {
                        *s = e;
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => (statuses, Err(e)),
            None => (statuses, Ok(parsed)),
        }
    }

    fn batch(&self, regs: &mut Registers) -> Outcome {
        let requester = self.requester(regs)?;
        let (base, count) = (regs.rsi, regs.rdi);
        if count == 0 || count > batch::MAX_ENTRIES {
            return Err(status::INVALID_ARGUMENT);
        }
        if base % batch::ALIGN != 0 {
            return Err(status::BAD_GUEST_ADDRESS);
        }
        // `count` is at most MAX_ENTRIES, so these fit.
        let entries = usize::try_from(count).map_err(|_| status::INVALID_ARGUMENT)?;
        let entry_size = usize::try_from(batch::ENTRY_SIZE).unwrap_or(16);
        let len = entries * entry_size;
        let mut raw = vec![0u8; len];
        base.checked_add(len as u64)
            .ok_or(status::BAD_GUEST_ADDRESS)?;
        self.mem
            .read(GuestAddress(base), &mut raw)
            .map_err(|_| status::BAD_GUEST_ADDRESS)?;
        let entries_read: Vec<(u32, u64)> = raw
            .chunks_exact(entry_size)
            .map(|chunk| {
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(chunk);
                let e = BatchEntry::from_bytes(&bytes);
                (e.index, e.target)
            })
            .collect();
        // Ownership is the core's to check, all or none, with the writes: the entries are
        // looked up one by one only when it refuses, for their statuses.
        let (mut statuses, mut result) = self.check_batch(&entries_read, requester, false);
        if result.is_err() {
            // Every entry's own status, in the order the ABI gives them.
            (statuses, result) = self.check_batch(&entries_read, requester, true);
        } else if let Ok(parsed) = &result {
            let writes: Vec<(u32, EntryWrite)> = parsed
                .iter()
                .map(|(index, entry)| (*index, write_of(*entry)))
                .collect();
            let written = self.core.write(Writer::Requester(requester), &writes);
            result = match written {
                Ok(()) => Ok(Vec::new()),
                Err(e @ (BackingError::NotOwner { .. } | BackingError::NotAllocated(_))) => {
                    let (owned, checked) = self.check_batch(&entries_read, requester, true);
                    statuses = owned;
                    checked.and(Err(self.status_for(requester, &e)))
                }
                Err(e) => Err(self.status_for(requester, &e)),
            };
        }
        let result = result.map(|_| ());
        if result.is_err() {
            for s in statuses.iter_mut().filter(|s| **s == status::OK) {
                *s = status::NOT_APPLIED;
            }
        }
        let words: Vec<(GuestAddress, u32)> = statuses
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let at = base + i as u64 * batch::ENTRY_SIZE + BatchEntry::STATUS_OFFSET;
                (GuestAddress(at), u32::try_from(*s).unwrap_or(u32::MAX))
            })
            .collect();
        // The range was read a moment ago; a failed write means the VM is going away.
        self.mem.write_words(&words);
        regs.rsi = if result.is_ok() { count } else { 0 };
        result
    }
}

/// What a parsed target word writes: the entry, or (deactivation) nothing present.
fn write_of(entry: Option<Irte>) -> EntryWrite {
    entry.map_or(EntryWrite::Absent, EntryWrite::Entry)
}

impl HypercallHandler for Dispatcher {
    fn refused(&self) {
        self.unknown.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: "irvm::hypercall", kind = "refused", reason = "a doorbell access that is not a call");
    }

    fn call(&self, regs: &mut Registers) {
        if !self
            .limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            irq::warn_limited!("hypercalls over their rate: answered BUSY");
            tracing::info!(target: "irvm::hypercall", kind = "busy", number = regs.rax, requester = regs.rcx);
            regs.rax = status::BUSY;
            return;
        }
        let number = regs.rax & 0xffff_ffff;
        let args = *regs;
        let begin = Instant::now();
        let outcome = match u32::try_from(number).unwrap_or(u32::MAX) {
            call::QUERY => self.query(regs),
            call::ALLOCATE => self.allocate(regs),
            call::UPDATE => self.update(regs),
            call::FREE => self.free(regs),
            call::BATCH => self.batch(regs),
            call::COMPOSE => self.compose(regs),
            call::SET_FEATURES => self.set_features(regs),
            _ => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
                regs.rax = status::UNSUPPORTED;
                tracing::info!(
                    target: "irvm::hypercall",
                    kind = "call",
                    name = "unknown",
                    number,
                    requester = args.rcx,
                    status = regs.rax,
                );
                return;
            }
        };
        let nanos = u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Some(c) = self.counters.get(number as usize) {
            c.calls.fetch_add(1, Ordering::Relaxed);
            c.nanos.fetch_add(nanos, Ordering::Relaxed);
            c.max_nanos.fetch_max(nanos, Ordering::Relaxed);
            if outcome.is_err() {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        regs.rax = match outcome {
            Ok(()) => status::OK,
            Err(e) => e,
        };
        tracing::info!(
            target: "irvm::hypercall",
            kind = "call",
            name = CALL_NAMES.get(number as usize).copied().unwrap_or("unknown"),
            number,
            requester = %format_args!("{:#06x}", args.rcx),
            args = %format_args!("[{:#x}, {:#x}, {:#x}]", args.rsi, args.rdi, args.r8),
            status = regs.rax,
            results = %format_args!("[{:#x}, {:#x}, {:#x}, {:#x}]", regs.rsi, regs.rdi, regs.r8, regs.r9),
            duration_ns = nanos,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use irq::backing::Limits;
    use irq::fake::{Failures, FakeRouting};
    use irq::Irqchip;
    use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use hypercall::abi::target;

    const ME: u64 = 0x00f8;
    const OTHER: u64 = 0x0100;

    fn dispatcher(limit: u32, rate: u32) -> (Dispatcher, Arc<FakeRouting>, GuestMemoryMmap) {
        let limits = Limits {
            table_size: 256,
            ..Limits::default()
        };
        let (core, kvm) = irq::fake::core(Irqchip::InKernel, limit, limits);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (
            Dispatcher::new(
                core.handle(),
                Arc::new(GuestMemoryAtomic::new(mem.clone())),
                vec![0, 1],
                vec![0x00f8, 0x0100],
                rate,
            ),
            kvm,
            mem,
        )
    }

    fn call(d: &Dispatcher, number: u32, requester: u64, a: u64, b: u64) -> Registers {
        let mut regs = Registers {
            rax: u64::from(number),
            rcx: requester,
            rsi: a,
            rdi: b,
            r8: 7,
            r9: 7,
        };
        d.call(&mut regs);
        regs
    }

    #[test]
    fn allocate_activate_retarget_deactivate_free() {
        let (d, kvm, _) = dispatcher(4096, 1_000_000);
        let r = call(&d, call::ALLOCATE, ME, 2, 0);
        assert_eq!((r.rax, r.rsi), (status::OK, 0));
        assert_eq!(
            call(&d, call::UPDATE, ME, 1, target::fixed(0, 0x40)).rax,
            status::OK
        );
        assert_eq!(kvm.irqfds(), 1);
        assert_eq!(
            call(&d, call::UPDATE, ME, 1, target::fixed(1, 0x41)).rax,
            status::OK
        );
        assert_eq!(kvm.msi_routes(), 1, "sole user: rewritten in place");
        assert_eq!(call(&d, call::UPDATE, ME, 1, 0).rax, status::OK);
        assert_eq!(kvm.irqfds(), 0);
        let r = call(&d, call::COMPOSE, ME, 1, 0);
        assert_eq!(
            (r.rax, r.rsi, r.rdi),
            (status::OK, MsiMessage::remappable(1, None).address, 0)
        );
        assert_eq!(call(&d, call::FREE, ME, 0, 2).rax, status::OK);
        assert_eq!(
            call(&d, call::UPDATE, ME, 1, target::fixed(0, 0x40)).rax,
            status::NOT_ALLOCATED
        );
        let stats = d.stats();
        assert_eq!(
            stats
                .calls
                .iter()
                .find(|c| c.name == "update")
                .map(|c| (c.calls, c.errors)),
            Some((4, 1))
        );
    }

    #[test]
    fn each_bad_input_gets_its_documented_status_and_changes_nothing() {
        let (d, kvm, _) = dispatcher(4096, 1_000_000);
        let idx = call(&d, call::ALLOCATE, ME, 1, 0).rsi;
        let good = target::fixed(0, 0x40);
        let cases = [
            (call::UPDATE, ME, 999, good, status::INVALID_ARGUMENT),
            (
                call::UPDATE,
                ME,
                idx,
                target::fixed(0, 15),
                status::INVALID_ARGUMENT,
            ),
            (
                call::UPDATE,
                ME,
                idx,
                target::fixed(9, 0x40),
                status::INVALID_ARGUMENT,
            ),
            (
                call::UPDATE,
                ME,
                idx,
                good | (1 << 20),
                status::INVALID_ARGUMENT,
            ),
            (call::UPDATE, ME, idx, 1, status::INVALID_ARGUMENT),
            (
                call::UPDATE,
                ME,
                idx,
                good | (3 << 8),
                status::INVALID_ARGUMENT,
            ),
            (call::UPDATE, ME, idx, good | (7 << 8), status::UNSUPPORTED),
            (
                call::UPDATE,
                OTHER,
                idx,
                good,
                status::SOURCE_ID_NOT_PERMITTED,
            ),
            (
                call::UPDATE,
                0x1_0000,
                idx,
                good,
                status::SOURCE_ID_NOT_PERMITTED,
            ),
            (call::ALLOCATE, ME, 0, 0, status::INVALID_ARGUMENT),
            (call::ALLOCATE, ME, 257, 0, status::INVALID_ARGUMENT),
            (call::ALLOCATE, ME, 1 << 40, 0, status::INVALID_ARGUMENT),
            (call::ALLOCATE, ME, 1, 4, status::INVALID_ARGUMENT),
            (call::FREE, ME, idx, 0, status::INVALID_ARGUMENT),
            (call::FREE, OTHER, idx, 1, status::SOURCE_ID_NOT_PERMITTED),
            (call::COMPOSE, ME, idx + 1, 0, status::NOT_ALLOCATED),
            (call::BATCH, ME, 0x1000, 0, status::INVALID_ARGUMENT),
            (call::BATCH, ME, 0x1000, 4097, status::INVALID_ARGUMENT),
            (call::BATCH, ME, 0x1008, 1, status::BAD_GUEST_ADDRESS),
            (
                call::BATCH,
                ME,
                (1 << 20) - 16,
                2,
                status::BAD_GUEST_ADDRESS,
            ),
            (call::BATCH, ME, u64::MAX - 15, 1, status::BAD_GUEST_ADDRESS),
            (77, ME, 0, 0, status::UNSUPPORTED),
        ];
        for (number, requester, a, b, want) in cases {
            let r = call(&d, number, requester, a, b);
            assert_eq!(r.rax, want, "call {number} {a:#x} {b:#x}");
            if want != status::OK && number != call::BATCH {
                assert_eq!(
                    (r.rsi, r.rdi, r.r8, r.r9),
                    (a, b, 7, 7),
                    "a failed call changes nothing but RAX"
                );
            }
        }
        assert_eq!(kvm.irqfds(), 0);
        assert_eq!(d.stats().unknown, 1);
    }

    #[test]
    fn a_batch_is_all_or_nothing_with_a_status_per_entry() {
        let (d, kvm, mem) = dispatcher(4096, 1_000_000);
        let first = call(&d, call::ALLOCATE, ME, 4, 0).rsi;
        let put = |i: u64, index: u64, word: u64| {
            mem.write_obj(u32::try_from(index).unwrap(), GuestAddress(0x1000 + 16 * i))
                .unwrap();
            mem.write_obj(word, GuestAddress(0x1008 + 16 * i)).unwrap();
        };
        let status_of = |i: u64| mem.read_obj::<u32>(GuestAddress(0x1004 + 16 * i)).unwrap();
        for i in 0..4 {
            put(i, first + i, target::fixed((i % 2) as u32, 0x50));
        }
        let r = call(&d, call::BATCH, ME, 0x1000, 4);
        assert_eq!((r.rax, r.rsi), (status::OK, 4));
        assert_eq!(
            kvm.set_calls(),
            2,
            "the initial table and one commit for 4 entries"
        );
        assert_eq!((0..4).map(status_of).collect::<Vec<_>>(), vec![0; 4]);
        put(1, first + 1, target::fixed(0, 3));
        put(3, first + 3, 0);
        let r = call(&d, call::BATCH, ME, 0x1000, 4);
        assert_eq!((r.rax, r.rsi), (status::INVALID_ARGUMENT, 0));
        assert_eq!((0..4).map(status_of).collect::<Vec<_>>(), vec![9, 1, 9, 9]);
        assert_eq!(kvm.irqfds(), 2, "nothing was applied");
        // A KVM failure during the commit is an error for every entry, and changes nothing.
        put(1, first + 1, target::fixed(1, 0x77));
        kvm.fail(Failures {
            set_routes: 1,
            ..Failures::default()
        });
        let r = call(&d, call::BATCH, ME, 0x1000, 4);
        assert_eq!(r.rax, status::NO_SPACE);
        assert_eq!((0..4).map(status_of).collect::<Vec<_>>(), vec![9; 4]);
        assert_eq!(kvm.irqfds(), 2);
    }

    /// ABI 1.1: a KVM failure is `HOST_ERROR` only to a driver that accepted it, and
    /// `NO_SPACE` (1.0) to every other; a full table stays `NO_SPACE` for both.
    #[test]
    fn host_failures_are_host_error_only_for_drivers_that_accept_it() {
        let (d, kvm, _) = dispatcher(4096, 1_000_000);
        let e = call(&d, call::ALLOCATE, ME, 1, 0).rsi;
        let theirs = call(&d, call::ALLOCATE, OTHER, 1, 0).rsi;
        let r = call(
            &d,
            call::SET_FEATURES,
            ME,
            u64::from(features::HOST_ERROR),
            0,
        );
        assert_eq!(
            (r.rax, r.rsi, r.rdi),
            (status::OK, u64::from(features::HOST_ERROR), 1)
        );
        for (who, entry, want) in [
            (ME, e, status::HOST_ERROR),
            (OTHER, theirs, status::NO_SPACE),
        ] {
            kvm.fail(Failures {
                set_routes: 1,
                ..Failures::default()
            });
            let r = call(
                &d,
                call::UPDATE,
                who,
                entry,
                target::fixed(1, 0x60 + u8::try_from(entry).unwrap()),
            );
            assert_eq!(r.rax, want, "requester {who:#x}");
            assert!(status::retryable(r.rax) == (want == status::HOST_ERROR));
            let again = call(
                &d,
                call::UPDATE,
                who,
                entry,
                target::fixed(1, 0x60 + u8::try_from(entry).unwrap()),
            );
            assert_eq!(again.rax, status::OK, "the retry");
        }
        kvm.fail(Failures {
            assign: 1,
            ..Failures::default()
        });
        let fresh = call(&d, call::ALLOCATE, ME, 1, 0).rsi;
        let r = call(&d, call::UPDATE, ME, fresh, target::fixed(0, 0x70));
        assert_eq!(r.rax, status::HOST_ERROR, "an irqfd refused");
        // A full table is not the host failing.
        let r = call(&d, call::ALLOCATE, ME, 256, 0);
        assert_eq!(r.rax, status::NO_SPACE);
        // Withdrawn, and refused when out of range or for a stranger.
        assert_eq!(call(&d, call::SET_FEATURES, ME, 0, 0).rsi, 0);
        kvm.fail(Failures {
            set_routes: 1,
            ..Failures::default()
        });
        let r = call(&d, call::UPDATE, ME, e, target::fixed(1, 0x71));
        assert_eq!(r.rax, status::NO_SPACE);
        let r = call(&d, call::SET_FEATURES, ME, 1 << 5, 9);
        assert_eq!((r.rax, r.rsi, r.rdi), (status::INVALID_ARGUMENT, 1 << 5, 9));
        let r = call(&d, call::SET_FEATURES, 0x1234, 0, 0);
        assert_eq!(r.rax, status::SOURCE_ID_NOT_PERMITTED);
        assert!(d.accepted_features().is_empty());
        d.restore_accepted_features(&[(0x00f8, features::HOST_ERROR)])
            .unwrap();
        assert_eq!(d.accepted_features(), vec![(0x00f8, features::HOST_ERROR)]);
        d.restore_accepted_features(&[(0x1234, features::HOST_ERROR)])
            .unwrap_err();
        d.restore_accepted_features(&[(0x00f8, 1 << 7)])
            .unwrap_err();
        assert_eq!(d.accepted_features(), vec![(0x00f8, features::HOST_ERROR)]);
    }

    /// An entry of another requester or not allocated: each entry's own status, the first
    /// one's error in RAX, nothing applied (whether a bad target comes after it or not).
    #[test]
    fn a_batch_names_entries_it_may_not_touch() {
        let (d, kvm, mem) = dispatcher(4096, 1_000_000);
        let mine = call(&d, call::ALLOCATE, ME, 2, 0).rsi;
        let theirs = call(&d, call::ALLOCATE, OTHER, 1, 0).rsi;
        let put = |i: u64, index: u64, word: u64| {
            mem.write_obj(u32::try_from(index).unwrap(), GuestAddress(0x2000 + 16 * i))
                .unwrap();
            mem.write_obj(word, GuestAddress(0x2008 + 16 * i)).unwrap();
        };
        let statuses = |n: u64| {
            (0..n)
                .map(|i| mem.read_obj::<u32>(GuestAddress(0x2004 + 16 * i)).unwrap())
                .collect::<Vec<_>>()
        };
        put(0, mine, target::fixed(0, 0x50));
        put(1, theirs, target::fixed(0, 0x51));
        put(2, mine + 1, target::fixed(0, 3));
        let r = call(&d, call::BATCH, ME, 0x2000, 3);
        assert_eq!(r.rax, status::SOURCE_ID_NOT_PERMITTED);
        assert_eq!(statuses(3), vec![9, 5, 1]);
        put(1, 200, target::fixed(0, 0x51));
        let r = call(&d, call::BATCH, ME, 0x2000, 2);
        assert_eq!(r.rax, status::NOT_ALLOCATED);
        assert_eq!(statuses(2), vec![9, 6]);
        assert_eq!(kvm.irqfds(), 0, "nothing was applied");
    }

    #[test]
    fn query_reports_limits_and_what_is_left() {
        let (d, _, _) = dispatcher(24 + 10, 1_000_000);
        call(&d, call::ALLOCATE, ME, 3, alloc::MANAGED);
        let r = call(&d, call::QUERY, ME, 0, 0);
        assert_eq!((r.rax, r.rsi, r.rdi, r.r9), (status::OK, 256, 253, 7));
        assert_eq!(
            call(&d, call::QUERY, 0x1234, 0, 0).rax,
            status::SOURCE_ID_NOT_PERMITTED
        );
    }

    #[test]
    fn hammering_is_throttled_and_counted() {
        let (d, _, _) = dispatcher(4096, 10);
        let busy = (0..100)
            .filter(|_| call(&d, call::QUERY, ME, 0, 0).rax == status::BUSY)
            .count();
        assert!(busy >= 95, "{busy}");
        assert_eq!(d.stats().throttled, busy as u64);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(call(&d, call::QUERY, ME, 0, 0).rax, status::OK);
    }
}
