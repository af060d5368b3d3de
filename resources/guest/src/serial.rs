//! Polled output on COM1, shared by every CPU behind a spin lock.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{inb, outb};
use hypercall::platform::COM1_PORT;

static LOCK: AtomicBool = AtomicBool::new(false);

/// A handle that writes to COM1.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            // Line status register, bit 5: transmit holding register empty.
            while inb(COM1_PORT + 5) & 0x20 == 0 {
                core::hint::spin_loop();
            }
            outb(COM1_PORT, byte);
        }
        Ok(())
    }
}

/// Runs `f` with the console locked, so lines from different CPUs do not interleave.
pub fn with_lock(f: impl FnOnce(&mut Serial)) {
    while LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    f(&mut Serial);
    LOCK.store(false, Ordering::Release);
}

/// Writes without taking the lock (for fatal paths that may interrupt a lock holder).
pub fn write_unlocked(args: fmt::Arguments<'_>) {
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::with_lock(|s| {
            let _ = core::fmt::Write::write_fmt(s, format_args!($($arg)*));
            let _ = core::fmt::Write::write_str(s, "\n");
        })
    };
}
