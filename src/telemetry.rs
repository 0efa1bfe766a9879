//! OpenTelemetry tracing behind `--otlp-endpoint`: the tracer provider and its OTLP exporter,
//! the W3C trace context a Check arrives with, the spans' bounded attributes, and the flush at
//! shutdown.
//!
//! Spans are ordinary `tracing` spans with target [`SPAN_TARGET`]. Only the OpenTelemetry layer
//! enables that target, so without `--otlp-endpoint` every span is disabled at its call site and
//! log lines look the same either way. Attributes are `&'static str` labels, HTTP statuses and
//! Envoy's `x-request-id`: never a token, a JWT or a header map.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::decision::Outcome;
use crate::metrics::{Lookup, Tier};
use crate::request::{CheckRequest, HttpRequest};

/// The `tracing` target of every exported span; no module bears this path, so no log event has it.
pub const SPAN_TARGET: &str = "phantom_authz::spans";

/// `service.name` of every exported span.
pub const SERVICE_NAME: &str = "phantom-authz";

/// Bound on one export call to the collector, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on the flush at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("--otlp-endpoint: {0}")]
pub struct TelemetryError(String);

/// The running tracer provider; [`Telemetry::shutdown`] flushes what is queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Builds the OTLP/gRPC exporter and a batching provider. Must run inside a Tokio runtime,
    /// where the gRPC channel's worker is spawned; the channel connects lazily, so a collector
    /// that is down delays nothing.
    ///
    /// Spans are handed to a background thread through a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
    /// 2048 by default) and dropped when it is full: a Check never waits for the collector.
    pub fn start(endpoint: &str) -> Result<Self, TelemetryError> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT);
        if endpoint.starts_with("https://") {
            exporter = exporter
                .with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
        }
        let exporter = exporter
            .build()
            .map_err(|error| TelemetryError(error.to_string()))?;
        // The builder's defaults read the standard OTEL_BSP_* variables.
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().build())
            .build();
        let resource = Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns [`SPAN_TARGET`] spans into OpenTelemetry spans; log events
    /// and other spans are left to the log layer.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SERVICE_NAME))
            .with_location(false)
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.is_span() && metadata.target() == SPAN_TARGET
            }))
    }

    /// Exports what is still queued, waiting at most a few seconds. Blocks: call it outside the
    /// runtime's tasks, while the runtime is still alive (the export runs on its gRPC channel).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
    }
}

/// Makes `span` continue the trace whose W3C `traceparent` (and `tracestate`) the Check carries;
/// without one, or with a malformed one, the span starts a new trace. Free when tracing is off.
pub fn continue_trace(span: &Span, request: &CheckRequest) {
    if span.is_disabled() {
        return;
    }
    let Some(http) = request.http() else {
        return;
    };
    let parent = TraceContextPropagator::new().extract(&Headers(http));
    // Fails only when the span has already started or the layer is missing: then it simply
    // starts a trace of its own.
    let _ = span.set_parent(parent);
}

/// Records how a Check ended on its span.
pub fn record_outcome(span: &Span, outcome: &Outcome) {
    let row = outcome.row();
    span.record("authz.decision", row.decision.as_str());
    span.record("http.response.status_code", i64::from(row.http.as_u16()));
    span.record("authz.reason", row.reason);
    if row.http.is_server_error() {
        span.record("otel.status_code", "error");
    }
}

/// A span for one lookup in a cache tier; its result is recorded with [`record_lookup`].
pub fn cache_span(tier: Tier) -> Span {
    match tier {
        Tier::Local => tracing::info_span!(
            target: SPAN_TARGET,
            "cache.local",
            cache.tier = "local",
            cache.result = tracing::field::Empty,
        ),
        Tier::Inactive => tracing::info_span!(
            target: SPAN_TARGET,
            "cache.inactive",
            cache.tier = "inactive",
            cache.result = tracing::field::Empty,
        ),
        Tier::Redis => tracing::info_span!(
            target: SPAN_TARGET,
            "cache.redis",
            otel.kind = "client",
            cache.tier = "redis",
            cache.result = tracing::field::Empty,
        ),
    }
}

/// Records what a cache lookup found.
pub fn record_lookup(span: &Span, result: Lookup) {
    span.record("cache.result", result.as_str());
}

/// A span for one introspection call; its result is recorded with [`record_introspection`].
pub fn introspection_span() -> Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "introspection",
        otel.kind = "client",
        introspection.result = tracing::field::Empty,
    )
}

/// Records an introspection's result, a bounded label (`active`, `inactive`, `timeout`, …).
pub fn record_introspection(span: &Span, result: &'static str) {
    span.record("introspection.result", result);
}

/// The Check's request headers, in whichever encoding Envoy used, as a propagation carrier.
/// Only the propagator's own header names are ever looked up.
struct Headers<'a>(&'a HttpRequest);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        crate::token::header(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        // The W3C propagator asks for its headers by name and never lists them.
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest as EnvoyHttp;
    use opentelemetry::trace::{TraceContextExt as _, TraceId};

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn extract(http: &EnvoyHttp) -> opentelemetry::trace::SpanContext {
        let request = CheckRequest::from_envoy(&crate::token::check_request(http.clone())).unwrap();
        let cx = TraceContextPropagator::new().extract(&Headers(request.http().unwrap()));
        cx.span().span_context().clone()
    }

    #[test]
    fn traceparent_is_found_in_either_header_encoding() {
        let mut http = EnvoyHttp::default();
        http.headers
            .insert("traceparent".to_string(), TRACEPARENT.to_string());
        let from_map = extract(&http);
        assert!(from_map.is_remote() && from_map.is_sampled());
        assert_eq!(
            from_map.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );

        let raw = EnvoyHttp {
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "Traceparent".to_string(),
                    raw_value: TRACEPARENT.as_bytes().to_vec(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        assert_eq!(extract(&raw), from_map);
    }

    #[test]
    fn missing_or_malformed_traceparent_gives_no_parent() {
        assert!(!extract(&EnvoyHttp::default()).is_valid());
        let mut http = EnvoyHttp::default();
        http.headers
            .insert("traceparent".to_string(), "00-zz-yy-01".to_string());
        assert!(!extract(&http).is_valid());
    }
}
