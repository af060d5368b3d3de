//! The client side of per-entry host interrupts: a vfio-user device that announces the
//! entries' interrupt index ([`super::server::ENTRY_IRQ_INDEX`]) is the host of its
//! requester's remapping entries ([`irq::control::HostInterrupts`]). The core hands it an
//! entry's eventfd when the entry becomes present and takes it back when it goes absent;
//! this sends those as `SET_IRQS` on the entries' index, one message per run of
//! consecutive entries (split by the server's descriptor limit), and checks every reply.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use irq::control::{HostInterrupts, HostRefusal};
use vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_EVENTFD;
use vmm_sys_util::eventfd::EventFd;

use super::server::ENTRY_IRQ_INDEX;
use super::{Client, VfioUserError};

/// A device's remapping entries, as the host of their interrupts.
#[derive(Debug)]
pub struct RemoteEntries {
    client: Arc<Mutex<Client>>,
    /// `SET_IRQS` messages sent.
    messages: AtomicU64,
}

/// Runs of consecutive indexes in `sorted`: (first, length).
fn runs(sorted: impl Iterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for i in sorted {
        match out.last_mut() {
            Some((first, len)) if first.checked_add(*len) == Some(i) => *len += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

impl RemoteEntries {
    /// The host of the entries of the device behind `client`, if it announces the entries'
    /// interrupt index with eventfds.
    #[must_use]
    pub fn of(client: &Arc<Mutex<Client>>) -> Option<Self> {
        let locked = client.lock().unwrap_or_else(PoisonError::into_inner);
        let info = locked.irqs().get(ENTRY_IRQ_INDEX as usize).copied()?;
        (info.count > 0 && info.flags & VFIO_IRQ_INFO_EVENTFD != 0).then(|| Self {
            client: client.clone(),
            messages: AtomicU64::new(0),
        })
    }

    /// `SET_IRQS` messages sent so far.
    #[must_use]
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// What a failed request means to the core: the device refused, or (the connection is
/// broken) it is gone.
pub(super) fn refusal(client: &Client, e: &VfioUserError) -> HostRefusal {
    let reason = crate::report::error_chain(e);
    if client.is_broken() {
        HostRefusal::Gone(reason)
    } else {
        HostRefusal::Refused(reason)
    }
}

impl HostInterrupts for RemoteEntries {
    fn hand_over(&self, entries: &[(u32, EventFd)]) -> Result<(), HostRefusal> {
        let mut sorted: Vec<&(u32, EventFd)> = entries.iter().collect();
        sorted.sort_by_key(|(i, _)| *i);
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        let fds: Vec<i32> = sorted.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let mut sent: Vec<(u32, u32)> = Vec::new();
        let mut at = 0usize;
        let chunk = client.caps().max_msg_fds.max(1) as usize;
        for (first, len) in runs(sorted.iter().map(|(i, _)| *i)) {
            let part = fds.get(at..at + len as usize).unwrap_or_default();
            at += len as usize;
            self.messages
                .fetch_add(part.len().div_ceil(chunk) as u64, Ordering::Relaxed);
            // A run goes in several messages: a refusal may come after some were taken.
            sent.push((first, len));
            if let Err(e) = client.set_irq_eventfds(ENTRY_IRQ_INDEX, first, part) {
                let answer = refusal(&client, &e);
                // All or none: whatever this call handed over comes back.
                if !client.is_broken() {
                    for &(first, len) in &sent {
                        self.messages.fetch_add(1, Ordering::Relaxed);
                        let _ = client.clear_irqs(ENTRY_IRQ_INDEX, first, len);
                    }
                }
                return Err(answer);
            }
        }
        Ok(())
    }

    fn take_back(&self, entries: &[u32]) -> Result<(), HostRefusal> {
        let mut sorted = entries.to_vec();
        sorted.sort_unstable();
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        let mut answer = Ok(());
        for (first, len) in runs(sorted.into_iter()) {
            self.messages.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = client.clear_irqs(ENTRY_IRQ_INDEX, first, len) {
                answer = Err(refusal(&client, &e));
                if client.is_broken() {
                    break;
                }
            }
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn consecutive_entries_go_in_one_run() {
        assert_eq!(
            runs([3, 4, 5, 9, 10, 12].into_iter()),
            [(3, 3), (9, 2), (12, 1)]
        );
        assert_eq!(runs([u32::MAX, 0].into_iter()), [(u32::MAX, 1), (0, 1)]);
        assert!(runs(std::iter::empty()).is_empty());
    }
}
