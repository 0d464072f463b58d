//! Logging (and, later, trace export) setup.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Directives used when `RUST_LOG` is unset: `info` for everything, with the chatty transport
/// crates held at `warn`.
pub const DEFAULT_FILTER: &str = "info,h2=warn,tower=warn,hyper=warn,hyper_util=warn";

/// Keeps telemetry alive for the life of the process; drop it last (at the end of `main`).
///
/// Seam for OpenTelemetry: when OTLP export is added, the tracer and meter providers go in
/// here and `Drop` flushes and shuts them down.
#[derive(Debug)]
#[must_use = "dropping the guard ends telemetry export"]
pub struct TelemetryGuard {
    service_name: String,
}

impl TelemetryGuard {
    /// The `service.name` this process reports as.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }
}

/// Installs the global tracing subscriber: an fmt layer (human-readable, or one JSON object per
/// line with `json`) filtered by `RUST_LOG` (default [`DEFAULT_FILTER`]).
///
/// A second call (several servers in one test process) keeps the first subscriber and only
/// returns a new guard.
pub fn init(service_name: &str, json: bool) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
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
    }
}
