//! A device that leaves MSI-X to the client (VFIO's MSI-X index, 4 vectors, the table at
//! BAR 0 offset 0, pending bits at 0x800): each vector gets the eventfd of the remapping
//! entry it names, only while that entry is present for the device's requester.

use irq::backing::{Backing, Limits};
use irq::control::{EntryWrite, Writer};
use irq::fake::FakeRouting;
use irq::irte::{Irte, SourceValidation};
use irq::msi::Target;
use irq::{CoreHandle, InterruptCore, Irqchip, MsiMessage, RouteTable};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};

use super::*;
use crate::vfio_user::function::VfioUserFunction;
use devices::pci::PciFunction;

const RID: u16 = 0x0028;
const SET: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
const NONE: u32 = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
const MSIX: u32 = VFIO_PCI_MSIX_IRQ_INDEX;

fn live(sid: u16) -> EntryWrite {
    EntryWrite::Entry(Irte::new(
        Target::fixed(0, 0x40),
        SourceValidation::RequesterId { sid, qualifier: 0 },
    ))
}

/// Writes vector `v`'s entry: the remappable message of entry `index`, masked or not.
fn vector(f: &mut VfioUserFunction, v: u64, index: u16, masked: bool) {
    let msg = MsiMessage::remappable(index, None);
    let at = v * 16;
    f.bar_write(0, at, &msg.address_lo().to_le_bytes());
    f.bar_write(0, at + 4, &msg.address_hi().to_le_bytes());
    f.bar_write(0, at + 8, &msg.data.to_le_bytes());
    f.bar_write(0, at + 12, &u32::from(masked).to_le_bytes());
}

fn sent(seen: &Mutex<Seen>) -> Vec<(u32, u32, u32, u32, usize)> {
    std::mem::take(&mut seen.lock().unwrap().set_irqs)
        .into_iter()
        .filter(|s| s.0 == MSIX)
        .collect()
}

#[test]
fn vectors_get_host_interrupts_only_for_present_entries_they_name() {
    let (path, seen, server) = device_with("vfio-msix", |c| {
        c[0x06] = 0x10; // capability list
        c[0x34] = 0x40;
        c[0x40] = devices::pci::msix::CAP_ID;
        c[0x42] = 3; // 4 vectors
        c[0x44..0x48].copy_from_slice(&0u32.to_le_bytes()); // table: BAR 0 + 0
        c[0x48..0x4c].copy_from_slice(&0x800u32.to_le_bytes()); // PBA: BAR 0 + 0x800
    });
    let client = Client::connect(&path, DEFAULT_TIMEOUT).unwrap();
    let mut f = VfioUserFunction::new(client).unwrap();
    assert!(f.has_vfio_msix());
    let kvm = Arc::new(FakeRouting::new());
    let routes = RouteTable::with_irqchip(kvm, 4096, Irqchip::Split).unwrap();
    let core: Arc<InterruptCore<Arc<FakeRouting>>> =
        InterruptCore::new(Backing::new(routes, Limits::default()).unwrap());
    let handle: CoreHandle = core.clone();
    let host = f.msix_host(handle.clone(), RID).unwrap();
    handle.attach_named_host(RID, host.clone()).unwrap();
    // The guest reads the capability as the device has it.
    assert_eq!(f.config().bytes(0x40, 1), [devices::pci::msix::CAP_ID]);
    // MSI-X enabled, vector 0 names entry 10 (absent): nothing sent.
    f.config_write(0x42, &0x8003u16.to_le_bytes());
    vector(&mut f, 0, 10, false);
    assert!(sent(&seen).is_empty(), "nothing at enable or unmask");
    let mut word = [0u8; 4];
    f.bar_read(0, 0, &mut word);
    assert_eq!(
        u32::from_le_bytes(word),
        MsiMessage::remappable(10, None).address_lo()
    );
    // A VT-d invalidation makes entry 10 present for the device: vector 0 gets it.
    handle.write(Writer::Platform, &[(10, live(RID))]).unwrap();
    assert_eq!(sent(&seen), [(MSIX, SET, 0, 1, 1)]);
    // Vector 1 names the same entry: it gets the same eventfd.
    vector(&mut f, 1, 10, false);
    assert_eq!(sent(&seen), [(MSIX, SET, 1, 1, 1)]);
    // Masking vector 0 takes its eventfd back: the index is disabled and vector 1,
    // still naming a present entry, gets its eventfd again.
    f.bar_write(0, 12, &1u32.to_le_bytes());
    assert_eq!(sent(&seen), [(MSIX, NONE, 0, 0, 0), (MSIX, SET, 1, 1, 1)]);
    // A retarget of the entry is the core's alone.
    handle
        .write(
            Writer::Platform,
            &[(
                10,
                EntryWrite::Entry(Irte::new(
                    Target::fixed(1, 0x41),
                    SourceValidation::RequesterId {
                        sid: RID,
                        qualifier: 0,
                    },
                )),
            )],
        )
        .unwrap();
    assert!(sent(&seen).is_empty());
    // Another requester's entry is never handed over.
    vector(&mut f, 2, 20, false);
    handle
        .write(Writer::Platform, &[(20, live(0x0030))])
        .unwrap();
    assert!(sent(&seen).is_empty());
    // The entry goes absent: taken back.
    handle
        .write(Writer::Platform, &[(10, EntryWrite::Absent)])
        .unwrap();
    assert_eq!(sent(&seen), [(MSIX, NONE, 0, 0, 0)]);
    assert_eq!(core.lock().bound_entries(), 0);
    // A device that refuses: the core's write that would make the entry present fails.
    seen.lock().unwrap().refuse_irqs = true;
    handle
        .write(Writer::Platform, &[(10, live(RID))])
        .unwrap_err();
    assert_eq!(handle.entry(10).raw, [0, 0], "nothing applied");
    assert!(host.messages() > 0);
    drop((f, host, handle, core));
    server.join().unwrap();
}
