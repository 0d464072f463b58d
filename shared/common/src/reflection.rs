//! gRPC server reflection for the public `rsllm.v1` services.
//!
//! Both protocol versions are served: v1 for current tools, v1alpha for older ones (the grpcurl
//! 1.8 that CI installs speaks only v1alpha). A server lists the `rsllm.v1` services it
//! serves (names from [`rsllm_proto::V1_SERVICES`]); health and reflection themselves are not
//! listed.

use tonic_reflection::server::v1::{ServerReflection as V1, ServerReflectionServer as V1Server};
use tonic_reflection::server::v1alpha::{
    ServerReflection as V1Alpha, ServerReflectionServer as V1AlphaServer,
};

/// The reflection descriptors could not be decoded (a build problem, not a runtime one).
#[derive(Debug, thiserror::Error)]
#[error("building the reflection service: {0}")]
pub struct ReflectionError(#[from] tonic_reflection::server::Error);

fn builder(served: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rsllm_proto::FILE_DESCRIPTOR_SET);
    for name in served {
        b = b.with_service_name(*name);
    }
    b
}

/// Reflection v1 (`grpc.reflection.v1.ServerReflection`) listing `served`.
pub fn v1(served: &[&'static str]) -> Result<V1Server<impl V1 + use<>>, ReflectionError> {
    Ok(builder(served).build_v1()?)
}

/// Reflection v1alpha (`grpc.reflection.v1alpha.ServerReflection`) listing `served`.
pub fn v1alpha(
    served: &[&'static str],
) -> Result<V1AlphaServer<impl V1Alpha + use<>>, ReflectionError> {
    Ok(builder(served).build_v1alpha()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reflection_builds_from_the_generated_descriptors() {
        super::v1(rsllm_proto::V1_SERVICES).expect("v1");
        super::v1alpha(rsllm_proto::V1_SERVICES).expect("v1alpha");
    }
}
