//! Snapshot and restore on real KVM: a snapshot taken while both IMS devices complete
//! paced work, restored into a new VM, finishes that work with every completion counted
//! once; a snapshot of the whole default run restores and passes; a tampered file is
//! refused with its reason and nothing runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{boot, config, restore};
use vmm::config::{AfterSnapshot, SnapshotPlan};
use vmm::{Outcome, Settings};

/// A snapshot file for one test, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("vmm-test-{}-{name}.snap", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn plan(path: &Path, after: Option<Duration>, then: AfterSnapshot) -> Option<SnapshotPlan> {
    Some(SnapshotPlan {
        path: path.to_path_buf(),
        after,
        then,
    })
}

fn run_settings() -> Settings {
    Settings {
        watchdog: Some(120),
        ..Settings::default()
    }
}

/// (completions, faults) of each device.
fn completions(report: &vmm::RunReport) -> Vec<u64> {
    report.devices.iter().map(|d| d.completions).collect()
}

#[test]
fn a_snapshot_taken_while_ims_devices_fire_continues_in_a_new_vm_with_nothing_lost_or_doubled() {
    let file = TempFile::new("ims");
    let mut cfg = config(2, "scenario=snapshot");
    cfg.run.snapshot = plan(&file.0, None, AfterSnapshot::Stop);
    let (before, console) = boot(&cfg);
    assert_eq!(
        before.outcome,
        Outcome::Snapshotted {
            path: file.0.clone()
        },
        "{before}\n{console}"
    );
    assert!(before.snapshot.is_some(), "{before}");
    // Work was in flight: each device had completed part of it.
    let done = completions(&before);
    assert!(done[0] > 0 && done[0] < 256, "{before}");
    assert!(done[1] < 24, "{before}");

    let (after, console) = restore(&file.0, &run_settings()).unwrap();
    assert!(after.passed(), "{after}\n{console}");
    assert_eq!(after.restored_from.as_deref(), Some(file.0.as_path()));
    assert!(
        console
            .contains("snapshot: after it, 256 slot and 24 queue completions, each counted once"),
        "{console}"
    );
    // The devices' own counters went on from the snapshot: exactly the work posted.
    assert_eq!(completions(&after), vec![256, 24], "{after}");
    assert_eq!(after.remap_faults, vec![], "{after}");
    // The guest counted one interrupt per completion at most (merged ones count once),
    // and every one of them on its own CPU (the guest checks that and its totals).
    let counted: u64 = after.interrupts.iter().flatten().sum();
    assert!(counted > 0 && counted <= 256 + 24 + 16, "{after}");
}

#[test]
fn a_vm_that_continues_after_its_snapshot_and_the_restored_one_both_finish() {
    let file = TempFile::new("continue");
    let mut cfg = config(3, "scenario=snapshot");
    cfg.run.snapshot = plan(&file.0, None, AfterSnapshot::Continue);
    let (first, console) = boot(&cfg);
    assert!(first.passed(), "{first}\n{console}");
    let taken = first.snapshot.as_ref().expect("a snapshot was taken");
    assert_eq!(taken.path, file.0);
    assert_eq!(
        taken.bytes,
        std::fs::metadata(&file.0).unwrap().len(),
        "{first}"
    );
    assert_eq!(completions(&first), vec![256, 24], "{first}");

    let (second, console) = restore(&file.0, &run_settings()).unwrap();
    assert!(second.passed(), "{second}\n{console}");
    assert_eq!(completions(&second), vec![256, 24], "{second}");
}

/// A guest that touched little of a large RAM: its snapshot holds the pages it wrote (a
/// page map and those pages), not its RAM, and restores to a passing run.
#[test]
fn an_idle_guests_snapshot_holds_only_what_it_wrote_and_restores() {
    let file = TempFile::new("idle");
    let mut cfg = config(2, "scenario=snapshot");
    cfg.machine.memory = 512 << 20;
    cfg.run.snapshot = plan(&file.0, None, AfterSnapshot::Stop);
    let (before, console) = boot(&cfg);
    let taken = before.snapshot.as_ref().expect("a snapshot was taken");
    assert!(
        matches!(before.outcome, Outcome::Snapshotted { .. }),
        "{before}
{console}"
    );
    let bytes = std::fs::read(&file.0).unwrap();
    assert_eq!(taken.bytes, bytes.len() as u64);
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 3);
    let (_, ram) = split(&bytes);
    let map_len = (512 << 20) / 4096 / 8;
    let pages: u32 = ram[..map_len].iter().map(|b| b.count_ones()).sum();
    assert!(pages > 0, "the guest's image and stack are in it");
    assert_eq!(
        ram.len(),
        map_len + 4096 * pages as usize,
        "map, then its pages"
    );
    // The test guest's image, page tables, stacks and mailbox: well under 4 MiB of 512.
    assert!(pages < 1024, "{pages} pages: {before}");
    let (after, console) = restore(&file.0, &run_settings()).unwrap();
    assert!(
        after.passed(),
        "{after}
{console}"
    );
    assert_eq!(after.memory, 512 << 20);
}

#[test]
fn a_snapshot_of_the_whole_default_run_at_a_set_time_restores_and_passes() {
    let file = TempFile::new("timed");
    let mut cfg = config(2, "scenario=all");
    cfg.run.snapshot = plan(
        &file.0,
        Some(Duration::from_millis(300)),
        AfterSnapshot::Stop,
    );
    let (before, console) = boot(&cfg);
    assert!(
        matches!(before.outcome, Outcome::Snapshotted { .. }),
        "{before}\n{console}"
    );
    let (after, console) = restore(&file.0, &run_settings()).unwrap();
    assert!(after.passed(), "{after}\n{console}");
    assert!(console.contains("verdict: PASS"), "{console}");
}

#[test]
fn without_a_snapshot_file_the_guest_is_told_and_nothing_is_written() {
    let (report, console) = boot(&config(1, "scenario=snapshot"));
    assert!(!report.passed(), "{report}");
    assert!(
        console.contains("snapshot: FAIL: the VM has no snapshot file"),
        "{console}"
    );
    assert!(report.snapshot.is_none());
}

/// The file's header as JSON, and the RAM after it.
fn split(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let len = usize::try_from(u64::from_le_bytes(bytes[16..24].try_into().unwrap())).unwrap();
    let header = serde_json::from_slice(&bytes[24..24 + len]).unwrap();
    (header, bytes[24 + len..].to_vec())
}

fn join(original: &[u8], header: &serde_json::Value, ram: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(header).unwrap();
    let mut out = original[..16].to_vec();
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(ram);
    out
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of tampered fields")]
fn tampered_snapshots_are_refused_with_the_reason_and_nothing_runs() {
    let file = TempFile::new("source");
    let mut cfg = config(2, "scenario=snapshot");
    cfg.run.snapshot = plan(&file.0, None, AfterSnapshot::Stop);
    let (before, console) = boot(&cfg);
    assert!(
        matches!(before.outcome, Outcome::Snapshotted { .. }),
        "{before}\n{console}"
    );
    let good = std::fs::read(&file.0).unwrap();
    let (header, ram) = split(&good);

    type Tamper = Box<dyn Fn(&mut serde_json::Value)>;
    let header_cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "three vCPUs, two states",
            Box::new(|h| h["machine"]["cpus"] = 3.into()),
            "3 vCPUs",
        ),
        (
            "an unknown field",
            Box::new(|h| h["extra"] = 1.into()),
            "unknown field",
        ),
        (
            "a device dropped from the list",
            Box::new(|h| {
                h["pci"]["devices"].as_array_mut().unwrap().pop();
            }),
            "device states",
        ),
        (
            "a remapping entry beyond the table",
            Box::new(|h| {
                h["interrupts"]["entries"].as_array_mut().unwrap()[0][0] = 70000.into();
            }),
            "interrupt-core",
        ),
        (
            "a VT-d queue tail beyond the queue",
            Box::new(|h| h["vtd"]["iqt"] = u64::MAX.into()),
            "VT-d",
        ),
        (
            "a slot device with another slot count",
            Box::new(|h| {
                h["pci"]["devices"][0]["ImsSlots"]["slots"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
            "ims-slots",
        ),
        (
            "a run setting inside the machine",
            Box::new(|h| h["machine"]["watchdog"] = 5.into()),
            "settings of a run",
        ),
        (
            "an IOAPIC with a pin missing",
            Box::new(|h| {
                h["vm"]["ioapic"]["entries"].as_array_mut().unwrap().pop();
            }),
            "IOAPIC with 23 entries",
        ),
    ];
    let mut cases: Vec<(String, Vec<u8>, String)> = header_cases
        .into_iter()
        .map(|(what, tamper, reason)| {
            let mut h = header.clone();
            tamper(&mut h);
            (what.to_string(), join(&good, &h, &ram), reason.to_string())
        })
        .collect();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    cases.push(("no magic".into(), bad_magic, "not a snapshot".into()));
    let mut version = good.clone();
    version[8] = 1;
    cases.push(("format version 1".into(), version, "version 1".into()));
    cases.push((
        "one byte short".into(),
        good[..good.len() - 1].to_vec(),
        "bytes long".into(),
    ));
    let mut long = good.clone();
    long.push(0);
    cases.push(("one byte long".into(), long, "bytes long".into()));
    // The page map (right after the header) claims a page the file does not hold: the
    // last page of RAM, which the guest never touched.
    let mut claimed = ram.clone();
    let map_len = 64 * 1024 * 1024 / 4096 / 8;
    assert_eq!(
        claimed[map_len - 1] & 0x80,
        0,
        "the last page is not in the file"
    );
    claimed[map_len - 1] |= 0x80;
    cases.push((
        "a page map that claims a page more".into(),
        join(&good, &header, &claimed),
        "bytes long".into(),
    ));
    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("a huge header length".into(), huge, "header".into()));
    cases.push(("empty".into(), Vec::new(), "not a snapshot".into()));

    let tampered = TempFile::new("tampered");
    for (what, bytes, reason) in cases {
        std::fs::write(&tampered.0, &bytes).unwrap();
        match restore(&tampered.0, &run_settings()) {
            Ok((report, _)) => panic!("{what}: restored and ran:\n{report}"),
            Err(e) => assert!(e.contains(&reason), "{what}: `{e}` does not say `{reason}`"),
        }
    }
    // The untouched file still restores.
    std::fs::write(&tampered.0, &good).unwrap();
    let (report, console) = restore(&tampered.0, &run_settings()).unwrap();
    assert!(report.passed(), "{report}\n{console}");
}
