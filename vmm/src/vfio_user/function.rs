//! A vfio-user device as a function on our PCI root: its configuration space as the
//! device reports it (IDs, class, interrupt pin), with BARs this VMM places and sizes from
//! the device's regions, and every BAR access relayed to the device process.
//!
//! BARs: a region the device reports as an I/O BAR (bit 0 of its BAR register) becomes an
//! I/O BAR in our I/O window; any other non-empty BAR region a 64-bit memory BAR at an
//! even index (an odd-index memory BAR is not offered). The device's capability list is
//! shown as the device has it, and the guest's writes to it (and to the command register)
//! reach the device, which drives its own MSI-X table when it announces the entries'
//! interrupt index ([`super::entries`]); a device that uses VFIO's MSI-X index has its
//! table and message control emulated here ([`super::msix`]), each vector backed by the
//! host interrupt of the remapping entry it names.
//! A request that fails (the device process died, hung or lied) reads as all ones, is
//! dropped for writes, and is counted; the first failure that breaks the connection takes
//! the device's host interrupts back from the core ([`VfioUserFunction::on_loss`]).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use event_manager::{EventOps, Events, MutEventSubscriber};
use irq::CoreHandle;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::pci::config::{self, Bar, ConfigChange, ConfigSpace};
use devices::pci::PciFunction;

use super::entries::RemoteEntries;
use super::msix::{MsixHost, MsixLayout, MsixTable};
use super::{Client, VfioUserError};

/// A vfio-user device on the root bus.
pub struct VfioUserFunction {
    client: Arc<Mutex<Client>>,
    config: ConfigSpace,
    failures: u64,
    /// Whether the device shows its capability list.
    capabilities: bool,
    /// Called once, when the connection is found broken.
    on_loss: Option<Box<dyn FnOnce() + Send>>,
    /// The host of the device's entries' interrupts, when it is one.
    entries: Option<Arc<RemoteEntries>>,
    /// The MSI-X table, when the device leaves it to us.
    msix: Option<MsixTable>,
    /// The host of the entries its vectors name.
    msix_host: Option<Arc<MsixHost>>,
    /// What maps the device's mappable BAR areas into the guest.
    mapper: Option<Arc<dyn BarMapper>>,
    /// What is mapped: (BAR, its base, the mappings' handles).
    mapped: Vec<(usize, u64, Vec<u32>)>,
}

/// Maps guest-physical ranges onto a device's memory file, so that the guest's accesses
/// to those parts of a BAR reach the device's memory without an exit (the VMM's KVM
/// memory slots).
pub trait BarMapper: Send + Sync {
    /// Maps `size` bytes of `file` from `offset` at guest-physical `gpa`; returns a handle.
    ///
    /// # Errors
    /// The mapping could not be made (the range is relayed instead).
    fn map(&self, gpa: u64, size: u64, file: &std::fs::File, offset: u64) -> std::io::Result<u32>;
    /// Removes the mapping `handle`.
    fn unmap(&self, handle: u32);
}

/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_MMAP: u32 = 1 << 2;
/// Mappings are whole pages.
const PAGE: u64 = 4096;

impl std::fmt::Debug for VfioUserFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserFunction")
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

/// Bytes of the device's configuration space that are read: the type-0 header.
const HEADER: usize = 64;
/// Where capabilities may be: after the header, to the end of the PCI space.
const CAPS: std::ops::Range<usize> = HEADER..config::SIZE;
/// Status register: the capability list is valid.
const STATUS_CAP_LIST: u8 = 1 << 4;

impl VfioUserFunction {
    /// The function of the device behind `client`.
    ///
    /// # Errors
    /// The device's configuration space could not be read, or is smaller than a header.
    pub fn new(mut client: Client) -> Result<Self, VfioUserError> {
        let size = client
            .regions()
            .get(VFIO_PCI_CONFIG_REGION_INDEX as usize)
            .map_or(0, |r| r.size);
        if size < HEADER as u64 {
            return Err(VfioUserError::Request(format!(
                "a configuration space of {size} bytes"
            )));
        }
        let whole = size >= config::SIZE as u64;
        let mut raw = [0u8; config::SIZE];
        let read = if whole { config::SIZE } else { HEADER };
        for (i, word) in raw
            .get_mut(..read)
            .unwrap_or_default()
            .chunks_exact_mut(4)
            .enumerate()
        {
            client.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 4 * i as u64, word)?;
        }
        let [vendor0, vendor1, device0, device1, ..] = raw;
        let [revision, interface, subclass, class] = [raw[8], raw[9], raw[10], raw[11]];
        let mut config = ConfigSpace::new(
            u16::from_le_bytes([vendor0, vendor1]),
            u16::from_le_bytes([device0, device1]),
            [class, subclass, interface],
            revision,
        );
        let [sub0, sub1, sub2, sub3] = [raw[0x2c], raw[0x2d], raw[0x2e], raw[0x2f]];
        config.set_bytes(0x2c, &[sub0, sub1, sub2, sub3]);
        config.set_bytes(0x3d, &[raw[0x3d]]);
        for index in 0..6usize {
            let size = client.regions().get(index).map_or(0, |r| r.size);
            if size == 0 {
                continue;
            }
            let io = raw
                .get(config::BAR0 + 4 * index)
                .is_some_and(|b| b & 1 == 1);
            // A region larger than any BAR (the device says what it likes) is not offered.
            let Some(size) = size.checked_next_power_of_two() else {
                continue;
            };
            if io {
                config.add_io_bar(Bar {
                    index,
                    size: size.clamp(4, 256),
                });
            } else if index % 2 == 0 {
                config.add_bar(Bar {
                    index,
                    size: size.max(4096),
                });
            }
        }
        // The capability list, as the device has it (a pointer into the header is none).
        let capabilities = whole && raw[0x06] & STATUS_CAP_LIST != 0 && raw[0x34] >= 0x40;
        if capabilities {
            config.set_bytes(0x06, &[STATUS_CAP_LIST]);
            config.set_bytes(0x34, &[raw[0x34] & !3]);
            config.set_bytes(CAPS.start, raw.get(CAPS).unwrap_or_default());
        }
        // MSI-X the device leaves to us: its capability, VFIO's MSI-X index with eventfds,
        // and no index of remapping entries (a device with one drives its own table).
        let vfio_msix = client
            .irqs()
            .get(VFIO_PCI_MSIX_IRQ_INDEX as usize)
            .is_some_and(|i| i.count > 0 && i.flags & VFIO_IRQ_INFO_EVENTFD != 0);
        let own_entries = client
            .irqs()
            .get(super::server::ENTRY_IRQ_INDEX as usize)
            .is_some_and(|i| i.count > 0);
        let client = Arc::new(Mutex::new(client));
        let msix = MsixLayout::find(&raw)
            .filter(|l| capabilities && vfio_msix && !own_entries && l.table.0 < 6)
            .map(|layout| {
                let at = layout.cap + 2;
                let byte = |i: usize| raw.get(i).copied().unwrap_or(0);
                let control = u16::from_le_bytes([byte(at), byte(at + 1)]);
                MsixTable::new(layout, control, client.clone())
            });
        Ok(Self {
            client,
            config,
            failures: 0,
            capabilities,
            on_loss: None,
            entries: None,
            msix,
            msix_host: None,
            mapper: None,
            mapped: Vec::new(),
        })
    }

    /// Maps the device's mappable BAR areas (a region's sparse mmap areas, with the file
    /// the device sent) into the guest through `mapper` whenever the BAR is placed and
    /// memory decoding is on; the rest of the BAR is relayed.
    pub fn set_mapper(&mut self, mapper: Arc<dyn BarMapper>) {
        self.mapper = Some(mapper);
        self.remap_bars();
    }

    /// Guest-physical ranges mapped now: (address, size).
    #[must_use]
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        let client = self.lock();
        self.mapped
            .iter()
            .flat_map(|(bar, base, _)| {
                let areas = mappable(&client, *bar);
                areas
                    .into_iter()
                    .map(move |(off, len)| (base.saturating_add(off), len))
            })
            .collect()
    }

    /// Makes the mappings follow the BARs: unmaps those of a BAR that moved or stopped
    /// decoding, maps those of a BAR newly placed.
    fn remap_bars(&mut self) {
        let Some(mapper) = self.mapper.clone() else {
            return;
        };
        let client = self.client.clone();
        let client = client.lock().unwrap_or_else(PoisonError::into_inner);
        let want: Vec<(usize, u64)> = self
            .config
            .mapped_bars()
            .into_iter()
            .filter(|(bar, base, _)| base % PAGE == 0 && !mappable(&client, *bar).is_empty())
            .map(|(bar, base, _)| (bar, base))
            .collect();
        self.mapped.retain(|(bar, base, handles)| {
            let keep = want.contains(&(*bar, *base));
            if !keep {
                handles.iter().for_each(|h| mapper.unmap(*h));
            }
            keep
        });
        for (bar, base) in want {
            if self
                .mapped
                .iter()
                .any(|(b, at, _)| (*b, *at) == (bar, base))
            {
                continue;
            }
            let index = u32::try_from(bar).unwrap_or(u32::MAX);
            let (Some(file), Some(region)) = (client.region_file(index), client.regions().get(bar))
            else {
                continue;
            };
            let handles = mappable(&client, bar)
                .into_iter()
                .filter_map(|(off, len)| {
                    // Offsets the device chose that overflow are not mapped (relayed).
                    let gpa = base.checked_add(off)?;
                    let at = region.offset.checked_add(off)?;
                    mapper.map(gpa, len, file, at).ok()
                })
                .collect();
            self.mapped.push((bar, base, handles));
        }
    }

    /// Whether the device's MSI-X table is emulated here (VFIO's MSI-X index).
    #[must_use]
    pub fn has_vfio_msix(&self) -> bool {
        self.msix.is_some()
    }

    /// The host of the entries the device's MSI-X vectors name, to attach to `core` for
    /// `requester` ([`irq::InterruptControl::attach_named_host`]); `None` without VFIO
    /// MSI-X.
    pub fn msix_host(&mut self, core: CoreHandle, requester: u16) -> Option<Arc<MsixHost>> {
        let host = self.msix.as_mut()?.host(core, requester);
        self.msix_host = Some(host.clone());
        Some(host)
    }

    /// The connection, shared with the device's host of entries.
    #[must_use]
    pub fn client(&self) -> Arc<Mutex<Client>> {
        self.client.clone()
    }

    /// Calls `f` once, when a request finds the connection broken (the device process
    /// died, hung or lied): the VMM takes the device's host interrupts back then.
    pub fn on_loss(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_loss = Some(Box::new(f));
    }

    fn lock(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a failed request; the first one that broke the connection reports the loss.
    fn failed(&mut self) {
        self.failures += 1;
        if self.lock().is_broken() {
            if let Some(f) = self.on_loss.take() {
                f();
            }
        }
    }

    /// Gives the device's INTx an eventfd and returns the relay that asserts IOAPIC input
    /// `ioapic_pin` through `sink` whenever the device writes it; the interrupt line
    /// register says which input. VFIO's INTx is level-triggered and masked by each
    /// assertion: when the guest made the input edge-triggered the device is unmasked at
    /// once; when level-triggered, the line stays high until the guest's end of interrupt,
    /// then is lowered and the device unmasked (`SET_IRQS` `ACTION_UNMASK`), and a device
    /// that still needs service asserts again. `None` for a device without INTx (a pin
    /// other than 1 to 4, or no INTx interrupt index with eventfds).
    ///
    /// # Errors
    /// The eventfd, or the device's refusal of it.
    pub fn connect_intx(
        &mut self,
        ioapic_pin: u8,
        sink: IntxSink,
    ) -> Result<Option<IntxRelay>, VfioUserError> {
        // INTA to INTD; any other value the device reports means no INTx.
        let has_pin = self
            .config
            .bytes(0x3d, 1)
            .first()
            .is_some_and(|p| (1..=4).contains(p));
        let intx = self
            .lock()
            .irqs()
            .get(VFIO_PCI_INTX_IRQ_INDEX as usize)
            .copied();
        let usable = intx.is_some_and(|i| i.count >= 1 && i.flags & VFIO_IRQ_INFO_EVENTFD != 0);
        if !has_pin || !usable {
            return Ok(None);
        }
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| VfioUserError::Io {
            what: "creating the INTx eventfd",
            source,
        })?;
        self.lock()
            .set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, 0, &[fd.as_raw_fd()])?;
        self.config.set_bytes(0x3c, &[ioapic_pin]);
        let pin = usize::from(ioapic_pin);
        let unmask = unmask_intx(&self.client);
        sink.resample(pin, unmask.clone());
        Ok(Some(IntxRelay {
            fd,
            pin,
            sink,
            unmask,
        }))
    }

    /// Requests that failed (each read as all ones or dropped).
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Notes that `entries` hosts the device's entries' interrupts (for the report).
    pub fn set_entries(&mut self, entries: Arc<RemoteEntries>) {
        self.entries = Some(entries);
    }

    /// What the device did so far.
    #[must_use]
    pub fn report(&self) -> crate::pci::RemoteReport {
        crate::pci::RemoteReport {
            failed: self.failures + self.msix.as_ref().map_or(0, |m| m.refused),
            lost: self.lost(),
            entry_messages: match (&self.entries, &self.msix_host) {
                (Some(e), _) => Some(e.messages()),
                (None, Some(m)) => Some(m.messages()),
                (None, None) => None,
            },
        }
    }

    /// Whether the connection to the device process is broken.
    #[must_use]
    pub fn lost(&self) -> bool {
        self.lock().is_broken()
    }
}

impl PciFunction for VfioUserFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigChange {
        if let Some(msix) = self.msix.as_mut() {
            let cap = msix.layout().cap;
            if offset < cap + 12 && offset + data.len() > cap {
                // Only message control is writable, and it is ours: VFIO's MSI-X is
                // driven with SET_IRQS, not through the device's capability.
                let mut control = msix.control().to_le_bytes();
                for (k, byte) in data.iter().enumerate() {
                    if let Some(c) = (offset + k)
                        .checked_sub(cap + 2)
                        .and_then(|i| control.get_mut(i))
                    {
                        *c = *byte;
                    }
                }
                msix.set_control(u16::from_le_bytes(control));
                let now = msix.control().to_le_bytes();
                self.config.set_bytes(cap + 2, &now);
                return ConfigChange::default();
            }
        }
        if self.capabilities && CAPS.contains(&offset) {
            // The device's capabilities are the device's: the write goes there, and what
            // the device then holds is what the guest reads.
            let start = offset & !3;
            let end = (offset + data.len()).min(config::SIZE).next_multiple_of(4);
            let mut now = vec![0u8; end.saturating_sub(start)];
            let done = {
                let mut client = self.lock();
                let region = VFIO_PCI_CONFIG_REGION_INDEX;
                client.region_write(region, offset as u64, data).is_ok()
                    && client.region_read(region, start as u64, &mut now).is_ok()
            };
            if done {
                self.config.set_bytes(start, &now);
            } else {
                self.failed();
            }
            return ConfigChange::default();
        }
        let change = self.config.write(offset, data);
        let command = offset < 0x06 && offset + data.len() > 0x04;
        if change.bars || command {
            self.remap_bars();
        }
        // The command register (decoding, bus mastering, INTx disable) is the device's
        // business too; BARs are ours.
        if command {
            let command = self.config.bytes(0x04, 2).to_vec();
            if self
                .lock()
                .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &command)
                .is_err()
            {
                self.failed();
            }
        }
        change
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some(msix) = self.msix.as_ref().filter(|m| m.claims(bar, offset)) {
            msix.read(bar, offset, data);
            return;
        }
        let index = u32::try_from(bar).unwrap_or(u32::MAX);
        if self.lock().region_read(index, offset, data).is_err() {
            data.fill(0xff);
            self.failed();
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(msix) = self.msix.as_mut().filter(|m| m.claims(bar, offset)) {
            msix.write(bar, offset, data);
            return;
        }
        let index = u32::try_from(bar).unwrap_or(u32::MAX);
        if self.lock().region_write(index, offset, data).is_err() {
            self.failed();
        }
    }
}

/// The page-whole areas of BAR `bar` the device lets us map: (offset, size).
fn mappable(client: &Client, bar: usize) -> Vec<(u64, u64)> {
    let index = u32::try_from(bar).unwrap_or(u32::MAX);
    match client.regions().get(bar) {
        Some(r) if r.flags & REGION_MMAP != 0 && client.region_file(index).is_some() => r
            .sparse
            .iter()
            .copied()
            .filter(|(off, len)| off % PAGE == 0 && len % PAGE == 0 && *len > 0)
            .collect(),
        _ => Vec::new(),
    }
}

impl Drop for VfioUserFunction {
    fn drop(&mut self) {
        if let Some(mapper) = &self.mapper {
            for (_, _, handles) in self.mapped.drain(..) {
                handles.iter().for_each(|h| mapper.unmap(*h));
            }
        }
    }
}

/// An IOAPIC input a device's INTx drives.
pub trait IntxInput: Send + Sync {
    /// The device asserted input `pin`; returns whether the input is edge-triggered now
    /// (sent as a pulse: the device may be unmasked at once).
    fn assert(&self, pin: usize) -> bool;
    /// Calls `unmask` after each end of interrupt of input `pin` while its entry is
    /// level-triggered, the line lowered first.
    fn resample(&self, pin: usize, unmask: Arc<dyn Fn() + Send + Sync>);
}

/// What a device's INTx drives.
pub type IntxSink = Arc<dyn IntxInput>;

/// `SET_IRQS` `DATA_NONE | ACTION_UNMASK` of INTx, as a callback (a failure is the
/// connection's, seen by the next request). It does not keep the connection open: once
/// the function is gone, it does nothing.
fn unmask_intx(client: &Arc<Mutex<Client>>) -> Arc<dyn Fn() + Send + Sync> {
    let client = Arc::downgrade(client);
    Arc::new(move || {
        if let Some(client) = client.upgrade() {
            let _ = client
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .unmask_irq(VFIO_PCI_INTX_IRQ_INDEX, 0);
        }
    })
}

/// A vfio-user device's INTx on the device event loop: each write the device process makes
/// to the eventfd asserts the device's IOAPIC input (the IOAPIC is in user space, so this
/// one hop is a VMM thread's; MSI-X goes to KVM directly).
pub struct IntxRelay {
    fd: EventFd,
    pin: usize,
    sink: IntxSink,
    unmask: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for IntxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxRelay")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl MutEventSubscriber for IntxRelay {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN)
            && self.fd.read().is_ok()
            && self.sink.assert(self.pin)
        {
            (self.unmask)();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration fails only if the descriptor is registered already.
        let _ = ops.add(Events::new(&self.fd, EventSet::IN));
    }
}
