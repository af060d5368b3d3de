//! Booting a Linux bzImage with the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
//! the protected-mode kernel loaded at 1 MiB by linux-loader, the zero page with the setup
//! header, the e820 map, the command line, the ACPI RSDP and an optional initrd, and the
//! bootstrap processor entering at `startup_64` (load address + 0x200) in long mode with
//! `RSI` at the zero page. Application processors wait for INIT/SIPI, as on hardware.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::acpi::{RSDP_ADDR, TABLES_END};
use crate::layout::{CMDLINE_ADDR, CMDLINE_MAX, MMIO_HOLE_END};
use crate::loader::le_at;

/// The zero page (`struct boot_params`); for a PVH boot, the start-info page.
pub const ZERO_PAGE: u64 = 0x7000;
/// A PVH boot's memory map, after the start-info structure.
const PVH_MEMMAP: u64 = ZERO_PAGE + 0x100;
/// A PVH boot's module list (the initrd), after the memory map.
const PVH_MODLIST: u64 = ZERO_PAGE + 0x800;
/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// The GDT the kernel is entered with (boot protocol selectors 0x10 and 0x18).
pub const BOOT_GDT: u64 = 0x500;
/// Where the protected-mode kernel loads (the header's `code32_start`).
const KERNEL_LOAD: u64 = 0x10_0000;
/// Offset of the 64-bit entry point from the load address.
const STARTUP_64: u64 = 0x200;
/// Top of conventional memory below the EBDA.
const LOW_RAM_TOP: u64 = 0x9_fc00;
/// e820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "Loader type: undefined" (a boot loader without an assigned ID).
const LOADER_UNDEFINED: u8 = 0xff;
/// Boot protocol `loadflags`: the kernel may use the heap after the setup code.
const CAN_USE_HEAP: u8 = 0x80;

/// Whether the file at `path` is a bzImage (the setup header's `HdrS` at 0x202).
#[must_use]
pub fn is_bzimage(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut magic, 0x202)
        })
        .is_ok()
        && &magic == b"HdrS"
}

/// The Xen ELF note that carries the PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The most note bytes looked through.
const MAX_NOTES: u64 = 1 << 16;

/// Whether the file at `path` is an ELF kernel with a PVH entry point (a Xen
/// `PHYS32_ENTRY` note), as Linux's `vmlinux` is when built with `CONFIG_PVH`; our own
/// boot-protocol images have none.
#[must_use]
pub fn has_pvh_note(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(file) = File::open(path) else {
        return false;
    };
    let mut ehdr = [0u8; 64];
    if file.read_exact_at(&mut ehdr, 0).is_err() || &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(le_at(&ehdr, 0x20));
    let phentsize = u64::from(u16::from_le_bytes(le_at(&ehdr, 0x36)));
    let phnum = u16::from_le_bytes(le_at(&ehdr, 0x38));
    (0..u64::from(phnum)).any(|i| {
        let mut phdr = [0u8; 56];
        let at = phoff.saturating_add(i.saturating_mul(phentsize));
        if phentsize < 56 || file.read_exact_at(&mut phdr, at).is_err() {
            return false;
        }
        // PT_NOTE: walk its notes.
        if u32::from_le_bytes(le_at(&phdr, 0)) != 4 {
            return false;
        }
        let offset = u64::from_le_bytes(le_at(&phdr, 8));
        let size = u64::from_le_bytes(le_at(&phdr, 0x20)).min(MAX_NOTES);
        let mut notes = vec![0u8; usize::try_from(size).unwrap_or(0)];
        file.read_exact_at(&mut notes, offset).is_ok() && xen_pvh_note(&notes)
    })
}

/// Whether `notes` (an ELF note segment) holds the Xen `PHYS32_ENTRY` note.
fn xen_pvh_note(notes: &[u8]) -> bool {
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = u32::from_le_bytes(le_at(notes, at)) as usize;
        let descsz = u32::from_le_bytes(le_at(notes, at + 4)) as usize;
        let kind = u32::from_le_bytes(le_at(notes, at + 8));
        let name = notes.get(at + 12..at + 12 + namesz).unwrap_or(&[]);
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return true;
        }
        let next = at
            .saturating_add(12)
            .saturating_add(namesz.next_multiple_of(4))
            .saturating_add(descsz.next_multiple_of(4));
        if next <= at {
            return false;
        }
        at = next;
    }
    false
}

/// Why a Linux image could not be loaded.
#[derive(Debug, Error)]
pub enum LinuxError {
    /// The file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the image.
    #[error("not a loadable bzImage")]
    Load(#[source] linux_loader::loader::Error),
    /// The initrd does not fit below the kernel's limit.
    #[error("the initrd ({size} bytes) does not fit in RAM below {limit:#x} above the kernel")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The ELF has no PVH entry point.
    #[error("the ELF kernel has no PVH entry point (a Xen PHYS32_ENTRY note)")]
    NoPvhEntry,
    /// The command line is too long.
    #[error("the command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    Cmdline(usize),
    /// Guest memory could not be written.
    #[error("cannot write the boot parameters")]
    Write,
}

/// A loaded kernel: where the BSP enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxBoot {
    /// `startup_64`, or the PVH entry point.
    pub entry: u64,
    /// The zero page (for `RSI`), or the PVH start-info page (for `RBX`).
    pub zero_page: u64,
    /// The end of the loaded kernel.
    pub kernel_end: u64,
    /// Entered through the PVH entry point: 32-bit protected mode, paging off.
    pub pvh: bool,
}

/// The e820 map of a machine with `memory` bytes of RAM ending low RAM at `low_end`.
#[must_use]
pub fn e820(memory: u64, low_end: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, kind| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, LOW_RAM_TOP, E820_RAM),
        entry(LOW_RAM_TOP, 0xa_0000 - LOW_RAM_TOP, E820_RESERVED),
        // The BIOS area with the ACPI tables.
        entry(RSDP_ADDR, TABLES_END - RSDP_ADDR, E820_RESERVED),
        entry(KERNEL_LOAD, low_end - KERNEL_LOAD, E820_RAM),
    ];
    let high = memory.saturating_sub(low_end);
    if high > 0 {
        map.push(entry(MMIO_HOLE_END, high, E820_RAM));
    }
    map
}

/// Loads the bzImage at `kernel` (and `initrd`) into `mem` of `memory` bytes with low RAM
/// ending at `low_end`, and writes the zero page and command line.
///
/// # Errors
/// [`LinuxError`].
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: u64,
    low_end: u64,
) -> Result<LinuxBoot, LinuxError> {
    fn read(path: &Path) -> impl Fn(std::io::Error) -> LinuxError + '_ {
        move |source| LinuxError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
    let mut file = File::open(kernel).map_err(read(kernel))?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(KERNEL_LOAD)))
        .map_err(LinuxError::Load)?;
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    write_cmdline(mem, cmdline)?;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline.len()).unwrap_or(0);
    params.acpi_rsdp_addr = RSDP_ADDR;
    let map = e820(memory, low_end);
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = e;
    }
    let kernel_end = loaded.kernel_load.0.saturating_add(loaded.kernel_end);
    if let Some(path) = initrd {
        // As high as the kernel allows, above the kernel's own footprint.
        let limit = (u64::from(params.hdr.initrd_addr_max) + 1).min(low_end);
        let footprint = KERNEL_LOAD + u64::from(params.hdr.init_size);
        let (at, size) = load_initrd(mem, path, limit, footprint.max(kernel_end))?;
        params.hdr.ramdisk_image = u32::try_from(at).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|_| LinuxError::Write)?;
    Ok(LinuxBoot {
        entry: loaded.kernel_load.0 + STARTUP_64,
        zero_page: ZERO_PAGE,
        kernel_end,
        pvh: false,
    })
}

/// Writes the command line where both boot paths point.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), LinuxError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(LinuxError::Cmdline(cmdline.len()));
    }
    let mut text = cmdline.as_bytes().to_vec();
    text.push(0);
    mem.write_slice(&text, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| LinuxError::Write)
}

/// Loads the initrd at `path` as high as it fits below `limit`, page-aligned, not below
/// `floor`; returns where and its size.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    limit: u64,
    floor: u64,
) -> Result<(u64, u64), LinuxError> {
    let read = |source| LinuxError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read)?;
    let size = file.metadata().map_err(read)?.len();
    let at = match limit.checked_sub(size).map(|a| a & !0xfff) {
        Some(at) if at >= floor => at,
        _ => return Err(LinuxError::InitrdTooLarge { size, limit }),
    };
    let len = usize::try_from(size).map_err(|_| LinuxError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(at), &mut file, len)
        .map_err(|e| read(std::io::Error::other(e.to_string())))?;
    Ok((at, size))
}

/// Loads the `vmlinux` at `kernel` (an ELF with a PVH entry note) and its `initrd` into
/// `mem` of `memory` bytes with low RAM ending at `low_end`, and writes the PVH start-info
/// page (memory map, command line, ACPI RSDP, the initrd as module 0), as
/// cloud-hypervisor and Firecracker boot an uncompressed kernel.
///
/// # Errors
/// [`LinuxError`]; [`LinuxError::NoPvhEntry`] for an ELF without the note.
pub fn load_pvh(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: u64,
    low_end: u64,
) -> Result<LinuxBoot, LinuxError> {
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    };
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    let mut file = File::open(kernel).map_err(|source| LinuxError::Read {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_LOAD)))
        .map_err(LinuxError::Load)?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(LinuxError::NoPvhEntry);
    };
    write_cmdline(mem, cmdline)?;
    let kernel_end = loaded.kernel_end;
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP,
        ..hvm_start_info::default()
    };
    let map = e820(memory, low_end);
    for (k, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.r#type,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP + 24 * k as u64))
            .map_err(|_| LinuxError::Write)?;
    }
    info.memmap_entries = u32::try_from(map.len()).unwrap_or(0);
    if let Some(path) = initrd {
        let (at, size) = load_initrd(mem, path, low_end, kernel_end)?;
        let module = hvm_modlist_entry {
            paddr: at,
            size,
            ..hvm_modlist_entry::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST))
            .map_err(|_| LinuxError::Write)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(info, GuestAddress(ZERO_PAGE))
        .map_err(|_| LinuxError::Write)?;
    Ok(LinuxBoot {
        entry: entry.0,
        zero_page: ZERO_PAGE,
        kernel_end,
        pvh: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_e820_map_has_low_ram_the_bios_area_and_high_ram() {
        let low_end = 0xc000_0000;
        let map = e820(4 << 30, low_end);
        let plain: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            plain,
            [
                (0, 0x9_fc00, 1),
                (0x9_fc00, 0x400, 2),
                (0xe_0000, 0x2_0000, 2),
                (0x10_0000, low_end - 0x10_0000, 1),
                (1 << 32, (4 << 30) - low_end, 1),
            ]
        );
        assert_eq!(e820(64 << 20, 64 << 20).len(), 4);
    }

    #[test]
    fn only_a_bzimage_is_one() {
        let dir = std::env::temp_dir().join(format!("vmm-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("bz");
        let mut bytes = vec![0u8; 0x300];
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&fake, &bytes).unwrap();
        assert!(is_bzimage(&fake));
        std::fs::write(&fake, b"\x7fELF").unwrap();
        assert!(!is_bzimage(&fake));
        assert!(!is_bzimage(&dir.join("absent")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A 64-bit ELF with one loaded segment (`code` at `paddr`, entered at `paddr`) and a
    /// note segment holding `notes`.
    fn elf_with_notes(paddr: u64, code: &[u8], notes: &[u8]) -> Vec<u8> {
        let phoff = 64usize;
        let data = phoff + 2 * 56;
        let mut f = vec![0u8; data];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes());
        f[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let segment =
            |f: &mut Vec<u8>, at: usize, kind: u32, offset: usize, addr: u64, len: usize| {
                f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
                f[at + 8..at + 16].copy_from_slice(&(offset as u64).to_le_bytes());
                f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
                f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
                f[at + 32..at + 40].copy_from_slice(&(len as u64).to_le_bytes());
                f[at + 40..at + 48].copy_from_slice(&(len as u64).to_le_bytes());
            };
        segment(&mut f, phoff, 1, data, paddr, code.len());
        segment(&mut f, phoff + 56, 4, data + code.len(), 0, notes.len());
        f.extend_from_slice(code);
        f.extend_from_slice(notes);
        f
    }

    /// One ELF note.
    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&u32::try_from(name.len()).unwrap().to_le_bytes());
        n.extend_from_slice(&u32::try_from(desc.len()).unwrap().to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn a_vmlinux_with_a_pvh_note_boots_through_its_start_info_page() {
        let dir = std::env::temp_dir().join(format!("vmm-pvh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        let mut notes = note(b"Xen\0", 6, b"linux\0");
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0040u32.to_le_bytes(),
        ));
        std::fs::write(&kernel, elf_with_notes(0x0100_0000, &[0x90; 64], &notes)).unwrap();
        assert!(has_pvh_note(&kernel));
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 5000]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let boot = load_pvh(
            &mem,
            &kernel,
            Some(&initrd),
            "console=ttyS0",
            64 << 20,
            64 << 20,
        )
        .unwrap();
        assert!(boot.pvh);
        assert_eq!((boot.entry, boot.zero_page), (0x0100_0040, ZERO_PAGE));
        let word = |at: u64| -> u64 { mem.read_obj(GuestAddress(at)).unwrap() };
        let half = |at: u64| -> u32 { mem.read_obj(GuestAddress(at)).unwrap() };
        assert_eq!(half(ZERO_PAGE), PVH_MAGIC);
        assert_eq!(half(ZERO_PAGE + 4), 1, "version 1: the memory map is there");
        assert_eq!(half(ZERO_PAGE + 12), 1, "one module");
        assert_eq!(word(ZERO_PAGE + 24), CMDLINE_ADDR);
        assert_eq!(word(ZERO_PAGE + 32), RSDP_ADDR);
        assert_eq!(word(ZERO_PAGE + 40), PVH_MEMMAP);
        assert_eq!(half(ZERO_PAGE + 48), 4, "the e820 map's entries");
        let module = word(PVH_MODLIST);
        assert_eq!((module % 4096, word(PVH_MODLIST + 8)), (0, 5000));
        assert!(module >= boot.kernel_end, "the initrd above the kernel");
        let mut text = [0u8; 13];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0");
        // Without the note: not PVH, and the loader says so.
        let plain = dir.join("plain");
        std::fs::write(
            &plain,
            elf_with_notes(0x0100_0000, &[0x90; 64], &note(b"GNU\0", 3, &[1; 8])),
        )
        .unwrap();
        assert!(!has_pvh_note(&plain));
        assert!(matches!(
            load_pvh(&mem, &plain, None, "", 64 << 20, 64 << 20),
            Err(LinuxError::NoPvhEntry)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn note_walks_end_on_malformed_notes() {
        // A note whose sizes run past the segment, and one whose sizes wrap.
        let mut bad = note(b"Xen\0", 6, b"x");
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!xen_pvh_note(&bad));
        let mut wrap = vec![0u8; 12];
        wrap[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!xen_pvh_note(&wrap));
        assert!(!xen_pvh_note(&[1, 2, 3]));
        assert!(xen_pvh_note(&note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &[0; 4]
        )));
    }
}
