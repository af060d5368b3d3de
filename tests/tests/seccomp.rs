//! Seccomp filters for a VM an embedder runs in its own process (`vmm::run_with_console`):
//! every thread the VM starts runs filtered (`RunConfig::seccomp`, on by default), the
//! embedder's own threads do not, and `SeccompMode::Off` leaves the VM's threads unfiltered.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::config;
use vmm::api::client;
use vmm::seccomp::SeccompMode;

/// Each thread of this process: its name and its `Seccomp:` mode.
fn threads() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|t| {
            let t = t.unwrap().path();
            let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map_or("?", str::trim)
                .to_string();
            (name.trim().to_string(), mode)
        })
        .collect()
}

/// Runs the `api` scenario with `mode` and returns what the VM's threads ran as, read
/// while it waits.
fn vm_threads(mode: SeccompMode, socket: &Path) -> Vec<(String, String)> {
    let _ = std::fs::remove_file(socket);
    let mut cfg = config(2, "scenario=api");
    cfg.run.api_socket = Some(socket.to_path_buf());
    cfg.run.seccomp = mode;
    let vm = std::thread::spawn(move || vmm::run_with_console(&cfg, Box::new(std::io::sink())));
    let begin = Instant::now();
    while client::request(socket, "GET", "/api/v1/vmm.ping", None).is_err() {
        assert!(!vm.is_finished() && begin.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = threads();
    let (status, _) = client::request(socket, "PUT", "/api/v1/vm.shutdown", None).unwrap();
    assert_eq!(status, 204);
    let report = vm.join().unwrap().unwrap();
    assert_eq!(report.outcome, vmm::Outcome::Shutdown);
    seen
}

#[test]
fn a_vms_threads_run_filtered_and_the_embedders_do_not() {
    let socket = std::env::temp_dir().join(format!("vmm-seccomp-{}.sock", std::process::id()));
    let vm_names = [
        "vcpu0",
        "vcpu1",
        "ims-devices",
        "irq-storms",
        "harness",
        "vmm-api",
    ];
    let on = vm_threads(SeccompMode::On, &socket);
    for name in vm_names {
        let mode = on.iter().find(|(n, _)| n == name).map(|(_, m)| m.as_str());
        assert_eq!(mode, Some("2"), "{name}: {on:?}");
    }
    // This test's thread (and the test runner's) never installed a filter.
    let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(me.lines().any(|l| l == "Seccomp:\t0"), "{me}");

    let off = vm_threads(SeccompMode::Off, &socket);
    for name in vm_names {
        let mode = off.iter().find(|(n, _)| n == name).map(|(_, m)| m.as_str());
        assert_eq!(mode, Some("0"), "{name}: {off:?}");
    }
}
