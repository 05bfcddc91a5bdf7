//! The background churn: a seeded stream of changes applied at a steady rate while the server runs,
//! so the account changes under its clients the way a busy real one does (deals move on, prices are
//! edited, leads are created, deleted and restored).
//!
//! Every change goes through the same `Store` methods as [`Sim::move_lead`] and its siblings, so each
//! one bumps the lead's `updated_at` and records its event: a client that watches
//! `filter[updated_at]`, `with=only_deleted` or `GET /api/v4/events` sees it, whatever token it
//! holds, as long as that token sees the lead. The churn never changes who is responsible for a
//! lead, so it never moves a lead out of a token's sight.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::data::Store;
use super::events::SimEventType;
use super::Sim;

/// Attempts at drawing a live lead before the change becomes a creation instead.
const DRAWS: usize = 16;

/// Apply `per_second` changes per second, forever: the caller aborts the task when the server
/// stops. The count follows the elapsed time (`floor(elapsed × rate)` changes so far), so ticks that
/// come late do not lower the rate; after a stall at most a second's worth is caught up.
pub(crate) async fn run(sim: Sim, per_second: f64) {
    let start = Instant::now();
    // Tick often enough for the rate, but no more than 1000 times a second.
    let period = Duration::from_secs_f64((1.0 / per_second).clamp(0.001, 0.1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let backlog = per_second.ceil().max(1.0) as u64;
    let mut done: u64 = 0;
    loop {
        ticker.tick().await;
        let due = (start.elapsed().as_secs_f64() * per_second) as u64;
        done = done.max(due.saturating_sub(backlog));
        while done < due {
            // One change per lock: readers get in between.
            let mut store = sim.store_mut();
            let now = sim.now_ts();
            let _ = change_once(&mut store, now);
            drop(store);
            done += 1;
        }
    }
}

/// Apply one change drawn from the store's rng and return its event's type. The mix, in percent:
/// 35 moves to another stage of the same pipeline, 15 moves to another pipeline, 20 price edits,
/// 10 creations, 10 deletions, 10 restores (a deletion while nothing is deleted). A change that
/// finds no live lead to act on creates one instead, so every call changes the account (`None`
/// only for an account without stages).
pub(crate) fn change_once(store: &mut Store, now: i64) -> Option<SimEventType> {
    let roll = store.rng.below(100);
    let done = match roll {
        0..50 => live_lead(store).and_then(|pos| {
            let lead = &store.leads[pos as usize];
            let (id, pipeline_id, status_id) = (lead.id, lead.pipeline_id, lead.status_id);
            let target = if roll < 35 {
                pipeline_id
            } else {
                other_pipeline(store, pipeline_id)
            };
            let status = other_status(store, target, status_id)?;
            store
                .move_lead(id, target, status, now)
                .then_some(SimEventType::LeadStatusChanged)
        }),
        50..70 => live_lead(store).and_then(|pos| {
            let lead = &store.leads[pos as usize];
            let (id, price) = (lead.id, lead.price);
            let mut new_price = store.rng.range(1, 400) * 500;
            if new_price == price {
                new_price += 500;
            }
            store
                .edit_price(id, new_price, now)
                .then_some(SimEventType::SaleFieldChanged)
        }),
        70..80 => None,
        _ => {
            let deleted = store.deleted_positions().len() as u64;
            if roll >= 90 && deleted > 0 {
                let at = store.rng.below(deleted) as usize;
                let pos = store.deleted_positions()[at];
                let id = store.leads[pos as usize].id;
                store.restore(id, now).then_some(SimEventType::LeadRestored)
            } else {
                live_lead(store).and_then(|pos| {
                    let id = store.leads[pos as usize].id;
                    store
                        .delete(id, now, false)
                        .then_some(SimEventType::LeadDeleted)
                })
            }
        }
    };
    done.or_else(|| create(store, now))
}

/// Create a lead in a random stage (never "Incoming leads": leads reach it from outside).
fn create(store: &mut Store, now: i64) -> Option<SimEventType> {
    let pipeline = store.rng.below(store.pipelines.len() as u64) as usize;
    let pipeline_id = store.pipelines.get(pipeline)?.id;
    let status = other_status(store, pipeline_id, 0)?;
    store
        .create_generated(pipeline_id, status, now)
        .map(|_| SimEventType::LeadAdded)
}

/// The position of a random live lead, if a few draws find one.
fn live_lead(store: &mut Store) -> Option<u32> {
    let n = store.leads.len() as u64;
    (0..DRAWS).find_map(|_| {
        let pos = store.rng.below(n) as u32;
        (!store.leads.get(pos as usize)?.is_deleted).then_some(pos)
    })
}

/// A random pipeline other than `current` (itself when it is the only one).
fn other_pipeline(store: &mut Store, current: i64) -> i64 {
    let others: Vec<i64> = store
        .pipelines
        .iter()
        .map(|p| p.id)
        .filter(|&id| id != current)
        .collect();
    if others.is_empty() {
        return current;
    }
    others[store.rng.below(others.len() as u64) as usize]
}

/// A random stage of `pipeline_id` other than `current` and other than "Incoming leads".
fn other_status(store: &mut Store, pipeline_id: i64, current: i64) -> Option<i64> {
    let choices: Vec<i64> = store
        .pipeline(pipeline_id)?
        .statuses
        .iter()
        .filter(|s| s.type_ != 1 && s.id != current)
        .map(|s| s.id)
        .collect();
    if choices.is_empty() {
        return None;
    }
    Some(choices[store.rng.below(choices.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{self, NOW};
    use std::collections::HashMap;

    #[test]
    fn the_mix_and_its_effects() {
        let (pipelines, leads) = data::generate(2000, 9);
        let mut store = Store::new(pipelines, leads, 9);
        let before: HashMap<i64, (i64, i64, i64, bool)> = store
            .leads
            .iter()
            .map(|l| (l.id, (l.pipeline_id, l.status_id, l.price, l.is_deleted)))
            .collect();
        let mut counts: HashMap<SimEventType, usize> = HashMap::new();
        for i in 0..2000 {
            let kind = change_once(&mut store, NOW + 10 + i / 100).unwrap();
            *counts.entry(kind).or_default() += 1;
        }
        let events = store.events.all();
        assert_eq!(events.len(), 2000, "one event per change");
        for (kind, share) in [
            (SimEventType::LeadStatusChanged, 50),
            (SimEventType::SaleFieldChanged, 20),
            (SimEventType::LeadAdded, 10),
            (SimEventType::LeadDeleted, 10),
            (SimEventType::LeadRestored, 10),
        ] {
            let got = counts.get(&kind).copied().unwrap_or(0) * 100 / 2000;
            assert!(got.abs_diff(share) <= 4, "{kind}: {got}% of changes");
            assert_eq!(
                events.iter().filter(|e| e.type_ == kind).count(),
                counts[&kind],
                "{kind}"
            );
        }
        let moves: Vec<_> = events
            .iter()
            .filter(|e| e.type_ == SimEventType::LeadStatusChanged)
            .collect();
        let across = moves
            .iter()
            .filter(|e| match (e.value_before, e.value_after) {
                (
                    crate::SimEventValue::Status { pipeline_id: a, .. },
                    crate::SimEventValue::Status { pipeline_id: b, .. },
                ) => a != b,
                _ => false,
            })
            .count();
        assert!(across * 100 / moves.len() >= 20, "moves across pipelines");
        assert!(across < moves.len(), "moves within a pipeline");
        // Every changed lead was touched at or after the first change; the rest are as they were.
        for lead in &store.leads {
            let changed = events.iter().any(|e| e.entity_id == lead.id);
            match before.get(&lead.id) {
                Some(old) if !changed => {
                    assert_eq!(
                        *old,
                        (
                            lead.pipeline_id,
                            lead.status_id,
                            lead.price,
                            lead.is_deleted
                        )
                    );
                    assert!(lead.updated_at <= NOW);
                }
                _ => assert!(lead.updated_at >= NOW + 10, "{}", lead.id),
            }
            assert_eq!(
                lead.closed_at.is_some(),
                lead.status_id == data::WON || lead.status_id == data::LOST,
                "{}",
                lead.id
            );
            if !before.contains_key(&lead.id) {
                let incoming = store
                    .pipeline(lead.pipeline_id)
                    .is_some_and(|p| p.statuses[0].id == lead.status_id);
                assert!(!incoming, "a new lead in Incoming leads: {}", lead.id);
            }
        }
    }
}
