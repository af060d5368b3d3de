//! IMS-capable devices: interrupt messages stored by the device itself, thousands of them,
//! always in remappable format (IMS depends on interrupt remapping). `docs/ims-device.md`
//! has the register and memory layouts.
//!
//! - [`slots`]: the slot-array kind: a BAR of message slots, work on virtio queues, each
//!   queue's completions raising the interrupt of the slot bound to it.
//! - [`queues`]: the queue-memory kind: the message sits in a queue context in guest RAM,
//!   cached by the device while the queue runs; an admin command queue starts and stops
//!   queues, and a command that does not complete in time resets the device.
//!
//! Both do their work on an event loop ([`ImsBackend`]), never on a vCPU thread: a
//! register write only records what is to be done and kicks the loop. The backend is an
//! `event-manager` subscriber (feature `event-manager`, on by default); without it, an
//! embedder's own loop waits on [`ImsBackend::fds`] and calls [`ImsBackend::ready`].

pub mod queues;
pub mod slots;
pub mod snapshot;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[cfg(feature = "event-manager")]
use event_manager::{EventOps, Events, MutEventSubscriber};
#[cfg(feature = "event-manager")]
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// Work taken off a device's rings and waiting for its completion: each item is due one
/// injected delay after the one before it (at once when there is no delay).
#[derive(Debug, Default)]
pub(crate) struct Deferred(VecDeque<(u32, u16, Instant)>);

impl Deferred {
    /// Queues the descriptor chain `head` of queue `queue`, `delay` after the last item
    /// (or after `now`).
    pub(crate) fn push(&mut self, queue: u32, head: u16, delay: Duration, now: Instant) {
        let last = self.0.back().map_or(now, |(.., at)| (*at).max(now));
        self.0.push_back((queue, head, last + delay));
    }

    /// The next item due by `now`: (queue, head).
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(u32, u16)> {
        let &(queue, head, at) = self.0.front()?;
        (at <= now).then(|| {
            self.0.pop_front();
            (queue, head)
        })
    }

    /// When the next item is due.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.front().map(|(.., at)| *at)
    }

    /// Whether queue `queue` has items waiting.
    pub(crate) fn holds(&self, queue: u32) -> bool {
        self.0.iter().any(|(q, ..)| *q == queue)
    }

    /// The items at `now`: queue, head, microseconds until due (0: due already).
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<(u32, u16, u64)> {
        self.0
            .iter()
            .map(|&(q, head, at)| {
                let left = at.saturating_duration_since(now).as_micros();
                (q, head, u64::try_from(left).unwrap_or(u64::MAX))
            })
            .collect()
    }

    /// Items from a snapshot, due from `now` on, for a device with `queues` queues.
    pub(crate) fn restore(
        items: &[(u32, u16, u64)],
        queues: u32,
        now: Instant,
    ) -> Result<Self, snapshot::RestoreError> {
        let mut out = VecDeque::with_capacity(items.len());
        let mut last = now;
        for &(q, head, left_us) in items {
            if q >= queues {
                return Err(snapshot::RestoreError(
                    "deferred work of a queue beyond the device",
                ));
            }
            // Due times stay in order (each item is due after the one before it).
            let at = (now + Duration::from_micros(left_us.min(u64::from(u32::MAX)))).max(last);
            last = at;
            out.push_back((q, head, at));
        }
        Ok(Self(out))
    }

    /// Drops every item.
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    /// Items waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Drops queue `queue`'s items.
    pub(crate) fn drop_queue(&mut self, queue: u32) {
        self.0.retain(|(q, ..)| *q != queue);
    }
}

/// How many more items a running queue may have taken and not completed: its size less
/// those in flight (taken, not yet on the used ring).
pub(crate) fn room(queue: &virtio_queue::Queue) -> u16 {
    use virtio_queue::QueueT;
    let in_flight = queue.next_avail().wrapping_sub(queue.next_used());
    queue.size().saturating_sub(in_flight)
}

/// A device whose work the backend runs.
pub trait ImsEngine: Send {
    /// The eventfd register writes signal when there is work.
    ///
    /// # Errors
    /// The error of duplicating it.
    fn kick_fd(&self) -> std::io::Result<EventFd>;
    /// Does whatever is due at `now`; returns when it next has something to do on its own
    /// (a delayed completion, a command deadline), if ever.
    fn run(&mut self, now: Instant) -> Option<Instant>;
}

/// The backend of one IMS device on an event loop: wakes on the device's kick eventfd and
/// on a timer for delayed work and command deadlines.
#[derive(Debug)]
pub struct ImsBackend<D: ImsEngine> {
    device: Arc<Mutex<D>>,
    kick: EventFd,
    timer: TimerFd,
}

impl<D: ImsEngine> ImsBackend<D> {
    /// The backend of `device`.
    ///
    /// # Errors
    /// The error of duplicating the device's eventfd or creating the timer.
    pub fn new(device: Arc<Mutex<D>>) -> std::io::Result<Self> {
        let kick = device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kick_fd()?;
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        // Non-blocking, so that reading a timer another event already re-armed cannot
        // stall the loop.
        // SAFETY: F_SETFL on a descriptor we own changes only its status flags.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            device,
            kick,
            timer,
        })
    }

    /// The descriptors to wait on for reading: the device's kick eventfd and the backend's
    /// timer.
    #[must_use]
    pub fn fds(&self) -> [RawFd; 2] {
        [self.kick.as_raw_fd(), self.timer.as_raw_fd()]
    }

    /// `fd` (one of [`Self::fds`]) is readable: consumes it and runs whatever work is due.
    pub fn ready(&mut self, fd: RawFd) {
        if fd == self.kick.as_raw_fd() {
            let _ = self.kick.read();
        } else {
            let _ = self.timer.wait();
        }
        self.run();
    }

    fn run(&mut self) {
        let now = Instant::now();
        let next = self
            .device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run(now);
        let arm = next.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(now)
                .max(Duration::from_micros(1))
        });
        // Disarming (zero) or arming a timer only fails on a bad descriptor.
        let _ = self.timer.reset(arm, None);
    }
}

#[cfg(feature = "event-manager")]
impl<D: ImsEngine> MutEventSubscriber for ImsBackend<D> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            self.ready(events.fd());
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration fails only if a descriptor is already registered.
        let _ = ops.add(Events::new(&self.kick, EventSet::IN));
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}

/// The interrupt core the device tests raise through (the fake-KVM core of `irq::fake`),
/// 1 MiB of RAM, and entries owned by `sid`.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use irq::backing::Limits;
    use irq::control::{EntryWrite, InterruptControl, Writer};
    use irq::fake::{FakeCore, FakeRouting};
    use irq::irte::{Irte, SourceValidation};
    use irq::msi::Target;
    use irq::Irqchip;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use crate::pci::PciFunction;

    /// A 32-bit write to BAR 0.
    pub fn w(dev: &mut impl PciFunction, offset: u64, value: u32) {
        dev.bar_write(0, offset, &value.to_le_bytes());
    }

    /// A 32-bit read of BAR 0.
    pub fn r(dev: &mut impl PciFunction, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.bar_read(0, offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Entries `(index, destination, vector)`, present and verifying `sid`.
    pub fn core(
        sid: u16,
        entries: &[(u32, u32, u8)],
    ) -> (FakeCore, Arc<FakeRouting>, GuestMemoryMmap) {
        let (core, kvm) = irq::fake::core(Irqchip::InKernel, 4096, Limits::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let writes: Vec<(u32, EntryWrite)> = entries
            .iter()
            .map(|&(index, dest, vector)| {
                let validation = SourceValidation::RequesterId { sid, qualifier: 0 };
                let entry = Irte::new(Target::fixed(dest, vector), validation);
                (index, EntryWrite::Entry(entry))
            })
            .collect();
        core.write(Writer::Platform, &writes).unwrap();
        (core, kvm, mem)
    }
}
