//! The benchmark requests: interrupts through a slot-array IMS device (its slot's message,
//! the remapping core, the entry's line) beside raw irqfds on plain MSI routes to the same
//! vCPU and vector, timed by the host from the raise until the guest's handler has counted
//! the interrupt. The timings are kept for `vmm bench`; the guest learns only whether
//! everything was delivered.
//!
//! The host spins on the guest's counter while it waits (no sleeping, which would round
//! every figure up to the timer's granularity), so a request keeps one host CPU busy.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use devices::ims::slots::RaiseSlot;
use hypercall::harness::{status, BENCH_RUNS};
use vmm_sys_util::eventfd::EventFd;

use super::{Harness, DELIVERY_PATIENCE};

/// The most samples a run keeps of each kind (a guest may ask again and again).
const MAX_KEPT: usize = 1 << 20;
/// The most hypercall-timing phases a run keeps.
const MAX_PHASES: usize = 128;

/// Appends `more` to `to` up to [`MAX_KEPT`].
fn keep<T>(to: &mut Vec<T>, more: impl IntoIterator<Item = T>) {
    let room = MAX_KEPT.saturating_sub(to.len());
    to.extend(more.into_iter().take(room));
}

/// What the benchmark requests measured in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Measurements {
    /// Delivery latency through an IMS slot and the remapping core, one per sample.
    pub delivery_ours: Vec<Duration>,
    /// Delivery latency through a raw irqfd on a plain MSI route, one per sample.
    pub delivery_raw: Vec<Duration>,
    /// Delivery latency through an IMS slot of a device in another process (its
    /// entry's eventfd), one per sample.
    pub delivery_remote: Vec<Duration>,
    /// The raw irqfd samples taken beside [`Self::delivery_remote`].
    pub delivery_remote_raw: Vec<Duration>,
    /// Throughput runs through IMS slots: interrupts, and how long they took.
    pub throughput_ours: Vec<(u32, Duration)>,
    /// Throughput runs through raw irqfds.
    pub throughput_raw: Vec<(u32, Duration)>,
    /// The largest `REMAP_EACH_CPU` request whose entries were all live at once and all
    /// delivered.
    pub max_live_delivered: u32,
    /// `UPDATE` hypercalls (the VMM's share and the round trip of each), by the live
    /// interrupts they ran with.
    pub retarget: Vec<(u32, Vec<ExitTimes>)>,
    /// `BATCH` hypercalls of one entry, the same way.
    pub batch_of_one: Vec<(u32, Vec<ExitTimes>)>,
    /// Exits to the exit floor's port made by the same guest code, the same way.
    pub null_exit: Vec<(u32, Vec<ExitTimes>)>,
}

/// One timed exit: the VMM's share (exit to re-entry) and the round trip (exit to the
/// vCPU's next exit).
pub type ExitTimes = (Duration, Duration);

/// Where one benchmark interrupt comes from.
enum Source<'a> {
    /// Slot `first + k` of an IMS device.
    Slots(&'a dyn RaiseSlot, usize),
    /// Raw irqfd `k`.
    Raw(&'a [(irq::Gsi, EventFd)]),
}

impl Source<'_> {
    /// Raises interrupt `k` of the source; false if it could not be raised.
    fn raise(&self, k: usize) -> bool {
        match self {
            Self::Slots(dev, first) => {
                dev.raise_slot(first + k);
                true
            }
            Self::Raw(lines) => lines.get(k).is_some_and(|(_, fd)| fd.write(1).is_ok()),
        }
    }
}

impl Harness {
    fn slot_device(&self, sid: u16) -> Option<Arc<dyn RaiseSlot>> {
        self.slot_devices
            .iter()
            .find(|(rid, _)| *rid == sid)
            .map(|(_, dev)| dev.clone())
    }

    fn record(&self, f: impl FnOnce(&mut Measurements)) {
        f(&mut self
            .measurements
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }

    /// Spins until `done` holds (true), or the VM stops or patience runs out (false).
    fn spin_until(&self, mut done: impl FnMut() -> bool) -> bool {
        let begin = Instant::now();
        let mut polls = 0u32;
        loop {
            if done() {
                return true;
            }
            polls = polls.wrapping_add(1);
            if polls % 4096 == 0
                && (self.stop.load(Ordering::Relaxed) || begin.elapsed() > DELIVERY_PATIENCE)
            {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Raises interrupt `k` of `source` (vector `vector` on vCPU 0) and waits until the
    /// guest counted it; returns how long that took.
    fn time_one(&self, source: &Source<'_>, k: usize, vector: u8) -> Result<Duration, u32> {
        let before = self.counter(0, vector);
        let begin = Instant::now();
        if !source.raise(k) {
            return Err(status::HOST_ERROR);
        }
        if self.spin_until(|| self.counter(0, vector) != before) {
            Ok(begin.elapsed())
        } else {
            Err(status::NOT_DELIVERED)
        }
    }

    pub(super) fn bench_hypercalls(&self, mode: u32, live: u32, result: &mut u32) -> u32 {
        let Some(times) = &self.hypercall_times else {
            return status::HOST_ERROR;
        };
        if mode == 1 {
            times.start();
            return status::OK;
        }
        let number = match mode {
            0 => hypercall::abi::call::UPDATE,
            2 => hypercall::abi::call::BATCH,
            3 => crate::vcpu::NULL_EXIT,
            _ => return status::BAD_ARGUMENT,
        };
        let kept: Vec<ExitTimes> = times
            .take()
            .into_iter()
            .filter(|t| t.number == number)
            .map(|t| (t.share, t.round_trip))
            .collect();
        *result = u32::try_from(kept.len()).unwrap_or(u32::MAX);
        self.record(|m| {
            let phases = match mode {
                0 => &mut m.retarget,
                2 => &mut m.batch_of_one,
                _ => &mut m.null_exit,
            };
            if phases.len() < MAX_PHASES {
                phases.push((live, kept));
            }
        });
        status::OK
    }

    /// Raises one plain MSI with `vector` at vCPU 0 (the wake-up after a benchmark
    /// request).
    pub(super) fn wake(&self, vector: u8) {
        let Some(&apic) = self.apic_ids.first() else {
            return;
        };
        if let Ok(lines) = self.attach(&[(apic, vector)]) {
            for (_, fd) in &lines {
                let _ = fd.write(1);
            }
            let _ = self.detach(lines);
        }
    }

    pub(super) fn bench_delivery(
        &self,
        vector: u8,
        count: u32,
        slot: u32,
        sid: u16,
        fired: &mut [u32],
    ) -> u32 {
        let (Some(dev), Some(&apic)) = (self.slot_device(sid), self.apic_ids.first()) else {
            return status::BAD_ARGUMENT;
        };
        let Ok(lines) = self.attach(&[(apic, vector)]) else {
            return status::HOST_ERROR;
        };
        let ours = Source::Slots(&*dev, slot as usize);
        let raw = Source::Raw(&lines);
        let mut times = (Vec::new(), Vec::new());
        let mut outcome = status::OK;
        'samples: for i in 0..count {
            // Alternate which path goes first, so neither always follows the other.
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_ours in order {
                let source = if is_ours { &ours } else { &raw };
                self.count_fired(0, fired);
                match self.time_one(source, 0, vector) {
                    Ok(t) if is_ours => times.0.push(t),
                    Ok(t) => times.1.push(t),
                    Err(e) => {
                        outcome = e;
                        break 'samples;
                    }
                }
            }
        }
        if self.detach(lines).is_err() && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        let remote = self.remote_sids.contains(&sid);
        self.record(|m| {
            if remote {
                keep(&mut m.delivery_remote, times.0);
                keep(&mut m.delivery_remote_raw, times.1);
            } else {
                keep(&mut m.delivery_ours, times.0);
                keep(&mut m.delivery_raw, times.1);
            }
        });
        outcome
    }

    pub(super) fn bench_throughput(
        &self,
        vector: u8,
        count: u32,
        first_slot: u32,
        window: u32,
        sid: u16,
        fired: &mut [u32],
    ) -> u32 {
        let (Some(dev), Some(&apic)) = (self.slot_device(sid), self.apic_ids.first()) else {
            return status::BAD_ARGUMENT;
        };
        // The request's check keeps `vector + window - 1` within 255.
        let vectors: Vec<u8> = (0..window)
            .filter_map(|k| u8::try_from(u32::from(vector) + k).ok())
            .collect();
        let targets: Vec<(u32, u8)> = vectors.iter().map(|&v| (apic, v)).collect();
        let Ok(lines) = self.attach(&targets) else {
            return status::HOST_ERROR;
        };
        let ours = Source::Slots(&*dev, first_slot as usize);
        let raw = Source::Raw(&lines);
        let mut outcome = status::OK;
        for run in 0..2 * BENCH_RUNS {
            // Pairs of runs, alternating which path goes first.
            let is_ours = (run % 2 == 0) == (run / 2 % 2 == 0);
            let source = if is_ours { &ours } else { &raw };
            match self.stream(source, &vectors, count, fired) {
                Ok(t) => self.record(|m| {
                    let runs = if is_ours {
                        &mut m.throughput_ours
                    } else {
                        &mut m.throughput_raw
                    };
                    keep(runs, [(count, t)]);
                }),
                Err(e) => {
                    outcome = e;
                    break;
                }
            }
        }
        if self.detach(lines).is_err() && outcome == status::OK {
            outcome = status::HOST_ERROR;
        }
        outcome
    }

    /// Raises `count` interrupts of `source` round-robin over `vectors` on vCPU 0, each
    /// vector again only once the guest counted its previous one; returns how long it took
    /// until the last was counted.
    fn stream(
        &self,
        source: &Source<'_>,
        vectors: &[u8],
        count: u32,
        fired: &mut [u32],
    ) -> Result<Duration, u32> {
        let base: Vec<u32> = vectors.iter().map(|&v| self.counter(0, v)).collect();
        let mut sent = vec![0u32; vectors.len()];
        let counted = |k: usize, n: u32| {
            let v = vectors.get(k).copied().unwrap_or(0);
            let b = base.get(k).copied().unwrap_or(0);
            self.counter(0, v).wrapping_sub(b) >= n
        };
        let begin = Instant::now();
        for k in (0..vectors.len()).cycle().take(count as usize) {
            let Some(n) = sent.get_mut(k) else {
                return Err(status::HOST_ERROR);
            };
            let before = *n;
            if !self.spin_until(|| counted(k, before)) {
                return Err(status::NOT_DELIVERED);
            }
            if !source.raise(k) {
                return Err(status::HOST_ERROR);
            }
            *n += 1;
            self.count_fired(0, fired);
        }
        for (k, &n) in sent.iter().enumerate() {
            if !self.spin_until(|| counted(k, n)) {
                return Err(status::NOT_DELIVERED);
            }
        }
        Ok(begin.elapsed())
    }
}
