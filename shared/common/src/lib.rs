//! rsllm-common: the server plumbing every rsllm service shares, kept small on purpose.
//!
//! - [`telemetry::init`]: tracing subscriber (text or JSON logs, `RUST_LOG` filter). The
//!   returned [`telemetry::TelemetryGuard`] is where OpenTelemetry providers will be flushed
//!   once traces are exported (a later issue); today it holds nothing.
//! - [`shutdown::signal`]: resolves on SIGTERM or ctrl-c.
//! - [`health::Readiness`]: a `grpc.health.v1` service that starts NOT_SERVING and is flipped by
//!   the service as models load and as shutdown begins.
//! - [`reflection`]: gRPC reflection (v1 and v1alpha) advertising only the `rsllm.v1` services.
//! - [`server`]: the serve-then-drain sequence, and the caller's deadline (`grpc-timeout`).
//! - [`metrics`]: Prometheus metrics (registry, RPC latency by status, `GET /metrics`).
//! - [`panic::panic_message`]: a caught panic's message, for threads that report it as an
//!   error instead of dying.

pub mod health;
pub mod metrics;
pub mod panic;
pub mod reflection;
pub mod server;
pub mod shutdown;
pub mod telemetry;
