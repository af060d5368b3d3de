//! What a vCPU exit means, decided by one function that tests drive with synthetic exits.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::{Arc, Mutex, PoisonError};

use devices::ioapic::IoApic;
use kvm_ioctls::VcpuExit;

use crate::bus::Bus;

/// The exits this VMM distinguishes, detached from `kvm_run`.
#[derive(Debug)]
pub enum Exit<'a> {
    /// `in` from a port.
    IoIn {
        /// Port.
        port: u16,
        /// Where the value goes (its length is the access size).
        data: &'a mut [u8],
    },
    /// `out` to a port.
    IoOut {
        /// Port.
        port: u16,
        /// The value written.
        data: &'a [u8],
    },
    /// A read of MMIO space.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Where the value goes.
        data: &'a mut [u8],
    },
    /// A write to MMIO space.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The value written.
        data: &'a [u8],
    },
    /// `hlt` handled in user space (not with KVM's local APICs).
    Hlt,
    /// The guest ended a level-triggered IOAPIC interrupt (split irqchip).
    IoapicEoi(u8),
    /// The run was interrupted by a signal (a kick).
    Interrupted,
    /// Triple fault.
    Shutdown,
    /// A system event (reset, shutdown, crash).
    SystemEvent(u32),
    /// KVM could not handle something (often an instruction it cannot emulate).
    InternalError,
    /// VM entry failed.
    FailEntry(u64),
    /// A guest-debug exit (the `syscall` watch's breakpoint, `refused::syscall`).
    Debug {
        /// Guest RIP.
        pc: u64,
    },
    /// A write of an MSR the VM's filter sends to user space (`IA32_LSTAR`).
    WriteMsr {
        /// MSR index.
        index: u32,
        /// The value written.
        data: u64,
    },
    /// Anything else.
    Other(String),
}

impl<'a> From<VcpuExit<'a>> for Exit<'a> {
    fn from(exit: VcpuExit<'a>) -> Self {
        match exit {
            VcpuExit::IoIn(port, data) => Self::IoIn { port, data },
            VcpuExit::IoOut(port, data) => Self::IoOut { port, data },
            VcpuExit::MmioRead(addr, data) => Self::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => Self::MmioWrite { addr, data },
            VcpuExit::Hlt => Self::Hlt,
            VcpuExit::IoapicEoi(vector) => Self::IoapicEoi(vector),
            VcpuExit::Intr => Self::Interrupted,
            VcpuExit::Shutdown => Self::Shutdown,
            VcpuExit::SystemEvent(kind, _) => Self::SystemEvent(kind),
            VcpuExit::InternalError => Self::InternalError,
            VcpuExit::FailEntry(reason, _) => Self::FailEntry(reason),
            VcpuExit::Debug(arch) => Self::Debug { pc: arch.pc },
            // KVM presets the exit's error to 0 (the write succeeds once the VMM has done
            // it: `refused::syscall`).
            VcpuExit::X86Wrmsr(exit) => Self::WriteMsr {
                index: exit.index,
                data: exit.data,
            },
            other => Self::Other(format!("{other:?}")),
        }
    }
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The VMM asked it to stop.
    Requested,
    /// The guest triple-faulted.
    TripleFault {
        /// Guest RIP, when it could be read.
        rip: Option<u64>,
    },
    /// The guest raised a system event.
    SystemEvent(u32),
    /// KVM reported an internal error.
    InternalError {
        /// `kvm_run.internal.suberror` (1: emulation failure).
        suberror: u32,
        /// Guest RIP, when it could be read.
        rip: Option<u64>,
    },
    /// VM entry failed.
    FailEntry(u64),
    /// An exit this VMM does not handle.
    Unhandled(String),
    /// `KVM_RUN` itself failed.
    RunFailed(String),
}

impl StopReason {
    /// Whether KVM or the VMM could not go on with the vCPU (rather than the guest or the
    /// VMM stopping it): such a stop ends the run at once.
    #[must_use]
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Self::InternalError { .. }
                | Self::FailEntry(_)
                | Self::Unhandled(_)
                | Self::RunFailed(_)
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |rip: &Option<u64>| rip.map_or_else(String::new, |r| format!(" at RIP {r:#x}"));
        match self {
            Self::Requested => write!(f, "stopped by the VMM"),
            Self::TripleFault { rip } => write!(f, "triple fault{}", at(rip)),
            Self::SystemEvent(kind) => write!(f, "system event {kind}"),
            Self::InternalError {
                suberror: 1,
                rip: r,
            } => {
                write!(f, "KVM could not emulate an instruction{}", at(r))
            }
            Self::InternalError { suberror, rip: r } => {
                write!(f, "KVM internal error (suberror {suberror}){}", at(r))
            }
            Self::FailEntry(reason) => write!(f, "VM entry failed (reason {reason:#x})"),
            Self::Unhandled(exit) => write!(f, "unhandled exit {exit}"),
            Self::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// The guest rang the hypercall doorbell: complete the `out`, then handle the call
    /// with the vCPU's registers.
    Hypercall,
    /// An `out` of 1 or 2 bytes to the hypercall doorbell: not a call. Complete the
    /// `out`, then answer `UNSUPPORTED` in RAX and change nothing else.
    NarrowHypercall,
    /// An `out` to the exit floor's port ([`hypercall::platform::NULL_PORT`]): nothing to
    /// do but re-enter (timed like a hypercall while hypercall times are recorded).
    Null,
    /// KVM gave up (an internal error, often an instruction its emulator refused): the
    /// vCPU loop sees whether the VMM completes the instruction (`refused`) and stops
    /// the vCPU with [`StopReason::InternalError`] otherwise.
    Refused,
    /// A debug exit: the `syscall` watch decides whether it was its breakpoint.
    Breakpoint(u64),
    /// The guest wrote `IA32_LSTAR`: the VMM writes it and moves the `syscall` watch.
    LstarWritten(u64),
    /// Stop this vCPU.
    Stop(StopReason),
}

/// Accesses that reached no device. Counted, never logged per access: a guest chooses
/// how many it makes.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port accesses with no device.
    pub unmapped_pio: AtomicU64,
    /// MMIO accesses with no device.
    pub unmapped_mmio: AtomicU64,
}

/// The two buses a vCPU's accesses go to.
#[derive(Debug, Default, Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
    /// The hypercall doorbell, when the VM offers the hypercall.
    pub hypercall_port: Option<u16>,
    /// The exit floor's port, when the VM has the test harness.
    pub null_port: Option<u16>,
    /// The userspace IOAPIC, told of the EOIs KVM reports.
    pub ioapic: Option<Arc<Mutex<IoApic>>>,
}

/// Decides what an exit means. Unmapped reads return all ones (a floating bus) and
/// unmapped writes are dropped; both are counted.
pub fn handle_exit(exit: Exit<'_>, buses: &Buses, counters: &ExitCounters) -> Action {
    let unmapped = |counter: &AtomicU64| {
        counter.fetch_add(1, Ordering::Relaxed);
    };
    match exit {
        // Only a 4-byte `out` is a call (docs/hypercall.md); an `in` from the doorbell
        // reads all ones, as from a port with no device.
        Exit::IoOut { port, data } if Some(port) == buses.hypercall_port => {
            return if data.len() == 4 {
                Action::Hypercall
            } else {
                Action::NarrowHypercall
            };
        }
        Exit::IoOut { port, .. } if Some(port) == buses.null_port => return Action::Null,
        Exit::IoIn { port, data } if Some(port) == buses.null_port => data.fill(0xff),
        Exit::IoIn { port, data } => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
                unmapped(&counters.unmapped_pio);
            }
        }
        Exit::IoOut { port, data } => {
            if !buses.pio.write(u64::from(port), data) {
                unmapped(&counters.unmapped_pio);
            }
        }
        Exit::MmioRead { addr, data } => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
                unmapped(&counters.unmapped_mmio);
            }
        }
        Exit::MmioWrite { addr, data } => {
            if !buses.mmio.write(addr, data) {
                unmapped(&counters.unmapped_mmio);
            }
        }
        // With KVM's local APICs KVM waits for interrupts itself; a HLT exit (or a
        // signal) just means "enter again".
        Exit::Hlt | Exit::Interrupted => {}
        Exit::IoapicEoi(vector) => {
            if let Some(ioapic) = &buses.ioapic {
                ioapic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .eoi(vector);
            }
        }
        Exit::Shutdown => return Action::Stop(StopReason::TripleFault { rip: None }),
        Exit::SystemEvent(kind) => return Action::Stop(StopReason::SystemEvent(kind)),
        Exit::InternalError => return Action::Refused,
        Exit::Debug { pc } => return Action::Breakpoint(pc),
        Exit::WriteMsr { index, data } if index == crate::refused::syscall::MSR_LSTAR => {
            return Action::LstarWritten(data)
        }
        Exit::WriteMsr { index, .. } => {
            return Action::Stop(StopReason::Unhandled(format!("write of MSR {index:#x}")))
        }
        Exit::FailEntry(reason) => return Action::Stop(StopReason::FailEntry(reason)),
        Exit::Other(what) => return Action::Stop(StopReason::Unhandled(what)),
    }
    Action::Continue
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use devices::BusDevice;

    use super::*;

    struct Latch(Vec<u8>);

    impl BusDevice for Latch {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[..data.len()]);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data.to_vec();
        }
    }

    fn buses() -> (Buses, Arc<Mutex<Latch>>) {
        let latch = Arc::new(Mutex::new(Latch(vec![0; 8])));
        let mut buses = Buses::default();
        buses.pio.insert(0x80, 1, latch.clone()).unwrap();
        buses
            .mmio
            .insert(0xd000_0000, 0x1000, latch.clone())
            .unwrap();
        (buses, latch)
    }

    #[test]
    fn port_and_mmio_accesses_reach_devices() {
        let (buses, latch) = buses();
        let counters = ExitCounters::default();
        let out = handle_exit(
            Exit::IoOut {
                port: 0x80,
                data: &[1, 2],
            },
            &buses,
            &counters,
        );
        assert_eq!(out, Action::Continue);
        let mut data = [0u8; 2];
        handle_exit(
            Exit::IoIn {
                port: 0x80,
                data: &mut data,
            },
            &buses,
            &counters,
        );
        assert_eq!(data, [1, 2]);
        handle_exit(
            Exit::MmioWrite {
                addr: 0xd000_0004,
                data: &[9; 4],
            },
            &buses,
            &counters,
        );
        assert_eq!(latch.lock().unwrap().0, vec![9; 4]);
        assert_eq!(counters.unmapped_pio.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unmapped_reads_float_high_and_are_counted() {
        let (buses, _) = buses();
        let counters = ExitCounters::default();
        let mut data = [0u8; 4];
        handle_exit(
            Exit::IoIn {
                port: 0x81,
                data: &mut data,
            },
            &buses,
            &counters,
        );
        assert_eq!(data, [0xff; 4]);
        handle_exit(
            Exit::IoOut {
                port: 0xffff,
                data: &[0],
            },
            &buses,
            &counters,
        );
        let mut data = [0u8; 8];
        handle_exit(
            Exit::MmioRead {
                addr: 0,
                data: &mut data,
            },
            &buses,
            &counters,
        );
        assert_eq!(data, [0xff; 8]);
        assert_eq!(counters.unmapped_pio.load(Ordering::Relaxed), 2);
        assert_eq!(counters.unmapped_mmio.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn fatal_exits_stop_the_vcpu_and_benign_ones_continue() {
        let (buses, _) = buses();
        let c = ExitCounters::default();
        assert_eq!(handle_exit(Exit::Hlt, &buses, &c), Action::Continue);
        assert_eq!(handle_exit(Exit::Interrupted, &buses, &c), Action::Continue);
        assert_eq!(
            handle_exit(Exit::Shutdown, &buses, &c),
            Action::Stop(StopReason::TripleFault { rip: None })
        );
        assert_eq!(
            handle_exit(Exit::SystemEvent(2), &buses, &c),
            Action::Stop(StopReason::SystemEvent(2))
        );
        assert_eq!(
            handle_exit(Exit::InternalError, &buses, &c),
            Action::Refused
        );
        assert_eq!(
            handle_exit(Exit::FailEntry(7), &buses, &c),
            Action::Stop(StopReason::FailEntry(7))
        );
        assert!(matches!(
            handle_exit(Exit::Other("Debug".into()), &buses, &c),
            Action::Stop(StopReason::Unhandled(_))
        ));
    }

    #[test]
    fn the_doorbell_is_a_hypercall_and_only_when_offered() {
        let (mut buses, _) = buses();
        let c = ExitCounters::default();
        let ring = || Exit::IoOut {
            port: 0x510,
            data: &[2, 0, 0, 0],
        };
        assert_eq!(handle_exit(ring(), &buses, &c), Action::Continue);
        assert_eq!(c.unmapped_pio.load(Ordering::Relaxed), 1);
        buses.hypercall_port = Some(0x510);
        assert_eq!(handle_exit(ring(), &buses, &c), Action::Hypercall);
        for data in [&[2u8][..], &[2, 0]] {
            let narrow = Exit::IoOut { port: 0x510, data };
            assert_eq!(handle_exit(narrow, &buses, &c), Action::NarrowHypercall);
        }
        let mut data = [0u8; 4];
        let read = Exit::IoIn {
            port: 0x510,
            data: &mut data,
        };
        assert_eq!(handle_exit(read, &buses, &c), Action::Continue);
        assert_eq!(data, [0xff; 4], "an `in` is no call");
    }

    #[test]
    fn stop_reasons_read_well() {
        let r = StopReason::InternalError {
            suberror: 1,
            rip: Some(0x20_0010),
        };
        assert_eq!(
            r.to_string(),
            "KVM could not emulate an instruction at RIP 0x200010"
        );
        assert_eq!(
            StopReason::TripleFault { rip: None }.to_string(),
            "triple fault"
        );
    }
}
