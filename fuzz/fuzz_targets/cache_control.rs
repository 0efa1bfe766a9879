//! Arbitrary bytes, one `Cache-Control` line per `\n`, through `cache_control`: it must never
//! panic and never answer a zero max-age, in any mode.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use phantom_authz::introspection::{CacheDirective, cache_control};

fuzz_target!(|data: &[u8]| {
    let values: Vec<HeaderValue> = data
        .split(|&b| b == b'\n')
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    let header = cache_control(values.iter());
    for directive in [header.directive(), header.until_expiry()] {
        if let CacheDirective::MaxAge(age) = directive {
            assert!(age > Duration::ZERO);
        }
    }
});
