//! The benchmark baseline: an ext_authz server on the same tonic and envoy-types as
//! phantom-authz that allows every Check and sets one 1 KB `authorization` header, so the
//! difference to phantom-authz is exactly the work phantom-authz adds.
//!
//! ```text
//! cargo run --release --example noop_authz -- --listen 127.0.0.1:0
//! ```

use std::io::Write as _;
use std::net::SocketAddr;

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
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
}

struct Noop {
    authorization: String,
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // Built per call, as phantom-authz does, so both pay for the same copy.
        Ok(Response::new(CheckResponse {
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
        }))
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
    let service = Noop { authorization };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(service))
        .serve_with_incoming(incoming)
        .await
    {
        eprintln!("noop_authz: {e}");
        std::process::exit(1);
    }
}
