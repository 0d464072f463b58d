//! The serve-then-drain sequence every rsllm server follows, and the caller's deadline.
//!
//! Shutdown order: the trigger fires (SIGTERM, or a startup failure) -> health reports
//! NOT_SERVING (load balancers stop routing here) -> the transport stops accepting and lets
//! in-flight calls finish -> after `drain_timeout` the process gives up waiting.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::health::Readiness;

/// A boxed future the transport awaits to begin its graceful shutdown.
pub type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `serve(incoming, begin_shutdown)` (a tonic `Router::serve_with_incoming_shutdown`) on
/// `listener` until `shutdown` resolves or `stop` becomes true, then drains as the module docs
/// say. `stop` is set to true once shutdown begins, so other tasks (loaders, workers, cache
/// sync) can follow it.
pub async fn serve_with_drain<F, Fut>(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stop: watch::Sender<bool>,
    drain_timeout: Duration,
    serve: F,
) -> Result<(), tonic::transport::Error>
where
    F: FnOnce(TcpIncoming, ShutdownSignal) -> Fut,
    Fut: Future<Output = Result<(), tonic::transport::Error>>,
{
    let (draining_tx, mut draining_rx) = watch::channel(false);
    let begin_shutdown: ShutdownSignal = {
        let mut stop_rx = stop.subscribe();
        let stop = stop.clone();
        Box::pin(async move {
            tokio::select! {
                () = shutdown => {}
                _ = stop_rx.wait_for(|s| *s) => {}
            }
            let _ = stop.send(true);
            readiness.not_serving().await;
            let _ = draining_tx.send(true);
            tracing::info!("shutting down: health NOT_SERVING, draining in-flight calls");
        })
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let deadline = async move {
        let _ = draining_rx.wait_for(|d| *d).await;
        tokio::time::sleep(drain_timeout).await;
    };
    let served = tokio::select! {
        r = serve(incoming, begin_shutdown) => r,
        () = deadline => {
            tracing::warn!(
                secs = drain_timeout.as_secs(),
                "drain timeout: exiting with calls still in flight"
            );
            Ok(())
        }
    };
    let _ = stop.send(true);
    served
}

/// The body of every service binary: a multi-threaded tokio runtime, telemetry set up inside it
/// (the OTLP exporter's channel lives there), `serve` run to its end, the last spans flushed
/// while the runtime still runs, then exit 0, or 1 with the error logged. Blocking work still
/// running (a model load) is not waited for beyond a second.
pub fn cli_main<E: std::fmt::Display>(
    service: &str,
    json_logs: bool,
    serve: impl Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{service}: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _entered = runtime.enter();
        crate::telemetry::init(service, json_logs)
    };
    let result = runtime.block_on(serve);
    drop(telemetry);
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{service} failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The time left before the caller's deadline (the `grpc-timeout` request header), if it set
/// one. Calls to dependencies use it as their own timeout, so a deadline propagates down the
/// fleet instead of each hop waiting its full default.
pub fn remaining(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout`, shortened to the caller's remaining time when that is sooner.
pub fn bounded(timeout: Duration, metadata: &tonic::metadata::MetadataMap) -> Duration {
    remaining(metadata).map_or(timeout, |left| left.min(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        for bad in ["", "5", "m", "12x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(bounded(Duration::from_secs(2), &md), Duration::from_secs(2));
        md.insert("grpc-timeout", "300m".parse().unwrap());
        assert_eq!(
            bounded(Duration::from_secs(2), &md),
            Duration::from_millis(300)
        );
    }
}
