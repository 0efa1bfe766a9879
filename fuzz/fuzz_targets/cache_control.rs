//! Arbitrary bytes, one `Cache-Control` line per `\n`, through `cache_directive`: it must never
//! panic and never answer a zero max-age.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use phantom_authz::introspection::{CacheDirective, cache_directive};

fuzz_target!(|data: &[u8]| {
    let values: Vec<HeaderValue> = data
        .split(|&b| b == b'\n')
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    if let CacheDirective::MaxAge(age) = cache_directive(values.iter()) {
        assert!(age > Duration::ZERO);
    }
});
