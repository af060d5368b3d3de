//! What `vmm bench` found, and how it is printed.

use std::fmt::Write as _;
use std::time::Duration;

use super::{BULK_ENTRIES, KVM_MAX_ROUTES, WINDOW};
use hypercall::harness::BENCH_RUNS;

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

    /// The `ims_device_dma` line of the JSON.
    fn dma_json(&self, fig: &dyn Fn(&Figure) -> String) -> String {
        let paths = |p: &super::dma::DevicePaths| {
            format!(
                "{{\"translated\": {}, \"untranslated\": {}, \"plain_memory\": {}}}",
                fig(&p.translated),
                fig(&p.untranslated),
                fig(&p.plain)
            )
        };
        format!(
            "  \"ims_device_dma\": {{\"items_per_sample\": {}, \"per_item_with_interrupt\": {}, \"per_item_ring_only\": {}}},\n",
            super::dma::ITEMS,
            paths(&self.dma.delivered),
            paths(&self.dma.ring_only)
        )
    }

    /// The `whole_vm` object of the JSON.
    fn whole_json(&self, fig: &dyn Fn(&Figure) -> String) -> String {
        let l = &self.whole.lifecycle;
        let rows: Vec<String> = self
            .whole
            .snapshots
            .iter()
            .map(|r| {
                format!(
                    "{{\"touched_mib\": {}, \"bytes\": {}, \"pause\": {}, \"restore_to_first_instruction\": {}}}",
                    r.touched_mib,
                    r.bytes,
                    fig(&r.pause),
                    fig(&r.restore)
                )
            })
            .collect();
        format!(
            "  \"whole_vm\": {{\"lifecycle_with_devices\": {}, \"lifecycle_without_devices\": {}, \"snapshots\": [{}], \"startup_from_process_start\": {}}},\n",
            fig(&l.with_devices),
            fig(&l.without_devices),
            rows.join(", "),
            self.whole.startup.as_ref().map_or("null".to_string(), fig)
        )
    }

    /// The `exits` and `retarget` arrays of the JSON.
    fn exit_tables_json(&self, fig: &dyn Fn(&Figure) -> String) -> String {
        let mut out = String::new();
        out.push_str("  \"exits\": [\n");
        let rows: Vec<String> = self.guest
            .exits
            .iter()
            .map(|r| {
                format!(
                    "    {{\"live\": {}, \"null_share\": {}, \"null_round_trip\": {}, \"update_share\": {}, \"update_round_trip\": {}, \"batch_of_one_share\": {}, \"batch_of_one_round_trip\": {}}}",
                    r.live,
                    fig(&r.null_share),
                    fig(&r.null_trip),
                    fig(&r.update_share),
                    fig(&r.update_trip),
                    fig(&r.batch_share),
                    fig(&r.batch_trip)
                )
            })
            .collect();
        out.push_str(&rows.join(",\n"));
        out.push_str("\n  ],\n");
        out.push_str("  \"retarget\": [\n");
        let rows: Vec<String> = self
            .retarget
            .iter()
            .map(|r| {
                format!(
                    "    {{\"live\": {}, \"ours_exit_to_entry\": {}, \"ours_dispatcher\": {}, \"whole_table_rebuild\": {}}}",
                    r.live,
                    r.exit_to_entry.as_ref().map_or("null".to_string(), fig),
                    fig(&r.ours),
                    r.rebuild.as_ref().map_or("null".to_string(), fig)
                )
            })
            .collect();
        out.push_str(&rows.join(",\n"));
        out.push_str("\n  ],\n");
        out
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

    /// The report as JSON: the headline ratios at the top level, the tables beside them.
    /// Figures not measured by this command are `null`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        let us = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e6);
        let fig = |f: &Figure| {
            format!(
                "{{\"median_us\": {}, \"p99_us\": {}, \"samples\": {}}}",
                us(f.median),
                us(f.p99),
                f.samples
            )
        };
        let mut out = String::from("{\n");
        let _ = writeln!(
            out,
            "  \"retarget_speedup_at_4096\": {},",
            num(self.retarget_speedup_at_4096())
        );
        let _ = writeln!(out, "  \"delivery_ratio\": {},", num(self.delivery_ratio()));
        let _ = writeln!(out, "  \"max_live_interrupts\": {},", self.guest.max_live);
        let _ = writeln!(out, "  \"bulk_ratio\": {},", num(self.bulk_ratio()));
        let _ = writeln!(
            out,
            "  \"remote_delivery_ratio\": {},",
            num(self.remote_delivery_ratio())
        );
        let _ = writeln!(out, "  \"handover_ratio\": {},", num(self.handover_ratio()));
        let _ = writeln!(
            out,
            "  \"dma_translation_ratio\": {},",
            num(self.dma_translation_ratio())
        );
        let _ = writeln!(
            out,
            "  \"update_exit_ratio\": {},\n  \"batch_exit_ratio\": {},\n  \"dispatcher_us_at_65536\": {},",
            num(self.update_exit_ratio()),
            num(self.batch_exit_ratio()),
            num(self.dispatcher_us())
        );
        let _ = writeln!(
            out,
            "  \"lifecycle_ratio\": {},\n  \"snapshot_mib\": {},\n  \"snapshot_pause_ratio\": {},\n  \"restore_ms\": {},\n  \"startup_ms\": {},",
            num(self.lifecycle_ratio()),
            num(self.snapshot_mib()),
            num(self.snapshot_pause_ratio()),
            num(self.restore_ms()),
            num(self.startup_ms())
        );
        out.push_str(&self.whole_json(&fig));
        out.push_str(&self.seccomp_json());
        out.push_str(&self.dma_json(&fig));
        let g = &self.guest;
        let _ = writeln!(
            out,
            "  \"delivery\": {{\"ours_ims_slot\": {}, \"raw_irqfd\": {}, \"out_of_process_ims_slot\": {}, \"raw_irqfd_beside_it\": {}}},",
            fig(&g.delivery_ours),
            fig(&g.delivery_raw),
            fig(&g.delivery_remote),
            fig(&g.delivery_remote_raw)
        );
        let per_s = |f: &Figure| num(rate(f.median));
        let _ = writeln!(
            out,
            "  \"throughput\": {{\"interrupts_per_run\": {}, \"window\": {WINDOW}, \"runs\": {BENCH_RUNS}, \"ours_per_s\": {}, \"raw_per_s\": {}, \"ratio\": {}, \"ours_per_interrupt\": {}, \"raw_per_interrupt\": {}}},",
            g.interrupts_per_run,
            per_s(&g.throughput_ours),
            per_s(&g.throughput_raw),
            num(self.throughput_ratio()),
            fig(&g.throughput_ours),
            fig(&g.throughput_raw)
        );
        let _ = writeln!(
            out,
            "  \"live_interrupts\": {{\"asked\": {}, \"all_delivered\": {}}},",
            g.live_asked, g.max_live
        );
        let _ = writeln!(
            out,
            "  \"signal_cost\": {{\"ours_remapped\": {}, \"raw_eventfd\": {}}},",
            fig(&self.signal_ours),
            fig(&self.signal_raw)
        );
        out.push_str(&self.exit_tables_json(&fig));
        let _ = writeln!(
            out,
            "  \"bulk_activation\": {{\"entries\": {BULK_ENTRIES}, \"ours_batch\": {}, \"raw_set_gsi_routing\": {}}},",
            fig(&self.bulk_ours),
            fig(&self.bulk_raw)
        );
        let _ = writeln!(
            out,
            "  \"host_interrupt_handover\": {{\"entries\": {BULK_ENTRIES}, \"per_entry_as_present\": {}, \"eager_in_16s\": {}}}",
            fig(&self.handover_per_entry),
            fig(&self.handover_eager)
        );
        out.push_str("}\n");
        out
    }
}

/// Microseconds, one decimal.
fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// A ratio, or `-` when there is none.
fn times(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

impl BenchReport {
    /// Delivery, throughput, the device-side cost and the live-interrupt count.
    fn write_guest_figures(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.guest;
        writeln!(
            f,
            "Delivery latency, device-model raise -> guest handler on vCPU 0 (us), {} samples each",
            g.delivery_ours.samples
        )?;
        writeln!(f, "{:>30} | {:>10} {:>10}", "path", "p50", "p99")?;
        for (name, fig) in [
            ("IMS slot + remapping (ours)", &g.delivery_ours),
            ("raw irqfd, plain MSI route", &g.delivery_raw),
            ("same, device in other process", &g.delivery_remote),
            ("raw irqfd beside it", &g.delivery_remote_raw),
        ] {
            writeln!(f, "{name:>30} | {:>10} {:>10}", us(fig.median), us(fig.p99))?;
        }
        writeln!(
            f,
            "  ratio ours/raw {}; out-of-process/in-process {} (target <= 1.1x)",
            times(self.delivery_ratio()),
            times(self.remote_delivery_ratio())
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "Throughput, vCPU 0, {} interrupts per run over {WINDOW} vectors, {BENCH_RUNS} runs each (interrupts/s)",
            g.interrupts_per_run
        )?;
        writeln!(
            f,
            "{:>30} | {:>12} {:>12}",
            "path", "median run", "slowest run"
        )?;
        let per_s = |d: Duration| rate(d).map_or("-".into(), |r| format!("{r:.0}"));
        for (name, fig) in [
            ("IMS slots + remapping (ours)", &g.throughput_ours),
            ("raw irqfds, plain MSI routes", &g.throughput_raw),
        ] {
            writeln!(
                f,
                "{name:>30} | {:>12} {:>12}",
                per_s(fig.median),
                per_s(fig.p99)
            )?;
        }
        writeln!(f, "  ratio ours/raw {}", times(self.throughput_ratio()))?;
        writeln!(f)?;
        writeln!(
            f,
            "Device-side cost of one interrupt, host only (us): our data path vs an eventfd write"
        )?;
        writeln!(
            f,
            "  ours p50 {:.3} p99 {:.3} | raw p50 {:.3} p99 {:.3}",
            self.signal_ours.median.as_secs_f64() * 1e6,
            self.signal_ours.p99.as_secs_f64() * 1e6,
            self.signal_raw.median.as_secs_f64() * 1e6,
            self.signal_raw.p99.as_secs_f64() * 1e6,
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "Live remapped interrupts, all delivered through irqfd lines: {} (asked for {})",
            g.max_live, g.live_asked
        )?;
        writeln!(f)?;
        Ok(())
    }

    /// Lifecycle, snapshots and startup of whole VMs.
    fn write_whole(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        let l = &self.whole.lifecycle;
        writeln!(
            f,
            "Whole VMs (ms, p50): a VM's life from the run call to its return (the test guest's smoke scenario), the default machine vs the same without devices, {} runs each",
            l.with_devices.samples
        )?;
        writeln!(
            f,
            "  with devices {} | without {} | ratio {} (target <= 1.2x)",
            ms(l.with_devices.median),
            ms(l.without_devices.median),
            times(self.lifecycle_ratio())
        )?;
        writeln!(
            f,
            "Snapshots of the default 64 MiB machine: the file, the VM's pause, and the restore call to the guest's first instruction (p50 of {} each)",
            self.whole.snapshots.first().map_or(0, |r| r.pause.samples)
        )?;
        for r in &self.whole.snapshots {
            let what = if r.touched_mib == 0 {
                "guest touched all its RAM".to_string()
            } else {
                format!("guest touched {} MiB", r.touched_mib)
            };
            writeln!(
                f,
                "{:>28} | file {:>6.1} MiB | paused {:>7} ms | restore {:>6} ms",
                what,
                r.bytes as f64 / f64::from(1u32 << 20),
                ms(r.pause.median),
                ms(r.restore.median)
            )?;
        }
        writeln!(
            f,
            "  pause {}/all {} (target <= 0.25x); file {} MiB (target <= 12)",
            super::TOUCHED_MIB,
            times(self.snapshot_pause_ratio()),
            self.snapshot_mib()
                .map_or("-".into(), |x| format!("{x:.1}"))
        )?;
        match self.whole.startup {
            Some(s) => writeln!(
                f,
                "Startup, vmm process start -> the guest's first instruction (65,536-entry table, two IMS devices): p50 {} ms, p99 {} ms, {} runs",
                ms(s.median),
                ms(s.p99),
                s.samples
            )?,
            None => writeln!(f, "Startup: not measured (the benchmark is not running in the vmm binary)")?,
        }
        writeln!(f)
    }

    /// The exit table: hypercalls beside the floor.
    fn write_exits(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "Hypercall exits from the guest (us, p50): the VMM's share (exit -> re-entry) and the round trip (exit -> the vCPU's next exit), beside the same guest loop's out to a port the VMM answers with nothing (the floor)"
        )?;
        writeln!(
            f,
            "{:>8} | {:>10} {:>10} | {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7}",
            "live",
            "null share",
            "null trip",
            "UPD share",
            "UPD trip",
            "/floor",
            "BAT1 share",
            "BAT1 trip",
            "/floor"
        )?;
        for r in &self.guest.exits {
            writeln!(
                f,
                "{:>8} | {:>10} {:>10} | {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7}",
                r.live,
                us(r.null_share.median),
                us(r.null_trip.median),
                us(r.update_share.median),
                us(r.update_trip.median),
                times(ratio(r.update_trip.median, r.null_trip.median)),
                us(r.batch_share.median),
                us(r.batch_trip.median),
                times(ratio(r.batch_trip.median, r.null_trip.median)),
            )?;
        }
        writeln!(
            f,
            "  (the round trip includes KVM's re-entry and the guest's loop up to its next call, the same for all three; target <= 1.2x the floor)"
        )?;
        writeln!(f)
    }

    /// The retarget table.
    fn write_retarget(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "IRTE retarget, host side (us): our UPDATE hypercall from exit to re-entry (and the dispatcher alone) vs one whole-table KVM_SET_GSI_ROUTING"
        )?;
        writeln!(
            f,
            "{:>8} | {:>10} {:>10} | {:>10} | {:>12} {:>12} | {:>8}",
            "live", "exit p50", "exit p99", "disp. p50", "rebuild p50", "rebuild p99", "speedup"
        )?;
        for r in &self.retarget {
            let exit = r
                .exit_to_entry
                .map_or(("-".into(), "-".into()), |e| (us(e.median), us(e.p99)));
            let (p50, p99, speedup) = match r.rebuild {
                Some(b) => (
                    us(b.median),
                    us(b.p99),
                    r.exit_to_entry
                        .and_then(|e| ratio(b.median, e.median))
                        .map_or("-".into(), |x| {
                            if x < 10.0 {
                                format!("{x:.1}x")
                            } else {
                                format!("{x:.0}x")
                            }
                        }),
                ),
                None => ("n/a".into(), "n/a".into(), "-".into()),
            };
            writeln!(
                f,
                "{:>8} | {:>10} {:>10} | {:>10} | {:>12} {:>12} | {:>8}",
                r.live,
                exit.0,
                exit.1,
                us(r.ours.median),
                p50,
                p99,
                speedup
            )?;
        }
        writeln!(
            f,
            "(KVM takes at most {KVM_MAX_ROUTES} routes: no whole-table baseline beyond that)"
        )?;
        writeln!(f)?;
        Ok(())
    }

    /// Bulk activation and the headline.
    fn write_bulk_and_headline(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.guest;
        writeln!(
            f,
            "Bulk activation of {BULK_ENTRIES} entries (us): one BATCH hypercall vs one {BULK_ENTRIES}-entry KVM_SET_GSI_ROUTING"
        )?;
        writeln!(
            f,
            "  ours p50 {} p99 {} | raw p50 {} p99 {} | ratio {}",
            us(self.bulk_ours.median),
            us(self.bulk_ours.p99),
            us(self.bulk_raw.median),
            us(self.bulk_raw.p99),
            self.bulk_ratio().map_or("-".into(), |x| format!("{x:.2}x"))
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "Host interrupts of {BULK_ENTRIES} entries to a device in another process (us): handed over per entry as entries become present (1 fd per message, the server's limit) vs all at once in messages of 16 (MSI-X enable, cloud-hypervisor's way)"
        )?;
        writeln!(
            f,
            "  per entry p50 {} p99 {} | eager p50 {} p99 {} | ratio {}; entries never made present cost nothing per entry",
            us(self.handover_per_entry.median),
            us(self.handover_per_entry.p99),
            us(self.handover_eager.median),
            us(self.handover_eager.p99),
            times(self.handover_ratio())
        )?;
        writeln!(f)?;
        let ns = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e9);
        writeln!(
            f,
            "IMS device work per item through the vIOMMU (ns), {} items per sample, {} samples each",
            super::dma::ITEMS,
            self.dma.delivered.translated.samples
        )?;
        writeln!(
            f,
            "{:>30} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
            "", "on p50", "p99", "off p50", "p99", "plain", "p99"
        )?;
        for (name, p) in [
            ("with its interrupt", &self.dma.delivered),
            ("ring DMA only (slot masked)", &self.dma.ring_only),
        ] {
            writeln!(
                f,
                "{name:>30} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
                ns(p.translated.median),
                ns(p.translated.p99),
                ns(p.untranslated.median),
                ns(p.untranslated.p99),
                ns(p.plain.median),
                ns(p.plain.p99)
            )?;
        }
        let r = &self.dma.ring_only;
        writeln!(
            f,
            "  translation on/off {} (target <= 1.1x); ring DMA alone on/off {}, on/plain memory {}",
            times(self.dma_translation_ratio()),
            times(ratio(r.translated.median, r.untranslated.median)),
            times(ratio(r.translated.median, r.plain.median))
        )?;
        writeln!(f)?;
        let num = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
        writeln!(
            f,
            "headline: update_exit_ratio {} (target <= 1.2), batch_exit_ratio {} (target <= 1.2), dispatcher_us_at_65536 {} (target <= 1)",
            num(self.update_exit_ratio()),
            num(self.batch_exit_ratio()),
            num(self.dispatcher_us())
        )?;
        writeln!(
            f,
            "          lifecycle_ratio {} (target <= 1.2), snapshot_mib {} (target <= 12), snapshot_pause_ratio {} (target <= 0.25), restore_ms {}, startup_ms {}",
            num(self.lifecycle_ratio()),
            num(self.snapshot_mib()),
            num(self.snapshot_pause_ratio()),
            num(self.restore_ms()),
            num(self.startup_ms())
        )?;
        writeln!(
            f,
            "          retarget_speedup_at_4096 {} (target >= 100), delivery_ratio {} (target <= 1.1), max_live_interrupts {} (target 65536), bulk_ratio {} (target <= 3)",
            self.retarget_speedup_at_4096()
                .map_or("-".into(), |x| format!("{x:.1}")),
            self.delivery_ratio().map_or("-".into(), |x| format!("{x:.3}")),
            g.max_live,
            self.bulk_ratio().map_or("-".into(), |x| format!("{x:.2}"))
        )?;
        writeln!(
            f,
            "          dma_translation_ratio {} (target <= 1.1)",
            self.dma_translation_ratio()
                .map_or("-".into(), |x| format!("{x:.3}"))
        )
    }

    /// The seccomp keys of the JSON.
    fn seccomp_json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        format!(
            "  \"seccomp_delivery_ratio\": {},\n  \"seccomp_update_ratio\": {},\n  \"seccomp_syscall_ns\": {{\"filtered\": {:.1}, \"unfiltered\": {:.1}}},\n",
            num(self.seccomp_delivery_ratio()),
            num(self.seccomp_update_ratio()),
            self.syscall_filtered.median.as_secs_f64() * 1e9,
            self.syscall_unfiltered.median.as_secs_f64() * 1e9
        )
    }

    /// The cost of the seccomp filters: the same figures from a run without them.
    fn write_seccomp(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |g: &GuestFigures| {
            g.exits
                .iter()
                .find(|r| r.live == super::SECCOMP_LIVE)
                .map(|r| r.update_share)
        };
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        let ns = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e9);
        writeln!(
            f,
            "Seccomp filters (on in every VM above) vs off, a second VM run without them (p50, us)"
        )?;
        writeln!(
            f,
            "  delivery ours/raw {} / {} on, {} / {} off: on/off {}",
            us(self.guest.delivery_ours.median),
            us(self.guest.delivery_raw.median),
            us(self.unfiltered.delivery_ours.median),
            us(self.unfiltered.delivery_raw.median),
            self.seccomp_delivery_ratio()
                .map_or("-".into(), |x| format!("{x:.3}x")),
        )?;
        writeln!(
            f,
            "  UPDATE exit at {} live {} on, {} off: {} (two runs: noise dominates)",
            super::SECCOMP_LIVE,
            at(&self.guest).map_or("-".into(), |x| us(x.median)),
            at(&self.unfiltered).map_or("-".into(), |x| us(x.median)),
            self.seccomp_update_ratio()
                .map_or("-".into(), |x| format!("{x:.3}x")),
        )?;
        writeln!(
            f,
            "  one allowed system call (ns): {} under the vCPU filter, {} without (an UPDATE exit makes none of its own: its registers travel in kvm_run)",
            ns(self.syscall_filtered.median),
            ns(self.syscall_unfiltered.median),
        )?;
        writeln!(f)
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write_guest_figures(f)?;
        self.write_exits(f)?;
        self.write_retarget(f)?;
        self.write_seccomp(f)?;
        self.write_whole(f)?;
        self.write_bulk_and_headline(f)
    }
}
