//! Stopping and pausing a VM's threads on time, and what a run reads back at the end.

use super::*;

/// Pauses every vCPU thread (the pause flag is set): kicks each until it has handed its
/// vCPU back. A thread that ended on its own hands its vCPU back as well.
pub(super) fn pause_vcpus(threads: Vec<JoinHandle<VcpuFd>>) -> Vec<VcpuFd> {
    let begin = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && begin.elapsed() < Duration::from_secs(10) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            vcpu::kick(t);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    threads.into_iter().filter_map(|t| t.join().ok()).collect()
}

/// With storm control on, a thread that delivers the coalesced interrupts of throttled
/// entries every window, until `stop` (which wakes it at once).
pub(super) fn spawn_storm_ticker(
    path: &Arc<InterruptPath>,
    rate: u32,
    stop: Arc<crate::threads::StopSignal>,
    gate: Arc<Mutex<()>>,
) -> io::Result<Option<JoinHandle<()>>> {
    if rate == 0 {
        return Ok(None);
    }
    let path = path.clone();
    crate::threads::spawn(
        crate::seccomp::ThreadKind::Storms,
        "irq-storms".into(),
        move || {
            while !stop.wait(irq::storm::WINDOW) {
                // A snapshot holds the gate while the VM is paused.
                let _open = gate.lock().unwrap_or_else(PoisonError::into_inner);
                path.flush_throttled();
            }
        },
    )
    .map(Some)
}

/// Kicks every vCPU thread until it has left `KVM_RUN`, then joins it; a thread still
/// running at `deadline` (inside a device call) is left to end on its own. Returns how
/// many were.
pub(super) fn stop_vcpus(threads: Vec<JoinHandle<VcpuFd>>, deadline: Instant) -> u32 {
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            vcpu::kick(t);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut stuck = 0;
    for t in threads {
        if join_by(t, deadline).is_none() {
            stuck += 1;
        }
    }
    stuck
}

/// How long a stopping VM waits for its threads (vCPUs, harness, storm ticker, device
/// loop) before it ends without those still inside a device call.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Remapping faults recorded by the data path, by reason.
pub(super) fn remap_faults(backing: &SharedBacking) -> Vec<(u8, u64)> {
    let path = backing.lock().path();
    FaultReason::ALL
        .iter()
        .map(|r| (r.code(), path.fault_log().count(*r)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Interrupts per vCPU from the harness counter table, if the guest keeps it.
pub(super) fn guest_counts(
    mem: &GuestMemoryMmap,
    placement: &Placement,
    cpus: u32,
) -> Option<Vec<u64>> {
    let base = placement.mailbox;
    let valid: u32 = mem
        .read_obj(GuestAddress(base + harness::offset::COUNTS_VALID as u64))
        .ok()?;
    if valid != 1 {
        return None;
    }
    (0..cpus as usize)
        .map(|cpu| {
            (32..=255u8)
                .map(|v| {
                    let at = GuestAddress(base + harness::counter_offset(cpu, v) as u64);
                    mem.read_obj::<u32>(at).map(u64::from).ok()
                })
                .sum()
        })
        .collect()
}
