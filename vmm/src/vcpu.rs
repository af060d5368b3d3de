//! vCPU threads: one per vCPU, each entering the guest until it is told to stop.
//!
//! Stopping: the controller sets the shared stop flag and "kicks" the thread with a
//! real-time signal whose handler does nothing; the signal makes a blocked `KVM_RUN`
//! return `EINTR`, and the loop sees the flag. A kick that lands just before the thread
//! enters `KVM_RUN` is missed, so the controller repeats it until the thread has ended.
//!
//! Pausing (for a snapshot) is the same with the pause flag: the thread first completes
//! any port or MMIO access still pending in KVM (so the vCPU's state is between two
//! instructions), reports nothing, and hands its `VcpuFd` back through its join handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{handle_exit, Action, Buses, ExitCounters, StopReason};
use crate::refused::syscall::{Hit, SyscallWatch};
use crate::refused::{self, Completions};
use devices::dispatch::HypercallHandler;

/// What vCPU threads and devices tell the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest reported its verdict on the debug-exit port.
    GuestExit(u32),
    /// The console showed the text the run waits for (`--until`).
    ConsoleMatched,
    /// A snapshot is due (the guest asked through the harness, or a library caller).
    SnapshotRequested,
    /// A vCPU stopped running.
    VcpuStopped {
        /// vCPU index.
        index: u32,
        /// Why.
        reason: StopReason,
    },
    /// A control-API request, to be answered.
    Api(crate::api::ApiCall),
}

/// Everything a vCPU thread shares with the rest of the VM.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    /// The buses its exits go to.
    pub buses: Arc<Buses>,
    /// Unmapped-access counters.
    pub counters: Arc<ExitCounters>,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Set when the VM is pausing.
    pub pause: Arc<AtomicBool>,
    /// Where it reports.
    pub events: Sender<VmEvent>,
    /// The hypercall dispatcher, when the VM offers the hypercall.
    pub hypercalls: Option<Arc<dyn HypercallHandler>>,
    /// Where hypercall times go while recording is on.
    pub hypercall_times: Arc<HypercallTimes>,
    /// Guest RAM, to read an instruction KVM gave up on when its exit lacks the bytes.
    pub memory: Option<GuestMemoryMmap>,
    /// Instructions KVM gave up on that the VMM completed.
    pub completions: Arc<Completions>,
    /// When a vCPU of the VM first entered the guest (`KVM_RUN`).
    pub first_entry: Arc<OnceLock<Instant>>,
}

/// The most samples [`HypercallTimes`] keeps between a start and a take.
pub const MAX_HYPERCALL_SAMPLES: usize = 100_000;

/// The "call number" [`HypercallTimes`] records an exit to the exit floor's port
/// ([`hypercall::platform::NULL_PORT`]) under.
pub const NULL_EXIT: u32 = u32::MAX;

/// One timed exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitTime {
    /// The call number ([`NULL_EXIT`] for the exit floor).
    pub number: u32,
    /// The VMM's share: from the exit (`KVM_RUN` returning) to the guest's re-entry (the
    /// next `KVM_RUN`).
    pub share: Duration,
    /// The round trip: from the exit to the vCPU's next exit (`KVM_RUN` returning again),
    /// which includes KVM's re-entry and the guest's own code up to its next exit.
    pub round_trip: Duration,
}

/// The host time of each hypercall (and exit-floor exit) of the vCPUs, by call number,
/// recorded only while switched on (for `vmm bench`, which switches it on through the test
/// harness).
#[derive(Debug, Default)]
pub struct HypercallTimes {
    recording: AtomicBool,
    samples: Mutex<Vec<ExitTime>>,
}

/// A timed exit whose round trip ends at the vCPU's next exit: its number, when it exited,
/// and the VMM's share.
type OpenExit = (u32, Instant, Duration);

impl HypercallTimes {
    /// Drops what was recorded and starts recording.
    pub fn start(&self) {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.recording.store(true, Ordering::Release);
    }

    /// Stops recording and returns what was recorded, at most [`MAX_HYPERCALL_SAMPLES`].
    pub fn take(&self) -> Vec<ExitTime> {
        self.recording.store(false, Ordering::Release);
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The moment of an exit, if hypercall times are being recorded (no clock read
    /// otherwise: this runs on every exit).
    fn exit_time(&self) -> Option<Instant> {
        self.recording.load(Ordering::Relaxed).then(Instant::now)
    }

    /// Call `number`, which exited at `exited`, is answered: its share ends now, its round
    /// trip at the vCPU's next exit ([`Self::close`]).
    fn open(number: u32, exited: Option<Instant>) -> Option<OpenExit> {
        exited.map(|at| (number, at, at.elapsed()))
    }

    /// The vCPU exited again (at `now`, when recording): records the open exit, if any.
    fn close(&self, open: &mut Option<OpenExit>, now: Option<Instant>) {
        let (Some((number, exited, share)), Some(now)) = (open.take(), now) else {
            return;
        };
        if self.recording.load(Ordering::Acquire) {
            let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
            if samples.len() < MAX_HYPERCALL_SAMPLES {
                samples.push(ExitTime {
                    number,
                    share,
                    round_trip: now.saturating_duration_since(exited),
                });
            }
        }
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process.
///
/// # Errors
/// The error of `sigaction`.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from);
    });
    result
}

/// Sends the kick signal to a vCPU thread.
pub fn kick<T>(handle: &JoinHandle<T>) {
    // An error means the thread has already exited, which is what a kick wants anyway.
    let _ = handle.kill(kick_signal());
}

/// Starts vCPU `index` on its own thread, which returns the vCPU when it ends.
///
/// # Errors
/// The error of spawning the thread.
pub fn spawn(vcpu: VcpuFd, index: u32, shared: VcpuShared) -> std::io::Result<JoinHandle<VcpuFd>> {
    crate::threads::spawn(
        crate::seccomp::ThreadKind::Vcpu,
        format!("vcpu{index}"),
        move || {
            let mut vcpu = vcpu;
            if let Some(reason) = run(&mut vcpu, &shared) {
                // The controller may already be gone; then nobody needs the report.
                let _ = shared.events.send(VmEvent::VcpuStopped { index, reason });
            }
            vcpu
        },
    )
}

/// Runs until stopped (`Some(why)`) or paused (`None`).
fn run(vcpu: &mut VcpuFd, shared: &VcpuShared) -> Option<StopReason> {
    let mut watch = SyscallWatch::default();
    if let Err(e) = watch.resume(vcpu, shared.memory.as_ref()) {
        return Some(StopReason::RunFailed(format!(
            "arming the syscall watch: {e}"
        )));
    }
    let mut open = None;
    shared.first_entry.get_or_init(Instant::now);
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Some(StopReason::Requested);
        }
        if shared.pause.load(Ordering::Acquire) {
            complete_pending(vcpu);
            return None;
        }
        let result = vcpu.run();
        let exited = shared.hypercall_times.exit_time();
        shared.hypercall_times.close(&mut open, exited);
        let action = match result {
            Ok(exit) => handle_exit(exit.into(), &shared.buses, &shared.counters),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Action::Continue
            }
            Err(e) => Action::Stop(StopReason::RunFailed(e.to_string())),
        };
        match action {
            Action::Continue => {}
            Action::Hypercall => match hypercall(vcpu, shared, true) {
                Ok(number) => open = HypercallTimes::open(number, exited),
                Err(reason) => return Some(reason),
            },
            Action::Null => open = HypercallTimes::open(NULL_EXIT, exited),
            Action::NarrowHypercall => {
                if let Err(reason) = hypercall(vcpu, shared, false) {
                    return Some(reason);
                }
            }
            Action::Refused => {
                let done = refused::complete(vcpu, shared.memory.as_ref(), &shared.completions);
                if let Err(suberror) = done {
                    let rip = vcpu.get_regs().ok().map(|r| r.rip);
                    return Some(StopReason::InternalError { suberror, rip });
                }
            }
            Action::Breakpoint(pc) => match watch.hit(vcpu, shared.memory.as_ref(), pc) {
                Ok(Some(Hit::Completed)) => shared.completions.count(refused::Kind::Syscall),
                Ok(Some(Hit::Native | Hit::Passed)) => {}
                Ok(None) => return Some(StopReason::Unhandled(format!("debug exit at {pc:#x}"))),
                Err(e) => return Some(StopReason::RunFailed(format!("syscall watch: {e}"))),
            },
            Action::LstarWritten(value) => {
                if let Err(e) = watch.lstar_written(vcpu, shared.memory.as_ref(), value) {
                    return Some(StopReason::RunFailed(format!("IA32_LSTAR write: {e}")));
                }
            }
            Action::Stop(reason) => return Some(describe(vcpu, reason)),
        }
    }
}

/// Completes a port or MMIO access KVM still holds from the last exit, without running
/// a guest instruction (`KVM_RUN` with `immediate_exit`; KVM API, "KVM_RUN"): afterwards
/// the vCPU's state can be read and later restored as is.
fn complete_pending(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; anything else leaves the state as KVM has it.
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// Handles a doorbell ring through the library's helper, which keeps KVM's order for the
/// pending `out` (this VMM's vCPUs share their registers: the answer rides on the next
/// `KVM_RUN`). Returns the call number. A ring of the wrong width (`call` false) is
/// answered `UNSUPPORTED` and nothing else.
fn hypercall(vcpu: &mut VcpuFd, shared: &VcpuShared, call: bool) -> Result<u32, StopReason> {
    devices::dispatch::answer_doorbell(vcpu, shared.hypercalls.as_deref(), call)
        .map_err(|e| StopReason::RunFailed(e.to_string()))
}

/// Adds what KVM can still tell about a stopped vCPU (its RIP).
fn describe(vcpu: &mut VcpuFd, reason: StopReason) -> StopReason {
    match reason {
        StopReason::TripleFault { .. } => StopReason::TripleFault {
            rip: vcpu.get_regs().ok().map(|r| r.rip),
        },
        other => other,
    }
}
