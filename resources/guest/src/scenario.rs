//! The scenarios the BSP runs once every CPU has checked in.

use core::sync::atomic::{AtomicBool, Ordering};

use hypercall::boot::BootInfoView;
use hypercall::harness::{self, offset, request, status};
use hypercall::platform::{HARNESS_PORT, HARNESS_SIGNATURE};

use crate::arch;
use crate::{code, count, exit, mailbox_cell, println, APIC_ID_MISMATCHES, CHECKED_IN};

/// Vector of the IPIs in `smoke`.
const IPI_VECTOR: u8 = 0x40;
/// Vector of the MSIs in `msi`.
const MSI_VECTOR: u8 = 0x50;
/// MSIs fired at each CPU in `msi` unless `msi_count=` says otherwise.
const DEFAULT_MSI_COUNT: u32 = 50;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Smoke,
    Msi,
    All,
    Fail,
    Hang,
}

struct Options {
    scenario: Scenario,
    msi_count: u32,
    /// `apic=xapic` keeps the LAPIC in xAPIC (MMIO) mode even when x2APIC is offered.
    xapic: bool,
}

fn parse_cmdline(info: &BootInfoView<'_>) -> Result<Options, &'static str> {
    let (addr, len) = info.cmdline();
    let len = len.min(4096) as usize;
    let bytes = if addr == 0 {
        &[][..]
    } else {
        // SAFETY: the VMM wrote `len` bytes of command line at `addr`, identity-mapped.
        unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
    };
    let text = core::str::from_utf8(bytes).map_err(|_| "command line is not UTF-8")?;
    let mut options = Options {
        scenario: Scenario::All,
        msi_count: DEFAULT_MSI_COUNT,
        xapic: false,
    };
    for word in text.split_ascii_whitespace() {
        if let Some(name) = word.strip_prefix("scenario=") {
            options.scenario = match name {
                "smoke" => Scenario::Smoke,
                "msi" => Scenario::Msi,
                "all" => Scenario::All,
                "fail" => Scenario::Fail,
                "hang" => Scenario::Hang,
                _ => return Err("unknown scenario (smoke, msi, all, fail, hang)"),
            };
        } else if let Some(mode) = word.strip_prefix("apic=") {
            options.xapic = match mode {
                "xapic" => true,
                "auto" => false,
                _ => return Err("unknown apic mode (xapic, auto)"),
            };
        } else if let Some(n) = word.strip_prefix("msi_count=") {
            options.msi_count = n.parse().map_err(|_| "msi_count is not a number")?;
        }
    }
    Ok(options)
}

fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        core::hint::spin_loop();
    }
}

/// Reads the command line (on the BSP, before any CPU enables its LAPIC) and decides the
/// APIC mode every CPU uses.
pub fn configure(info: &BootInfoView<'_>) {
    match parse_cmdline(info) {
        Ok(options) => USE_X2APIC.store(arch::has_x2apic() && !options.xapic, Ordering::Relaxed),
        Err(why) => {
            println!("test-guest: bad command line: {}", why);
            exit(code::BAD_CMDLINE)
        }
    }
}

static USE_X2APIC: AtomicBool = AtomicBool::new(false);

/// The APIC mode chosen by [`configure`].
pub fn use_x2apic() -> bool {
    USE_X2APIC.load(Ordering::Relaxed)
}

/// Runs the chosen scenario on the BSP and exits with the verdict.
pub fn run_bsp(info: &BootInfoView<'_>) -> ! {
    let cpus = info.cpu_count();
    let Ok(options) = parse_cmdline(info) else {
        exit(code::BAD_CMDLINE)
    };
    let mode = if use_x2apic() { "x2APIC" } else { "xAPIC" };
    println!(
        "test-guest: {} vCPUs, {} MiB, {}",
        cpus,
        info.mem_size() >> 20,
        mode
    );
    wait_until(|| CHECKED_IN.load(Ordering::Acquire) as usize == cpus);
    println!("all {} vCPUs checked in", cpus);

    let mut expected_ipi = 0;
    let mut expected_msi = 0;
    let mut ok = APIC_ID_MISMATCHES.load(Ordering::Relaxed) == 0;
    if !ok {
        println!("FAIL: a CPU's APIC ID differs from the boot information");
    }
    match options.scenario {
        Scenario::Fail => {
            println!("scenario fail: reporting failure on purpose");
            exit(code::FAIL_ON_PURPOSE)
        }
        Scenario::Hang => {
            println!("scenario hang: halting forever on purpose");
            arch::stop()
        }
        Scenario::Smoke | Scenario::Msi | Scenario::All => {}
    }
    if matches!(options.scenario, Scenario::Smoke | Scenario::All) {
        ok &= smoke(info);
        expected_ipi = 1;
    }
    if matches!(options.scenario, Scenario::Msi | Scenario::All) {
        ok &= msi(info, options.msi_count);
        expected_msi = options.msi_count;
    }
    ok &= no_strays(cpus, expected_ipi, expected_msi);
    for cpu in 0..cpus {
        println!(
            "cpu {}: ipi {} msi {}",
            cpu,
            count(cpu, IPI_VECTOR),
            count(cpu, MSI_VECTOR)
        );
    }
    if ok {
        println!("verdict: PASS");
        exit(code::PASS)
    }
    println!("verdict: FAIL");
    exit(code::CHECK_FAILED)
}

/// The BSP sends one IPI to every CPU (itself included) and each must count exactly one.
fn smoke(info: &BootInfoView<'_>) -> bool {
    let cpus = info.cpu_count();
    for cpu in 0..cpus {
        let Some(apic_id) = info.apic_id(cpu) else {
            return false;
        };
        arch::send_ipi(apic_id, IPI_VECTOR);
        wait_until(|| count(cpu, IPI_VECTOR) >= 1);
    }
    let ok = (0..cpus).all(|cpu| count(cpu, IPI_VECTOR) == 1);
    println!(
        "smoke: {} IPIs sent, {}",
        cpus,
        if ok { "each counted once" } else { "FAIL" }
    );
    ok
}

/// Asks the host to fire `n` MSIs at every CPU through a KVM MSI route + irqfd each, and
/// checks that each CPU counted exactly what the host fired at it.
fn msi(info: &BootInfoView<'_>, n: u32) -> bool {
    let cpus = info.cpu_count();
    if arch::inl(HARNESS_PORT) != HARNESS_SIGNATURE {
        println!("msi: FAIL: no test harness on port {:#x}", HARNESS_PORT);
        return false;
    }
    mailbox_cell(offset::REQUEST).store(request::FIRE_MSI_EACH_CPU, Ordering::Relaxed);
    mailbox_cell(offset::ARG_VECTOR).store(u32::from(MSI_VECTOR), Ordering::Relaxed);
    mailbox_cell(offset::ARG_COUNT).store(n, Ordering::Relaxed);
    let seq = mailbox_cell(offset::REQUEST_SEQ)
        .load(Ordering::Relaxed)
        .wrapping_add(1);
    mailbox_cell(offset::REQUEST_SEQ).store(seq, Ordering::Release);
    arch::outl(HARNESS_PORT, seq);
    wait_until(|| mailbox_cell(offset::DONE_SEQ).load(Ordering::Acquire) == seq);
    let host_status = mailbox_cell(offset::STATUS).load(Ordering::Acquire);
    let mut ok = host_status == status::OK;
    if !ok {
        println!("msi: FAIL: host status {}", host_status);
    }
    for cpu in 0..cpus {
        let fired = mailbox_cell(offset::FIRED + 4 * cpu).load(Ordering::Acquire);
        let got = count(cpu, MSI_VECTOR);
        if fired != n || got != fired {
            println!(
                "msi: FAIL: cpu {} expected {} fired {} counted {}",
                cpu, n, fired, got
            );
            ok = false;
        }
    }
    if ok {
        println!(
            "msi: {} MSIs per vCPU fired and counted on the right vCPU",
            n
        );
    }
    ok
}

/// No CPU may have counted an interrupt on any vector the scenarios did not use.
fn no_strays(cpus: usize, expected_ipi: u32, expected_msi: u32) -> bool {
    let mut ok = true;
    for cpu in 0..cpus {
        for vector in 32..=255u8 {
            let expected = match vector {
                IPI_VECTOR => expected_ipi,
                MSI_VECTOR => expected_msi,
                _ => 0,
            };
            let got = count(cpu, vector);
            if got != expected {
                println!(
                    "FAIL: cpu {} vector {:#x}: counted {}, expected {}",
                    cpu, vector, got, expected
                );
                ok = false;
            }
        }
    }
    let _ = harness::MAX_COUNT;
    ok
}
