//! The `vmm` binary as a user runs it: exit codes, summary, and one clear error line for
//! each kind of bad input. These boot real guests on `/dev/kvm`.

mod common;

use std::process::Command;

use common::{fails_with, scratch, text, vmm};

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
        "headline: update_exit_ratio",
        "retarget_speedup_at_4096",
        "Hypercall exits from the guest",
        "Whole VMs (ms, p50)",
        "Startup, vmm process start -> the guest's first instruction",
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
        for timed in [
            "null_round_trip",
            "update_round_trip",
            "batch_of_one_round_trip",
        ] {
            assert_eq!(v["exits"][row][timed]["samples"], 5, "{written}");
        }
    }
    // The second round's keys, each measured (startup too: this is the vmm binary).
    for key in [
        "update_exit_ratio",
        "batch_exit_ratio",
        "dispatcher_us_at_65536",
        "lifecycle_ratio",
        "snapshot_mib",
        "snapshot_pause_ratio",
        "restore_ms",
        "startup_ms",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {written}");
    }
    assert_eq!(v["whole_vm"]["snapshots"][0]["touched_mib"], 8, "{written}");
    assert_eq!(v["whole_vm"]["snapshots"][1]["touched_mib"], 0, "{written}");
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
