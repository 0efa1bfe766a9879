//! Arbitrary bytes become a CheckRequest, in both header encodings Envoy uses, and go through
//! `token::bearer_token`: it must never panic, and a token it returns must be a bounded,
//! non-empty RFC 6750 b64token.
#![no_main]

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use libfuzzer_sys::fuzz_target;
use phantom_authz::token::bearer_token;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let max_len = usize::from(first) * 16 + 1;
    // Headers are `name: value` lines; a line without a colon names an `authorization` value,
    // so that most inputs reach the token parser.
    let headers: Vec<(Vec<u8>, Vec<u8>)> = rest
        .split(|&b| b == b'\n')
        .map(|line| match line.iter().position(|&b| b == b':') {
            Some(colon) => (line[..colon].to_vec(), line[colon + 1..].to_vec()),
            None => (b"authorization".to_vec(), line.to_vec()),
        })
        .collect();

    let as_strings = HttpRequest {
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect(),
        ..Default::default()
    };
    let as_raw = HttpRequest {
        header_map: Some(HeaderMap {
            headers: headers
                .iter()
                .enumerate()
                .map(|(n, (k, v))| HeaderValue {
                    key: String::from_utf8_lossy(k).into_owned(),
                    // Envoy fills one of the two; exercise both.
                    value: if n % 2 == 0 {
                        String::new()
                    } else {
                        String::from_utf8_lossy(v).into_owned()
                    },
                    raw_value: if n % 2 == 0 { v.clone() } else { Vec::new() },
                })
                .collect(),
        }),
        ..Default::default()
    };
    for http in [as_strings, as_raw] {
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        if let Ok(token) = bearer_token(&request, max_len) {
            let token = token.expose();
            assert!(!token.is_empty() && token.len() <= max_len);
            let body = token.trim_end_matches('=');
            assert!(!body.is_empty());
            assert!(
                body.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
            );
        }
    }
});
