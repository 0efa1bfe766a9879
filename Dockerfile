# syntax=docker/dockerfile:1
#
# phantom-authz container image: a static-ish release build on a distroless, non-root runtime.
#
#   docker build -t phantom-authz .
#   docker run --rm -p 9001:9001 -p 9090:9090 \
#     -e PHANTOM_AUTHZ_INTROSPECTION_URL=https://login.example.com/oauth/v2/oauth-introspect \
#     -e PHANTOM_AUTHZ_CLIENT_ID=phantom-authz \
#     -e PHANTOM_AUTHZ_CLIENT_SECRET_FILE=/run/secrets/client-secret \
#     -v "$PWD/client-secret:/run/secrets/client-secret:ro" phantom-authz

FROM rust:1-slim-bookworm AS build
WORKDIR /build
# Everything cargo needs to read the manifest (benches, examples and tests are declared
# targets); .dockerignore keeps target/ and the operations kit out of the context.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --profile production --locked --bin phantom-authz \
    && cp target/production/phantom-authz /phantom-authz

# glibc + libgcc, CA certificates for https introspection, uid 65532, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /phantom-authz /usr/local/bin/phantom-authz
USER nonroot:nonroot
ENV PHANTOM_AUTHZ_GRPC_LISTEN=0.0.0.0:9001 \
    PHANTOM_AUTHZ_ADMIN_LISTEN=0.0.0.0:9090 \
    PHANTOM_AUTHZ_LOG_FORMAT=json
# 9001: ext_authz gRPC and grpc.health.v1. 9090: /metrics, /healthz, /readyz.
EXPOSE 9001 9090
ENTRYPOINT ["/usr/local/bin/phantom-authz"]
