//! Requests about the platform: a device held (`HOLD_DEVICE`) and the IOAPIC's lines
//! (`IOAPIC_LINE`).

use super::*;

impl Harness {
    /// Holds device `sid`'s lock for `ms` milliseconds on a thread of its own (which
    /// outlives the VM if the VM ends first); answers once the lock is held.
    pub(super) fn hold_device(&self, sid: u16, ms: u32) -> u32 {
        let function = self.functions.0.iter().find(|(rid, _)| *rid == sid);
        let Some(function) = function
            .map(|(_, f)| f.clone())
            .filter(|_| (1..=harness::MAX_HOLD_MS).contains(&ms))
        else {
            return status::BAD_ARGUMENT;
        };
        let (held, is_held) = std::sync::mpsc::channel();
        let spawned = crate::threads::spawn(
            crate::seccomp::ThreadKind::HarnessHold,
            "harness-hold".into(),
            move || {
                let _device = function.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = held.send(());
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
            },
        );
        match spawned.map(|_| is_held.recv()) {
            Ok(Ok(())) => status::OK,
            _ => status::HOST_ERROR,
        }
    }

    pub(super) fn ioapic_line(&self, pin: u32, mode: u32, result: &mut u32) -> u32 {
        let Some(chip) = &self.ioapic else {
            return status::UNAVAILABLE;
        };
        let pin = match usize::try_from(pin) {
            Ok(p) if p < ioapic::PINS && mode <= 2 => p,
            _ => return status::BAD_ARGUMENT,
        };
        let mut io = chip.lock().unwrap_or_else(PoisonError::into_inner);
        let before = io.sent();
        match mode {
            0 => io.set_level(pin, false),
            1 => io.set_level(pin, true),
            _ => io.pulse(pin),
        }
        *result = u32::try_from(io.sent().saturating_sub(before)).unwrap_or(u32::MAX);
        status::OK
    }
}
