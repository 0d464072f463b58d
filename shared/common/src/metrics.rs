//! Prometheus metrics: a small registry of labelled counters, gauges and histograms rendered in
//! the text exposition format (version 0.0.4), and a minimal HTTP endpoint serving `GET
//! /metrics` for scraping.
//!
//! Why not a metrics crate: the services need a handful of families, and the text format is a
//! page of code; this keeps the dependency tree (and the 2-core build) small, with nothing to
//! keep in version step with tonic or OpenTelemetry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::Instrument as _;

/// Latency buckets (seconds) for RPCs: 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets for small counts (batch sizes, queue depths).
pub const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

type LabelValues = Vec<String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct HistogramState {
    /// Cumulative counts are computed at render time; these are per-bucket.
    bucket_counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    label_names: Vec<&'static str>,
    buckets: Vec<f64>,
    values: Mutex<BTreeMap<LabelValues, f64>>,
    histograms: Mutex<BTreeMap<LabelValues, HistogramState>>,
}

impl Family {
    fn labels(&self, values: &[&str]) -> LabelValues {
        debug_assert_eq!(values.len(), self.label_names.len(), "{}", self.name);
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.as_str());
        let pairs = |values: &LabelValues, extra: Option<(&str, String)>| -> String {
            let mut parts: Vec<String> = self
                .label_names
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        };
        match self.kind {
            Kind::Counter | Kind::Gauge => {
                let values = lock(&self.values);
                for (labels, v) in values.iter() {
                    let _ = writeln!(out, "{}{} {}", self.name, pairs(labels, None), v);
                }
            }
            Kind::Histogram => {
                let histograms = lock(&self.histograms);
                for (labels, h) in histograms.iter() {
                    let mut cumulative = 0;
                    for (bound, n) in self.buckets.iter().zip(&h.bucket_counts) {
                        cumulative += n;
                        let le = Some(("le", format!("{bound}")));
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {cumulative}",
                            self.name,
                            pairs(labels, le)
                        );
                    }
                    let inf = Some(("le", "+Inf".to_owned()));
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        self.name,
                        pairs(labels, inf),
                        h.count
                    );
                    let _ = writeln!(out, "{}_sum{} {}", self.name, pairs(labels, None), h.sum);
                    let _ = writeln!(
                        out,
                        "{}_count{} {}",
                        self.name,
                        pairs(labels, None),
                        h.count
                    );
                }
            }
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The metric families of one process. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<Vec<Arc<Family>>>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn add(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        label_names: &[&'static str],
        buckets: &[f64],
    ) -> Arc<Family> {
        let family = Arc::new(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            label_names: label_names.to_vec(),
            buckets: buckets.to_vec(),
            values: Mutex::default(),
            histograms: Mutex::default(),
        });
        lock(&self.families).push(family.clone());
        family
    }

    /// A counter family (monotonic totals).
    pub fn counter(&self, name: &str, help: &str, labels: &[&'static str]) -> Counter {
        Counter(self.add(name, help, Kind::Counter, labels, &[]))
    }

    /// A gauge family (values that go up and down).
    pub fn gauge(&self, name: &str, help: &str, labels: &[&'static str]) -> Gauge {
        Gauge(self.add(name, help, Kind::Gauge, labels, &[]))
    }

    /// A histogram family with the given upper bucket bounds (ascending).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&'static str],
        buckets: &[f64],
    ) -> Histogram {
        Histogram(self.add(name, help, Kind::Histogram, labels, buckets))
    }

    /// Every family in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for family in lock(&self.families).iter() {
            family.render(&mut out);
        }
        out
    }
}

/// A labelled counter.
#[derive(Debug, Clone)]
pub struct Counter(Arc<Family>);

impl Counter {
    pub fn inc_by(&self, labels: &[&str], by: f64) {
        *lock(&self.0.values)
            .entry(self.0.labels(labels))
            .or_default() += by;
    }

    pub fn inc(&self, labels: &[&str]) {
        self.inc_by(labels, 1.0);
    }

    /// The current value (0 when never incremented).
    pub fn get(&self, labels: &[&str]) -> f64 {
        lock(&self.0.values)
            .get(&self.0.labels(labels))
            .copied()
            .unwrap_or(0.0)
    }
}

/// A labelled gauge.
#[derive(Debug, Clone)]
pub struct Gauge(Arc<Family>);

impl Gauge {
    pub fn set(&self, labels: &[&str], value: f64) {
        lock(&self.0.values).insert(self.0.labels(labels), value);
    }

    pub fn add(&self, labels: &[&str], by: f64) {
        *lock(&self.0.values)
            .entry(self.0.labels(labels))
            .or_default() += by;
    }

    pub fn get(&self, labels: &[&str]) -> f64 {
        lock(&self.0.values)
            .get(&self.0.labels(labels))
            .copied()
            .unwrap_or(0.0)
    }
}

/// A labelled histogram.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Family>);

impl Histogram {
    pub fn observe(&self, labels: &[&str], value: f64) {
        let mut all = lock(&self.0.histograms);
        let h = all
            .entry(self.0.labels(labels))
            .or_insert_with(|| HistogramState {
                bucket_counts: vec![0; self.0.buckets.len()],
                ..HistogramState::default()
            });
        if let Some(i) = self.0.buckets.iter().position(|&b| value <= b) {
            h.bucket_counts[i] += 1;
        }
        h.sum += value;
        h.count += 1;
    }

    /// Observations so far under these labels.
    pub fn count(&self, labels: &[&str]) -> u64 {
        lock(&self.0.histograms)
            .get(&self.0.labels(labels))
            .map_or(0, |h| h.count)
    }
}

/// Per-RPC latency and outcome: `rsllm_rpc_duration_seconds{service, method, code}` (its
/// `_count` is the request count per status code).
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    service: &'static str,
    duration: Histogram,
    in_flight: Gauge,
}

/// Counts one call as in flight until dropped.
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge,
    labels: [String; 2],
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let [a, b] = &self.labels;
        self.gauge.add(&[a, b], -1.0);
    }
}

impl RpcMetrics {
    pub fn new(registry: &Registry, service: &'static str) -> RpcMetrics {
        RpcMetrics {
            service,
            duration: registry.histogram(
                "rsllm_rpc_duration_seconds",
                "Latency of handled gRPC calls, by service, method and status code.",
                &["service", "method", "code"],
                LATENCY_BUCKETS,
            ),
            in_flight: registry.gauge(
                "rsllm_rpc_in_flight",
                "gRPC calls being handled, by service and method.",
                &["service", "method"],
            ),
        }
    }

    /// Marks a call of `method` in flight for the life of the returned guard.
    pub fn in_flight(&self, method: &str) -> InFlight {
        self.in_flight.add(&[self.service, method], 1.0);
        InFlight {
            gauge: self.in_flight.clone(),
            labels: [self.service.to_owned(), method.to_owned()],
        }
    }

    /// The server span of one call of `method`, a child of the caller's trace context in
    /// `metadata` (create it before the request moves into the handler).
    pub fn span(&self, method: &str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
        crate::telemetry::rpc_span(&format!("{}/{method}", self.service), metadata)
    }

    /// Handles one call of `method`: runs `handler` inside `span`, counted in flight meanwhile,
    /// and records its latency by the status code it ended with. Every handler of the
    /// services goes through here, so each is measured and traced the same way.
    pub async fn observe<T, E: Into<tonic::Status>>(
        &self,
        method: &'static str,
        span: tracing::Span,
        handler: impl Future<Output = Result<T, E>>,
    ) -> Result<T, tonic::Status> {
        let started = Instant::now();
        let _in_flight = self.in_flight(method);
        let result = handler.instrument(span).await.map_err(Into::into);
        let code = result
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
        self.record(method, code, started.elapsed());
        result
    }

    /// Records one call that took `elapsed` and ended with `code`.
    pub fn record(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.duration.observe(
            &[self.service, method, code_name(code)],
            elapsed.as_secs_f64(),
        );
    }

    /// Calls recorded for `method` with `code`.
    pub fn count(&self, method: &str, code: tonic::Code) -> u64 {
        self.duration
            .count(&[self.service, method, code_name(code)])
    }
}

/// The canonical upper-case name of a gRPC status code (as the gRPC spec writes it).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Parses a `--metrics-listen` value: empty means no endpoint.
pub fn parse_listen(value: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .trim()
        .parse()
        .map(Some)
        .map_err(|e| format!("{value:?} is not host:port ({e})"))
}

/// Binds `addr` and serves the registry there in a background task until `shutdown`; returns
/// the bound address (port 0 picks a free one).
pub async fn spawn_endpoint(
    addr: std::net::SocketAddr,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "metrics on http://{bound}/metrics");
    tokio::spawn(serve(listener, registry, shutdown));
    Ok(bound)
}

/// Serves `GET /metrics` (the registry's text format) on `listener` until `shutdown` resolves.
/// One request per connection; anything else gets 404. Request heads over 8 KiB, or taking
/// more than 5 s, are dropped.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let (status, body) = if head.starts_with(b"GET /metrics ") {
                ("200 OK", registry.render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_owned(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let r = Registry::new();
        let c = r.counter("t_total", "A counter.", &["kind"]);
        c.inc(&["a\"b"]);
        c.inc_by(&["a\"b"], 2.0);
        let g = r.gauge("t_depth", "A gauge.", &[]);
        g.set(&[], 5.0);
        g.add(&[], -2.0);
        let h = r.histogram("t_seconds", "A histogram.", &["m"], &[0.1, 1.0]);
        h.observe(&["x"], 0.05);
        h.observe(&["x"], 0.5);
        h.observe(&["x"], 7.0);
        let text = r.render();
        assert!(
            text.contains("# TYPE t_total counter\nt_total{kind=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("t_depth 3\n"), "{text}");
        assert!(
            text.contains("t_seconds_bucket{m=\"x\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{m=\"x\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{m=\"x\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("t_seconds_count{m=\"x\"} 3\n"), "{text}");
        assert_eq!(h.count(&["x"]), 3);
        assert_eq!(c.get(&["a\"b"]), 3.0);
    }

    #[tokio::test]
    async fn observe_counts_the_call_in_flight_and_records_its_status_code() {
        let r = Registry::new();
        let m = RpcMetrics::new(&r, "rsllm.v1.T");
        let span = m.span("Get", &tonic::metadata::MetadataMap::new());
        let in_flight = m.in_flight.clone();
        let during = m
            .observe("Get", span.clone(), async {
                Ok::<_, tonic::Status>(in_flight.get(&["rsllm.v1.T", "Get"]))
            })
            .await
            .unwrap();
        assert_eq!(during, 1.0);
        assert_eq!(in_flight.get(&["rsllm.v1.T", "Get"]), 0.0);
        let failed = m
            .observe("Get", span, async {
                Err::<(), _>(tonic::Status::not_found("no such item"))
            })
            .await
            .unwrap_err();
        assert_eq!(failed.code(), tonic::Code::NotFound);
        assert_eq!(m.count("Get", tonic::Code::Ok), 1);
        assert_eq!(m.count("Get", tonic::Code::NotFound), 1);
        assert_eq!(in_flight.get(&["rsllm.v1.T", "Get"]), 0.0);
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_and_404s_the_rest() {
        let r = Registry::new();
        RpcMetrics::new(&r, "rsllm.v1.T").record(
            "Get",
            tonic::Code::NotFound,
            Duration::from_millis(3),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, r, async {
            let _ = rx.await;
        }));
        let get = async |path: &str| {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains(
                "rsllm_rpc_duration_seconds_count{service=\"rsllm.v1.T\",method=\"Get\",code=\"NOT_FOUND\"} 1"
            ),
            "{ok}"
        );
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        tx.send(()).unwrap();
        server.await.unwrap();
    }
}
