//! Human logs through the `log` facade, for events a guest can cause: each call site of
//! [`warn_limited!`](crate::warn_limited) lets at most [`PER_SECOND`] messages a second
//! through and says, on the next one it lets through, how many it held back. The library
//! crates only emit through the facade; the binary (or an embedder) chooses where the
//! messages go and which levels (`vmm` uses `env_logger`: `RUST_LOG=warn`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The facade, for the macros.
pub use log as facade;

/// Messages a second one call site lets through.
pub const PER_SECOND: u64 = 10;

/// One call site's limit: the second it counts in, the messages let through in it, and
/// those held back since the last one let through.
#[derive(Debug, Default)]
pub struct Limit {
    second: AtomicU64,
    passed: AtomicU64,
    held: AtomicU64,
}

fn seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl Limit {
    /// A limit with nothing counted.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether a message may go out now (`Some`, with how many were held back before
    /// it) or is held back (`None`).
    pub fn check(&self) -> Option<u64> {
        self.check_at(seconds())
    }

    /// [`Limit::check`] at second `now` (monotonic).
    pub fn check_at(&self, now: u64) -> Option<u64> {
        // `now + 1`: second 0 must differ from the initial 0.
        let tag = now + 1;
        if self.second.swap(tag, Ordering::Relaxed) != tag {
            self.passed.store(0, Ordering::Relaxed);
        }
        if self.passed.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::warn!`, limited per call site to [`PER_SECOND`](crate::logging::PER_SECOND)
/// messages a second; the first message after some were held back says how many.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::logging::Limit = $crate::logging::Limit::new();
        if $crate::logging::facade::log_enabled!($crate::logging::facade::Level::Warn) {
            match LIMIT.check() {
                Some(0) => $crate::logging::facade::warn!($($arg)+),
                Some(held) => $crate::logging::facade::warn!(
                    "{} ({} like it held back)",
                    format_args!($($arg)+),
                    held
                ),
                None => {}
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_a_second_then_the_count_of_those_held_back() {
        let limit = Limit::new();
        let passed = (0..25).filter(|_| limit.check_at(7).is_some()).count();
        assert_eq!(passed, 10);
        assert_eq!(limit.check_at(8), Some(15), "the next second says how many");
        assert_eq!(limit.check_at(8), Some(0));
        let limit = Limit::new();
        assert_eq!(limit.check_at(0), Some(0), "second 0 counts from nothing");
    }
}
