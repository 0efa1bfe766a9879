//! The HTTP benchmark baseline: a forward-auth server on the same hyper stack as phantom-authz's
//! `--http-listen` (hyper-util's auto builder, HTTP/1.1 keep-alive, TCP_NODELAY) that allows
//! every request with the very `Authorization` value phantom-authz returns for the benchmark's
//! token, so the difference is exactly the work phantom-authz adds.
//!
//! ```text
//! cargo run --release --example noop_forward_auth -- --listen 127.0.0.1:0 --authorization-file f
//! ```

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use clap::Parser;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
#[command(about = "No-op forward-auth server: allows everything with a fixed Authorization value")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// File holding the `Authorization` value to answer with (`Bearer <JWT>`).
    #[arg(long)]
    authorization_file: std::path::PathBuf,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let authorization: Arc<str> = std::fs::read_to_string(&args.authorization_file)
        .expect("the authorization file")
        .trim()
        .into();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .expect("bind");
    println!("listening {}", listener.local_addr().expect("address"));
    std::io::stdout().flush().expect("stdout");
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let authorization = authorization.clone();
        let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
            let authorization = authorization.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(200)
                        .header("authorization", &*authorization)
                        .body(Body::empty())
                        .expect("response"),
                )
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(connection);
    }
}
