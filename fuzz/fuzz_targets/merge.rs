//! Structured input: K streams of (id, sort), each sorted by the order, fed to `Merger` in
//! pages. See `invariants::check_merge`.
#![no_main]

use arbitrary::Arbitrary;
use kommo_fanout::leads::query::{Direction, Order, OrderField};
use libfuzzer_sys::fuzz_target;

/// One stream: its page size and its leads as (id, sort, sort is null).
type RawStream = (u8, Vec<(u8, i8, bool)>);

#[derive(Debug, Arbitrary)]
struct Input {
    field: u8,
    desc: bool,
    streams: Vec<RawStream>,
    /// Spread ids and sort values over the whole i64 range instead of a small one.
    wide: bool,
}

fuzz_target!(|input: Input| {
    let order = Order {
        field: [OrderField::Id, OrderField::CreatedAt, OrderField::UpdatedAt]
            [usize::from(input.field % 3)],
        direction: if input.desc {
            Direction::Desc
        } else {
            Direction::Asc
        },
    };
    // Few distinct ids and sort values (duplicates across and within streams, ties), or the
    // extremes of i64 when `wide`.
    let scale = |v: i64| {
        if input.wide {
            v.wrapping_mul(0x0101_0101_0101_0101)
        } else {
            v % 48
        }
    };
    let streams: Vec<Vec<(i64, Option<i64>)>> = input
        .streams
        .iter()
        .take(16)
        .map(|(_, leads)| {
            leads
                .iter()
                .take(200)
                .map(|&(id, sort, null)| {
                    (
                        scale(i64::from(id)),
                        (!null).then(|| scale(i64::from(sort) % 16)),
                    )
                })
                .collect()
        })
        .collect();
    if streams.is_empty() {
        return;
    }
    let page_sizes = input
        .streams
        .iter()
        .map(|(size, _)| usize::from(*size % 8) + 1)
        .collect();
    let case = invariants::MergeCase::new(order, streams, page_sizes);
    invariants::check_merge(&case);
});
