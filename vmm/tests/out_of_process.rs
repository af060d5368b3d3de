//! Our IMS devices in other processes: `vmm device ims-slots|ims-queues --socket S` serves
//! each, `vmm run --device vfio-user,socket=S` runs the built-in guest's `ims` scenario
//! against them. Each guest interrupt is one write by the device process to the eventfd of
//! a remapping entry, which the VMM handed over when the guest made the entry present.
//! These boot real guests on `/dev/kvm`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A device process on a socket of its own, killed when dropped.
struct Device {
    child: Option<Child>,
    socket: PathBuf,
}

impl Device {
    fn start(kind: &str, name: &str, extra: &[&str]) -> Self {
        let socket =
            std::env::temp_dir().join(format!("vmm-oop-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["device", kind, "--socket"])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmm device starts");
        let begin = Instant::now();
        while !socket.exists() {
            assert!(
                begin.elapsed() < Duration::from_secs(10),
                "vmm device {kind} never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child: Some(child),
            socket,
        }
    }

    fn arg(&self, slot: u8) -> String {
        format!("vfio-user,socket={},pci_slot={slot}", self.socket.display())
    }

    /// What the device process printed when its VMM went away.
    fn finish(mut self) -> Output {
        let child = self.child.take().expect("running");
        let out = child.wait_with_output().expect("vmm device ends");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        out
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("run")
        .args(args)
        .output()
        .expect("vmm run runs")
}

/// What the in-process run of the `ims` scenario prints (tests/tests/ims.rs checks the
/// same counts in-process).
const SLOT_LINES: &[&str] = &[
    "ims-slots: 2048 slots over 2 vCPUs, 2 rounds: 4096 completions, 4096 counted by the handlers",
    "ims-slots: a compatibility-format message was refused (STATUS, ERROR_SLOT 2047); a masked slot latched and fired on unmask",
    "ims-slots: a slot holding another device's entry was refused (1 remapping fault)",
];
const QUEUE_LINES: &[&str] = &[
    "ims-queues: 4 queues started from their contexts, 3 items each counted",
    "ims-queues: STOP drained 4 slow items before completing; START resumed the queue",
    "ims-queues: a masked context latched its interrupt and delivered it on unmask",
    "ims-queues: a stalled command timed out into a reset; the driver restarted every queue",
    "ims-queues: a forced reset was recovered",
    "ims-queues: 28 completions, all counted",
];

#[test]
fn both_ims_devices_in_other_processes_pass_the_ims_scenario_with_the_in_process_counts() {
    let slots = Device::start("ims-slots", "slots", &[]);
    let queues = Device::start("ims-queues", "queues", &[]);
    let out = run(&[
        "--device".into(),
        slots.arg(3),
        "--device".into(),
        queues.arg(4),
        "--cmdline".into(),
        "scenario=ims".into(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for line in SLOT_LINES.iter().chain(QUEUE_LINES) {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    for (slot, socket) in [(3, &slots.socket), (4, &queues.socket)] {
        let line = format!(
            "vmm: device      00:0{slot}.0 vfio-user ({}): 0 requests failed, ",
            socket.display()
        );
        assert!(stdout.contains(&line), "{line:?} missing:\n{stdout}");
    }
    assert!(stdout.contains("connected to the end"), "{stdout}");
    // The guest freed every entry at the end of its drivers: every eventfd came back, and
    // the slot device's one refused interrupt (the other device's entry) had none.
    let s = text(&slots.finish().stdout);
    assert!(
        s.contains("1 without a host interrupt, 0 hand-overs refused, 0 entries held at the end"),
        "{s}"
    );
    let q = text(&queues.finish().stdout);
    assert!(
        q.contains("0 without a host interrupt, 0 hand-overs refused, 0 entries held at the end"),
        "{q}"
    );
}

#[test]
fn a_device_with_fewer_host_interrupts_than_entries_refuses_and_the_guest_falls_back() {
    let slots = Device::start("ims-slots", "few", &["--max-vectors", "1000"]);
    let out = run(&[
        "--device".into(),
        slots.arg(3),
        "--device".into(),
        "ims-queues".into(),
        "--cmdline".into(),
        "scenario=ims".into(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    // BATCH of 2048, then 1024, refused with NO_SPACE and nothing applied (else the
    // status of the next one would differ); 512 fit.
    assert!(
        stdout.contains("ims-slots: the host backed 512 of 2048 entries (NO_SPACE, nothing applied, for more); using 512"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ims-slots: 512 slots over 2 vCPUs, 2 rounds: 1024 completions, 1024 counted by the handlers"),
        "{stdout}"
    );
    assert!(stdout.contains("batch 4 (2 failed"), "{stdout}");
    let s = text(&slots.finish().stdout);
    assert!(
        s.contains("2 hand-overs refused, 0 entries held at the end"),
        "{s}"
    );
}

#[test]
fn killing_a_device_process_mid_run_leaves_the_vmm_and_guest_running() {
    let mut slots = Device::start("ims-slots", "killed", &[]);
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--device", &slots.arg(3), "--device", "ims-queues"])
        .args(["--cmdline", "scenario=ims"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm run starts");
    let mut console = String::new();
    let mut lines = BufReader::new(vmm.stdout.take().expect("piped"));
    let mut line = String::new();
    while lines.read_line(&mut line).expect("reads") > 0 {
        console.push_str(&line);
        if line.starts_with("ims-slots: 2048 slots over") {
            // The device did its first round of work; now its process dies.
            slots.kill();
        }
        line.clear();
    }
    let status = vmm.wait().expect("vmm run ends");
    // The guest saw the device go (all ones), failed its checks of it, and went on.
    assert_eq!(status.code(), Some(1), "{console}");
    assert!(
        console.contains("ims: FAIL: the device reads all ones (gone) while waiting for"),
        "{console}"
    );
    for line in QUEUE_LINES {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
    assert!(console.contains("verdict: FAIL"), "{console}");
    assert!(
        console.contains("the device process was lost; it read as all ones from then on and its entries' host interrupts were taken back"),
        "{console}"
    );
}
