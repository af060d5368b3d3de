//! The `vmm` binary's confinement, as a user runs it: seccomp filters on every thread
//! (each mode, and a forbidden call made on purpose), the resource bounds it checks at
//! start, and running as an unprivileged user.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{fails_with, scratch, text};

/// The VMM needs nothing as root: given a KVM device node it may open, an unprivileged
/// user runs the default machine (both IMS devices, 65,536-entry table), writes a trace
/// and serves nothing it should not. Run as root, the test makes such a node (same device
/// numbers as /dev/kvm) owned by `nobody` and drops to that user for the run; run as
/// anyone else, it is already that user.
#[test]
fn an_unprivileged_user_with_access_to_kvm_runs_the_vmm() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;

    const NOBODY: u32 = 65534;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = scratch("unprivileged");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.env_remove("RUST_LOG");
    let node = if root {
        let kvm = std::fs::metadata("/dev/kvm").expect("/dev/kvm exists");
        let node = dir.join("kvm");
        let path = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; makes a character device node with /dev/kvm's numbers.
        let made = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, kvm.rdev()) };
        assert_eq!(
            made,
            0,
            "this machine does not let root make a device node ({}); check by hand as README \"Privileges\" says",
            std::io::Error::last_os_error()
        );
        for p in [&dir, &node] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // From root, std also drops the supplementary groups (setgroups(0)).
        cmd.uid(NOBODY).gid(NOBODY);
        node
    } else {
        PathBuf::from("/dev/kvm")
    };
    let out = cmd
        .args(["run", "--console", "off", "--kvm-device"])
        .arg(&node)
        .arg("--trace")
        .arg(&trace)
        .output()
        .expect("the vmm binary runs (as nobody: every directory up to it must be world-readable)");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("vmm: verdict     PASS"), "{stdout}");
    let meta = std::fs::metadata(&trace).unwrap();
    if root {
        assert_eq!(meta.uid(), NOBODY, "the run was nobody's");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `VMM_SECCOMP_PROBE=KIND` (debug builds only) makes a thread of that kind call
/// `getppid`, which no filter allows, right after its filter is in place.
fn probe(kind: &str, seccomp: &str) -> Output {
    let socket = scratch(&format!("probe-{kind}-{seccomp}.sock"));
    let _ = std::fs::remove_file(&socket);
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "run",
            "--console",
            "off",
            "--seccomp",
            seccomp,
            "--api-socket",
        ])
        .arg(&socket)
        .env_remove("RUST_LOG")
        .env("VMM_SECCOMP_PROBE", kind)
        .output()
        .expect("the vmm binary runs")
}

#[test]
fn a_call_outside_a_threads_filter_stops_the_vmm_naming_the_thread_and_the_call() {
    for (kind, thread) in [
        ("vcpu", "vcpu"),
        ("devices", "ims-devices"),
        ("storms", "irq-storms"),
        ("harness", "harness"),
        ("api", "vmm-api"),
        ("main", "main"),
    ] {
        let out = probe(kind, "on");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{kind}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: seccomp: thread {thread}"))
                && stderr.contains(
                    "made system call getppid (110), which its seccomp filter does not allow; the VMM stops"
                ),
            "{kind}: {stderr}"
        );
    }
    // Off: no filter, the call is made, the run passes.
    let out = probe("vcpu", "off");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// In log mode the call goes through and the kernel logs it (audit record type 1326,
/// in the kernel log).
#[test]
fn in_log_mode_the_call_is_made_and_the_kernel_logs_it() {
    let logged = || {
        let out = Command::new("dmesg").output().expect("dmesg runs");
        text(&out.stdout)
            .lines()
            .filter(|l| {
                l.contains("type=1326")
                    && l.contains("comm=\"ims-devices\"")
                    && l.contains("syscall=110")
            })
            .count()
    };
    // The kernel rate-limits these records (other tests' traps are logged too): a record
    // lost to that is tried again after the limit's interval.
    let mut seen = false;
    for _ in 0..3 {
        let before = logged();
        let out = probe("devices", "log");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("vmm: verdict     PASS"));
        if logged() > before {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(6));
    }
    assert!(seen, "no audit record of the call in the kernel log");
}

/// While a VM runs, every thread of the process runs filtered (`Seccomp: 2` in
/// /proc/PID/task/*/status): the main thread, the vCPUs, the device loop, storm control,
/// the harness and the API's thread.
#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    let socket = scratch("filtered.sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "run",
            "--console",
            "off",
            "--cmdline",
            "scenario=api",
            "--api-socket",
        ])
        .arg(&socket)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let begin = std::time::Instant::now();
    let ask = |path: &str| {
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["api", socket.to_str().unwrap(), path])
            .output()
            .unwrap()
    };
    while !ask("/api/v1/vmm.ping").status.success() {
        assert!(begin.elapsed().as_secs() < 60, "no API socket");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_string();
        threads.push((name.trim().to_string(), mode));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "api",
            socket.to_str().unwrap(),
            "/api/v1/vm.shutdown",
            "-X",
            "PUT",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(child.wait().unwrap().success());
    for name in [
        "vmm",
        "vcpu0",
        "vcpu1",
        "ims-devices",
        "irq-storms",
        "harness",
        "vmm-api",
    ] {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "no thread {name}: {threads:?}"
        );
    }
    assert!(threads.iter().all(|(_, mode)| mode == "2"), "{threads:?}");
}

#[test]
fn a_quota_outside_the_table_is_refused() {
    for bad in ["0", "65537"] {
        fails_with(
            &["run", "--max-entries-per-device", bad],
            125,
            &format!("invalid max_entries_per_device {bad}: 1 to 65536"),
        );
    }
}

/// The descriptors a VM may need are counted at start: below them the VM does not start
/// and says how many it needs; fewer routes need fewer.
#[test]
fn too_low_an_open_file_limit_is_refused_at_start_with_the_number_needed() {
    use std::os::unix::process::CommandExt;
    let limited = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.args(["run", "--console", "off"])
            .args(extra)
            .env_remove("RUST_LOG");
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: 1024,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd.output().expect("the vmm binary runs")
    };
    let out = limited(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.starts_with("error: cannot raise the open-file limit: need ")
            && stderr.contains("but the limit is 1024 (hard limit 1024)"),
        "{stderr}"
    );
    let out = limited(&["--max-routes", "256"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
