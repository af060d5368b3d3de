//! Whole-VM figures: a VM's lifecycle with and without devices, a snapshot of a guest
//! that touched 8 MiB beside one that touched all its RAM (size, pause, restore to the
//! first instruction), and the `vmm` binary's start to the guest's first instruction.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{BenchConfig, Figure};
use crate::config::{
    AfterSnapshot, Console, DeviceConfig, Kernel, MachineConfig, RunConfig, SnapshotPlan, VmConfig,
};
use crate::vm::VmError;

/// Runs of each lifecycle (alternating with and without devices).
const LIFECYCLE_RUNS: usize = 10;
/// Snapshots (and restores) of each size.
const SNAPSHOT_RUNS: usize = 7;
/// Processes started for the startup figure.
const STARTUP_RUNS: usize = 5;
/// MiB the smaller snapshot's guest touches.
pub const TOUCHED_MIB: u32 = 8;
/// How long any one of these VMs may run.
const WATCHDOG: Duration = Duration::from_secs(120);

/// A VM's whole life, from the run call to its return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lifecycle {
    /// The default machine (two IMS devices).
    pub with_devices: Figure,
    /// The same without devices.
    pub without_devices: Figure,
}

/// Snapshots of one guest, taken and restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotRow {
    /// MiB the guest wrote (0: all of its free RAM).
    pub touched_mib: u32,
    /// The file's size (the median run's).
    pub bytes: u64,
    /// How long the VM was paused to take it.
    pub pause: Figure,
    /// From the restore call to the restored guest's first instruction.
    pub restore: Figure,
}

/// The whole-VM figures.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WholeVm {
    /// Lifecycle with and without devices.
    pub lifecycle: Lifecycle,
    /// The guest that touched [`TOUCHED_MIB`], then the one that touched all its RAM.
    pub snapshots: Vec<SnapshotRow>,
    /// From the `vmm` process's start to the guest's first instruction, the default
    /// machine (65,536-entry table, two IMS devices); `None` when the benchmark does not
    /// run in the `vmm` binary.
    pub startup: Option<Figure>,
}

fn machine(cmdline: &str, devices: Option<Vec<DeviceConfig>>) -> MachineConfig {
    let mut m = MachineConfig {
        kernel: Kernel::BuiltIn,
        cmdline: cmdline.into(),
        ..MachineConfig::default()
    };
    if let Some(devices) = devices {
        m.devices = devices;
    }
    m
}

fn run_config(config: &BenchConfig) -> RunConfig {
    RunConfig {
        console: Console::Off,
        watchdog: Some(WATCHDOG),
        kvm_device: config.kvm_device.clone(),
        ..RunConfig::default()
    }
}

fn failed(what: &'static str, why: String) -> VmError {
    VmError::Os(what, std::io::Error::other(why))
}

/// One VM run that must pass (or take its snapshot); its report.
fn run_one(vm: &VmConfig, what: &'static str) -> Result<crate::RunReport, VmError> {
    let report = crate::vm::run_with_console(vm, Box::new(std::io::sink()))?;
    let snapshotted = matches!(report.outcome, crate::Outcome::Snapshotted { .. });
    if !report.passed() && !snapshotted {
        return Err(failed(what, format!("{:?}", report.outcome)));
    }
    Ok(report)
}

fn lifecycle(config: &BenchConfig) -> Result<Lifecycle, VmError> {
    let with = VmConfig {
        machine: machine("scenario=smoke", None),
        run: run_config(config),
    };
    let without = VmConfig {
        machine: machine("scenario=smoke", Some(Vec::new())),
        ..with.clone()
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..LIFECYCLE_RUNS {
        for (vm, times) in [(&with, &mut a), (&without, &mut b)] {
            let begin = Instant::now();
            run_one(vm, "run a VM's whole life")?;
            times.push(begin.elapsed());
        }
    }
    Ok(Lifecycle {
        with_devices: Figure::of(a),
        without_devices: Figure::of(b),
    })
}

/// One snapshot of a guest that touched `touched_mib` (0: all its RAM), taken to `file`
/// and restored: its pause, size and restore to the first instruction.
fn snapshot_once(
    config: &BenchConfig,
    touched_mib: u32,
    file: &Path,
) -> Result<(Duration, u64, Duration), VmError> {
    let mut vm = VmConfig {
        machine: machine(&format!("scenario=touch touch_mib={touched_mib}"), None),
        run: run_config(config),
    };
    vm.run.snapshot = Some(SnapshotPlan {
        path: file.to_path_buf(),
        after: None,
        then: AfterSnapshot::Stop,
    });
    let settings = crate::Settings {
        console: Some("off".into()),
        kvm_device: Some(config.kvm_device.clone()),
        watchdog: Some(WATCHDOG.as_secs()),
        ..crate::Settings::default()
    };
    let taken = run_one(&vm, "take a snapshot")?
        .snapshot
        .ok_or_else(|| failed("take a snapshot", "none was taken".into()))?;
    let restored = crate::vm::restore_with_console(file, &settings, Box::new(std::io::sink()))?;
    if !restored.passed() {
        return Err(failed(
            "restore a snapshot",
            format!("{:?}", restored.outcome),
        ));
    }
    Ok((
        taken.pause,
        taken.bytes,
        restored.startup.unwrap_or_default(),
    ))
}

/// Snapshots of each guest in `touched` (MiB; 0: all its RAM), alternating run by run so
/// that both see the same machine.
fn snapshot_rows(
    config: &BenchConfig,
    touched: &[u32],
    file: &Path,
) -> Result<Vec<SnapshotRow>, VmError> {
    let mut samples: Vec<(Vec<Duration>, Vec<u64>, Vec<Duration>)> =
        vec![Default::default(); touched.len()];
    for _ in 0..SNAPSHOT_RUNS {
        for (&mib, (pauses, sizes, restores)) in touched.iter().zip(samples.iter_mut()) {
            let (pause, bytes, restore) = snapshot_once(config, mib, file)?;
            pauses.push(pause);
            sizes.push(bytes);
            restores.push(restore);
        }
    }
    let _ = std::fs::remove_file(file);
    Ok(touched
        .iter()
        .zip(samples)
        .map(|(&touched_mib, (pauses, mut sizes, restores))| {
            sizes.sort_unstable();
            SnapshotRow {
                touched_mib,
                bytes: sizes.get(sizes.len() / 2).copied().unwrap_or(0),
                pause: Figure::of(pauses),
                restore: Figure::of(restores),
            }
        })
        .collect())
}

/// Starts the `vmm` binary on the default machine's quickest scenario and reads its
/// startup line.
fn startup(config: &BenchConfig, binary: &Path) -> Result<Figure, VmError> {
    let mut times = Vec::with_capacity(STARTUP_RUNS);
    for _ in 0..STARTUP_RUNS {
        let out = Command::new(binary)
            .args([
                "run",
                "--cmdline",
                "scenario=smoke",
                "--console",
                "off",
                "--kvm-device",
            ])
            .arg(&config.kvm_device)
            .output()
            .map_err(|e| VmError::Os("start the vmm binary", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ms = text
            .lines()
            .find_map(|l| l.strip_prefix("vmm: startup"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .filter(|_| out.status.success())
            .ok_or_else(|| {
                failed(
                    "time the vmm binary's start",
                    format!("{}{}", text, String::from_utf8_lossy(&out.stderr)),
                )
            })?;
        times.push(Duration::from_secs_f64(ms / 1e3));
    }
    Ok(Figure::of(times))
}

/// Measures the whole-VM figures; `binary` is the `vmm` binary, if the benchmark runs in
/// it (for the startup figure).
///
/// # Errors
/// A VM that could not run or failed, a snapshot not taken or not restored, or the binary
/// not started.
pub fn whole_vm(config: &BenchConfig, binary: Option<&PathBuf>) -> Result<WholeVm, VmError> {
    let lifecycle = lifecycle(config)?;
    let file = std::env::temp_dir().join(format!("vmm-bench-{}.snap", std::process::id()));
    let snapshots = snapshot_rows(config, &[TOUCHED_MIB, 0], &file)?;
    let startup = binary.map(|b| startup(config, b)).transpose()?;
    Ok(WholeVm {
        lifecycle,
        snapshots,
        startup,
    })
}
