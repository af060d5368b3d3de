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

/// A device whose memory BAR the server lets the client map (a sparse mmap area and the
/// file behind it): the guest's reads of that BAR reach the device's memory without an
/// exit. The device answers relayed reads with another value, so the guest's read shows
/// which way it went.
mod mapped {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use vfio_bindings::bindings::vfio::{
        vfio_region_info, vfio_region_sparse_mmap_area, VFIO_PCI_BAR0_REGION_INDEX,
        VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
        VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    };

    use super::*;

    /// What the mapped device's relayed reads return.
    const RELAYED: u32 = 0xdead_beef;
    /// What its memory holds.
    const MAPPED: u32 = 0x600d_cafe;

    struct Device {
        config: Vec<u8>,
        relayed_reads: Arc<Mutex<u32>>,
    }

    impl vfio_user::ServerBackend for Device {
        fn region_read(
            &mut self,
            region: u32,
            offset: u64,
            data: &mut [u8],
        ) -> std::io::Result<()> {
            if region == VFIO_PCI_CONFIG_REGION_INDEX {
                let at = usize::try_from(offset).unwrap();
                data.copy_from_slice(&self.config[at..at + data.len()]);
            } else {
                *self.relayed_reads.lock().unwrap() += 1;
                for (k, b) in data.iter_mut().enumerate() {
                    *b = RELAYED.to_le_bytes()[k % 4];
                }
            }
            Ok(())
        }
        fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
            if region == VFIO_PCI_CONFIG_REGION_INDEX {
                let at = usize::try_from(offset).unwrap();
                self.config[at..at + data.len()].copy_from_slice(data);
            }
            Ok(())
        }
        fn dma_map(
            &mut self,
            _: vfio_user::DmaMapFlags,
            _: u64,
            _: u64,
            _: u64,
            _: Option<File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn dma_unmap(
            &mut self,
            _: vfio_user::DmaUnmapFlags,
            _: u64,
            _: u64,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn reset(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_irqs(
            &mut self,
            _: u32,
            _: u32,
            _: u32,
            _: u32,
            _: Vec<File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sparse_mmap_area_of_a_bar_is_mapped_into_the_guest() {
        let socket = std::env::temp_dir().join(format!("vmm-mapped-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let memory_path =
            std::env::temp_dir().join(format!("vmm-mapped-{}.mem", std::process::id()));
        let mut memory = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&memory_path)
            .unwrap();
        memory.write_all(&MAPPED.to_le_bytes()).unwrap();
        memory.set_len(4096).unwrap();
        let _ = std::fs::remove_file(&memory_path);
        let mut space = vec![0u8; 256];
        space[0..4].copy_from_slice(&0x0001_1af4u32.to_le_bytes());
        space[0x0b] = 0x05; // memory controller
        let region = |index: u32, size: u64, flags: u32, areas: Vec<vfio_user::SparseArea>, fd| {
            vfio_user::ServerRegion {
                region_info: vfio_region_info {
                    argsz: 32,
                    flags,
                    index,
                    size,
                    ..Default::default()
                },
                sparse_areas: areas,
                mmap_fd: fd,
            }
        };
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let regions = (0..VFIO_PCI_NUM_REGIONS)
            .map(|i| match i {
                VFIO_PCI_BAR0_REGION_INDEX => region(
                    i,
                    4096,
                    rw | VFIO_REGION_INFO_FLAG_MMAP,
                    vec![vfio_user::SparseArea {
                        area: vfio_region_sparse_mmap_area {
                            offset: 0,
                            size: 4096,
                        },
                    }],
                    Some(memory.as_raw_fd()),
                ),
                VFIO_PCI_CONFIG_REGION_INDEX => region(i, 256, rw, Vec::new(), None),
                _ => region(i, 0, 0, Vec::new(), None),
            })
            .collect();
        let irqs = (0..VFIO_PCI_NUM_IRQS)
            .map(|index| vfio_user::IrqInfo {
                index,
                flags: 0,
                count: 0,
            })
            .collect();
        let server = vfio_user::Server::new(&socket, false, irqs, regions).unwrap();
        let relayed_reads = Arc::new(Mutex::new(0));
        let mut device = Device {
            config: space,
            relayed_reads: relayed_reads.clone(),
        };
        let serving = std::thread::spawn(move || {
            let _ = server.run(&mut device);
        });
        let mut cfg = config(1, "scenario=pci");
        cfg.machine.devices = vec![DeviceConfig {
            kind: DeviceKind::VfioUser {
                socket: socket.clone(),
            },
            pci_slot: 6,
        }];
        let (report, console) = boot(&cfg);
        let _ = std::fs::remove_file(&socket);
        serving.join().unwrap();
        assert!(report.passed(), "{report}\n{console}");
        let line = console
            .lines()
            .find(|l| l.starts_with("pci: 00:06.0 BAR0 memory at "))
            .unwrap_or_else(|| panic!("no BAR0 line:\n{console}"));
        assert!(line.ends_with(&format!("first word {MAPPED:#x}")), "{line}");
        assert_eq!(
            *relayed_reads.lock().unwrap(),
            0,
            "the read was not relayed"
        );
        drop(memory);
    }
}
