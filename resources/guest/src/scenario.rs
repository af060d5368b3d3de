//! The scenarios the BSP runs once every CPU has checked in.
//!
//! Each scenario records what every CPU must have counted on each vector in
//! [`EXPECTED`]; at the end every counter of every CPU is compared with it, so an
//! interrupt that arrived twice, on the wrong CPU, or on a vector nobody used, fails the
//! run.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use hypercall::boot::{BootInfoView, MAX_CPUS};
use hypercall::harness::{offset, request, status, FOREIGN_SOURCE_ID, HARNESS_SOURCE_ID};
use hypercall::platform::{HARNESS_PORT, HARNESS_SIGNATURE};

use crate::arch;
use crate::{code, count, exit, mailbox_cell, println, APIC_ID_MISMATCHES, CHECKED_IN};

/// Vector of the IPIs in `smoke`.
const IPI_VECTOR: u8 = 0x40;
/// Vector of the plain MSIs in `msi`.
const MSI_VECTOR: u8 = 0x50;
/// Vectors of `retarget` (mode 0, mode 1) and `sid`.
const RETARGET_VECTOR: u8 = 0x60;
const SID_VECTOR: u8 = 0x62;
/// Vector of a PCI function's INTx in `pci`.
const INTX_VECTOR: u8 = 0x6c;
/// Vectors of `retarget`'s external source (mode 0, mode 1).
const EXTERNAL_VECTOR: u8 = 0x63;
/// Vectors of `storm`: the storm, then the bystander.
const STORM_VECTOR: u8 = 0x66;
/// First vector of `remap`; it spreads over up to 64 from here.
const REMAP_VECTOR: u8 = 0x80;

/// What each CPU must have counted, by vector.
static EXPECTED: [AtomicU32; MAX_CPUS * 256] = [const { AtomicU32::new(0) }; MAX_CPUS * 256];

pub fn expect(cpu: usize, vector: u8, n: u32) {
    if let Some(cell) = EXPECTED.get(cpu * 256 + vector as usize) {
        cell.fetch_add(n, Ordering::Relaxed);
    }
}

fn expected(cpu: usize, vector: u8) -> u32 {
    EXPECTED
        .get(cpu * 256 + vector as usize)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Smoke,
    Msi,
    Remap,
    Retarget,
    Sid,
    Hypercall,
    Ims,
    Api,
    Vtd,
    Dma,
    Bench,
    Storm,
    Faults,
    Snapshot,
    Touch,
    Hostile,
    Stuck,
    Harness,
    Pci,
    Refused,
    Unemulated,
    All,
    Fail,
    Hang,
}

struct Options {
    scenario: Scenario,
    msi_count: u32,
    remap_entries: u32,
    remap_vectors: u32,
    retarget_count: u32,
    sid_count: u32,
    hammer: u32,
    ims_slots: u32,
    ims_rounds: u32,
    bench: crate::bench::Options,
    storm_count: u32,
    storm_bystanders: u32,
    /// `apic=xapic` keeps the LAPIC in xAPIC (MMIO) mode even when x2APIC is offered.
    xapic: bool,
    /// `dma_snapshot=1`: the `dma` scenario asks for a snapshot while translation is on.
    dma_snapshot: bool,
    /// `touch_mib=N`: MiB of RAM the `touch` scenario writes (0: all free RAM).
    touch_mib: u32,
}

fn number(text: &str) -> Result<u32, &'static str> {
    text.parse().map_err(|_| "a count is not a number")
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
    let mut o = Options {
        scenario: Scenario::All,
        msi_count: 50,
        remap_entries: 256,
        remap_vectors: 4,
        retarget_count: 300,
        sid_count: 10,
        hammer: 0,
        ims_slots: 2048,
        ims_rounds: 2,
        bench: crate::bench::Options {
            samples: 200,
            interrupts: 1000,
            window: 32,
            live: 4096,
            retarget_max: 4096,
        },
        storm_count: 20_000,
        storm_bystanders: 20,
        xapic: false,
        dma_snapshot: false,
        touch_mib: 8,
    };
    for word in text.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "scenario" => {
                o.scenario =
                    match value {
                        "smoke" => Scenario::Smoke,
                        "msi" => Scenario::Msi,
                        "remap" => Scenario::Remap,
                        "retarget" => Scenario::Retarget,
                        "sid" => Scenario::Sid,
                    "hypercall" => Scenario::Hypercall,
                    "vtd" => Scenario::Vtd,
                    "dma" => Scenario::Dma,
                    "ims" => Scenario::Ims,
                    "api" => Scenario::Api,
                    "bench" => Scenario::Bench,
                    "storm" => Scenario::Storm,
                    "faults" => Scenario::Faults,
                    "snapshot" => Scenario::Snapshot,
                    "touch" => Scenario::Touch,
                    "hostile" => Scenario::Hostile,
                    "stuck" => Scenario::Stuck,
                    "harness" => Scenario::Harness,
                    "pci" => Scenario::Pci,
                    "refused" => Scenario::Refused,
                    "unemulated" => Scenario::Unemulated,
                        "all" => Scenario::All,
                        "fail" => Scenario::Fail,
                        "hang" => Scenario::Hang,
                        _ => return Err(
                            "unknown scenario (smoke, msi, remap, retarget, sid, hypercall, ims, api, vtd, dma, bench, storm, faults, snapshot, touch, hostile, stuck, harness, pci, all, fail, hang)",
                        ),
                    }
            }
            "apic" => {
                o.xapic = match value {
                    "xapic" => true,
                    "auto" => false,
                    _ => return Err("unknown apic mode (xapic, auto)"),
                }
            }
            "dma_snapshot" => o.dma_snapshot = number(value)? != 0,
            "touch_mib" => o.touch_mib = number(value)?,
            "msi_count" => o.msi_count = number(value)?,
            "remap_entries" => o.remap_entries = number(value)?,
            "remap_vectors" => o.remap_vectors = number(value)?.clamp(1, 64),
            "retarget_count" => o.retarget_count = number(value)?,
            "sid_count" => o.sid_count = number(value)?,
            "hammer" => o.hammer = number(value)?,
            "ims_slots" => o.ims_slots = number(value)?.clamp(1, crate::ims::MAX_SLOT_QUEUES as u32),
            "ims_rounds" => o.ims_rounds = number(value)?.clamp(1, 1000),
            "bench_samples" => o.bench.samples = number(value)?.min(hypercall::harness::MAX_COUNT / 2),
            "bench_interrupts" => {
                o.bench.interrupts = number(value)?.min(hypercall::harness::MAX_COUNT);
            }
            "bench_window" => {
                o.bench.window = number(value)?.clamp(1, hypercall::harness::MAX_BENCH_WINDOW);
            }
            "bench_live" => o.bench.live = number(value)?.min(hypercall::harness::MAX_COUNT),
            "bench_retarget_max" => o.bench.retarget_max = number(value)?,
            "storm_count" => o.storm_count = number(value)?.min(hypercall::harness::MAX_COUNT),
            "storm_bystanders" => {
                o.storm_bystanders = number(value)?.clamp(1, hypercall::harness::MAX_BYSTANDERS);
            }
            _ => {}
        }
    }
    Ok(o)
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
    let Ok(o) = parse_cmdline(info) else {
        exit(code::BAD_CMDLINE)
    };
    let mode = if use_x2apic() { "x2APIC" } else { "xAPIC" };
    let ecx = arch::cpuid(1).2;
    let flag = |bit: u32| if ecx & (1 << bit) != 0 { "yes" } else { "no" };
    println!(
        "test-guest: {} vCPUs, {} MiB, {} (CPUID xsave {}, cx16 {})",
        cpus,
        info.mem_size() >> 20,
        mode,
        flag(26),
        flag(13)
    );
    wait_until(|| CHECKED_IN.load(Ordering::Acquire) as usize == cpus);
    println!("all {} vCPUs checked in", cpus);

    let mut ok = APIC_ID_MISMATCHES.load(Ordering::Relaxed) == 0;
    if !ok {
        println!("FAIL: a CPU's APIC ID differs from the boot information");
    }
    let s = o.scenario;
    match s {
        Scenario::Fail => {
            println!("scenario fail: reporting failure on purpose");
            exit(code::FAIL_ON_PURPOSE)
        }
        Scenario::Hang => {
            println!("scenario hang: halting forever on purpose");
            arch::stop()
        }
        Scenario::Harness => harness_presence(info),
        Scenario::Pci => pci_scan(),
        Scenario::Unemulated => crate::refused::unemulated(),
        _ => {}
    }
    if info.mailbox().is_none() {
        println!("FAIL: scenario needs the test harness, which this VM has not (--harness on)");
        exit(code::CHECK_FAILED)
    }
    let all = s == Scenario::All;
    if all || s == Scenario::Smoke {
        ok &= smoke(info);
    }
    if all || s == Scenario::Refused {
        ok &= crate::refused::run();
    }
    let needs_harness = s != Scenario::Smoke;
    if needs_harness && arch::inl(HARNESS_PORT) != HARNESS_SIGNATURE {
        println!("FAIL: no test harness on port {:#x}", HARNESS_PORT);
        exit(code::CHECK_FAILED)
    }
    if all || s == Scenario::Msi {
        ok &= msi(cpus, o.msi_count);
    }
    if all || s == Scenario::Remap {
        ok &= remap(cpus, o.remap_entries, o.remap_vectors);
    }
    if all || s == Scenario::Retarget {
        ok &= retarget(cpus, o.retarget_count, 0) & retarget(cpus, o.retarget_count, 1);
        ok &= external(cpus, o.retarget_count, 0) & external(cpus, o.retarget_count, 1);
    }
    if all || s == Scenario::Sid {
        ok &= sid(o.sid_count);
    }
    if all || s == Scenario::Hypercall {
        let apic = |cpu| info.apic_id(cpu).unwrap_or(0);
        ok &= crate::hc::run(cpus, apic, info.mem_size(), o.hammer);
    }
    if s == Scenario::Api {
        let apic = |cpu| info.apic_id(cpu).unwrap_or(0);
        ok &= crate::ims::api(cpus, apic);
    }
    if all || s == Scenario::Ims {
        let apic = |cpu| info.apic_id(cpu).unwrap_or(0);
        ok &= crate::ims::run(cpus, apic, o.ims_slots, o.ims_rounds, s == Scenario::Ims);
    }
    if s == Scenario::Faults {
        ok &= crate::faults::run(info.apic_id(0).unwrap_or(0));
    }
    if s == Scenario::Snapshot {
        let apic = |cpu| info.apic_id(cpu).unwrap_or(0);
        ok &= crate::ims::snapshot(cpus, apic);
    }
    if s == Scenario::Storm {
        ok &= storm(o.storm_count, o.storm_bystanders);
    }
    if s == Scenario::Touch {
        let free = info.free_start().unwrap_or(0x40_0000);
        ok &= crate::touch::run(free, info.mem_size(), o.touch_mib);
    }
    if s == Scenario::Hostile {
        ok &= crate::hostile::run(info);
    }
    if s == Scenario::Stuck {
        crate::hostile::stuck()
    }
    if s == Scenario::Bench {
        let apic = |cpu| info.apic_id(cpu).unwrap_or(0);
        ok &= crate::bench::run(cpus, apic, &o.bench);
    }
    // Before `vtd`: it turns DMA remapping on and off again.
    if all || s == Scenario::Dma {
        ok &= crate::dma::run(
            info.apic_id(0).unwrap_or(0),
            info.free_start().unwrap_or(0x40_0000),
            s == Scenario::Dma,
            o.dma_snapshot,
        );
    }
    // Last: it turns interrupt remapping on for good.
    if all || s == Scenario::Vtd {
        let apic = |cpu| info.apic_id(cpu).unwrap_or(0);
        ok &= crate::vtd::run(cpus, apic, use_x2apic());
    }
    ok &= no_strays(cpus);
    for cpu in 0..cpus {
        let total: u32 = (32..=255u8).map(|v| count(cpu, v)).sum();
        println!("cpu {}: {} interrupts", cpu, total);
    }
    if ok {
        println!("verdict: PASS");
        exit(code::PASS)
    }
    println!("verdict: FAIL");
    exit(code::CHECK_FAILED)
}

/// The `harness` scenario: what a guest sees of the test harness, whether the VM has it
/// (a mailbox in the boot information) or not. Without it: the doorbell port reads all
/// ones and a ring does nothing, the harness's requester IDs are no devices of the VM
/// (the hypercall refuses them), and there is no mailbox to ask for `INJECT` through.
/// With it: the port answers "HARN", the requesters are devices, and `INJECT` is served.
/// Lists every function on bus 0 as a driver's probe would see it: IDs, class, interrupt
/// pin and BARs; reads the first word of each I/O BAR three times (a device may count its
/// reads). A function with an interrupt pin has its IOAPIC input (the interrupt line
/// register) routed through interrupt remapping first, and must raise it by then. Works
/// with any device, ours or another project's.
fn pci_scan() -> ! {
    let mut ok = true;
    for device in 0..32u8 {
        let id = crate::pci::read32(device, 0);
        if id == u32::MAX {
            continue;
        }
        let class = crate::pci::read32(device, 8) >> 8;
        let pin = (crate::pci::read32(device, 0x3c) >> 8) & 0xff;
        println!(
            "pci: 00:{:02x}.0 {:04x}:{:04x} class {:06x} pin {}",
            device,
            id & 0xffff,
            id >> 16,
            class,
            pin
        );
        for bar in 0..6u16 {
            let value = crate::pci::read32(device, 0x10 + 4 * bar);
            if value == 0 {
                continue;
            }
            if value & 1 == 1 {
                let port = (value & 0xfffc) as u16;
                // INTx, when the function has a pin: its IOAPIC input (the interrupt line
                // register) sends INTX_VECTOR to this CPU, edge-triggered, while counted.
                let line = crate::pci::read32(device, 0x3c) & 0xff;
                let before = count(0, INTX_VECTOR);
                // Through interrupt remapping, as Linux routes a pin: IRTE 200 for the
                // IOAPIC's requester.
                let remapped = pin != 0
                    && crate::vtd::remap_ioapic_pin(
                        line,
                        INTX_VECTOR,
                        200,
                        arch::lapic_id(),
                        use_x2apic(),
                    );
                let reads = [arch::inl(port), arch::inl(port), arch::inl(port)];
                println!(
                    "pci: 00:{:02x}.0 BAR{} I/O at {:#x}, reads {} {} {}",
                    device, bar, port, reads[0], reads[1], reads[2]
                );
                ok &= pin == 0 || remapped;
                if remapped {
                    let mut spins = 0u32;
                    while count(0, INTX_VECTOR) == before && spins < 2_000_000 {
                        core::hint::spin_loop();
                        spins += 1;
                    }
                    crate::vtd::set_rte(line, 1 << 16);
                    ok &= count(0, INTX_VECTOR) != before;
                    println!(
                        "pci: 00:{:02x}.0 INTx on IOAPIC input {}, remapped by IRTE 200: {} interrupts",
                        device,
                        line,
                        count(0, INTX_VECTOR) - before
                    );
                }
            } else if value & 0b110 == 0b100 {
                let base = crate::pci::read32(device, 0x14 + 4 * bar) as u64 * (1 << 32)
                    + u64::from(value & !0xf);
                println!(
                    "pci: 00:{:02x}.0 BAR{} memory at {:#x}, first word {:#x}",
                    device,
                    bar,
                    base,
                    crate::pci::mmio_read(base)
                );
            }
        }
    }
    if ok {
        println!("pci: PASS");
        exit(code::PASS)
    }
    println!("pci: FAIL: a function's INTx could not be routed or did not arrive");
    exit(code::CHECK_FAILED)
}

fn harness_presence(info: &BootInfoView<'_>) -> ! {
    let Some(iface) = crate::hc::discover() else {
        println!("harness: FAIL: no hypercall interface");
        exit(code::CHECK_FAILED)
    };
    let mut hc = crate::hc::Guest::new(iface.port);
    let present = info.mailbox().is_some();
    let port = arch::inl(HARNESS_PORT);
    let query = hc.call(
        hypercall::abi::call::QUERY,
        u64::from(HARNESS_SOURCE_ID),
        0,
        0,
    );
    let allocate = hc.call(
        hypercall::abi::call::ALLOCATE,
        u64::from(FOREIGN_SOURCE_ID),
        1,
        0,
    );
    let mut ok = true;
    if present {
        let (inject, _) = harness_request(request::INJECT, 0, 0, 1);
        ok &= port == HARNESS_SIGNATURE;
        ok &= query.rax == hypercall::abi::status::OK;
        ok &= allocate.rax == hypercall::abi::status::OK;
        ok &= inject == status::OK;
        println!(
            "harness: on: port {:#x} reads {:#x}; requesters {:#06x} and {:#06x} are devices (status {}, {}); INJECT served (status {})",
            HARNESS_PORT, port, HARNESS_SOURCE_ID, FOREIGN_SOURCE_ID, query.rax, allocate.rax, inject
        );
    } else {
        // A ring of an unclaimed port does nothing (the VMM counts it as unmapped).
        arch::outl(HARNESS_PORT, 1);
        let refused = hypercall::abi::status::SOURCE_ID_NOT_PERMITTED;
        ok &= port == u32::MAX;
        ok &= query.rax == refused && allocate.rax == refused;
        println!(
            "harness: off: port {:#x} reads {:#x} and a ring does nothing; requesters {:#06x} and {:#06x} refused (status {}, {}); no mailbox, so INJECT cannot be asked for",
            HARNESS_PORT, port, HARNESS_SOURCE_ID, FOREIGN_SOURCE_ID, query.rax, allocate.rax
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
        expect(cpu, IPI_VECTOR, 1);
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

/// Sends a harness request and waits for it; returns (status, result).
pub fn harness_request(code: u32, vector: u8, count: u32, mode: u32) -> (u32, u32) {
    let seq = harness_start(code, vector, count, mode);
    harness_finish(seq)
}

/// Sends a harness request without waiting; returns its sequence number.
pub fn harness_start(code: u32, vector: u8, count: u32, mode: u32) -> u32 {
    mailbox_cell(offset::REQUEST).store(code, Ordering::Relaxed);
    mailbox_cell(offset::ARG_VECTOR).store(u32::from(vector), Ordering::Relaxed);
    mailbox_cell(offset::ARG_COUNT).store(count, Ordering::Relaxed);
    mailbox_cell(offset::ARG_MODE).store(mode, Ordering::Relaxed);
    let seq = mailbox_cell(offset::REQUEST_SEQ)
        .load(Ordering::Relaxed)
        .wrapping_add(1);
    mailbox_cell(offset::REQUEST_SEQ).store(seq, Ordering::Release);
    arch::outl(HARNESS_PORT, seq);
    seq
}

/// Waits for request `seq`; returns (status, result).
pub fn harness_finish(seq: u32) -> (u32, u32) {
    wait_until(|| mailbox_cell(offset::DONE_SEQ).load(Ordering::Acquire) == seq);
    let host = mailbox_cell(offset::STATUS).load(Ordering::Acquire);
    (host, mailbox_cell(offset::RESULT).load(Ordering::Acquire))
}

fn fired(cpu: usize) -> u32 {
    mailbox_cell(offset::FIRED + 4 * cpu).load(Ordering::Acquire)
}

/// The host fires `n` plain MSIs at every CPU (a KVM MSI route + irqfd each); each CPU
/// must count exactly what was fired at it.
fn msi(cpus: usize, n: u32) -> bool {
    let (host, _) = harness_request(request::FIRE_MSI_EACH_CPU, MSI_VECTOR, n, 0);
    let mut ok = host == status::OK;
    for cpu in 0..cpus {
        expect(cpu, MSI_VECTOR, n);
        if fired(cpu) != n || count(cpu, MSI_VECTOR) != n {
            ok = false;
        }
    }
    if ok {
        println!(
            "msi: {} MSIs per vCPU fired and counted on the right vCPU",
            n
        );
    } else {
        println!("msi: FAIL (host status {})", host);
    }
    ok
}

/// The host makes `entries` IRTEs live at once, spread over the CPUs and `vectors`
/// vectors, and raises each once through the remapping core.
fn remap(cpus: usize, entries: u32, vectors: u32) -> bool {
    let (host, commits) = harness_request(request::REMAP_EACH_CPU, REMAP_VECTOR, entries, vectors);
    let mut per_cpu = [0u32; MAX_CPUS];
    for i in 0..entries as usize {
        let cpu = i % cpus;
        let vector = REMAP_VECTOR + ((i / cpus) as u32 % vectors) as u8;
        expect(cpu, vector, 1);
        per_cpu[cpu] += 1;
    }
    let ok = host == status::OK && (0..cpus).all(|cpu| fired(cpu) == per_cpu[cpu]);
    if ok {
        println!(
            "remap: {} IRTEs live at once over {} vectors ({} route commits), each delivered once",
            entries, vectors, commits
        );
    } else {
        println!("remap: FAIL (host status {})", host);
    }
    ok
}

/// The host raises one IRTE `n` times while another host thread keeps retargeting it;
/// every interrupt must arrive exactly once, and on more than one CPU.
fn retarget(cpus: usize, n: u32, mode: u32) -> bool {
    moving_entry(cpus, n, mode, false)
}

/// An IRTE bound to an eventfd the host writes, as a device in another process would, is
/// raised `n` times while the host keeps retargeting it: every interrupt must arrive
/// exactly once, on more than one CPU. Then the host checks that it cannot be bound for
/// another requester, that it delivers nothing while absent, and raises it once more at
/// vCPU 0.
fn external(cpus: usize, n: u32, mode: u32) -> bool {
    moving_entry(cpus, n, mode, true)
}

/// `retarget` and `external`: request 3 or 15 with `mode`, and the guest's count.
fn moving_entry(cpus: usize, n: u32, mode: u32, external: bool) -> bool {
    let (name, code, base, expected, tail) = if external {
        (
            "external source",
            request::REMAP_EXTERNAL,
            EXTERNAL_VECTOR,
            n + 1,
            "; none while absent",
        )
    } else {
        ("retarget", request::REMAP_RETARGET, RETARGET_VECTOR, n, "")
    };
    let vector = base + mode as u8;
    let (host, retargets) = harness_request(code, vector, n, mode);
    let mut total = 0;
    let mut reached = 0;
    for cpu in 0..cpus {
        expect(cpu, vector, fired(cpu));
        total += count(cpu, vector);
        reached += usize::from(count(cpu, vector) > 0);
    }
    let moved = cpus == 1 || reached >= 2;
    let ok = host == status::OK && total == expected && moved;
    let how = if mode == 1 {
        "joining routed targets"
    } else {
        "rewriting its route"
    };
    if ok {
        println!(
            "{} ({}): {} interrupts, {} retargets, all counted once, on {} vCPUs{}",
            name, how, n, retargets, reached, tail
        );
    } else {
        println!(
            "{} ({}): FAIL (host status {}, {} of {} counted, {} vCPUs)",
            name, how, host, total, expected, reached
        );
    }
    ok
}

/// Another requester raises an IRTE it may not use `n` times: nothing may arrive, and
/// each attempt is a recorded fault. Then the owner raises it once.
fn sid(n: u32) -> bool {
    let (host, faults) = harness_request(request::REMAP_SOURCE_ID, SID_VECTOR, n, 0);
    expect(0, SID_VECTOR, 1);
    let ok = host == status::OK && faults == n && count(0, SID_VECTOR) == 1 && fired(0) == 1;
    if ok {
        println!(
            "sid: {} foreign requests blocked and recorded as faults, the owner's delivered",
            n
        );
    } else {
        println!(
            "sid: FAIL (host status {}, {} faults, {} counted)",
            host,
            faults,
            count(0, SID_VECTOR)
        );
    }
    ok
}

/// The host raises one IRTE `n` times back to back while raising another, the bystander,
/// `bystanders` times and waiting for each: storm control must coalesce the storm (fewer
/// arrive than were raised, at least one does) and leave the bystander alone (every one
/// arrives).
fn storm(n: u32, bystanders: u32) -> bool {
    let (host, coalesced) = harness_request(request::STORM, STORM_VECTOR, n, bystanders);
    let bystander = STORM_VECTOR + 1;
    let (stormed, stood) = (count(0, STORM_VECTOR), count(0, bystander));
    // The storm's count is whatever coalescing let through; it is checked here.
    expect(0, STORM_VECTOR, stormed);
    expect(0, bystander, bystanders);
    let ok = host == status::OK
        && fired(0) == n + bystanders
        && stood == bystanders
        && (1..n).contains(&stormed)
        && coalesced > 0;
    if ok {
        println!(
            "storm: {} interrupts raised back to back arrived as {} ({} coalesced), all {} bystander interrupts arrived",
            n, stormed, coalesced, bystanders
        );
    } else {
        println!(
            "storm: FAIL (host status {}, {} of {} arrived, {} coalesced, {} of {} bystanders)",
            host, stormed, n, coalesced, stood, bystanders
        );
    }
    ok
}

/// Every counter of every CPU must be exactly what the scenarios expect.
fn no_strays(cpus: usize) -> bool {
    let mut ok = true;
    for cpu in 0..cpus {
        for vector in 32..=255u8 {
            let (got, want) = (count(cpu, vector), expected(cpu, vector));
            if got != want {
                println!(
                    "FAIL: cpu {} vector {:#x}: counted {}, expected {}",
                    cpu, vector, got, want
                );
                ok = false;
            }
        }
    }
    ok
}
