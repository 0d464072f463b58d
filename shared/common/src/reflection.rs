//! gRPC server reflection for the public `rsllm.v1` services.
//!
//! Both protocol versions are served: v1 for current tools, v1alpha for older ones (the grpcurl
//! 1.8 that CI installs speaks only v1alpha). Only the services in
//! [`rsllm_proto::V1_SERVICES`] are listed; health and reflection themselves are not.

use tonic_reflection::server::v1::{ServerReflection as V1, ServerReflectionServer as V1Server};
use tonic_reflection::server::v1alpha::{
    ServerReflection as V1Alpha, ServerReflectionServer as V1AlphaServer,
};

/// The reflection descriptors could not be decoded (a build problem, not a runtime one).
#[derive(Debug, thiserror::Error)]
#[error("building the reflection service: {0}")]
pub struct ReflectionError(#[from] tonic_reflection::server::Error);

fn builder() -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rsllm_proto::FILE_DESCRIPTOR_SET);
    for name in rsllm_proto::V1_SERVICES {
        b = b.with_service_name(*name);
    }
    b
}

/// Reflection v1 (`grpc.reflection.v1.ServerReflection`).
pub fn v1() -> Result<V1Server<impl V1>, ReflectionError> {
    Ok(builder().build_v1()?)
}

/// Reflection v1alpha (`grpc.reflection.v1alpha.ServerReflection`).
pub fn v1alpha() -> Result<V1AlphaServer<impl V1Alpha>, ReflectionError> {
    Ok(builder().build_v1alpha()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reflection_builds_from_the_generated_descriptors() {
        super::v1().expect("v1");
        super::v1alpha().expect("v1alpha");
    }
}
