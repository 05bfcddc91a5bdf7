//! Arbitrary bytes as an upstream leads page: `parse_page` under each order field, then the
//! rendered HAL page. See `invariants::check_page`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The page number and `has_next` come from the length, so the body is the whole input
    // (seeds are plain JSON pages) and the edge pages are reached.
    let page = [1, 2, 7, u32::MAX - 1, u32::MAX][data.len() % 5];
    let has_next = data.len().is_multiple_of(2);
    invariants::check_page(data, page, has_next);
});
