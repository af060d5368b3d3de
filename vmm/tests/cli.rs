//! The `vmm` binary as a user runs it: exit codes, summary, and one clear error line for
//! each kind of bad input. These boot real guests on `/dev/kvm`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    // The default log filter, whatever the caller's environment says.
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the vmm binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a failure with exactly one stderr line containing `message`.
fn fails_with(args: &[&str], code: i32, message: &str) {
    let out = vmm(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in {stderr}"
    );
}

/// `RUST_LOG=warn` shows what the guest caused, one warning per event (rate limited),
/// through the libraries' `log` facade; without it stderr stays empty (the test above).
#[test]
fn rust_log_warn_shows_the_faults_a_guest_caused() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--cmdline", "scenario=dma"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("the vmm binary runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("[WARN")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0]
            .contains("DMA remapping fault 0x5 (Write): requester 0018, write at 0x80002024"),
        "{stderr}"
    );
    assert!(
        warnings[1].contains("DMA remapping fault 0x6 (Read): requester 0018, read at 0x80010000"),
        "{stderr}"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn run_with_no_arguments_boots_the_test_guest() {
    let out = vmm(&["run"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    assert!(
        stdout.contains("vmm: machine     2 vCPUs, 64 MiB"),
        "{stdout}"
    );
    assert!(stdout.contains("vmm: interrupts  vCPU 0: "), "{stdout}");
    assert!(stdout.contains("(counted by the guest)"), "{stdout}");
    assert!(
        stdout.contains("vmm: IR faults   1 x 0x21, 6 x 0x22, 1 x 0x24, 2 x 0x25, 13 x 0x26"),
        "{stdout}"
    );
    assert!(stdout.contains("vmm: hypercalls  query"), "{stdout}");
    assert!(
        stdout.contains("vmm: verdict     PASS (guest exit code 0)"),
        "{stdout}"
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn a_guest_failure_is_a_nonzero_exit() {
    fails_with(
        &["run", "--cmdline", "scenario=fail", "--console", "off"],
        3,
        "the guest reported failure (code 3)",
    );
}

#[test]
fn a_hung_guest_hits_the_watchdog() {
    fails_with(
        &[
            "run",
            "--cmdline",
            "scenario=hang",
            "--watchdog",
            "1",
            "--console",
            "off",
        ],
        124,
        "the guest reported no verdict within 1 s; stopped by the watchdog",
    );
}

/// A kernel from a file runs without the test harness unless asked: the same guest sees no
/// doorbell and no mailbox, and with `--harness on` it has both.
#[test]
fn a_kernel_from_a_file_has_no_harness_unless_asked() {
    let kernel = scratch("harness-guest.elf");
    std::fs::write(&kernel, vmm::TEST_GUEST_ELF).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "scenario=harness",
        ];
        args.extend_from_slice(extra);
        let out = vmm(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let off = run(&[]);
    assert!(
        off.contains("harness: off: port 0x502 reads 0xffffffff"),
        "{off}"
    );
    let on = run(&["--harness", "on"]);
    assert!(
        on.contains("harness: on: port 0x502 reads 0x4841524e"),
        "{on}"
    );
    fails_with(
        &["run", "--harness", "maybe"],
        125,
        "invalid harness `maybe`: expected on or off",
    );
}

/// The process ends at the watchdog even though a vCPU thread is still inside a device
/// call (the device is held for 30 s): exit 124, and the summary says so.
#[test]
fn a_vcpu_stuck_in_a_device_does_not_hold_up_the_watchdog() {
    let out = vmm(&[
        "run",
        "--cmdline",
        "scenario=stuck",
        "--watchdog",
        "1",
        "--console",
        "off",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(
        summary.contains("vmm: stuck       1 vCPUs were still inside a device call"),
        "{summary}"
    );
    assert!(
        summary.contains("still busy when the VM stopped"),
        "{summary}"
    );
}

#[test]
fn a_config_file_says_what_flags_say_and_flags_win() {
    let config = scratch("one-cpu.toml");
    let toml = "cpus = 4\nmemory = \"32M\"\ncmdline = \"scenario=smoke\"\nconsole = \"off\"\n";
    std::fs::write(&config, toml).unwrap();
    let out = vmm(&["run", "--config", config.to_str().unwrap(), "--cpus", "1"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("vmm: machine     1 vCPU, 32 MiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("vmm: interrupts  vCPU 0: 1 (counted by the guest)"),
        "{stdout}"
    );
    assert!(!stdout.contains("test-guest:"), "console was off: {stdout}");
}

#[test]
fn an_elf_from_a_file_boots_and_the_console_can_go_to_a_file() {
    let kernel = scratch("guest.elf");
    std::fs::write(&kernel, vmm::TEST_GUEST_ELF).unwrap();
    let log = scratch("console.log");
    let console = format!("file:{}", log.display());
    let kernel_arg = kernel.to_str().unwrap();
    let out = vmm(&[
        "run",
        "--kernel",
        kernel_arg,
        "--console",
        &console,
        "--cmdline",
        "scenario=smoke",
        "--harness",
        "on",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("verdict: PASS"), "{logged}");
    assert!(text(&out.stdout).contains(&format!("vmm: kernel      {}", kernel.display())));
}

#[test]
fn missing_kvm_device() {
    fails_with(
        &["run", "--kvm-device", "/nonexistent/kvm"],
        125,
        "error: cannot open KVM device /nonexistent/kvm: No such file or directory",
    );
}

#[test]
fn memory_too_large() {
    fails_with(
        &["run", "--memory", "64T"],
        125,
        "error: memory size 64 TiB exceeds the host's memory",
    );
}

#[test]
fn memory_too_small_for_the_vcpus() {
    fails_with(
        &["run", "--memory", "5M", "--cpus", "255"],
        125,
        "is too small for the image and 255 vCPUs",
    );
}

#[test]
fn bad_size() {
    fails_with(
        &["run", "--memory", "lots"],
        125,
        "error: invalid memory size `lots`: expected a number",
    );
}

#[test]
fn bad_vcpu_count() {
    fails_with(
        &["run", "--cpus", "0"],
        125,
        "error: invalid vCPU count 0: must be between 1 and 512",
    );
}

#[test]
fn bad_elf() {
    let kernel = scratch("not.elf");
    std::fs::write(&kernel, b"#!/bin/sh\necho hi\n").unwrap();
    fails_with(
        &["run", "--kernel", kernel.to_str().unwrap()],
        125,
        "not.elf: not an x86-64 ELF executable",
    );
}

#[test]
fn missing_kernel() {
    fails_with(
        &["run", "--kernel", "/nonexistent/guest.elf"],
        125,
        "error: cannot open kernel /nonexistent/guest.elf: No such file or directory",
    );
}

#[test]
fn bad_config_key() {
    let config = scratch("typo.toml");
    std::fs::write(&config, "cpus = 2\nmemroy = \"64M\"\n").unwrap();
    fails_with(
        &["run", "--config", config.to_str().unwrap()],
        125,
        "line 2, column 1: unknown field `memroy`, expected one of",
    );
}

#[test]
fn bad_config_value() {
    let config = scratch("bad-value.toml");
    std::fs::write(&config, "cpus = \"two\"\n").unwrap();
    fails_with(
        &["run", "--config", config.to_str().unwrap()],
        125,
        "invalid config file",
    );
}

#[test]
fn missing_config_file() {
    fails_with(
        &["run", "--config", "/nonexistent/vm.toml"],
        125,
        "error: cannot read config file /nonexistent/vm.toml: No such file or directory",
    );
}

#[test]
fn bad_console() {
    fails_with(
        &["run", "--console", "tty"],
        125,
        "error: invalid console `tty`: expected stdout, off or file:PATH",
    );
}

#[test]
fn help_describes_the_options() {
    let out = vmm(&["run", "--help"]);
    let help = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    for option in [
        "--kernel",
        "--cpus",
        "--memory",
        "--cmdline",
        "--config",
        "--console",
        "--watchdog",
        "Exit status",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

#[test]
fn devices_come_from_flags_or_the_config_file() {
    let out = vmm(&["run", "--device", "none", "--cmdline", "scenario=ims"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("ims: FAIL: no slot-array IMS device"),
        "{stdout}"
    );
    assert!(!stdout.contains("vmm: device"), "{stdout}");

    let config = scratch("devices.toml");
    std::fs::write(
        &config,
        "[[device]]\nkind = \"ims-queues\"\ncontexts = 8\npci_slot = 6\n",
    )
    .unwrap();
    let out = vmm(&["run", "--config", config.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("ims: no slot-array IMS device; skipped"),
        "{stdout}"
    );
    assert!(
        stdout.contains("vmm: device      00:06.0 ims-queues (8 contexts): 28 completions"),
        "{stdout}"
    );
}

#[test]
fn bad_device() {
    fails_with(
        &["run", "--device", "ims-slots,slots=40000"],
        125,
        "error: invalid device ims-slots: slots 40000 must be between 1 and 32768",
    );
    fails_with(
        &["run", "--device", "ims-slots,colour=red"],
        125,
        "unknown key `colour`",
    );
}

#[test]
fn bench_prints_a_table_and_writes_json() {
    let json = scratch("bench.json");
    let out = vmm(&[
        "bench",
        "--samples",
        "5",
        "--interrupts",
        "64",
        "--live",
        "256",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for line in [
        "Delivery latency, device-model raise -> guest handler on vCPU 0 (us), 5 samples each",
        "Throughput, vCPU 0, 64 interrupts per run",
        "Live remapped interrupts, all delivered through irqfd lines: 256 (asked for 256)",
        "headline: retarget_speedup_at_4096",
    ] {
        assert!(stdout.contains(line), "{line} missing: {stdout}");
    }
    let written = std::fs::read_to_string(&json).unwrap();
    let keys: Vec<&str> = written
        .lines()
        .skip(1)
        .take(4)
        .filter_map(|l| l.trim().split('"').nth(1))
        .collect();
    assert_eq!(
        keys,
        [
            "retarget_speedup_at_4096",
            "delivery_ratio",
            "max_live_interrupts",
            "bulk_ratio"
        ]
    );
    let v: serde_json::Value = serde_json::from_str(&written).expect("the JSON parses");
    for ratio in ["retarget_speedup_at_4096", "delivery_ratio", "bulk_ratio"] {
        assert!(
            v[ratio].as_f64().is_some_and(|x| x > 0.0),
            "{ratio}: {written}"
        );
    }
    assert_eq!(v["max_live_interrupts"], 256, "{written}");
    assert_eq!(v["delivery"]["ours_ims_slot"]["samples"], 5, "{written}");
    assert_eq!(v["delivery"]["raw_irqfd"]["samples"], 5, "{written}");
    assert!(v["throughput"]["ours_per_s"]
        .as_f64()
        .is_some_and(|x| x > 0.0));
    assert!(v["throughput"]["raw_per_s"]
        .as_f64()
        .is_some_and(|x| x > 0.0));
    assert_eq!(v["retarget"][3]["live"], 65536, "{written}");
    assert!(v["retarget"][3]["whole_table_rebuild"].is_null());
    for row in 0..4 {
        let exit = &v["retarget"][row]["ours_exit_to_entry"];
        assert_eq!(exit["samples"], 5, "{written}");
    }
    fails_with(
        &["bench", "--kvm-device", "/nonexistent/kvm"],
        125,
        "error: cannot open KVM device /nonexistent/kvm",
    );
}

#[test]
fn a_snapshot_written_by_run_is_restored_by_restore() {
    let snap = scratch("cli.snap");
    let path = snap.to_str().unwrap();
    let out = vmm(&[
        "run",
        "--cmdline",
        "scenario=snapshot",
        "--snapshot",
        path,
        "--console",
        "off",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("vmm: snapshot    "), "{stdout}");
    assert!(stdout.contains("SNAPSHOT (written to"), "{stdout}");
    let out = vmm(&["restore", path]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("vmm: restored    from {path}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("snapshot: after it, 256 slot and 24 queue completions"),
        "{stdout}"
    );
    assert!(stdout.contains("PASS (guest exit code 0)"), "{stdout}");

    // Not a snapshot, and no such file: one line each, nothing runs.
    let junk = scratch("junk.snap");
    std::fs::write(&junk, b"hello").unwrap();
    fails_with(
        &["restore", junk.to_str().unwrap()],
        125,
        "not a snapshot of this VMM",
    );
    fails_with(
        &["restore", scratch("absent.snap").to_str().unwrap()],
        125,
        "cannot read snapshot",
    );
    let _ = std::fs::remove_file(&snap);
}

#[test]
fn snapshot_settings_without_a_file_or_with_a_bad_follow_up_are_refused() {
    fails_with(
        &["run", "--snapshot", "x.snap", "--snapshot-then", "pause"],
        125,
        "invalid snapshot_then `pause`",
    );
    let out = vmm(&["run", "--snapshot-after-ms", "5"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses it");
    assert!(text(&out.stderr).contains("--snapshot <FILE>"));
}

/// `--trace -` writes the chosen categories as JSON lines on stdout, before the summary.
#[test]
fn trace_to_stdout_has_one_json_object_per_event() {
    let out = vmm(&[
        "run",
        "--console",
        "off",
        "--cmdline",
        "scenario=hypercall",
        "--trace",
        "-",
        "--trace-categories",
        "hypercall,faults",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["kind"] == "call"), "{stdout}");
    assert!(
        events
            .iter()
            .all(|e| e["cat"] == "hypercall" || e["cat"] == "faults"),
        "{stdout}"
    );
    assert!(stdout.contains("vmm: trace       "), "{stdout}");
}

#[test]
fn bad_trace_and_api_settings_are_refused() {
    fails_with(
        &["run", "--trace", "t.jsonl", "--trace-categories", "ir,disk"],
        125,
        "unknown trace category `disk`",
    );
    fails_with(
        &["run", "--trace", "t.jsonl", "--trace-limit", "0"],
        125,
        "the trace limit must be at least 1",
    );
    let taken = scratch("taken.sock");
    std::fs::write(&taken, b"not a socket").unwrap();
    fails_with(
        &["run", "--api-socket", taken.to_str().unwrap()],
        125,
        "exists; remove it or choose another path",
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"not a socket");
    fails_with(
        &[
            "api",
            scratch("nobody.sock").to_str().unwrap(),
            "/api/v1/vm.info",
        ],
        125,
        "cannot reach",
    );
}

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
