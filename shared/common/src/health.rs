//! `grpc.health.v1` with a readiness switch.

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

/// Flips the overall status (service name `""`) and every named service together.
#[derive(Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    services: Vec<String>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// A health service reporting NOT_SERVING for `""` and each of `services` until
    /// [`Readiness::serving`] is called.
    pub async fn new(services: &[&str]) -> (Readiness, HealthServer<impl Health + use<>>) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let readiness = Readiness {
            reporter,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
        };
        readiness.set(ServingStatus::NotServing).await;
        (readiness, server)
    }

    /// Reports SERVING (models loaded, ready for traffic).
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Reports NOT_SERVING (loading, or shutting down).
    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    /// The whole server (`""`) is never SERVING while a named service is not: it goes SERVING
    /// last and NOT_SERVING first, so a probe of `""` (Kubernetes, tests) that sees SERVING
    /// can call any service at once.
    async fn set(&self, status: ServingStatus) {
        if matches!(status, ServingStatus::Serving) {
            for s in &self.services {
                self.reporter.set_service_status(s, status).await;
            }
            self.reporter.set_service_status("", status).await;
        } else {
            self.reporter.set_service_status("", status).await;
            for s in &self.services {
                self.reporter.set_service_status(s, status).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Pb;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    #[tokio::test]
    async fn starts_not_serving_and_follows_the_switch() {
        let (readiness, server) = Readiness::new(&["rsllm.v1.Test"]).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serve = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = rx.await;
                    },
                ),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let mut status = async |service: &str| {
            client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        };
        for s in ["", "rsllm.v1.Test"] {
            assert_eq!(
                status(s).await,
                Pb::NotServing as i32,
                "{s:?} before serving()"
            );
        }
        readiness.serving().await;
        for s in ["", "rsllm.v1.Test"] {
            assert_eq!(status(s).await, Pb::Serving as i32, "{s:?} after serving()");
        }
        readiness.not_serving().await;
        assert_eq!(status("").await, Pb::NotServing as i32);
        tx.send(()).unwrap();
        serve.await.unwrap().unwrap();
    }
}
