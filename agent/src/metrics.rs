//! Prometheus metrics (prometheus-client): requests by key/profile/result, latency, denials,
//! backend health, queue depth and the audit writer; served on an optional loopback listener.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: String,
    key: String,
    profile: String,
    /// `ok` or the stable error code.
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

/// Every metric the agent exports. Label values come from the agent's own tables (key
/// names it holds, profile names it knows, error codes), never from free request text, so a
/// client cannot grow the series set.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
    denied: Family<ReasonLabels, Counter>,
    backend_up: Family<BackendLabels, Gauge>,
    queue_depth: Gauge,
    connections: Gauge,
    locked_keys: Gauge,
    audit_commit: Histogram,
    audit_records: Counter,
    audit_dropped: Counter,
    audit_queued: Gauge,
    audit_available: Gauge,
    /// Unix time (s) of the last durable commit, for an "audit stalled" alert.
    audit_last_commit: Gauge,
    last_commit_s: AtomicU64,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keyward");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Signing requests by op, key, profile and result (ok or the error code)",
            requests.clone(),
        );
        let latency = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
        });
        registry.register(
            "request_duration_seconds",
            "Time from a signing request's arrival to its answer (audit wait included)",
            latency.clone(),
        );
        let denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "denied",
            "Signing requests refused: policy_denied, rate_limited, locked, key_disabled, forbidden",
            denied.clone(),
        );
        let backend_up = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_up",
            "1 when the backend (soft, pkcs11:<alias>, tpm:<alias>) is connected",
            backend_up.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Signing jobs waiting for a worker",
            queue_depth.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let locked_keys = Gauge::default();
        registry.register(
            "locks",
            "Active locks (a lock of all keys counts once)",
            locked_keys.clone(),
        );
        let audit_commit = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "audit_commit_seconds",
            "Write + fsync time of one audit group commit",
            audit_commit.clone(),
        );
        let audit_records = Counter::default();
        registry.register(
            "audit_records",
            "Audit records made durable",
            audit_records.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records that could not be written (fail-open keys kept signing)",
            audit_dropped.clone(),
        );
        let audit_queued = Gauge::default();
        registry.register(
            "audit_queued",
            "Audit records waiting to be written (the log's lag)",
            audit_queued.clone(),
        );
        let audit_available = Gauge::default();
        registry.register(
            "audit_available",
            "1 while the audit log can be written",
            audit_available.clone(),
        );
        let audit_last_commit = Gauge::default();
        registry.register(
            "audit_last_commit_timestamp_seconds",
            "Unix time of the last durable audit commit",
            audit_last_commit.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            denied,
            backend_up,
            queue_depth,
            connections,
            locked_keys,
            audit_commit,
            audit_records,
            audit_dropped,
            audit_queued,
            audit_available,
            audit_last_commit,
            last_commit_s: AtomicU64::new(0),
        }
    }

    /// One answered signing request. `key` must be a key the agent holds (or a placeholder).
    pub fn request(&self, op: &str, key: &str, profile: &str, result: &str, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                op: op.into(),
                key: key.into(),
                profile: profile.into(),
                result: result.into(),
            })
            .inc();
        self.latency
            .get_or_create(&OpLabels { op: op.into() })
            .observe(took.as_secs_f64());
        if matches!(
            result,
            "policy_denied" | "rate_limited" | "locked" | "key_disabled" | "forbidden"
        ) {
            self.denied
                .get_or_create(&ReasonLabels {
                    reason: result.into(),
                })
                .inc();
        }
    }

    /// Values read at scrape time.
    pub fn set_gauges(&self, g: Gauges<'_>) {
        self.queue_depth.set(to_i64(g.queue_depth as u64));
        self.connections.set(to_i64(g.connections as u64));
        self.locked_keys.set(to_i64(g.locks as u64));
        self.audit_queued.set(to_i64(g.audit_queued));
        self.audit_available.set(i64::from(g.audit_available));
        self.audit_last_commit
            .set(to_i64(self.last_commit_s.load(Ordering::Relaxed)));
        for (name, up) in g.backends {
            self.backend_up
                .get_or_create(&BackendLabels {
                    backend: name.clone(),
                })
                .set(i64::from(*up));
        }
    }

    /// The text exposition format (`GET /metrics`, and the `status` op).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Scrape-time values, from the agent's state.
pub struct Gauges<'a> {
    pub queue_depth: usize,
    pub connections: usize,
    pub locks: usize,
    pub audit_queued: u64,
    pub audit_available: bool,
    pub backends: &'a [(String, bool)],
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl keyward::audit::Observer for Metrics {
    fn committed(&self, took: Duration, records: usize) {
        self.audit_commit.observe(took.as_secs_f64());
        self.audit_records.inc_by(records as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_commit_s.store(now, Ordering::Relaxed);
    }

    fn dropped(&self, records: usize) {
        self.audit_dropped.inc_by(records as u64);
    }
}

/// Largest HTTP request head read from a scraper.
const MAX_HEAD: usize = 8 * 1024;
/// A scraper that does not finish its request in this time is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `GET /metrics` on `listener`, on a thread of its own: a scrape is answered even while
/// every runtime thread is busy with signing load. One scrape at a time is plenty.
pub fn serve<F>(listener: TcpListener, render: F) -> std::io::Result<()>
where
    F: Fn() -> String + Send + 'static,
{
    std::thread::Builder::new()
        .name("keyward-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        let _ = answer(s, &render);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .map(|_| ())
}

fn answer(mut s: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    s.set_read_timeout(Some(HEAD_TIMEOUT))?;
    s.set_write_timeout(Some(HEAD_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, ctype, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        (Some(b"GET"), _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_denials_appear_in_the_exposition() {
        let m = Metrics::new();
        m.request("sign", "k1", "raw", "ok", Duration::from_micros(50));
        m.request("sign", "k1", "raw", "locked", Duration::from_micros(5));
        keyward::audit::Observer::dropped(&m, 3);
        m.set_gauges(Gauges {
            queue_depth: 2,
            connections: 1,
            locks: 1,
            audit_queued: 0,
            audit_available: true,
            backends: &[("soft".into(), true), ("pkcs11:t".into(), false)],
        });
        let text = m.encode();
        for want in [
            r#"keyward_requests_total{op="sign",key="k1",profile="raw",result="ok"} 1"#,
            r#"keyward_denied_total{reason="locked"} 1"#,
            "keyward_audit_dropped_total 3",
            r#"keyward_backend_up{backend="pkcs11:t"} 0"#,
            "keyward_queue_depth 2",
            "keyward_request_duration_seconds_count{op=\"sign\"} 2",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
