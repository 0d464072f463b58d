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

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for s in &self.services {
            self.reporter.set_service_status(s, status).await;
        }
    }
}
