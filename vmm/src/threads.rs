//! Waiting for a thread with a deadline (the VM's threads, the device loop), without
//! waiting for ever on one stuck inside a device.

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
