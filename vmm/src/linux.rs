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

/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
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
    /// `startup_64`.
    pub entry: u64,
    /// The zero page (for `RSI`).
    pub zero_page: u64,
    /// The end of the loaded kernel.
    pub kernel_end: u64,
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
    if cmdline.len() > CMDLINE_MAX {
        return Err(LinuxError::Cmdline(cmdline.len()));
    }
    let mut text = cmdline.as_bytes().to_vec();
    text.push(0);
    mem.write_slice(&text, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| LinuxError::Write)?;
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
        let mut file = File::open(path).map_err(read(path))?;
        let size = file.metadata().map_err(read(path))?.len();
        // As high as the kernel allows, page-aligned, above the kernel's own footprint.
        let limit = (u64::from(params.hdr.initrd_addr_max) + 1).min(low_end);
        let footprint = KERNEL_LOAD + u64::from(params.hdr.init_size);
        let at = limit.checked_sub(size).map(|a| a & !0xfff);
        let at = match at {
            Some(at) if at >= footprint.max(kernel_end) => at,
            _ => return Err(LinuxError::InitrdTooLarge { size, limit }),
        };
        let len = usize::try_from(size).map_err(|_| LinuxError::InitrdTooLarge { size, limit })?;
        mem.read_exact_volatile_from(GuestAddress(at), &mut file, len)
            .map_err(|e| LinuxError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
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
}
