//! The report as JSON: the headline ratios first, the tables beside them.

use std::fmt::Write as _;
use std::time::Duration;

use super::super::{BULK_ENTRIES, WINDOW};
use super::{rate, BenchReport, Figure};
use hypercall::harness::BENCH_RUNS;

impl BenchReport {
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

    /// The `ims_device_dma` line of the JSON.
    fn dma_json(&self, fig: &dyn Fn(&Figure) -> String) -> String {
        let paths = |p: &super::super::dma::DevicePaths| {
            format!(
                "{{\"translated\": {}, \"untranslated\": {}, \"plain_memory\": {}}}",
                fig(&p.translated),
                fig(&p.untranslated),
                fig(&p.plain)
            )
        };
        format!(
            "  \"ims_device_dma\": {{\"items_per_sample\": {}, \"per_item_with_interrupt\": {}, \"per_item_ring_only\": {}}},\n",
            super::super::dma::ITEMS,
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
}
