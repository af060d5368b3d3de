//! What `vmm bench` found, and its ratios; printed as text (`text`) and JSON (`json`).

use std::time::Duration;

/// Median and 99th percentile of one figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figure {
    /// Median.
    pub median: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Samples taken.
    pub samples: usize,
}

impl Figure {
    pub(super) fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        // Nearest rank, rounded: the sample `percent`% of the way from first to last.
        let at = |percent: usize| {
            let i = (n.saturating_sub(1) * percent + 50) / 100;
            samples.get(i).copied().unwrap_or_default()
        };
        Self {
            median: at(50),
            p99: at(99),
            samples: n,
        }
    }
}

/// One row of the retarget table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetargetRow {
    /// Live interrupts.
    pub live: u32,
    /// Our `UPDATE` hypercall from the guest, host time from its exit to the guest's
    /// re-entry (`None` if the guest part did not time this size).
    pub exit_to_entry: Option<Figure>,
    /// Of that, the dispatcher alone, called in-process (lock, validation, transaction,
    /// route change, publish, the VT-d unit's mirror).
    pub ours: Figure,
    /// One whole-table `KVM_SET_GSI_ROUTING` of `live` MSI routes (`None` beyond KVM's
    /// limit).
    pub rebuild: Option<Figure>,
}

/// What the test guest's `bench` scenario measured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestFigures {
    /// Delivery latency through an IMS slot and the remapping core.
    pub delivery_ours: Figure,
    /// Delivery latency through a raw irqfd on a plain MSI route.
    pub delivery_raw: Figure,
    /// Delivery latency through a slot of the same device in another process (its
    /// entry's eventfd).
    pub delivery_remote: Figure,
    /// The raw irqfd beside it.
    pub delivery_remote_raw: Figure,
    /// Time per interrupt of each throughput run through IMS slots (median: the median
    /// run; p99: the slowest).
    pub throughput_ours: Figure,
    /// The same through raw irqfds.
    pub throughput_raw: Figure,
    /// Interrupts per throughput run.
    pub interrupts_per_run: u32,
    /// Live interrupts asked for.
    pub live_asked: u32,
    /// The largest number live at once that were all delivered.
    pub max_live: u32,
    /// The timed exits, by live interrupts.
    pub exits: Vec<ExitRow>,
}

/// The guest's timed exits with one number of live interrupts: the `UPDATE` and one-entry
/// `BATCH` hypercalls, and the exits of the same guest loop to the null port (the floor).
/// The VMM's share runs from the exit to the guest's re-entry; the round trip to the
/// vCPU's next exit (the next call of the loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitRow {
    /// Live interrupts.
    pub live: u32,
    /// `UPDATE`: the VMM's share.
    pub update_share: Figure,
    /// `UPDATE`: the round trip.
    pub update_trip: Figure,
    /// `BATCH` of one entry: the VMM's share.
    pub batch_share: Figure,
    /// `BATCH` of one entry: the round trip.
    pub batch_trip: Figure,
    /// The null port: the VMM's share (the exit decoded, nothing done).
    pub null_share: Figure,
    /// The null port: the round trip (the floor).
    pub null_trip: Figure,
}

/// The results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchReport {
    /// Retarget cost by live interrupts.
    pub retarget: Vec<RetargetRow>,
    /// One `BATCH` activating [`BULK_ENTRIES`] entries.
    pub bulk_ours: Figure,
    /// One `KVM_SET_GSI_ROUTING` of [`BULK_ENTRIES`] routes.
    pub bulk_raw: Figure,
    /// One interrupt signalled through our data path (remappable message in).
    pub signal_ours: Figure,
    /// One eventfd write to a raw irqfd.
    pub signal_raw: Figure,
    /// Handing [`BULK_ENTRIES`] entries' eventfds to a device in another process as their
    /// entries become present (the server's fd limit: one per message).
    pub handover_per_entry: Figure,
    /// Sending the same eventfds all at once in messages of 16 (cloud-hypervisor's MSI-X
    /// enable), to the same server.
    pub handover_eager: Figure,
    /// The in-guest figures (the VM's threads filtered, as by default).
    pub guest: GuestFigures,
    /// The same guest with seccomp filters off (a shorter run: delivery, and the `UPDATE`
    /// exit up to [`super::SECCOMP_LIVE`] live).
    pub unfiltered: GuestFigures,
    /// One allowed system call (`gettid`) on a thread under the vCPU filter, and on an
    /// unfiltered thread, in this process.
    pub syscall_filtered: Figure,
    /// See `syscall_filtered`.
    pub syscall_unfiltered: Figure,
    /// IMS-device work per item with DMA translation on, off, and on plain memory.
    pub dma: super::dma::DmaFigures,
    /// Lifecycle, snapshots and startup of whole VMs.
    pub whole: super::WholeVm,
}

/// Interrupts per second at `per_interrupt`.
fn rate(per_interrupt: Duration) -> Option<f64> {
    (!per_interrupt.is_zero()).then(|| 1.0 / per_interrupt.as_secs_f64())
}

fn ratio(a: Duration, b: Duration) -> Option<f64> {
    (!b.is_zero()).then(|| a.as_secs_f64() / b.as_secs_f64())
}

impl BenchReport {
    /// Our delivery over the raw irqfd beside it with seccomp filters on, over the same
    /// ratio with them off: each VM's own baseline takes out what differs between two VM
    /// runs on a busy machine (halt polling, the other core's load).
    #[must_use]
    pub fn seccomp_delivery_ratio(&self) -> Option<f64> {
        let on = ratio(
            self.guest.delivery_ours.median,
            self.guest.delivery_raw.median,
        )?;
        let off = ratio(
            self.unfiltered.delivery_ours.median,
            self.unfiltered.delivery_raw.median,
        )?;
        (off > 0.0).then(|| on / off)
    }

    /// The `UPDATE` exit at [`super::SECCOMP_LIVE`] live with filters on, over off (two VM
    /// runs: noisier than [`Self::seccomp_delivery_ratio`]).
    #[must_use]
    pub fn seccomp_update_ratio(&self) -> Option<f64> {
        let at = |g: &GuestFigures| {
            g.exits
                .iter()
                .find(|r| r.live == super::SECCOMP_LIVE)
                .map(|r| r.update_share.median)
        };
        ratio(at(&self.guest)?, at(&self.unfiltered)?)
    }

    /// A VM's whole life with the default devices over the same without devices.
    #[must_use]
    pub fn lifecycle_ratio(&self) -> Option<f64> {
        let l = &self.whole.lifecycle;
        ratio(l.with_devices.median, l.without_devices.median)
    }

    /// The snapshot of the guest that touched [`super::TOUCHED_MIB`], and of the one that
    /// touched all its RAM.
    fn snapshot_rows(&self) -> (Option<&super::SnapshotRow>, Option<&super::SnapshotRow>) {
        let find = |mib| self.whole.snapshots.iter().find(|r| r.touched_mib == mib);
        (find(super::TOUCHED_MIB), find(0))
    }

    /// The size of the snapshot of the guest that touched [`super::TOUCHED_MIB`], in MiB.
    #[must_use]
    pub fn snapshot_mib(&self) -> Option<f64> {
        let (small, _) = self.snapshot_rows();
        small.map(|r| r.bytes as f64 / f64::from(1u32 << 20))
    }

    /// Its pause over the pause of the snapshot of a guest that touched all its RAM.
    #[must_use]
    pub fn snapshot_pause_ratio(&self) -> Option<f64> {
        let (small, full) = self.snapshot_rows();
        ratio(small?.pause.median, full?.pause.median)
    }

    /// From the restore call to the guest's first instruction, for that snapshot, in ms.
    #[must_use]
    pub fn restore_ms(&self) -> Option<f64> {
        let (small, _) = self.snapshot_rows();
        small.map(|r| r.restore.median.as_secs_f64() * 1e3)
    }

    /// From the `vmm` process's start to the guest's first instruction, in ms.
    #[must_use]
    pub fn startup_ms(&self) -> Option<f64> {
        self.whole.startup.map(|f| f.median.as_secs_f64() * 1e3)
    }

    /// The exit row with the most live interrupts.
    fn largest_exit_row(&self) -> Option<&ExitRow> {
        self.guest.exits.iter().max_by_key(|r| r.live)
    }

    /// The `UPDATE` round trip over the null exit's, with the most live interrupts timed
    /// (65,536 by default).
    #[must_use]
    pub fn update_exit_ratio(&self) -> Option<f64> {
        let r = self.largest_exit_row()?;
        ratio(r.update_trip.median, r.null_trip.median)
    }

    /// The one-entry `BATCH` round trip over the null exit's, as
    /// [`Self::update_exit_ratio`].
    #[must_use]
    pub fn batch_exit_ratio(&self) -> Option<f64> {
        let r = self.largest_exit_row()?;
        ratio(r.batch_trip.median, r.null_trip.median)
    }

    /// The dispatcher alone for a retarget to a routed target, with the most live
    /// interrupts measured (65,536), in microseconds.
    #[must_use]
    pub fn dispatcher_us(&self) -> Option<f64> {
        let row = self.retarget.iter().max_by_key(|r| r.live)?;
        Some(row.ours.median.as_secs_f64() * 1e6)
    }

    /// Whole-table rebuild cost over our retarget cost, both at 4,096 live.
    #[must_use]
    pub fn retarget_speedup_at_4096(&self) -> Option<f64> {
        let row = self.retarget.iter().find(|r| r.live == 4096)?;
        ratio(row.rebuild?.median, row.exit_to_entry?.median)
    }

    /// Our 2,048-entry batch activation over one 2,048-entry routing set.
    #[must_use]
    pub fn bulk_ratio(&self) -> Option<f64> {
        ratio(self.bulk_ours.median, self.bulk_raw.median)
    }

    /// Our median delivery latency over the raw irqfd's.
    #[must_use]
    pub fn delivery_ratio(&self) -> Option<f64> {
        ratio(
            self.guest.delivery_ours.median,
            self.guest.delivery_raw.median,
        )
    }

    /// The out-of-process device's median delivery latency over the same device's
    /// in-process one.
    #[must_use]
    pub fn remote_delivery_ratio(&self) -> Option<f64> {
        ratio(
            self.guest.delivery_remote.median,
            self.guest.delivery_ours.median,
        )
    }

    /// Handing over per entry as entries become present, over all at once in 16s.
    #[must_use]
    pub fn handover_ratio(&self) -> Option<f64> {
        ratio(self.handover_per_entry.median, self.handover_eager.median)
    }

    /// The device's work per item with translation on over the same with it off.
    #[must_use]
    pub fn dma_translation_ratio(&self) -> Option<f64> {
        let d = &self.dma.delivered;
        ratio(d.translated.median, d.untranslated.median)
    }

    /// Our median throughput over the raw irqfds'.
    #[must_use]
    pub fn throughput_ratio(&self) -> Option<f64> {
        ratio(
            self.guest.throughput_raw.median,
            self.guest.throughput_ours.median,
        )
    }
}

mod json;
mod text;
