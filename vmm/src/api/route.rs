//! From a request's method, target and body to what it asks of the VM
//! ([`ApiRequest`]), or a `4xx` saying why not. Every endpoint of `docs/api.md` is here.

use std::path::PathBuf;

use serde::Deserialize;

use super::http::Refusal;

/// The version prefix of every endpoint.
pub const PREFIX: &str = "/api/v1/";

/// Which rows of the remapping table a query wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableQuery {
    /// Only entries allocated to this requester.
    pub requester: Option<u16>,
    /// Only present (`true`) or only absent (`false`) entries.
    pub present: Option<bool>,
    /// The first index looked at.
    pub from: u32,
    /// One past the last index looked at (`None`: the end of the table).
    pub to: Option<u32>,
    /// The most entries returned; the answer says where to go on.
    pub limit: u32,
}

/// The most table entries one answer holds.
pub const MAX_TABLE_LIMIT: u32 = 65_536;
/// Table entries per answer when the query does not say.
pub const DEFAULT_TABLE_LIMIT: u32 = 1024;

/// A KVM call the next attempts of which fail (test mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injection {
    /// `KVM_SET_GSI_ROUTING` (a route commit).
    RouteCommit,
    /// `KVM_IRQFD` assignment.
    Irqfd,
}

/// What to do to an IOAPIC input (test mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineLevel {
    /// Deassert it.
    Low,
    /// Assert it and hold it.
    High,
    /// Assert and deassert it (an edge).
    Pulse,
}

/// What a request asks of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET vmm.ping`: the server itself answers.
    Ping,
    /// `GET vm.info`.
    Info,
    /// `PUT vm.pause`.
    Pause,
    /// `PUT vm.resume`.
    Resume,
    /// `PUT vm.snapshot`.
    Snapshot {
        /// The file.
        path: PathBuf,
    },
    /// `PUT vm.shutdown`.
    Shutdown,
    /// `GET interrupts/table`.
    Table(TableQuery),
    /// `GET interrupts/routes`.
    Routes,
    /// `GET interrupts/faults`.
    Faults,
    /// `GET interrupts/storms`.
    Storms,
    /// `GET devices`.
    Devices,
    /// `GET metrics`.
    Metrics,
    /// `GET /metrics` or `metrics/prometheus`.
    Prometheus,
    /// `PUT test/raise`.
    Raise {
        /// The device's requester ID.
        requester: u16,
        /// Its message slot.
        slot: u32,
    },
    /// `PUT test/inject`.
    Inject {
        /// Which call fails.
        failure: Injection,
        /// How many of its next attempts.
        count: u32,
    },
    /// `PUT test/ioapic_line`.
    IoapicLine {
        /// The input.
        pin: u8,
        /// What happens to it.
        level: LineLevel,
    },
}

impl ApiRequest {
    /// Whether it is a test action (refused unless the VM has the test harness).
    #[must_use]
    pub fn is_test_action(&self) -> bool {
        matches!(
            self,
            Self::Raise { .. } | Self::Inject { .. } | Self::IoapicLine { .. }
        )
    }
}

/// A requester ID as `0x18`, `24` or `00:03.0` (bus:device.function).
///
/// # Errors
/// A message naming the text.
pub fn requester(text: &str) -> Result<u16, String> {
    let bad = || format!("`{text}` is not a requester ID (0x18, 24 or 00:03.0)");
    if let Some((bus, rest)) = text.split_once(':') {
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
        let dev = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
        let func = u8::from_str_radix(func, 16).map_err(|_| bad())?;
        if dev > 31 || func > 7 {
            return Err(bad());
        }
        return Ok(u16::from(bus) << 8 | u16::from(dev) << 3 | u16::from(func));
    }
    number(text)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(bad)
}

/// A number in decimal or (with `0x`) hexadecimal.
fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(400, message)
}

fn table_query(query: &str) -> Result<TableQuery, Refusal> {
    let mut q = TableQuery {
        requester: None,
        present: None,
        from: 0,
        to: None,
        limit: DEFAULT_TABLE_LIMIT,
    };
    let index = |key: &str, value: &str| {
        number(value)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("`{key}={value}`: not an index")))
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "requester" => q.requester = Some(requester(value).map_err(bad)?),
            "present" => {
                q.present = Some(match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad(format!("`present={value}`: expected true or false"))),
                });
            }
            "from" => q.from = index(key, value)?,
            "to" => q.to = Some(index(key, value)?),
            "limit" => {
                q.limit = index(key, value)?;
                if !(1..=MAX_TABLE_LIMIT).contains(&q.limit) {
                    return Err(bad(format!("`limit` is 1 to {MAX_TABLE_LIMIT}")));
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown parameter `{key}` (requester, present, from, to, limit)"
                )))
            }
        }
    }
    if q.to.is_some_and(|to| to < q.from) {
        return Err(bad("`to` is below `from`"));
    }
    Ok(q)
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    path: Option<PathBuf>,
    /// cloud-hypervisor's spelling: `file:///dir/file`.
    destination_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RaiseBody {
    requester: RequesterField,
    slot: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RequesterField {
    Number(u16),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectBody {
    failure: Injection,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    pin: u8,
    level: LineLevel,
}

fn snapshot(body: &[u8]) -> Result<ApiRequest, Refusal> {
    let b: SnapshotBody = json(body)?;
    let path = match (b.path, b.destination_url) {
        (Some(p), None) => p,
        (None, Some(url)) => match url.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None => return Err(bad("`destination_url` must be file:///path")),
        },
        _ => return Err(bad("give the snapshot's `path` (or `destination_url`)")),
    };
    if path.as_os_str().is_empty() {
        return Err(bad("the snapshot's path is empty"));
    }
    Ok(ApiRequest::Snapshot { path })
}

/// What `method` on `target` with `body` asks.
///
/// # Errors
/// `404` for an unknown path, `405` for the wrong method, `400` for a bad query or body.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, Refusal> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let endpoint = if path == "/metrics" {
        "metrics/prometheus"
    } else {
        path.strip_prefix(PREFIX)
            .ok_or_else(|| Refusal::new(404, format!("no endpoint `{path}` (see docs/api.md)")))?
    };
    let get = matches!(
        endpoint,
        "vmm.ping"
            | "vm.info"
            | "interrupts/table"
            | "interrupts/routes"
            | "interrupts/faults"
            | "interrupts/storms"
            | "devices"
            | "metrics"
            | "metrics/prometheus"
    );
    let put = matches!(
        endpoint,
        "vm.pause"
            | "vm.resume"
            | "vm.snapshot"
            | "vm.shutdown"
            | "test/raise"
            | "test/inject"
            | "test/ioapic_line"
    );
    let wanted = match (get, put) {
        (true, _) => "GET",
        (_, true) => "PUT",
        _ => {
            return Err(Refusal::new(
                404,
                format!("no endpoint `{path}` (see docs/api.md)"),
            ))
        }
    };
    if method != wanted {
        return Err(Refusal::new(
            405,
            format!("`{endpoint}` takes {wanted}, not {method}"),
        ));
    }
    if endpoint != "interrupts/table" && !query.is_empty() {
        return Err(bad(format!("`{endpoint}` takes no parameters")));
    }
    Ok(match endpoint {
        "vmm.ping" => ApiRequest::Ping,
        "vm.info" => ApiRequest::Info,
        "vm.pause" => ApiRequest::Pause,
        "vm.resume" => ApiRequest::Resume,
        "vm.snapshot" => snapshot(body)?,
        "vm.shutdown" => ApiRequest::Shutdown,
        "interrupts/table" => ApiRequest::Table(table_query(query)?),
        "interrupts/routes" => ApiRequest::Routes,
        "interrupts/faults" => ApiRequest::Faults,
        "interrupts/storms" => ApiRequest::Storms,
        "devices" => ApiRequest::Devices,
        "metrics" => ApiRequest::Metrics,
        "metrics/prometheus" => ApiRequest::Prometheus,
        "test/raise" => {
            let b: RaiseBody = json(body)?;
            let requester = match b.requester {
                RequesterField::Number(n) => n,
                RequesterField::Text(t) => requester(&t).map_err(bad)?,
            };
            ApiRequest::Raise {
                requester,
                slot: b.slot,
            }
        }
        "test/inject" => {
            let b: InjectBody = json(body)?;
            if !(1..=1000).contains(&b.count) {
                return Err(bad("`count` is 1 to 1000"));
            }
            ApiRequest::Inject {
                failure: b.failure,
                count: b.count,
            }
        }
        _ => {
            let b: LineBody = json(body)?;
            ApiRequest::IoapicLine {
                pin: b.pin,
                level: b.level,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_routes_with_its_method() {
        let ok = |m: &str, t: &str, b: &str| route(m, t, b.as_bytes()).unwrap();
        assert_eq!(ok("GET", "/api/v1/vm.info", ""), ApiRequest::Info);
        assert_eq!(ok("PUT", "/api/v1/vm.pause", ""), ApiRequest::Pause);
        assert_eq!(ok("GET", "/metrics", ""), ApiRequest::Prometheus);
        assert_eq!(
            ok(
                "PUT",
                "/api/v1/vm.snapshot",
                r#"{"destination_url":"file:///tmp/a"}"#
            ),
            ApiRequest::Snapshot {
                path: "/tmp/a".into()
            }
        );
        assert_eq!(
            ok(
                "PUT",
                "/api/v1/test/raise",
                r#"{"requester":"00:03.0","slot":7}"#
            ),
            ApiRequest::Raise {
                requester: 0x18,
                slot: 7
            }
        );
        assert_eq!(
            ok(
                "PUT",
                "/api/v1/test/inject",
                r#"{"failure":"route_commit"}"#
            ),
            ApiRequest::Inject {
                failure: Injection::RouteCommit,
                count: 1
            }
        );
        assert_eq!(
            ok(
                "GET",
                "/api/v1/interrupts/table?requester=0x18&present=true&from=16&to=0x40&limit=8",
                ""
            ),
            ApiRequest::Table(TableQuery {
                requester: Some(0x18),
                present: Some(true),
                from: 16,
                to: Some(64),
                limit: 8
            })
        );
    }

    #[test]
    fn wrong_paths_methods_queries_and_bodies_say_why() {
        let status = |m: &str, t: &str, b: &str| route(m, t, b.as_bytes()).unwrap_err().status;
        assert_eq!(status("GET", "/api/v2/vm.info", ""), 404);
        assert_eq!(status("GET", "/api/v1/vm.nothing", ""), 404);
        assert_eq!(status("GET", "/api/v1/vm.pause", ""), 405);
        assert_eq!(status("PUT", "/api/v1/vm.info", ""), 405);
        assert_eq!(status("GET", "/api/v1/vm.info?x=1", ""), 400);
        assert_eq!(status("GET", "/api/v1/interrupts/table?limit=0", ""), 400);
        assert_eq!(
            status("GET", "/api/v1/interrupts/table?from=9&to=3", ""),
            400
        );
        assert_eq!(
            status("GET", "/api/v1/interrupts/table?requester=1:99.0", ""),
            400
        );
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", "{"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", r#"{"path":""}"#), 400);
        assert_eq!(
            status("PUT", "/api/v1/test/inject", r#"{"failure":"disk"}"#),
            400
        );
        assert_eq!(
            status(
                "PUT",
                "/api/v1/test/inject",
                r#"{"failure":"irqfd","count":0}"#
            ),
            400
        );
        assert_eq!(status("PUT", "/api/v1/test/raise", r#"{"slot":1}"#), 400);
    }

    #[test]
    fn requesters_read_as_numbers_or_bdf() {
        assert_eq!(requester("00:03.0"), Ok(0x18));
        assert_eq!(requester("0x18"), Ok(0x18));
        assert_eq!(requester("24"), Ok(24));
        assert_eq!(requester("ff:1f.7"), Ok(0xffff));
        requester("70000").unwrap_err();
        requester("00:20.0").unwrap_err();
    }
}
