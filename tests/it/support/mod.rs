//! Real parts for the tests: the service in process on port-0 listeners ([`app`]), the
//! phantom-authz binary on loopback for what needs a process ([`service`]), a
//! `redis-server` on a free port ([`redis`]), a scripted identity server on port 0 that answers
//! like Curity ([`idp`]), a real OAuth server, npm `oidc-provider` ([`oidc`]), and Envoy's side
//! of a Check ([`envoy`]).

mod app;
mod envoy;
mod idp;
mod oidc;
mod redis;
mod service;

pub(crate) use app::*;
pub(crate) use envoy::*;
pub(crate) use idp::*;
pub(crate) use oidc::*;
pub(crate) use redis::*;
pub(crate) use service::*;

use std::time::{Duration, Instant};

/// Polls `condition` until true or `timeout` passes.
pub(crate) async fn eventually(
    timeout: Duration,
    mut condition: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
