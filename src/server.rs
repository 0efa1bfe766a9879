//! The tonic adapter for ext_authz `Check` (proto in, domain call, proto out), gRPC health, and
//! the admin HTTP endpoints. Listeners and the shutdown signal are injected by the caller.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use prost::Message as _;
use tokio::net::TcpListener;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::authorizer::Authorizer;
use crate::config::GrpcLimits;
use crate::decision::{AllowedJwt, Answer, Outcome, Responder};
use crate::metrics::{CheckMetrics, Transport};
use crate::reflection;
use crate::request::{self, CheckRequest};
use crate::route::{Demand, RouteTable};
use crate::telemetry;
use crate::token;

/// The ext_authz service: extracts the token, asks the authorizer, answers Envoy.
pub struct CheckService {
    authorizer: Arc<Authorizer>,
    responder: Responder,
    max_token_length: usize,
    routes: RouteTable,
    metrics: CheckMetrics,
}

impl CheckService {
    pub fn new(
        authorizer: Arc<Authorizer>,
        responder: Responder,
        max_token_length: usize,
        routes: RouteTable,
    ) -> Self {
        Self {
            authorizer,
            responder,
            max_token_length,
            routes,
            metrics: CheckMetrics::new(),
        }
    }

    /// One Check, from request to response; public so benchmarks can drive it without gRPC.
    pub async fn decide(&self, request: &CheckRequest) -> Outcome {
        // What the route demands is known before the token is looked at: a route that refuses
        // every token does so without asking the IdP.
        let demand = self.routes.demand(request);
        if let Some(refusal) = demand.refuses_any_token() {
            if let Demand::Misconfigured(setting) = demand {
                tracing::error!(
                    setting,
                    "the route's requirement from Envoy is malformed; denying with 500"
                );
            }
            return refusal;
        }
        let outcome = match token::bearer_token(request, self.max_token_length) {
            Ok(token) => self.authorizer.authorize(token).await,
            Err(problem) => Outcome::from(problem),
        };
        // Checked on every allow, cache hits included; the grant stays cached either way (it
        // may open other routes).
        match &outcome {
            Outcome::Allow(AllowedJwt(grant)) => demand.refusal(grant).unwrap_or(outcome),
            _ => outcome,
        }
    }
}

impl CheckService {
    /// Decides, recording the Check in its span, the metrics and the debug log; `transport`
    /// names the front door it came through.
    pub async fn judge(&self, request: &CheckRequest, transport: Transport) -> Outcome {
        let started = Instant::now();
        let span = tracing::info_span!(
            target: telemetry::SPAN_TARGET,
            "check",
            otel.name = match transport {
                Transport::Grpc => "envoy.service.auth.v3.Authorization/Check",
                Transport::Http => "forward-auth check",
            },
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            authz.transport = transport.as_str(),
            "http.request.header.x-request-id" = request_id(request),
            authz.decision = tracing::field::Empty,
            authz.reason = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        // Without a tracer (the default) the span is disabled: the Check runs unwrapped.
        let outcome = if span.is_disabled() {
            self.decide(request).await
        } else {
            telemetry::continue_trace(&span, request);
            let outcome = self.decide(request).instrument(span.clone()).await;
            telemetry::record_outcome(&span, &outcome);
            outcome
        };
        drop(span);
        self.metrics
            .finished(&outcome, started.elapsed(), transport);
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                request_id = request_id(request),
                transport = transport.as_str(),
                decision = outcome.row().decision.as_str(),
                status = outcome.row().http.as_u16(),
                reason = outcome.row().reason,
                "check"
            );
        }
        outcome
    }

    /// How outcomes are told to the caller.
    pub fn responder(&self) -> &Responder {
        &self.responder
    }

    /// Where Checks are counted; for one refused before it became a Check.
    pub fn metrics(&self) -> &CheckMetrics {
        &self.metrics
    }
}

/// `envoy.service.auth.v3.Authorization` on tonic, answering through [`CheckCodec`]: the
/// generated server would have every allow build a `CheckResponse` only to encode it.
#[derive(Clone)]
pub struct CheckServer {
    service: Arc<CheckService>,
    max_request_bytes: usize,
}

impl CheckServer {
    pub fn new(service: Arc<CheckService>, max_request_bytes: usize) -> Self {
        Self {
            service,
            max_request_bytes,
        }
    }
}

impl NamedService for CheckServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

impl<B> Service<http::Request<B>> for CheckServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = crate::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let service = Arc::clone(&self.service);
        let max_request_bytes = self.max_request_bytes;
        Box::pin(async move {
            let codec = CheckCodec(Arc::clone(&service));
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(max_request_bytes), None);
            Ok(grpc.unary(CheckMethod(service), request).await)
        })
    }
}

/// A layer for tonic's server that hands each Check straight to `check`. tonic's router finds
/// every request's service by matching its path and stores the match in the request's
/// extensions (allocations of its own); a Check needs none of that. Every other path (health,
/// reflection, unknown methods) goes on to the router, as before. Public for the benchmark's
/// no-op, which serves alike.
#[derive(Clone)]
pub struct ChecksFirst<C>(pub C);

/// [`ChecksFirst`] around tonic's router.
#[derive(Clone)]
pub struct ChecksFirstService<C, S> {
    check: C,
    others: S,
}

impl<C: Clone, S> tower_layer::Layer<S> for ChecksFirst<C> {
    type Service = ChecksFirstService<C, S>;

    fn layer(&self, others: S) -> Self::Service {
        ChecksFirstService {
            check: self.0.clone(),
            others,
        }
    }
}

impl<C, S, B> Service<http::Request<B>> for ChecksFirstService<C, S>
where
    C: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    C::Error: Into<StdError>,
    S::Error: Into<StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = StdError;
    type Future = futures_util::future::Either<
        futures_util::future::ErrInto<C::Future, StdError>,
        futures_util::future::ErrInto<S::Future, StdError>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both are readied, whichever the next request goes to.
        match self.check.poll_ready(cx).map_err(Into::into)? {
            Poll::Ready(()) => self.others.poll_ready(cx).map_err(Into::into),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use futures_util::TryFutureExt as _;
        if request.uri().path() == CHECK_PATH {
            futures_util::future::Either::Left(self.check.call(request).err_into())
        } else {
            futures_util::future::Either::Right(self.others.call(request).err_into())
        }
    }
}

/// The Check method itself: the request decoded, the answer left for [`CheckCodec`] to write.
struct CheckMethod(Arc<CheckService>);

impl UnaryService<CheckRequest> for CheckMethod {
    type Response = Answer;
    type Future = crate::BoxFuture<'static, Result<Response<Answer>, Status>>;

    fn call(&mut self, request: Request<CheckRequest>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move {
            let outcome = service.judge(request.get_ref(), Transport::Grpc).await;
            Ok(Response::new(service.responder.answer(outcome)))
        })
    }
}

/// Decodes the part of a `CheckRequest` a Check reads ([`request`]); writes an allow straight
/// from its grant.
struct CheckCodec(Arc<CheckService>);

impl Codec for CheckCodec {
    type Encode = Answer;
    type Decode = CheckRequest;
    type Encoder = Self;
    type Decoder = CheckDecoder;

    fn encoder(&mut self) -> Self {
        CheckCodec(Arc::clone(&self.0))
    }

    fn decoder(&mut self) -> CheckDecoder {
        CheckDecoder
    }
}

/// What a Check's decoding buffer starts with: Envoy's requests with a usual set of headers
/// fit, and a buffer this small is among the allocator's quickest.
const DECODE_BUFFER_BYTES: usize = 1024;

/// Decodes a Check as [`request::decode`] does; a request that does not parse is `INTERNAL`, as
/// tonic's prost decoder answers. Public for the benchmark's no-op, which reads requests alike.
pub struct CheckDecoder;

impl Decoder for CheckDecoder {
    type Item = CheckRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<CheckRequest>, Status> {
        request::decode(buf)
            .map(Some)
            .map_err(|error| Status::internal(error.to_string()))
    }

    /// Room for a typical Check from the start (tonic's default is 8 KiB); a larger one grows
    /// the buffer once.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, 32 * 1024)
    }
}

impl Encoder for CheckCodec {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, answer: Answer, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match answer {
            Answer::Allow(grant) => self.0.responder.encode_allow(&grant, buf),
            Answer::Message(response) => response
                .encode(buf)
                .map_err(|_| Status::internal("the answer does not fit the buffer"))?,
        }
        Ok(())
    }
}

/// Envoy's `x-request-id`, for correlating logs; bounded in length and printable only.
fn request_id(request: &CheckRequest) -> &str {
    request
        .http()
        .and_then(|http| token::header(http, "x-request-id"))
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("-")
}

/// Serves ext_authz and `grpc.health.v1` on `listener` until `shutdown` resolves, then stops
/// accepting and lets in-flight Checks finish.
pub async fn serve_grpc(
    listener: TcpListener,
    service: Arc<CheckService>,
    health: tonic_health::server::HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    tls: Option<tonic::transport::ServerTlsConfig>,
    limits: GrpcLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    health.set_serving::<CheckServer>().await;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(limits.max_concurrent_streams));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let check = CheckServer::new(service, limits.max_request_bytes);
    builder
        .layer(ChecksFirst(check.clone()))
        .add_service(health_service)
        .add_optional_service(reflection::service(&[
            EXT_AUTHZ_DESCRIPTORS,
            HEALTH_DESCRIPTORS,
        ]))
        .add_service(check)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Envoy's ext_authz API, encoded by the build script from the protos `envoy-types` ships.
const EXT_AUTHZ_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_ext_authz_descriptor.bin"));

const HEALTH_DESCRIPTORS: &[u8] = tonic_health::pb::FILE_DESCRIPTOR_SET;

/// Whether a dependency answers now.
pub type Health = Arc<dyn Fn() -> bool + Send + Sync>;

/// What `/readyz` reports.
#[derive(Clone)]
pub struct Readiness {
    /// False once shutdown began.
    pub serving: Arc<AtomicBool>,
    /// The Redis tier's health, when there is one. A failing Redis degrades, never unreadies:
    /// Checks still work through introspection.
    pub redis: Option<Health>,
    /// Whether this replica hears of evictions, when there is Redis to hear them through.
    pub evictions: Option<Health>,
    /// Whether `--issuer`'s metadata named the introspection endpoint, when it is to: until
    /// then every Check that needs the IdP fails, so the replica is not ready.
    pub discovery: Option<Health>,
}

/// Serves `/metrics`, `/healthz`, `/readyz` and, with `jwks` (rfc7662 mode), the public keys of
/// the JWTs phantom-authz signs at `/.well-known/jwks.json`, until `shutdown` resolves, each
/// connection bound by [`ADMIN_HEADER_READ_TIMEOUT`].
pub async fn serve_admin(
    listener: TcpListener,
    metrics: PrometheusHandle,
    readiness: Readiness,
    jwks: Option<Arc<str>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut app = Router::new();
    if let Some(jwks) = jwks {
        app = app.route(
            JWKS_PATH,
            get(move || {
                let body = jwks.to_string();
                async move {
                    (
                        [
                            (header::CONTENT_TYPE, "application/jwk-set+json"),
                            // Long enough to spare the listener, short enough that a key added
                            // for rotation reaches the APIs within minutes.
                            (header::CACHE_CONTROL, "public, max-age=300"),
                        ],
                        body,
                    )
                }
            }),
        );
    }
    let app = app
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { ready(&readiness) }
            }),
        );
    serve_http(listener, app, ADMIN_HEADER_READ_TIMEOUT, true, shutdown).await;
}

/// Where the admin listener publishes the JWK Set of the JWTs phantom-authz signs.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// How long a client of the admin HTTP listener may take to send a request's headers, counted
/// from connecting (or, between requests, from the previous response) to the blank line.
/// Prometheus sends them at once; a connection that dribbles them (slowloris) or sits idle
/// longer is closed.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/1 (and, unless `http1_only`, h2c) for `app` on `listener` until `shutdown` resolves;
/// then stops accepting, lets requests under way finish and closes idle connections.
/// `axum::serve` sets no header-read timeout, so each connection is served by hyper directly,
/// with one: `header_read_timeout`.
pub(crate) async fn serve_http(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    http1_only: bool,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if http1_only {
        builder = builder.http1_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(error) => {
                    // Out of file descriptors, most likely: pause rather than spin.
                    tracing::warn!(%error, "HTTP listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()))
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection closed with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

fn ready(readiness: &Readiness) -> impl IntoResponse + use<> {
    let serving = readiness.serving.load(Ordering::Relaxed);
    let redis = match &readiness.redis {
        None => "disabled",
        Some(is_up) if is_up() => "up",
        Some(_) => "degraded",
    };
    let evictions = match &readiness.evictions {
        None => "disabled",
        Some(listening) if listening() => "listening",
        Some(_) => "lost",
    };
    let discovered = readiness.discovery.as_ref().is_none_or(|done| done());
    // Shown only when the introspection endpoint is discovered (--issuer without a URL).
    let discovery = match &readiness.discovery {
        None => String::new(),
        Some(_) if discovered => ",\"discovery\":\"done\"".to_owned(),
        Some(_) => ",\"discovery\":\"pending\"".to_owned(),
    };
    let (status, state) = match (serving, discovered) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "discovering"),
        (true, true) => (StatusCode::OK, "ready"),
    };
    let body = format!(
        "{{\"status\":\"{state}\",\"redis\":\"{redis}\",\"evictions\":\"{evictions}\"\
         {discovery}}}\n"
    );
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}
