//! Snapshots of a whole VM: what `vmm run --snapshot` writes and `vmm restore` reads.
//!
//! A snapshot is taken with the VM paused (`vm.rs`): the harness between requests, the
//! IMS devices' event loop stopped, storm control's coalesced interrupts delivered, and
//! every vCPU out of `KVM_RUN` with its pending port or MMIO access completed. It holds
//! the machine's settings, each vCPU (registers, FPU/XSAVE, LAPIC with its pending
//! interrupts, MSRs, pending events, run state), the userspace IOAPIC, the KVM
//! clock, the interrupt core, the VT-d unit, the PCI root and devices, the UART, and all of
//! guest RAM. Interrupts already signalled sit in the LAPICs' IRR; work a device owes is
//! in its own state, with the time left.
//!
//! # File format
//!
//! All integers little-endian.
//!
//! | offset   | size | field |
//! |----------|------|-------|
//! | 0        | 8    | magic `IRQVMSNP` |
//! | 8        | 4    | format version ([`FORMAT_VERSION`]) |
//! | 12       | 4    | zero |
//! | 16       | 8    | header length `H` (at most [`MAX_HEADER`]) |
//! | 24       | `H`  | header: [`VmSnapshot`] as JSON |
//! | 24 + `H` | `M`  | page map: one bit per 4 KiB page of RAM ([`ram`]) |
//! | 24 + `H` + `M` | | the pages the map marks, in order |
//!
//! RAM is the ranges of [`crate::memory::ram_ranges`], in order; a page the map leaves out
//! is zero ([`ram`]). Format 2 (RAM whole after the header) is still read.
//!
//! Reading checks every layer before anything runs: magic, version, lengths (the file
//! must be exactly header, page map and the pages it marks), the machine settings (as a config file's), counts
//! and cross references here, then each layer's own restore (interrupt core, VT-d unit,
//! devices), which refuse what they cannot be in. A refused snapshot is an error naming
//! the field; nothing is run.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use devices::ioapic::IoApicSnapshot;
use devices::serial::SerialSnapshot;
use devices::viommu::VtdSnapshot;
use irq::backing::snapshot::BackingSnapshot;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::config::{ConfigError, MachineConfig, MachineSettings};
use crate::pci::PciSnapshot;

pub mod ram;

use ram::RamLayout;

/// The first bytes of a snapshot file.
pub const MAGIC: [u8; 8] = *b"IRQVMSNP";
/// The format version this VMM writes (and reads, with [`OLDEST_READ`]).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this VMM reads: 2, with RAM whole after the header.
pub const OLDEST_READ: u32 = 2;
/// The longest header read (the largest machine's header is a few MiB).
pub const MAX_HEADER: u64 = 64 << 20;
/// The most MSRs one vCPU's state may list.
pub const MAX_MSRS: usize = 1024;
/// Bytes before the header.
const PREAMBLE: usize = 24;

/// The VM's own state beside its vCPUs' (the split irqchip has no PIC or PIT).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// The userspace IOAPIC.
    pub ioapic: IoApicSnapshot,
}

/// One vCPU.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Run state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4-KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers, including the pending (IRR) and in-service (ISR)
    /// interrupts.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM saves for this vCPU, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and interrupt shadows.
    pub events: kvm_vcpu_events,
}

/// Everything in a snapshot file but guest RAM.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The machine (as config settings, checked as a config file's are).
    pub machine: MachineSettings,
    /// Where the loaded image ended (the vCPU areas and the harness mailbox follow it).
    pub image_end: u64,
    /// IOAPIC and clock.
    pub vm: VmState,
    /// The vCPUs, by index.
    pub vcpus: Vec<VcpuState>,
    /// The COM1 UART.
    pub serial: SerialSnapshot,
    /// The interrupt core: remapping table, owners, routes and lines to rebuild.
    pub interrupts: BackingSnapshot,
    /// The VT-d unit's registers and queue.
    pub vtd: VtdSnapshot,
    /// The PCI root bus and devices.
    pub pci: PciSnapshot,
    /// The negotiable hypercall features each requester's driver accepted (ABI 1.1
    /// `SET_FEATURES`), absent in older snapshots (none accepted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hypercall_features: Vec<(u16, u32)>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for VmSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSnapshot")
            .field("machine", &self.machine)
            .field("image_end", &self.image_end)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Why a snapshot could not be taken, read or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The file could not be read.
    #[error("cannot read snapshot {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file could not be written.
    #[error("cannot write snapshot {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No magic.
    #[error("not a snapshot of this VMM (it does not start with IRQVMSNP)")]
    NotASnapshot,
    /// Another format version.
    #[error(
        "snapshot format version {0} is not supported (this VMM reads versions {OLDEST_READ} to {FORMAT_VERSION})"
    )]
    Version(u32),
    /// The header is not what this VMM writes.
    #[error("invalid snapshot header: {0}")]
    Header(String),
    /// The machine settings are refused.
    #[error("invalid machine in the snapshot")]
    Machine(#[source] ConfigError),
    /// The file is not exactly header plus RAM.
    #[error("the snapshot is {found} bytes long, but its header and RAM make {expected}")]
    Length {
        /// What the header says.
        expected: u64,
        /// What the file is.
        found: u64,
    },
    /// A field is out of range or does not fit the rest.
    #[error("invalid snapshot: {0}")]
    Invalid(String),
    /// A VM-level KVM call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A vCPU-level KVM call failed.
    #[error("vCPU {index}: {what} failed")]
    Vcpu {
        /// The vCPU.
        index: u32,
        /// The call.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The interrupt core's state is refused.
    #[error("invalid interrupt-core state in the snapshot")]
    Interrupts(#[from] irq::backing::snapshot::RestoreError),
    /// The VT-d unit's state is refused.
    #[error("invalid VT-d state in the snapshot")]
    Vtd(#[from] devices::viommu::VtdRestoreError),
    /// A device model's state is refused (the IOAPIC, the UART).
    #[error("invalid {what} state in the snapshot")]
    Device {
        /// Which device.
        what: &'static str,
        /// Why.
        #[source]
        source: devices::restore::RestoreError,
    },
    /// KVM refused an MSR value.
    #[error("vCPU {index}: KVM refused the value of MSR {msr:#x}")]
    Msr {
        /// The vCPU.
        index: u32,
        /// The MSR.
        msr: u32,
    },
}

fn invalid(why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(why.into())
}

/// The preamble and header of a snapshot in `bytes` (which may go on with RAM): the
/// snapshot, checked on its own, and where RAM starts.
///
/// # Errors
/// Anything but a well-formed header of this format version.
pub fn parse_header(bytes: &[u8]) -> Result<(VmSnapshot, u64), SnapshotError> {
    let preamble: &[u8; PREAMBLE] = bytes
        .get(..PREAMBLE)
        .and_then(|p| p.try_into().ok())
        .ok_or(SnapshotError::NotASnapshot)?;
    let (magic, rest) = preamble.split_at(8);
    if magic != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let word = |at: std::ops::Range<usize>| rest.get(at).unwrap_or_default();
    let version = u32::from_le_bytes(word(0..4).try_into().unwrap_or_default());
    if !(OLDEST_READ..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::Version(version));
    }
    let length = u64::from_le_bytes(word(8..16).try_into().unwrap_or_default());
    if length > MAX_HEADER {
        return Err(SnapshotError::Header(format!(
            "{length} bytes long (at most {MAX_HEADER})"
        )));
    }
    let end = PREAMBLE + usize::try_from(length).unwrap_or(usize::MAX);
    let header = bytes.get(PREAMBLE..end).ok_or_else(|| {
        SnapshotError::Header(format!("{length} bytes long, but the file ends before"))
    })?;
    let snap: VmSnapshot =
        serde_json::from_slice(header).map_err(|e| SnapshotError::Header(e.to_string()))?;
    snap.check_shape()?;
    Ok((snap, end as u64))
}

impl VmSnapshot {
    /// The machine these settings make, checked as a config file's.
    ///
    /// # Errors
    /// [`SnapshotError::Machine`].
    pub fn machine_config(&self) -> Result<MachineConfig, SnapshotError> {
        self.machine
            .clone()
            .resolve()
            .map_err(SnapshotError::Machine)
    }

    /// What can be checked without KVM: the machine, counts, and cross references.
    fn check_shape(&self) -> Result<(), SnapshotError> {
        let config = self.machine_config()?;
        if self.vcpus.len() != config.cpus as usize {
            return Err(invalid(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                config.cpus
            )));
        }
        if let Some(v) = self.vcpus.iter().position(|v| v.msrs.len() > MAX_MSRS) {
            return Err(invalid(format!("vCPU {v} lists more than {MAX_MSRS} MSRs")));
        }
        if self.pci.devices.len() != config.devices.len() {
            return Err(invalid(format!(
                "{} device states for {} devices",
                self.pci.devices.len(),
                config.devices.len()
            )));
        }
        let io = &self.vm.ioapic;
        if io.entries.len() != devices::ioapic::PINS || io.lines.len() != devices::ioapic::PINS {
            return Err(invalid(format!(
                "an IOAPIC with {} entries and {} lines (it has {})",
                io.entries.len(),
                io.lines.len(),
                devices::ioapic::PINS
            )));
        }
        if self.image_end >= crate::memory::low_ram_end(config.memory) {
            return Err(invalid("the image ends beyond low RAM"));
        }
        Ok(())
    }
}

/// A snapshot file positioned at its RAM, and how RAM is laid out there.
#[derive(Debug)]
pub struct RamFile {
    /// The file.
    pub file: File,
    /// Its RAM's layout (format 3: the page map, read already).
    pub layout: RamLayout,
}

/// Reads the header of the snapshot at `path` (and, format 3, its page map) and checks the
/// file's length; returns the snapshot, the machine it describes, and the file positioned
/// at guest RAM (for [`load_memory`]).
///
/// # Errors
/// Anything [`parse_header`] refuses, a machine that does not resolve, a page map that
/// marks pages beyond RAM, a length that is not header plus RAM, or the file's error.
pub fn read(path: &Path) -> Result<(VmSnapshot, MachineConfig, RamFile), SnapshotError> {
    let failed = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(failed)?;
    let size = file.metadata().map_err(failed)?.len();
    let mut preamble = [0u8; PREAMBLE];
    file.read_exact(&mut preamble).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SnapshotError::NotASnapshot
        } else {
            failed(e)
        }
    })?;
    // The header's length is checked against the file before it is read.
    let length = preamble
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let mut bytes = preamble.to_vec();
    if preamble.starts_with(&MAGIC) && length <= MAX_HEADER && length <= size {
        let mut header = vec![0u8; usize::try_from(length).unwrap_or(0)];
        file.read_exact(&mut header).map_err(failed)?;
        bytes.extend_from_slice(&header);
    }
    let (snap, ram_at) = parse_header(&bytes)?;
    let config = snap.machine_config()?;
    let version = preamble
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes);
    let (layout, expected) = if version == OLDEST_READ {
        (RamLayout::Whole, ram_at.saturating_add(config.memory))
    } else {
        let map_len = ram::map_len(config.memory);
        if ram_at.saturating_add(map_len) > size {
            return Err(SnapshotError::Length {
                expected: ram_at.saturating_add(map_len),
                found: size,
            });
        }
        let map = ram::read_map(&mut file, path, config.memory)?;
        let pages = ram::marked_pages(&map).saturating_mul(ram::PAGE);
        let expected = ram_at.saturating_add(map_len).saturating_add(pages);
        (RamLayout::Pages(map), expected)
    };
    if size != expected {
        return Err(SnapshotError::Length {
            expected,
            found: size,
        });
    }
    Ok((snap, config, RamFile { file, layout }))
}

/// Fills guest RAM (fresh, all zero) from `ram` (positioned by [`read`]).
///
/// # Errors
/// The file's error (a file shorter than RAM).
pub fn load_memory(
    ram: &mut RamFile,
    path: &Path,
    mem: &GuestMemoryMmap,
    size: u64,
) -> Result<(), SnapshotError> {
    let failed = |e: String| SnapshotError::Read {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    };
    match &ram.layout {
        RamLayout::Whole => {
            for (start, len) in crate::memory::ram_ranges(size) {
                let len = usize::try_from(len).map_err(|_| invalid("a RAM range beyond memory"))?;
                mem.read_exact_volatile_from(start, &mut ram.file, len)
                    .map_err(|e| failed(e.to_string()))?;
            }
        }
        RamLayout::Pages(map) => {
            ram::read_pages(mem, size, map, &mut ram.file).map_err(|e| failed(e.to_string()))?;
        }
    }
    Ok(())
}

/// A snapshot written but not yet durable: its file is `path` with `.partial` appended,
/// its data handed to the kernel. [`Unsynced::finish`] flushes it to disk and renames it
/// to `path`, which the VM need not be paused for (RAM is copied already). Dropped
/// unfinished, the partial file is removed.
#[derive(Debug)]
pub struct Unsynced {
    file: Option<File>,
    partial: PathBuf,
    path: PathBuf,
    /// The bytes written.
    pub bytes: u64,
}

impl Unsynced {
    /// Flushes the file to disk and renames it over its path. Returns the bytes written.
    ///
    /// # Errors
    /// The file system's error; no partial file is left then.
    pub fn finish(mut self) -> Result<u64, SnapshotError> {
        // Taken: once renamed there is no partial file for the drop to remove.
        let Some(file) = self.file.take() else {
            return Ok(self.bytes);
        };
        let result = file
            .sync_all()
            .and_then(|()| std::fs::rename(&self.partial, &self.path));
        if let Err(source) = result {
            let _ = std::fs::remove_file(&self.partial);
            return Err(SnapshotError::Write {
                path: self.path.clone(),
                source,
            });
        }
        Ok(self.bytes)
    }
}

impl Drop for Unsynced {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// A snapshot file assembled in memory at most this large: the VM's pause then ends
/// before any file is written. A larger one is written while the VM stays paused, so what a
/// snapshot holds in memory is bounded.
pub const MAX_STAGED: u64 = 256 << 20;

/// A paused VM's snapshot, ready to be written: its state, the page map of its RAM, and,
/// when the file is at most [`MAX_STAGED`], a copy of the pages the map marks (then
/// writing it reads no guest RAM, and the VM may run meanwhile).
#[derive(Debug)]
pub struct Captured {
    snap: Box<VmSnapshot>,
    map: Vec<u8>,
    pages: Option<Vec<u8>>,
}

impl Captured {
    /// Whether the pages were copied: writing the file no longer needs the VM paused.
    #[must_use]
    pub fn is_staged(&self) -> bool {
        self.pages.is_some()
    }

    /// Writes the snapshot to `path` with `.partial` appended, which
    /// [`Unsynced::finish`] then flushes and renames over `path`. RAM comes from the copy
    /// if there is one, otherwise from `mem` (`size` bytes), which must still be paused.
    ///
    /// # Errors
    /// The file system's error; no partial file is left at `path`.
    pub fn write(
        &self,
        path: &Path,
        mem: &GuestMemoryMmap,
        size: u64,
    ) -> Result<Unsynced, SnapshotError> {
        let failed = |source| SnapshotError::Write {
            path: path.to_path_buf(),
            source,
        };
        let header = serde_json::to_vec(&*self.snap).map_err(|e| failed(io::Error::other(e)))?;
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let result = (|| -> io::Result<File> {
            let mut file = File::create(&partial)?;
            let mut preamble = Vec::with_capacity(PREAMBLE);
            preamble.extend_from_slice(&MAGIC);
            preamble.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            preamble.extend_from_slice(&0u32.to_le_bytes());
            preamble.extend_from_slice(&(header.len() as u64).to_le_bytes());
            file.write_all(&preamble)?;
            file.write_all(&header)?;
            file.write_all(&self.map)?;
            match &self.pages {
                Some(pages) => file.write_all(pages)?,
                None => ram::write_pages(mem, size, &self.map, &mut file)?,
            }
            Ok(file)
        })();
        match result {
            Ok(file) => Ok(Unsynced {
                file: Some(file),
                partial,
                path: path.to_path_buf(),
                bytes: (PREAMBLE + header.len() + self.map.len()) as u64
                    + ram::marked_pages(&self.map) * ram::PAGE,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(failed(e))
            }
        }
    }
}

/// Takes a paused VM's snapshot: `snap` and the pages of guest RAM (`size` bytes) that
/// hold anything ([`ram`]), copied when the file will be at most [`MAX_STAGED`].
#[must_use]
pub fn capture(snap: VmSnapshot, mem: &GuestMemoryMmap, size: u64) -> Captured {
    let map = ram::page_map(mem, size);
    let bytes = ram::marked_pages(&map).saturating_mul(ram::PAGE);
    let pages = (bytes.saturating_add(map.len() as u64) <= MAX_STAGED)
        .then(|| ram::copy_pages(mem, size, &map))
        .flatten();
    Captured {
        snap: Box::new(snap),
        map,
        pages,
    }
}

/// Writes `snap` and guest RAM (paused) to `path` ([`capture`], then
/// [`Captured::write`]).
///
/// # Errors
/// As [`Captured::write`].
pub fn write(
    path: &Path,
    snap: VmSnapshot,
    mem: &GuestMemoryMmap,
    size: u64,
) -> Result<Unsynced, SnapshotError> {
    capture(snap, mem, size).write(path, mem, size)
}

/// The clock of `vm`, with the IOAPIC's state.
///
/// # Errors
/// The failing KVM call.
pub fn capture_vm(vm: &VmFd, ioapic: IoApicSnapshot) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        clock: vm
            .get_clock()
            .map_err(|e| SnapshotError::Kvm("read the KVM clock", e))?,
        ioapic,
    })
}

/// Puts `vm`'s clock in `state` (it goes on from the snapshot's value; the IOAPIC is
/// restored with the devices).
///
/// # Errors
/// The failing KVM call (KVM refuses what it cannot take).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| SnapshotError::Kvm("restore the KVM clock", e))
}

/// The state of `vcpu` (index `index`), which is out of `KVM_RUN` with nothing pending.
/// `msr_list` is KVM's list of MSRs to save; those this vCPU cannot read are left out.
///
/// # Errors
/// The failing KVM call.
pub fn capture_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    msr_list: &[u32],
) -> Result<VcpuState, SnapshotError> {
    let fail = |what| {
        move |source| SnapshotError::Vcpu {
            index,
            what,
            source,
        }
    };
    // KVM_GET_MP_STATE first: it may deliver pending INIT/SIPI into the other state.
    let mp_state = vcpu.get_mp_state().map_err(fail("KVM_GET_MP_STATE"))?;
    Ok(VcpuState {
        mp_state,
        regs: vcpu.get_regs().map_err(fail("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(fail("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(fail("KVM_GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(fail("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(fail("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msr_list).map_err(fail("KVM_GET_MSRS"))?,
        events: vcpu
            .get_vcpu_events()
            .map_err(fail("KVM_GET_VCPU_EVENTS"))?,
    })
}

fn msr_batch(indices: &[u32], values: &[(u32, u64)]) -> Result<Msrs, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = if values.is_empty() {
        indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect()
    } else {
        values
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect()
    };
    Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
}

/// Reads every MSR of `list` that KVM can read for this vCPU. KVM stops a batch at the
/// first MSR it cannot read; that one is skipped and the rest read on.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let take = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let (batch, _) = rest.split_at(take);
        let mut msrs = msr_batch(batch, &[])?;
        let read = vcpu.get_msrs(&mut msrs)?;
        out.extend(msrs.as_slice().iter().take(read).map(|e| (e.index, e.data)));
        // All read, or skip the one that stopped the batch.
        let advance = if read < take { read + 1 } else { read };
        rest = rest.get(advance..).unwrap_or_default();
    }
    Ok(out)
}

/// Puts `vcpu` (created with its CPUID set) in `state`.
///
/// # Errors
/// The failing KVM call, or an MSR KVM refuses.
pub fn restore_vcpu(vcpu: &VcpuFd, index: u32, state: &VcpuState) -> Result<(), SnapshotError> {
    let fail = |what| {
        move |source| SnapshotError::Vcpu {
            index,
            what,
            source,
        }
    };
    vcpu.set_mp_state(state.mp_state)
        .map_err(fail("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(fail("KVM_SET_REGS"))?;
    // Before the LAPIC: the APIC base (and x2APIC mode) is in the special registers.
    vcpu.set_sregs(&state.sregs)
        .map_err(fail("KVM_SET_SREGS"))?;
    // SAFETY: this VMM never asks for dynamically enabled XSAVE features
    // (ARCH_REQ_XCOMP_GUEST_PERM), so KVM's XSAVE area for the vCPU fits the 4096 bytes of
    // `kvm_xsave` and the kernel reads no further.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(fail("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(fail("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(fail("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(fail("KVM_SET_LAPIC"))?;
    // After the LAPIC: the TSC deadline only takes in the LAPIC's timer mode.
    for batch in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = msr_batch(&[], batch).map_err(fail("KVM_SET_MSRS"))?;
        let written = vcpu.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
        if let Some(&(msr, _)) = batch.get(written) {
            return Err(SnapshotError::Msr { index, msr });
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(fail("KVM_SET_VCPU_EVENTS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(version: u32, header: &[u8], length: Option<u64>) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&version.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&length.unwrap_or(header.len() as u64).to_le_bytes());
        f.extend_from_slice(header);
        f
    }

    fn refused(bytes: &[u8]) -> String {
        parse_header(bytes).unwrap_err().to_string()
    }

    #[test]
    fn the_preamble_is_checked_before_the_header_is_read() {
        assert!(refused(b"").contains("not a snapshot"));
        assert!(refused(b"IRQVMSN").contains("not a snapshot"));
        assert!(refused(&file(2, b"{}", None)[1..]).contains("not a snapshot"));
        assert!(refused(&file(1, b"{}", None)).contains("version 1"));
        assert!(refused(&file(2, b"{}", Some(MAX_HEADER + 1))).contains("at most"));
        assert!(refused(&file(2, b"{}", Some(3))).contains("file ends before"));
    }

    #[test]
    fn the_fuzz_seed_is_a_valid_header() {
        // The `vm_snapshot` fuzz target grows headers from this seed (mode byte first).
        let seed = include_bytes!("../../fuzz/seeds/vm_snapshot/header");
        let header = seed.get(1..).unwrap_or_default();
        let mut f = file(FORMAT_VERSION, header, None);
        parse_header(&f).unwrap();
        f.truncate(f.len() - 1);
        parse_header(&f).unwrap_err();
    }

    #[test]
    fn a_header_that_is_not_a_whole_snapshot_is_refused() {
        for header in [&b"{}"[..], b"[1,2]", b"\xff\xfe", b"{\"machine\":{}}"] {
            let why = refused(&file(FORMAT_VERSION, header, None));
            assert!(why.starts_with("invalid snapshot header"), "{why}");
        }
    }
}
