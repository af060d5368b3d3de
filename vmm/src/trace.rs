//! The interrupt event trace (`--trace PATH`, `docs/api.md` "Trace"): every event the
//! library crates emit through the `tracing` facade under a target `irvm::CATEGORY`
//! becomes one JSON object on a line:
//!
//! ```text
//! {"t_ns":1834211,"thread":"vcpu0","cat":"hypercall","kind":"call","name":"update",...}
//! ```
//!
//! `t_ns` is monotonic, from the start of the run; `thread` names the vCPU (`vcpu0`) or
//! the VMM thread; `cat` and `kind` say what happened; the rest are the event's fields.
//!
//! The trace belongs to one VM: it is the default `tracing` dispatcher of the thread that
//! runs the VM and of every thread that VM starts ([`spawn`] hands it on), so several VMs
//! in one process (tests, an embedder) each trace to their own file. A process that traces
//! nothing never sets a dispatcher, and each event site costs a check of a static.
//!
//! Every category is limited to [`TracePlan::limit`] events per second of the run (a
//! guest decides how many events it causes): beyond, events are counted, not written, and
//! the category's next event (or the end of the run) writes a `dropped` record with the
//! count, so a trace is bounded and says what it left out.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber};

/// The categories, in the order of their bits.
pub const CATEGORIES: [&str; 7] = [
    "ir",
    "hypercall",
    "vtd",
    "ioapic",
    "ims",
    "routes",
    "faults",
];
/// The prefix of the library crates' trace targets (`irvm::ir`, ...).
pub const TARGET_PREFIX: &str = "irvm::";
/// Events per category per second when the run does not say.
pub const DEFAULT_LIMIT: u32 = 5000;

/// Where a trace goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceOutput {
    /// A file (created or truncated).
    File(PathBuf),
    /// Standard output (`-`).
    Stdout,
}

/// What a run traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePlan {
    /// Where.
    pub output: TraceOutput,
    /// Which categories (indexes into [`CATEGORIES`]).
    pub categories: Vec<usize>,
    /// Events per category per second.
    pub limit: u32,
}

impl TracePlan {
    /// A plan for `output` (`-` for stdout), with `categories` (comma-separated names,
    /// `all`; `None`: all) and `limit` (`None`: [`DEFAULT_LIMIT`]).
    ///
    /// # Errors
    /// A message naming an unknown category, an empty path or a zero limit.
    pub fn new(output: &str, categories: Option<&str>, limit: Option<u32>) -> Result<Self, String> {
        let output = match output {
            "" => return Err("the trace path is empty".into()),
            "-" => TraceOutput::Stdout,
            path => TraceOutput::File(path.into()),
        };
        let categories = match categories {
            None | Some("all") => (0..CATEGORIES.len()).collect(),
            Some(list) => list
                .split(',')
                .map(|name| {
                    CATEGORIES
                        .iter()
                        .position(|c| *c == name.trim())
                        .ok_or_else(|| {
                            format!(
                                "unknown trace category `{name}` (expected {} or all)",
                                CATEGORIES.join(", ")
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 {
            return Err("the trace limit must be at least 1 event a second".into());
        }
        Ok(Self {
            output,
            categories,
            limit,
        })
    }
}

/// A category's current second.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    second: u64,
    written: u32,
    dropped: u64,
    /// Dropped over the whole run.
    total_dropped: u64,
}

struct State {
    out: Box<dyn Write + Send>,
    windows: [Window; CATEGORIES.len()],
    written: u64,
    write_failed: bool,
}

/// What a trace held at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceTotals {
    /// Events written.
    pub written: u64,
    /// Events left out by the per-category limit.
    pub dropped: u64,
}

/// A trace being written: the `tracing` subscriber of one VM.
#[derive(Clone)]
pub struct Trace {
    inner: Arc<Inner>,
}

struct Inner {
    start: Instant,
    enabled: [bool; CATEGORIES.len()],
    limit: u32,
    state: Mutex<State>,
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("enabled", &self.inner.enabled)
            .field("limit", &self.inner.limit)
            .finish_non_exhaustive()
    }
}

/// The category of a target, if it is one of ours.
fn category(target: &str) -> Option<usize> {
    let name = target.strip_prefix(TARGET_PREFIX)?;
    CATEGORIES.iter().position(|c| *c == name)
}

impl Trace {
    /// Opens the plan's output.
    ///
    /// # Errors
    /// The file's error.
    pub fn open(plan: &TracePlan) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match &plan.output {
            TraceOutput::Stdout => Box::new(io::stdout()),
            TraceOutput::File(path) => Box::new(BufWriter::new(File::create(path)?)),
        };
        Ok(Self::to_writer(plan, out))
    }

    /// A trace written to `out`.
    #[must_use]
    pub fn to_writer(plan: &TracePlan, out: Box<dyn Write + Send>) -> Self {
        let mut enabled = [false; CATEGORIES.len()];
        for c in &plan.categories {
            if let Some(e) = enabled.get_mut(*c) {
                *e = true;
            }
        }
        Self {
            inner: Arc::new(Inner {
                start: Instant::now(),
                enabled,
                limit: plan.limit,
                state: Mutex::new(State {
                    out,
                    windows: [Window::default(); CATEGORIES.len()],
                    written: 0,
                    write_failed: false,
                }),
            }),
        }
    }

    /// The dispatcher to make the VM's threads' default.
    #[must_use]
    pub fn dispatch(&self) -> Dispatch {
        Dispatch::new(self.clone())
    }

    /// Writes the `dropped` records still due and flushes; the totals.
    pub fn finish(&self) -> TraceTotals {
        let mut state = self.state();
        let t_ns = self.now();
        let mut dropped = 0;
        for cat in 0..CATEGORIES.len() {
            Self::flush_dropped(&mut state, cat, t_ns, self.inner.limit);
            dropped += state.windows.get(cat).map_or(0, |w| w.total_dropped);
        }
        if state.out.flush().is_err() {
            state.write_failed = true;
        }
        TraceTotals {
            written: state.written,
            dropped,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.inner.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn write_line(state: &mut State, line: &str) {
        if state.write_failed {
            return;
        }
        if state.out.write_all(line.as_bytes()).is_err() {
            // A full disk or a closed pipe: the run goes on without its trace.
            state.write_failed = true;
            log::error!("the trace cannot be written; tracing stops");
        }
    }

    /// The record of what category `cat` left out since its last one, if anything.
    fn flush_dropped(state: &mut State, cat: usize, t_ns: u64, limit: u32) {
        let Some(w) = state.windows.get_mut(cat) else {
            return;
        };
        if w.dropped == 0 {
            return;
        }
        let line = format!(
            "{{\"t_ns\":{t_ns},\"thread\":{},\"cat\":\"{}\",\"kind\":\"dropped\",\"dropped\":{},\"limit_per_second\":{}}}\n",
            json_str(thread_name().as_str()),
            CATEGORIES.get(cat).copied().unwrap_or("?"),
            w.dropped,
            limit
        );
        w.dropped = 0;
        state.written += 1;
        Self::write_line(state, &line);
    }
}

fn thread_name() -> String {
    std::thread::current()
        .name()
        .map_or_else(|| "?".to_string(), str::to_string)
}

fn json_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"?\"".into())
}

/// Collects an event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

impl Subscriber for Trace {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        // Another VM may trace other categories: each event asks `enabled`.
        match category(metadata.target()) {
            Some(_) => Interest::sometimes(),
            None => Interest::never(),
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        category(metadata.target()).is_some_and(|c| self.inner.enabled.get(c) == Some(&true))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let Some(cat) = category(event.metadata().target()) else {
            return;
        };
        let limit = self.inner.limit;
        let mut state = self.state();
        // Read under the lock: the file's lines are in time order.
        let t_ns = self.now();
        let second = t_ns / 1_000_000_000;
        let Some(w) = state.windows.get_mut(cat) else {
            return;
        };
        if w.second != second {
            w.second = second;
            w.written = 0;
            Self::flush_dropped(&mut state, cat, t_ns, limit);
        }
        let Some(w) = state.windows.get_mut(cat) else {
            return;
        };
        if w.written >= limit {
            w.dropped += 1;
            w.total_dropped += 1;
            return;
        }
        w.written += 1;
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let body = serde_json::to_string(&Value::Object(fields.0)).unwrap_or_default();
        let rest = body.strip_prefix('{').unwrap_or("}");
        let comma = if rest == "}" { "" } else { "," };
        let line = format!(
            "{{\"t_ns\":{t_ns},\"thread\":{},\"cat\":\"{}\"{comma}{rest}\n",
            json_str(&thread_name()),
            CATEGORIES.get(cat).copied().unwrap_or("?"),
        );
        state.written += 1;
        Self::write_line(&mut state, &line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &Shared) -> Vec<Value> {
        String::from_utf8(out.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn events_become_json_lines_of_their_categories_only() {
        let out = Shared::default();
        let plan = TracePlan::new("-", Some("hypercall,faults"), None).unwrap();
        let trace = Trace::to_writer(&plan, Box::new(out.clone()));
        tracing::dispatcher::with_default(&trace.dispatch(), || {
            tracing::info!(target: "irvm::hypercall", kind = "call", name = "update", status = 0u64, requester = %format_args!("{:#x}", 0x18));
            tracing::info!(target: "irvm::ir", kind = "signal", index = 3u32);
            tracing::info!(target: "elsewhere", kind = "noise");
            tracing::info!(target: "irvm::faults", kind = "ir", reason = 0x22u8, ok = false);
        });
        let totals = trace.finish();
        let got = lines(&out);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            totals,
            TraceTotals {
                written: 2,
                dropped: 0
            }
        );
        assert_eq!(got[0]["cat"], "hypercall");
        assert_eq!(got[0]["name"], "update");
        assert_eq!(got[0]["requester"], "0x18");
        assert!(got[0]["thread"].is_string() && got[0]["t_ns"].is_u64());
        assert_eq!(
            (got[1]["reason"].as_u64(), got[1]["ok"].as_bool()),
            (Some(0x22), Some(false))
        );
    }

    #[test]
    fn a_flood_is_cut_at_the_limit_and_the_cut_is_recorded() {
        let out = Shared::default();
        let plan = TracePlan::new("-", None, Some(10)).unwrap();
        let trace = Trace::to_writer(&plan, Box::new(out.clone()));
        tracing::dispatcher::with_default(&trace.dispatch(), || {
            for i in 0..1000u32 {
                tracing::info!(target: "irvm::ir", kind = "signal", index = i);
            }
            tracing::info!(target: "irvm::vtd", kind = "gcmd");
        });
        let totals = trace.finish();
        let got = lines(&out);
        assert!(totals.dropped >= 990 - 10, "{totals:?}");
        let dropped: u64 = got
            .iter()
            .filter(|v| v["kind"] == "dropped")
            .map(|v| v["dropped"].as_u64().unwrap())
            .sum();
        assert_eq!(dropped, totals.dropped);
        assert_eq!(got.iter().filter(|v| v["cat"] == "vtd").count(), 1);
        assert!(got.len() <= 10 * 2 + 3, "{}", got.len());
    }

    #[test]
    fn threads_started_by_a_traced_thread_trace_to_the_same_file() {
        let out = Shared::default();
        let plan = TracePlan::new("-", None, None).unwrap();
        let trace = Trace::to_writer(&plan, Box::new(out.clone()));
        tracing::dispatcher::with_default(&trace.dispatch(), || {
            crate::threads::spawn(crate::seccomp::ThreadKind::Storms, "child".into(), || {
                tracing::info!(target: "irvm::routes", kind = "commit");
            })
            .unwrap()
            .join()
            .unwrap();
        });
        // Not traced: this thread has no trace of its own.
        crate::threads::spawn(
            crate::seccomp::ThreadKind::Storms,
            "stranger".into(),
            || {
                tracing::info!(target: "irvm::routes", kind = "commit");
            },
        )
        .unwrap()
        .join()
        .unwrap();
        trace.finish();
        let got = lines(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["thread"], "child");
    }

    #[test]
    fn plans_refuse_unknown_categories_and_zero_limits() {
        assert!(TracePlan::new("t.jsonl", Some("ir,disk"), None)
            .unwrap_err()
            .contains("disk"));
        TracePlan::new("t.jsonl", None, Some(0)).unwrap_err();
        TracePlan::new("", None, None).unwrap_err();
        assert_eq!(
            TracePlan::new("-", Some("all"), None)
                .unwrap()
                .categories
                .len(),
            7
        );
    }
}
