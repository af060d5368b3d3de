//! `vmm bench`: our interrupt paths beside what raw KVM charges for the same work, in one
//! run on one machine.
//!
//! In-guest figures, from the built-in test guest's `bench` scenario on a 2-vCPU VM with
//! one slot-array IMS device (the harness times, the guest checks every interrupt
//! arrived; `hypercall::harness` has the protocol):
//!
//! - **delivery latency**: from the device model raising an IMS slot (the slot's message,
//!   the remapping core, the entry's irqfd) until the guest's handler on vCPU 0 has
//!   counted it, beside a raw irqfd on a plain MSI route to the same vCPU and vector,
//!   sample by sample, alternating;
//! - **throughput**: interrupts per second through the device's slots beside raw irqfds,
//!   with one interrupt in flight per vector over a window of vectors;
//! - **live interrupts**: the largest number of remapped interrupts live at once that were
//!   all delivered (each raised once, through its irqfd line);
//! - **hypercall exits beside the floor**: the guest's `UPDATE` and one-entry `BATCH`
//!   hypercalls with 1, 512, 4,096 and 65,536 live interrupts, and the same guest loop's
//!   `out`s to a port the VMM answers with nothing (the floor), in rounds; each exit timed
//!   by the vCPU thread from `KVM_RUN` returning to the next `KVM_RUN` (the VMM's share,
//!   the headline retarget figure) and to `KVM_RUN` returning again (the round trip);
//! - **delivery from a device in another process**: the same slot raise on a slot-array
//!   device served over vfio-user (by a thread of this process, so the harness can raise
//!   it): one write to the eventfd of the slot's entry, which the VMM handed over.
//!
//! Host-side figures, measured in-process on a real KVM VM (in-kernel irqchip, no vCPU
//! needed):
//!
//! - **signal cost**: what a device model pays per interrupt: our data path (decode a
//!   remappable message, check the requester, write the entry's line) beside a bare
//!   eventfd write to a raw irqfd;
//! - **retarget**: one `UPDATE` hypercall through the dispatcher alone (lock, validation,
//!   transaction, route change, publish, and the write-through to a VT-d unit's mirror as
//!   in the VMM), with 1, 512, 4,096 and 65,536 live interrupts, and
//!   one whole-table `KVM_SET_GSI_ROUTING` of that many MSI routes (what a VMM that
//!   rebuilds the table pays per change; KVM takes at most 4,096, so the largest size has
//!   no baseline);
//! - **bulk activation**: one `BATCH` hypercall activating 2,048 entries, beside one
//!   2,048-entry `KVM_SET_GSI_ROUTING`;
//! - **host interrupts to a device in another process**: 2,048 entries' eventfds handed
//!   over per entry (the server's descriptor limit) beside all at once in messages of 16;
//! - **IMS-device DMA through the vIOMMU**: the slot-array device's ring work per item
//!   with its rings at IOVAs the VT-d unit translates, beside translation off and plain
//!   memory.
//!
//! Whole VMs (`lifecycle`): a VM's life with and without devices, snapshots of a guest
//! that touched 8 MiB and of one that touched all its RAM (size, pause, restore to the
//! first instruction), and the `vmm` binary's start to the guest's first instruction.
//!
//! Each figure is the median and 99th percentile of many samples. Nothing here is a
//! pass/fail check: the report says where a target is met and where it is not.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hypercall::abi::call;
use kvm_ioctls::Kvm;

use crate::vm::VmError;

mod dma;
mod guest;
mod host;
mod lifecycle;
mod remote;
mod report;

pub use dma::{DevicePaths, DmaFigures};
use guest::guest_figures;
use host::{irqchip_vm, new_rig, signal_cost, spread, time_set_routes};
pub use lifecycle::{Lifecycle, SnapshotRow, WholeVm, TOUCHED_MIB};
pub use report::{BenchReport, ExitRow, Figure, GuestFigures, RetargetRow};

/// Live-interrupt counts the retarget cost is measured at.
pub const RETARGET_SIZES: [u32; 4] = [1, 512, 4096, 65_536];
/// Live interrupts at which the seccomp comparison times the `UPDATE` exit.
pub const SECCOMP_LIVE: u32 = 512;
/// Retargets timed through the dispatcher alone at each size (at least; more with
/// `--samples`): it is cheap, and its first calls after the table is filled are not its
/// steady cost.
const DISPATCHER_SAMPLES: usize = 10_000;
/// Untimed retargets made first, at each size.
const DISPATCHER_WARMUP: u64 = 1_000;
/// Entries activated by one batch in the bulk figure.
pub const BULK_ENTRIES: u32 = 2048;
/// KVM's routing-table limit (one MSI route per GSI).
const KVM_MAX_ROUTES: u32 = 4096;
/// vCPUs the targets spread over (APIC IDs 0..CPUS).
const CPUS: u32 = 2;
/// Vectors per vCPU the targets spread over, from 0x30 (as the test guest's IMS driver
/// spreads its interrupts): the number of distinct targets, hence routes, is the same at
/// every size, so the table shows cost against live interrupts alone.
const VECTORS: u32 = 32;
/// The requester ID the benchmark allocates as.
const REQUESTER: u16 = 0x0018;
/// Where the batch array sits in the benchmark's guest memory.
const BATCH_ADDR: u64 = 0x1000;
/// vCPUs of the in-guest benchmark's VM.
const GUEST_CPUS: u32 = 2;
/// Vectors in flight in a throughput run.
const WINDOW: u32 = 32;
/// How long the in-guest benchmark may run.
const GUEST_WATCHDOG: Duration = Duration::from_secs(1800);
/// Slots of the out-of-process device the delivery comparison uses.
const REMOTE_SLOTS: u32 = 64;
/// Where it sits on the guest's bus.
const REMOTE_PCI_SLOT: u8 = 5;
/// Samples of the hand-over comparison (each moves 2,048 eventfds).
const HANDOVER_SAMPLES: usize = 20;
/// Console lines kept to explain a failed in-guest run.
const CONSOLE_TAIL: usize = 20;

/// What to measure and where to put it.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Samples per figure.
    pub samples: usize,
    /// Interrupts per throughput run.
    pub interrupts: u32,
    /// Remapped interrupts to make live at once (halved until all are delivered).
    pub live: u32,
    /// The `vmm` binary, when the benchmark runs in it: the startup figure starts it.
    pub vmm_binary: Option<PathBuf>,
}

/// The time of one allowed system call (`gettid`, 1,000 per sample) on a thread under the
/// vCPU filter, and on a thread without one.
fn syscall_cost(samples: usize) -> Result<(Figure, Figure), VmError> {
    let time = |mode: crate::seccomp::SeccompMode| {
        let _scope = crate::seccomp::scope(mode);
        crate::threads::spawn(
            crate::seccomp::ThreadKind::Vcpu,
            "seccomp-cost".into(),
            move || {
                (0..samples)
                    .map(|_| {
                        let begin = Instant::now();
                        for _ in 0..1000 {
                            // SAFETY: gettid takes no arguments and cannot fail.
                            unsafe { libc::syscall(libc::SYS_gettid) };
                        }
                        begin.elapsed() / 1000
                    })
                    .collect::<Vec<_>>()
            },
        )
        .map_err(|e| VmError::Os("start the seccomp timing thread", e))?
        .join()
        .map_err(|_| {
            VmError::Os(
                "time system calls",
                std::io::Error::other("the thread panicked"),
            )
        })
    };
    let on = time(crate::seccomp::SeccompMode::On)?;
    let off = time(crate::seccomp::SeccompMode::Off)?;
    Ok((Figure::of(on), Figure::of(off)))
}

/// Runs every benchmark: the in-guest ones first, then the host-side ones.
///
/// # Errors
/// KVM could not be opened or a VM set up, the test guest's bench scenario failed, or a
/// call the benchmark relies on failed.
pub fn run(config: &BenchConfig) -> Result<BenchReport, VmError> {
    let max = RETARGET_SIZES.iter().copied().max().unwrap_or(0);
    let guest = guest_figures(config, crate::seccomp::SeccompMode::On, max)?;
    // The same guest without seccomp filters, for their cost: delivery and the UPDATE
    // exit up to 512 live (a shorter run: fewer live interrupts asked for).
    let shorter = BenchConfig {
        live: config.live.min(SECCOMP_LIVE),
        ..config.clone()
    };
    let unfiltered = guest_figures(&shorter, crate::seccomp::SeccompMode::Off, SECCOMP_LIVE)?;
    let (syscall_filtered, syscall_unfiltered) = syscall_cost(config.samples.max(1))?;
    let open_error = |source| VmError::OpenKvm {
        path: config.kvm_device.clone(),
        source,
    };
    let device = std::ffi::CString::new(config.kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| open_error(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(device).map_err(open_error)?;
    let samples = config.samples.max(1);

    let mut retarget = Vec::new();
    for live in RETARGET_SIZES {
        let rig = new_rig(&kvm)?;
        let first = rig.populate(live)?;
        // Move entry k to the target of entry k + 1 (or to the other CPU when there is
        // only one entry): always a target that already has a route.
        let timed = samples.max(DISPATCHER_SAMPLES) as u64;
        let mut times = Vec::with_capacity(samples.max(DISPATCHER_SAMPLES));
        let moves = u64::from(live.max(2));
        for s in 0..DISPATCHER_WARMUP + timed {
            let k = (s * 7919) % u64::from(live);
            let to = spread(u32::try_from((k + 1 + s) % moves).unwrap_or(0));
            let begin = Instant::now();
            rig.checked("retarget", call::UPDATE, first + k, to)?;
            if s >= DISPATCHER_WARMUP {
                times.push(begin.elapsed());
            }
        }
        let rebuild = if live <= KVM_MAX_ROUTES {
            Some(time_set_routes(&irqchip_vm(&kvm)?, live, samples)?)
        } else {
            None
        };
        let exit_to_entry = guest
            .exits
            .iter()
            .find(|r| r.live == live)
            .map(|r| r.update_share);
        retarget.push(RetargetRow {
            live,
            exit_to_entry,
            ours: Figure::of(times),
            rebuild,
        });
    }

    let rig = new_rig(&kvm)?;
    let first = rig
        .checked("allocate", call::ALLOCATE, u64::from(BULK_ENTRIES), 0)?
        .rsi;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        times.push(rig.batch(first, BULK_ENTRIES, spread)?);
        rig.batch(first, BULK_ENTRIES, |_| 0)?;
    }
    let bulk_ours = Figure::of(times);
    let bulk_raw = time_set_routes(&irqchip_vm(&kvm)?, BULK_ENTRIES, samples)?;
    let (signal_ours, signal_raw) = signal_cost(&kvm, samples)?;
    let (handover_per_entry, handover_eager) = remote::handover(BULK_ENTRIES, HANDOVER_SAMPLES)?;
    let dma = dma::dma_figures(&kvm, samples)?;
    let whole = lifecycle::whole_vm(config, config.vmm_binary.as_ref())?;
    Ok(BenchReport {
        dma,
        whole,
        handover_per_entry,
        handover_eager,
        retarget,
        bulk_ours,
        bulk_raw,
        signal_ours,
        signal_raw,
        guest,
        unfiltered,
        syscall_filtered,
        syscall_unfiltered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn figures_are_median_and_p99() {
        let f = Figure::of((1..=100).rev().map(us).collect());
        assert_eq!((f.median, f.p99, f.samples), (us(51), us(99), 100));
        assert_eq!(Figure::of(vec![us(7)]).median, us(7));
    }

    fn sample_whole_vm() -> WholeVm {
        let fig = |n| Figure {
            median: us(n),
            p99: us(2 * n),
            samples: 3,
        };
        WholeVm {
            lifecycle: Lifecycle {
                with_devices: fig(110),
                without_devices: fig(100),
            },
            snapshots: vec![
                SnapshotRow {
                    touched_mib: TOUCHED_MIB,
                    bytes: 9 << 20,
                    pause: fig(20),
                    restore: fig(5),
                },
                SnapshotRow {
                    touched_mib: 0,
                    bytes: 60 << 20,
                    pause: fig(200),
                    restore: fig(40),
                },
            ],
            startup: Some(fig(9000)),
        }
    }

    fn sample_report() -> BenchReport {
        let fig = |n| Figure {
            median: us(n),
            p99: us(2 * n),
            samples: 3,
        };
        BenchReport {
            retarget: vec![
                RetargetRow {
                    live: 4096,
                    exit_to_entry: Some(fig(4)),
                    ours: fig(2),
                    rebuild: Some(fig(1000)),
                },
                RetargetRow {
                    live: 65_536,
                    exit_to_entry: None,
                    ours: fig(5),
                    rebuild: None,
                },
            ],
            bulk_ours: fig(800),
            bulk_raw: fig(400),
            signal_ours: fig(1),
            signal_raw: fig(1),
            handover_per_entry: fig(300),
            handover_eager: fig(100),
            dma: DmaFigures {
                delivered: DevicePaths {
                    translated: fig(2),
                    untranslated: fig(2),
                    plain: fig(1),
                },
                ring_only: DevicePaths {
                    translated: fig(2),
                    untranslated: fig(1),
                    plain: fig(1),
                },
            },
            guest: GuestFigures {
                delivery_ours: fig(110),
                delivery_raw: fig(100),
                delivery_remote: fig(121),
                delivery_remote_raw: fig(100),
                throughput_ours: fig(100),
                throughput_raw: fig(80),
                interrupts_per_run: 2000,
                live_asked: 65_536,
                max_live: 32_768,
                exits: vec![
                    ExitRow {
                        live: 512,
                        update_share: fig(20),
                        update_trip: fig(200),
                        batch_share: fig(20),
                        batch_trip: fig(220),
                        null_share: fig(0),
                        null_trip: fig(100),
                    },
                    ExitRow {
                        live: 65_536,
                        update_share: fig(2),
                        update_trip: fig(110),
                        batch_share: fig(2),
                        batch_trip: fig(115),
                        null_share: fig(0),
                        null_trip: fig(100),
                    },
                ],
            },
            unfiltered: GuestFigures {
                delivery_ours: fig(100),
                delivery_raw: fig(100),
                exits: vec![ExitRow {
                    live: 512,
                    update_share: fig(16),
                    ..ExitRow::default()
                }],
                ..GuestFigures::default()
            },
            syscall_filtered: fig(1),
            syscall_unfiltered: fig(1),
            whole: sample_whole_vm(),
        }
    }

    #[test]
    fn json_leads_with_the_headline_ratios() {
        let report = sample_report();
        let near = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-9);
        assert!(near(report.retarget_speedup_at_4096(), 250.0));
        assert!(near(report.bulk_ratio(), 2.0));
        assert!(near(report.delivery_ratio(), 1.1));
        assert!(near(report.throughput_ratio(), 0.8));
        assert!(near(report.remote_delivery_ratio(), 1.1));
        assert!(near(report.handover_ratio(), 3.0));
        assert!(near(report.seccomp_delivery_ratio(), 1.1));
        assert!(near(report.seccomp_update_ratio(), 1.25));
        assert!(near(report.update_exit_ratio(), 1.1));
        assert!(near(report.batch_exit_ratio(), 1.15));
        assert!(near(report.dispatcher_us(), 5.0));
        assert!(near(report.lifecycle_ratio(), 1.1));
        assert!(near(report.snapshot_mib(), 9.0));
        assert!(near(report.snapshot_pause_ratio(), 0.1));
        assert!(near(report.restore_ms(), 0.005));
        assert!(near(report.startup_ms(), 9.0));
        let json = report.to_json();
        let keys: Vec<&str> = json.lines().skip(1).take(6).collect();
        assert_eq!(
            keys,
            [
                "  \"retarget_speedup_at_4096\": 250.000,",
                "  \"delivery_ratio\": 1.100,",
                "  \"max_live_interrupts\": 32768,",
                "  \"bulk_ratio\": 2.000,",
                "  \"remote_delivery_ratio\": 1.100,",
                "  \"handover_ratio\": 3.000,"
            ]
        );
        assert!(json.contains("\"whole_table_rebuild\": null"), "{json}");
        let text = report.to_string();
        assert!(text.contains("250x"), "{text}");
        assert!(text.contains("n/a"), "{text}");
        assert!(text.contains("ratio ours/raw 1.10x"), "{text}");
        // 80 us and 100 us per interrupt.
        assert!(text.contains("12500") && text.contains("10000"), "{text}");
        assert!(text.contains(": 32768 (asked for 65536)"), "{text}");
    }
}
