//! Requests through the interrupt core: the harness programs IRTEs through the core's
//! front door as a front end would (its requester, `0x00f8`), and raises them as a device
//! would, through the data path.

use irq::control::{EntryWrite, Writer};
use irq::InterruptControl;

use super::*;

impl Harness {
    pub(super) fn entry(&self, cpu: usize, vector: u8) -> Irte {
        let dest = self.apic_ids.get(cpu).copied().unwrap_or(0);
        Irte::new(
            Target::fixed(dest, vector),
            SourceValidation::RequesterId {
                sid: HARNESS_SOURCE_ID,
                qualifier: 0,
            },
        )
    }

    /// Allocates `count` entries and makes entry `i` what `entry_for(i)` says, in one
    /// transaction. Returns the first index and the route commits it took.
    pub(super) fn activate(
        &self,
        count: u32,
        entry_for: impl Fn(u32) -> Irte,
    ) -> Option<(u32, u64)> {
        let core = self.backing.handle();
        let route_commits = || self.backing.lock().stats().route_commits;
        let before = route_commits();
        let first = core
            .allocate(HARNESS_SOURCE_ID, count, AllocFlags::default())
            .ok()?;
        let writes: Vec<(u32, EntryWrite)> = (0..count)
            .map(|i| (first + i, EntryWrite::Entry(entry_for(i))))
            .collect();
        if core
            .write(Writer::Requester(HARNESS_SOURCE_ID), &writes)
            .is_err()
        {
            let _ = core.free(HARNESS_SOURCE_ID, first, count);
            return None;
        }
        Some((first, route_commits() - before))
    }

    pub(super) fn release(&self, first: u32, count: u32) -> bool {
        self.backing
            .handle()
            .free(HARNESS_SOURCE_ID, first, count)
            .is_ok()
    }

    pub(super) fn remap_each_cpu(
        &self,
        vector: u8,
        count: u32,
        spread: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let cpus = self.cpus();
        if count == 0 {
            return status::OK;
        }
        // `vector + spread - 1 <= 255` was checked with the request.
        let place = |i: u32| {
            let offset = u8::try_from((i / cpus) % spread).unwrap_or(0);
            (i % cpus, vector.wrapping_add(offset))
        };
        let Some((first, commits)) = self.activate(count, |i| {
            let (cpu, v) = place(i);
            self.entry(cpu as usize, v)
        }) else {
            return status::HOST_ERROR;
        };
        *result = u32::try_from(commits).unwrap_or(u32::MAX);
        let mut outcome = status::OK;
        // Rounds of entries with distinct (vCPU, vector): they cannot merge in a LAPIC.
        let round = cpus * spread;
        'rounds: for start in (0..count).step_by(round as usize) {
            let end = (start + round).min(count);
            let before: Vec<u32> = (start..end)
                .map(|i| {
                    let (cpu, v) = place(i);
                    self.counter(cpu as usize, v)
                })
                .collect();
            for i in start..end {
                if self.path.signal(first + i, HARNESS_SOURCE_ID).is_err() {
                    outcome = status::HOST_ERROR;
                    break 'rounds;
                }
                self.count_fired(place(i).0 as usize, fired);
            }
            for (&start, i) in before.iter().zip(start..end) {
                let (cpu, v) = place(i);
                if !self.wait_for(|| self.counter(cpu as usize, v).wrapping_sub(start) >= 1) {
                    outcome = status::NOT_DELIVERED;
                    break 'rounds;
                }
            }
        }
        if !self.release(first, count) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        if outcome == status::OK {
            let mut m = self
                .measurements
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            m.max_live_delivered = m.max_live_delivered.max(count);
        }
        outcome
    }

    pub(super) fn total(&self, vector: u8) -> Vec<u32> {
        (0..self.apic_ids.len())
            .map(|cpu| self.counter(cpu, vector))
            .collect()
    }

    /// Requests 3 and 15: with `external`, the entry is bound to an eventfd the harness
    /// writes, as a device outside the VMM would.
    pub(super) fn remap_retarget(
        &self,
        vector: u8,
        count: u32,
        anchors: bool,
        external: bool,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let cpus = self.cpus();
        // Entry 0 moves; entries 1..=cpus (with anchors) hold a line on every vCPU.
        let n = if anchors { cpus + 1 } else { 1 };
        let Some((first, _)) =
            self.activate(n, |i| self.entry(i.saturating_sub(1) as usize, vector))
        else {
            return status::HOST_ERROR;
        };
        let source = if external {
            match self.bind_external(first) {
                Some(fd) => Some(fd),
                None => {
                    self.release(first, n);
                    return status::HOST_ERROR;
                }
            }
        } else {
            None
        };
        let raise = || match &source {
            Some(fd) => fd.write(1).is_ok(),
            None => self.path.signal(first, HARNESS_SOURCE_ID).is_ok(),
        };
        let done = AtomicBool::new(false);
        let retargets = AtomicU64::new(0);
        let mut outcome = status::OK;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut cpu = 0u32;
                while !done.load(Ordering::Acquire) && !self.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    cpu = (cpu + 1) % cpus;
                    let entry = EntryWrite::Entry(self.entry(cpu as usize, vector));
                    let moved = self
                        .backing
                        .handle()
                        .write(Writer::Requester(HARNESS_SOURCE_ID), &[(first, entry)]);
                    if moved.is_ok() {
                        retargets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            let mut last = 0;
            for _ in 0..count {
                // An external source is raised only after a retarget since its last
                // interrupt, so every interrupt follows a move of its eventfd.
                if source.is_some() {
                    let moved = self.wait_for(|| retargets.load(Ordering::Relaxed) > last);
                    last = retargets.load(Ordering::Relaxed);
                    if !moved {
                        outcome = status::HOST_ERROR;
                        break;
                    }
                }
                let before = self.total(vector);
                if !raise() {
                    outcome = status::HOST_ERROR;
                    break;
                }
                let mut landed = None;
                let counted = self.wait_for(|| {
                    let now = self.total(vector);
                    landed = now.iter().zip(&before).position(|(a, b)| a != b);
                    landed.is_some()
                });
                match landed {
                    Some(cpu) if counted => self.count_fired(cpu, fired),
                    _ => {
                        outcome = status::NOT_DELIVERED;
                        break;
                    }
                }
            }
            done.store(true, Ordering::Release);
        });
        *result = u32::try_from(retargets.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        if let (Some(fd), status::OK) = (&source, outcome) {
            outcome = self.external_rules(first, fd, vector, fired);
        }
        if !self.release(first, n) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    pub(super) fn raise(&self, index: u32, count: u32, fired: &mut [u32], result: &mut u32) -> u32 {
        let entry = Irte::decode(self.backing.entry(index).raw, true)
            .ok()
            .filter(|e| e.present);
        let target = entry.and_then(|e| {
            let cpu = self.apic_ids.iter().position(|&id| id == e.target.dest)?;
            (!e.target.logical).then_some((cpu, e.target.vector))
        });
        for _ in 0..count {
            let start = target.map(|(cpu, v)| self.counter(cpu, v));
            if self.path.signal(index, HARNESS_SOURCE_ID).is_err() {
                continue;
            }
            let (Some((cpu, v)), Some(start)) = (target, start) else {
                return status::BAD_ARGUMENT;
            };
            self.count_fired(cpu, fired);
            *result += 1;
            if !self.wait_for(|| self.counter(cpu, v).wrapping_sub(start) >= 1) {
                return status::NOT_DELIVERED;
            }
        }
        status::OK
    }

    /// The vector `msg` delivers with right now (through its entry when remappable).
    pub(super) fn vector_of(&self, msg: &MsiMessage) -> Option<u8> {
        match msg.decode().ok()? {
            irq::msi::DecodedMsi::Compatibility(t) => Some(t.vector),
            d => {
                let raw = self.backing.entry(d.index()?).raw;
                let entry = Irte::decode(raw, true).ok().filter(|e| e.present)?;
                Some(entry.target.vector)
            }
        }
    }

    pub(super) fn raise_msi(
        &self,
        msg: MsiMessage,
        sid: u16,
        count: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        for _ in 0..count {
            let vector = self.vector_of(&msg);
            let before = vector.map(|v| self.total(v));
            if self.path.signal_msi(&msg, sid).is_err() {
                continue;
            }
            *result += 1;
            let (Some(v), Some(before)) = (vector, before) else {
                continue;
            };
            let mut landed = None;
            let counted = self.wait_for(|| {
                landed = self.total(v).iter().zip(&before).position(|(a, b)| a != b);
                landed.is_some()
            });
            match landed {
                Some(cpu) if counted => self.count_fired(cpu, fired),
                _ => return status::NOT_DELIVERED,
            }
        }
        status::OK
    }

    pub(super) fn storm(
        &self,
        vector: u8,
        count: u32,
        bystanders: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let bystander = vector.wrapping_add(1);
        let Some((first, _)) = self.activate(2, |i| {
            self.entry(0, if i == 0 { vector } else { bystander })
        }) else {
            return status::HOST_ERROR;
        };
        let stats = self.path.storm_stats();
        let before = stats.throttled;
        let every = (count / bystanders).max(1);
        // The bystander stays at half the limit however fast the host raises the storm,
        // so none of its interrupts may be coalesced.
        let pace = match stats.rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs(2) / rate,
        };
        let mut last_bystander: Option<Instant> = None;
        let mut raised = 0;
        let mut outcome = status::OK;
        let raise_bystander = |this: &Self, fired: &mut [u32], last: &mut Option<Instant>| {
            if let Some(wait) = last.and_then(|t| pace.checked_sub(t.elapsed())) {
                std::thread::sleep(wait);
            }
            *last = Some(Instant::now());
            let start = this.counter(0, bystander);
            if this.path.signal(first + 1, HARNESS_SOURCE_ID).is_err() {
                return status::HOST_ERROR;
            }
            this.count_fired(0, fired);
            if this.wait_for(|| this.counter(0, bystander).wrapping_sub(start) >= 1) {
                status::OK
            } else {
                status::NOT_DELIVERED
            }
        };
        for i in 1..=count {
            if self.path.signal(first, HARNESS_SOURCE_ID).is_err() {
                outcome = status::HOST_ERROR;
                break;
            }
            self.count_fired(0, fired);
            if i % every == 0
                && raised < bystanders
                && last_bystander.is_none_or(|t| t.elapsed() >= pace)
            {
                raised += 1;
                outcome = raise_bystander(self, fired, &mut last_bystander);
                if outcome != status::OK {
                    break;
                }
            }
        }
        while outcome == status::OK && raised < bystanders {
            raised += 1;
            outcome = raise_bystander(self, fired, &mut last_bystander);
        }
        // The storm's last, coalesced interrupt arrives with the next flush.
        let settle = Instant::now();
        let mut last = self.counter(0, vector);
        let mut still = Instant::now();
        while settle.elapsed() < Duration::from_secs(2) && still.elapsed() < STORM_SETTLE {
            std::thread::sleep(Duration::from_millis(1));
            let now = self.counter(0, vector);
            if now != last {
                last = now;
                still = Instant::now();
            }
        }
        *result = u32::try_from(self.path.storm_stats().throttled - before).unwrap_or(u32::MAX);
        if !self.release(first, 2) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    pub(super) fn remap_source_id(
        &self,
        vector: u8,
        count: u32,
        fired: &mut [u32],
        result: &mut u32,
    ) -> u32 {
        let Some((first, _)) = self.activate(1, |_| self.entry(0, vector)) else {
            return status::HOST_ERROR;
        };
        let log = self.path.fault_log();
        let before = log.count(FaultReason::SourceIdMismatch);
        let mut outcome = status::OK;
        for _ in 0..count {
            if self.path.signal(first, harness::FOREIGN_SOURCE_ID).is_ok() {
                outcome = status::HOST_ERROR;
            }
        }
        *result =
            u32::try_from(log.count(FaultReason::SourceIdMismatch) - before).unwrap_or(u32::MAX);
        let start = self.counter(0, vector);
        if self.path.signal(first, HARNESS_SOURCE_ID).is_ok() {
            self.count_fired(0, fired);
            if !self.wait_for(|| self.counter(0, vector).wrapping_sub(start) >= 1) {
                outcome = status::NOT_DELIVERED;
            }
        } else {
            outcome = status::HOST_ERROR;
        }
        if !self.release(first, 1) && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    /// Binds entry `first` (the harness's, live) to a new eventfd; returns the harness's
    /// copy.
    fn bind_external(&self, first: u32) -> Option<EventFd> {
        let fd = EventFd::new(EFD_NONBLOCK).ok()?;
        let core = self.backing.handle();
        core.bind_source(HARNESS_SOURCE_ID, first, fd.try_clone().ok()?)
            .ok()?;
        Some(fd)
    }

    /// After request 15's retargets: binding for a requester the entry does not verify
    /// (another requester's entry, an entry validating someone else) is refused; with
    /// the entry absent a write delivers nothing and is dropped as a fault when the entry
    /// is present again; then one more write is delivered (counted in `fired`).
    fn external_rules(&self, first: u32, fd: &EventFd, vector: u8, fired: &mut [u32]) -> u32 {
        let core = self.backing.handle();
        let spare = || EventFd::new(EFD_NONBLOCK).ok();
        let foreign_entry = Irte::new(
            Target::fixed(self.apic_ids.first().copied().unwrap_or(0), vector),
            SourceValidation::RequesterId {
                sid: harness::FOREIGN_SOURCE_ID,
                qualifier: 0,
            },
        );
        let Some((other, _)) = self.activate(1, |_| foreign_entry) else {
            return status::HOST_ERROR;
        };
        let refused = spare().is_some_and(|f| {
            core.bind_source(harness::FOREIGN_SOURCE_ID, first, f)
                .is_err()
        }) && spare()
            .is_some_and(|f| core.bind_source(HARNESS_SOURCE_ID, other, f).is_err());
        self.release(other, 1);
        if !refused {
            return status::NOT_DELIVERED;
        }
        let write = |e: EntryWrite| core.write(Writer::Requester(HARNESS_SOURCE_ID), &[(first, e)]);
        let before = self.total(vector);
        let faults = self.path.faults(first);
        if write(EntryWrite::Absent).is_err() || fd.write(1).is_err() {
            return status::HOST_ERROR;
        }
        std::thread::sleep(Duration::from_millis(20));
        let present = EntryWrite::Entry(self.entry(0, vector));
        if write(present).is_err() {
            return status::HOST_ERROR;
        }
        std::thread::sleep(Duration::from_millis(20));
        if self.total(vector) != before || self.path.faults(first) != faults.wrapping_add(1) {
            return status::NOT_DELIVERED;
        }
        let start = self.counter(0, vector);
        if fd.write(1).is_err() {
            return status::HOST_ERROR;
        }
        self.count_fired(0, fired);
        if self.wait_for(|| self.counter(0, vector).wrapping_sub(start) >= 1) {
            status::OK
        } else {
            status::NOT_DELIVERED
        }
    }
}
