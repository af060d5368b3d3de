//! The interrupt event trace on real KVM: the default run's trace holds every hypercall
//! the guest made with its status, every fault the summary counts and the `vtd`
//! scenario's invalidations; a storm's trace stays within its limit and says how much it
//! left out.

use std::collections::BTreeMap;
use std::path::PathBuf;

use integration_tests::{boot, config};
use serde_json::Value;
use vmm::trace::TracePlan;

/// A trace file for one test, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "vmm-trace-test-{}-{name}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.0)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn of<'a>(lines: &'a [Value], cat: &str, kind: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|v| v["cat"] == cat && v["kind"] == kind)
        .collect()
}

#[test]
fn the_default_runs_trace_holds_every_hypercall_fault_and_invalidation() {
    let file = TempFile::new("default");
    let mut cfg = config(2, "");
    cfg.run.trace = Some(TracePlan::new(file.0.to_str().unwrap(), None, None).unwrap());
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
    let lines = file.lines();
    let totals = report.trace.unwrap();
    assert_eq!(totals.written, lines.len() as u64);
    // Only `ir` (a signal per interrupt) may reach the default limit in a busy second;
    // the categories checked below are complete.
    let cut: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "dropped").collect();
    assert!(cut.iter().all(|v| v["cat"] == "ir"), "{cut:?}");
    let mut last = 0;
    for v in &lines {
        let t = v["t_ns"].as_u64().unwrap();
        assert!(t >= last, "out of order: {v}");
        last = t;
        assert!(v["thread"].is_string() && v["kind"].is_string(), "{v}");
    }

    // Every call, by name, with its failures (a status other than OK).
    let mut calls: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for v in of(&lines, "hypercall", "call") {
        let c = calls.entry(v["name"].as_str().unwrap().into()).or_default();
        c.0 += 1;
        c.1 += u64::from(v["status"] != 0);
        assert!(v["duration_ns"].is_u64() || v["name"] == "unknown", "{v}");
    }
    let unknown = calls.remove("unknown").map_or(0, |c| c.0);
    assert_eq!(unknown, report.hypercalls.unknown, "{report}");
    let summary: BTreeMap<String, (u64, u64)> = report
        .hypercalls
        .calls
        .iter()
        .map(|c| (c.name.to_string(), (c.calls, c.errors)))
        .collect();
    assert_eq!(calls, summary, "{report}");

    // Every fault the summary counts, by reason.
    let count = |kind: &str| -> Vec<(u8, u64)> {
        let mut by: BTreeMap<u8, u64> = BTreeMap::new();
        for v in of(&lines, "faults", kind) {
            let r = v["reason"].as_str().unwrap().trim_start_matches("0x");
            *by.entry(u8::from_str_radix(r, 16).unwrap()).or_default() += 1;
        }
        by.into_iter().collect()
    };
    assert_eq!(count("ir"), report.remap_faults, "{report}");
    assert_eq!(count("dma"), report.dma_faults, "{report}");
    assert!(!report.remap_faults.is_empty() && !report.dma_faults.is_empty());

    // The vtd scenario's invalidations: a global one that loads the table, and
    // index-selective ones that load an entry each.
    let iec = of(&lines, "vtd", "iec_invalidation");
    assert!(
        iec.iter()
            .any(|v| v["scope"] == "global" && v["loaded"].as_u64() > Some(0)),
        "{iec:?}"
    );
    assert!(
        iec.iter()
            .any(|v| v["scope"] == "index" && v["loaded"] == 1),
        "{iec:?}"
    );
}

#[test]
fn a_storms_trace_stays_within_its_limit_and_counts_what_it_dropped() {
    let file = TempFile::new("storm");
    let mut cfg = config(2, "scenario=storm storm_count=20000 storm_bystanders=25");
    let limit = 500;
    cfg.run.trace =
        Some(TracePlan::new(file.0.to_str().unwrap(), Some("ir,faults"), Some(limit)).unwrap());
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
    let lines = file.lines();
    let totals = report.trace.unwrap();
    assert!(totals.dropped > 0, "{report}");
    let dropped: u64 = lines
        .iter()
        .filter(|v| v["kind"] == "dropped")
        .map(|v| v["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped, totals.dropped);
    // Per category and second of the run: at most the limit, plus its dropped record.
    let mut per_second: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for v in lines.iter().filter(|v| v["kind"] != "dropped") {
        assert!(v["cat"] == "ir" || v["cat"] == "faults", "{v}");
        let key = (
            v["cat"].as_str().unwrap().to_string(),
            v["t_ns"].as_u64().unwrap() / 1_000_000_000,
        );
        *per_second.entry(key).or_default() += 1;
    }
    assert!(
        per_second.values().all(|n| *n <= u64::from(limit)),
        "{per_second:?}"
    );
    assert!(
        of(&lines, "ir", "coalesced").len() as u64 <= report.storms.throttled,
        "{report}"
    );
}
