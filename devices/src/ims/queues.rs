//! The queue-memory IMS device.
//!
//! Each work queue has a *context* in guest RAM holding the queue's interrupt message and
//! its virtio split-ring addresses. The guest starts and stops queues with commands on an
//! admin ring, also in guest RAM; `START` reads the context and caches its message (the
//! message is composed once and never written to the device again: retargets happen at
//! the IRTE) and resumes the queue at its used ring's index, `STOP` drains the queue (every outstanding item completed and signalled)
//! before it completes. Masking is lazy: the device reads the context's mask bit when it
//! is about to signal, latches the interrupt as pending if masked, and delivers it when
//! the guest notifies the queue after unmasking. A command not completed within the
//! command timeout resets the device: every queue stops, in-flight work is dropped, the
//! admin ring is disabled, `STATUS.RESET` is set and MSI-X vector 0 fires.
//!
//! BAR 0 (8 KiB):
//!
//! ```text
//! 0x000 ID "IMSQ" (RO)        0x004 VERSION 1 (RO)     0x008 CONTEXTS (RO)
//! 0x00c STATUS (W1C): bit 0 the device reset itself, bit 1 the admin ring was refused
//! 0x010 ADMIN_BASE lo/hi      0x018 ADMIN_SIZE (entries, power of two, 1-256)
//! 0x01c ADMIN_TAIL (doorbell) 0x020 ADMIN_HEAD (RO)    0x024 ADMIN_ENABLE
//! 0x028 RESETS (RO)           0x02c RESET (WO: 1 resets the device, no notification)
//! 0x030 COMMAND_TIMEOUT_MS    0x034 COMPLETIONS (RO)   0x038 QUEUE_NOTIFY (WO)
//! 0x03c FAULTS (RO: interrupts the remapping core refused)
//! 0x040 INJECT_DELAY_US       0x044 INJECT_DROP        0x048 INJECT_STALL
//! 0x04c INJECT_RESET (WO)
//! 0x1000 MSI-X table (1 vector: admin completions and resets)    0x1800 MSI-X PBA
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use irq::MessageSink;
use irq::MsiMessage;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::memory::{AddressSpace, DefaultMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::config::{Bar, ConfigChange, ConfigSpace};
use crate::pci::msix::{self, Msix};
use crate::pci::PciFunction;

pub use hypercall::ims::queues::*;
pub use snapshot::QueuesSnapshot;

mod snapshot;

/// Command timeout when the guest has not set one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);
const ID_VALUE: u32 = ID;

#[derive(Debug)]
struct Running {
    queue: Queue,
    address: u64,
    message: MsiMessage,
    pending: bool,
}

/// An admin command that has not completed.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    entry: u64,
    /// The context a `STOP` drains; `None` for an injected stall.
    draining: Option<u32>,
    deadline: Instant,
}

/// Counters of a queue-memory device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Work items completed.
    pub completions: u64,
    /// Completions whose interrupt was dropped on purpose.
    pub dropped: u64,
    /// Interrupts refused by the remapping core.
    pub faults: u64,
    /// Admin commands completed.
    pub commands: u64,
    /// Device resets.
    pub resets: u64,
}

/// The queue-memory IMS device.
/// The queue-memory device, over guest memory `M`.
pub struct ImsQueues<M: AddressSpace = DefaultMemory> {
    config: ConfigSpace,
    msix_cap: usize,
    msix: Msix,
    contexts: Vec<Option<Running>>,
    admin_base: u64,
    admin_size: u32,
    admin_head: u32,
    admin_tail: u32,
    admin_enabled: bool,
    waiting: Option<Waiting>,
    status: u32,
    timeout: Duration,
    delay: Duration,
    drop: u32,
    stall: u32,
    reset_due: bool,
    stats: QueueStats,
    deferred: super::Deferred,
    notified: BTreeSet<u32>,
    requester: u16,
    path: Arc<dyn MessageSink>,
    mem: M,
    kick: EventFd,
}

impl<M: AddressSpace> std::fmt::Debug for ImsQueues<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImsQueues")
            .field("contexts", &self.contexts.len())
            .field("requester", &self.requester)
            .field("status", &self.status)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<M: AddressSpace> ImsQueues<M> {
    /// A device with `contexts` queue contexts (1 to [`MAX_CONTEXTS`]) raising interrupts
    /// through `path` as `requester`.
    ///
    /// # Errors
    /// The error of creating the notification eventfd.
    pub fn new(
        contexts: u32,
        requester: u16,
        path: Arc<dyn MessageSink>,
        mem: M,
    ) -> std::io::Result<Self> {
        let contexts = contexts.clamp(1, MAX_CONTEXTS);
        let mut config = ConfigSpace::new(VENDOR_ID, DEVICE_ID, [0x08, 0x80, 0x00], 1);
        config.add_bar(Bar {
            index: 0,
            size: reg::BAR_SIZE,
        });
        let msix = Msix::new(1);
        let table = u32::try_from(reg::MSIX_TABLE).unwrap_or(0);
        let pba = u32::try_from(reg::MSIX_PBA).unwrap_or(0);
        let (body, writable) = msix.capability(0, table, pba);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &writable);
        Ok(Self {
            config,
            msix_cap,
            msix,
            contexts: (0..contexts).map(|_| None).collect(),
            admin_base: 0,
            admin_size: 0,
            admin_head: 0,
            admin_tail: 0,
            admin_enabled: false,
            waiting: None,
            status: 0,
            timeout: DEFAULT_TIMEOUT,
            delay: Duration::ZERO,
            drop: 0,
            stall: 0,
            reset_due: false,
            stats: QueueStats::default(),
            deferred: super::Deferred::default(),
            notified: BTreeSet::new(),
            requester,
            path,
            mem,
            kick: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets the command timeout (the guest may change it).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Queue contexts.
    #[must_use]
    pub fn context_count(&self) -> u32 {
        u32::try_from(self.contexts.len()).unwrap_or(u32::MAX)
    }

    /// Contexts the driver has started (in use).
    #[must_use]
    pub fn contexts_in_use(&self) -> u32 {
        let n = self.contexts.iter().filter(|c| c.is_some()).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The device's counters.
    #[must_use]
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    fn wake(&self) {
        // A failed write means the counter is saturated: the backend is already due.
        let _ = self.kick.write(1);
    }

    fn signal(&mut self, msg: &MsiMessage) {
        if self.path.signal_msi(msg, self.requester).is_err() {
            self.stats.faults += 1;
        }
    }

    /// MSI-X vector 0: admin completions and resets.
    fn notify_admin(&mut self) {
        if let Some(msg) = self.msix.trigger(0) {
            self.signal(&msg);
        }
    }

    fn fire_msix(&mut self, vectors: &[u16]) {
        for v in vectors {
            if let Some(msg) = self.msix.message(*v) {
                self.signal(&msg);
            }
        }
    }

    fn read_u32(&self, at: u64) -> Option<u32> {
        self.mem.memory().read_obj(GuestAddress(at)).ok()
    }

    fn read_u64(&self, at: u64) -> Option<u64> {
        self.mem.memory().read_obj(GuestAddress(at)).ok()
    }

    /// Stops everything, as after a timeout: the guest sees `STATUS.RESET` and, if
    /// `notify`, an admin interrupt.
    fn reset(&mut self, notify: bool) {
        self.contexts.iter_mut().for_each(|c| *c = None);
        self.deferred.clear();
        self.notified.clear();
        self.waiting = None;
        self.admin_enabled = false;
        self.admin_head = 0;
        self.admin_tail = 0;
        self.drop = 0;
        self.stall = 0;
        self.delay = Duration::ZERO;
        self.stats.resets += 1;
        tracing::info!(
            target: "irvm::ims",
            kind = "reset",
            device = %format_args!("{:#06x}", self.requester),
            by_device = notify,
        );
        if notify {
            // The device reset itself (a command timed out, or the reset was injected);
            // a driver's own RESET write is routine.
            irq::warn_limited!(
                "ims-queues {:04x}: the device reset itself; STATUS.RESET tells the driver",
                self.requester
            );
            self.status |= STATUS_RESET;
            self.notify_admin();
        }
    }

    /// Signals context `id`'s interrupt, unless its (lazily read) mask is set.
    fn raise(&mut self, id: u32) {
        let Some(Some(ctx)) = self.contexts.get(id as usize) else {
            return;
        };
        let (address, message) = (ctx.address, ctx.message);
        let masked = self
            .read_u32(address + context::CONTROL)
            .is_none_or(|c| c & context::MASK != 0);
        if masked {
            if let Some(Some(ctx)) = self.contexts.get_mut(id as usize) {
                ctx.pending = true;
            }
            let _ = self
                .mem
                .memory()
                .write_obj(1u32, GuestAddress(address + context::PENDING));
            return;
        }
        self.signal(&message);
    }

    /// A notified context: deliver a pending interrupt the guest has unmasked since, and
    /// take its new work.
    fn take_work(&mut self, id: u32, now: Instant) {
        let mem = self.mem.memory();
        let Some(Some(ctx)) = self.contexts.get_mut(id as usize) else {
            return;
        };
        let unmasked = mem
            .read_obj::<u32>(GuestAddress(ctx.address + context::CONTROL))
            .is_ok_and(|c| c & context::MASK == 0);
        let fire = (ctx.pending && unmasked).then_some(ctx.message);
        if fire.is_some() {
            ctx.pending = false;
            let _ = mem.write_obj(0u32, GuestAddress(ctx.address + context::PENDING));
        }
        // At most a queue's worth of items taken and not completed: a driver that
        // writes an avail index far ahead, or keeps moving it, cannot make one
        // notification do unbounded work.
        for _ in 0..super::room(&ctx.queue) {
            let Some(chain) = ctx.queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            self.deferred.push(id, chain.head_index(), self.delay, now);
        }
        if let Some(msg) = fire {
            self.signal(&msg);
        }
    }

    fn complete(&mut self, id: u32, head: u16) {
        let Some(Some(ctx)) = self.contexts.get_mut(id as usize) else {
            return;
        };
        if ctx.queue.add_used(&*self.mem.memory(), head, 0).is_err() {
            return;
        }
        self.stats.completions += 1;
        if self.drop > 0 {
            self.drop -= 1;
            self.stats.dropped += 1;
            return;
        }
        self.raise(id);
    }

    /// Reads and checks a context for `START`.
    fn load_context(&self, address: u64) -> Result<Running, u32> {
        let bad = command::BAD_CONTEXT;
        // Aligned and wholly in RAM: every field address below is then in RAM too.
        let whole = self.mem.memory().check_range(
            GuestAddress(address),
            usize::try_from(context::SIZE).unwrap_or(usize::MAX),
            vm_memory::Permissions::ReadWrite,
        );
        if address % context::SIZE != 0 || !whole {
            return Err(bad);
        }
        let word = |off| self.read_u32(address + off).ok_or(bad);
        let quad = |off| self.read_u64(address + off).ok_or(bad);
        let message = MsiMessage {
            address: u64::from(word(context::ADDRESS_LO)?)
                | (u64::from(word(context::ADDRESS_HI)?) << 32),
            data: word(context::DATA)?,
        };
        if !message.is_remappable() {
            return Err(bad);
        }
        let size = u16::try_from(word(context::QUEUE_SIZE)? & 0xffff).map_err(|_| bad)?;
        let (desc, avail, used) = (
            quad(context::DESC)?,
            quad(context::AVAIL)?,
            quad(context::USED)?,
        );
        // The queue's setters would keep their defaults for a bad size or a misaligned
        // ring: refuse those instead of running on something the driver did not say.
        // An available ring at 0 would never yield work (the queue reads it as unset).
        if avail == 0 {
            return Err(bad);
        }
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| bad)?;
        queue.try_set_size(size).map_err(|_| bad)?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .map_err(|_| bad)?;
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .map_err(|_| bad)?;
        queue
            .try_set_used_ring_address(GuestAddress(used))
            .map_err(|_| bad)?;
        queue.set_ready(true);
        if !queue.is_valid(&*self.mem.memory()) {
            return Err(bad);
        }
        // The device picks up where the used ring stands: work made available while the
        // queue was stopped runs now, completed work does not run again.
        let used: u16 = self
            .mem
            .memory()
            .read_obj(GuestAddress(used.checked_add(2).ok_or(bad)?))
            .map_err(|_| bad)?;
        queue.set_next_avail(used);
        queue.set_next_used(used);
        Ok(Running {
            queue,
            address,
            message,
            pending: false,
        })
    }

    fn finish_command(&mut self, entry: u64, status: u32) {
        let _ = self
            .mem
            .memory()
            .write_obj(status, GuestAddress(entry + command::STATUS));
        self.admin_head = self.admin_head.wrapping_add(1);
        self.stats.commands += 1;
        self.notify_admin();
    }

    /// Runs admin commands until the ring is empty or one has to wait.
    fn run_admin(&mut self, now: Instant) {
        while self.admin_enabled && self.waiting.is_none() && self.admin_head != self.admin_tail {
            let slot = u64::from(self.admin_head % self.admin_size);
            let entry = self.admin_base + slot * command::SIZE;
            if self.stall > 0 {
                self.stall -= 1;
                self.waiting = Some(Waiting {
                    entry,
                    draining: None,
                    deadline: now + self.timeout,
                });
                return;
            }
            let (Some(opcode), Some(id)) = (
                self.read_u32(entry + command::OPCODE),
                self.read_u32(entry + command::CONTEXT),
            ) else {
                // The ring left RAM: refuse it, as for a bad address at enable.
                self.status |= STATUS_ADMIN_ERROR;
                self.admin_enabled = false;
                return;
            };
            let status = match (opcode, self.contexts.get(id as usize)) {
                (command::START | command::STOP, None) => command::BAD_INDEX,
                (command::START, Some(Some(_))) | (command::STOP, Some(None)) => command::BAD_STATE,
                (command::START, Some(None)) => {
                    let address = self.read_u64(entry + command::ADDRESS).unwrap_or(1);
                    match self.load_context(address) {
                        Ok(ctx) => {
                            if let Some(slot) = self.contexts.get_mut(id as usize) {
                                *slot = Some(ctx);
                            }
                            // Work made available while the queue was stopped runs now.
                            self.take_work(id, now);
                            command::OK
                        }
                        Err(e) => e,
                    }
                }
                (command::STOP, Some(Some(_))) => {
                    // Drain: whatever the guest made available is completed first.
                    self.take_work(id, now);
                    if self.deferred.holds(id) {
                        self.waiting = Some(Waiting {
                            entry,
                            draining: Some(id),
                            deadline: now + self.timeout,
                        });
                        return;
                    }
                    if let Some(slot) = self.contexts.get_mut(id as usize) {
                        *slot = None;
                    }
                    command::OK
                }
                _ => command::BAD_OPCODE,
            };
            tracing::info!(
                target: "irvm::ims",
                kind = "command",
                device = %format_args!("{:#06x}", self.requester),
                opcode,
                context = id,
                status,
            );
            self.finish_command(entry, status);
        }
    }

    /// Does what is due at `now`: a forced reset, notified queues, admin commands,
    /// completions, drained stops and command deadlines. Returns when it next has
    /// something to do.
    pub fn process(&mut self, now: Instant) -> Option<Instant> {
        if std::mem::take(&mut self.reset_due) {
            self.reset(true);
        }
        for id in std::mem::take(&mut self.notified) {
            self.take_work(id, now);
        }
        loop {
            self.run_admin(now);
            while let Some((id, head)) = self.deferred.pop_due(now) {
                self.complete(id, head);
            }
            let Some(w) = self.waiting else { break };
            if now >= w.deadline {
                self.reset(true);
                break;
            }
            match w.draining {
                Some(id) if !self.deferred.holds(id) => {
                    self.waiting = None;
                    if let Some(c) = self.contexts.get_mut(id as usize) {
                        *c = None;
                    }
                    self.finish_command(w.entry, command::OK);
                }
                _ => break,
            }
        }
        let next_item = self.deferred.next();
        let deadline = self.waiting.map(|w| w.deadline);
        match (next_item, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn register_read(&self, offset: u64) -> u32 {
        let low = |v: u64| (v & 0xffff_ffff) as u32;
        match offset {
            reg::ID => ID_VALUE,
            reg::VERSION => 1,
            reg::CONTEXTS => u32::try_from(self.contexts.len()).unwrap_or(u32::MAX),
            reg::STATUS => self.status,
            reg::ADMIN_BASE => low(self.admin_base),
            0x014 => (self.admin_base >> 32) as u32,
            reg::ADMIN_SIZE => self.admin_size,
            reg::ADMIN_TAIL => self.admin_tail,
            reg::ADMIN_HEAD => self.admin_head,
            reg::ADMIN_ENABLE => u32::from(self.admin_enabled),
            reg::RESETS => low(self.stats.resets),
            reg::COMMAND_TIMEOUT_MS => u32::try_from(self.timeout.as_millis()).unwrap_or(0),
            reg::COMPLETIONS => low(self.stats.completions),
            reg::FAULTS => low(self.stats.faults),
            reg::INJECT_DELAY_US => u32::try_from(self.delay.as_micros()).unwrap_or(u32::MAX),
            reg::INJECT_DROP => self.drop,
            reg::INJECT_STALL => self.stall,
            _ => 0,
        }
    }

    fn register_write(&mut self, offset: u64, value: u32) {
        match offset {
            reg::STATUS => self.status &= !value,
            reg::ADMIN_BASE if !self.admin_enabled => {
                self.admin_base = (self.admin_base & !0xffff_ffff) | u64::from(value);
            }
            0x014 if !self.admin_enabled => {
                self.admin_base = (self.admin_base & 0xffff_ffff) | (u64::from(value) << 32);
            }
            reg::ADMIN_SIZE if !self.admin_enabled => self.admin_size = value,
            // A tail more than a ring ahead of the head names commands that are not
            // there: the ring is refused, as a ring outside RAM is at enable. Writes
            // while the ring is disabled are ignored (enabling starts at 0).
            reg::ADMIN_TAIL if self.admin_enabled => {
                if value.wrapping_sub(self.admin_head) > self.admin_size {
                    self.status |= STATUS_ADMIN_ERROR;
                    self.admin_enabled = false;
                } else {
                    self.admin_tail = value;
                    self.wake();
                }
            }
            reg::ADMIN_ENABLE => {
                if value & 1 == 0 {
                    self.admin_enabled = false;
                    return;
                }
                if self.admin_enabled {
                    // Already running: enabling again changes nothing (a command that
                    // is waiting keeps its place).
                    return;
                }
                let size_ok =
                    self.admin_size.is_power_of_two() && self.admin_size <= MAX_ADMIN_SIZE;
                let bytes = u64::from(self.admin_size) * command::SIZE;
                let fits = size_ok
                    && self.admin_base % command::SIZE == 0
                    && self.mem.memory().check_range(
                        GuestAddress(self.admin_base),
                        usize::try_from(bytes).unwrap_or(usize::MAX),
                        vm_memory::Permissions::ReadWrite,
                    );
                if fits {
                    self.admin_head = 0;
                    self.admin_tail = 0;
                    self.admin_enabled = true;
                } else {
                    self.status |= STATUS_ADMIN_ERROR;
                }
            }
            reg::RESET if value & 1 != 0 => self.reset(false),
            reg::COMMAND_TIMEOUT_MS if value > 0 => {
                self.timeout = Duration::from_millis(u64::from(value));
            }
            reg::QUEUE_NOTIFY if (value as usize) < self.contexts.len() => {
                self.notified.insert(value);
                self.wake();
            }
            reg::INJECT_DELAY_US => self.delay = Duration::from_micros(u64::from(value)),
            reg::INJECT_DROP => self.drop = value,
            reg::INJECT_STALL => self.stall = value,
            reg::INJECT_RESET if value & 1 != 0 => {
                self.reset_due = true;
                self.wake();
            }
            _ => {}
        }
    }
}

impl<M: AddressSpace> super::ImsEngine for ImsQueues<M> {
    fn kick_fd(&self) -> std::io::Result<EventFd> {
        self.kick.try_clone()
    }

    fn run(&mut self, now: Instant) -> Option<Instant> {
        self.process(now)
    }
}

impl<M: AddressSpace> PciFunction for ImsQueues<M> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigChange {
        let change = self.config.write(offset, data);
        let control = self.config.u16_at(self.msix_cap + 2);
        let fire = self.msix.set_control(control);
        self.fire_msix(&fire);
        change
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        if (reg::MSIX_TABLE..reg::MSIX_PBA).contains(&offset) {
            self.msix.table_read(offset - reg::MSIX_TABLE, data);
        } else if (reg::MSIX_PBA..reg::BAR_SIZE).contains(&offset) {
            self.msix.pba_read(offset - reg::MSIX_PBA, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            crate::bus::put_le_u32(data, self.register_read(offset));
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        if (reg::MSIX_TABLE..reg::MSIX_PBA).contains(&offset) {
            let fire = self.msix.table_write(offset - reg::MSIX_TABLE, data);
            self.fire_msix(&fire);
        } else if data.len() == 4 && offset % 4 == 0 && offset < reg::MSIX_TABLE {
            self.register_write(offset, crate::bus::le_u32(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use irq::control::InterruptControl;
    use irq::fake::FakeCore;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    const DEV: u16 = 0x0020;
    const ADMIN: u64 = 0x4_0000;
    const CTX: u64 = 0x5_0000;

    struct Rig {
        dev: ImsQueues,
        backing: FakeCore,
        mem: GuestMemoryMmap,
    }

    fn rig() -> Rig {
        let (backing, _, mem) = super::super::testing::core(DEV, &[(3, 0, 0x41), (4, 0, 0x42)]);
        let dev =
            ImsQueues::new(8, DEV, backing.path(), GuestMemoryAtomic::new(mem.clone())).unwrap();
        Rig { dev, backing, mem }
    }

    use super::super::testing::{r, w};

    /// Admin ring of 4, MSI-X vector 0 through entry 4.
    fn enable_admin(rig: &mut Rig) {
        let dev = &mut rig.dev;
        let cap = dev.msix_cap;
        dev.config_write(cap + 2, &msix::ENABLE.to_le_bytes());
        let msg = MsiMessage::remappable(4, None);
        w(dev, reg::MSIX_TABLE, msg.address_lo());
        w(dev, reg::MSIX_TABLE + 12, 0);
        w(dev, reg::ADMIN_BASE, u32::try_from(ADMIN).unwrap());
        w(dev, reg::ADMIN_SIZE, 4);
        w(dev, reg::ADMIN_ENABLE, 1);
        assert_eq!(r(dev, reg::ADMIN_ENABLE), 1);
    }

    /// A context for queue `mock` with entry 3's message; returns its address.
    fn write_context(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u64 {
        let msg = MsiMessage::remappable(3, None);
        mem.write_obj(msg.address_lo(), GuestAddress(CTX)).unwrap();
        mem.write_obj(0u32, GuestAddress(CTX + context::CONTROL))
            .unwrap();
        mem.write_obj(mock.desc_table_addr().0, GuestAddress(CTX + context::DESC))
            .unwrap();
        mem.write_obj(mock.avail_addr().0, GuestAddress(CTX + context::AVAIL))
            .unwrap();
        mem.write_obj(mock.used_addr().0, GuestAddress(CTX + context::USED))
            .unwrap();
        mem.write_obj(16u16, GuestAddress(CTX + context::QUEUE_SIZE))
            .unwrap();
        CTX
    }

    /// Submits a command at ring position `n`; returns the entry's address.
    fn submit(rig: &mut Rig, n: u32, opcode: u32, id: u32, address: u64) -> u64 {
        let entry = ADMIN + u64::from(n % 4) * command::SIZE;
        rig.mem.write_obj(opcode, GuestAddress(entry)).unwrap();
        rig.mem.write_obj(id, GuestAddress(entry + 4)).unwrap();
        rig.mem.write_obj(address, GuestAddress(entry + 8)).unwrap();
        rig.mem.write_obj(0u32, GuestAddress(entry + 16)).unwrap();
        w(&mut rig.dev, reg::ADMIN_TAIL, n + 1);
        entry
    }

    fn status(rig: &Rig, entry: u64) -> u32 {
        rig.mem.read_obj(GuestAddress(entry + 16)).unwrap()
    }

    fn work(mock: &MockSplitQueue<'_, GuestMemoryMmap>, n: usize) {
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| RawDescriptor::from(Descriptor::new(0x8_0000 + 64 * i as u64, 64, 0, 0)))
            .collect();
        for d in descs {
            mock.add_desc_chains(&[d], 0).unwrap();
        }
    }

    /// The admin ring enabled and context 2 started on a queue at 0x6_0000; returns the
    /// queue and the context's address.
    fn started<'a>(
        rig: &mut Rig,
        mem: &'a GuestMemoryMmap,
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, u64) {
        enable_admin(rig);
        let mock = MockSplitQueue::create(mem, GuestAddress(0x6_0000), 16);
        let ctx = write_context(mem, &mock);
        let e = submit(rig, 0, command::START, 2, ctx);
        rig.dev.process(Instant::now());
        assert_eq!(status(rig, e), command::OK);
        (mock, ctx)
    }

    #[test]
    fn start_work_lazy_mask_and_stop() {
        let mut rig = rig();
        let mem = rig.mem.clone();
        let (mock, ctx) = started(&mut rig, &mem);
        let path = rig.backing.path();
        let now = Instant::now();
        assert_eq!(path.delivered(4), 1, "admin interrupt");
        let e = submit(&mut rig, 1, command::START, 2, ctx);
        rig.dev.process(now);
        assert_eq!(status(&rig, e), command::BAD_STATE);
        let e = submit(&mut rig, 2, command::STOP, 9, 0);
        rig.dev.process(now);
        assert_eq!(status(&rig, e), command::BAD_INDEX);

        work(&mock, 2);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 2);
        rig.dev.process(now);
        assert_eq!(path.delivered(3), 2);
        // Masked in the context: latched, delivered after unmask and notify.
        mem.write_obj(context::MASK, GuestAddress(ctx + context::CONTROL))
            .unwrap();
        work(&mock, 1);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 2);
        rig.dev.process(now);
        assert_eq!(path.delivered(3), 2);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(ctx + context::PENDING))
                .unwrap(),
            1
        );
        mem.write_obj(0u32, GuestAddress(ctx + context::CONTROL))
            .unwrap();
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 2);
        rig.dev.process(now);
        assert_eq!(path.delivered(3), 3);
        assert_eq!(rig.dev.stats().completions, 3);

        // Stop drains what was made available, with a delay, before completing.
        w(&mut rig.dev, reg::INJECT_DELAY_US, 1000);
        work(&mock, 2);
        let e = submit(&mut rig, 3, command::STOP, 2, 0);
        let next = rig.dev.process(now).expect("a completion is due");
        assert_eq!(status(&rig, e), command::PENDING);
        rig.dev.process(next);
        rig.dev.process(next + Duration::from_millis(1));
        assert_eq!(status(&rig, e), command::OK);
        assert_eq!(path.delivered(3), 5, "drained before the stop completed");
        assert_eq!(r(&mut rig.dev, reg::COMPLETIONS), 5);
    }

    #[test]
    fn a_stalled_command_times_out_into_an_observable_reset() {
        let mut rig = rig();
        enable_admin(&mut rig);
        let mem = rig.mem.clone();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x6_0000), 16);
        let ctx = write_context(&mem, &mock);
        w(&mut rig.dev, reg::COMMAND_TIMEOUT_MS, 10);
        w(&mut rig.dev, reg::INJECT_STALL, 1);
        let now = Instant::now();
        let e = submit(&mut rig, 0, command::START, 0, ctx);
        let deadline = rig.dev.process(now).expect("a deadline");
        assert_eq!(deadline, now + Duration::from_millis(10));
        assert_eq!(status(&rig, e), command::PENDING);
        assert_eq!(rig.dev.process(deadline), None);
        assert_eq!(r(&mut rig.dev, reg::STATUS), STATUS_RESET);
        assert_eq!(r(&mut rig.dev, reg::RESETS), 1);
        assert_eq!(r(&mut rig.dev, reg::ADMIN_ENABLE), 0);
        assert_eq!(rig.backing.path().delivered(4), 1, "reset notified");
        // Recovery: clear, re-enable, start again.
        w(&mut rig.dev, reg::STATUS, STATUS_RESET);
        w(&mut rig.dev, reg::ADMIN_ENABLE, 1);
        let e = submit(&mut rig, 0, command::START, 0, ctx);
        rig.dev.process(deadline);
        assert_eq!(status(&rig, e), command::OK);
        // An injected reset from the backend.
        w(&mut rig.dev, reg::INJECT_RESET, 1);
        rig.dev.process(deadline);
        assert_eq!(r(&mut rig.dev, reg::RESETS), 2);
    }

    #[test]
    fn bad_contexts_and_dropped_completions() {
        let mut rig = rig();
        enable_admin(&mut rig);
        let mem = rig.mem.clone();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x6_0000), 16);
        let ctx = write_context(&mem, &mock);
        let now = Instant::now();
        // A compatibility-format message is refused.
        let compat = MsiMessage::compatibility(0, 0x30).unwrap();
        mem.write_obj(compat.address_lo(), GuestAddress(ctx))
            .unwrap();
        let e = submit(&mut rig, 0, command::START, 0, ctx);
        rig.dev.process(now);
        assert_eq!(status(&rig, e), command::BAD_CONTEXT);
        let e = submit(&mut rig, 1, command::START, 0, u64::MAX - 63);
        rig.dev.process(now);
        assert_eq!(
            status(&rig, e),
            command::BAD_CONTEXT,
            "at the top of memory"
        );
        let e = submit(&mut rig, 2, command::START, 0, 0xfff_ffc0);
        rig.dev.process(now);
        assert_eq!(status(&rig, e), command::BAD_CONTEXT, "outside RAM");
        let e = submit(&mut rig, 3, 77, 0, ctx);
        rig.dev.process(now);
        assert_eq!(status(&rig, e), command::BAD_OPCODE);
        // A bad size, a misaligned ring, an available ring at 0: refused, not defaulted.
        write_context(&mem, &mock);
        let refused: [(u64, u64); 3] = [
            (context::QUEUE_SIZE, 3),
            (context::DESC, mock.desc_table_addr().0 + 8),
            (context::AVAIL, 0),
        ];
        for (k, (field, value)) in (0u32..).zip(refused) {
            write_context(&mem, &mock);
            if field == context::QUEUE_SIZE {
                mem.write_obj(u16::try_from(value).unwrap(), GuestAddress(ctx + field))
                    .unwrap();
            } else {
                mem.write_obj(value, GuestAddress(ctx + field)).unwrap();
            }
            let e = submit(&mut rig, 4 + k, command::START, 0, ctx);
            rig.dev.process(now);
            assert_eq!(status(&rig, e), command::BAD_CONTEXT, "field {field:#x}");
        }
        write_context(&mem, &mock);
        let e = submit(&mut rig, 7, command::START, 0, ctx);
        rig.dev.process(now);
        assert_eq!(status(&rig, e), command::OK);
        w(&mut rig.dev, reg::INJECT_DROP, 1);
        work(&mock, 2);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 0);
        rig.dev.process(now);
        let stats = rig.dev.stats();
        assert_eq!((stats.completions, stats.dropped), (2, 1));
        assert_eq!(rig.backing.path().delivered(3), 1);
        // A bad ring is refused at enable.
        w(&mut rig.dev, reg::ADMIN_ENABLE, 0);
        w(&mut rig.dev, reg::ADMIN_SIZE, 3);
        w(&mut rig.dev, reg::ADMIN_ENABLE, 1);
        assert_eq!(r(&mut rig.dev, reg::STATUS), STATUS_ADMIN_ERROR);
        // Odd accesses do nothing.
        rig.dev.bar_write(0, 3, &[1, 2]);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 4096);
        assert_eq!(rig.dev.process(now), None);
    }

    /// A started context with paced work half done is snapshotted, restored as a new
    /// device, and the new one completes the rest once and stops the context cleanly.
    #[test]
    fn a_restored_device_carries_on_where_the_old_one_stopped() {
        let mut rig = rig();
        let mem = rig.mem.clone();
        let (mock, _) = started(&mut rig, &mem);
        let path = rig.backing.path();
        let t0 = Instant::now();
        w(&mut rig.dev, reg::INJECT_DELAY_US, 1000);
        work(&mock, 3);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 2);
        rig.dev.process(t0);
        rig.dev.process(t0 + Duration::from_micros(1000));
        assert_eq!(path.delivered(3), 1);
        let snap = rig.dev.snapshot(t0 + Duration::from_micros(1000));
        assert_eq!((snap.running.len(), snap.deferred.len()), (1, 2));

        let now = Instant::now();
        let mut new = ImsQueues::restore(
            DEV,
            path.clone(),
            GuestMemoryAtomic::new(mem.clone()),
            &snap,
            now,
        )
        .unwrap();
        assert_eq!(
            new.snapshot(now),
            snap,
            "the restored device is the same device"
        );
        new.process(now + Duration::from_secs(1));
        assert_eq!(path.delivered(3), 3, "the two owed completions, once each");
        assert_eq!(new.stats().completions, 3);
        let e = ADMIN + command::SIZE;
        mem.write_obj(command::STOP, GuestAddress(e)).unwrap();
        mem.write_obj(2u32, GuestAddress(e + 4)).unwrap();
        mem.write_obj(0u32, GuestAddress(e + 16)).unwrap();
        w(&mut new, reg::ADMIN_TAIL, 2);
        new.process(now + Duration::from_secs(1));
        assert_eq!(status(&rig, e), command::OK, "the restored admin ring runs");

        let tampered: [fn(&mut QueuesSnapshot); 6] = [
            |s| s.contexts = 0,
            |s| s.running[0].id = 99,
            |s| s.running.push(s.running[0].clone()),
            |s| s.admin_size = 3,
            |s| s.msix.table.push([0; 4]),
            |s| s.deferred.push((8, 0, 0)),
        ];
        for edit in tampered {
            let mut bad = snap.clone();
            edit(&mut bad);
            ImsQueues::restore(
                DEV,
                path.clone(),
                GuestMemoryAtomic::new(mem.clone()),
                &bad,
                now,
            )
            .unwrap_err();
        }
    }

    /// A tail more than a ring ahead of the head is refused at once (the runaway-tail
    /// defect: ~4x10^9 junk commands); the ring then runs again after re-enabling.
    #[test]
    fn a_runaway_admin_tail_is_refused() {
        let mut rig = rig();
        enable_admin(&mut rig);
        w(&mut rig.dev, reg::ADMIN_TAIL, 0xffff_fffe);
        assert_eq!(r(&mut rig.dev, reg::STATUS), STATUS_ADMIN_ERROR);
        assert_eq!(r(&mut rig.dev, reg::ADMIN_ENABLE), 0);
        assert_eq!(r(&mut rig.dev, reg::ADMIN_TAIL), 0, "not taken");
        assert_eq!(rig.dev.process(Instant::now()), None);
        assert_eq!(rig.dev.stats().commands, 0);
        w(&mut rig.dev, reg::ADMIN_TAIL, 3);
        assert_eq!(
            r(&mut rig.dev, reg::ADMIN_TAIL),
            0,
            "ignored while disabled"
        );
        w(&mut rig.dev, reg::STATUS, STATUS_ADMIN_ERROR);
        w(&mut rig.dev, reg::ADMIN_ENABLE, 1);
        // Exactly a ring ahead is fine: four bad commands, answered.
        w(&mut rig.dev, reg::ADMIN_TAIL, 4);
        rig.dev.process(Instant::now());
        assert_eq!(rig.dev.stats().commands, 4);
        assert_eq!(r(&mut rig.dev, reg::ADMIN_HEAD), 4);
        w(&mut rig.dev, reg::ADMIN_TAIL, 9);
        assert_eq!(r(&mut rig.dev, reg::STATUS), STATUS_ADMIN_ERROR);
    }

    /// A context whose avail index runs ahead yields at most a queue of work per
    /// notification, and none while a queue's worth is in flight.
    #[test]
    fn a_notification_takes_at_most_a_queue_of_work() {
        let mut rig = rig();
        let mem = rig.mem.clone();
        let (mock, _) = started(&mut rig, &mem);
        w(&mut rig.dev, reg::INJECT_DELAY_US, 1000);
        mock.avail().idx().store(16);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 2);
        let t0 = Instant::now();
        rig.dev.process(t0);
        mock.avail().idx().store(32);
        w(&mut rig.dev, reg::QUEUE_NOTIFY, 2);
        rig.dev.process(t0);
        assert_eq!(rig.dev.deferred.len(), 16);
        rig.dev.process(t0 + Duration::from_secs(1));
        assert_eq!(rig.dev.stats().completions, 16);
    }
}
