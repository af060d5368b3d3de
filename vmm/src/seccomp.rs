//! Seccomp filters per thread kind (`--seccomp on|log|off`, README "Seccomp"): each VMM
//! thread allows the system calls its work needs and nothing else, installed by
//! [`crate::threads::spawn`] before the thread's work begins (before it touches anything a
//! guest controls), and for the `vmm run`/`vmm restore` main thread once the VM runs.
//!
//! Filters are built with `seccompiler` (Firecracker's compiler). A thread inherits the
//! filter of the thread that made it and adds its own, so the main thread, which starts
//! vCPU threads and the device loop again after a pause, allows what they need as well.
//!
//! - `on`: a call outside the filter traps; the handler writes one line naming the thread,
//!   the call and its number to stderr, and the process exits with status 125.
//! - `log`: the call is made, and the kernel logs it (its audit log, `dmesg`: `type=1326 ...
//!   syscall=N`).
//! - `off`: no filter.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Once;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What a thread's filter does with a call it does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Stop the VMM, naming the thread and the call.
    #[default]
    On,
    /// Let the call through; the kernel logs it.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("invalid seccomp `{s}`: expected on, log or off")),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: KVM_RUN, exits, devices' registers, the hypercall, vfio-user requests.
    Vcpu,
    /// The devices' event loop (`ims-devices`).
    Devices,
    /// Storm control's ticker.
    Storms,
    /// The test harness's thread.
    Harness,
    /// A thread the harness starts to hold a device.
    HarnessHold,
    /// The control API's accepting thread.
    Api,
    /// A control-API connection.
    ApiConnection,
    /// The `vmm run`/`vmm restore` main thread while the VM runs: it supervises, takes
    /// snapshots, restarts vCPU threads and the device loop after a pause, and tears the
    /// VM down.
    Main,
}

/// What every thread may do: memory, locks, signals, time, its own end, logging and
/// tracing (writes), and what a panic or an abort needs to report itself.
const COMMON: &[&str] = &[
    "read",
    "write",
    "writev",
    "close",
    "futex",
    "madvise",
    "mmap",
    "mprotect",
    "munmap",
    "mremap",
    "brk",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigaction",
    "sigaltstack",
    "sched_yield",
    "sched_getaffinity",
    "gettid",
    "getpid",
    "tgkill",
    "getrandom",
    "clock_nanosleep",
    "nanosleep",
    "clock_gettime",
    "restart_syscall",
    "exit",
    "exit_group",
    // Allowed by this list, but made to fail (EACCES) by a second filter in every thread
    // but the main one: glibc's malloc opens /proc/sys/vm/overcommit_memory once, from
    // whichever thread first shrinks a heap, and copes with the open failing.
    "openat",
];
const VCPU: &[&str] = &[
    "ioctl", "eventfd2", "fcntl", "recvfrom", "recvmsg", "sendto", "sendmsg", "poll", "ppoll",
];
const DEVICES: &[&str] = &[
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "ioctl",
    "timerfd_settime",
    "timerfd_gettime",
    "eventfd2",
    "fcntl",
    "recvfrom",
    "recvmsg",
    "sendto",
    "sendmsg",
    "poll",
    "ppoll",
];
/// What starting a thread takes, in the parent and (under the parent's filter, until its
/// own is in place) in the child: the thread itself, then installing the child's filter.
const SPAWN: &[&str] = &[
    "clone3",
    "clone",
    "set_robust_list",
    "rseq",
    "prctl",
    "seccomp",
];
const HARNESS: &[&str] = &["eventfd2", "fcntl", "ioctl", "poll"];
const API: &[&str] = &[
    "poll",
    "ppoll",
    "accept4",
    "accept",
    "getsockopt",
    "geteuid",
    "setsockopt",
    "ioctl",
    "fcntl",
];
const API_CONNECTION: &[&str] = &[
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "setsockopt",
    "ioctl",
    "fcntl",
    "shutdown",
];
const MAIN: &[&str] = &[
    "ioctl",
    "openat",
    "newfstatat",
    "statx",
    "fstat",
    "lseek",
    "fsync",
    "fdatasync",
    "ftruncate",
    // A snapshot asks which pages of RAM the host backs.
    "mincore",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "eventfd2",
    "fcntl",
    "epoll_ctl",
    "recvmsg",
    "sendmsg",
    "recvfrom",
    "sendto",
    "poll",
    "ppoll",
    "shutdown",
];

impl ThreadKind {
    /// Its name in messages.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Devices => "devices",
            Self::Storms => "storms",
            Self::Harness => "harness",
            Self::HarnessHold => "harness-hold",
            Self::Api => "api",
            Self::ApiConnection => "api-connection",
            Self::Main => "main",
        }
    }

    /// The system calls its filter allows.
    #[must_use]
    pub fn allowed(self) -> Vec<&'static str> {
        let own: &[&[&str]] = match self {
            Self::Vcpu => &[VCPU],
            Self::Devices => &[DEVICES],
            Self::Storms | Self::HarnessHold => &[],
            Self::Harness => &[HARNESS, SPAWN],
            // A thread keeps its parent's filter under its own: a parent allows what its
            // children need.
            Self::Api => &[API, SPAWN, API_CONNECTION],
            Self::ApiConnection => &[API_CONNECTION],
            // The threads it restarts after a pause: vCPUs and the device loop.
            Self::Main => &[MAIN, SPAWN, VCPU, DEVICES],
        };
        let mut all: Vec<&str> = COMMON
            .iter()
            .chain(own.iter().copied().flatten())
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A name in a filter is not a system call of this architecture (a bug).
    #[error("unknown system call `{0}` in a seccomp filter")]
    UnknownSyscall(&'static str),
    /// The filter could not be built or installed.
    #[error("cannot install the {kind} thread's seccomp filter: {reason}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

include!("seccomp_names.rs");

/// The number of system call `name` (x86_64).
#[must_use]
pub fn syscall_number(name: &str) -> Option<i64> {
    if let Some(n) = NAMES_LOW.split(' ').position(|s| s == name) {
        return i64::try_from(n).ok();
    }
    let n = NAMES_HIGH.split(' ').position(|s| s == name)?;
    i64::try_from(n).ok().map(|n| n + 424)
}

/// The name of system call `number` (x86_64), if it has one.
#[must_use]
pub fn syscall_name(number: i64) -> Option<&'static str> {
    let (names, first) = if number >= 424 {
        (NAMES_HIGH, 424)
    } else {
        (NAMES_LOW, 0)
    };
    let at = usize::try_from(number.checked_sub(first)?).ok()?;
    names.split(' ').nth(at).filter(|n| *n != "-")
}

/// The BPF program of `kind`'s filter in `mode` (`None` when off).
///
/// # Errors
/// [`SeccompError`] for a filter that cannot be built.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules = BTreeMap::new();
    for name in kind.allowed() {
        let nr = syscall_number(name).ok_or(SeccompError::UnknownSyscall(name))?;
        rules.insert(nr, Vec::new());
    }
    let fail = |reason: String| SeccompError::Install {
        kind: kind.name(),
        reason,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| fail(e.to_string()))?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|e| fail(e.to_string()))
}

/// The filter that makes `openat` fail with EACCES (everything else passes to the other
/// filter): the kernel takes the stricter of the two answers.
fn no_files() -> Result<BpfProgram, SeccompError> {
    let fail = |reason: String| SeccompError::Install {
        kind: "files",
        reason,
    };
    let nr = syscall_number("openat").ok_or(SeccompError::UnknownSyscall("openat"))?;
    let rules = BTreeMap::from([(nr, Vec::new())]);
    let errno = u32::try_from(libc::EACCES).unwrap_or(13);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        TargetArch::x86_64,
    )
    .map_err(|e| fail(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| fail(e.to_string()))
}

thread_local! {
    /// The seccomp mode of the VM this thread works for (set by `run_vm`, handed on by
    /// [`crate::threads::spawn`]).
    static MODE: Cell<SeccompMode> = const { Cell::new(SeccompMode::Off) };
    /// This thread's name as the trap handler writes it (NUL-padded).
    static LABEL: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

static CONFINE_MAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks that the thread running a VM (`vmm::run`, `vmm::restore`) be filtered as
/// [`ThreadKind::Main`] once the VM runs. For a program whose main thread has nothing else
/// to do afterwards (the `vmm` binary's `run` and `restore`); a test or an embedder that
/// goes on after the VM leaves it unset.
pub fn confine_main_thread() {
    CONFINE_MAIN.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`confine_main_thread`] was asked for.
#[must_use]
pub fn main_thread_confined() -> bool {
    CONFINE_MAIN.load(std::sync::atomic::Ordering::Relaxed)
}

/// The calling thread's VM's seccomp mode.
#[must_use]
pub fn current_mode() -> SeccompMode {
    MODE.with(Cell::get)
}

/// Makes `mode` the calling thread's until the guard drops.
#[must_use]
pub fn scope(mode: SeccompMode) -> ModeScope {
    ModeScope(MODE.with(|m| m.replace(mode)))
}

/// Restores the previous mode when dropped.
#[derive(Debug)]
pub struct ModeScope(SeccompMode);

impl Drop for ModeScope {
    fn drop(&mut self) {
        MODE.with(|m| m.set(self.0));
    }
}

/// Installs `kind`'s filter on the calling thread (nothing when `mode` is off).
///
/// # Errors
/// [`SeccompError`]: the filter could not be built or the kernel refused it.
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(bpf) = program(kind, mode)? else {
        return Ok(());
    };
    install_trap_handler();
    let mut label = [0u8; 16];
    let current = std::thread::current();
    let name = current.name().unwrap_or(kind.name()).as_bytes();
    let n = name.len().min(15);
    if let (Some(dst), Some(src)) = (label.get_mut(..n), name.get(..n)) {
        dst.copy_from_slice(src);
    }
    LABEL.with(|l| l.set(label));
    let fail = |e: seccompiler::Error| SeccompError::Install {
        kind: kind.name(),
        reason: e.to_string(),
    };
    if kind != ThreadKind::Main {
        seccompiler::apply_filter(&no_files()?).map_err(fail)?;
    }
    seccompiler::apply_filter(&bpf).map_err(fail)?;
    #[cfg(debug_assertions)]
    probe(kind);
    Ok(())
}

/// Test builds only: `VMM_SECCOMP_PROBE=KIND` makes a thread of that kind make a call its
/// filter does not allow (`getppid`), right after its filter is in place.
#[cfg(debug_assertions)]
fn probe(kind: ThreadKind) {
    if std::env::var("VMM_SECCOMP_PROBE").is_ok_and(|k| k == kind.name()) {
        // SAFETY: getppid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

/// Appends `bytes` to `buf` at `*len`, as far as it fits.
fn push(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    for b in bytes {
        if let Some(slot) = buf.get_mut(*len) {
            *slot = *b;
            *len += 1;
        }
    }
}

/// The SIGSYS handler of `on` mode: one line on stderr, then exit 125. It only reads
/// thread-local and static data, formats on the stack and makes two system calls every
/// filter allows (`write`, `exit_group`).
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `_sigsys`: the call's number is the int at byte
    // 24 of the siginfo (after signo, errno, code and padding, and the 8-byte call address).
    let nr = unsafe {
        info.cast::<u8>()
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut buf = [0u8; 200];
    let mut len = 0;
    push(&mut buf, &mut len, b"error: seccomp: thread ");
    let label = LABEL.with(Cell::get);
    let name_len = label.iter().position(|b| *b == 0).unwrap_or(label.len());
    push(
        &mut buf,
        &mut len,
        label.get(..name_len).unwrap_or_default(),
    );
    push(&mut buf, &mut len, b" made system call ");
    push(
        &mut buf,
        &mut len,
        syscall_name(i64::from(nr)).unwrap_or("?").as_bytes(),
    );
    push(&mut buf, &mut len, b" (");
    let mut digits = [0u8; 12];
    let mut d = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        d -= 1;
        if let Some(slot) = digits.get_mut(d) {
            *slot = b'0' + u8::try_from(v % 10).unwrap_or(0);
        }
        v /= 10;
        if v == 0 || d == 0 {
            break;
        }
    }
    push(&mut buf, &mut len, digits.get(d..).unwrap_or_default());
    push(
        &mut buf,
        &mut len,
        b"), which its seccomp filter does not allow; the VMM stops\n",
    );
    // SAFETY: `buf` holds `len` initialized bytes; write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(125);
    }
}

fn install_trap_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is an `extern "C"` function of
        // the SA_SIGINFO signature and does only async-signal-safe work.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigsys;
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_libc() {
        for (name, nr) in [
            ("read", libc::SYS_read),
            ("ioctl", libc::SYS_ioctl),
            ("getppid", libc::SYS_getppid),
            ("epoll_pwait", libc::SYS_epoll_pwait),
            ("timerfd_settime", libc::SYS_timerfd_settime),
            ("getrandom", libc::SYS_getrandom),
            ("rseq", libc::SYS_rseq),
            ("clone3", libc::SYS_clone3),
            ("statx", libc::SYS_statx),
        ] {
            assert_eq!(syscall_number(name), Some(nr), "{name}");
            assert_eq!(syscall_name(nr), Some(name));
        }
        assert_eq!(syscall_name(400), None);
        assert_eq!(syscall_name(-1), None);
    }

    #[test]
    fn every_filter_builds_and_none_allows_what_no_thread_needs() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Devices,
            ThreadKind::Storms,
            ThreadKind::Harness,
            ThreadKind::HarnessHold,
            ThreadKind::Api,
            ThreadKind::ApiConnection,
            ThreadKind::Main,
        ] {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                assert!(program(kind, mode).unwrap().is_some());
            }
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
            let allowed = kind.allowed();
            for never in [
                "execve",
                "fork",
                "ptrace",
                "mount",
                "open_by_handle_at",
                "getppid",
                "socket",
                "connect",
                "bind",
            ] {
                assert!(!allowed.contains(&never), "{} allows {never}", kind.name());
            }
        }
        // Only the main thread opens files; the others' openat fails (EACCES).
        assert!(ThreadKind::Vcpu.allowed().contains(&"openat"));
        no_files().unwrap();
        assert!(!ThreadKind::Storms.allowed().contains(&"ioctl"));
    }

    #[test]
    fn modes_read_and_print() {
        for m in ["on", "log", "off"] {
            assert_eq!(m.parse::<SeccompMode>().unwrap().to_string(), m);
        }
        "yes".parse::<SeccompMode>().unwrap_err();
    }
}
