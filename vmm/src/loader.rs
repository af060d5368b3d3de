//! Loading the guest's ELF image (linux-loader does the copying).
//!
//! Before linux-loader writes anything, the program headers are checked here: every
//! loadable segment must lie in low RAM above the VMM's boot structures, and the end of
//! the image is taken from the segments' memory sizes (so a segment that is all `.bss`
//! still counts, which linux-loader's `kernel_end` does not).

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::layout::BOOT_STRUCTURES_END;

/// Why the image could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// Reading the image failed.
    #[error("cannot read the image")]
    Read(#[source] std::io::Error),
    /// The image is not a 64-bit little-endian x86-64 ELF executable.
    #[error("not an x86-64 ELF executable")]
    NotElf,
    /// The program headers are malformed.
    #[error("malformed program headers")]
    BadProgramHeaders,
    /// The image has nothing to load.
    #[error("no loadable segment")]
    NoSegments,
    /// A segment lies outside the RAM an image may use.
    #[error("segment [{start:#x}, {end:#x}) lies outside [{low:#x}, {high:#x}), the RAM an image may use")]
    SegmentOutsideRam {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// Lowest usable address.
        low: u64,
        /// End of low RAM.
        high: u64,
    },
    /// The entry point is not inside a loaded segment.
    #[error("entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    /// linux-loader refused the image.
    #[error("ELF loading failed")]
    Elf(#[source] linux_loader::loader::Error),
}

/// What was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point.
    pub entry: u64,
    /// First byte past the highest segment (memory size, so `.bss` included).
    pub end: u64,
}

const PT_LOAD: u32 = 1;

/// The little-endian value of the `N` bytes at `at` (0 beyond `b`: callers check sizes).
pub(crate) fn le_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..at.saturating_add(N))
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(le_at(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(le_at(b, at))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(le_at(b, at))
}

/// Checks the headers of `image`: returns the entry and the loadable segments' ranges.
fn inspect<F: Read + Seek>(image: &mut F) -> Result<(u64, Vec<(u64, u64)>), LoadError> {
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0)).map_err(LoadError::Read)?;
    image.read_exact(&mut ehdr).map_err(|_| LoadError::NotElf)?;
    // Magic, 64-bit, little-endian, executable, x86-64.
    if ehdr[..4] != *b"\x7fELF"
        || ehdr[4] != 2
        || ehdr[5] != 1
        || u16_at(&ehdr, 16) != 2
        || u16_at(&ehdr, 18) != 62
    {
        return Err(LoadError::NotElf);
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = u16_at(&ehdr, 56);
    if phentsize < 56 {
        return Err(LoadError::BadProgramHeaders);
    }
    let mut segments = Vec::new();
    let mut phdr = vec![0u8; phentsize];
    for i in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(i * phentsize as u64)
            .ok_or(LoadError::BadProgramHeaders)?;
        image.seek(SeekFrom::Start(at)).map_err(LoadError::Read)?;
        image
            .read_exact(&mut phdr)
            .map_err(|_| LoadError::BadProgramHeaders)?;
        if u32_at(&phdr, 0) != PT_LOAD {
            continue;
        }
        let (paddr, filesz, memsz) = (u64_at(&phdr, 24), u64_at(&phdr, 32), u64_at(&phdr, 40));
        if filesz > memsz {
            return Err(LoadError::BadProgramHeaders);
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or(LoadError::BadProgramHeaders)?;
        segments.push((paddr, end));
    }
    Ok((entry, segments))
}

/// Loads `image` into `mem`, whose low RAM ends at `low_ram_end`.
///
/// # Errors
/// Any [`LoadError`]; nothing has been written when the headers are refused.
pub fn load<F>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    low_ram_end: u64,
) -> Result<LoadedImage, LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let (entry, segments) = inspect(image)?;
    if segments.is_empty() {
        return Err(LoadError::NoSegments);
    }
    for &(start, end) in &segments {
        if start < BOOT_STRUCTURES_END || end > low_ram_end {
            return Err(LoadError::SegmentOutsideRam {
                start,
                end,
                low: BOOT_STRUCTURES_END,
                high: low_ram_end,
            });
        }
    }
    if !segments
        .iter()
        .any(|&(start, end)| (start..end).contains(&entry))
    {
        return Err(LoadError::BadEntry(entry));
    }
    Elf::load(mem, None, image, Some(GuestAddress(BOOT_STRUCTURES_END))).map_err(LoadError::Elf)?;
    let end = segments.iter().map(|&(_, end)| end).max().unwrap_or(entry);
    Ok(LoadedImage { entry, end })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use vm_memory::Bytes;

    use super::*;

    /// A minimal ELF: one PT_LOAD of `code` at `paddr` with `bss` extra bytes.
    fn elf(paddr: u64, entry: u64, code: &[u8], bss: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x78];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn loads_segments_and_counts_bss_in_the_end() {
        let mem = memory();
        let image = elf(0x20_0000, 0x20_0001, &[0xf4, 0x90, 0xcc], 0x1000);
        let loaded = load(&mem, &mut Cursor::new(image), 4 << 20).unwrap();
        assert_eq!(
            loaded,
            LoadedImage {
                entry: 0x20_0001,
                end: 0x20_1003
            }
        );
        let mut code = [0u8; 3];
        mem.read_slice(&mut code, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(code, [0xf4, 0x90, 0xcc]);
    }

    #[test]
    fn refuses_what_is_not_an_elf() {
        let err = load(
            &memory(),
            &mut Cursor::new(b"#!/bin/sh\n".to_vec()),
            4 << 20,
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::NotElf), "{err:?}");
        let err = load(&memory(), &mut Cursor::new(Vec::new()), 4 << 20).unwrap_err();
        assert!(matches!(err, LoadError::NotElf), "{err:?}");
    }

    #[test]
    fn refuses_segments_over_boot_structures_or_past_ram() {
        let mem = memory();
        let low = elf(0x1000, 0x1000, &[0x90], 0);
        assert!(matches!(
            load(&mem, &mut Cursor::new(low), 4 << 20),
            Err(LoadError::SegmentOutsideRam { start: 0x1000, .. })
        ));
        let high = elf(0x3f_f000, 0x3f_f000, &[0x90], 0x2000);
        assert!(matches!(
            load(&mem, &mut Cursor::new(high), 4 << 20),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn refuses_an_entry_outside_the_image_and_truncated_headers() {
        let mem = memory();
        let bad_entry = elf(0x20_0000, 0x30_0000, &[0x90], 0);
        assert!(matches!(
            load(&mem, &mut Cursor::new(bad_entry), 4 << 20),
            Err(LoadError::BadEntry(0x30_0000))
        ));
        let mut truncated = elf(0x20_0000, 0x20_0000, &[0x90], 0);
        truncated.truncate(80);
        assert!(matches!(
            load(&mem, &mut Cursor::new(truncated), 4 << 20),
            Err(LoadError::BadProgramHeaders)
        ));
    }
}
