//! The slot-array IMS device.
//!
//! BAR 0 holds registers, then the slots:
//!
//! ```text
//! 0x000 ID "IMS1" (RO)       0x004 VERSION 1 (RO)      0x008 SLOTS (RO)   0x00c QUEUES (RO)
//! 0x010 STATUS (W1C): bit 0 a compatibility-format message was refused, bit 1 a queue error
//! 0x014 ERROR_SLOT (RO)      0x018 COMPLETIONS (RO, low 32 bits)   0x01c FAULTS (RO)
//! 0x020 QUEUE_SELECT         0x024 QUEUE_SIZE          0x028 QUEUE_SLOT   0x02c QUEUE_READY
//! 0x030 DESC lo/hi           0x038 AVAIL lo/hi         0x040 USED lo/hi
//! 0x048 QUEUE_NOTIFY (WO): the index of a queue with new work (all ones: every queue)
//! 0x050 INJECT_DELAY_US: fault injection: complete one work item per this many
//!       microseconds (0: at once)
//! 0x054 RESET (WO): bit 0 resets the device (queues stopped, slots cleared and masked)
//! 0x1000 + 16 k: slot k: address low, address high, data, control (bit 0 mask, bit 1 pending RO)
//! ```
//!
//! A slot accepts only a remappable-format message (or all zeros): writing a
//! compatibility-format address is refused, the previous message is kept, and STATUS bit 0
//! and ERROR_SLOT say so. A queue's completions are returned on its used ring, each raising
//! the interrupt of the queue's slot through the remapping core, as the device's requester:
//! an absent entry, or another device's, is a remapping fault, never a delivery. A masked
//! slot latches a pending bit and fires when unmasked.
//!
//! Register accesses come from vCPU threads; the work itself is done by
//! [`super::ImsBackend`] on an event loop, woken by an eventfd that `QUEUE_NOTIFY` writes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use irq::MessageSink;
use irq::MsiMessage;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{AddressSpace, DefaultMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::config::{Bar, ConfigChange, ConfigSpace};
use crate::pci::PciFunction;

pub use hypercall::ims::slots::*;
pub use snapshot::SlotsSnapshot;

mod snapshot;

const ID_VALUE: u32 = ID;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    message: [u32; 3],
    control: u32,
}

#[derive(Debug)]
struct WorkQueue {
    queue: Queue,
    slot: u32,
}

/// The device state shared by the bus side and the backend, over guest memory `M`.
pub struct ImsSlots<M: AddressSpace = DefaultMemory> {
    config: ConfigSpace,
    slots: Vec<Slot>,
    queues: Vec<WorkQueue>,
    select: u32,
    status: u32,
    error_slot: u32,
    completions: u64,
    requester: u16,
    path: Arc<dyn MessageSink>,
    mem: M,
    notified: BTreeSet<u32>,
    kick: EventFd,
    faults: u64,
    delay: Duration,
    /// Work taken off the rings, waiting for its (delayed) completion: queue, head, due.
    deferred: super::Deferred,
}

fn u32_of(data: &[u8]) -> u32 {
    crate::bus::le_u32(data)
}

impl<M: AddressSpace> std::fmt::Debug for ImsSlots<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImsSlots")
            .field("slots", &self.slots.len())
            .field("queues", &self.queues.len())
            .field("requester", &self.requester)
            .field("status", &self.status)
            .field("completions", &self.completions)
            .finish_non_exhaustive()
    }
}

impl<M: AddressSpace> ImsSlots<M> {
    /// A device with `slots` slots (1 to [`MAX_SLOTS`]) and `queues` work queues, raising
    /// interrupts through `path` as `requester`.
    ///
    /// # Errors
    /// The error of creating the notification eventfd.
    pub fn new(
        slots: u32,
        queues: u32,
        requester: u16,
        path: Arc<dyn MessageSink>,
        mem: M,
    ) -> std::io::Result<Self> {
        let slots = slots.clamp(1, MAX_SLOTS);
        let queues = queues.clamp(1, slots);
        let mut config = ConfigSpace::new(VENDOR_ID, DEVICE_ID, [0x08, 0x80, 0x00], 1);
        let size = (reg::SLOT_BASE + reg::SLOT_SIZE * u64::from(slots)).next_power_of_two();
        config.add_bar(Bar { index: 0, size });
        let queue = |_| Queue::new(MAX_QUEUE_SIZE).map(|queue| WorkQueue { queue, slot: 0 });
        let queues = (0..queues)
            .map(queue)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        Ok(Self {
            config,
            slots: vec![
                Slot {
                    message: [0; 3],
                    control: SLOT_MASK
                };
                slots as usize
            ],
            queues,
            select: 0,
            status: 0,
            error_slot: 0,
            completions: 0,
            requester,
            path,
            mem,
            notified: BTreeSet::new(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            faults: 0,
            delay: Duration::ZERO,
            deferred: super::Deferred::default(),
        })
    }

    /// Message slots.
    #[must_use]
    pub fn slot_count(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// Slots the driver has unmasked (in use).
    #[must_use]
    pub fn slots_in_use(&self) -> u32 {
        let n = self
            .slots
            .iter()
            .filter(|s| s.control & SLOT_MASK == 0)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Work queues.
    #[must_use]
    pub fn queue_count(&self) -> u32 {
        u32::try_from(self.queues.len()).unwrap_or(u32::MAX)
    }

    /// Completions so far.
    #[must_use]
    pub fn completions(&self) -> u64 {
        self.completions
    }

    /// Interrupts refused by the remapping core (faults).
    #[must_use]
    pub fn faults(&self) -> u64 {
        self.faults
    }

    fn message(&self, slot: usize) -> Option<MsiMessage> {
        let s = self.slots.get(slot)?;
        Some(MsiMessage {
            address: u64::from(s.message[0]) | (u64::from(s.message[1]) << 32),
            data: s.message[2],
        })
    }

    /// Raises slot `slot`'s interrupt (or latches it pending while masked).
    pub fn raise(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.control & SLOT_MASK != 0 {
            s.control |= SLOT_PENDING;
            tracing::info!(
                target: "irvm::ims",
                kind = "latched",
                device = %format_args!("{:#06x}", self.requester),
                slot,
            );
            return;
        }
        if let Some(msg) = self.message(slot) {
            if self.path.signal_msi(&msg, self.requester).is_err() {
                self.faults += 1;
            }
        }
    }

    fn slot_write(&mut self, slot: usize, word: usize, value: u32) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        match word {
            0 => {
                // Remappable format (bit 4) or cleared; a compatibility message is refused.
                if value != 0 && value & 0x10 == 0 {
                    self.status |= STATUS_FORMAT_ERROR;
                    self.error_slot = u32::try_from(slot).unwrap_or(u32::MAX);
                    tracing::info!(
                        target: "irvm::ims",
                        kind = "slot_refused",
                        device = %format_args!("{:#06x}", self.requester),
                        slot,
                        address = %format_args!("{value:#010x}"),
                    );
                    return;
                }
                s.message[0] = value;
                tracing::info!(
                    target: "irvm::ims",
                    kind = "slot_message",
                    device = %format_args!("{:#06x}", self.requester),
                    slot,
                    address = %format_args!("{value:#010x}"),
                );
            }
            1 | 2 => {
                if let Some(m) = s.message.get_mut(word) {
                    *m = value;
                }
            }
            _ => {
                let was_pending = s.control & SLOT_PENDING != 0;
                s.control = (value & SLOT_MASK) | (s.control & SLOT_PENDING);
                if value & SLOT_MASK == 0 && was_pending {
                    s.control &= !SLOT_PENDING;
                    self.raise(slot);
                }
            }
        }
    }

    fn selected(&mut self) -> Option<&mut WorkQueue> {
        self.queues.get_mut(self.select as usize)
    }

    fn register_read(&mut self, offset: u64) -> u32 {
        if offset >= reg::SLOT_BASE {
            let index = (offset - reg::SLOT_BASE) / reg::SLOT_SIZE;
            let word = ((offset - reg::SLOT_BASE) % reg::SLOT_SIZE / 4) as usize;
            let Some(s) = usize::try_from(index).ok().and_then(|i| self.slots.get(i)) else {
                return 0;
            };
            return s.message.get(word).copied().unwrap_or(s.control);
        }
        let slots = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let queues = u32::try_from(self.queues.len()).unwrap_or(u32::MAX);
        let selected = self.queues.get(self.select as usize);
        match offset {
            reg::ID => ID_VALUE,
            reg::VERSION => 1,
            reg::SLOTS => slots,
            reg::QUEUES => queues,
            reg::STATUS => self.status,
            reg::ERROR_SLOT => self.error_slot,
            reg::COMPLETIONS => (self.completions & 0xffff_ffff) as u32,
            reg::FAULTS => (self.faults & 0xffff_ffff) as u32,
            reg::QUEUE_SELECT => self.select,
            reg::QUEUE_SIZE => selected.map_or(0, |q| u32::from(q.queue.size())),
            reg::QUEUE_SLOT => selected.map_or(0, |q| q.slot),
            reg::QUEUE_READY => selected.map_or(0, |q| u32::from(q.queue.ready())),
            reg::INJECT_DELAY_US => u32::try_from(self.delay.as_micros()).unwrap_or(u32::MAX),
            _ => 0,
        }
    }

    fn register_write(&mut self, offset: u64, value: u32) {
        if offset >= reg::SLOT_BASE {
            let index = (offset - reg::SLOT_BASE) / reg::SLOT_SIZE;
            let word = ((offset - reg::SLOT_BASE) % reg::SLOT_SIZE / 4) as usize;
            if let Ok(slot) = usize::try_from(index) {
                self.slot_write(slot, word, value);
            }
            return;
        }
        let slots = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        match offset {
            reg::STATUS => self.status &= !value,
            reg::QUEUE_SELECT => self.select = value,
            // A queue is programmed while it is not ready; writes to a running queue's
            // layout are ignored.
            reg::QUEUE_SIZE => {
                if let Some(q) = self.selected().filter(|q| !q.queue.ready()) {
                    q.queue.set_size(u16::try_from(value).unwrap_or(u16::MAX));
                }
            }
            reg::QUEUE_SLOT => {
                if let Some(q) = self.selected().filter(|_| value < slots) {
                    q.slot = value;
                }
            }
            reg::QUEUE_READY => self.set_ready(value & 1 != 0),
            reg::RESET if value & 1 != 0 => self.reset(),
            reg::QUEUE_DESC | 0x034 | reg::QUEUE_AVAIL | 0x03c | reg::QUEUE_USED | 0x044 => {
                let (low, high) = if offset % 8 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                if let Some(q) = self.selected().filter(|q| !q.queue.ready()) {
                    match offset & !7 {
                        reg::QUEUE_DESC => q.queue.set_desc_table_address(low, high),
                        reg::QUEUE_AVAIL => q.queue.set_avail_ring_address(low, high),
                        _ => q.queue.set_used_ring_address(low, high),
                    }
                }
            }
            reg::INJECT_DELAY_US => self.delay = Duration::from_micros(u64::from(value)),
            reg::QUEUE_NOTIFY if value == NOTIFY_ALL || (value as usize) < self.queues.len() => {
                if value == NOTIFY_ALL {
                    self.notified
                        .extend(0..u32::try_from(self.queues.len()).unwrap_or(0));
                } else {
                    self.notified.insert(value);
                }
                // A failed write means the counter is saturated: the backend is already
                // due to run.
                let _ = self.kick.write(1);
            }
            _ => {}
        }
    }

    /// `QUEUE_READY` of the selected queue. Becoming ready starts the queue from the
    /// ring state the driver provides (next available = next used = the used ring's
    /// index, as the queue device's `START`), so a re-initialised queue runs its first
    /// new item; a queue that is not valid is refused (`STATUS.QUEUE_ERROR`). Becoming
    /// not ready stops it: work taken and not completed is dropped, and the device no
    /// longer touches its rings.
    fn set_ready(&mut self, ready: bool) {
        let index = self.select;
        let mem = self.mem.memory();
        let Some(q) = self.selected() else {
            return;
        };
        if !ready {
            q.queue.set_ready(false);
            self.deferred.drop_queue(index);
            return;
        }
        if q.queue.ready() {
            return;
        }
        // The queue's checks apply to a queue marked ready.
        q.queue.set_ready(true);
        // An available ring at 0 would never yield work (the queue reads it as unset).
        let valid = q.queue.is_valid(&*mem) && q.queue.avail_ring() != 0;
        let used = valid
            .then(|| q.queue.used_ring())
            .and_then(|at| mem.read_obj::<u16>(GuestAddress(at.checked_add(2)?)).ok());
        match used {
            Some(used) => {
                q.queue.set_next_avail(used);
                q.queue.set_next_used(used);
            }
            None => {
                q.queue.set_ready(false);
                self.status |= STATUS_QUEUE_ERROR;
            }
        }
    }

    /// `RESET`: every queue stopped with its registers at their defaults, work in
    /// flight dropped, every slot cleared and masked, status and selections cleared.
    /// The completion and fault counters keep counting; nothing is signalled.
    fn reset(&mut self) {
        for q in &mut self.queues {
            q.queue.reset();
            q.slot = 0;
        }
        self.deferred.clear();
        self.notified.clear();
        self.slots.fill(Slot {
            message: [0; 3],
            control: SLOT_MASK,
        });
        self.select = 0;
        self.status = 0;
        self.error_slot = 0;
        self.delay = Duration::ZERO;
    }

    /// Takes every available work item off the notified queues and completes those that
    /// are due (all of them, unless a completion delay is injected): each is returned on
    /// the used ring and raises its queue's slot. Returns the completions made.
    pub fn process(&mut self, now: Instant) -> u64 {
        let notified = std::mem::take(&mut self.notified);
        let mem = self.mem.memory();
        for index in notified {
            let Some(q) = self.queues.get_mut(index as usize) else {
                continue;
            };
            if !q.queue.ready() {
                continue;
            }
            // At most a queue's worth in flight: bounded work per notification.
            for _ in 0..super::room(&q.queue) {
                let Some(chain) = q.queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                self.deferred
                    .push(index, chain.head_index(), self.delay, now);
            }
        }
        let mut done = 0;
        while let Some((index, head)) = self.deferred.pop_due(now) {
            if self.complete(index, head) {
                done += 1;
            }
        }
        done
    }

    fn complete(&mut self, index: u32, head: u16) -> bool {
        let Some(q) = self.queues.get_mut(index as usize) else {
            return false;
        };
        if q.queue.add_used(&*self.mem.memory(), head, 0).is_err() {
            self.status |= STATUS_QUEUE_ERROR;
            return false;
        }
        let slot = q.slot as usize;
        self.completions += 1;
        self.raise(slot);
        true
    }
}

/// A slot-array device whose slots can be raised from outside (a test harness or a
/// benchmark), whatever memory it was made over.
pub trait RaiseSlot: Send + Sync + std::fmt::Debug {
    /// Raises slot `slot` ([`ImsSlots::raise`]).
    fn raise_slot(&self, slot: usize);
}

impl<M: AddressSpace> RaiseSlot for std::sync::Mutex<ImsSlots<M>> {
    fn raise_slot(&self, slot: usize) {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .raise(slot);
    }
}

impl<M: AddressSpace> super::ImsEngine for ImsSlots<M> {
    fn kick_fd(&self) -> std::io::Result<EventFd> {
        self.kick.try_clone()
    }

    fn run(&mut self, now: Instant) -> Option<Instant> {
        self.process(now);
        self.deferred.next()
    }
}

impl<M: AddressSpace> PciFunction for ImsSlots<M> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigChange {
        self.config.write(offset, data)
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        let value = if data.len() == 4 && offset % 4 == 0 {
            self.register_read(offset)
        } else {
            u32::MAX
        };
        crate::bus::put_le_u32(data, value);
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        if data.len() == 4 && offset % 4 == 0 {
            self.register_write(offset, u32_of(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use irq::control::InterruptControl;
    use irq::fake::FakeCore;
    use irq::fake::FakeRouting;
    use irq::msi::Target;
    use irq::remap::FaultReason;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    const DEV: u16 = 0x0018;

    struct Rig {
        dev: ImsSlots,
        backing: FakeCore,
        kvm: Arc<FakeRouting>,
        mem: GuestMemoryMmap,
    }

    fn rig() -> Rig {
        let (backing, kvm, mem) = super::super::testing::core(DEV, &[(7, 1, 0x40)]);
        let dev = ImsSlots::new(
            64,
            4,
            DEV,
            backing.path(),
            GuestMemoryAtomic::new(mem.clone()),
        )
        .unwrap();
        Rig {
            dev,
            backing,
            kvm,
            mem,
        }
    }

    use super::super::testing::{r, w};

    fn program_slot(dev: &mut ImsSlots, slot: u64, msg: MsiMessage, masked: bool) {
        let at = reg::SLOT_BASE + reg::SLOT_SIZE * slot;
        w(dev, at, msg.address_lo());
        w(dev, at + 4, msg.address_hi());
        w(dev, at + 8, msg.data);
        w(dev, at + 12, u32::from(masked));
    }

    /// Queue `q` on `mock`'s rings, bound to slot 5 (entry 7's message, unmasked), ready.
    fn bind_queue(dev: &mut ImsSlots, q: u32, mock: &MockSplitQueue<'_, GuestMemoryMmap>) {
        program_slot(dev, 5, MsiMessage::remappable(7, None), false);
        w(dev, reg::QUEUE_SELECT, q);
        w(dev, reg::QUEUE_SIZE, 16);
        w(dev, reg::QUEUE_SLOT, 5);
        let address = |a: vm_memory::GuestAddress| u32::try_from(a.0).unwrap();
        w(dev, reg::QUEUE_DESC, address(mock.desc_table_addr()));
        w(dev, reg::QUEUE_AVAIL, address(mock.avail_addr()));
        w(dev, reg::QUEUE_USED, address(mock.used_addr()));
        w(dev, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identity_and_slot_format_checks() {
        let mut rig = rig();
        let dev = &mut rig.dev;
        assert_eq!(r(dev, reg::ID), u32::from_le_bytes(*b"IMS1"));
        assert_eq!((r(dev, reg::SLOTS), r(dev, reg::QUEUES)), (64, 4));
        program_slot(dev, 3, MsiMessage::remappable(7, None), true);
        assert_eq!(
            r(dev, reg::SLOT_BASE + 48),
            MsiMessage::remappable(7, None).address_lo()
        );
        let compat = MsiMessage::compatibility(0, 0x30).unwrap();
        w(dev, reg::SLOT_BASE + 48, compat.address_lo());
        assert_eq!(r(dev, reg::STATUS), STATUS_FORMAT_ERROR);
        assert_eq!(r(dev, reg::ERROR_SLOT), 3);
        assert_eq!(
            r(dev, reg::SLOT_BASE + 48),
            MsiMessage::remappable(7, None).address_lo(),
            "kept"
        );
        w(dev, reg::STATUS, STATUS_FORMAT_ERROR);
        assert_eq!(r(dev, reg::STATUS), 0);
    }

    #[test]
    fn a_masked_slot_latches_and_fires_on_unmask() {
        let mut rig = rig();
        program_slot(&mut rig.dev, 3, MsiMessage::remappable(7, None), true);
        rig.dev.raise(3);
        assert_eq!(
            r(&mut rig.dev, reg::SLOT_BASE + 48 + 12),
            SLOT_MASK | SLOT_PENDING
        );
        let path = rig.backing.path();
        assert_eq!(path.delivered(7), 0);
        w(&mut rig.dev, reg::SLOT_BASE + 48 + 12, 0);
        assert_eq!(path.delivered(7), 1);
        assert_eq!(r(&mut rig.dev, reg::SLOT_BASE + 48 + 12), 0);
        assert_eq!(
            rig.kvm.fire(path.line_fd(7).unwrap()),
            Some(Target::fixed(1, 0x40))
        );
    }

    #[test]
    fn another_devices_entry_is_a_fault_not_a_delivery() {
        let rig = rig();
        let mut other = ImsSlots::new(
            4,
            1,
            0x0020,
            rig.backing.path(),
            GuestMemoryAtomic::new(rig.mem.clone()),
        )
        .unwrap();
        program_slot(&mut other, 0, MsiMessage::remappable(7, None), false);
        other.raise(0);
        assert_eq!(other.faults(), 1);
        assert_eq!(rig.backing.path().delivered(7), 0);
        assert_eq!(
            rig.backing
                .path()
                .fault_log()
                .count(FaultReason::SourceIdMismatch),
            1
        );
    }

    #[test]
    fn work_on_a_queue_completes_and_raises_its_slot() {
        let mut rig = rig();
        let mock = MockSplitQueue::new(&rig.mem, 16);
        mock.build_desc_chain(&[virtio_queue::desc::RawDescriptor::from(
            virtio_queue::desc::split::Descriptor::new(0x8_0000, 64, 0, 0),
        )])
        .unwrap();
        let dev = &mut rig.dev;
        bind_queue(dev, 2, &mock);
        assert_eq!(r(dev, reg::QUEUE_READY), 1);
        w(dev, reg::QUEUE_NOTIFY, 2);
        assert_eq!(dev.process(Instant::now()), 1);
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(r(dev, reg::COMPLETIONS), 1);
        assert_eq!(rig.backing.path().delivered(7), 1);
        // Odd accesses do nothing.
        w(dev, reg::QUEUE_NOTIFY, 99);
        w(dev, reg::QUEUE_SELECT, 99);
        w(dev, reg::QUEUE_READY, 1);
        dev.bar_write(0, 1, &[1, 2]);
        assert_eq!(dev.process(Instant::now()), 0);
    }

    /// Three items with paced completions; the device is snapshotted after the first
    /// completed, restored as a new device, and the new one completes the other two, once.
    #[test]
    fn a_restored_device_completes_exactly_what_was_owed() {
        let mut rig = rig();
        let mock = MockSplitQueue::new(&rig.mem, 16);
        for k in 0..3u16 {
            mock.add_desc_chains(
                &[virtio_queue::desc::RawDescriptor::from(
                    virtio_queue::desc::split::Descriptor::new(
                        0x8_0000 + 64 * u64::from(k),
                        64,
                        0,
                        0,
                    ),
                )],
                k,
            )
            .unwrap();
        }
        let dev = &mut rig.dev;
        bind_queue(dev, 1, &mock);
        w(dev, reg::INJECT_DELAY_US, 1000);
        w(dev, reg::QUEUE_NOTIFY, 1);
        let t0 = Instant::now();
        assert_eq!(dev.process(t0), 0, "the first is due a delay later");
        assert_eq!(dev.process(t0 + Duration::from_micros(1000)), 1);
        let snap = dev.snapshot(t0 + Duration::from_micros(1000));
        assert_eq!(snap.deferred.len(), 2);
        assert_eq!(snap.completions, 1);

        let path = rig.backing.path();
        let now = Instant::now();
        let mut new = ImsSlots::restore(
            DEV,
            path.clone(),
            GuestMemoryAtomic::new(rig.mem.clone()),
            &snap,
            now,
        )
        .unwrap();
        assert_eq!(
            new.snapshot(now),
            snap,
            "the restored device is the same device"
        );
        assert_eq!(new.process(now + Duration::from_secs(1)), 2);
        assert_eq!(
            mock.used().idx().load(),
            3,
            "each item completed once in all"
        );
        assert_eq!((new.completions(), path.delivered(7)), (3, 3));
        assert_eq!(
            new.process(now + Duration::from_secs(2)),
            0,
            "nothing twice"
        );

        let tampered: [fn(&mut SlotsSnapshot); 6] = [
            |s| s.config.pop().map_or((), drop),
            |s| s.slots.clear(),
            |s| s.queues[0].1 = 64,
            |s| s.queues[1].0.size = 3,
            |s| s.notified.push(4),
            |s| s.deferred.push((9, 0, 0)),
        ];
        for edit in tampered {
            let mut bad = snap.clone();
            edit(&mut bad);
            ImsSlots::restore(
                DEV,
                path.clone(),
                GuestMemoryAtomic::new(rig.mem.clone()),
                &bad,
                now,
            )
            .unwrap_err();
        }
    }

    fn item(mock: &MockSplitQueue<'_, GuestMemoryMmap>, k: u16) {
        mock.add_desc_chains(
            &[virtio_queue::desc::RawDescriptor::from(
                virtio_queue::desc::split::Descriptor::new(0x8_0000 + 64 * u64::from(k), 64, 0, 0),
            )],
            k,
        )
        .unwrap();
    }

    /// The driver stops a queue, zeroes its rings, programs it again and makes it ready:
    /// its first new item completes (the device starts from the rings' state).
    #[test]
    fn a_reinitialised_queue_completes_its_first_new_item() {
        let mut rig = rig();
        let mock = MockSplitQueue::new(&rig.mem, 16);
        item(&mock, 0);
        bind_queue(&mut rig.dev, 0, &mock);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 0);
        assert_eq!(rig.dev.process(Instant::now()), 1);
        assert_eq!(mock.used().idx().load(), 1);

        w(&mut rig.dev, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut rig.dev, reg::QUEUE_READY), 0);
        // Zeroed rings, the same layout programmed again.
        let zeroes = vec![0u8; 0x1000];
        rig.mem
            .write_slice(&zeroes, mock.desc_table_addr())
            .unwrap();
        let mock = MockSplitQueue::new(&rig.mem, 16);
        bind_queue(&mut rig.dev, 0, &mock);
        assert_eq!(r(&mut rig.dev, reg::QUEUE_READY), 1);
        item(&mock, 0);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 0);
        assert_eq!(rig.dev.process(Instant::now()), 1, "the first new item");
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(r(&mut rig.dev, reg::COMPLETIONS), 2);
    }

    /// Stopping a queue drops what it took and has not completed; a running queue's
    /// layout cannot be changed; RESET clears queues and slots but not the counters.
    #[test]
    fn stop_and_reset_leave_nothing_running() {
        let mut rig = rig();
        let mock = MockSplitQueue::new(&rig.mem, 16);
        item(&mock, 0);
        item(&mock, 1);
        bind_queue(&mut rig.dev, 1, &mock);
        w(&mut rig.dev, reg::INJECT_DELAY_US, 1000);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 1);
        let t0 = Instant::now();
        assert_eq!(rig.dev.process(t0), 0);
        w(&mut rig.dev, reg::QUEUE_SIZE, 8);
        assert_eq!(r(&mut rig.dev, reg::QUEUE_SIZE), 16, "ignored while ready");
        w(&mut rig.dev, reg::QUEUE_READY, 0);
        assert_eq!(rig.dev.process(t0 + Duration::from_secs(1)), 0);
        assert_eq!(mock.used().idx().load(), 0, "the rings are left alone");

        bind_queue(&mut rig.dev, 1, &mock);
        w(&mut rig.dev, reg::INJECT_DELAY_US, 0);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 1);
        assert_eq!(rig.dev.process(t0), 2, "started again from used.idx 0");
        w(&mut rig.dev, reg::STATUS, 0);
        w(&mut rig.dev, reg::RESET, 1);
        assert_eq!(r(&mut rig.dev, reg::QUEUE_SELECT), 0);
        w(&mut rig.dev, reg::QUEUE_SELECT, 1);
        assert_eq!(
            (
                r(&mut rig.dev, reg::QUEUE_READY),
                r(&mut rig.dev, reg::QUEUE_SIZE)
            ),
            (0, u32::from(MAX_QUEUE_SIZE))
        );
        assert_eq!(r(&mut rig.dev, reg::SLOT_BASE + 5 * 16), 0);
        assert_eq!(r(&mut rig.dev, reg::SLOT_BASE + 5 * 16 + 12), SLOT_MASK);
        assert_eq!(r(&mut rig.dev, reg::COMPLETIONS), 2, "counters go on");
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 1);
        assert_eq!(rig.dev.process(t0), 0);
    }

    /// An avail index far ahead of the device is refused by the queue; one a queue
    /// ahead yields one queue's worth, and no more until those complete.
    #[test]
    fn a_notification_does_at_most_a_queue_of_work() {
        let mut rig = rig();
        let mock = MockSplitQueue::new(&rig.mem, 16);
        bind_queue(&mut rig.dev, 0, &mock);
        mock.avail().idx().store(u16::MAX);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 0);
        assert_eq!(rig.dev.process(Instant::now()), 0);
        mock.avail().idx().store(16);
        w(&mut rig.dev, reg::INJECT_DELAY_US, 1000);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 0);
        let t0 = Instant::now();
        rig.dev.process(t0);
        // The driver moves the index on again: nothing more is taken while 16 are in
        // flight.
        mock.avail().idx().store(32);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 0);
        rig.dev.process(t0);
        assert_eq!(rig.dev.deferred.len(), 16);
        assert_eq!(rig.dev.process(t0 + Duration::from_secs(1)), 16);
    }
}
