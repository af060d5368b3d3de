//! PCI: one root bus (segment 0, bus 0) with configuration access through ports
//! `0xcf8`/`0xcfc` and ECAM, memory BARs routed from an MMIO window by the addresses the
//! guest programs, requester IDs (bus/device/function: the source-id of a function's
//! interrupts), and MSI-X.
//!
//! - [`config`]: a function's configuration space, BARs and capability list.
//! - [`msix`]: the MSI-X table, pending bits and capability.
//! - [`PciRoot`]: the bus; [`ConfigIo`], [`Ecam`] and [`MmioWindow`] put it on the PIO and
//!   MMIO buses.

pub mod config;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::bus::{le_u32, put_le_u32, ConcurrentBusDevice};
use config::ConfigSpace;

/// The configuration address port.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports from the address port through the data ports.
pub const CONFIG_PORTS: u16 = 8;
/// Where ECAM is (bus 0 only: 1 MiB).
pub const ECAM_BASE: u64 = hypercall::platform::ECAM_BASE;
/// Size of ECAM for bus 0.
pub const ECAM_SIZE: u64 = 1 << 20;
/// The MMIO window BARs are placed in.
pub const WINDOW_BASE: u64 = hypercall::platform::PCI_WINDOW_BASE;
/// Size of the MMIO window.
pub const WINDOW_SIZE: u64 = hypercall::platform::PCI_WINDOW_SIZE;

/// A PCI function on the root bus.
pub trait PciFunction: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The guest writes configuration space (the default writes the writable bytes; a
    /// function with live capabilities reacts too).
    fn config_write(&mut self, offset: usize, data: &[u8]) -> config::ConfigChange;
    /// The guest reads BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// A function shared between the bus and its own backend.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// The host bridge at 00:00.0.
#[derive(Debug)]
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        // Red Hat's PCIe host bridge IDs (as QEMU's generic host), class 06/00 host bridge.
        Self(ConfigSpace::new(0x1b36, 0x0008, [0x06, 0x00, 0x00], 0))
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) -> config::ConfigChange {
        self.0.write(offset, data)
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Requester ID of bus 0, `device`, `function`.
#[must_use]
pub fn requester_id(device: u8, function: u8) -> u16 {
    (u16::from(device & 0x1f) << 3) | u16::from(function & 7)
}

/// The root bus's own state, for a snapshot: the configuration address latch and the
/// host bridge's configuration space (the other functions' spaces are their devices').
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootSnapshot {
    /// The value last written to port `0xcf8`.
    pub address: u32,
    /// The host bridge's configuration space.
    pub host_bridge: Vec<u8>,
}

/// Where a root bus's windows are in guest-physical memory: an embedder places them in
/// its own device area ([`PciLayout::default`] is this VMM's, `hypercall::platform`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciLayout {
    /// ECAM for bus 0 ([`ECAM_SIZE`] bytes; its MCFG entry and the ECAM bus device go
    /// here).
    pub ecam_base: u64,
    /// The MMIO window BARs are placed in by [`PciRoot::assign_bars`] and routed from by
    /// [`MmioWindow`].
    pub window_base: u64,
    /// Its size.
    pub window_size: u64,
    /// The port range I/O BARs are placed in and routed from by [`IoWindow`].
    pub io_base: u64,
    /// Its size.
    pub io_size: u64,
}

/// Ports of the I/O window when nothing says otherwise.
pub const IO_BASE: u64 = 0xc000;
/// Its size.
pub const IO_SIZE: u64 = 0x4000;

impl Default for PciLayout {
    fn default() -> Self {
        Self {
            ecam_base: ECAM_BASE,
            window_base: WINDOW_BASE,
            window_size: WINDOW_SIZE,
            io_base: IO_BASE,
            io_size: IO_SIZE,
        }
    }
}

/// The root bus.
#[derive(Default)]
pub struct PciRoot {
    layout: PciLayout,
    functions: BTreeMap<u16, SharedFunction>,
    bridge: Arc<Mutex<HostBridge>>,
    address: u32,
    /// (address, size, requester ID, BAR) of every mapped BAR.
    map: Vec<(u64, u64, u16, usize)>,
    /// The same for I/O BARs (ports).
    io_map: Vec<(u64, u64, u16, usize)>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("functions", &self.functions.keys().collect::<Vec<_>>())
            .field("map", &self.map)
            .finish()
    }
}

fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PciRoot {
    /// A root bus with the host bridge at 00:00.0, its windows where `layout` says.
    #[must_use]
    pub fn new(layout: PciLayout) -> Self {
        let mut root = Self {
            layout,
            ..Self::default()
        };
        root.functions.insert(0, root.bridge.clone());
        root
    }

    /// Where its windows are.
    #[must_use]
    pub fn layout(&self) -> PciLayout {
        self.layout
    }

    /// The root bus's own state.
    #[must_use]
    pub fn snapshot(&self) -> RootSnapshot {
        RootSnapshot {
            address: self.address,
            host_bridge: self
                .bridge
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0
                .raw()
                .to_vec(),
        }
    }

    /// Puts the root bus in the state `snap` describes and maps the BARs its functions'
    /// (already restored) configuration spaces program, instead of
    /// [`PciRoot::assign_bars`].
    ///
    /// # Errors
    /// A host-bridge configuration space of the wrong size; nothing changes.
    pub fn restore(&mut self, snap: &RootSnapshot) -> Result<(), crate::restore::RestoreError> {
        self.bridge
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .restore_raw(&snap.host_bridge)?;
        self.address = snap.address;
        self.remap();
        Ok(())
    }

    /// Adds `function` at 00:`device`.`function_number`; returns its requester ID, or
    /// `None` if the slot is taken.
    pub fn add(
        &mut self,
        device: u8,
        function_number: u8,
        function: SharedFunction,
    ) -> Option<u16> {
        let rid = requester_id(device, function_number);
        if self.functions.contains_key(&rid) {
            return None;
        }
        self.functions.insert(rid, function);
        self.remap();
        Some(rid)
    }

    /// Places every BAR still unprogrammed in the MMIO window (as firmware would) and
    /// turns on memory decoding, so a guest that does not enumerate finds its devices. A
    /// BAR that does not fit in what is left of the window stays unprogrammed.
    pub fn assign_bars(&mut self) {
        let mut next = self.layout.window_base;
        let end = self
            .layout
            .window_base
            .saturating_add(self.layout.window_size);
        let mut next_io = self.layout.io_base;
        let io_end = self.layout.io_base.saturating_add(self.layout.io_size);
        for f in self.functions.values() {
            let mut f = lock(f);
            let sizes: Vec<(usize, u64)> = (0..6)
                .filter_map(|i| {
                    let at = config::BAR0 + 4 * i;
                    let before = f.config().bytes(at, 4).to_vec();
                    f.config_write(at, &u32::MAX.to_le_bytes());
                    let mut probe = [0u8; 4];
                    f.config().read(at, &mut probe);
                    f.config_write(at, &before);
                    let mask = u32::from_le_bytes(probe) & !0xf;
                    (mask != 0 && u32::from_le_bytes(probe) & 1 == 0)
                        .then(|| (i, u64::from((!mask).wrapping_add(1))))
                })
                .collect();
            for (bar, size) in sizes {
                let at_next = next.div_ceil(size) * size;
                if at_next.saturating_add(size) > end {
                    continue;
                }
                next = at_next;
                let at = config::BAR0 + 4 * bar;
                f.config_write(at, &next.to_le_bytes());
                next += size;
            }
            let io_sizes: Vec<(usize, u64)> = f
                .config()
                .io_bars()
                .iter()
                .filter(|b| f.config().bytes(config::BAR0 + 4 * b.index, 4) == [1, 0, 0, 0])
                .map(|b| (b.index, b.size))
                .collect();
            let mut command = config::COMMAND_MEMORY;
            for (bar, size) in io_sizes {
                let size = size.max(4);
                let at_next = next_io.div_ceil(size) * size;
                if at_next.saturating_add(size) > io_end {
                    continue;
                }
                next_io = at_next + size;
                let port = u32::try_from(at_next).unwrap_or(0);
                f.config_write(config::BAR0 + 4 * bar, &port.to_le_bytes());
                command |= config::COMMAND_IO;
            }
            f.config_write(0x04, &command.to_le_bytes());
        }
        self.remap();
    }

    fn remap(&mut self) {
        self.map = self
            .functions
            .iter()
            .flat_map(|(rid, f)| {
                let bars = lock(f).config().mapped_bars();
                bars.into_iter()
                    .map(move |(bar, addr, size)| (addr, size, *rid, bar))
            })
            .collect();
        self.io_map = self
            .functions
            .iter()
            .flat_map(|(rid, f)| {
                let bars = lock(f).config().mapped_io_bars();
                bars.into_iter()
                    .map(move |(bar, port, size)| (port, size, *rid, bar))
            })
            .collect();
    }

    fn io_bar_at(&self, port: u64) -> Option<(SharedFunction, usize, u64)> {
        self.io_map
            .iter()
            .find(|(base, size, _, _)| port >= *base && port - base < *size)
            .and_then(|(base, _, rid, bar)| {
                Some((self.functions.get(rid)?.clone(), *bar, port - base))
            })
    }

    /// Configuration read of requester `rid` at `offset` (no function: all ones). For a
    /// root no vCPU uses yet; vCPUs go through [`ConfigIo`] and [`Ecam`].
    pub fn config_read(&self, rid: u16, offset: usize, data: &mut [u8]) {
        match self.functions.get(&rid) {
            Some(f) => lock(f).config().read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write of requester `rid` at `offset`. For a root no vCPU uses yet;
    /// vCPUs go through [`ConfigIo`] and [`Ecam`].
    pub fn config_write(&mut self, rid: u16, offset: usize, data: &[u8]) {
        let Some(f) = self.functions.get(&rid) else {
            return;
        };
        if lock(f).config_write(offset, data).bars {
            self.remap();
        }
    }

    /// Replaces the map's entries of requester `rid` with `bars` (BAR, address, size).
    fn set_bars(&mut self, rid: u16, bars: &[(usize, u64, u64)]) {
        self.map.retain(|(.., r, _)| *r != rid);
        self.map
            .extend(bars.iter().map(|&(bar, addr, size)| (addr, size, rid, bar)));
    }

    /// The function at requester `rid`.
    fn function(&self, rid: u16) -> Option<SharedFunction> {
        self.functions.get(&rid).cloned()
    }

    fn bar_at(&self, addr: u64) -> Option<(SharedFunction, usize, u64)> {
        self.map
            .iter()
            .find(|(base, size, _, _)| addr >= *base && addr - base < *size)
            .and_then(|(base, _, rid, bar)| {
                Some((self.functions.get(rid)?.clone(), *bar, addr - base))
            })
    }

    /// Where BAR `bar` of requester `rid` is mapped.
    #[must_use]
    pub fn bar_address(&self, rid: u16, bar: usize) -> Option<u64> {
        self.map
            .iter()
            .find(|(_, _, r, b)| *r == rid && *b == bar)
            .map(|(a, ..)| *a)
    }
}

/// A shared root bus.
///
/// Lock order: a function's lock before the root's. On the vCPUs' paths (configuration
/// reads and writes, BAR accesses) the function is looked up under the root's lock,
/// which is released before the function is locked, so a device busy on its own
/// backend delays only the accesses to that device; a configuration write that moves
/// BARs takes the root's lock briefly while holding its function's. The `PciRoot`
/// methods that lock functions under the root's lock (`add`, `assign_bars`, `restore`,
/// `snapshot`, `config_read`, `config_write`) are for set-up and for a paused VM, when no
/// vCPU is inside a configuration access.
pub type SharedRoot = Arc<Mutex<PciRoot>>;

fn root(r: &SharedRoot) -> std::sync::MutexGuard<'_, PciRoot> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Configuration read of requester `rid` on a shared root (see [`SharedRoot`]).
fn shared_config_read(r: &SharedRoot, rid: u16, offset: usize, data: &mut [u8]) {
    let function = root(r).function(rid);
    match function {
        Some(f) => lock(&f).config().read(offset, data),
        None => data.fill(0xff),
    }
}

/// Configuration write of requester `rid` on a shared root (see [`SharedRoot`]). A write
/// that moves the function's BARs updates the map with that function's BARs alone,
/// taking the root's lock while still holding the function's (so two writes to one
/// function cannot leave the map stale).
fn shared_config_write(r: &SharedRoot, rid: u16, offset: usize, data: &[u8]) {
    let Some(f) = root(r).function(rid) else {
        return;
    };
    let mut function = lock(&f);
    if function.config_write(offset, data).bars {
        let bars = function.config().mapped_bars();
        root(r).set_bars(rid, &bars);
    }
}

/// Ports `0xcf8`-`0xcff`: the address register (enable bit 31, bus 23:16, device 15:11,
/// function 10:8, register 7:2) and the data window.
#[derive(Debug)]
pub struct ConfigIo(pub SharedRoot);

impl ConfigIo {
    fn target(address: u32) -> Option<(u16, usize)> {
        if address & (1 << 31) == 0 || (address >> 16) & 0xff != 0 {
            return None;
        }
        let rid = u16::try_from((address >> 8) & 0xff).ok()?;
        let reg = usize::try_from(address & 0xfc).ok()?;
        Some((rid, reg))
    }
}

impl ConcurrentBusDevice for ConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let address = root(&self.0).address;
        match offset {
            0 => put_le_u32(data, address),
            4..=7 => match Self::target(address) {
                Some((rid, reg)) => shared_config_read(
                    &self.0,
                    rid,
                    reg + usize::try_from(offset - 4).unwrap_or(0),
                    data,
                ),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => root(&self.0).address = le_u32(data),
            4..=7 => {
                let address = root(&self.0).address;
                if let Some((rid, reg)) = Self::target(address) {
                    let reg = reg + usize::try_from(offset - 4).unwrap_or(0);
                    shared_config_write(&self.0, rid, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM for bus 0: `base + (device << 15 | function << 12 | register)`.
#[derive(Debug)]
pub struct Ecam(pub SharedRoot);

/// ECAM offset to (requester ID, register).
fn ecam_target(offset: u64) -> (u16, usize) {
    let rid = u16::try_from((offset >> 12) & 0xff).unwrap_or(u16::MAX);
    (rid, usize::try_from(offset & 0xfff).unwrap_or(0))
}

impl ConcurrentBusDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (rid, reg) = ecam_target(offset);
        shared_config_read(&self.0, rid, reg, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (rid, reg) = ecam_target(offset);
        shared_config_write(&self.0, rid, reg, data);
    }
}

/// Which of the root's windows an access came through.
#[derive(Debug, Clone, Copy)]
enum Space {
    Memory,
    Io,
}

/// The function, BAR and offset behind `offset` of window `space`.
fn window_target(
    root_: &SharedRoot,
    space: Space,
    offset: u64,
) -> Option<(SharedFunction, usize, u64)> {
    let root = root(root_);
    match space {
        Space::Memory => root.bar_at(root.layout.window_base + offset),
        Space::Io => root.io_bar_at(root.layout.io_base + offset),
    }
}

fn window_read(root: &SharedRoot, space: Space, offset: u64, data: &mut [u8]) {
    match window_target(root, space, offset) {
        Some((f, bar, at)) => lock(&f).bar_read(bar, at, data),
        None => data.fill(0xff),
    }
}

fn window_write(root: &SharedRoot, space: Space, offset: u64, data: &[u8]) {
    if let Some((f, bar, at)) = window_target(root, space, offset) {
        lock(&f).bar_write(bar, at, data);
    }
}

/// The MMIO window: accesses go to the BAR the guest placed there.
#[derive(Debug)]
pub struct MmioWindow(pub SharedRoot);

impl ConcurrentBusDevice for MmioWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        window_read(&self.0, Space::Memory, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        window_write(&self.0, Space::Memory, offset, data);
    }
}

/// The I/O window: port accesses go to the I/O BAR the guest placed there.
#[derive(Debug)]
pub struct IoWindow(pub SharedRoot);

impl ConcurrentBusDevice for IoWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        window_read(&self.0, Space::Io, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        window_write(&self.0, Space::Io, offset, data);
    }
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test offsets are small")]
mod tests {
    use super::*;

    /// A function with one 4-KiB BAR that remembers its last write.
    struct Probe {
        config: ConfigSpace,
        last: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciFunction for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) -> config::ConfigChange {
            self.config.write(offset, data)
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
    }

    fn rig() -> (SharedRoot, Arc<Mutex<Probe>>) {
        let mut config = ConfigSpace::new(0x1b36, 0x1100, [0xff, 0, 0], 0);
        config.add_bar(config::Bar {
            index: 0,
            size: 0x1000,
        });
        let probe = Arc::new(Mutex::new(Probe { config, last: None }));
        let mut root = PciRoot::new(PciLayout::default());
        assert_eq!(root.add(3, 0, probe.clone()), Some(0x18));
        assert_eq!(root.add(3, 0, probe.clone()), None);
        root.assign_bars();
        (Arc::new(Mutex::new(root)), probe)
    }

    #[test]
    fn config_space_through_cf8_and_ecam() {
        let (root, _) = rig();
        let io = ConfigIo(root.clone());
        io.write(0, &(0x8000_0000u32 | (3 << 11)).to_le_bytes());
        let mut id = [0u8; 4];
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1100_1b36);
        let ecam = Ecam(root.clone());
        ecam.read(3 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1100_1b36);
        ecam.read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36, "host bridge");
        ecam.read(5 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), u32::MAX, "no device");
        // Disabled address or another bus: nothing.
        io.write(0, &(3u32 << 11).to_le_bytes());
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), u32::MAX);
    }

    /// An embedder's layout: BARs go in its window, the window routes from its base, and
    /// a BAR that does not fit stays unprogrammed.
    #[test]
    fn a_root_places_and_routes_bars_in_the_layout_it_was_given() {
        let probe = || {
            let mut config = ConfigSpace::new(0x1b36, 0x1100, [0xff, 0, 0], 0);
            config.add_bar(config::Bar {
                index: 0,
                size: 0x1000,
            });
            Arc::new(Mutex::new(Probe { config, last: None }))
        };
        let layout = PciLayout {
            ecam_base: 0x3000_0000,
            window_base: 0x4000_0000,
            window_size: 0x1000,
            ..PciLayout::default()
        };
        let (a, b) = (probe(), probe());
        let mut root = PciRoot::new(layout);
        root.add(3, 0, a.clone()).unwrap();
        root.add(4, 0, b.clone()).unwrap();
        root.assign_bars();
        assert_eq!(root.layout(), layout);
        let bar0 = |p: &Arc<Mutex<Probe>>| {
            let b = p.lock().unwrap().config.bytes(config::BAR0, 4).to_vec();
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & !0xf
        };
        assert_eq!(bar0(&a), 0x4000_0000);
        assert_eq!(bar0(&b), 0, "no room left in the window");
        let window = MmioWindow(Arc::new(Mutex::new(root)));
        window.write(0x10, &[7]);
        assert_eq!(a.lock().unwrap().last, Some((0, 0x10, vec![7])));
    }

    /// I/O BARs: placed in the layout's port range, routed by the I/O window, following
    /// the guest's placement and I/O decoding.
    #[test]
    fn io_bars_are_placed_and_routed_by_port() {
        let mut config = ConfigSpace::new(0x1b36, 0x1100, [0xff, 0, 0], 0);
        config.add_io_bar(config::Bar {
            index: 2,
            size: 0x100,
        });
        config.add_bar(config::Bar {
            index: 0,
            size: 0x1000,
        });
        let probe = Arc::new(Mutex::new(Probe { config, last: None }));
        let mut root = PciRoot::new(PciLayout::default());
        root.add(5, 0, probe.clone()).unwrap();
        root.assign_bars();
        let bar = |p: &Arc<Mutex<Probe>>, i: usize| {
            let b = p
                .lock()
                .unwrap()
                .config
                .bytes(config::BAR0 + 4 * i, 4)
                .to_vec();
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        assert_eq!(bar(&probe, 2), 0xc001, "port 0xc000, I/O type bit");
        assert_eq!(
            bar(&probe, 0) & !0xf,
            0xc000_0000,
            "the memory BAR as before"
        );
        let shared = Arc::new(Mutex::new(root));
        let io = IoWindow(shared.clone());
        io.write(0x10, &[9]);
        assert_eq!(probe.lock().unwrap().last, Some((2, 0x10, vec![9])));
        let mut b = [0u8; 1];
        io.read(0x100, &mut b);
        assert_eq!(b, [0xff], "beyond the BAR");
        // The guest moves it and then turns I/O decoding off.
        shared
            .lock()
            .unwrap()
            .config_write(0x28, 0x18, &0xd000u32.to_le_bytes());
        io.write(0x1000 + 4, &[7]);
        assert_eq!(probe.lock().unwrap().last, Some((2, 4, vec![7])));
        shared
            .lock()
            .unwrap()
            .config_write(0x28, 0x04, &config::COMMAND_MEMORY.to_le_bytes());
        io.write(0x1000, &[8]);
        assert_eq!(probe.lock().unwrap().last, Some((2, 4, vec![7])));
    }

    #[test]
    fn bars_route_from_the_window_and_follow_the_guest() {
        let (root, probe) = rig();
        let addr = root.lock().unwrap().bar_address(0x18, 0).unwrap();
        assert_eq!(addr, WINDOW_BASE);
        let window = MmioWindow(root.clone());
        window.write(0x10, &[7]);
        assert_eq!(probe.lock().unwrap().last, Some((0, 0x10, vec![7])));
        // The guest moves the BAR.
        let ecam = Ecam(root.clone());
        ecam.write((3 << 15) | 0x10, &0xc010_0000u32.to_le_bytes());
        window.write(0x10_0020, &[9]);
        assert_eq!(probe.lock().unwrap().last, Some((0, 0x20, vec![9])));
        let mut old = [0u8; 1];
        window.read(0x10, &mut old);
        assert_eq!(old, [0xff], "nothing at the old address");
    }

    #[test]
    fn a_restored_root_keeps_its_latch_and_maps_the_bars_its_functions_hold() {
        let (root, probe) = rig();
        let io = ConfigIo(root.clone());
        io.write(0, &(0x8000_0000u32 | (3 << 11)).to_le_bytes());
        Ecam(root.clone()).write((3 << 15) | 0x10, &0xc020_0000u32.to_le_bytes());
        let snap = root.lock().unwrap().snapshot();

        // A new root over the same function (whose own state its device restores).
        let mut again = PciRoot::new(PciLayout::default());
        again.add(3, 0, probe.clone());
        again.restore(&snap).unwrap();
        assert_eq!(again.bar_address(0x18, 0), Some(0xc020_0000));
        let again = Arc::new(Mutex::new(again));
        let mut id = [0u8; 4];
        ConfigIo(again.clone()).read(4, &mut id);
        assert_eq!(
            u32::from_le_bytes(id),
            0x1100_1b36,
            "the latch still selects 00:03.0"
        );
        let short = RootSnapshot {
            host_bridge: vec![0; 3],
            ..snap
        };
        again.lock().unwrap().restore(&short).unwrap_err();
    }

    /// While one function is held (its backend busy), configuration and BAR accesses
    /// to the others go on.
    #[test]
    fn a_busy_function_does_not_hold_up_the_others() {
        let (root, probe) = rig();
        let held = probe.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = root.clone();
        std::thread::spawn(move || {
            let mut id = [0u8; 4];
            Ecam(other.clone()).read(0, &mut id);
            let io = ConfigIo(other.clone());
            io.write(0, &0x8000_0000u32.to_le_bytes());
            io.read(4, &mut id);
            Ecam(other).write(0x04, &[6]);
            tx.send(u32::from_le_bytes(id)).unwrap();
        });
        let id = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("host-bridge access while 00:03.0 is held");
        assert_eq!(id, 0x0008_1b36);
        drop(held);
    }
}
