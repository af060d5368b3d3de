#![expect(
    clippy::cast_possible_truncation,
    reason = "test data is small by construction"
)]

use std::sync::Mutex as StdMutex;

use irq::backing::{InterruptPath, Limits};
use irq::control::InterruptControl;
use irq::fake::FakeRouting;
use irq::irte::SourceValidation;
use irq::msi::Target;
use irq::remap::FaultReason;
use irq::Irqchip;
use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

mod dma;

use super::regs::desc;
use super::testing::FakeDriver;
use super::*;

const DEV: u16 = 0x0010;
const TABLE: u64 = 0x1_0000;
const QUEUE: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const FAULT_VECTOR: u32 = 0xe0;

#[derive(Default)]
struct Injected(StdMutex<Vec<MsiMessage>>);

impl MsiInjector for Injected {
    fn inject(&self, msg: &MsiMessage) -> std::io::Result<()> {
        self.0.lock().unwrap().push(*msg);
        Ok(())
    }
}

struct Rig {
    driver: FakeDriver<VtdDevice>,
    core: irq::fake::FakeCore,
    unit: Arc<Mutex<Vtd>>,
    path: Arc<InterruptPath>,
    kvm: Arc<FakeRouting>,
    injected: Arc<Injected>,
}

impl Rig {
    fn new() -> Self {
        let (core, kvm) = irq::fake::core(Irqchip::InKernel, 4096, Limits::default());
        let path = core.path();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let injected = Arc::new(Injected::default());
        let unit = Arc::new(Mutex::new(Vtd::new(
            core.handle(),
            Arc::new(GuestMemoryAtomic::new(mem.clone())),
            injected.clone(),
        )));
        path.set_fault_sink(WeakVtd::to(&unit));
        core.set_mirror(WeakVtd::to(&unit));
        unit.lock()
            .unwrap()
            .dma()
            .set_fault_sink(WeakVtd::to(&unit));
        path.set_compat_injector(injected.clone());
        let driver = FakeDriver::new(VtdDevice(unit.clone()), mem, TABLE, QUEUE, STATUS);
        Self {
            driver,
            core,
            unit,
            path,
            kvm,
            injected,
        }
    }

    fn enabled(eim: bool) -> Self {
        let mut rig = Self::new();
        rig.driver.write32(regs::FEDATA, FAULT_VECTOR);
        rig.driver.write32(regs::FEADDR, 0xfee0_0000);
        rig.driver.write32(regs::FECTL, 0);
        rig.driver.enable(7, eim); // 256 entries
        rig
    }

    fn entry(dest: u32, vector: u8, eim: bool) -> [u64; 2] {
        Irte::new(
            Target::fixed(dest, vector),
            SourceValidation::RequesterId {
                sid: DEV,
                qualifier: 0,
            },
        )
        .encode(eim)
    }

    fn lands(&self, index: u32) -> Option<Target> {
        self.kvm.fire(self.path.line_fd(index)?)
    }

    fn events(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.injected.0.lock().unwrap())
    }
}

#[test]
fn capabilities_and_linux_enable_sequence() {
    let mut rig = Rig::enabled(true);
    let d = &mut rig.driver;
    assert_eq!(d.read32(regs::VER), 0x10);
    let ecap = d.read64(regs::ECAP);
    assert_eq!(
        ecap & (regs::ecap::IR | regs::ecap::QI | regs::ecap::EIM),
        0x1a
    );
    assert_eq!((d.read64(regs::CAP) >> 24) & 0x3ff, regs::FRCD / 16, "FRO");
    // The values docs/viommu.md gives (and Linux prints: "cap 12078c202f0602 ecap f0305b").
    assert_eq!(d.read64(regs::CAP), 0x0012_078c_202f_0602);
    assert_eq!(ecap, 0x00f0_305b);
    let gsts = d.read32(regs::GSTS);
    assert_eq!(
        gsts & (global::SIRTP | global::QIE | global::IRE),
        global::SIRTP | global::QIE | global::IRE
    );
    assert_eq!(gsts & (global::CFI | global::TE), 0);
    // 32-bit halves of 64-bit registers read as on hardware.
    assert_eq!(d.read32(regs::ECAP), ecap as u32);
    assert_eq!(d.read32(regs::ECAP + 4), (ecap >> 32) as u32);
    assert!(d.wait());
}

#[test]
fn entries_are_read_when_invalidated_not_on_every_interrupt() {
    let mut rig = Rig::enabled(true);
    rig.driver.write_entry(5, Rig::entry(1, 0x40, true));
    assert_eq!(
        rig.path.signal(5, DEV).unwrap_err().reason,
        FaultReason::NotPresent
    );
    assert!(rig.driver.invalidate(5, 0));
    rig.path.signal(5, DEV).unwrap();
    assert_eq!(rig.lands(5), Some(Target::fixed(1, 0x40)));
    rig.driver.write_entry(5, Rig::entry(0, 0x41, true));
    assert_eq!(
        rig.lands(5),
        Some(Target::fixed(1, 0x40)),
        "not invalidated yet"
    );
    assert!(rig.driver.invalidate(5, 0));
    assert_eq!(rig.lands(5), Some(Target::fixed(0, 0x41)));
}

#[test]
fn xapic_mode_tables_use_the_8_bit_destination() {
    let mut rig = Rig::enabled(false);
    rig.driver.write_entry(2, Rig::entry(3, 0x42, false));
    assert!(rig.driver.invalidate_all());
    assert_eq!(rig.lands(2), Some(Target::fixed(3, 0x42)));
}

#[test]
fn an_index_mask_invalidates_an_aligned_block() {
    let mut rig = Rig::enabled(true);
    for i in 8..=12 {
        rig.driver
            .write_entry(i, Rig::entry(0, 0x40 + i as u8, true));
    }
    assert!(rig.driver.invalidate(9, 2)); // entries 8..=11
    assert!((8..=11).all(|i| rig.path.is_live(i)));
    assert!(!rig.path.is_live(12));
}

#[test]
fn one_route_commit_per_batch_of_descriptors() {
    let mut rig = Rig::enabled(true);
    for i in 0..16 {
        rig.driver
            .write_entry(i, Rig::entry(i % 2, 0x50 + i as u8, true));
    }
    let before = rig.kvm.set_calls();
    // Sixteen IEC descriptors and one wait, written before the tail moves.
    let queue_tail = rig.driver.read64(regs::IQT);
    for i in 0..16u64 {
        let low = desc::IEC | desc::IEC_SELECTIVE | (i << 32);
        rig.driver
            .mem
            .write_obj([low, 0u64], GuestAddress(QUEUE + queue_tail + 16 * i))
            .unwrap();
    }
    let tail = queue_tail + 16 * 16;
    rig.driver
        .mem
        .write_obj(
            [desc::WAIT | desc::WAIT_SW | (77 << 32), STATUS],
            GuestAddress(QUEUE + tail),
        )
        .unwrap();
    rig.driver.write64(regs::IQT, tail + 16);
    assert_eq!(
        rig.driver
            .mem
            .read_obj::<u32>(GuestAddress(STATUS))
            .unwrap(),
        77
    );
    assert_eq!(rig.kvm.set_calls() - before, 1);
    assert!((0..16).all(|i| rig.path.is_live(i)));
}

fn fault(rig: &mut Rig, want: FaultReason, index: Option<u32>, source: u16) {
    let d = &mut rig.driver;
    let fsts = d.read32(regs::FSTS);
    assert_ne!(fsts & regs::fsts::PPF, 0, "{want:?}: PPF");
    let fri = ((fsts >> regs::fsts::FRI_SHIFT) & 0xff) as usize;
    let (fi, sid, reason, f) = d.fault_record(fri);
    assert_eq!((sid, reason, f), (source, want.code(), true), "{want:?}");
    if let Some(i) = index {
        assert_eq!(fi, u64::from(i));
    }
    d.clear_fault(fri);
    assert_eq!(d.read32(regs::FSTS) & regs::fsts::PPF, 0);
    let events = rig.events();
    assert_eq!(
        events,
        vec![MsiMessage {
            address: 0xfee0_0000,
            data: FAULT_VECTOR
        }],
        "{want:?}: event"
    );
}

#[test]
fn every_fault_is_recorded_and_raises_the_fault_event() {
    let mut rig = Rig::enabled(true);
    rig.driver.write_entry(5, Rig::entry(0, 0x40, true));
    let mut reserved = Rig::entry(0, 0x40, true);
    reserved[0] |= 1 << 13;
    rig.driver.write_entry(7, reserved);
    assert!(rig.driver.invalidate_all());
    rig.events();

    rig.path
        .signal_msi(&MsiMessage::remappable(300, None), DEV)
        .unwrap_err();
    fault(&mut rig, FaultReason::IndexOutOfRange, Some(300), DEV);
    rig.path.signal(6, DEV).unwrap_err();
    fault(&mut rig, FaultReason::NotPresent, Some(6), DEV);
    rig.path.signal(7, DEV).unwrap_err();
    fault(&mut rig, FaultReason::EntryReserved, Some(7), DEV);
    rig.path.signal(5, 0x0018).unwrap_err();
    fault(&mut rig, FaultReason::SourceIdMismatch, Some(5), 0x0018);
    let compat = MsiMessage::compatibility(0, 0x33).unwrap();
    rig.path.signal_msi(&compat, DEV).unwrap_err();
    fault(&mut rig, FaultReason::CompatibilityBlocked, None, DEV);
    rig.path.signal(5, DEV).unwrap();
    assert_eq!(rig.unit.lock().unwrap().counters().faults_recorded, 5);
}

#[test]
fn faults_are_the_units_only_while_it_remaps() {
    let mut rig = Rig::new();
    rig.path.signal(3, DEV).unwrap_err();
    assert_eq!(rig.driver.read32(regs::FSTS), 0);
    assert!(rig.events().is_empty());
    rig.driver.enable(7, true);
    rig.path.signal(3, DEV).unwrap_err();
    assert_ne!(rig.driver.read32(regs::FSTS) & regs::fsts::PPF, 0);
}

#[test]
fn compatibility_format_passes_until_ir_blocks_it() {
    let mut rig = Rig::new();
    let compat = MsiMessage::compatibility(1, 0x33).unwrap();
    rig.path.signal_msi(&compat, DEV).unwrap();
    assert_eq!(rig.events(), vec![compat]);
    rig.driver.enable(7, true);
    rig.path.signal_msi(&compat, DEV).unwrap_err();
    // CFI set: passes again.
    rig.driver.command(global::CFI, 0);
    rig.events();
    rig.path.signal_msi(&compat, DEV).unwrap();
    assert_eq!(rig.events(), vec![compat]);
}

#[test]
fn a_masked_fault_event_waits_for_the_unmask_and_records_overflow() {
    let mut rig = Rig::enabled(true);
    rig.driver.write32(regs::FECTL, event::IM);
    for i in 0..9 {
        rig.path.signal(100 + i, DEV).unwrap_err();
    }
    assert!(rig.events().is_empty());
    assert_eq!(rig.driver.read32(regs::FECTL), event::IM | event::IP);
    let fsts = rig.driver.read32(regs::FSTS);
    assert_eq!(
        fsts & (regs::fsts::PFO | regs::fsts::PPF),
        regs::fsts::PFO | regs::fsts::PPF
    );
    rig.driver.write32(regs::FECTL, 0);
    assert_eq!(rig.events().len(), 1);
    assert_eq!(rig.driver.read32(regs::FECTL), 0);
    rig.driver.write32(regs::FSTS, regs::fsts::PFO);
    assert_eq!(rig.driver.read32(regs::FSTS) & regs::fsts::PFO, 0);
}

#[test]
fn a_bad_descriptor_stops_the_queue_until_fixed() {
    let mut rig = Rig::enabled(true);
    rig.events();
    let head = rig.driver.read64(regs::IQH);
    rig.driver.submit([0xf, 0]);
    assert_ne!(rig.driver.read32(regs::FSTS) & regs::fsts::IQE, 0);
    assert_eq!(
        rig.driver.read64(regs::IQH),
        head,
        "IQH stays at the bad descriptor"
    );
    assert_eq!(rig.events().len(), 1, "fault event");
    // What Linux does: put a wait descriptor in its place, clear IQE.
    rig.driver
        .mem
        .write_obj(
            [desc::WAIT | desc::WAIT_SW | (9 << 32), STATUS],
            GuestAddress(QUEUE + head),
        )
        .unwrap();
    rig.driver.write32(regs::FSTS, regs::fsts::IQE);
    assert_eq!(
        rig.driver
            .mem
            .read_obj::<u32>(GuestAddress(STATUS))
            .unwrap(),
        9
    );
    assert_eq!(rig.driver.read64(regs::IQH), rig.driver.read64(regs::IQT));
    assert!(rig.driver.wait());
}

#[test]
fn malformed_descriptors_of_every_type_are_queue_errors_not_crashes() {
    for bad in [
        [desc::IEC | (1 << 10), 0],            // type bits 6:4
        [desc::IEC | (1 << 20), 0],            // IEC reserved
        [desc::IEC, 1],                        // IEC second quadword
        [desc::WAIT | (1 << 12), STATUS],      // wait reserved
        [desc::WAIT | desc::WAIT_SW, 1 << 40], // status address outside RAM
        [0, 0],
        [0x7, 0],
        [u64::MAX, u64::MAX],
    ] {
        let mut rig = Rig::enabled(true);
        rig.driver.submit(bad);
        assert_ne!(
            rig.driver.read32(regs::FSTS) & regs::fsts::IQE,
            0,
            "{bad:x?}"
        );
    }
}

#[test]
fn a_wait_with_if_raises_the_invalidation_event() {
    let mut rig = Rig::enabled(true);
    rig.driver.write32(regs::IEDATA, 0x61);
    rig.driver.write32(regs::IEADDR, 0xfee0_1000);
    rig.events();
    rig.driver.submit([desc::WAIT | desc::WAIT_IF, 0]);
    assert_eq!(rig.driver.read32(regs::ICS), 1);
    assert_eq!(
        rig.events(),
        vec![MsiMessage {
            address: 0xfee0_1000,
            data: 0x61
        }]
    );
    rig.driver.write32(regs::ICS, 1);
    assert_eq!(rig.driver.read32(regs::ICS), 0);
}

#[test]
fn random_register_accesses_never_panic() {
    let mut rig = Rig::enabled(true);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % regs::SIZE;
        let len = [1usize, 2, 4, 8, 3][(x >> 20) as usize % 5];
        let value = x.rotate_left(29);
        if x & 1 == 0 {
            rig.driver.device.write(offset, &value.to_le_bytes()[..len]);
        } else {
            let mut buf = [0u8; 8];
            rig.driver.device.read(offset, &mut buf[..len]);
        }
    }
    // Still answering.
    assert_eq!(rig.driver.read32(regs::VER), 0x10);
    assert!(rig.unit.lock().unwrap().counters().bad_accesses > 0);
}

/// Found by fuzzing: with the unit as a strong fault sink, the unit, the interrupt core
/// and every eventfd behind it outlived the VM (a reference cycle), and a process that
/// builds VMs one after another ran out of descriptors.
#[test]
fn a_dropped_unit_takes_the_interrupt_core_with_it() {
    let rig = Rig::enabled(true);
    let weak = Arc::downgrade(&rig.unit);
    let path = Arc::downgrade(&rig.path);
    drop(rig);
    assert!(weak.upgrade().is_none(), "the unit outlived its VM");
    assert!(
        path.upgrade().is_none(),
        "the interrupt core outlived its VM"
    );
}

#[test]
fn a_unit_restores_from_its_state_and_tampered_states_are_refused() {
    let rig = Rig::enabled(true);
    // A fault (an absent entry) fills a fault record.
    rig.path.signal(5, DEV).unwrap_err();
    let state = rig.unit.lock().unwrap().snapshot();
    let core = rig.core.lock().snapshot();
    assert!(state.frcd.iter().any(|r| r[1] >> 63 != 0), "{state:?}");
    assert!(state.table.is_some());
    let restored_core = || irq::fake::restored_core(&core).unwrap().0.handle();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let events: Arc<dyn MsiInjector> = Arc::new(Injected::default());
    let ram: crate::memory::SharedRam = Arc::new(GuestMemoryAtomic::new(mem));
    let unit = Vtd::restore(restored_core(), ram.clone(), events.clone(), state.clone()).unwrap();
    assert_eq!(unit.snapshot(), state);
    let tamper: [fn(&mut VtdSnapshot); 4] = [
        |s| s.iqh = 8,
        |s| s.iqt = 1 << 40,
        |s| s.next_frcd = regs::NFR,
        |s| s.table = Some((0, 3, true)),
    ];
    for edit in tamper {
        let mut bad = state.clone();
        edit(&mut bad);
        Vtd::restore(restored_core(), ram.clone(), events.clone(), bad).unwrap_err();
    }
}

/// A queue full of invalidations (global, and every block size) with waits between them
/// reads each entry of the table once per pass, not once per invalidation, and still
/// loads what the guest wrote before it.
#[test]
fn one_pass_reads_the_table_at_most_once() {
    let mut rig = Rig::enabled(true);
    rig.driver.write_entry(5, Rig::entry(1, 0x40, true));
    let before = rig.unit.lock().unwrap().counters().entries_loaded;
    let wait = desc::WAIT | desc::WAIT_SW | (7u64 << 32);
    let mut queue = Vec::new();
    for k in 0..85u64 {
        let selective = desc::IEC | desc::IEC_SELECTIVE | ((k % 9) << 27) | ((k * 37 % 256) << 32);
        queue.extend([[desc::IEC, 0], [selective, 0], [wait, STATUS]]);
    }
    rig.driver.submit_all(&queue);
    let unit = rig.unit.lock().unwrap();
    let counters = unit.counters();
    assert_eq!(counters.entries_loaded - before, 256, "the table once");
    assert_eq!(counters.descriptors, 255 + 2, "every descriptor ran");
    drop(unit);
    assert_eq!(rig.lands(5), Some(Target::fixed(1, 0x40)));
    // The next pass reads again.
    assert!(rig.driver.invalidate(5, 0));
    assert_eq!(
        rig.unit.lock().unwrap().counters().entries_loaded - before,
        257
    );
}
