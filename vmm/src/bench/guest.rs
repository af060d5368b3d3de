//! In-guest figures: the built-in test guest's `bench` scenario, timed by the harness.

use std::time::Duration;

use super::{
    BenchConfig, ExitRow, Figure, GuestFigures, CONSOLE_TAIL, GUEST_CPUS, GUEST_WATCHDOG,
    REMOTE_PCI_SLOT, REMOTE_SLOTS, WINDOW,
};
use crate::config::{
    Console, DeviceConfig, DeviceKind, Kernel, MachineConfig, RunConfig, VmConfig,
};
use crate::harness::ExitTimes;
use crate::vm::{CapturedConsole, VmError};

/// Boots the test guest's `bench` scenario with the VM's threads filtered as `seccomp`
/// says and its retarget timings up to `retarget_max` live interrupts, and collects what
/// the harness measured.
pub(super) fn guest_figures(
    config: &BenchConfig,
    seccomp: crate::seccomp::SeccompMode,
    retarget_max: u32,
) -> Result<GuestFigures, VmError> {
    let mut slots: Vec<DeviceConfig> = DeviceConfig::defaults()
        .into_iter()
        .filter(|d| matches!(d.kind, DeviceKind::ImsSlots { .. }))
        .collect();
    // The same device in another process (a thread of this one behind a vfio-user
    // socket, so the harness can raise its slot directly): its interrupt is a write to
    // its entry's eventfd, as a device process's would be.
    let socket = std::env::temp_dir().join(format!("vmm-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let served =
        crate::vfio_user::server::serve_slots_here(&socket, REMOTE_SLOTS).map_err(|e| {
            VmError::Os(
                "serve the out-of-process device",
                std::io::Error::other(crate::report::error_chain(&e)),
            )
        })?;
    slots.push(DeviceConfig {
        kind: DeviceKind::VfioUser {
            socket: socket.clone(),
        },
        pci_slot: REMOTE_PCI_SLOT,
    });
    let samples = u32::try_from(config.samples).unwrap_or(u32::MAX);
    let vm = VmConfig {
        machine: MachineConfig {
            cpus: GUEST_CPUS,
            kernel: Kernel::BuiltIn,
            cmdline: format!(
                "scenario=bench bench_samples={samples} bench_interrupts={} bench_window={WINDOW} bench_live={} bench_retarget_max={}",
                config.interrupts, config.live, retarget_max
            ),
            devices: slots,
            // One requester makes the whole table live.
            max_entries_per_device: Some(irq::backing::snapshot::MAX_TABLE_SIZE),
            ..MachineConfig::default()
        },
        run: RunConfig {
            console: Console::Off,
            watchdog: Some(GUEST_WATCHDOG),
            kvm_device: config.kvm_device.clone(),
            seccomp,
            ..RunConfig::default()
        },
    };
    let console = CapturedConsole::default();
    let report = crate::vm::run_with_console(&vm, Box::new(console.clone()));
    let _ = std::fs::remove_file(&socket);
    let report = report?;
    // The VM is gone, so is its connection: the serving thread ends.
    let _ = served.join();
    if !report.passed() {
        let text = console.text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines
            .iter()
            .skip(lines.len().saturating_sub(CONSOLE_TAIL))
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(VmError::Os(
            "run the test guest's bench scenario",
            std::io::Error::other(format!("{:?}; console:\n{tail}", report.outcome)),
        ));
    }
    let m = report.measurements;
    let per_interrupt = |runs: &[(u32, Duration)]| {
        Figure::of(
            runs.iter()
                .map(|&(n, t)| t.checked_div(n).unwrap_or_default())
                .collect(),
        )
    };
    let exits = exit_rows(&m);
    Ok(GuestFigures {
        delivery_ours: Figure::of(m.delivery_ours),
        delivery_raw: Figure::of(m.delivery_raw),
        delivery_remote: Figure::of(m.delivery_remote),
        delivery_remote_raw: Figure::of(m.delivery_remote_raw),
        throughput_ours: per_interrupt(&m.throughput_ours),
        throughput_raw: per_interrupt(&m.throughput_raw),
        interrupts_per_run: config.interrupts,
        live_asked: config.live,
        max_live: m.max_live_delivered,
        exits,
    })
}

/// The timed exits by live interrupts: each size's `UPDATE`, one-entry `BATCH` and null
/// exits (a size missing one of them has that figure empty).
fn exit_rows(m: &crate::harness::Measurements) -> Vec<ExitRow> {
    // Each size's calls come in rounds (phases with the same label).
    let at = |phases: &[(u32, Vec<ExitTimes>)], live: u32| {
        let times: Vec<ExitTimes> = phases
            .iter()
            .filter(|(n, _)| *n == live)
            .flat_map(|(_, t)| t.iter().copied())
            .collect();
        (
            Figure::of(times.iter().map(|t| t.0).collect()),
            Figure::of(times.iter().map(|t| t.1).collect()),
        )
    };
    let mut sizes: Vec<u32> = m.retarget.iter().map(|&(live, _)| live).collect();
    sizes.dedup();
    sizes
        .into_iter()
        .map(|live| {
            let (update_share, update_trip) = at(&m.retarget, live);
            let (batch_share, batch_trip) = at(&m.batch_of_one, live);
            let (null_share, null_trip) = at(&m.null_exit, live);
            ExitRow {
                live,
                update_share,
                update_trip,
                batch_share,
                batch_trip,
                null_share,
                null_trip,
            }
        })
        .collect()
}
