//! The one place where outcomes become HTTP statuses, gRPC codes and headers. Pure.
//!
//! A denial is a normal `CheckResponse`, never an `Err(Status)`: Envoy relays the HTTP status and
//! headers we choose to the client.

use bytes::BufMut;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::rpc::Status;
use prost::encoding::{self, WireType};
use tonic::Code;

use std::sync::Arc;

use crate::cache::Grant;
use crate::token::TokenProblem;

/// Everything a Check can end in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the request with the grant's `Authorization` value.
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
    /// An active token without every scope the route requires (which are these).
    InsufficientScope(Arc<str>),
    /// An active token not meant for the route's audience.
    AudienceMismatch,
    /// No route rule matched and unmatched requests are denied.
    NoRoute,
    /// The route's requirement (this setting) is malformed: never an allow.
    RouteMisconfigured(&'static str),
}

/// The forwarded value, with a redacting `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AllowedJwt(pub Grant);

impl std::fmt::Debug for AllowedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AllowedJwt(len={})", self.0.authorization_bytes().len())
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

/// How one outcome reads on every surface. [`Outcome::row`] is the only place that decides it;
/// the response, the metrics, the logs and the spans all read it from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub decision: Decision,
    pub http: HttpStatusCode,
    /// The gRPC code in `CheckResponse.status`.
    pub grpc: Code,
    /// A bounded label for metrics, logs and spans.
    pub reason: &'static str,
    /// The `WWW-Authenticate` challenge a denial carries.
    pub challenge: Challenge,
}

impl Row {
    /// Every allow's row.
    pub const ALLOW: Row = Row {
        decision: Decision::Allow,
        http: HttpStatusCode::Ok,
        grpc: Code::Ok,
        reason: "allowed",
        challenge: Challenge::None,
    };
}

/// Whether the request goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// The HTTP statuses Envoy is ever told to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpStatusCode {
    Ok,
    BadRequest,
    Unauthorized,
    Forbidden,
    InternalServerError,
    BadGateway,
    ServiceUnavailable,
}

impl HttpStatusCode {
    pub fn as_u16(self) -> u16 {
        match self {
            HttpStatusCode::Ok => 200,
            HttpStatusCode::BadRequest => 400,
            HttpStatusCode::Unauthorized => 401,
            HttpStatusCode::Forbidden => 403,
            HttpStatusCode::InternalServerError => 500,
            HttpStatusCode::BadGateway => 502,
            HttpStatusCode::ServiceUnavailable => 503,
        }
    }

    /// The status as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            HttpStatusCode::Ok => "200",
            HttpStatusCode::BadRequest => "400",
            HttpStatusCode::Unauthorized => "401",
            HttpStatusCode::Forbidden => "403",
            HttpStatusCode::InternalServerError => "500",
            HttpStatusCode::BadGateway => "502",
            HttpStatusCode::ServiceUnavailable => "503",
        }
    }

    /// A failure of the service or what it depends on, not of the client: marks the span.
    pub fn is_server_error(self) -> bool {
        match self {
            HttpStatusCode::Ok
            | HttpStatusCode::BadRequest
            | HttpStatusCode::Unauthorized
            | HttpStatusCode::Forbidden => false,
            HttpStatusCode::InternalServerError
            | HttpStatusCode::BadGateway
            | HttpStatusCode::ServiceUnavailable => true,
        }
    }

    fn envoy(self) -> StatusCode {
        match self {
            HttpStatusCode::Ok => StatusCode::Ok,
            HttpStatusCode::BadRequest => StatusCode::BadRequest,
            HttpStatusCode::Unauthorized => StatusCode::Unauthorized,
            HttpStatusCode::Forbidden => StatusCode::Forbidden,
            HttpStatusCode::InternalServerError => StatusCode::InternalServerError,
            HttpStatusCode::BadGateway => StatusCode::BadGateway,
            HttpStatusCode::ServiceUnavailable => StatusCode::ServiceUnavailable,
        }
    }
}

/// The `WWW-Authenticate` challenge of a denial (RFC 6750 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Challenge {
    None,
    /// `Bearer realm="…"`: no credentials were sent.
    Bare,
    /// `error="invalid_token"`.
    InvalidToken,
    /// `error="invalid_request"`.
    InvalidRequest,
    /// `error="insufficient_scope", scope="…"` (RFC 6750 §3.1).
    InsufficientScope,
}

impl Outcome {
    /// The decision table.
    #[rustfmt::skip]
    pub fn row(&self) -> Row {
        use Challenge as C;
        use Code as G;
        use Decision::Deny;
        use HttpStatusCode as H;
        let (decision, http, grpc, reason, challenge) = match self {
            Outcome::Allow(_)         => return Row::ALLOW,
            Outcome::NoToken          => (Deny,  H::Unauthorized,        G::Unauthenticated, "no_token",          C::Bare),
            Outcome::InvalidToken     => (Deny,  H::Unauthorized,        G::Unauthenticated, "invalid_token",     C::InvalidToken),
            Outcome::MalformedRequest => (Deny,  H::BadRequest,          G::InvalidArgument, "malformed_request", C::InvalidRequest),
            Outcome::Inactive         => (Deny,  H::Unauthorized,        G::Unauthenticated, "inactive",          C::InvalidToken),
            Outcome::ExpiredJwt       => (Deny,  H::Unauthorized,        G::Unauthenticated, "expired_jwt",       C::InvalidToken),
            Outcome::IdpBadResponse   => (Deny,  H::BadGateway,          G::Unavailable,     "idp_bad_response",  C::None),
            Outcome::IdpRejected      => (Deny,  H::BadGateway,          G::Unavailable,     "idp_rejected",      C::None),
            Outcome::IdpUnavailable   => (Deny,  H::ServiceUnavailable,  G::Unavailable,     "idp_unavailable",   C::None),
            Outcome::IdpUnexpected    => (Deny,  H::InternalServerError, G::Internal,        "idp_unexpected",    C::None),
            Outcome::InsufficientScope(_) => (Deny, H::Forbidden,        G::PermissionDenied, "insufficient_scope", C::InsufficientScope),
            Outcome::AudienceMismatch => (Deny,  H::Unauthorized,        G::Unauthenticated, "audience_mismatch", C::InvalidToken),
            Outcome::NoRoute          => (Deny,  H::Forbidden,           G::PermissionDenied, "no_route",         C::None),
            Outcome::RouteMisconfigured(_) => (Deny, H::InternalServerError, G::Internal,    "route_misconfigured", C::None),
        };
        Row {
            decision,
            http,
            grpc,
            reason,
            challenge,
        }
    }
}

/// A claim forwarded upstream as a request header on every allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClaimName {
    Sub,
    #[value(name = "client_id")]
    ClientId,
    /// The scopes, space-separated.
    Scope,
    /// The audiences, space-separated.
    Aud,
}

impl ClaimName {
    /// The claim's value for a grant, when it has one that can travel in a header.
    fn value(self, grant: &Grant) -> Option<String> {
        let joined = |values: &mut dyn Iterator<Item = &str>| {
            let joined = values.collect::<Vec<_>>().join(" ");
            (!joined.is_empty()).then_some(joined)
        };
        let value = match self {
            ClaimName::Sub => grant.sub()?.to_owned(),
            ClaimName::ClientId => grant.client_id()?.to_owned(),
            ClaimName::Scope => joined(&mut grant.scopes())?,
            ClaimName::Aud => joined(&mut grant.audiences())?,
        };
        // A value the IdP chose must not break out of its header: printable ASCII only.
        value
            .bytes()
            .all(|b| b == b' ' || b.is_ascii_graphic())
            .then_some(value)
    }
}

/// Turns outcomes into `CheckResponse`s; holds the challenges built once from the realm and the
/// claim headers to set.
#[derive(Clone, Debug)]
pub struct Responder {
    realm: String,
    bare_challenge: String,
    invalid_token_challenge: String,
    invalid_request_challenge: String,
    /// Named for the service's lifetime (leaked once, at start-up), so that answers borrow the
    /// names instead of copying them per Check.
    claim_headers: Vec<(ClaimName, &'static str)>,
}

impl Responder {
    /// `realm` was validated to fit inside a quoted-string; `claim_headers` are lower-case
    /// header names, validated.
    pub fn new(realm: &str, claim_headers: Vec<(ClaimName, String)>) -> Self {
        Self {
            realm: realm.to_owned(),
            bare_challenge: format!("Bearer realm=\"{realm}\""),
            invalid_token_challenge: format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
            invalid_request_challenge: format!(
                "Bearer realm=\"{realm}\", error=\"invalid_request\""
            ),
            claim_headers: claim_headers
                .into_iter()
                .map(|(claim, header)| (claim, &*Box::leak(header.into_boxed_str())))
                .collect(),
        }
    }

    /// The `CheckResponse` of a denial: its status, gRPC code and challenge. (An allow is
    /// written by [`Responder::encode_allow`], without a message.)
    fn deny(&self, outcome: &Outcome) -> CheckResponse {
        let row = outcome.row();
        let challenge = self.challenge(outcome);
        CheckResponse {
            status: Some(Status {
                code: row.grpc as i32,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: row.http.envoy() as i32,
                }),
                headers: challenge
                    .map(|value| overwrite("www-authenticate", value))
                    .into_iter()
                    .collect(),
                body: String::new(),
            })),
            dynamic_metadata: None,
        }
    }
}

/// What a gRPC Check answers: an allow is written from its grant straight into the response
/// buffer ([`Responder::encode_allow`]); anything else is a `CheckResponse` message.
pub enum Answer {
    Allow(Grant),
    /// Boxed: the allow, the hot variant, stays a pointer wide.
    Message(Box<CheckResponse>),
}

impl Responder {
    /// The answer to `outcome`.
    pub fn answer(&self, outcome: Outcome) -> Answer {
        match outcome {
            Outcome::Allow(AllowedJwt(grant)) => Answer::Allow(grant),
            denial => Answer::Message(Box::new(self.deny(&denial))),
        }
    }

    /// Writes, in protobuf, the `CheckResponse` of an allow of `grant`, without building it
    /// (every allow, cache hits included, would otherwise copy the JWT into a message and hash
    /// the metadata into a map, only to encode both):
    ///
    /// - status OK;
    /// - `authorization: Bearer <JWT>` and each configured claim header the token has, each
    ///   `OVERWRITE_IF_EXISTS_OR_ADD`;
    /// - every configured claim header in `headers_to_remove`: a client's own copy never
    ///   reaches the upstream, whether or not this token has the claim;
    /// - dynamic metadata saying who the caller is, for Envoy's access log, RBAC and rate
    ///   limits (`%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sub)%`): `sub`, `client_id`,
    ///   `scope` and `exp`, those the token has, left out when it has none.
    pub fn encode_allow(&self, grant: &Grant, buf: &mut impl BufMut) {
        // Values of the claim headers the token has; none are configured by default.
        let claim_headers: Vec<(&str, String)> = self
            .claim_headers
            .iter()
            .filter_map(|(claim, header)| Some((*header, claim.value(grant)?)))
            .collect();
        let bearer = grant.authorization_bytes();
        let authorization = header_option_len("authorization", bearer);
        let ok = field_len(OK_HEADERS, authorization)
            + claim_headers
                .iter()
                .map(|(header, value)| {
                    field_len(OK_HEADERS, header_option_len(header, value.as_bytes()))
                })
                .sum::<usize>()
            + self
                .claim_headers
                .iter()
                .map(|(_, header)| field_len(OK_HEADERS_TO_REMOVE, header.len()))
                .sum::<usize>();
        let fields = MetadataFields::of(grant);
        let metadata = metadata_len(&fields);

        // CheckResponse.status: google.rpc.Status, code 0 (OK) and nothing else.
        put_len(RESPONSE_STATUS, 0, buf);
        put_len(RESPONSE_OK, ok, buf);
        put_header_option("authorization", bearer, authorization, buf);
        for (header, value) in &claim_headers {
            let value = value.as_bytes();
            put_header_option(header, value, header_option_len(header, value), buf);
        }
        for (_, header) in &self.claim_headers {
            put_str(OK_HEADERS_TO_REMOVE, header, buf);
        }
        if metadata > 0 {
            put_len(RESPONSE_METADATA, metadata, buf);
            put_metadata(&fields, grant, buf);
        }
    }
}

// The protobuf field numbers [`Responder::encode_allow`] writes (envoy.service.auth.v3,
// envoy.config.core.v3, google.protobuf), checked against prost's own encoding by the tests.
const RESPONSE_STATUS: u32 = 1;
const RESPONSE_OK: u32 = 3;
const RESPONSE_METADATA: u32 = 4;
const OK_HEADERS: u32 = 2;
const OK_HEADERS_TO_REMOVE: u32 = 5;
const OPTION_HEADER: u32 = 1;
const OPTION_APPEND_ACTION: u32 = 3;
const HEADER_KEY: u32 = 1;
const HEADER_VALUE: u32 = 2;
const STRUCT_FIELDS: u32 = 1;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
const VALUE_NUMBER: u32 = 2;
const VALUE_STRING: u32 = 3;

/// Bytes of a length-delimited field holding `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

fn put_len(tag: u32, len: usize, buf: &mut impl BufMut) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(len as u64, buf);
}

fn put_str(tag: u32, value: &str, buf: &mut impl BufMut) {
    put_len(tag, value.len(), buf);
    buf.put_slice(value.as_bytes());
}

/// A `HeaderValueOption` that overwrites `key` with `value`, as [`overwrite`] builds it.
fn header_option_len(key: &str, value: &[u8]) -> usize {
    let header = field_len(HEADER_KEY, key.len()) + field_len(HEADER_VALUE, value.len());
    let action = HeaderAppendAction::OverwriteIfExistsOrAdd as u64;
    field_len(OPTION_HEADER, header)
        + encoding::key_len(OPTION_APPEND_ACTION)
        + encoding::encoded_len_varint(action)
}

fn put_header_option(key: &str, value: &[u8], len: usize, buf: &mut impl BufMut) {
    put_len(OK_HEADERS, len, buf);
    put_len(
        OPTION_HEADER,
        field_len(HEADER_KEY, key.len()) + field_len(HEADER_VALUE, value.len()),
        buf,
    );
    put_str(HEADER_KEY, key, buf);
    put_len(HEADER_VALUE, value.len(), buf);
    buf.put_slice(value);
    encoding::encode_key(OPTION_APPEND_ACTION, WireType::Varint, buf);
    encoding::encode_varint(HeaderAppendAction::OverwriteIfExistsOrAdd as u64, buf);
}

/// The string fields of the metadata, taken as they are (`scope` is joined as it is written,
/// `exp` is a number).
fn metadata_strings(grant: &Grant) -> [(&'static str, Option<&str>); 2] {
    [("sub", grant.sub()), ("client_id", grant.client_id())]
}

/// What [`encode_allow`](Responder::encode_allow) writes as metadata, read from the grant once
/// for both the lengths and the writing.
struct MetadataFields<'a> {
    strings: [(&'static str, Option<&'a str>); 2],
    /// The scopes joined by spaces: their length, or `None` without scopes.
    scope_len: Option<usize>,
    exp: Option<u64>,
}

impl<'a> MetadataFields<'a> {
    fn of(grant: &'a Grant) -> Self {
        let (count, bytes) = grant.scopes().fold((0, 0), |(count, bytes), scope| {
            (count + 1, bytes + scope.len())
        });
        MetadataFields {
            strings: metadata_strings(grant),
            scope_len: (count > 0).then(|| bytes + count - 1),
            exp: grant.exp(),
        }
    }
}

/// One `Struct.fields` map entry whose value is `value_len` bytes of `Value`.
fn entry_len(name: &str, value_len: usize) -> usize {
    field_len(
        STRUCT_FIELDS,
        field_len(ENTRY_KEY, name.len()) + field_len(ENTRY_VALUE, value_len),
    )
}

/// Bytes of the metadata's `Struct`; 0 when it has no field (and is left out).
fn metadata_len(fields: &MetadataFields<'_>) -> usize {
    let mut len = 0;
    for (name, value) in fields.strings {
        if let Some(value) = value {
            len += entry_len(name, field_len(VALUE_STRING, value.len()));
        }
    }
    if let Some(scope_len) = fields.scope_len {
        len += entry_len("scope", field_len(VALUE_STRING, scope_len));
    }
    if fields.exp.is_some() {
        len += entry_len("exp", encoding::key_len(VALUE_NUMBER) + 8);
    }
    len
}

fn put_entry(name: &str, value_len: usize, buf: &mut impl BufMut) {
    put_len(
        STRUCT_FIELDS,
        field_len(ENTRY_KEY, name.len()) + field_len(ENTRY_VALUE, value_len),
        buf,
    );
    put_str(ENTRY_KEY, name, buf);
    put_len(ENTRY_VALUE, value_len, buf);
}

fn put_metadata(fields: &MetadataFields<'_>, grant: &Grant, buf: &mut impl BufMut) {
    for (name, value) in fields.strings {
        if let Some(value) = value {
            put_entry(name, field_len(VALUE_STRING, value.len()), buf);
            put_str(VALUE_STRING, value, buf);
        }
    }
    if let Some(len) = fields.scope_len {
        put_entry("scope", field_len(VALUE_STRING, len), buf);
        put_len(VALUE_STRING, len, buf);
        for (i, scope) in grant.scopes().enumerate() {
            if i > 0 {
                buf.put_u8(b' ');
            }
            buf.put_slice(scope.as_bytes());
        }
    }
    if let Some(exp) = fields.exp {
        put_entry("exp", encoding::key_len(VALUE_NUMBER) + 8, buf);
        encoding::encode_key(VALUE_NUMBER, WireType::SixtyFourBit, buf);
        buf.put_f64_le(exp as f64);
    }
}

/// A forward-auth answer: the status, the headers the gateway copies (on an allow) or relays
/// (on a denial), and a short body.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// `{"decision":"deny","reason":"…"}` on a denial, empty on an allow; never a secret.
    pub body: String,
}

impl Responder {
    /// The same decision for an HTTP forward-auth gateway: 200 with `Authorization` and every
    /// configured claim header (empty when the token lacks the claim, so that a gateway copying
    /// it overwrites whatever the client sent), or the denial's status and challenge.
    pub fn http(&self, outcome: &Outcome) -> HttpAnswer {
        let row = outcome.row();
        match outcome {
            Outcome::Allow(AllowedJwt(grant)) => {
                let mut headers = Vec::with_capacity(1 + self.claim_headers.len());
                headers.push(("authorization", grant.authorization().to_owned()));
                for (claim, header) in &self.claim_headers {
                    let value = claim.value(grant).unwrap_or_default();
                    headers.push((*header, value));
                }
                HttpAnswer {
                    status: 200,
                    headers,
                    body: String::new(),
                }
            }
            _ => HttpAnswer {
                status: row.http.as_u16(),
                headers: self
                    .challenge(outcome)
                    .map(|value| ("www-authenticate", value))
                    .into_iter()
                    .collect(),
                body: format!("{{\"decision\":\"deny\",\"reason\":\"{}\"}}\n", row.reason),
            },
        }
    }

    /// The `WWW-Authenticate` value a denial carries, if any.
    fn challenge(&self, outcome: &Outcome) -> Option<String> {
        match (outcome.row().challenge, outcome) {
            (Challenge::None, _) => None,
            (Challenge::Bare, _) => Some(self.bare_challenge.clone()),
            (Challenge::InvalidToken, _) => Some(self.invalid_token_challenge.clone()),
            (Challenge::InvalidRequest, _) => Some(self.invalid_request_challenge.clone()),
            (Challenge::InsufficientScope, Outcome::InsufficientScope(scopes)) => Some(format!(
                "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{scopes}\"",
                self.realm
            )),
            (Challenge::InsufficientScope, _) => None,
        }
    }
}

/// A header that replaces any of the same name (`OVERWRITE_IF_EXISTS_OR_ADD`).
fn overwrite(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::google::protobuf::value::Kind;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    use envoy_types::pb::envoy::service::auth::v3::OkHttpResponse;

    use super::*;
    use crate::jwt::Claims;

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

    /// The message of an allow, built field by field: what [`Responder::encode_allow`] must
    /// write.
    fn built_allow(responder: &Responder, grant: &Grant) -> CheckResponse {
        let mut headers = vec![overwrite("authorization", grant.authorization().to_owned())];
        for (claim, header) in &responder.claim_headers {
            if let Some(value) = claim.value(grant) {
                headers.push(overwrite(header, value));
            }
        }
        let text = |value: &str| Value {
            kind: Some(Kind::StringValue(value.to_owned())),
        };
        let mut fields = HashMap::new();
        if let Some(sub) = grant.sub() {
            fields.insert("sub".to_owned(), text(sub));
        }
        if let Some(client_id) = grant.client_id() {
            fields.insert("client_id".to_owned(), text(client_id));
        }
        let scopes: Vec<&str> = grant.scopes().collect();
        if !scopes.is_empty() {
            fields.insert("scope".to_owned(), text(&scopes.join(" ")));
        }
        if let Some(exp) = grant.exp() {
            let exp = Kind::NumberValue(exp as f64);
            fields.insert("exp".to_owned(), Value { kind: Some(exp) });
        }
        CheckResponse {
            status: Some(Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers,
                headers_to_remove: responder
                    .claim_headers
                    .iter()
                    .map(|(_, header)| (*header).to_owned())
                    .collect(),
                ..Default::default()
            })),
            dynamic_metadata: (!fields.is_empty()).then_some(Struct { fields }),
        }
    }

    /// What [`Responder::encode_allow`] writes, decoded.
    fn written_allow(responder: &Responder, grant: &Grant) -> CheckResponse {
        let mut written = Vec::new();
        responder.encode_allow(grant, &mut written);
        prost::Message::decode(&written[..]).unwrap()
    }

    #[test]
    fn allow_overwrites_authorization() {
        let responder = Responder::new("api", Vec::new());
        let response = written_allow(&responder, &Grant::new("a.b.c", &Default::default()));
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
        let responder = Responder::new("api", Vec::new());
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
            let Answer::Message(response) = responder.answer(outcome.clone()) else {
                panic!("a denial is a message");
            };
            assert_eq!(denied_status(&response), http, "{outcome:?}");
            assert_eq!(i32::from(outcome.row().http.as_u16()), http, "{outcome:?}");
            assert_eq!(
                response.status.as_ref().unwrap().code,
                code as i32,
                "{outcome:?}"
            );
            assert_eq!(challenge(&response).as_deref(), www, "{outcome:?}");
            assert_eq!(outcome.row().decision, Decision::Deny);
        }
    }

    #[test]
    fn an_allow_written_from_its_grant_is_the_message_built_field_by_field() {
        let claims = |sub: Option<&str>, client_id: Option<&str>, scopes: &[&str], exp| Claims {
            exp,
            sub: sub.map(Into::into),
            client_id: client_id.map(Into::into),
            scopes: scopes.iter().map(|&scope| scope.into()).collect(),
            audiences: vec!["api".into(), "other".into()],
        };
        let grants = [
            Claims::default(),
            claims(Some("alice"), None, &[], Some(2_000_000_000)),
            claims(Some("alice"), Some("web"), &["read", "write"], Some(1)),
            claims(None, Some("svc"), &["only"], None),
            // Past one byte of varint length, and a scope set past 127 bytes.
            claims(
                Some(&"s".repeat(300)),
                None,
                &[&"x".repeat(200), "y"],
                Some(u64::MAX),
            ),
        ];
        let responders = [
            Responder::new("api", Vec::new()),
            Responder::new(
                "api",
                vec![
                    (ClaimName::Sub, "x-sub".to_owned()),
                    (ClaimName::Scope, "x-scope".to_owned()),
                    (ClaimName::Aud, "x-aud".to_owned()),
                    (ClaimName::ClientId, "x-client".to_owned()),
                ],
            ),
        ];
        for responder in &responders {
            for claims in &grants {
                for jwt in ["a.b.c", &format!("h.{}.s", "p".repeat(2_000))] {
                    let grant = Grant::new(jwt, claims);
                    let mut written = Vec::new();
                    responder.encode_allow(&grant, &mut written);
                    let built = built_allow(responder, &grant);
                    assert_eq!(written.len(), prost::Message::encoded_len(&built));
                    assert_eq!(written_allow(responder, &grant), built, "{claims:?}");
                }
            }
        }
    }

    #[test]
    fn debug_hides_the_jwt() {
        let outcome = Outcome::Allow(AllowedJwt(Grant::new(
            "eyJhbGciOi.secret.sig",
            &Default::default(),
        )));
        assert!(!format!("{outcome:?}").contains("secret"));
    }
}
