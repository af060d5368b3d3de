//! The supervisor's answers to the control API (`docs/api.md`): what the VM is and
//! holds, as JSON copied out under each lock and sent back to the connection's thread,
//! which does the writing. The actions (pause, resume, snapshot, shutdown) are in
//! `running`, where the supervisor's loop is.

use serde_json::{json, Map, Value};

use super::*;
use crate::api::http::Refusal;
use crate::api::route::{Injection, LineLevel, TableQuery};
use crate::api::{ApiReply, ApiRequest, Body};

/// What the supervisor knows of the run that the VM's parts do not.
#[derive(Debug, Clone, Copy)]
pub(super) struct RunState {
    /// When the VM started running.
    pub(super) began: Instant,
    /// Whether it is paused.
    pub(super) paused: bool,
}

fn hex(n: u64) -> String {
    format!("{n:#x}")
}

fn bdf(rid: u16) -> String {
    format!("{:02x}:{:02x}.{}", rid >> 8, (rid >> 3) & 0x1f, rid & 7)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Vm<'_> {
    /// Answers a query or a test action (the actions on the VM's run are the loop's).
    pub(super) fn query(&self, request: &ApiRequest, run: RunState) -> ApiReply {
        if request.is_test_action() && !self.config.machine.harness {
            return Err(Refusal::new(
                403,
                "test actions need the test harness (--harness on); this VM runs without it",
            ));
        }
        let body = match request {
            ApiRequest::Info => Body::Json(self.info(run)),
            ApiRequest::Table(q) => Body::Json(self.table(q)),
            ApiRequest::Routes => Body::Json(self.routes()),
            ApiRequest::Faults => Body::Json(self.faults()),
            ApiRequest::Storms => Body::Json(self.storms()),
            ApiRequest::Devices => Body::Json(self.devices()),
            ApiRequest::Metrics => Body::Json(self.metrics(run)),
            ApiRequest::Prometheus => Body::Text(prometheus(&self.metrics(run))),
            ApiRequest::Raise { requester, slot } => self.raise(*requester, *slot)?,
            ApiRequest::Inject { failure, count } => self.inject(*failure, *count)?,
            ApiRequest::IoapicLine { pin, level } => self.line(*pin, *level)?,
            ApiRequest::Ping
            | ApiRequest::Pause
            | ApiRequest::Resume
            | ApiRequest::Snapshot { .. }
            | ApiRequest::Shutdown => {
                return Err(Refusal::new(500, "not a query"));
            }
        };
        Ok(body)
    }

    fn info(&self, run: RunState) -> Value {
        let m = &self.config.machine;
        json!({
            "state": if run.paused { "paused" } else { "running" },
            "uptime_ms": millis(run.began.elapsed()),
            "vcpus": m.cpus,
            "memory_bytes": m.memory,
            "kernel": match &m.kernel {
                crate::config::Kernel::BuiltIn => "built-in test guest".to_string(),
                crate::config::Kernel::Elf(p) => p.display().to_string(),
            },
            "harness": m.harness,
            "restored_from": self.restored_from.as_ref().map(|p| p.display().to_string()),
            "machine": serde_json::to_value(m.settings()).unwrap_or(Value::Null),
            "devices": self.config.machine.devices.iter().map(|d| json!({
                "device": d.to_string(),
                "requester": hex(u64::from(d.requester_id())),
                "bdf": bdf(d.requester_id()),
            })).collect::<Vec<_>>(),
        })
    }

    fn table(&self, q: &TableQuery) -> Value {
        let backing = self.backing.lock();
        let table = backing.table();
        let path = backing.path();
        let size = table.size();
        let end = q.to.map_or(size, |t| t.min(size));
        let eim = table.eim();
        let mut entries = Vec::new();
        let mut next = None;
        for index in q.from.min(end)..end {
            let owner = backing.owner(index);
            if q.requester.is_some_and(|r| owner.map(|o| o.0) != Some(r)) {
                continue;
            }
            let raw = table.raw(index).unwrap_or_default();
            let present = raw[0] & 1 != 0;
            if q.present.is_some_and(|p| p != present) {
                continue;
            }
            if entries.len() == q.limit as usize {
                next = Some(index);
                break;
            }
            entries.push(entry_json(index, raw, eim, owner, &path));
        }
        drop(backing);
        json!({
            "size": size,
            "eim": eim,
            "from": q.from,
            "to": end,
            "count": entries.len(),
            "next": next,
            "entries": entries,
        })
    }

    fn routes(&self) -> Value {
        let backing = self.backing.lock();
        let routes = backing.routes();
        let stats = backing.stats();
        let owners: Vec<Value> = routes
            .owners()
            .iter()
            .map(|o| {
                json!({ "owner": o.owner.0, "name": o.name, "routes": o.routes, "budget": o.budget })
            })
            .collect();
        json!({
            "limit": routes.limit(),
            "capacity": routes.capacity(),
            "committed_msi_routes": routes.committed_msi_routes(),
            "staged_msi_routes": routes.staged_msi_routes(),
            "best_effort_routes_left": backing.best_effort_routes_left(),
            "lines": stats.lines,
            "live_entries": stats.live,
            "bound_entries": stats.bound,
            "free_entries": backing.free_entries(),
            "commits": stats.route_commits,
            "commit_time_ms": millis(stats.route_commit_time),
            "last_commit_time_ms": millis(stats.last_route_commit_time),
            "owners": owners,
        })
    }

    fn faults(&self) -> Value {
        let path = self.backing.lock().path();
        let vtd = self.vtd.lock().unwrap_or_else(PoisonError::into_inner);
        let regs = vtd.snapshot();
        let dma = vtd.dma().faults_by_reason();
        let counters = vtd.counters();
        drop(vtd);
        let by_reason = |list: Vec<(u8, u64)>| -> Map<String, Value> {
            list.into_iter()
                .map(|(code, n)| (format!("{code:#x}"), json!(n)))
                .collect()
        };
        let records: Vec<Value> = regs
            .frcd
            .iter()
            .enumerate()
            .filter(|(_, r)| r[1] >> 63 != 0)
            .map(|(i, r)| {
                json!({
                    "record": i,
                    "raw": [hex(r[0]), hex(r[1])],
                    "reason": hex((r[1] >> 32) & 0xff),
                    "source_id": hex(r[1] & 0xffff),
                    "info": hex(r[0]),
                    "read": (r[1] >> 62) & 1 == 1,
                })
            })
            .collect();
        json!({
            "remapping": by_reason(remap_faults(&self.backing)),
            "remapping_log_dropped": path.fault_log().dropped(),
            "dma": by_reason(dma),
            "vtd": {
                "fsts": hex(u64::from(regs.fsts)),
                "fectl": hex(u64::from(regs.fectl)),
                "records": records,
                "recorded": counters.faults_recorded,
                "overflowed": counters.faults_overflowed,
            },
        })
    }

    fn storms(&self) -> Value {
        let s = self.path.storm_stats();
        json!({
            "rate_per_second": s.rate,
            "throttled": s.throttled,
            "entries_throttled": s.entries,
            "flushed": s.flushed,
        })
    }

    fn devices(&self) -> Value {
        let list: Vec<Value> = self
            .pci
            .status()
            .into_iter()
            .map(|s| {
                let r = &s.report;
                let rid = r.device.requester_id();
                let mut v = json!({
                    "device": r.device.to_string(),
                    "requester": hex(u64::from(rid)),
                    "bdf": bdf(rid),
                    "busy": r.busy,
                    "completions": r.completions,
                    "faults": r.faults,
                    "resets": r.resets,
                    "dropped": r.dropped,
                });
                if let (Some((used, total)), Some(obj)) = (s.in_use, v.as_object_mut()) {
                    obj.insert("in_use".into(), json!(used));
                    obj.insert("capacity".into(), json!(total));
                }
                if let (Some(remote), Some(obj)) = (r.remote, v.as_object_mut()) {
                    obj.insert(
                        "remote".into(),
                        json!({
                            "failed": remote.failed,
                            "lost": remote.lost,
                            "entry_messages": remote.entry_messages,
                        }),
                    );
                }
                v
            })
            .collect();
        json!({ "devices": list })
    }

    fn metrics(&self, run: RunState) -> Value {
        let stats = self.backing.lock().stats();
        let hc = self.dispatcher.stats();
        let vtd = self
            .vtd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters();
        let calls: Map<String, Value> = hc
            .calls
            .iter()
            .map(|c| {
                (
                    c.name.to_lowercase(),
                    json!({ "calls": c.calls, "errors": c.errors,
                            "mean_us": c.mean.as_secs_f64() * 1e6, "max_us": c.max.as_secs_f64() * 1e6 }),
                )
            })
            .collect();
        let counters = &self.shared.counters;
        json!({
            "uptime_ms": millis(run.began.elapsed()),
            "hypercalls": { "calls": calls, "unknown": hc.unknown, "throttled": hc.throttled },
            "remapping": {
                "transactions": stats.transactions,
                "rollbacks": stats.rollbacks,
                "route_commits": stats.route_commits,
                "route_commit_time_ms": millis(stats.route_commit_time),
                "retire_errors": stats.retire_errors,
                "live_entries": stats.live,
                "lines": stats.lines,
                "bound_entries": stats.bound,
                "write_errors": self.path.write_errors(),
            },
            "faults": self.faults(),
            "storms": self.storms(),
            "vtd": {
                "descriptors": vtd.descriptors,
                "entries_loaded": vtd.entries_loaded,
                "commits": vtd.commits,
                "commit_failures": vtd.commit_failures,
                "queue_errors": vtd.queue_errors,
                "events": vtd.events,
                "bad_accesses": vtd.bad_accesses,
            },
            "devices": self.devices().get("devices").cloned().unwrap_or_default(),
            "exits": {
                "unmapped_pio": counters.unmapped_pio.load(Ordering::Relaxed),
                "unmapped_mmio": counters.unmapped_mmio.load(Ordering::Relaxed),
            },
            "harness_fired": self.harness.fired.iter().map(|n| n.load(Ordering::Relaxed)).collect::<Vec<_>>(),
        })
    }

    fn raise(&self, requester: u16, slot: u32) -> Result<Body, Refusal> {
        let devices = self.pci.slot_devices();
        let Some((_, dev)) = devices.iter().find(|(rid, _)| *rid == requester) else {
            return Err(Refusal::new(
                404,
                format!("no slot-array device with requester {}", bdf(requester)),
            ));
        };
        let slots = self
            .config
            .machine
            .devices
            .iter()
            .find(|d| d.requester_id() == requester)
            .map_or(0, |d| match d.kind {
                crate::config::DeviceKind::ImsSlots { slots, .. } => slots,
                _ => 0,
            });
        if slot >= slots {
            return Err(Refusal::new(
                400,
                format!("the device has {slots} slots; slot {slot} is not one"),
            ));
        }
        dev.raise_slot(slot as usize);
        Ok(Body::Empty)
    }

    fn inject(&self, failure: Injection, count: u32) -> Result<Body, Refusal> {
        let Some(faults) = &self.injected_faults else {
            return Err(Refusal::new(403, "this VM has no fault injection"));
        };
        match failure {
            Injection::RouteCommit => faults.fail_route_commits(count),
            Injection::Irqfd => faults.fail_irqfd_assigns(count),
        }
        Ok(Body::Empty)
    }

    fn line(&self, pin: u8, level: LineLevel) -> Result<Body, Refusal> {
        let pin = usize::from(pin);
        if pin >= ioapic::PINS {
            return Err(Refusal::new(
                400,
                format!("the IOAPIC has {} inputs", ioapic::PINS),
            ));
        }
        let mut io = self.ioapic.lock().unwrap_or_else(PoisonError::into_inner);
        let before = io.sent();
        match level {
            LineLevel::Low => io.set_level(pin, false),
            LineLevel::High => io.set_level(pin, true),
            LineLevel::Pulse => io.pulse(pin),
        }
        let sent = io.sent().saturating_sub(before);
        Ok(Body::Json(json!({ "pin": pin, "interrupts_sent": sent })))
    }
}

/// One table entry as the API shows it.
fn entry_json(
    index: u32,
    raw: [u64; 2],
    eim: bool,
    owner: Option<(u16, bool)>,
    path: &InterruptPath,
) -> Value {
    let mut v = json!({
        "index": index,
        "raw": [hex(raw[0]), hex(raw[1])],
        "present": raw[0] & 1 != 0,
        "owner": owner.map(|(rid, _)| hex(u64::from(rid))),
        "owner_bdf": owner.map(|(rid, _)| bdf(rid)),
        "managed": owner.is_some_and(|(_, m)| m),
        "live": path.is_live(index),
        "delivered": path.delivered(index),
        "faults": path.faults(index),
    });
    let decoded = match irq::irte::Irte::decode(raw, eim) {
        Ok(irte) if irte.present => {
            let t = irte.target;
            let validation = match irte.validation {
                irq::irte::SourceValidation::None => json!({ "type": "none" }),
                irq::irte::SourceValidation::RequesterId { sid, qualifier } => {
                    json!({ "type": "requester", "sid": hex(u64::from(sid)), "qualifier": qualifier })
                }
                irq::irte::SourceValidation::BusRange { first, last } => {
                    json!({ "type": "bus_range", "first": first, "last": last })
                }
            };
            json!({
                "target": {
                    "destination": t.dest,
                    "vector": t.vector,
                    "delivery": format!("{:?}", t.delivery).to_lowercase(),
                    "logical": t.logical,
                    "level": t.level,
                    "redirection_hint": t.redirection_hint,
                },
                "fpd": irte.fault_processing_disable,
                "validation": validation,
            })
        }
        Ok(_) => Value::Null,
        Err(e) => json!({ "invalid": e.to_string() }),
    };
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), decoded) {
        obj.extend(extra);
    }
    v
}

/// The metrics document in the Prometheus text format: every number under its path
/// (`vmm_remapping_live_entries`), list items as an `index` label, booleans as 0/1.
pub(crate) fn prometheus(metrics: &Value) -> String {
    let mut lines = Vec::new();
    flatten("vmm", metrics, &mut Vec::new(), &mut lines);
    // Each metric's samples together, under one TYPE line (the sort is stable).
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    let mut last = String::new();
    for (name, labels, value) in lines {
        if name != last {
            out.push_str(&format!("# TYPE {name} gauge\n"));
            last.clone_from(&name);
        }
        if labels.is_empty() {
            out.push_str(&format!("{name} {value}\n"));
        } else {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            out.push_str(&format!("{name}{{{}}} {value}\n", labels.join(",")));
        }
    }
    out
}

type Line = (String, Vec<(String, String)>, String);

fn metric_name(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn flatten(name: &str, v: &Value, labels: &mut Vec<(String, String)>, out: &mut Vec<Line>) {
    match v {
        Value::Number(n) => out.push((name.to_string(), labels.clone(), n.to_string())),
        Value::Bool(b) => out.push((name.to_string(), labels.clone(), u8::from(*b).to_string())),
        Value::Object(map) => {
            for (k, child) in map {
                flatten(&format!("{name}_{}", metric_name(k)), child, labels, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                labels.push(("index".into(), i.to_string()));
                flatten(name, child, labels, out);
                labels.pop();
            }
        }
        Value::String(_) | Value::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_every_number_by_its_path() {
        let text = prometheus(&json!({
            "remapping": { "live_entries": 3, "vtd on": true },
            "harness_fired": [1, 2],
            "devices": [{ "faults": 1, "resets": 2 }, { "faults": 3, "resets": 4 }],
            "name": "skipped",
        }));
        assert!(text.contains("vmm_remapping_live_entries 3\n"), "{text}");
        assert!(text.contains("vmm_remapping_vtd_on 1\n"), "{text}");
        assert!(
            text.contains("vmm_harness_fired{index=\"1\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("skipped"));
        assert_eq!(text.matches("# TYPE vmm_harness_fired gauge").count(), 1);
        assert_eq!(text.matches("# TYPE vmm_devices_faults gauge").count(), 1);
        let faults = text.find("vmm_devices_faults{index=\"1\"} 3").unwrap();
        assert!(text.find("vmm_devices_faults{index=\"0\"} 1").unwrap() < faults);
    }
}
