//! Host-side figure for devices in another process: what it costs to give a device the
//! host interrupts of 2,048 entries, per entry as the guest makes them present (what this
//! VMM does; the server's descriptor limit, one for the `vfio_user` crate's server, sets
//! the message count) beside all at once in messages of 16 (what cloud-hypervisor sends
//! when the guest enables MSI-X), on the same server.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use irq::control::HostInterrupts;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Figure;
use crate::vfio_user::entries::RemoteEntries;
use crate::vfio_user::server::{self, ENTRY_IRQ_INDEX};
use crate::vfio_user::{Client, DEFAULT_TIMEOUT};
use crate::vm::VmError;

fn failed(what: &'static str, e: &dyn std::error::Error) -> VmError {
    VmError::Os(what, std::io::Error::other(crate::report::error_chain(e)))
}

/// The hand-over of `entries` eventfds: per entry (median, p99), and eager in 16s.
///
/// # Errors
/// The server or the connection could not be had, or a request failed.
pub(super) fn handover(entries: u32, samples: usize) -> Result<(Figure, Figure), VmError> {
    let socket = std::env::temp_dir().join(format!("vmm-bench-fds-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let served = server::serve_slots_here(&socket, 64)
        .map_err(|e| failed("serve the hand-over benchmark's device", &e))?;
    let connected = Client::connect(&socket, DEFAULT_TIMEOUT);
    let _ = std::fs::remove_file(&socket);
    let client = Arc::new(Mutex::new(
        connected.map_err(|e| failed("connect to the benchmark's device", &e))?,
    ));
    let host = RemoteEntries::of(&client).ok_or_else(|| {
        VmError::Os(
            "the benchmark's device",
            std::io::Error::other("it announces no entries' interrupt index"),
        )
    })?;
    let fds: Vec<EventFd> = (0..entries)
        .map(|_| EventFd::new(EFD_NONBLOCK))
        .collect::<Result<_, _>>()
        .map_err(|e| VmError::Os("create the benchmark's eventfds", e))?;
    let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let all: Vec<u32> = (0..entries).collect();
    let (mut per_entry, mut eager) = (Vec::new(), Vec::new());
    for _ in 0..samples.max(1) {
        let copies: Vec<(u32, EventFd)> = fds
            .iter()
            .zip(0..)
            .map(|(fd, i)| fd.try_clone().map(|fd| (i, fd)))
            .collect::<Result<_, _>>()
            .map_err(|e| VmError::Os("duplicate the benchmark's eventfds", e))?;
        let begin = Instant::now();
        host.hand_over(&copies)
            .map_err(|e| VmError::Os("hand over", std::io::Error::other(format!("{e:?}"))))?;
        per_entry.push(begin.elapsed());
        host.take_back(&all)
            .map_err(|e| VmError::Os("take back", std::io::Error::other(format!("{e:?}"))))?;

        let mut c = client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let begin = Instant::now();
        c.set_irq_eventfds_in(ENTRY_IRQ_INDEX, 0, &raw, 16)
            .map_err(|e| failed("send eventfds in 16s", &e))?;
        eager.push(begin.elapsed());
        c.clear_irqs(ENTRY_IRQ_INDEX, 0, entries)
            .map_err(|e| failed("take eventfds back", &e))?;
    }
    drop(host);
    drop(client);
    let _ = served.join();
    Ok((Figure::of(per_entry), Figure::of(eager)))
}
