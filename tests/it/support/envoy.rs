//! Check requests as Envoy sends them, and its answers flattened for assertions.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap as EnvoyHeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use std::collections::HashMap;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------------------------
// Check requests and responses

/// A CheckRequest with headers in `attributes.request.http.headers`, as Envoy sends by default.
pub(crate) fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    let http = HttpRequest {
        method: "GET".into(),
        path: "/api/orders".into(),
        host: "api.example".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    };
    phantom_authz::token::check_request(http)
}

/// A CheckRequest with `encode_raw_headers: true`: headers as raw bytes in `header_map`.
pub(crate) fn raw_check_request(headers: &[(&str, &[u8])]) -> CheckRequest {
    let http = HttpRequest {
        method: "GET".into(),
        path: "/api/orders".into(),
        header_map: Some(EnvoyHeaderMap {
            headers: headers
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        ..Default::default()
    };
    phantom_authz::token::check_request(http)
}

pub(crate) fn bearer_request(token: &str) -> CheckRequest {
    check_request(&[
        ("authorization", &format!("Bearer {token}")),
        ("x-request-id", "req-1"),
        ("accept", "application/json"),
    ])
}

/// What Envoy would do with a CheckResponse, flattened for assertions.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) grpc_code: i32,
    pub(crate) http_status: u16,
    /// Headers set on the upstream request (allow) or on the response to the client (deny).
    pub(crate) headers: Vec<(String, String, i32)>,
}

impl Verdict {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v, _)| v.as_str())
    }
}

pub(crate) fn verdict(response: CheckResponse) -> Verdict {
    let grpc_code = response.status.map_or(0, |s| s.code);
    let flatten = |headers: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>| {
        headers
            .into_iter()
            .map(|h| {
                let header = h.header.unwrap();
                (header.key, header.value, h.append_action)
            })
            .collect()
    };
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => Verdict {
            grpc_code,
            http_status: 200,
            headers: flatten(ok.headers),
        },
        Some(HttpResponse::DeniedResponse(denied)) => Verdict {
            grpc_code,
            http_status: denied.status.map_or(0, |s| s.code as u16),
            headers: flatten(denied.headers),
        },
        other => panic!("unexpected http_response {other:?}"),
    }
}

/// Sends one Check and flattens the answer.
pub(crate) async fn check(
    client: &mut AuthorizationClient<Channel>,
    request: CheckRequest,
) -> Verdict {
    verdict(client.check(request).await.expect("Check RPC").into_inner())
}

/// A Check for `method host path` with `token`, and Envoy's per-route context extensions.
pub(crate) fn route_request(
    method: &str,
    host: &str,
    path: &str,
    token: &str,
    extensions: &[(&str, &str)],
) -> CheckRequest {
    let mut request = check_request(&[("authorization", &format!("Bearer {token}"))]);
    let attributes = request.attributes.as_mut().unwrap();
    let http = attributes.request.as_mut().unwrap().http.as_mut().unwrap();
    http.method = method.into();
    http.host = host.into();
    http.path = path.into();
    attributes.context_extensions = extensions
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    request
}
