//! Arbitrary bytes as a leads query string: parse (max_pairs 100), plan, canonical keys.
//! See `invariants::check_query`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    invariants::check_query(&query);
});
