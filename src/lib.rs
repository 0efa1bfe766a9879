//! phantom-authz: an Envoy ext_authz service that swaps opaque access tokens for JWTs.
//!
//! A Check travels one straight line through these modules:
//!
//! - [`server`]: the tonic adapter for `envoy.service.auth.v3.Authorization/Check` and the
//!   admin HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).
//! - [`request`]: the part of Envoy's `CheckRequest` a Check reads, decoded without copying.
//! - [`token`]: finding the bearer token in a `CheckRequest` and deriving its cache key. Pure.
//! - [`cache`]: the in-process tier and the shared Redis tier holding token→JWT entries.
//! - [`introspection`]: the HTTP client for the identity server and the parsing of its answers;
//!   in rfc7662 mode it signs the JWT from the answer itself, and it can discover its endpoint.
//! - [`authorizer`]: the flow itself: local cache, Redis, one introspection per token, TTL choice.
//! - [`decision`]: the one place where outcomes become HTTP statuses, gRPC codes and headers. Pure.
//! - [`jwt`]: the compact JWT shape every forwarded JWT is checked for, and its claims. Pure.
//! - [`jose`]: the keys phantom-authz signs its own JWTs with (rfc7662 mode, client assertions)
//!   and their JWK Set.
//!
//! [`forward`] is a second front door, HTTP forward-auth for gateways that cannot speak gRPC,
//! onto the same line.
//!
//! Around them: [`app`] is the composition root that builds all of it from a validated
//! [`config`] and runs the listeners; [`admin`] serves the operators' gRPC API (token eviction),
//! whose notices travel between replicas as [`cache::evictions`]; [`metrics`] names every metric
//! the service records; [`telemetry`] exports OpenTelemetry spans of each Check when
//! `--otlp-endpoint` is given; [`reflection`] describes the gRPC APIs to tools like `grpcurl`;
//! [`probe`] is `phantom-authz check`, a client that sends one Check and shows the answer.

pub mod admin;
pub mod app;
pub mod authorizer;
pub mod cache;
pub mod config;
pub mod decision;
pub mod forward;
pub mod introspection;
pub mod jose;
pub mod jwt;
pub mod metrics;
pub mod probe;
pub mod reflection;
pub mod request;
pub mod route;
pub mod server;
pub mod telemetry;
pub mod token;

/// A boxed future, for the object-safe I/O traits ([`cache::SharedCache`],
/// [`introspection::Introspect`]).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;
