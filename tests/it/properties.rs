//! Properties of the pure parsers that face untrusted input: the bearer token from the client,
//! and `Cache-Control` and the body from the identity server. Each never panics, and accepts
//! exactly what its specification allows.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use phantom_authz::introspection::{
    CacheDirective, Introspected, cache_directive, jwt_exp, parse_json_body, parse_jwt_body,
};
use phantom_authz::token::{TokenProblem, parse_bearer};
use proptest::prelude::*;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Bearer tokens

/// RFC 6750 §2.1 `b64token`, written independently of the crate's own check.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~+/".contains(c))
}

/// The model: `[ \t]* bearer [ \t]+ b64token [ \t]*`, scheme in any case; returns the token.
fn model(value: &str) -> Option<&str> {
    let value = value.trim_matches([' ', '\t']);
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let rest = &value[6..];
    let token = rest.trim_start_matches([' ', '\t']);
    (token.len() < rest.len() && is_b64token(token)).then_some(token)
}

/// Strings shaped like an Authorization value: some valid, most nearly so.
fn authorization_like() -> impl Strategy<Value = String> {
    let blank = "[ \t]{0,2}";
    let scheme = prop_oneof![
        4 => "[bB][eE][aA][rR][eE][rR]",
        1 => Just("Basic".to_owned()),
        1 => Just("Bearerx".to_owned()),
        1 => Just(String::new()),
    ];
    let separator = prop_oneof![3 => "[ \t]{1,3}", 1 => Just(String::new())];
    let token = prop_oneof![
        2 => "[A-Za-z0-9._~+/-]{1,40}={0,3}",
        // Mostly b64token characters, with the occasional character that is not.
        1 => "[A-Za-z0-9._~+/=, \t\"é\u{1}\u{7f}😀-]{0,40}",
    ];
    (blank, scheme, separator, token, blank)
        .prop_map(|(lead, scheme, sep, token, trail)| format!("{lead}{scheme}{sep}{token}{trail}"))
}

proptest! {
    #[test]
    fn parse_bearer_never_panics_and_returns_a_bounded_substring(
        value in any::<String>(),
        max_len in 0usize..64,
    ) {
        if let Ok(token) = parse_bearer(&value, max_len) {
            let token = token.expose();
            prop_assert!(!token.is_empty() && token.len() <= max_len);
            let start = (token.as_ptr() as usize).checked_sub(value.as_ptr() as usize);
            let start = start.filter(|s| s + token.len() <= value.len());
            prop_assert!(start.is_some(), "not a substring of the input");
            let start = start.unwrap();
            prop_assert_eq!(&value[start..start + token.len()], token);
        }
    }

    #[test]
    fn parse_bearer_accepts_exactly_bearer_b64token(
        value in prop_oneof![3 => authorization_like(), 1 => any::<String>()],
        max_len in 1usize..48,
    ) {
        let got = parse_bearer(&value, max_len);
        match model(&value) {
            Some(token) if token.len() <= max_len => {
                prop_assert_eq!(got.map(|t| t.expose()), Ok(token));
            }
            Some(_) => prop_assert_eq!(got, Err(TokenProblem::Invalid)),
            None => prop_assert!(got.is_err(), "accepted {:?}", value),
        }
    }

    #[test]
    fn parse_bearer_length_limit_is_exact(
        token in "[A-Za-z0-9._~+/-]{1,64}",
        scheme in "[bB][eE][aA][rR][eE][rR]",
    ) {
        let value = format!("{scheme} {token}");
        prop_assert_eq!(parse_bearer(&value, token.len()).map(|t| t.expose()), Ok(token.as_str()));
        prop_assert_eq!(parse_bearer(&value, token.len() - 1), Err(TokenProblem::Invalid));
    }
}

// ---------------------------------------------------------------------------------------------
// Cache-Control

fn directive() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("public".to_owned()),
        Just("private".to_owned()),
        Just("must-revalidate".to_owned()),
        (0u64..100_000).prop_map(|n| format!("max-age={n}")),
        (0u64..100_000).prop_map(|n| format!("S-MaxAge=\"{n}\"")),
        "[a-z-]{1,12}(=[a-z0-9\"]{0,6})?",
    ]
}

/// One to three header lines of comma-separated directives with uneven spacing.
fn header_lines(directives: Vec<String>, splits: Vec<bool>) -> Vec<String> {
    let mut lines = vec![String::new()];
    for (directive, split) in directives.into_iter().zip(splits) {
        let line = lines.last_mut().unwrap();
        if !line.is_empty() {
            line.push_str(if split { "," } else { " ,  " });
        }
        line.push_str(&directive);
        if split && lines.len() < 3 {
            lines.push(String::new());
        }
    }
    lines
}

fn directive_of(lines: &[String]) -> CacheDirective {
    let values: Vec<HeaderValue> = lines
        .iter()
        .map(|l| HeaderValue::from_str(l).expect("visible ASCII"))
        .collect();
    cache_directive(values.iter())
}

proptest! {
    #[test]
    fn cache_directive_never_panics(lines in prop::collection::vec(any::<Vec<u8>>(), 0..4)) {
        let values: Vec<HeaderValue> =
            lines.iter().filter_map(|l| HeaderValue::from_bytes(l).ok()).collect();
        let _ = cache_directive(values.iter());
    }

    #[test]
    fn no_store_or_no_cache_anywhere_means_do_not_cache(
        directives in prop::collection::vec(directive(), 0..6),
        splits in prop::collection::vec(any::<bool>(), 7),
        forbid in prop_oneof![Just("no-store"), Just("no-cache"), Just("No-Cache"), Just("NO-STORE")],
        at in any::<prop::sample::Index>(),
    ) {
        let mut directives = directives;
        let position = at.index(directives.len() + 1);
        directives.insert(position, forbid.to_owned());
        let lines = header_lines(directives, splits);
        prop_assert_eq!(directive_of(&lines), CacheDirective::DoNotCache, "{:?}", lines);
    }

    #[test]
    fn max_age_alone_is_that_age_or_do_not_cache_at_zero(
        seconds in prop_oneof![Just(0u64), 0u64..1_000_000, Just(u64::MAX)],
        name in "[mM][aA][xX]-[aA][gG][eE]",
        quoted in any::<bool>(),
        blank in "[ ]{0,2}",
    ) {
        let value = if quoted { format!("\"{seconds}\"") } else { seconds.to_string() };
        let lines = vec![format!("{blank}{name}={value}{blank}")];
        let expected = match seconds {
            0 => CacheDirective::DoNotCache,
            n => CacheDirective::MaxAge(Duration::from_secs(n)),
        };
        prop_assert_eq!(directive_of(&lines), expected, "{:?}", lines);
    }
}

// ---------------------------------------------------------------------------------------------
// Introspection bodies

/// Three non-empty base64url parts: what every Active result must carry.
fn is_compact_jwt(jwt: &str) -> bool {
    let parts: Vec<&str> = jwt.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        "[A-Za-z0-9_-]{1,8}\\.[A-Za-z0-9_-]{1,8}\\.[A-Za-z0-9_-]{1,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("active".to_owned()),
                    Just("jwt".to_owned()),
                    Just("exp".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A compact JWT whose payload is `claims`.
fn jwt_with(claims: &Value) -> String {
    format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn assert_active_is_a_jwt(result: &Result<Introspected, impl std::fmt::Debug>) {
    if let Ok(Introspected::Active(active)) = result {
        assert!(is_compact_jwt(&active.jwt), "{:?}", active.jwt);
        assert_eq!(jwt_exp(&active.jwt).ok(), Some(active.jwt_exp));
    }
}

proptest! {
    #[test]
    fn body_parsers_never_panic_on_arbitrary_bytes(body in any::<Vec<u8>>()) {
        let jwt = parse_jwt_body(&body, CacheDirective::Unspecified);
        assert_active_is_a_jwt(&jwt);
        let json = parse_json_body(&body, CacheDirective::Unspecified);
        assert_active_is_a_jwt(&json);
        prop_assert!(!matches!(json, Ok(Introspected::Active(_))), "random bytes made an allow");
        if let Ok(text) = std::str::from_utf8(&body) {
            let _ = jwt_exp(text);
        }
    }

    #[test]
    fn jwt_body_parser_never_panics_on_jwt_shaped_text(
        parts in prop::collection::vec("[A-Za-z0-9_=+/ -]{0,24}", 1..5),
    ) {
        let text = parts.join(".");
        assert_active_is_a_jwt(&parse_jwt_body(text.as_bytes(), CacheDirective::Unspecified));
    }

    #[test]
    fn arbitrary_json_is_active_only_with_active_true_and_a_jwt_string(value in json_value()) {
        let result = parse_json_body(value.to_string().as_bytes(), CacheDirective::Unspecified);
        assert_active_is_a_jwt(&result);
        match &result {
            Ok(Introspected::Active(active)) => {
                prop_assert_eq!(&value["active"], &Value::Bool(true));
                prop_assert_eq!(value["jwt"].as_str(), Some(active.jwt.as_str()));
            }
            Ok(Introspected::Inactive) => prop_assert_eq!(&value["active"], &Value::Bool(false)),
            Err(_) => {}
        }
    }

    #[test]
    fn a_well_formed_active_response_is_read_back(
        claims in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..4),
        exp in prop::option::of(0u64..(1 << 53)),
        response_exp in prop::option::of(0u64..(1 << 53)),
    ) {
        let mut claims: serde_json::Map<String, Value> = claims.into_iter().collect();
        match exp {
            Some(exp) => claims.insert("exp".into(), exp.into()),
            None => claims.remove("exp"),
        };
        let jwt = jwt_with(&Value::Object(claims));
        let mut response = json!({"active": true, "jwt": jwt});
        if let Some(exp) = response_exp {
            response["exp"] = exp.into();
        }
        let body = response.to_string();
        let Ok(Introspected::Active(active)) =
            parse_json_body(body.as_bytes(), CacheDirective::Unspecified)
        else {
            panic!("not read back: {body}");
        };
        prop_assert_eq!(&active.jwt, &jwt);
        prop_assert_eq!(active.jwt_exp, exp);
        prop_assert_eq!(active.response_exp, response_exp);
        let Ok(Introspected::Active(from_jwt_mode)) =
            parse_jwt_body(format!(" {jwt}\r\n").as_bytes(), CacheDirective::Unspecified)
        else {
            panic!("jwt mode did not read back {jwt}");
        };
        prop_assert_eq!(from_jwt_mode.jwt, jwt);
    }

    #[test]
    fn jwt_exp_is_the_floor_of_a_non_negative_numeric_date(exp in any::<f64>()) {
        let jwt = jwt_with(&json!({ "exp": exp }));
        let got = jwt_exp(&jwt);
        if exp.is_finite() && exp >= 0.0 {
            prop_assert_eq!(got, Ok(Some(exp.floor() as u64)));
        } else {
            prop_assert!(got.is_err());
        }
    }
}
