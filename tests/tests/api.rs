//! The control API on real KVM, driven as an operator's tool would drive it: over the
//! socket, with the public client (`vmm::api::client`, what `vmm api` uses). The test
//! guest's `api` scenario programs the slot device's entries, prints what it programmed
//! and counted, and waits for an interrupt only the host can send (`test/raise`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration_tests::{config, Captured};
use serde_json::Value;
use vmm::api::client;
use vmm::{Outcome, RunReport, Settings, VmConfig};

/// A socket (or snapshot) path for one test, removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("vmm-api-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A VM running on its own thread, with its console.
struct Running {
    thread: JoinHandle<Result<RunReport, String>>,
    console: Captured,
    socket: PathBuf,
}

impl Running {
    fn boot(cfg: VmConfig) -> Self {
        let console = Captured::default();
        let out = console.clone();
        let socket = cfg.run.api_socket.clone().expect("an API socket");
        let thread = std::thread::spawn(move || {
            vmm::run_with_console(&cfg, Box::new(out)).map_err(|e| vmm::report::error_chain(&e))
        });
        let vm = Self {
            thread,
            console,
            socket,
        };
        vm.wait_for_socket();
        vm
    }

    fn restore(file: &Path, socket: &Path) -> Self {
        let console = Captured::default();
        let out = console.clone();
        let (file, settings) = (
            file.to_path_buf(),
            Settings {
                watchdog: Some(120),
                api_socket: Some(socket.to_path_buf()),
                ..Settings::default()
            },
        );
        let thread = std::thread::spawn(move || {
            vmm::restore_with_console(&file, &settings, Box::new(out))
                .map_err(|e| vmm::report::error_chain(&e))
        });
        let vm = Self {
            thread,
            console,
            socket: socket.to_path_buf(),
        };
        vm.wait_for_socket();
        vm
    }

    fn wait_for_socket(&self) {
        let begin = Instant::now();
        while client::request(&self.socket, "GET", "/api/v1/vmm.ping", None).is_err() {
            assert!(
                !self.thread.is_finished(),
                "the VM ended before its API answered: {}",
                self.console.text()
            );
            assert!(
                begin.elapsed() < Duration::from_secs(60),
                "no API socket after 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guest's `api: ready` line and returns its fields.
    fn ready(&self) -> HashMap<String, u64> {
        let begin = Instant::now();
        loop {
            let text = self.console.text();
            // Only a whole line: the console arrives a byte at a time.
            let whole = text
                .split_inclusive('\n')
                .find(|l| l.starts_with("api: ready:") && l.ends_with('\n'));
            if let Some(line) = whole.map(str::trim_end) {
                let words: Vec<&str> = line["api: ready:".len()..].split_whitespace().collect();
                return words
                    .chunks(2)
                    .map(|kv| (kv[0].to_string(), kv[1].parse().unwrap()))
                    .collect();
            }
            assert!(!self.thread.is_finished(), "the guest ended early:\n{text}");
            assert!(
                begin.elapsed() < Duration::from_secs(60),
                "the guest was not ready in 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One request; the status and the body (JSON, or `Null` when empty).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, text) = client::request(&self.socket, method, path, body).unwrap();
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    fn get(&self, path: &str) -> Value {
        let (status, value) = self.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }

    fn put(&self, path: &str, body: &str) -> (u16, Value) {
        self.call("PUT", path, Some(body))
    }

    /// Raises the guest's go slot.
    fn go(&self, ready: &HashMap<String, u64>) {
        let body = format!(r#"{{"requester": "00:03.0", "slot": {}}}"#, ready["slot"]);
        let (status, value) = self.put("/api/v1/test/raise", &body);
        assert_eq!(status, 204, "{value}");
    }

    fn finish(self) -> (RunReport, String) {
        let report = self.thread.join().unwrap().unwrap();
        assert!(
            self.socket.symlink_metadata().is_err(),
            "the socket outlived the VM"
        );
        (report, self.console.text())
    }
}

fn api_config(cpus: u32, cmdline: &str, socket: &Path) -> VmConfig {
    let mut cfg = config(cpus, cmdline);
    cfg.run.api_socket = Some(socket.to_path_buf());
    cfg
}

#[test]
fn the_table_through_the_socket_shows_what_the_guest_programmed_with_matching_counts() {
    let socket = TempPath::new("table.sock");
    let vm = Running::boot(api_config(2, "scenario=api", &socket.0));
    let ready = vm.ready();
    let (first, n, go) = (ready["first"], ready["count"], ready["go"]);

    let table = vm.get("/api/v1/interrupts/table?requester=00:03.0&present=true&limit=65536");
    let entries = table["entries"].as_array().unwrap();
    assert_eq!(entries.len() as u64, n + 1, "{table}");
    let mut delivered = 0;
    for e in entries {
        let index = e["index"].as_u64().unwrap();
        assert_eq!(e["owner"], "0x18", "{e}");
        assert_eq!(e["validation"]["sid"], "0x18", "{e}");
        assert_eq!(e["live"], true, "{e}");
        if index == go {
            assert_eq!(e["target"]["vector"], 0xea, "{e}");
            assert_eq!(e["target"]["destination"], 0, "{e}");
            assert_eq!(e["delivered"], 0, "{e}");
            continue;
        }
        // Queue q uses vector 0xc0 + q % 32 on CPU (q % 32) % 2 (APIC ID = CPU index).
        let q = index - first;
        assert!(q < n, "{e}");
        assert_eq!(e["target"]["vector"], 0xc0 + q % 32, "{e}");
        assert_eq!(e["target"]["destination"], (q % 32) % 2, "{e}");
        assert_eq!(e["faults"], 0, "{e}");
        delivered += e["delivered"].as_u64().unwrap();
    }
    assert_eq!(delivered, ready["completions"], "{table}");
    let narrow = vm.get(&format!(
        "/api/v1/interrupts/table?from={first}&to={}&limit=2",
        first + n
    ));
    assert_eq!(narrow["count"], 2);
    assert_eq!(narrow["next"], first + 2);

    let devices = vm.get("/api/v1/devices");
    let slots = &devices["devices"][0];
    assert_eq!(slots["bdf"], "00:03.0", "{devices}");
    assert_eq!(slots["completions"], ready["completions"], "{devices}");
    assert_eq!(slots["in_use"], n + 1, "{devices}");
    let routes = vm.get("/api/v1/interrupts/routes");
    assert_eq!(routes["live_entries"], n + 1, "{routes}");
    let metrics = vm.get("/api/v1/metrics");
    assert_eq!(
        metrics["hypercalls"]["calls"]["batch"]["calls"], 1,
        "{metrics}"
    );
    let (status, text) = client::request(&vm.socket, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains(&format!("vmm_remapping_live_entries {}\n", n + 1)),
        "{text}"
    );
    let info = vm.get("/api/v1/vm.info");
    assert_eq!(
        (info["state"].as_str(), info["vcpus"].as_u64()),
        (Some("running"), Some(2))
    );

    vm.go(&ready);
    let (report, console) = vm.finish();
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console.contains("api: retarget: status 0 (OK)"),
        "{console}"
    );
    assert_eq!(report.devices[0].completions, ready["completions"] + 1);
}

#[test]
fn pause_holds_delivery_and_resume_delivers_it_with_nothing_lost() {
    let socket = TempPath::new("pause.sock");
    let vm = Running::boot(api_config(2, "scenario=api", &socket.0));
    let ready = vm.ready();
    assert_eq!(vm.put("/api/v1/vm.pause", "").0, 204);
    assert_eq!(vm.get("/api/v1/vm.info")["state"], "paused");
    let (status, again) = vm.put("/api/v1/vm.pause", "");
    assert_eq!(status, 409, "{again}");
    // The host raises the go slot while the vCPUs are stopped: the interrupt is
    // delivered to the LAPIC, and the guest does not run to see it.
    vm.go(&ready);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!vm.console.text().contains("api: go received"));
    let go = ready["go"];
    let entry = vm.get(&format!("/api/v1/interrupts/table?from={go}&to={}", go + 1));
    assert_eq!(entry["entries"][0]["delivered"], 1, "{entry}");
    assert_eq!(vm.put("/api/v1/vm.resume", "").0, 204);
    let (status, not_paused) = vm.put("/api/v1/vm.resume", "");
    assert_eq!(status, 409, "{not_paused}");
    let (report, console) = vm.finish();
    // The guest checks every vector's count exactly: the go interrupt arrived once.
    assert!(report.passed(), "{report}\n{console}");
    assert!(console.contains("api: go received"), "{console}");
}

#[test]
fn a_snapshot_taken_through_the_api_restores_and_passes() {
    let socket = TempPath::new("snap.sock");
    let file = TempPath::new("api.snap");
    let vm = Running::boot(api_config(2, "scenario=api", &socket.0));
    let ready = vm.ready();
    let (status, taken) = vm.put(
        "/api/v1/vm.snapshot",
        &format!(r#"{{"path": "{}"}}"#, file.0.display()),
    );
    assert_eq!(status, 200, "{taken}");
    // The file in place, holding the pages the guest wrote (a few hundred KiB of 64 MiB).
    let bytes = taken["bytes"].as_u64().unwrap();
    assert_eq!(bytes, std::fs::metadata(&file.0).unwrap().len(), "{taken}");
    assert!(bytes < 4 << 20, "{taken}");
    let (status, bad) = vm.put(
        "/api/v1/vm.snapshot",
        r#"{"path": "/nonexistent/dir/x.snap"}"#,
    );
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("cannot write snapshot"),
        "{bad}"
    );
    vm.go(&ready);
    let (report, console) = vm.finish();
    assert!(report.passed(), "{report}\n{console}");

    // The restored guest waits where the snapshot found it.
    let socket = TempPath::new("restored.sock");
    let restored = Running::restore(&file.0, &socket.0);
    assert_eq!(
        restored.get("/api/v1/vm.info")["restored_from"],
        file.0.display().to_string()
    );
    // The driver accepted HOST_ERROR before the snapshot: it still has it after.
    let (status, v) = restored.put("/api/v1/test/inject", r#"{"failure": "route_commit"}"#);
    assert_eq!(status, 204, "{v}");
    restored.go(&ready);
    let (report, console) = restored.finish();
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console.contains("api: retarget: status 10 (HOST_ERROR"),
        "{console}"
    );
    assert!(
        console.contains("api: retarget: status 0 (OK)"),
        "{console}"
    );
}

#[test]
fn an_injected_route_failure_fails_the_guests_next_retarget_with_host_error() {
    let socket = TempPath::new("inject.sock");
    let vm = Running::boot(api_config(2, "scenario=api", &socket.0));
    let ready = vm.ready();
    let (status, v) = vm.put("/api/v1/test/inject", r#"{"failure": "route_commit"}"#);
    assert_eq!(status, 204, "{v}");
    vm.go(&ready);
    let (report, console) = vm.finish();
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console
            .contains("api: retarget: status 10 (HOST_ERROR, the host failed; the driver retries)"),
        "{console}"
    );
    assert!(
        console.contains("api: retarget: status 0 (OK)"),
        "{console}"
    );
    assert!(report.remap_stats.rollbacks >= 1, "{report}");
}

#[test]
fn without_the_harness_test_actions_are_refused_and_bad_requests_get_json_errors() {
    let socket = TempPath::new("plain.sock");
    let mut cfg = api_config(1, "scenario=hang", &socket.0);
    cfg.machine.harness = false;
    let vm = Running::boot(cfg);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&vm.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    for (path, body) in [
        ("/api/v1/test/inject", r#"{"failure": "route_commit"}"#),
        ("/api/v1/test/raise", r#"{"requester": 24, "slot": 0}"#),
        ("/api/v1/test/ioapic_line", r#"{"pin": 4, "level": "high"}"#),
    ] {
        let (status, v) = vm.put(path, body);
        assert_eq!(status, 403, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("harness"), "{v}");
    }
    assert_eq!(vm.get("/api/v1/vm.info")["harness"], false);

    // Raw bytes a client chose: malformed, oversized, truncated.
    let raw = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&vm.socket).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let garbage = raw(b"\x00\x01 nonsense\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    assert!(garbage.contains("{\"error\":"), "{garbage}");
    let big = raw(b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n");
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    let short = raw(b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
    assert!(short.starts_with("HTTP/1.1 400"), "{short}");
    let wrong = vm.call("DELETE", "/api/v1/vm.info", None);
    assert_eq!(wrong.0, 405, "{}", wrong.1);

    // Another VM may not take the socket's path.
    let mut other = api_config(1, "scenario=hang", &socket.0);
    other.machine.harness = false;
    let err = vmm::run_with_console(&other, Box::new(std::io::sink())).unwrap_err();
    assert!(
        vmm::report::error_chain(&err).contains("exists"),
        "{}",
        vmm::report::error_chain(&err)
    );

    assert_eq!(vm.put("/api/v1/vm.shutdown", "").0, 204);
    let (report, _) = vm.finish();
    assert_eq!(report.outcome, Outcome::Shutdown);
    assert_eq!(report.exit_code(), 0);
}
