//! The file-descriptor limit: every line of live remapped interrupts holds an eventfd (and
//! a managed entry holds one of its own from its allocation on), so a VM with thousands of
//! them needs more descriptors than the usual soft limit of 1024.

use thiserror::Error;

/// The limit could not be raised as far as needed.
#[derive(Debug, Error)]
#[error("need {wanted} open file descriptors but the limit is {soft} (hard limit {hard}) and cannot be raised")]
pub struct FdLimitError {
    /// Descriptors wanted.
    pub wanted: u64,
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit in force.
    pub hard: u64,
    /// Why `setrlimit` refused.
    #[source]
    pub source: std::io::Error,
}

fn get() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc == 0 {
        Ok(limit)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises `RLIMIT_NOFILE` to at least `wanted` (the hard limit too, which needs
/// `CAP_SYS_RESOURCE`, if it is lower). Returns the soft limit now in force.
///
/// # Errors
/// [`FdLimitError`] when the limit cannot be raised that far.
pub fn raise_fd_limit(wanted: u64) -> Result<u64, FdLimitError> {
    let current = get().map_err(|source| FdLimitError {
        wanted,
        soft: 0,
        hard: 0,
        source,
    })?;
    if current.rlim_cur >= wanted {
        return Ok(current.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: current.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit reads the struct we pass; it changes only this process's limit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    if rc == 0 {
        Ok(wanted)
    } else {
        Err(FdLimitError {
            wanted,
            soft: current.rlim_cur,
            hard: current.rlim_max,
            source: std::io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_only_goes_up() {
        let now = get().unwrap().rlim_cur;
        assert_eq!(raise_fd_limit(now.saturating_sub(1)).unwrap(), now);
        assert!(raise_fd_limit(now).unwrap() >= now);
    }
}
