//! The client against the rust-vmm `vfio_user` crate's `Server` (a server we did not
//! write), and against servers that lie, stall or die.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::thread;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

/// A socket path of its own in the temporary directory.
fn socket(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vmm-vfio-user-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// What the test backend saw and does.
#[derive(Default)]
struct Seen {
    config: Vec<u8>,
    bar: Vec<u8>,
    set_irqs: Vec<(u32, u32, u32, u32, usize)>,
    refuse_irqs: bool,
    irq_files: Vec<std::fs::File>,
    /// The server's thread ends (as a dying device process) at its next region read.
    die: bool,
    /// DMA mappings: offset in the file, guest address, size, the file.
    dma: Vec<(u64, u64, u64, Option<std::fs::File>)>,
}

struct Backend(Arc<Mutex<Seen>>);

impl vfio_user::ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let seen = self.0.lock().unwrap();
        assert!(!seen.die, "the device process dies (on purpose)");
        let src = if region == VFIO_PCI_CONFIG_REGION_INDEX {
            &seen.config
        } else {
            &seen.bar
        };
        let at = usize::try_from(offset).unwrap();
        data.copy_from_slice(&src[at..at + data.len()]);
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut seen = self.0.lock().unwrap();
        let dst = if region == VFIO_PCI_CONFIG_REGION_INDEX {
            &mut seen.config
        } else {
            &mut seen.bar
        };
        let at = usize::try_from(offset).unwrap();
        dst[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn dma_map(
        &mut self,
        _: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<std::fs::File>,
    ) -> io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .dma
            .push((offset, address, size, file));
        Ok(())
    }
    fn dma_unmap(&mut self, _: vfio_user::DmaUnmapFlags, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<std::fs::File>,
    ) -> io::Result<()> {
        let mut seen = self.0.lock().unwrap();
        seen.set_irqs.push((index, flags, start, count, fds.len()));
        if seen.refuse_irqs {
            return Err(io::Error::other("no"));
        }
        seen.irq_files.extend(fds);
        Ok(())
    }
}

/// A device with a 256-byte configuration space (vendor 0x1234), a 4-KiB BAR 0 and four
/// MSI-X vectors, served by the crate's `Server` on its own thread.
fn device(name: &str) -> (PathBuf, Arc<Mutex<Seen>>, thread::JoinHandle<()>) {
    device_with(name, |_| {})
}

/// The test device, its configuration space changed by `edit` first.
fn device_with(
    name: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> (PathBuf, Arc<Mutex<Seen>>, thread::JoinHandle<()>) {
    let path = socket(name);
    let mut config = vec![0u8; 256];
    config[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
    config[2..4].copy_from_slice(&0x5678u16.to_le_bytes());
    config[0x0b] = 0xff; // class
    config[0x18] = 1; // BAR 2 is an I/O BAR
    config[0x3d] = 1; // INTA
    edit(&mut config);
    let seen = Arc::new(Mutex::new(Seen {
        config,
        bar: vec![0; 4096],
        ..Seen::default()
    }));
    let region = |index: u32, size: u64| vfio_user::ServerRegion {
        region_info: vfio_region_info {
            argsz: 32,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            index,
            size,
            ..Default::default()
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    };
    let regions = (0..VFIO_PCI_NUM_REGIONS)
        .map(|i| match i {
            VFIO_PCI_BAR0_REGION_INDEX => region(i, 4096),
            2 => region(i, 256),
            // A size no BAR can have: not offered.
            4 => region(i, u64::MAX),
            VFIO_PCI_CONFIG_REGION_INDEX => region(i, 256),
            _ => region(i, 0),
        })
        .collect();
    let irqs = (0..VFIO_PCI_NUM_IRQS)
        .map(|index| vfio_user::IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                4
            } else {
                1
            },
        })
        .collect();
    let server = vfio_user::Server::new(&path, true, irqs, regions).unwrap();
    let backend_seen = seen.clone();
    let thread = thread::spawn(move || {
        let _ = server.run(&mut Backend(backend_seen));
    });
    (path, seen, thread)
}

#[test]
fn a_device_from_another_project_is_read_written_and_given_eventfds_one_per_message() {
    let (path, seen, server) = device("crate");
    let mut c = Client::connect(&path, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(
        c.caps().max_msg_fds,
        1,
        "the crate's server takes one fd per message"
    );
    assert_eq!(c.regions()[VFIO_PCI_CONFIG_REGION_INDEX as usize].size, 256);
    assert_eq!(c.irqs()[VFIO_PCI_MSIX_IRQ_INDEX as usize].count, 4);
    let mut id = [0u8; 2];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(u16::from_le_bytes(id), 0x1234);
    c.region_write(VFIO_PCI_BAR0_REGION_INDEX, 0x10, &[1, 2, 3, 4])
        .unwrap();
    let mut back = [0u8; 4];
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x10, &mut back)
        .unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
    // Out of the region: refused here, nothing sent.
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, 4094, &mut back)
        .unwrap_err();
    // Three eventfds for vectors 1..4: three messages of one.
    let fds: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 1, &raw)
        .unwrap();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 2, &raw)
        .unwrap_err();
    {
        let s = seen.lock().unwrap();
        let starts: Vec<(u32, u32, usize)> = s.set_irqs.iter().map(|c| (c.2, c.3, c.4)).collect();
        assert_eq!(starts, vec![(1, 1, 1), (2, 1, 1), (3, 1, 1)]);
        // What the server holds is our eventfd: its write is our count.
        use std::io::Write as _;
        (&s.irq_files[0]).write_all(&1u64.to_le_bytes()).unwrap();
    }
    assert_eq!(fds[0].read().unwrap(), 1);
    c.clear_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, 4).unwrap();
    c.reset().unwrap();
    drop(c);
    server.join().unwrap();
}

#[test]
fn a_refused_set_irqs_is_an_error_and_the_connection_goes_on() {
    let (path, seen, server) = device("refuse");
    let mut c = Client::connect(&path, DEFAULT_TIMEOUT).unwrap();
    seen.lock().unwrap().refuse_irqs = true;
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = c
        .set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[fd.as_raw_fd()])
        .unwrap_err();
    assert!(
        matches!(err, VfioUserError::Refused { command: 8, .. }),
        "{err}"
    );
    assert!(!c.is_broken());
    let mut id = [0u8; 2];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    drop(c);
    server.join().unwrap();
}

/// What a lying server does with the header of the request after the version.
type Lie = fn(&mut UnixStream, [u8; 16]);

/// A server that answers the version and then does what `then` says with the next
/// request's header.
fn liar(name: &str, then: Lie) -> (PathBuf, thread::JoinHandle<()>) {
    let path = socket(name);
    let listener = UnixListener::bind(&path).unwrap();
    let thread = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        let h = Header::decode(&head).unwrap();
        let mut rest = vec![0u8; h.size as usize - 16];
        s.read_exact(&mut rest).unwrap();
        let caps = b"\0";
        let mut reply = Header {
            id: h.id,
            command: h.command,
            size: 16 + 4 + u32::try_from(caps.len()).unwrap(),
            flags: 1,
            error: 0,
        }
        .encode()
        .to_vec();
        reply.extend_from_slice(&[0, 0, 1, 0]);
        reply.extend_from_slice(caps);
        s.write_all(&reply).unwrap();
        let mut next = [0u8; 16];
        if s.read_exact(&mut next).is_ok() {
            let h = Header::decode(&next).unwrap();
            let mut rest = vec![0u8; h.size as usize - 16];
            let _ = s.read_exact(&mut rest);
            then(&mut s, next);
        }
    });
    (path, thread)
}

#[test]
fn servers_that_lie_stall_or_die_get_an_error_never_a_panic() {
    let cases: [(&str, Lie); 6] = [
        ("short", |s, h| {
            let mut r = Header::decode(&h).unwrap();
            (r.flags, r.size) = (1, 8);
            let _ = s.write_all(&r.encode());
        }),
        ("huge", |s, h| {
            let mut r = Header::decode(&h).unwrap();
            (r.flags, r.size) = (1, u32::MAX);
            let _ = s.write_all(&r.encode());
        }),
        ("other-id", |s, h| {
            let mut r = Header::decode(&h).unwrap();
            (r.flags, r.size, r.id) = (1, 16, r.id.wrapping_add(7));
            let _ = s.write_all(&r.encode());
        }),
        ("not-a-reply", |s, h| {
            let mut r = Header::decode(&h).unwrap();
            (r.flags, r.size) = (0, 16);
            let _ = s.write_all(&r.encode());
        }),
        ("dies", |_, _| {}),
        ("stalls", |_, _| thread::sleep(Duration::from_millis(1500))),
    ];
    for (name, then) in cases {
        let (path, server) = liar(name, then);
        let err = Client::connect(&path, Duration::from_millis(500)).unwrap_err();
        assert!(
            matches!(
                err,
                VfioUserError::Protocol { .. } | VfioUserError::Io { .. }
            ),
            "{name}: {err:?}"
        );
        server.join().unwrap();
    }
}

#[test]
fn a_device_becomes_a_function_on_our_root_with_its_ids_and_relayed_bars() {
    use devices::pci::{IoWindow, MmioWindow, PciLayout, PciRoot};
    use devices::ConcurrentBusDevice;

    let (path, seen, server) = device("function");
    let client = Client::connect(&path, DEFAULT_TIMEOUT).unwrap();
    let function = Arc::new(Mutex::new(function::VfioUserFunction::new(client).unwrap()));
    let mut root = PciRoot::new(PciLayout::default());
    root.add(6, 0, function.clone()).unwrap();
    root.assign_bars();
    let mut id = [0u8; 4];
    root.config_read(0x30, 0, &mut id);
    assert_eq!(id, [0x34, 0x12, 0x78, 0x56]);
    let mut pin = [0u8; 1];
    root.config_read(0x30, 0x3d, &mut pin);
    assert_eq!(pin, [1]);
    let mut bar4 = [0u8; 4];
    root.config_read(0x30, 0x20, &mut bar4);
    assert_eq!(bar4, [0; 4], "a region of 2^64 - 1 bytes is no BAR");
    let root = Arc::new(Mutex::new(root));
    // BAR 0 (memory) and BAR 2 (I/O) reach the device's regions 0 and 2.
    MmioWindow(root.clone()).write(0x20, &[5, 6]);
    assert_eq!(&seen.lock().unwrap().bar[0x20..0x22], &[5, 6]);
    let mut b = [0u8; 2];
    IoWindow(root.clone()).read(0x20, &mut b);
    assert_eq!(
        b,
        [5, 6],
        "the test backend serves both BARs from one buffer"
    );
    // The command register goes to the device too.
    root.lock().unwrap().config_write(0x30, 0x04, &[0x7, 0]);
    assert_eq!(seen.lock().unwrap().config[4], 0x7);
    // The device process dies: reads are all ones from then on, counted.
    seen.lock().unwrap().die = true;
    IoWindow(root.clone()).read(0x20, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    server.join().unwrap_err();
    MmioWindow(root.clone()).read(0x20, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    let f = function.lock().unwrap();
    assert!(f.lost(), "the connection is known to be gone");
    assert_eq!(f.failures(), 2);
}

/// An IOAPIC output that counts what it sends.
#[derive(Default)]
struct Sends(std::sync::atomic::AtomicUsize);

impl devices::ioapic::IoApicOutput for Sends {
    fn send(&self, _: &irq::MsiMessage) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The IOAPIC as a device's INTx input (as the VM assembles it).
struct Input(Arc<Mutex<devices::ioapic::IoApic>>);

impl crate::vfio_user::function::IntxInput for Input {
    fn assert(&self, pin: usize) -> bool {
        assert_eq!(pin, 17, "INTA of device 5: IOAPIC input 16 + 5 % 4");
        self.0.lock().unwrap().assert_line(pin)
    }
    fn resample(&self, pin: usize, unmask: Arc<dyn Fn() + Send + Sync>) {
        self.0.lock().unwrap().set_resample(pin, Some(unmask));
    }
}

#[test]
fn on_the_pci_side_its_intx_asserts_a_level_ioapic_input_until_eoi_and_a_snapshot_is_refused() {
    use std::sync::atomic::Ordering;

    use crate::config::{DeviceConfig, DeviceKind};
    use crate::pci::{IntxSink, PciDevices};
    use devices::bus::BusDevice;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    let (path, seen, server) = device("pci-side");
    let limits = irq::backing::Limits::default();
    let (core, _) = irq::fake::core(irq::Irqchip::InKernel, 4096, limits);
    let ram: GuestMemoryMmap = crate::memory::allocate_shared(16 << 20).unwrap();
    let device = DeviceConfig {
        kind: DeviceKind::VfioUser { socket: path },
        pci_slot: 5,
    };
    // The IOAPIC, its input 17 level-triggered (vector 0x30, unmasked), counting sends.
    let sends = Arc::new(Sends::default());
    let ioapic = Arc::new(Mutex::new(devices::ioapic::IoApic::new(sends.clone())));
    {
        let mut io = ioapic.lock().unwrap();
        io.write(0, &(0x10u32 + 2 * 17).to_le_bytes());
        io.write(0x10, &(0x30u32 | 1 << 15).to_le_bytes());
    }
    let intx: IntxSink = Arc::new(Input(ioapic.clone()));
    let handle: irq::CoreHandle = core.clone();
    let space = GuestMemoryAtomic::new(ram);
    let dma = devices::viommu::dma::DmaUnit::new(Arc::new(space.clone()));
    let pci = PciDevices::new(&[device], &handle, (&space, &dma), &intx, None).unwrap();
    let mut line = [0u8; 1];
    pci.functions()[0]
        .1
        .lock()
        .unwrap()
        .config()
        .read(0x3c, &mut line);
    assert_eq!(line, [17], "the interrupt line says which input");
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            s.set_irqs,
            vec![(0, 0x24, 0, 1, 1)],
            "INTx: one eventfd at set-up"
        );
        use std::io::Write as _;
        (&s.irq_files[0]).write_all(&1u64.to_le_bytes()).unwrap();
    }
    let wait_for = |n: usize| {
        let begin = std::time::Instant::now();
        while sends.0.load(Ordering::SeqCst) < n {
            assert!(
                begin.elapsed() < Duration::from_secs(10),
                "the INTx write was not relayed"
            );
            thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for(1);
    // Level-triggered: the line stays high, the device stays masked until the guest's
    // end of interrupt; then the line is lowered and the device unmasked.
    assert_eq!(seen.lock().unwrap().set_irqs.len(), 1, "not unmasked yet");
    ioapic.lock().unwrap().write(0x40, &0x30u32.to_le_bytes());
    assert_eq!(
        seen.lock().unwrap().set_irqs[1],
        (0, 0x11, 0, 1, 0),
        "INTx unmasked after the EOI"
    );
    // The device still needs service: it asserts again, and the input sends again.
    {
        use std::io::Write as _;
        let s = seen.lock().unwrap();
        (&s.irq_files[0]).write_all(&1u64.to_le_bytes()).unwrap();
    }
    wait_for(2);
    assert_eq!(sends.0.load(Ordering::SeqCst), 2);
    assert_eq!(pci.functions()[0].0, 5 << 3);
    let err = pci.snapshot().unwrap_err().to_string();
    assert!(
        err.contains("00:05.0 vfio-user") && err.contains("cannot be snapshotted"),
        "{err}"
    );
    drop(pci);
    server.join().unwrap();
}

/// Guest RAM in a memory file is mapped for the device's DMA: the device process reads what
/// the guest wrote through the file it was given.
#[test]
fn guest_ram_is_mapped_for_the_devices_dma_through_its_memory_file() {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    let (path, seen, server) = device("dma");
    let ram = crate::memory::allocate_shared(16 << 20).unwrap();
    ram.write_obj(0xfeed_f00du32, GuestAddress(0x12_3450))
        .unwrap();
    let mut c = Client::connect(&path, DEFAULT_TIMEOUT).unwrap();
    c.map_ram(&ram).unwrap();
    {
        let s = seen.lock().unwrap();
        let [(offset, address, size, Some(file))] = &s.dma[..] else {
            panic!("one mapping with its file: {:?}", s.dma.len());
        };
        assert_eq!((*offset, *address, *size), (0, 0, 16 << 20));
        let mut word = [0u8; 4];
        file.read_exact_at(&mut word, 0x12_3450).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xfeed_f00d);
    }
    // RAM that is not in a file cannot be mapped.
    let anonymous: vm_memory::GuestMemoryMmap =
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    c.map_ram(&anonymous).unwrap_err();
    drop(c);
    server.join().unwrap();
}

/// Our client's host of entries against our device server, under the core.
mod entries;

/// VFIO MSI-X: a host interrupt per named, present entry.
mod vfio_msix;

/// A device whose BAR 0 (four pages) lets its middle page be mapped, from the file `fd`.
fn serve_mappable(path: &Path, fd: RawFd, seen: Arc<Mutex<Seen>>) -> thread::JoinHandle<()> {
    use vfio_bindings::bindings::vfio::{vfio_region_sparse_mmap_area, VFIO_REGION_INFO_FLAG_MMAP};
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let regions = (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let (size, flags, areas, fd) = match index {
                // The middle page of four may be mapped.
                VFIO_PCI_BAR0_REGION_INDEX => (
                    0x4000,
                    rw | VFIO_REGION_INFO_FLAG_MMAP,
                    vec![vfio_user::SparseArea {
                        area: vfio_region_sparse_mmap_area {
                            offset: 0x1000,
                            size: 0x1000,
                        },
                    }],
                    Some(fd),
                ),
                VFIO_PCI_CONFIG_REGION_INDEX => (256, rw, Vec::new(), None),
                _ => (0, 0, Vec::new(), None),
            };
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
        })
        .collect();
    let irqs = (0..VFIO_PCI_NUM_IRQS)
        .map(|index| vfio_user::IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
        .collect();
    let server = vfio_user::Server::new(path, true, irqs, regions).unwrap();
    let backend = seen.clone();
    thread::spawn(move || {
        let _ = server.run(&mut Backend(backend));
    })
}

/// A BAR's mappable areas follow the BAR: mapped when it is placed with decoding on,
/// unmapped when decoding goes off or the BAR moves, mapped again at the new place.
#[test]
fn mappable_bar_areas_follow_the_bar() {
    use std::io::Write as _;

    use crate::vfio_user::function::{BarMapper, VfioUserFunction};
    use devices::pci::PciFunction;

    #[derive(Default)]
    struct Mapper(Mutex<Vec<String>>);
    impl BarMapper for Mapper {
        fn map(&self, gpa: u64, size: u64, _: &std::fs::File, offset: u64) -> io::Result<u32> {
            let mut log = self.0.lock().unwrap();
            log.push(format!("map {gpa:#x} {size:#x} @{offset:#x}"));
            Ok(u32::try_from(log.len()).unwrap())
        }
        fn unmap(&self, handle: u32) {
            self.0.lock().unwrap().push(format!("unmap {handle}"));
        }
    }

    let path = socket("mappable");
    let file_path = path.with_extension("mem");
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&file_path)
        .unwrap();
    file.write_all(&[0; 16]).unwrap();
    file.set_len(0x4000).unwrap();
    let _ = std::fs::remove_file(&file_path);
    let mut config = vec![0u8; 256];
    config[0..4].copy_from_slice(&0x0001_1af4u32.to_le_bytes());
    let seen = Arc::new(Mutex::new(Seen {
        config,
        bar: vec![0; 0x4000],
        ..Seen::default()
    }));
    let serving = serve_mappable(&path, file.as_raw_fd(), seen);
    let client = Client::connect(&path, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(client.regions()[0].sparse, [(0x1000, 0x1000)]);
    let mut f = VfioUserFunction::new(client).unwrap();
    let mapper = Arc::new(Mapper::default());
    f.set_mapper(mapper.clone());
    let log = || std::mem::take(&mut *mapper.0.lock().unwrap());
    assert!(log().is_empty(), "no BAR placed yet");
    f.config_write(0x10, &0xc000_0000u64.to_le_bytes());
    f.config_write(0x04, &2u16.to_le_bytes()); // memory decoding on
    assert_eq!(log(), ["map 0xc0001000 0x1000 @0x1000"]);
    assert_eq!(f.mapped_ranges(), [(0xc000_1000, 0x1000)]);
    f.config_write(0x04, &0u16.to_le_bytes());
    assert_eq!(log(), ["unmap 1"]);
    f.config_write(0x04, &2u16.to_le_bytes());
    f.config_write(0x10, &0xd000_0000u64.to_le_bytes());
    assert_eq!(
        log(),
        [
            "map 0xc0001000 0x1000 @0x1000",
            "unmap 1",
            "map 0xd0001000 0x1000 @0x1000"
        ]
    );
    drop(f);
    assert_eq!(
        log(),
        ["unmap 3"],
        "the last mapping goes with the function"
    );
    serving.join().unwrap();
}
