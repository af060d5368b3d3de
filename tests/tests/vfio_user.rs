//! A device from another project in another process: the `gpio` example server of the
//! rust-vmm `vfio_user` crate, unmodified (built from its published source by
//! `resources/vfio-user/build-gpio`), joins the VM's PCI root over vfio-user. The built-in
//! guest finds it, reads its configuration space and its I/O BAR, and the device counts
//! the reads as it does for any client; its INTx interrupt (an eventfd the VMM handed it)
//! arrives through the IOAPIC and the remapping unit.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use integration_tests::{boot, config};
use vmm::config::{DeviceConfig, DeviceKind};

fn gpio_server() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/vfio-user/build-gpio"
    );
    let out = Command::new(script)
        .output()
        .expect("resources/vfio-user/build-gpio runs");
    assert!(
        out.status.success(),
        "building the vfio_user crate's gpio example failed (this test needs crates.io):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The gpio server on a socket of its own, killed when dropped.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn start(name: &str) -> Server {
    let socket = std::env::temp_dir().join(format!("vmm-gpio-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(gpio_server())
        .arg("--socket-path")
        .arg(&socket)
        .spawn()
        .expect("the gpio server starts");
    let begin = Instant::now();
    while !socket.exists() {
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "the gpio server never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Server(child, socket)
}

#[test]
fn the_vfio_user_crates_gpio_example_is_a_pci_device_the_guest_reads() {
    let server = start("scan");
    let mut cfg = config(1, "scenario=pci");
    cfg.machine.devices = vec![DeviceConfig {
        kind: DeviceKind::VfioUser {
            socket: server.1.clone(),
        },
        pci_slot: 5,
    }];
    let (report, console) = boot(&cfg);
    assert!(report.passed(), "{report}\n{console}");
    assert!(
        console.contains("pci: 00:05.0 494f:0dc8 class ffff00 pin 1"),
        "{console}"
    );
    // Every third read of the gpio's data register reads 1: the device's own counting.
    assert!(
        console.contains("pci: 00:05.0 BAR2 I/O at 0xc000, reads 0 0 1"),
        "{console}"
    );
    // The third read also makes the device write its INTx eventfd: the interrupt reaches
    // the guest through the IOAPIC input the interrupt line register names, remapped (the
    // guest turned remapping on with compatibility format blocked).
    assert!(
        console
            .contains("pci: 00:05.0 INTx on IOAPIC input 17, remapped by IRTE 200: 1 interrupts"),
        "{console}"
    );
    // The gpio has no interrupt index for remapping entries: it hosts none.
    let remote = report.devices[0]
        .remote
        .expect("a device in another process");
    assert_eq!(
        (remote.failed, remote.lost, remote.entry_messages),
        (0, false, None),
        "{report}"
    );
}

#[test]
fn a_vfio_user_device_without_a_server_stops_the_set_up_with_the_reason() {
    let mut cfg = config(1, "scenario=pci");
    cfg.machine.devices = vec![DeviceConfig {
        kind: DeviceKind::VfioUser {
            socket: "/nonexistent/gpio.sock".into(),
        },
        pci_slot: 5,
    }];
    let err = vmm::run(&cfg).unwrap_err();
    let chain = vmm::report::error_chain(&err);
    assert!(
        chain.contains("cannot set up PCI device 00:05.0 vfio-user (/nonexistent/gpio.sock)")
            && chain.contains("cannot connect to /nonexistent/gpio.sock"),
        "{chain}"
    );
}
