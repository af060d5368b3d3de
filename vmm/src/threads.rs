//! Starting a VM's threads (each with the VM's trace and its seccomp filter), and waiting
//! for one with a deadline (the VM's threads, the device loop), without waiting for ever
//! on one stuck inside a device.

use std::io;
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// A stop request that threads wait on between periodic work, and that wakes them at once
/// (not at the end of their period).
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    /// Asks every waiter to stop, and wakes them.
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    /// Waits until a stop is asked or `period` has passed; returns whether a stop was
    /// asked.
    pub fn wait(&self, period: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) = self
            .changed
            .wait_timeout_while(stopped, period, |s| !*s)
            .unwrap_or_else(PoisonError::into_inner);
        *stopped
    }
}

/// An event loop's wake-up for a stop: the loop waits for events with no timeout, and the
/// thread that sets its stop flag writes the eventfd this subscriber watches, so the loop
/// sees the flag at once.
#[derive(Debug)]
pub struct StopWake(EventFd);

impl StopWake {
    /// A subscriber watching `wake` (a duplicate of it).
    ///
    /// # Errors
    /// The error of duplicating the descriptor.
    pub fn new(wake: &EventFd) -> io::Result<Self> {
        wake.try_clone().map(Self)
    }
}

impl MutEventSubscriber for StopWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The count only wakes the loop; its stop flag says what to do.
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration fails only if the descriptor is registered already.
        let _ = ops.add(Events::new(&self.0, EventSet::IN));
    }
}

/// Joins `thread` if it has ended by `deadline`; otherwise leaves it to finish on its
/// own (detached: what it holds is shared, and freed when it ends) and returns `None`.
pub fn join_by<T>(thread: JoinHandle<T>, deadline: Instant) -> Option<T> {
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if thread.is_finished() {
        thread.join().ok()
    } else {
        None
    }
}

/// Starts a thread of `kind` named `name` running `f`. It gets the calling thread's trace
/// (if it has one) and seccomp mode, so every thread a VM starts traces to that VM's trace
/// and runs filtered as that VM says; its filter is in place before `f` runs.
///
/// # Errors
/// The error of spawning the thread.
///
/// # Panics
/// Never in `f`'s place: a filter the kernel refuses aborts the process (a VMM thread
/// must not run unfiltered when filters are on), after saying why on stderr.
pub fn spawn<T: Send + 'static>(
    kind: crate::seccomp::ThreadKind,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let dispatch =
        tracing::dispatcher::get_default(|d| d.is::<crate::trace::Trace>().then(|| d.clone()));
    let mode = crate::seccomp::current_mode();
    std::thread::Builder::new().name(name).spawn(move || {
        let _mode = crate::seccomp::scope(mode);
        if let Err(e) = crate::seccomp::install(kind, mode) {
            eprintln!("error: {e}");
            std::process::abort();
        }
        match dispatch {
            Some(d) => tracing::dispatcher::with_default(&d, f),
            None => f(),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    /// Longer than any test runs: a waiter still waiting when it ends was not woken.
    const FOREVER: Duration = Duration::from_secs(3600);
    /// How long the tests wait for a woken thread to end (a liveness bound, not a timing:
    /// an unwoken one would wait for `FOREVER`).
    const LIVENESS: Duration = Duration::from_secs(60);

    #[test]
    fn a_stop_wakes_a_periodic_waiter_at_once() {
        let signal = Arc::new(StopSignal::default());
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait(FOREVER))
        };
        assert!(!signal.wait(Duration::ZERO), "not stopped yet");
        signal.stop();
        let stopped = join_by(waiter, Instant::now() + LIVENESS);
        assert_eq!(stopped, Some(true), "woken by the stop, not its period");
        assert!(signal.wait(FOREVER), "a stopped signal does not wait");
    }

    #[test]
    fn an_event_loop_without_a_timeout_ends_when_its_stop_writes_the_wake() {
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().unwrap();
        events.add_subscriber(Box::new(StopWake::new(&wake).unwrap()));
        let stop = Arc::new(AtomicBool::new(false));
        let looping = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u32;
                while !stop.load(Ordering::Acquire) {
                    events.run().unwrap();
                    rounds += 1;
                }
                rounds
            })
        };
        stop.store(true, Ordering::Release);
        wake.write(1).unwrap();
        let rounds = join_by(looping, Instant::now() + LIVENESS);
        assert!(rounds.is_some_and(|n| n <= 1), "{rounds:?}");
    }
}
