//! The second front door: HTTP forward-auth, for gateways that cannot speak gRPC ext_authz
//! (nginx `auth_request`, Caddy `forward_auth`, Traefik `forwardAuth`, HAProxy, Envoy's
//! `http_service`). Every request is a Check: it becomes the `CheckRequest` Envoy would have
//! sent, goes through the same authorizer, caches and route table, and is answered with the
//! same decision as an HTTP status and headers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use tokio::net::TcpListener;

use crate::config::{HttpConfig, OriginalRequest};
use crate::decision::Outcome;
use crate::metrics::Transport;
use crate::request::{CheckRequest, Entry, HttpRequest};
use crate::server::{self, CheckService};

/// How long a gateway may take to send a request's headers, or keep a connection idle between
/// requests, before the connection is closed: gateways send at once and reconnect at will.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers copied into the `CheckRequest` besides `authorization`: request ids and trace
/// context, so logs and spans correlate as they do for Envoy's Checks.
const PASSED_ON: &[&str] = &["x-request-id", "traceparent", "tracestate"];

/// Serves forward-auth on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    checks: Arc<CheckService>,
    config: HttpConfig,
    shutdown: impl Future<Output = ()>,
) {
    let config = Arc::new(config);
    let app = Router::new().fallback(move |request: Request<Body>| {
        let checks = checks.clone();
        let config = config.clone();
        async move { answer(&checks, &config, request).await }
    });
    server::serve_http(listener, app, HEADER_READ_TIMEOUT, false, shutdown).await;
}

async fn answer(
    checks: &CheckService,
    config: &HttpConfig,
    request: Request<Body>,
) -> Response<Body> {
    let outcome = match check_request(request.method(), request.uri(), request.headers(), config) {
        Ok(check) => checks.judge(&check, Transport::Http).await,
        Err(outcome) => {
            // Refused before it became a Check (two Authorization headers): counted all the same.
            checks
                .metrics()
                .finished(&outcome, Duration::ZERO, Transport::Http);
            outcome
        }
    };
    let answer = checks.responder().http(&outcome);
    let mut response = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if !answer.body.is_empty() {
        response = response.header(header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in answer.headers {
        response = response.header(name, value);
    }
    response.body(Body::from(answer.body)).unwrap_or_else(|_| {
        // Only a header value could fail, and they are checked when built: never an allow.
        let mut failed = Response::new(Body::empty());
        *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        failed
    })
}

/// The `CheckRequest` Envoy would send for the request a gateway asks about. The original
/// method, host and URI come from where `config` says the gateway puts them: `X-Forwarded-*`
/// (Caddy, Traefik, HAProxy), `X-Original-*` (nginx), or the request itself (Envoy's
/// `http_service`, after the path prefix). Only that convention is read: headers of another
/// could come from the client, passed through by the gateway.
pub fn check_request(
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    config: &HttpConfig,
) -> Result<CheckRequest, Outcome> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let entry = |name: &'static str, value: &str| Entry {
        key: Bytes::from_static(name.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    };
    let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
    let mut passed = Vec::with_capacity(1 + PASSED_ON.len());
    match (authorization.next(), authorization.next()) {
        (Some(_), Some(_)) => return Err(Outcome::MalformedRequest),
        (Some(value), None) => {
            let value = value.to_str().map_err(|_| Outcome::InvalidToken)?;
            passed.push(entry("authorization", value));
        }
        (None, _) => {}
    }
    for name in PASSED_ON {
        if let Some(value) = text(name) {
            passed.push(entry(name, value));
        }
    }
    let own_host = || text(header::HOST.as_str()).or_else(|| uri.host());
    let own_path = || {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        match config
            .path_prefix
            .as_deref()
            .and_then(|prefix| path.strip_prefix(prefix))
        {
            Some("") => "/".to_owned(),
            Some(rest) if rest.starts_with(['/', '?']) => rest.to_owned(),
            _ => path.to_owned(),
        }
    };
    let (method, host, path) = match config.original {
        OriginalRequest::XForwarded => (
            text("x-forwarded-method").unwrap_or(method.as_str()),
            text("x-forwarded-host").or_else(own_host),
            text("x-forwarded-uri").map_or_else(own_path, str::to_owned),
        ),
        OriginalRequest::XOriginal => (
            text("x-original-method").unwrap_or(method.as_str()),
            own_host(),
            text("x-original-uri").map_or_else(own_path, str::to_owned),
        ),
        OriginalRequest::Path => (method.as_str(), own_host(), own_path()),
    };
    Ok(CheckRequest::about(HttpRequest {
        method: Bytes::copy_from_slice(method.as_bytes()),
        headers: passed,
        path: Bytes::from(path),
        host: Bytes::copy_from_slice(host.unwrap_or_default().as_bytes()),
        header_map: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Entries as _;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn http(request: &CheckRequest) -> &HttpRequest {
        request.http().unwrap()
    }

    fn config(original: OriginalRequest, path_prefix: Option<&str>) -> HttpConfig {
        HttpConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            original,
            path_prefix: path_prefix.map(str::to_owned),
        }
    }

    #[test]
    fn the_original_request_comes_from_the_gateways_headers() {
        let uri: axum::http::Uri = "/authz?x=1".parse().unwrap();
        // Caddy and Traefik.
        let caddy = headers(&[
            ("authorization", "Bearer t"),
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/orders/7?page=2"),
            ("x-forwarded-host", "api.example"),
        ]);
        let forwarded = config(OriginalRequest::XForwarded, None);
        let request = check_request(&Method::GET, &uri, &caddy, &forwarded).unwrap();
        assert_eq!(
            (http(&request).method(), http(&request).path()),
            ("POST", "/orders/7?page=2")
        );
        assert_eq!(http(&request).host(), "api.example");
        assert_eq!(
            http(&request).headers.named("authorization"),
            Some("Bearer t")
        );
        // nginx.
        let nginx = headers(&[
            ("x-original-method", "PUT"),
            ("x-original-uri", "/a"),
            ("host", "api.example"),
        ]);
        let original = config(OriginalRequest::XOriginal, None);
        let request = check_request(&Method::GET, &uri, &nginx, &original).unwrap();
        assert_eq!(
            (http(&request).method(), http(&request).path()),
            ("PUT", "/a")
        );
        // A convention the gateway does not use is the client's word: ignored.
        let request = check_request(&Method::GET, &uri, &nginx, &forwarded).unwrap();
        assert_eq!(
            (http(&request).method(), http(&request).path()),
            ("GET", "/authz?x=1")
        );
        let request = check_request(&Method::GET, &uri, &caddy, &original).unwrap();
        assert_eq!(http(&request).path(), "/authz?x=1");
        // Envoy's http_service: the path itself, after the prefix.
        let envoy: axum::http::Uri = "/authz/orders/7".parse().unwrap();
        let path = config(OriginalRequest::Path, Some("/authz"));
        // Even X-Forwarded-* (from the client, through Envoy) are ignored in this mode.
        let request = check_request(&Method::DELETE, &envoy, &caddy, &path).unwrap();
        assert_eq!(
            (http(&request).method(), http(&request).path()),
            ("DELETE", "/orders/7")
        );
        let bare: axum::http::Uri = "/authz".parse().unwrap();
        let request = check_request(&Method::GET, &bare, &HeaderMap::new(), &path).unwrap();
        assert_eq!(http(&request).path(), "/");
    }

    #[test]
    fn several_authorization_headers_are_malformed() {
        let uri: axum::http::Uri = "/".parse().unwrap();
        let twice = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(
            check_request(
                &Method::GET,
                &uri,
                &twice,
                &config(OriginalRequest::XForwarded, None)
            ),
            Err(Outcome::MalformedRequest)
        );
    }
}
