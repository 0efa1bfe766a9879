//! gRPC server reflection for the listeners, so that `grpcurl` needs no proto files.

/// gRPC server reflection (v1) for the given encoded descriptor sets (empty ones are skipped),
/// so `grpcurl` needs no proto files.
pub fn service(
    descriptor_sets: &[&'static [u8]],
) -> Option<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    descriptor_sets
        .iter()
        .filter(|set| !set.is_empty())
        .fold(
            tonic_reflection::server::Builder::configure(),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
        .build_v1()
        .inspect_err(|error| tracing::error!(%error, "gRPC reflection unavailable"))
        .ok()
}
