//! The one place where outcomes become HTTP statuses, gRPC codes and headers. Pure.
//!
//! A denial is a normal `CheckResponse`, never an `Err(Status)`: Envoy relays the HTTP status and
//! headers we choose to the client.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::rpc::Status;
use tonic::Code;

use crate::token::TokenProblem;

/// The `Authorization` value forwarded upstream, `Bearer <JWT>`, built once per cache entry and
/// shared by every response that uses it.
pub type Authorization = Arc<str>;

/// Builds the forwarded `Authorization` value for a JWT.
pub fn bearer(jwt: &str) -> Authorization {
    let mut value = String::with_capacity(7 + jwt.len());
    value.push_str("Bearer ");
    value.push_str(jwt);
    value.into()
}

/// Everything a Check can end in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the request with this `Authorization` value.
    Allow(AllowedJwt),
    /// No `Authorization` header, another scheme, or an empty token.
    NoToken,
    /// A bearer token that cannot be valid (too long, bad characters); the IdP was not asked.
    InvalidToken,
    /// The request itself is malformed (several `Authorization` headers).
    MalformedRequest,
    /// The IdP says the token is not active.
    Inactive,
    /// The IdP vouched for a JWT that had already expired.
    ExpiredJwt,
    /// The IdP answered 200 with a body we cannot use.
    IdpBadResponse,
    /// The IdP refused us or failed (401, 403, 404, 500–502, 504–599): never the user's fault.
    IdpRejected,
    /// The IdP said 503, could not be reached, or did not answer in time.
    IdpUnavailable,
    /// The IdP answered a status that makes no sense for introspection (400, 3xx, 418, …).
    IdpUnexpected,
}

/// The forwarded value, with a redacting `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AllowedJwt(pub Authorization);

impl std::fmt::Debug for AllowedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AllowedJwt(len={})", self.0.len())
    }
}

impl From<TokenProblem> for Outcome {
    fn from(problem: TokenProblem) -> Self {
        match problem {
            TokenProblem::Missing => Outcome::NoToken,
            TokenProblem::Invalid => Outcome::InvalidToken,
            TokenProblem::Malformed => Outcome::MalformedRequest,
        }
    }
}

impl Outcome {
    /// The HTTP status Envoy sends (200 for an allowed request).
    pub fn http_status(&self) -> u16 {
        match self {
            Outcome::Allow(_) => 200,
            Outcome::NoToken | Outcome::InvalidToken | Outcome::Inactive | Outcome::ExpiredJwt => {
                401
            }
            Outcome::MalformedRequest => 400,
            Outcome::IdpBadResponse | Outcome::IdpRejected => 502,
            Outcome::IdpUnavailable => 503,
            Outcome::IdpUnexpected => 500,
        }
    }

    /// The gRPC code in `CheckResponse.status`.
    pub fn grpc_code(&self) -> Code {
        match self {
            Outcome::Allow(_) => Code::Ok,
            Outcome::NoToken | Outcome::InvalidToken | Outcome::Inactive | Outcome::ExpiredJwt => {
                Code::Unauthenticated
            }
            Outcome::MalformedRequest => Code::InvalidArgument,
            Outcome::IdpBadResponse | Outcome::IdpRejected | Outcome::IdpUnavailable => {
                Code::Unavailable
            }
            Outcome::IdpUnexpected => Code::Internal,
        }
    }

    /// A bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Allow(_) => "allowed",
            Outcome::NoToken => "no_token",
            Outcome::InvalidToken => "invalid_token",
            Outcome::MalformedRequest => "malformed_request",
            Outcome::Inactive => "inactive",
            Outcome::ExpiredJwt => "expired_jwt",
            Outcome::IdpBadResponse => "idp_bad_response",
            Outcome::IdpRejected => "idp_rejected",
            Outcome::IdpUnavailable => "idp_unavailable",
            Outcome::IdpUnexpected => "idp_unexpected",
        }
    }

    /// `"allow"` or `"deny"`.
    pub fn decision(&self) -> &'static str {
        match self {
            Outcome::Allow(_) => "allow",
            _ => "deny",
        }
    }
}

/// Turns outcomes into `CheckResponse`s; holds the challenges built once from the realm.
#[derive(Clone, Debug)]
pub struct Responder {
    bare_challenge: String,
    invalid_token_challenge: String,
    invalid_request_challenge: String,
}

impl Responder {
    /// `realm` was validated to fit inside a quoted-string.
    pub fn new(realm: &str) -> Self {
        Self {
            bare_challenge: format!("Bearer realm=\"{realm}\""),
            invalid_token_challenge: format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
            invalid_request_challenge: format!(
                "Bearer realm=\"{realm}\", error=\"invalid_request\""
            ),
        }
    }

    pub fn respond(&self, outcome: &Outcome) -> CheckResponse {
        let status = Some(Status {
            code: outcome.grpc_code() as i32,
            ..Default::default()
        });
        let http_response = match outcome {
            Outcome::Allow(AllowedJwt(authorization)) => HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "authorization".to_owned(),
                        value: String::from(&**authorization),
                        ..Default::default()
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            denied => {
                let challenge = match denied {
                    Outcome::NoToken => Some(&self.bare_challenge),
                    Outcome::InvalidToken | Outcome::Inactive | Outcome::ExpiredJwt => {
                        Some(&self.invalid_token_challenge)
                    }
                    Outcome::MalformedRequest => Some(&self.invalid_request_challenge),
                    Outcome::Allow(_)
                    | Outcome::IdpBadResponse
                    | Outcome::IdpRejected
                    | Outcome::IdpUnavailable
                    | Outcome::IdpUnexpected => None,
                };
                let headers = challenge
                    .map(|value| HeaderValueOption {
                        header: Some(HeaderValue {
                            key: "www-authenticate".to_owned(),
                            value: value.clone(),
                            ..Default::default()
                        }),
                        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                        ..Default::default()
                    })
                    .into_iter()
                    .collect();
                HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: http_status_code(denied.http_status()) as i32,
                    }),
                    headers,
                    body: String::new(),
                })
            }
        };
        CheckResponse {
            status,
            http_response: Some(http_response),
            ..Default::default()
        }
    }
}

fn http_status_code(status: u16) -> StatusCode {
    match status {
        400 => StatusCode::BadRequest,
        401 => StatusCode::Unauthorized,
        500 => StatusCode::InternalServerError,
        502 => StatusCode::BadGateway,
        503 => StatusCode::ServiceUnavailable,
        _ => StatusCode::InternalServerError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(response: &CheckResponse) -> Option<String> {
        match response.http_response.as_ref().unwrap() {
            HttpResponse::DeniedResponse(denied) => denied
                .headers
                .iter()
                .find(|h| h.header.as_ref().unwrap().key == "www-authenticate")
                .map(|h| h.header.as_ref().unwrap().value.clone()),
            _ => None,
        }
    }

    fn denied_status(response: &CheckResponse) -> i32 {
        match response.http_response.as_ref().unwrap() {
            HttpResponse::DeniedResponse(denied) => denied.status.as_ref().unwrap().code,
            _ => 200,
        }
    }

    #[test]
    fn allow_overwrites_authorization() {
        let responder = Responder::new("api");
        let response = responder.respond(&Outcome::Allow(AllowedJwt(bearer("a.b.c"))));
        assert_eq!(response.status.unwrap().code, Code::Ok as i32);
        let HttpResponse::OkResponse(ok) = response.http_response.unwrap() else {
            panic!("expected an ok response");
        };
        assert_eq!(ok.headers.len(), 1);
        let header = &ok.headers[0];
        assert_eq!(
            header.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        #[allow(deprecated)]
        let append = &header.append;
        assert!(append.is_none());
        let value = header.header.as_ref().unwrap();
        assert_eq!(
            (value.key.as_str(), value.value.as_str()),
            ("authorization", "Bearer a.b.c")
        );
    }

    #[test]
    fn every_denial_maps_to_its_row() {
        let responder = Responder::new("api");
        let rows: [(Outcome, i32, Code, Option<&str>); 9] = [
            (
                Outcome::NoToken,
                401,
                Code::Unauthenticated,
                Some("Bearer realm=\"api\""),
            ),
            (
                Outcome::Inactive,
                401,
                Code::Unauthenticated,
                Some("Bearer realm=\"api\", error=\"invalid_token\""),
            ),
            (
                Outcome::InvalidToken,
                401,
                Code::Unauthenticated,
                Some("Bearer realm=\"api\", error=\"invalid_token\""),
            ),
            (
                Outcome::ExpiredJwt,
                401,
                Code::Unauthenticated,
                Some("Bearer realm=\"api\", error=\"invalid_token\""),
            ),
            (
                Outcome::MalformedRequest,
                400,
                Code::InvalidArgument,
                Some("Bearer realm=\"api\", error=\"invalid_request\""),
            ),
            (Outcome::IdpBadResponse, 502, Code::Unavailable, None),
            (Outcome::IdpRejected, 502, Code::Unavailable, None),
            (Outcome::IdpUnavailable, 503, Code::Unavailable, None),
            (Outcome::IdpUnexpected, 500, Code::Internal, None),
        ];
        for (outcome, http, code, www) in rows {
            let response = responder.respond(&outcome);
            assert_eq!(denied_status(&response), http, "{outcome:?}");
            assert_eq!(i32::from(outcome.http_status()), http, "{outcome:?}");
            assert_eq!(
                response.status.as_ref().unwrap().code,
                code as i32,
                "{outcome:?}"
            );
            assert_eq!(challenge(&response).as_deref(), www, "{outcome:?}");
            assert_eq!(outcome.decision(), "deny");
        }
    }

    #[test]
    fn debug_hides_the_jwt() {
        let outcome = Outcome::Allow(AllowedJwt(bearer("eyJhbGciOi.secret.sig")));
        assert!(!format!("{outcome:?}").contains("secret"));
    }
}
