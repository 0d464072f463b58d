//! Logging and trace export, set up once per process.
//!
//! - Logs: an fmt layer (human-readable, or one JSON object per line) filtered by `RUST_LOG`.
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//!   set and `OTEL_SDK_DISABLED` is not `true`, spans go to that OTLP/gRPC endpoint through a
//!   batch processor; the exporter reads the other standard `OTEL_*` variables itself
//!   (timeouts, headers, `OTEL_BSP_*` batching), and `OTEL_SERVICE_NAME` overrides the
//!   service name. Without an endpoint nothing is exported.
//! - Context: W3C trace context (`traceparent`) travels in gRPC metadata: servers continue the
//!   caller's trace in [`rpc_span`], clients carry theirs with [`inject`], so one
//!   Recommend is one trace across the llm-, prompt- and embedding-service.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Directives used when `RUST_LOG` is unset: `info` for everything, with the chatty transport
/// crates held at `warn`.
pub const DEFAULT_FILTER: &str =
    "info,h2=warn,tower=warn,hyper=warn,hyper_util=warn,opentelemetry=warn,opentelemetry_sdk=warn";

/// Keeps telemetry alive for the life of the process; drop it last, inside the tokio runtime's
/// lifetime: dropping flushes the spans still buffered and shuts the exporter down.
#[must_use = "dropping the guard ends telemetry export"]
pub struct TelemetryGuard {
    service_name: String,
    provider: Option<SdkTracerProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("service_name", &self.service_name)
            .field("exporting", &self.provider.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// The `service.name` this process reports as.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("telemetry: flushing spans at exit failed: {e}");
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Whether the standard variables ask for OTLP trace export.
pub fn otlp_configured() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service_name: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("building the OTLP exporter: {e}"))?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| service_name.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// Installs the global tracing subscriber: the fmt layer (text, or JSON with `json`) filtered
/// by `RUST_LOG` (default [`DEFAULT_FILTER`]), plus the OpenTelemetry layer when
/// [`otlp_configured`]. Call it inside a tokio runtime (the OTLP exporter's channel lives
/// there).
///
/// A second call (several servers in one test process) keeps the first subscriber and only
/// returns a new guard.
pub fn init(service_name: &str, json: bool) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let provider = if otlp_configured() {
        match tracer_provider(service_name) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("telemetry: {e}; traces will not be exported");
                None
            }
        }
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("rsllm")));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // try_init: an already installed subscriber is not an error worth failing a server for.
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()
    } else {
        // Colours only on a terminal, so captured logs (tests, containers) stay greppable.
        let ansi = std::io::stdout().is_terminal();
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(ansi))
            .try_init()
    };
    TelemetryGuard {
        service_name: service_name.to_owned(),
        provider,
    }
}

struct MetadataReader<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataWriter<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The span of one handled RPC, named after it (`rsllm.v1.LlmService/Recommend`) and, when
/// the request carries W3C trace context, a child of the caller's span. Instrument the
/// handler's future with it; the parent must be set before the span is first entered.
pub fn rpc_span(name: &str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let span = tracing::info_span!("rpc", otel.name = %name, otel.kind = "server");
    let parent = TraceContextPropagator::new().extract(&MetadataReader(metadata));
    let _ = span.set_parent(parent);
    span
}

/// Writes the current span's trace context into an outgoing request's metadata.
pub fn inject<T>(request: &mut tonic::Request<T>) {
    inject_into(request.metadata_mut());
}

/// [`inject`] into bare metadata (for clients that build their requests elsewhere).
pub fn inject_into(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataWriter(metadata));
}
