//! Guest RAM in a snapshot file (format 3): a page map, then the pages it marks, in order.
//!
//! A page is left out when the host never backed it (`mincore`: neither the guest nor the
//! VMM ever touched it, so it is still the zero page of a fresh anonymous mapping) or when
//! it holds only zeros. Restore reads the marked pages into a fresh mapping and leaves the
//! others alone: they read as zero, and cost nothing until touched. So a snapshot's size,
//! the pause to write it and the time to read it back follow what the guest wrote, not the
//! size of its RAM. Format 2 (all of RAM, in order) is still read.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    VolatileMemory,
};

use super::SnapshotError;
use crate::memory::ram_ranges;

/// The page size of the page map.
pub const PAGE: u64 = 4096;
/// The same, as a buffer length.
const PAGE_BYTES: usize = 4096;

/// How guest RAM follows the header in a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamLayout {
    /// Format 2: every byte of RAM, in order.
    Whole,
    /// Format 3: the page map (bit `i % 8` of byte `i / 8` set when page `i` is in the
    /// file), then those pages.
    Pages(Vec<u8>),
}

/// Pages of `size` bytes of RAM (a multiple of [`PAGE`]).
#[must_use]
pub fn page_count(size: u64) -> u64 {
    size.div_ceil(PAGE)
}

/// Bytes of the page map of `size` bytes of RAM.
#[must_use]
pub fn map_len(size: u64) -> u64 {
    page_count(size).div_ceil(8)
}

fn marked(map: &[u8], page: u64) -> bool {
    usize::try_from(page / 8)
        .ok()
        .and_then(|i| map.get(i))
        .is_some_and(|b| b & (1 << (page % 8)) != 0)
}

/// Which pages of `len` bytes of RAM at `start` the host backs: one byte per page, bit 0
/// set when resident (`mincore`). Where the kernel cannot say, every page counts as
/// resident (and is then checked for zeros).
fn resident(mem: &GuestMemoryMmap, start: GuestAddress, len: u64) -> Vec<u8> {
    let pages = usize::try_from(len.div_ceil(PAGE)).unwrap_or(0);
    let mut vec = vec![1u8; pages];
    let whole = mem
        .find_region(start)
        .is_some_and(|r| r.start_addr() == start && r.len() >= len);
    let (Ok(host), Ok(bytes), true) = (mem.get_host_address(start), usize::try_from(len), whole)
    else {
        return vec;
    };
    // SAFETY: `host..host + bytes` lies in one mapping of this process (the region that
    // starts at `start`, checked above), page aligned as every region is; mincore only
    // reads its page tables and writes one byte per page into `vec`, which has that many.
    let rc = unsafe { libc::mincore(host.cast(), bytes, vec.as_mut_ptr()) };
    if rc != 0 {
        vec.fill(1);
    }
    vec
}

/// Whether the page at `at` holds a non-zero byte: read in place, word by word, up to the
/// first non-zero one (a page that cannot be read counts as holding something).
fn holds_anything(mem: &GuestMemoryMmap, at: GuestAddress) -> bool {
    let Ok(slice) = mem.get_slice(at, PAGE_BYTES) else {
        return true;
    };
    let Ok(words) = slice.get_array_ref::<u64>(0, PAGE_BYTES / 8) else {
        return true;
    };
    (0..words.len()).any(|i| words.load(i) != 0)
}

/// The page map of guest RAM (`size` bytes): the pages that hold anything (resident and
/// not all zeros). The VM must be paused.
#[must_use]
pub fn page_map(mem: &GuestMemoryMmap, size: u64) -> Vec<u8> {
    let mut map = vec![0u8; usize::try_from(map_len(size)).unwrap_or(0)];
    let mut page = 0u64;
    for (start, len) in ram_ranges(size) {
        for (k, state) in (0u64..).zip(resident(mem, start, len)) {
            let held = state & 1 != 0 && holds_anything(mem, start.unchecked_add(k * PAGE));
            if held {
                if let Some(b) = usize::try_from(page / 8).ok().and_then(|i| map.get_mut(i)) {
                    *b |= 1 << (page % 8);
                }
            }
            page += 1;
        }
    }
    map
}

/// Pages marked in `map`.
#[must_use]
pub fn marked_pages(map: &[u8]) -> u64 {
    map.iter().map(|b| u64::from(b.count_ones())).sum()
}

/// Runs of marked pages, each as (guest address, bytes), in file order.
fn runs(map: &[u8], size: u64) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    let mut page = 0u64;
    for (start, len) in ram_ranges(size) {
        let pages = len.div_ceil(PAGE);
        let mut k = 0;
        while k < pages {
            if !marked(map, page + k) {
                k += 1;
                continue;
            }
            let first = k;
            while k < pages && marked(map, page + k) {
                k += 1;
            }
            let bytes = ((k - first) * PAGE).min(len - first * PAGE);
            out.push((
                start.unchecked_add(first * PAGE),
                usize::try_from(bytes).unwrap_or(0),
            ));
        }
        page += pages;
    }
    out
}

/// The pages `map` marks, copied out of guest RAM in order (`None` if one cannot be read:
/// then they are written from RAM itself).
#[must_use]
pub fn copy_pages(mem: &GuestMemoryMmap, size: u64, map: &[u8]) -> Option<Vec<u8>> {
    let bytes = usize::try_from(marked_pages(map).saturating_mul(PAGE)).ok()?;
    let mut pages = vec![0u8; bytes];
    let mut at = 0;
    for (from, len) in runs(map, size) {
        mem.read_slice(pages.get_mut(at..at + len)?, from).ok()?;
        at += len;
    }
    Some(pages)
}

/// Writes the pages `map` marks to `out`, in order.
///
/// # Errors
/// The file's error.
pub fn write_pages(mem: &GuestMemoryMmap, size: u64, map: &[u8], out: &mut File) -> io::Result<()> {
    for (at, bytes) in runs(map, size) {
        mem.write_all_volatile_to(at, out, bytes)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Reads the pages `map` marks from `file` into guest RAM (fresh: the other pages stay
/// as they are, zero).
///
/// # Errors
/// The file's error (a file shorter than its map says).
pub fn read_pages(mem: &GuestMemoryMmap, size: u64, map: &[u8], file: &mut File) -> io::Result<()> {
    for (at, bytes) in runs(map, size) {
        mem.read_exact_volatile_from(at, file, bytes)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Reads the page map of `size` bytes of RAM from `file` (the snapshot at `path`), and
/// checks that it marks no page beyond RAM.
///
/// # Errors
/// [`SnapshotError::Read`], or [`SnapshotError::Invalid`] for a page beyond RAM.
pub fn read_map(file: &mut File, path: &Path, size: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut map = vec![0u8; usize::try_from(map_len(size)).unwrap_or(0)];
    file.read_exact(&mut map)
        .map_err(|source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let pages = page_count(size);
    if (pages..map_len(size) * 8).any(|p| marked(&map, p)) {
        return Err(SnapshotError::Invalid(format!(
            "its page map marks pages beyond the {pages} of RAM"
        )));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
            .into_iter()
            .map(|(a, l)| (a, usize::try_from(l).unwrap()))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn only_pages_that_hold_something_are_marked_and_they_come_back() {
        let size = 4 << 20;
        let mem = ram(size);
        // Written, written then zeroed, read only, and a run of three.
        mem.write_obj(0xabu8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xcdu8, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0u8, GuestAddress(0x3000)).unwrap();
        let _: u64 = mem.read_obj(GuestAddress(0x5000)).unwrap();
        for page in 10..13u64 {
            mem.write_obj(page, GuestAddress(page * PAGE + 8)).unwrap();
        }
        let map = page_map(&mem, size);
        let marked: Vec<u64> = (0..page_count(size)).filter(|&p| marked(&map, p)).collect();
        assert_eq!(marked, [1, 10, 11, 12]);
        assert_eq!(marked_pages(&map), 4);
        assert_eq!(runs(&map, size).len(), 2, "pages 10-12 go in one write");

        let path = std::env::temp_dir().join(format!("vmm-ram-{}.test", std::process::id()));
        let mut out = File::create(&path).unwrap();
        write_pages(&mem, size, &map, &mut out).unwrap();
        assert_eq!(out.metadata().unwrap().len(), 4 * PAGE);
        let fresh = ram(size);
        read_pages(&fresh, size, &map, &mut File::open(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        for page in 0..page_count(size) {
            let mut a = [0u8; PAGE_BYTES];
            let mut b = [0u8; PAGE_BYTES];
            mem.read_slice(&mut a, GuestAddress(page * PAGE)).unwrap();
            fresh.read_slice(&mut b, GuestAddress(page * PAGE)).unwrap();
            assert_eq!(a, b, "page {page}");
        }
    }

    #[test]
    fn a_map_that_marks_pages_beyond_ram_is_refused() {
        // 4 MiB + 12 KiB: 1027 pages, a map of 129 bytes whose last 5 bits are beyond.
        let size = (4 << 20) + 3 * PAGE;
        let path = std::env::temp_dir().join(format!("vmm-map-{}.test", std::process::id()));
        let mut map = vec![0u8; usize::try_from(map_len(size)).unwrap()];
        *map.last_mut().unwrap() = 0x80;
        std::fs::write(&path, &map).unwrap();
        let refused = read_map(&mut File::open(&path).unwrap(), &path, size);
        let _ = std::fs::remove_file(&path);
        assert!(matches!(refused, Err(SnapshotError::Invalid(why)) if why.contains("beyond")));
    }
}
