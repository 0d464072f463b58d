//! The shutdown trigger shared by every server.

use std::future::Future;

/// A future that resolves when the process receives SIGTERM (Kubernetes, `kill`) or SIGINT
/// (ctrl-c). The handlers are installed when this function is called, not when the future is
/// first polled, so a signal arriving during startup is not lost (and does not kill the
/// process with the default action). Call it inside a tokio runtime. If a handler cannot be
/// installed, that source is ignored with a warning.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM");
        let mut int = install(SignalKind::interrupt(), "SIGINT");
        async move {
            let term = async {
                match term.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term => tracing::info!("SIGTERM received, shutting down"),
                _ = int => tracing::info!("SIGINT received, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!("ctrl-c received, shutting down");
        }
    }
}
