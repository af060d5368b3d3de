//! Starting a VM's threads (each with the VM's trace and its seccomp filter), and waiting
//! for one with a deadline (the VM's threads, the device loop), without waiting for ever
//! on one stuck inside a device.

use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
