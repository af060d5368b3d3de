//! The guest side of `vmm bench` on real KVM: the test guest's `bench` scenario asks the
//! harness to time interrupts through an IMS device's slots beside raw irqfds, and every
//! timed interrupt must have been counted by the guest's handler on vCPU 0, once.

use hypercall::harness::BENCH_RUNS;
use integration_tests::{boot, config};

#[test]
fn bench_scenario_times_every_path_and_the_guest_counts_every_interrupt() {
    let cmdline = "scenario=bench bench_samples=40 bench_interrupts=96 bench_window=8 \
                   bench_live=300 bench_retarget_max=512";
    let (report, console) = boot(&config(2, cmdline));
    assert!(report.passed(), "{report}\n{console}");
    for line in [
        "bench: delivery: 40 samples through an IMS slot and through a raw irqfd, all counted",
        "bench: throughput: 10 runs of 96 interrupts over 8 vectors, all counted",
        "bench: 300 remapped interrupts live at once",
        "bench: 40 retargets timed with 1 live interrupts",
        "bench: 40 retargets timed with 512 live interrupts",
        "bench: 40 one-entry batches timed with 512 live interrupts",
        "bench: 40 null exits timed with 512 live interrupts",
    ] {
        assert!(console.contains(line), "{line} missing:\n{console}");
    }
    let m = &report.measurements;
    assert_eq!((m.delivery_ours.len(), m.delivery_raw.len()), (40, 40));
    assert!(m
        .delivery_ours
        .iter()
        .chain(&m.delivery_raw)
        .all(|t| !t.is_zero()));
    let runs = BENCH_RUNS as usize;
    assert_eq!(
        (m.throughput_ours.len(), m.throughput_raw.len()),
        (runs, runs)
    );
    assert!(m
        .throughput_ours
        .iter()
        .chain(&m.throughput_raw)
        .all(|&(n, t)| n == 96 && !t.is_zero()));
    assert_eq!(m.max_live_delivered, 300);
    // Every UPDATE, one-entry BATCH and null exit the guest made while recording, and
    // nothing else, was timed: each with a share and a round trip that holds it.
    // Twenty rounds of 2 at each size.
    let rounds = |live| std::iter::repeat_n((live, 2), 20);
    let expected: Vec<(u32, usize)> = rounds(1).chain(rounds(512)).collect();
    for timed in [&m.retarget, &m.batch_of_one, &m.null_exit] {
        let phases: Vec<(u32, usize)> = timed.iter().map(|(n, t)| (*n, t.len())).collect();
        assert_eq!(phases, expected);
        assert!(timed
            .iter()
            .flat_map(|(_, t)| t)
            .all(|(share, trip)| share < trip));
    }
    // Timed interrupts go to vCPU 0: 2 × 40 + 2 × 5 × 96, the live run's split evenly.
    let timed = 2 * 40 + 2 * BENCH_RUNS as u64 * 96;
    assert_eq!(report.harness_fired, vec![timed + 150, 150]);
    // The guest also counted the two wake-ups that end the timed requests.
    assert_eq!(report.interrupts, Some(vec![timed + 150 + 2, 150]));
    // Nothing went through the slots' error paths.
    assert!(report.devices.iter().all(|d| d.faults == 0), "{report}");
}

/// The same device served over vfio-user (by a thread of this process, as `vmm bench`
/// does): its delivery is timed apart, through its entry's eventfd.
#[test]
fn bench_scenario_times_a_device_in_another_process_beside_the_in_process_one() {
    let socket = std::env::temp_dir().join(format!("vmm-bench-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let served = vmm::vfio_user::server::serve_slots_here(&socket, 64).expect("served");
    let mut cfg = config(2, "scenario=bench bench_samples=30 bench_interrupts=32 bench_window=8 bench_live=64 bench_retarget_max=1");
    cfg.machine.devices.push(vmm::config::DeviceConfig {
        kind: vmm::config::DeviceKind::VfioUser {
            socket: socket.clone(),
        },
        pci_slot: 5,
    });
    let (report, console) = boot(&cfg);
    let _ = std::fs::remove_file(&socket);
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console.contains("bench: delivery: 30 samples through a slot of a device in another process and through a raw irqfd, all counted"),
        "{console}"
    );
    let m = &report.measurements;
    assert_eq!((m.delivery_ours.len(), m.delivery_raw.len()), (30, 30));
    assert_eq!(
        (m.delivery_remote.len(), m.delivery_remote_raw.len()),
        (30, 30)
    );
    assert!(m.delivery_remote.iter().all(|t| !t.is_zero()));
    let remote = report.devices[2].remote.expect("the served device");
    assert_eq!((remote.failed, remote.lost), (0, false), "{report}");
    // The delivery entry was handed over when made present and taken back when freed.
    assert!(remote.entry_messages.is_some_and(|n| n >= 2), "{report}");
    let done = served
        .join()
        .expect("the serving thread")
        .expect("served to the end");
    assert_eq!(done.held, 0, "every eventfd taken back");
    assert_eq!(done.raised, 30, "{done:?}");
}

#[test]
fn bench_scenario_without_an_ims_device_fails_and_says_why() {
    let mut cfg = config(1, "scenario=bench bench_samples=5");
    cfg.machine.devices.clear();
    let (report, console) = boot(&cfg);
    assert!(!report.passed(), "{report}\n{console}");
    assert!(
        console.contains("bench: FAIL: no slot-array IMS device (1b36:1100)"),
        "{console}"
    );
    assert!(report.measurements.delivery_ours.is_empty());
}
