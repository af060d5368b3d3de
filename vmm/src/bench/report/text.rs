//! The report as text: the tables `vmm bench` prints, and the headline.

use std::time::Duration;

use super::super::{BULK_ENTRIES, KVM_MAX_ROUTES, WINDOW};
use super::{rate, ratio, BenchReport, GuestFigures};
use hypercall::harness::BENCH_RUNS;

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
            super::super::TOUCHED_MIB,
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
            super::super::dma::ITEMS,
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

    /// The cost of the seccomp filters: the same figures from a run without them.
    fn write_seccomp(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |g: &GuestFigures| {
            g.exits
                .iter()
                .find(|r| r.live == super::super::SECCOMP_LIVE)
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
            super::super::SECCOMP_LIVE,
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
