//! OpenTelemetry tracing end to end: the real binary exports its spans over OTLP/gRPC to an
//! in-process collector double on 127.0.0.1:0.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const CHECK: &str = "envoy.service.auth.v3.Authorization/Check";

/// A collector double: keeps every export request it receives.
#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on 127.0.0.1:0; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Span> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    fn resource_attributes(&self) -> Vec<KeyValue> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|r| r.resource.as_ref())
            .flat_map(|r| r.attributes.clone())
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(n)) => n.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect()
}

// Multi-threaded: the collector double and the client's connection must keep running while
// the test thread blocks waiting for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_exported_as_spans_continuing_the_callers_trace() {
    let redis = Redis::start();
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let jwt = make_jwt("alice", Some(unix_now() + 600), 0);
    let served = jwt.clone();
    let idp = Idp::start(move |_| Reply::jwt(&served)).await;
    let idp_url = idp.url();
    let redis_url = redis.url();
    // A long batch delay: nothing is exported before shutdown, which must flush it all.
    let mut service = Service::spawn(
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--introspection-url",
            &idp_url,
            "--client-id",
            CLIENT_ID,
            "--redis-url",
            &redis_url,
            "--otlp-endpoint",
            &endpoint,
        ],
        &[
            ("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ],
    );
    let mut client = service.client().await;

    let traced_token = "traced-TOKEN-9c8b7a";
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let traced = check_request(&[
        ("authorization", &format!("Bearer {traced_token}")),
        ("x-request-id", "req-traced"),
        ("traceparent", &traceparent),
    ]);
    assert_eq!(check(&mut client, traced).await.http_status, 200);
    // No traceparent, Envoy's raw header encoding: a trace of its own.
    let fresh_token = "fresh-TOKEN-1d2e3f";
    let fresh = raw_check_request(&[
        ("authorization", format!("Bearer {fresh_token}").as_bytes()),
        ("x-request-id", b"req-fresh"),
    ]);
    assert_eq!(check(&mut client, fresh).await.http_status, 200);
    // A denial, to see its status on the span.
    let denied = check_request(&[("x-request-id", "req-denied")]);
    assert_eq!(check(&mut client, denied).await.http_status, 401);
    assert!(collector.spans().is_empty(), "exported before shutdown");

    drop(client);
    service.signal("TERM");
    let exit = service
        .wait_exit(Duration::from_secs(15))
        .expect("did not exit");
    assert!(exit.success(), "{exit:?}\n{}", service.log());
    let spans = collector.spans();
    assert!(
        !spans.is_empty(),
        "nothing exported; log:\n{}",
        service.log()
    );

    let resource = collector.resource_attributes();
    assert!(
        resource
            .iter()
            .any(|kv| kv.key == "service.name" && text(&kv.value) == "phantom-authz"),
        "{resource:?}"
    );

    let checks: Vec<&Span> = spans.iter().filter(|s| s.name == CHECK).collect();
    assert_eq!(checks.len(), 3, "{spans:#?}");
    let by_request = |id: &str| {
        *checks
            .iter()
            .find(|s| attribute(s, "http.request.header.x-request-id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no Check span for {id}: {checks:#?}"))
    };

    // The traced Check continues the caller's trace, under the caller's span.
    let traced = by_request("req-traced");
    assert_eq!(hex(&traced.trace_id), TRACE_ID);
    assert_eq!(hex(&traced.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(traced.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(traced, "authz.decision").as_deref(),
        Some("allow")
    );
    let status = traced
        .attributes
        .iter()
        .find(|kv| kv.key == "http.response.status_code")
        .and_then(|kv| kv.value.as_ref()?.value.clone());
    assert_eq!(status, Some(Value::IntValue(200)));
    assert_eq!(
        attribute(traced, "authz.reason").as_deref(),
        Some("allowed")
    );
    let kids = children(&spans, traced);
    let kid = |name: &str| {
        *kids
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} child: {kids:#?}"))
    };
    assert_eq!(
        attribute(kid("cache.local"), "cache.result").as_deref(),
        Some("miss")
    );
    assert_eq!(
        attribute(kid("cache.redis"), "cache.result").as_deref(),
        Some("miss")
    );
    let introspection = kid("introspection");
    assert_eq!(
        attribute(introspection, "introspection.result").as_deref(),
        Some("active")
    );
    assert_eq!(introspection.kind, SpanKind::Client as i32);

    // Without a traceparent the Check starts a new trace at its own root.
    let fresh = by_request("req-fresh");
    assert!(fresh.parent_span_id.is_empty(), "{fresh:#?}");
    assert_ne!(hex(&fresh.trace_id), TRACE_ID);
    assert_eq!(fresh.trace_id.len(), 16);
    assert!(fresh.trace_id.iter().any(|b| *b != 0));
    assert_eq!(children(&spans, fresh).len(), 3);

    let denied = by_request("req-denied");
    assert_eq!(attribute(denied, "authz.decision").as_deref(), Some("deny"));
    assert_eq!(
        attribute(denied, "http.response.status_code").as_deref(),
        Some("401")
    );
    assert_eq!(
        attribute(denied, "authz.reason").as_deref(),
        Some("no_token")
    );
    assert!(children(&spans, denied).is_empty());

    // No token, JWT or secret anywhere in what was exported.
    let exported = format!("{:?}", collector.requests.lock().unwrap());
    for secret in [traced_token, fresh_token, jwt.as_str(), CLIENT_SECRET] {
        assert!(!exported.contains(secret), "{secret} was exported");
    }
    let jwt_payload = jwt.split('.').nth(1).unwrap();
    assert!(!exported.contains(jwt_payload));
    assert!(!exported.to_lowercase().contains("bearer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_nothing_is_exported_and_checks_work() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let idp = Idp::start(|s| Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 60), 0))).await;
    // The standard variable alone does not turn tracing on.
    let mut service = Service::spawn(
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--introspection-url",
            &idp.url(),
            "--client-id",
            CLIENT_ID,
        ],
        &[
            ("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ],
    );
    let mut client = service.client().await;
    let request = check_request(&[
        ("authorization", "Bearer untraced-TOKEN"),
        ("traceparent", &format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")),
    ]);
    assert_eq!(check(&mut client, request).await.http_status, 200);
    drop(client);
    service.signal("TERM");
    let exit = service.wait_exit(Duration::from_secs(15)).expect("exit");
    assert!(exit.success());
    assert!(collector.requests.lock().unwrap().is_empty());
}

#[test]
fn a_bad_endpoint_is_a_configuration_error_naming_the_flag() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
        .args([
            "--introspection-url",
            "http://127.0.0.1:9/introspect",
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--otlp-endpoint",
            "collector:4317",
        ])
        .env_remove("PHANTOM_AUTHZ_OTLP_ENDPOINT")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--otlp-endpoint"), "{stderr}");
}
