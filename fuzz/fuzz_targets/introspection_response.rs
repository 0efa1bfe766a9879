//! Arbitrary bytes as an introspection response body, in both modes: the parsers must never
//! panic, and an Active answer must carry a three-part base64url JWT whose `exp` reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phantom_authz::introspection::{
    CacheDirective, Introspected, jwt_exp, parse_json_body, parse_jwt_body,
};

fuzz_target!(|data: &[u8]| {
    for result in [
        parse_jwt_body(data, CacheDirective::Unspecified),
        parse_json_body(data, CacheDirective::Unspecified),
    ] {
        if let Ok(Introspected::Active(active)) = result {
            let parts: Vec<&str> = active.jwt.split('.').collect();
            assert_eq!(parts.len(), 3);
            for part in parts {
                assert!(!part.is_empty());
                assert!(
                    part.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                );
            }
            assert_eq!(jwt_exp(&active.jwt), Ok(active.jwt_exp));
        }
    }
});
