//! phantom-authz's integration tests, one binary: the real service over loopback sockets, a
//! real `redis-server`, a scripted identity server on port 0, a real OAuth server (npm
//! `oidc-provider`). The fixtures are in [`support`]; each other module is one group of
//! behaviour.

mod cache;
mod decisions;
mod faults;
mod forward;
mod oidc;
mod operations;
mod probe;
mod properties;
mod revocation;
mod routes;
mod support;
mod tls;
mod topologies;
mod tracing;
