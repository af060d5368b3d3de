//! The `touch` scenario: the guest writes `touch_mib` MiB of free RAM (one word in each
//! 4 KiB page, so every page holds something; `touch_mib=0`: all free RAM below the 3 GiB
//! hole), asks the host for a snapshot (harness `SNAPSHOT`), then checks that every page
//! still holds its word: in the VM restored from the snapshot, or in the same VM going on.
//! `vmm bench` times the snapshot's pause, its size and the restore with it.

use core::ptr::{read_volatile, write_volatile};

use hypercall::harness::{request, status as host_status};

use crate::println;
use crate::scenario::harness_request;

/// Where RAM stops being RAM below 4 GiB (the MMIO hole).
const HOLE: u64 = 3 << 30;
const PAGE: u64 = 4096;

/// The word page `p` holds: never zero.
fn word(p: u64) -> u64 {
    0x5a5a_0000_0000_0000 | p
}

pub fn run(free: u64, mem_size: u64, mib: u32) -> bool {
    let end = mem_size.min(HOLE);
    let free = free.next_multiple_of(PAGE);
    let room = end.saturating_sub(free);
    let want = if mib == 0 {
        room
    } else {
        (u64::from(mib) << 20).min(room)
    };
    let pages = want / PAGE;
    for p in 0..pages {
        // SAFETY: free RAM from the boot information, identity-mapped, page `p` of it,
        // below the end of RAM; nothing else uses it.
        unsafe { write_volatile((free + p * PAGE) as *mut u64, word(p)) };
    }
    println!("touch: {} pages from {:#x} written; snapshot", pages, free);
    let (host, _) = harness_request(request::SNAPSHOT, 0, 0, 0);
    if host == host_status::UNAVAILABLE {
        println!("touch: FAIL: the VM has no snapshot file (run with --snapshot FILE)");
        return false;
    }
    let mut changed = 0u64;
    for p in 0..pages {
        // SAFETY: as above.
        if unsafe { read_volatile((free + p * PAGE) as *const u64) } != word(p) {
            changed += 1;
        }
    }
    println!("touch: {} pages checked, {} changed", pages, changed);
    changed == 0
}
