//! `vmm bench`: our interrupt paths beside what raw KVM charges for the same work, in one
//! run on one machine.
//!
//! In-guest figures, from the built-in test guest's `bench` scenario on a 2-vCPU VM with
//! one slot-array IMS device (the harness times, the guest checks every interrupt
//! arrived; `hypercall::harness` has the protocol):
//!
//! - **delivery latency**: from the device model raising an IMS slot (the slot's message,
//!   the remapping core, the entry's irqfd) until the guest's handler on vCPU 0 has
//!   counted it, beside a raw irqfd on a plain MSI route to the same vCPU and vector,
//!   sample by sample, alternating;
//! - **throughput**: interrupts per second through the device's slots beside raw irqfds,
//!   with one interrupt in flight per vector over a window of vectors;
//! - **live interrupts**: the largest number of remapped interrupts live at once that were
//!   all delivered (each raised once, through its irqfd line);
//! - **retarget, exit to re-entry**: the guest's `UPDATE` hypercalls with 1, 512, 4,096 and
//!   65,536 live interrupts, timed by the vCPU thread from `KVM_RUN` returning to the next
//!   `KVM_RUN` (the headline retarget figure).
//!
//! Host-side figures, measured in-process on a real KVM VM (in-kernel irqchip, no vCPU
//! needed):
//!
//! - **signal cost**: what a device model pays per interrupt: our data path (decode a
//!   remappable message, check the requester, write the entry's line) beside a bare
//!   eventfd write to a raw irqfd;
//! - **retarget**: one `UPDATE` hypercall through the dispatcher alone (validation,
//!   backing, route change, publish), with 1, 512, 4,096 and 65,536 live interrupts, and
//!   one whole-table `KVM_SET_GSI_ROUTING` of that many MSI routes (what a VMM that
//!   rebuilds the table pays per change; KVM takes at most 4,096, so the largest size has
//!   no baseline);
//! - **bulk activation**: one `BATCH` hypercall activating 2,048 entries, beside one
//!   2,048-entry `KVM_SET_GSI_ROUTING`.
//!
//! Each figure is the median and 99th percentile of many samples. Nothing here is a
//! pass/fail check: the report says where a target is met and where it is not.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypercall::abi::{call, status, target, BatchEntry, Registers};
use irq::backing::{Backing, InterruptPath, Limits};
use irq::fdlimit::raise_fd_limit;
use irq::port::{RouteEntry, RouteKind};
use irq::{KvmRouting, MsiMessage, RouteTable, RoutingBackend};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{
    Console, DeviceConfig, DeviceKind, Kernel, MachineConfig, RunConfig, VmConfig,
};
use crate::hypercall::{Dispatcher, HypercallHandler};
use crate::vm::{CapturedConsole, VmError};
use hypercall::harness::BENCH_RUNS;

/// Live-interrupt counts the retarget cost is measured at.
pub const RETARGET_SIZES: [u32; 4] = [1, 512, 4096, 65_536];
/// Entries activated by one batch in the bulk figure.
pub const BULK_ENTRIES: u32 = 2048;
/// KVM's routing-table limit (one MSI route per GSI).
const KVM_MAX_ROUTES: u32 = 4096;
/// vCPUs the targets spread over (APIC IDs 0..CPUS).
const CPUS: u32 = 2;
/// Vectors per vCPU the targets spread over, from 0x30 (as the test guest's IMS driver
/// spreads its interrupts): the number of distinct targets, hence routes, is the same at
/// every size, so the table shows cost against live interrupts alone.
const VECTORS: u32 = 32;
/// The requester ID the benchmark allocates as.
const REQUESTER: u16 = 0x0018;
/// Where the batch array sits in the benchmark's guest memory.
const BATCH_ADDR: u64 = 0x1000;
/// vCPUs of the in-guest benchmark's VM.
const GUEST_CPUS: u32 = 2;
/// Vectors in flight in a throughput run.
const WINDOW: u32 = 32;
/// How long the in-guest benchmark may run.
const GUEST_WATCHDOG: Duration = Duration::from_secs(1800);
/// Console lines kept to explain a failed in-guest run.
const CONSOLE_TAIL: usize = 20;

/// What to measure and where to put it.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Samples per figure.
    pub samples: usize,
    /// Interrupts per throughput run.
    pub interrupts: u32,
    /// Remapped interrupts to make live at once (halved until all are delivered).
    pub live: u32,
}

/// Median and 99th percentile of one figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figure {
    /// Median.
    pub median: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Samples taken.
    pub samples: usize,
}

impl Figure {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        // Nearest rank, rounded: the sample `percent`% of the way from first to last.
        let at = |percent: usize| {
            let i = (n.saturating_sub(1) * percent + 50) / 100;
            samples.get(i).copied().unwrap_or_default()
        };
        Self {
            median: at(50),
            p99: at(99),
            samples: n,
        }
    }
}

/// One row of the retarget table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetargetRow {
    /// Live interrupts.
    pub live: u32,
    /// Our `UPDATE` hypercall from the guest, host time from its exit to the guest's
    /// re-entry (`None` if the guest part did not time this size).
    pub exit_to_entry: Option<Figure>,
    /// Of that, the dispatcher alone, called in-process (validation, backing, route
    /// change, publish).
    pub ours: Figure,
    /// One whole-table `KVM_SET_GSI_ROUTING` of `live` MSI routes (`None` beyond KVM's
    /// limit).
    pub rebuild: Option<Figure>,
}

/// What the test guest's `bench` scenario measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFigures {
    /// Delivery latency through an IMS slot and the remapping core.
    pub delivery_ours: Figure,
    /// Delivery latency through a raw irqfd on a plain MSI route.
    pub delivery_raw: Figure,
    /// Time per interrupt of each throughput run through IMS slots (median: the median
    /// run; p99: the slowest).
    pub throughput_ours: Figure,
    /// The same through raw irqfds.
    pub throughput_raw: Figure,
    /// Interrupts per throughput run.
    pub interrupts_per_run: u32,
    /// Live interrupts asked for.
    pub live_asked: u32,
    /// The largest number live at once that were all delivered.
    pub max_live: u32,
    /// `UPDATE` hypercalls from exit to re-entry, by live interrupts.
    pub retarget: Vec<(u32, Figure)>,
}

/// The results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchReport {
    /// Retarget cost by live interrupts.
    pub retarget: Vec<RetargetRow>,
    /// One `BATCH` activating [`BULK_ENTRIES`] entries.
    pub bulk_ours: Figure,
    /// One `KVM_SET_GSI_ROUTING` of [`BULK_ENTRIES`] routes.
    pub bulk_raw: Figure,
    /// One interrupt signalled through our data path (remappable message in).
    pub signal_ours: Figure,
    /// One eventfd write to a raw irqfd.
    pub signal_raw: Figure,
    /// The in-guest figures.
    pub guest: GuestFigures,
}

/// Interrupts per second at `per_interrupt`.
fn rate(per_interrupt: Duration) -> Option<f64> {
    (!per_interrupt.is_zero()).then(|| 1.0 / per_interrupt.as_secs_f64())
}

fn ratio(a: Duration, b: Duration) -> Option<f64> {
    (!b.is_zero()).then(|| a.as_secs_f64() / b.as_secs_f64())
}

impl BenchReport {
    /// Whole-table rebuild cost over our retarget cost, both at 4,096 live.
    #[must_use]
    pub fn retarget_speedup_at_4096(&self) -> Option<f64> {
        let row = self.retarget.iter().find(|r| r.live == 4096)?;
        ratio(row.rebuild?.median, row.exit_to_entry?.median)
    }

    /// Our 2,048-entry batch activation over one 2,048-entry routing set.
    #[must_use]
    pub fn bulk_ratio(&self) -> Option<f64> {
        ratio(self.bulk_ours.median, self.bulk_raw.median)
    }

    /// Our median delivery latency over the raw irqfd's.
    #[must_use]
    pub fn delivery_ratio(&self) -> Option<f64> {
        ratio(
            self.guest.delivery_ours.median,
            self.guest.delivery_raw.median,
        )
    }

    /// Our median throughput over the raw irqfds'.
    #[must_use]
    pub fn throughput_ratio(&self) -> Option<f64> {
        ratio(
            self.guest.throughput_raw.median,
            self.guest.throughput_ours.median,
        )
    }

    /// The report as JSON: the headline ratios at the top level, the tables beside them.
    /// Figures not measured by this command are `null`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        let us = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e6);
        let fig = |f: &Figure| {
            format!(
                "{{\"median_us\": {}, \"p99_us\": {}, \"samples\": {}}}",
                us(f.median),
                us(f.p99),
                f.samples
            )
        };
        let mut out = String::from("{\n");
        let _ = writeln!(
            out,
            "  \"retarget_speedup_at_4096\": {},",
            num(self.retarget_speedup_at_4096())
        );
        let _ = writeln!(out, "  \"delivery_ratio\": {},", num(self.delivery_ratio()));
        let _ = writeln!(out, "  \"max_live_interrupts\": {},", self.guest.max_live);
        let _ = writeln!(out, "  \"bulk_ratio\": {},", num(self.bulk_ratio()));
        let g = &self.guest;
        let _ = writeln!(
            out,
            "  \"delivery\": {{\"ours_ims_slot\": {}, \"raw_irqfd\": {}}},",
            fig(&g.delivery_ours),
            fig(&g.delivery_raw)
        );
        let per_s = |f: &Figure| num(rate(f.median));
        let _ = writeln!(
            out,
            "  \"throughput\": {{\"interrupts_per_run\": {}, \"window\": {WINDOW}, \"runs\": {BENCH_RUNS}, \"ours_per_s\": {}, \"raw_per_s\": {}, \"ratio\": {}, \"ours_per_interrupt\": {}, \"raw_per_interrupt\": {}}},",
            g.interrupts_per_run,
            per_s(&g.throughput_ours),
            per_s(&g.throughput_raw),
            num(self.throughput_ratio()),
            fig(&g.throughput_ours),
            fig(&g.throughput_raw)
        );
        let _ = writeln!(
            out,
            "  \"live_interrupts\": {{\"asked\": {}, \"all_delivered\": {}}},",
            g.live_asked, g.max_live
        );
        let _ = writeln!(
            out,
            "  \"signal_cost\": {{\"ours_remapped\": {}, \"raw_eventfd\": {}}},",
            fig(&self.signal_ours),
            fig(&self.signal_raw)
        );
        out.push_str("  \"retarget\": [\n");
        let rows: Vec<String> = self
            .retarget
            .iter()
            .map(|r| {
                format!(
                    "    {{\"live\": {}, \"ours_exit_to_entry\": {}, \"ours_dispatcher\": {}, \"whole_table_rebuild\": {}}}",
                    r.live,
                    r.exit_to_entry.as_ref().map_or("null".to_string(), fig),
                    fig(&r.ours),
                    r.rebuild.as_ref().map_or("null".to_string(), fig)
                )
            })
            .collect();
        out.push_str(&rows.join(",\n"));
        out.push_str("\n  ],\n");
        let _ = writeln!(
            out,
            "  \"bulk_activation\": {{\"entries\": {BULK_ENTRIES}, \"ours_batch\": {}, \"raw_set_gsi_routing\": {}}}",
            fig(&self.bulk_ours),
            fig(&self.bulk_raw)
        );
        out.push_str("}\n");
        out
    }
}

/// Microseconds, one decimal.
fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// A ratio, or `-` when there is none.
fn times(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

impl BenchReport {
    /// Delivery, throughput, the device-side cost and the live-interrupt count.
    fn write_guest_figures(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.guest;
        writeln!(
            f,
            "Delivery latency, device-model raise -> guest handler on vCPU 0 (us), {} samples each",
            g.delivery_ours.samples
        )?;
        writeln!(f, "{:>30} | {:>10} {:>10}", "path", "p50", "p99")?;
        for (name, fig) in [
            ("IMS slot + remapping (ours)", &g.delivery_ours),
            ("raw irqfd, plain MSI route", &g.delivery_raw),
        ] {
            writeln!(f, "{name:>30} | {:>10} {:>10}", us(fig.median), us(fig.p99))?;
        }
        writeln!(f, "  ratio ours/raw {}", times(self.delivery_ratio()))?;
        writeln!(f)?;
        writeln!(
            f,
            "Throughput, vCPU 0, {} interrupts per run over {WINDOW} vectors, {BENCH_RUNS} runs each (interrupts/s)",
            g.interrupts_per_run
        )?;
        writeln!(
            f,
            "{:>30} | {:>12} {:>12}",
            "path", "median run", "slowest run"
        )?;
        let per_s = |d: Duration| rate(d).map_or("-".into(), |r| format!("{r:.0}"));
        for (name, fig) in [
            ("IMS slots + remapping (ours)", &g.throughput_ours),
            ("raw irqfds, plain MSI routes", &g.throughput_raw),
        ] {
            writeln!(
                f,
                "{name:>30} | {:>12} {:>12}",
                per_s(fig.median),
                per_s(fig.p99)
            )?;
        }
        writeln!(f, "  ratio ours/raw {}", times(self.throughput_ratio()))?;
        writeln!(f)?;
        writeln!(
            f,
            "Device-side cost of one interrupt, host only (us): our data path vs an eventfd write"
        )?;
        writeln!(
            f,
            "  ours p50 {:.3} p99 {:.3} | raw p50 {:.3} p99 {:.3}",
            self.signal_ours.median.as_secs_f64() * 1e6,
            self.signal_ours.p99.as_secs_f64() * 1e6,
            self.signal_raw.median.as_secs_f64() * 1e6,
            self.signal_raw.p99.as_secs_f64() * 1e6,
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "Live remapped interrupts, all delivered through irqfd lines: {} (asked for {})",
            g.max_live, g.live_asked
        )?;
        writeln!(f)?;
        Ok(())
    }

    /// The retarget table.
    fn write_retarget(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "IRTE retarget, host side (us): our UPDATE hypercall from exit to re-entry (and the dispatcher alone) vs one whole-table KVM_SET_GSI_ROUTING"
        )?;
        writeln!(
            f,
            "{:>8} | {:>10} {:>10} | {:>10} | {:>12} {:>12} | {:>8}",
            "live", "exit p50", "exit p99", "disp. p50", "rebuild p50", "rebuild p99", "speedup"
        )?;
        for r in &self.retarget {
            let exit = r
                .exit_to_entry
                .map_or(("-".into(), "-".into()), |e| (us(e.median), us(e.p99)));
            let (p50, p99, speedup) = match r.rebuild {
                Some(b) => (
                    us(b.median),
                    us(b.p99),
                    r.exit_to_entry
                        .and_then(|e| ratio(b.median, e.median))
                        .map_or("-".into(), |x| {
                            if x < 10.0 {
                                format!("{x:.1}x")
                            } else {
                                format!("{x:.0}x")
                            }
                        }),
                ),
                None => ("n/a".into(), "n/a".into(), "-".into()),
            };
            writeln!(
                f,
                "{:>8} | {:>10} {:>10} | {:>10} | {:>12} {:>12} | {:>8}",
                r.live,
                exit.0,
                exit.1,
                us(r.ours.median),
                p50,
                p99,
                speedup
            )?;
        }
        writeln!(
            f,
            "(KVM takes at most {KVM_MAX_ROUTES} routes: no whole-table baseline beyond that)"
        )?;
        writeln!(f)?;
        Ok(())
    }

    /// Bulk activation and the headline.
    fn write_bulk_and_headline(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.guest;
        writeln!(
            f,
            "Bulk activation of {BULK_ENTRIES} entries (us): one BATCH hypercall vs one {BULK_ENTRIES}-entry KVM_SET_GSI_ROUTING"
        )?;
        writeln!(
            f,
            "  ours p50 {} p99 {} | raw p50 {} p99 {} | ratio {}",
            us(self.bulk_ours.median),
            us(self.bulk_ours.p99),
            us(self.bulk_raw.median),
            us(self.bulk_raw.p99),
            self.bulk_ratio().map_or("-".into(), |x| format!("{x:.2}x"))
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "headline: retarget_speedup_at_4096 {} (target >= 20), delivery_ratio {} (target <= 1.1), max_live_interrupts {} (target 65536), bulk_ratio {} (target <= 3)",
            self.retarget_speedup_at_4096()
                .map_or("-".into(), |x| format!("{x:.1}")),
            self.delivery_ratio().map_or("-".into(), |x| format!("{x:.3}")),
            g.max_live,
            self.bulk_ratio().map_or("-".into(), |x| format!("{x:.2}"))
        )
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write_guest_figures(f)?;
        self.write_retarget(f)?;
        self.write_bulk_and_headline(f)
    }
}

/// A VM with an in-kernel irqchip, and the dispatcher over its interrupt core.
struct Rig {
    dispatcher: Dispatcher,
    path: Arc<InterruptPath>,
    mem: GuestMemoryMmap,
}

/// A VM with an in-kernel irqchip and nothing else.
fn irqchip_vm(kvm: &Kvm) -> Result<Arc<VmFd>, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create the VM", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
    Ok(Arc::new(vm))
}

fn new_rig(kvm: &Kvm) -> Result<Rig, VmError> {
    let vm = irqchip_vm(kvm)?;
    let routing = KvmRouting::new(vm.clone());
    let limit = routing.route_limit();
    raise_fd_limit(u64::from(limit) + 256)?;
    let backing = Backing::new(RouteTable::new(routing, limit)?, Limits::default())?;
    let path = backing.path();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])
        .map_err(|e| VmError::Os("allocate benchmark memory", std::io::Error::other(e)))?;
    let dispatcher = Dispatcher::new(
        irq::InterruptCore::new(backing).handle(),
        mem.clone(),
        (0..CPUS).collect(),
        vec![REQUESTER],
        u32::MAX,
    );
    Ok(Rig {
        dispatcher,
        path,
        mem,
    })
}

/// Target `k` of the spread: APIC `k % CPUS`, vector `0x30 + (k / CPUS) % VECTORS`.
fn spread(k: u32) -> u64 {
    let vector = 0x30 + (k / CPUS) % VECTORS;
    target::fixed(k % CPUS, u8::try_from(vector).unwrap_or(0x30))
}

impl Rig {
    fn call(&self, number: u32, a: u64, b: u64) -> Registers {
        let mut regs = Registers {
            rax: u64::from(number),
            rcx: u64::from(REQUESTER),
            rsi: a,
            rdi: b,
            r8: 0,
            r9: 0,
        };
        self.dispatcher.call(&mut regs);
        regs
    }

    fn checked(
        &self,
        what: &'static str,
        number: u32,
        a: u64,
        b: u64,
    ) -> Result<Registers, VmError> {
        let regs = self.call(number, a, b);
        if regs.rax == status::OK {
            Ok(regs)
        } else {
            Err(VmError::Os(
                what,
                std::io::Error::other(format!("hypercall status {}", regs.rax)),
            ))
        }
    }

    /// Writes entries `first..first + count` with `word(k)` into the batch array and
    /// applies them with one BATCH; returns how long the call took.
    fn batch(
        &self,
        first: u64,
        count: u32,
        word: impl Fn(u32) -> u64,
    ) -> Result<Duration, VmError> {
        for k in 0..count {
            let entry = BatchEntry {
                index: u32::try_from(first + u64::from(k)).unwrap_or(u32::MAX),
                status: 0,
                target: word(k),
            };
            self.mem
                .write_slice(
                    &entry.to_bytes(),
                    GuestAddress(BATCH_ADDR + 16 * u64::from(k)),
                )
                .map_err(|e| VmError::Os("write the batch array", std::io::Error::other(e)))?;
        }
        let begin = Instant::now();
        self.checked("apply a batch", call::BATCH, BATCH_ADDR, u64::from(count))?;
        Ok(begin.elapsed())
    }

    /// Activates `live` entries spread over the targets; returns the first.
    fn populate(&self, live: u32) -> Result<u64, VmError> {
        let first = self
            .checked("allocate", call::ALLOCATE, u64::from(live), 0)?
            .rsi;
        let mut done = 0;
        while done < live {
            let n = (live - done).min(4096);
            self.batch(first + u64::from(done), n, |k| spread(done + k))?;
            done += n;
        }
        Ok(first)
    }
}

/// `count` MSI routes, as a VMM that keeps one route per interrupt would have them.
fn raw_table(count: u32) -> Vec<RouteEntry> {
    (0..count)
        .map(|gsi| RouteEntry {
            gsi,
            kind: RouteKind::Msi(MsiMessage {
                address: 0xfee0_0000 | (u64::from(gsi % CPUS) << 12),
                data: 0x30 + (gsi / CPUS) % VECTORS,
            }),
        })
        .collect()
}

fn time_set_routes(vm: &Arc<VmFd>, count: u32, samples: usize) -> Result<Figure, VmError> {
    let routing = KvmRouting::new(vm.clone());
    let table = raw_table(count);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let begin = Instant::now();
        routing
            .set_routes(&table)
            .map_err(|e| VmError::Os("set a whole routing table", e))?;
        times.push(begin.elapsed());
    }
    Ok(Figure::of(times))
}

/// What one interrupt costs the device model: a live entry's remappable message through
/// our data path, beside an eventfd write to a raw irqfd (on VMs without vCPUs, so KVM's
/// injection finds no one to deliver to, the same for both).
fn signal_cost(kvm: &Kvm, samples: usize) -> Result<(Figure, Figure), VmError> {
    let rig = new_rig(kvm)?;
    let first = rig.populate(1)?;
    let msg = MsiMessage::remappable(u16::try_from(first).unwrap_or(0), None);
    let mut routes = RouteTable::new(KvmRouting::new(irqchip_vm(kvm)?), 64)?;
    // APIC 0, vector 0x30, fixed, edge: the target of the first entry of the spread.
    let gsi = routes.allocate(MsiMessage {
        address: 0xfee0_0000,
        data: 0x30,
    })?;
    routes.commit()?;
    let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Os("create an eventfd", e))?;
    routes.attach_irqfd(&fd, gsi)?;
    let mut ours = Vec::with_capacity(samples);
    let mut raw = Vec::with_capacity(samples);
    // Interleaved, so that both see the same state of the machine.
    for _ in 0..samples {
        let begin = Instant::now();
        let signalled = rig.path.signal_msi(&msg, REQUESTER);
        ours.push(begin.elapsed());
        signalled.map_err(|f| {
            VmError::Os(
                "signal a live entry",
                std::io::Error::other(format!("{f:?}")),
            )
        })?;
        let begin = Instant::now();
        let written = fd.write(1);
        raw.push(begin.elapsed());
        written.map_err(|e| VmError::Os("write a raw irqfd", e))?;
    }
    routes.detach_irqfd(&fd, gsi)?;
    Ok((Figure::of(ours), Figure::of(raw)))
}

/// Boots the test guest's `bench` scenario and collects what the harness measured.
fn guest_figures(config: &BenchConfig) -> Result<GuestFigures, VmError> {
    let slots = DeviceConfig::defaults()
        .into_iter()
        .filter(|d| matches!(d.kind, DeviceKind::ImsSlots { .. }))
        .collect();
    let samples = u32::try_from(config.samples).unwrap_or(u32::MAX);
    let vm = VmConfig {
        machine: MachineConfig {
            cpus: GUEST_CPUS,
            kernel: Kernel::BuiltIn,
            cmdline: format!(
                "scenario=bench bench_samples={samples} bench_interrupts={} bench_window={WINDOW} bench_live={} bench_retarget_max={}",
                config.interrupts, config.live, RETARGET_SIZES.iter().max().unwrap_or(&0)
            ),
            devices: slots,
            ..MachineConfig::default()
        },
        run: RunConfig {
            console: Console::Off,
            watchdog: Some(GUEST_WATCHDOG),
            kvm_device: config.kvm_device.clone(),
            ..RunConfig::default()
        },
    };
    let console = CapturedConsole::default();
    let report = crate::vm::run_with_console(&vm, Box::new(console.clone()))?;
    if !report.passed() {
        let text = console.text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines
            .iter()
            .skip(lines.len().saturating_sub(CONSOLE_TAIL))
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(VmError::Os(
            "run the test guest's bench scenario",
            std::io::Error::other(format!("{:?}; console:\n{tail}", report.outcome)),
        ));
    }
    let m = report.measurements;
    let per_interrupt = |runs: &[(u32, Duration)]| {
        Figure::of(
            runs.iter()
                .map(|&(n, t)| t.checked_div(n).unwrap_or_default())
                .collect(),
        )
    };
    Ok(GuestFigures {
        delivery_ours: Figure::of(m.delivery_ours),
        delivery_raw: Figure::of(m.delivery_raw),
        throughput_ours: per_interrupt(&m.throughput_ours),
        throughput_raw: per_interrupt(&m.throughput_raw),
        interrupts_per_run: config.interrupts,
        live_asked: config.live,
        max_live: m.max_live_delivered,
        retarget: m
            .retarget
            .into_iter()
            .map(|(live, times)| (live, Figure::of(times)))
            .collect(),
    })
}

/// Runs every benchmark: the in-guest ones first, then the host-side ones.
///
/// # Errors
/// KVM could not be opened or a VM set up, the test guest's bench scenario failed, or a
/// call the benchmark relies on failed.
pub fn run(config: &BenchConfig) -> Result<BenchReport, VmError> {
    let guest = guest_figures(config)?;
    let open_error = |source| VmError::OpenKvm {
        path: config.kvm_device.clone(),
        source,
    };
    let device = std::ffi::CString::new(config.kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| open_error(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(device).map_err(open_error)?;
    let samples = config.samples.max(1);

    let mut retarget = Vec::new();
    for live in RETARGET_SIZES {
        let rig = new_rig(&kvm)?;
        let first = rig.populate(live)?;
        // Move entry k to the target of entry k + 1 (or to the other CPU when there is
        // only one entry): always a target that already has a route.
        let mut times = Vec::with_capacity(samples);
        let moves = u64::from(live.max(2));
        for s in 0..samples as u64 {
            let k = (s * 7919) % u64::from(live);
            let to = spread(u32::try_from((k + 1 + s) % moves).unwrap_or(0));
            let begin = Instant::now();
            rig.checked("retarget", call::UPDATE, first + k, to)?;
            times.push(begin.elapsed());
        }
        let rebuild = if live <= KVM_MAX_ROUTES {
            Some(time_set_routes(&irqchip_vm(&kvm)?, live, samples)?)
        } else {
            None
        };
        let exit_to_entry = guest
            .retarget
            .iter()
            .find(|(n, _)| *n == live)
            .map(|(_, f)| *f);
        retarget.push(RetargetRow {
            live,
            exit_to_entry,
            ours: Figure::of(times),
            rebuild,
        });
    }

    let rig = new_rig(&kvm)?;
    let first = rig
        .checked("allocate", call::ALLOCATE, u64::from(BULK_ENTRIES), 0)?
        .rsi;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        times.push(rig.batch(first, BULK_ENTRIES, spread)?);
        rig.batch(first, BULK_ENTRIES, |_| 0)?;
    }
    let bulk_ours = Figure::of(times);
    let bulk_raw = time_set_routes(&irqchip_vm(&kvm)?, BULK_ENTRIES, samples)?;
    let (signal_ours, signal_raw) = signal_cost(&kvm, samples)?;
    Ok(BenchReport {
        retarget,
        bulk_ours,
        bulk_raw,
        signal_ours,
        signal_raw,
        guest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn figures_are_median_and_p99() {
        let f = Figure::of((1..=100).rev().map(us).collect());
        assert_eq!((f.median, f.p99, f.samples), (us(51), us(99), 100));
        assert_eq!(Figure::of(vec![us(7)]).median, us(7));
    }

    #[test]
    fn json_leads_with_the_headline_ratios() {
        let fig = |n| Figure {
            median: us(n),
            p99: us(2 * n),
            samples: 3,
        };
        let report = BenchReport {
            retarget: vec![
                RetargetRow {
                    live: 4096,
                    exit_to_entry: Some(fig(4)),
                    ours: fig(2),
                    rebuild: Some(fig(1000)),
                },
                RetargetRow {
                    live: 65_536,
                    exit_to_entry: None,
                    ours: fig(5),
                    rebuild: None,
                },
            ],
            bulk_ours: fig(800),
            bulk_raw: fig(400),
            signal_ours: fig(1),
            signal_raw: fig(1),
            guest: GuestFigures {
                delivery_ours: fig(110),
                delivery_raw: fig(100),
                throughput_ours: fig(100),
                throughput_raw: fig(80),
                interrupts_per_run: 2000,
                live_asked: 65_536,
                max_live: 32_768,
                retarget: vec![],
            },
        };
        let near = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-9);
        assert!(near(report.retarget_speedup_at_4096(), 250.0));
        assert!(near(report.bulk_ratio(), 2.0));
        assert!(near(report.delivery_ratio(), 1.1));
        assert!(near(report.throughput_ratio(), 0.8));
        let json = report.to_json();
        let keys: Vec<&str> = json.lines().skip(1).take(4).collect();
        assert_eq!(
            keys,
            [
                "  \"retarget_speedup_at_4096\": 250.000,",
                "  \"delivery_ratio\": 1.100,",
                "  \"max_live_interrupts\": 32768,",
                "  \"bulk_ratio\": 2.000,"
            ]
        );
        assert!(json.contains("\"whole_table_rebuild\": null"), "{json}");
        let text = report.to_string();
        assert!(text.contains("250x"), "{text}");
        assert!(text.contains("n/a"), "{text}");
        assert!(text.contains("ratio ours/raw 1.10x"), "{text}");
        // 80 us and 100 us per interrupt.
        assert!(text.contains("12500") && text.contains("10000"), "{text}");
        assert!(text.contains(": 32768 (asked for 65536)"), "{text}");
    }
}
