//! The benchmark baseline: an ext_authz server on the same tonic as phantom-authz that allows
//! every Check and sets one `authorization` header (1 KB, or the value phantom-authz answers).
//!
//! With `--lean` it is the least this stack can do per Check: it takes Checks past tonic's
//! router and reads them as phantom-authz does ([`phantom_authz::server::ChecksFirst`],
//! [`phantom_authz::request`]) and writes one pre-encoded answer, so the
//! difference to phantom-authz is exactly the work phantom-authz adds (token, cache, route,
//! metrics, the answer's encoding). Without it, it is an ext_authz server as tonic generates
//! it: Envoy's full `CheckRequest` decoded, a `CheckResponse` built and encoded per Check.
//!
//! ```text
//! cargo run --release --example noop_authz -- --listen 127.0.0.1:0 --lean
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::task::Poll;

use bytes::{BufMut as _, Bytes};
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use phantom_authz::request;
use phantom_authz::server::{CheckDecoder, ChecksFirst};
use prost::Message as _;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[derive(Parser)]
#[command(about = "No-op ext_authz server: allows everything, sets a 1 KB authorization header")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// File holding the `Authorization` value to answer with, so that the baseline writes the
    /// very bytes phantom-authz writes for a token; a 1 KB placeholder without it.
    #[arg(long)]
    authorization_file: Option<std::path::PathBuf>,
    /// Read only what phantom-authz reads of the request and write a pre-encoded answer.
    #[arg(long)]
    lean: bool,
}

struct Noop {
    authorization: String,
}

impl Noop {
    fn answer(&self) -> CheckResponse {
        CheckResponse {
            status: Some(RpcStatus::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "authorization".to_owned(),
                        value: self.authorization.clone(),
                        ..Default::default()
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // Built per call, as a generated server does.
        Ok(Response::new(self.answer()))
    }
}

/// `--lean`: Checks decoded as phantom-authz decodes them, answered with bytes encoded once.
#[derive(Clone)]
struct Lean {
    answer: Bytes,
}

impl NamedService for Lean {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl<B> Service<http::Request<B>> for Lean
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = phantom_authz::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let lean = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(lean.clone());
            Ok(grpc.unary(lean, request).await)
        })
    }
}

impl UnaryService<request::CheckRequest> for Lean {
    type Response = Bytes;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, _request: Request<request::CheckRequest>) -> Self::Future {
        std::future::ready(Ok(Response::new(self.answer.clone())))
    }
}

impl Codec for Lean {
    type Encode = Bytes;
    type Decode = request::CheckRequest;
    type Encoder = Self;
    type Decoder = CheckDecoder;

    fn encoder(&mut self) -> Self {
        self.clone()
    }

    fn decoder(&mut self) -> CheckDecoder {
        CheckDecoder
    }
}

impl Encoder for Lean {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, answer: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&answer);
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("noop_authz: cannot bind {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    let authorization = match &args.authorization_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) => {
                eprintln!("noop_authz: cannot read {}: {e}", path.display());
                std::process::exit(1);
            }
        },
        None => format!("Bearer {}", "j".repeat(1024 - 7)),
    };
    let noop = Noop { authorization };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder();
    let served = if args.lean {
        let lean = Lean {
            answer: Bytes::from(noop.answer().encode_to_vec()),
        };
        // Checks past tonic's router, as phantom-authz serves them.
        server
            .layer(ChecksFirst(lean.clone()))
            .add_service(lean)
            .serve_with_incoming(incoming)
            .await
    } else {
        server
            .add_service(AuthorizationServer::new(noop))
            .serve_with_incoming(incoming)
            .await
    };
    if let Err(e) = served {
        eprintln!("noop_authz: {e}");
        std::process::exit(1);
    }
}
