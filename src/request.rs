//! What phantom-authz reads of Envoy's `CheckRequest`, decoded by prost without copying.
//!
//! These messages are wire-compatible with `envoy.service.auth.v3.CheckRequest` but declare
//! only the fields a Check reads: the HTTP request's method, path, host and headers (in either
//! encoding) and the route's `context_extensions`. prost skips every other field. Strings are
//! [`Bytes`] that point into the received frame, and a `map<string, string>` is read as what it
//! is on the wire, a list of key/value entries: decoding a Check allocates a few vectors, where
//! Envoy's generated type allocates every header twice and hashes it into a map.
//!
//! The strings kept are checked to be UTF-8 once, when the request is decoded ([`decode`]), and
//! a request where one is not is refused, as prost refuses Envoy's type. Only the values kept are
//! checked: fields not declared here, and a singular field's earlier occurrences when it is sent
//! twice, are skipped or replaced unread. A name sent twice in a map stays twice here; lookups
//! take the last, as a map would ([`Entries::named`]), except for the `Authorization` header,
//! where two are refused ([`crate::token`]).

use std::fmt;

use bytes::{Buf, Bytes};
use prost::Message as _;

/// `envoy.service.auth.v3.CheckRequest`, the fields read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `envoy.service.auth.v3.AttributeContext`, the fields read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    /// `map<string, string> context_extensions`.
    #[prost(message, repeated, tag = "10")]
    pub context_extensions: Vec<Entry>,
}

/// `envoy.service.auth.v3.AttributeContext.Request`, the field read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `envoy.service.auth.v3.AttributeContext.HttpRequest`, the fields read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(bytes = "bytes", tag = "2")]
    pub method: Bytes,
    /// `map<string, string> headers`: lowercase names, as Envoy sends them by default.
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Entry>,
    #[prost(bytes = "bytes", tag = "4")]
    pub path: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
    /// The headers with `encode_raw_headers: true`.
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`: `value` is a string, `raw_value` bytes. Its `Debug`
/// shows the name and the value's length, never the value (it may be a bearer token).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct HeaderValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

/// One entry of a `map<string, string>`. Its `Debug` shows the key and the value's length,
/// never the value (it may be a bearer token).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderValue")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value_len", &self.value.len())
            .field("raw_value_len", &self.raw_value.len())
            .finish()
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value_len", &self.value.len())
            .finish()
    }
}

/// Why a Check could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadRequest {
    #[error("{0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("a string field is not UTF-8")]
    NotUtf8,
}

/// Decodes a Check, refusing it when a string it keeps is not UTF-8 (as prost refuses Envoy's
/// generated type).
pub fn decode(buf: impl Buf) -> Result<CheckRequest, BadRequest> {
    let request = CheckRequest::decode(buf)?;
    if request.is_utf8() {
        Ok(request)
    } else {
        Err(BadRequest::NotUtf8)
    }
}

impl CheckRequest {
    /// The Check Envoy sends about `http`, with no context extensions: for the front doors that
    /// start from an HTTP request.
    pub fn about(http: HttpRequest) -> Self {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request { http: Some(http) }),
                context_extensions: Vec::new(),
            }),
        }
    }

    /// The HTTP request the Check is about, if Envoy sent one.
    pub fn http(&self) -> Option<&HttpRequest> {
        self.attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
    }

    /// The route's `context_extensions`.
    pub fn context_extensions(&self) -> &[Entry] {
        self.attributes
            .as_ref()
            .map_or(&[], |a| a.context_extensions.as_slice())
    }

    /// The same request in Envoy's generated type, re-read from its encoding: for clients and
    /// tests that build requests with it.
    pub fn from_envoy(
        request: &envoy_types::pb::envoy::service::auth::v3::CheckRequest,
    ) -> Result<Self, BadRequest> {
        decode(request.encode_to_vec().as_slice())
    }

    fn is_utf8(&self) -> bool {
        let entries = |entries: &[Entry]| {
            entries
                .iter()
                .all(|entry| is_utf8(&entry.key) && is_utf8(&entry.value))
        };
        let http = self.http().is_none_or(|http| {
            is_utf8(&http.method)
                && is_utf8(&http.path)
                && is_utf8(&http.host)
                && entries(&http.headers)
                && http.header_map.as_ref().is_none_or(|map| {
                    map.headers
                        .iter()
                        .all(|header| is_utf8(&header.key) && is_utf8(&header.value))
                })
        });
        http && entries(self.context_extensions())
    }
}

impl HttpRequest {
    pub fn method(&self) -> &str {
        text(&self.method)
    }

    pub fn path(&self) -> &str {
        text(&self.path)
    }

    pub fn host(&self) -> &str {
        text(&self.host)
    }
}

impl HeaderValue {
    /// The value in whichever field Envoy filled (`raw_value` with `encode_raw_headers: true`);
    /// `None` when a raw value is not UTF-8.
    pub fn text(&self) -> Option<&str> {
        if self.raw_value.is_empty() {
            Some(text(&self.value))
        } else {
            std::str::from_utf8(&self.raw_value).ok()
        }
    }
}

/// Lookups in a `map<string, string>` read as its entries.
pub trait Entries {
    /// The value of the last entry named exactly `key`: what a map decoded from the same bytes
    /// would hold.
    fn named(&self, key: &str) -> Option<&str>;
}

impl Entries for [Entry] {
    fn named(&self, key: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|entry| entry.key == key.as_bytes())
            .map(|entry| text(&entry.value))
    }
}

/// A string the decoder has checked to be UTF-8.
pub fn text(bytes: &Bytes) -> &str {
    // Checked in `decode`; a request built otherwise reads as empty rather than panicking.
    std::str::from_utf8(bytes).unwrap_or_default()
}

fn is_utf8(bytes: &Bytes) -> bool {
    std::str::from_utf8(bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::service::auth::v3 as envoy;

    fn envoy_request() -> envoy::CheckRequest {
        let http = envoy::attribute_context::HttpRequest {
            id: "1234".into(),
            method: "POST".into(),
            path: "/orders?x=1".into(),
            host: "api.example.com".into(),
            scheme: "https".into(),
            protocol: "HTTP/2".into(),
            body: "ignored".into(),
            headers: [("authorization", "Bearer t"), ("x-request-id", "r-1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            header_map: Some(core::HeaderMap {
                headers: vec![core::HeaderValue {
                    key: "Traceparent".into(),
                    raw_value: b"00-raw".to_vec(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let mut request = crate::token::check_request(http);
        let attributes = request.attributes.as_mut().unwrap();
        attributes
            .context_extensions
            .insert("required_scopes".into(), "orders:write".into());
        attributes.source = Some(envoy::attribute_context::Peer {
            principal: "spiffe://mesh/client".into(),
            ..Default::default()
        });
        request
    }

    #[test]
    fn reads_what_envoys_type_holds() {
        let ours = CheckRequest::from_envoy(&envoy_request()).unwrap();
        let http = ours.http().unwrap();
        assert_eq!(
            (http.method(), http.path(), http.host()),
            ("POST", "/orders?x=1", "api.example.com")
        );
        assert_eq!(http.headers.named("authorization"), Some("Bearer t"));
        assert_eq!(http.headers.named("x-request-id"), Some("r-1"));
        assert_eq!(http.headers.named("Authorization"), None);
        let raw = &http.header_map.as_ref().unwrap().headers[0];
        assert_eq!(
            (&raw.key[..], &raw.raw_value[..]),
            (&b"Traceparent"[..], &b"00-raw"[..])
        );
        assert_eq!(
            ours.context_extensions().named("required_scopes"),
            Some("orders:write")
        );
        assert!(
            CheckRequest::from_envoy(&envoy::CheckRequest::default())
                .unwrap()
                .http()
                .is_none()
        );
    }

    #[test]
    fn debug_output_never_shows_a_header_value() {
        let mut request = envoy_request();
        let http = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.headers
            .insert("authorization".into(), "Bearer Kq7ZxCanary".into());
        http.header_map
            .as_mut()
            .unwrap()
            .headers
            .push(core::HeaderValue {
                key: "authorization".into(),
                raw_value: b"Bearer Kq7ZxCanaryRaw".to_vec(),
                ..Default::default()
            });
        let ours = CheckRequest::from_envoy(&request).unwrap();
        let shown = format!("{ours:?} {ours:#?}");
        assert!(shown.contains("authorization"), "{shown}");
        assert!(!shown.contains("Kq7ZxCanary"), "{shown}");
    }

    #[test]
    fn a_name_sent_twice_reads_as_a_map_would_hold_it() {
        // Two entries for one key: prost's map keeps the last.
        let mut wire = Vec::new();
        for value in ["first", "second"] {
            let entry = Entry {
                key: Bytes::from_static(b"required_scopes"),
                value: Bytes::copy_from_slice(value.as_bytes()),
            };
            prost::encoding::message::encode(10, &entry, &mut wire);
        }
        let mut request = Vec::new();
        prost::encoding::bytes::encode(1, &wire, &mut request);
        let theirs = envoy::CheckRequest::decode(request.as_slice()).unwrap();
        let ours = decode(request.as_slice()).unwrap();
        let held = &theirs.attributes.unwrap().context_extensions["required_scopes"];
        assert_eq!(held, "second");
        assert_eq!(
            ours.context_extensions().named("required_scopes"),
            Some("second")
        );
    }

    #[test]
    fn a_kept_string_that_is_not_utf8_is_refused_as_prost_refuses_it() {
        let http = CheckRequest::about;
        let bad = Bytes::from_static(b"\xff\xfe");
        let entry = |key: &Bytes, value: &Bytes| Entry {
            key: key.clone(),
            value: value.clone(),
        };
        let ok = Bytes::from_static(b"ok");
        for request in [
            http(HttpRequest {
                path: bad.clone(),
                ..Default::default()
            }),
            http(HttpRequest {
                headers: vec![entry(&ok, &bad)],
                ..Default::default()
            }),
            http(HttpRequest {
                headers: vec![entry(&bad, &ok)],
                ..Default::default()
            }),
            CheckRequest {
                attributes: Some(AttributeContext {
                    request: None,
                    context_extensions: vec![entry(&ok, &bad)],
                }),
            },
        ] {
            let wire = request.encode_to_vec();
            assert!(envoy::CheckRequest::decode(wire.as_slice()).is_err());
            assert!(decode(wire.as_slice()).is_err());
        }
        // A raw header value is bytes in Envoy's type too: kept, and read only where UTF-8.
        let raw = http(HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: ok.clone(),
                    value: Bytes::new(),
                    raw_value: bad.clone(),
                }],
            }),
            ..Default::default()
        });
        let wire = raw.encode_to_vec();
        assert!(envoy::CheckRequest::decode(wire.as_slice()).is_ok());
        assert_eq!(decode(wire.as_slice()), Ok(raw));
    }
}
