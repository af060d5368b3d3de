//! Our client's host of entries against our own device server over a socket, under the
//! core: eventfds cross only for entries that are present (none at allocation), a
//! retarget sends nothing, absent and freed entries are taken back, a refusal fails the
//! write with the old state kept, and a device that dies is detached.

use irq::backing::{AllocFlags, Backing, BackingError, Limits};
use irq::control::{EntryWrite, InterruptControl, Writer};
use irq::fake::FakeRouting;
use irq::irte::{Irte, SourceValidation};
use irq::msi::Target;
use irq::{InterruptCore, Irqchip, RouteTable};

use super::*;
use crate::config::DeviceKind;
use crate::vfio_user::entries::RemoteEntries;
use crate::vfio_user::server::{self, ServeReport};

const RID: u16 = 0x0018;

type Core = Arc<InterruptCore<Arc<FakeRouting>>>;
type Served = thread::JoinHandle<Result<ServeReport, server::ServeError>>;

fn live(dest: u32, vector: u8) -> EntryWrite {
    EntryWrite::Entry(Irte::new(
        Target::fixed(dest, vector),
        SourceValidation::RequesterId {
            sid: RID,
            qualifier: 0,
        },
    ))
}

/// An ims-slots server holding at most `limit` eventfds, its client's host, a core.
fn rig(name: &str, limit: Option<usize>) -> (Core, Arc<RemoteEntries>, Arc<Mutex<Client>>, Served) {
    let path = socket(name);
    let at = path.clone();
    let served = thread::spawn(move || {
        let kind = DeviceKind::ImsSlots {
            slots: 64,
            queues: 8,
        };
        server::serve_kind(&kind, &at, limit)
    });
    while !path.exists() {
        thread::sleep(std::time::Duration::from_millis(5));
    }
    let client = Arc::new(Mutex::new(Client::connect(&path, DEFAULT_TIMEOUT).unwrap()));
    let _ = std::fs::remove_file(&path);
    let host = Arc::new(RemoteEntries::of(&client).expect("the device hosts its entries"));
    let kvm = Arc::new(FakeRouting::new());
    let routes = RouteTable::with_irqchip(kvm, 4096, Irqchip::Split).unwrap();
    let core = InterruptCore::new(Backing::new(routes, Limits::default()).unwrap());
    core.attach_host(RID, host.clone()).unwrap();
    (core, host, client, served)
}

#[test]
fn only_present_entries_cross_the_socket() {
    let (core, host, client, served) = rig("entries", None);
    let first = core.allocate(RID, 8, AllocFlags::default()).unwrap();
    assert_eq!(host.messages(), 0, "nothing at allocation");
    core.write(
        Writer::Requester(RID),
        &[(first, live(0, 0x40)), (first + 1, live(1, 0x41))],
    )
    .unwrap();
    // The server says one fd per message: two messages.
    assert_eq!(host.messages(), 2);
    core.write(Writer::Requester(RID), &[(first, live(1, 0x50))])
        .unwrap();
    assert_eq!(host.messages(), 2, "a retarget is the core's alone");
    core.write(Writer::Requester(RID), &[(first + 1, EntryWrite::Absent)])
        .unwrap();
    assert_eq!(host.messages(), 3);
    core.free(RID, first, 8).unwrap();
    assert_eq!(host.messages(), 4);
    assert_eq!(core.lock().bound_entries(), 0);
    // The connection closes with its last holder: the server's run ends.
    drop((core, host, client));
    let report = served.join().unwrap().unwrap();
    assert_eq!((report.held, report.refused), (0, 0));
}

#[test]
fn a_refusal_fails_the_write_and_the_entries_keep_their_state() {
    let (core, host, client, served) = rig("refuse", Some(2));
    let first = core.allocate(RID, 4, AllocFlags::default()).unwrap();
    core.write(Writer::Requester(RID), &[(first, live(0, 0x40))])
        .unwrap();
    let before = core.entry(first).raw;
    // A retarget of the live entry and two activations: one more than the device holds.
    let err = core
        .write(
            Writer::Requester(RID),
            &[
                (first, live(1, 0x60)),
                (first + 1, live(1, 0x61)),
                (first + 2, live(1, 0x62)),
            ],
        )
        .unwrap_err();
    assert!(
        matches!(&err, BackingError::HostRefused { requester: RID, reason } if reason.contains("refused command 8")),
        "{err:?}"
    );
    assert_eq!(core.entry(first).raw, before, "the old target is kept");
    assert_eq!(core.entry(first + 1).raw, [0, 0]);
    assert!(!core.path().is_live(first + 2));
    assert_eq!(core.lock().bound_entries(), 1);
    // One fits.
    core.write(Writer::Requester(RID), &[(first + 1, live(1, 0x61))])
        .unwrap();
    drop((core, host, client));
    let report = served.join().unwrap().unwrap();
    assert_eq!((report.held, report.refused), (2, 1));
}
