//! Turning a parsed query into upstream requests: relay one, or fan out one stream per stage.

use super::query::{pair_params, LeadsQuery, Order, StagePair, MAX_LIMIT};

/// The path of the one method the proxy fans out.
pub const LEADS_PATH: &str = "/api/v4/leads";

/// How a leads request is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Zero or one distinct stage: one upstream request whose answer is relayed.
    Relay {
        /// The upstream request target, `/api/v4/leads?...`.
        target: String,
    },
    /// Several stages: one upstream stream per stage, merged.
    FanOut(FanOutPlan),
}

/// The streams of a fan-out and how their merge is cut into the client's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOutPlan {
    pub streams: Vec<StreamPlan>,
    /// The global order of the merge (and of every stream).
    pub order: Order,
}

/// One upstream stream: one stage, every other parameter of the client unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlan {
    pub pair: StagePair,
    /// `/api/v4/leads?<params>&page=`: the target minus the page number.
    target_prefix: String,
}

impl StreamPlan {
    /// The upstream request target for page `page` (from 1) of this stream.
    pub fn target(&self, page: u32) -> String {
        format!("{}{page}", self.target_prefix)
    }
}

/// The upstream page size of fan-out streams: Kommo's largest, so each stream costs as few
/// requests as possible.
pub const STREAM_LIMIT: u32 = MAX_LIMIT;

/// Plans the upstream requests for `query`; `raw_query` is the client's query string.
pub fn plan(query: &LeadsQuery, raw_query: &str) -> Plan {
    match query.pairs.as_slice() {
        // One entry or none: the client's request is already one Kommo accepts, byte for byte.
        [] | [_] if query.pair_entries <= 1 => Plan::Relay {
            target: target(raw_query),
        },
        // The same stage repeated: one stage, asked for once.
        [pair] => {
            let mut params = query.forward.clone();
            params.extend(pair_params(*pair));
            if let Some(order) = query.order {
                params.push(order.to_param());
            }
            params.push(format!("limit={}", query.limit));
            params.push(format!("page={}", query.page));
            Plan::Relay {
                target: target(&params.join("&")),
            }
        }
        pairs => {
            let order = query.effective_order();
            let streams = pairs
                .iter()
                .map(|&pair| {
                    let mut params = query.forward.clone();
                    params.extend(pair_params(pair));
                    // The merge order is always asked for explicitly: Kommo's default is not
                    // documented, and every stream must follow the same order.
                    params.push(order.to_param());
                    params.push(format!("limit={STREAM_LIMIT}"));
                    StreamPlan {
                        pair,
                        target_prefix: format!("{LEADS_PATH}?{}&page=", params.join("&")),
                    }
                })
                .collect();
            Plan::FanOut(FanOutPlan { streams, order })
        }
    }
}

/// The most upstream requests one client request may cause (`--max-upstream-per-request`).
///
/// A merge reads every upstream page of every stage up to the client's page, so a deep page
/// over many stages costs many requests of the account's budget, which every integration
/// shares, where Kommo itself answers with one. Before each batch of stream reads the merge
/// asks [`UpstreamBudget::check`]; a batch that could pass the bound is not sent, and the
/// client gets a `400` saying what the page would take and how to ask for it cheaply.
///
/// What counts is what `RequestContext::count_upstream_call` counts: one per page read that
/// went upstream (a cache miss); a page served from the page cache, the shared cache or
/// another request's fill in flight costs nothing. Retries are not counted: they happen inside
/// `Fetcher::get`, out of this request's sight, only after a failed attempt (a `5xx`, a lost
/// connection, a truncated body, a `429` waited out), each through the limiter and at most
/// `--retries` per read. The page cache cannot be asked cheaply whether a page is there, so
/// each read of a batch is counted as a miss until it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamBudget {
    /// The bound, at least 1.
    pub limit: u32,
}

/// Where a merge stands when it wants its next batch of stream reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Upstream requests the client request has caused so far.
    pub spent: u32,
    /// Stream reads in the next batch.
    pub batch: usize,
    /// Upstream pages the merge has been fed so far, from the cache or not.
    pub pages_read: u64,
    /// Leads the merge has passed so far: skipped on the way to the page, or kept for it.
    pub passed: u64,
    /// Leads it passes to answer: the page's offset plus its limit.
    pub target: u64,
}

/// A batch of stream reads that could take a request past its [`UpstreamBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// The bound.
    pub limit: u32,
    /// Where the merge stopped.
    pub at: MergeProgress,
    /// About how many upstream requests the page would take in all (more than `spent + batch`),
    /// extrapolated from the leads passed per page read so far; `None` before the first lead.
    pub estimate: Option<u64>,
}

impl UpstreamBudget {
    /// `Ok` when the next batch fits the bound even if every read of it is a miss.
    pub fn check(self, at: MergeProgress) -> Result<(), OverBudget> {
        let batch = u64::try_from(at.batch).unwrap_or(u64::MAX);
        let next = u64::from(at.spent).saturating_add(batch);
        if next <= u64::from(self.limit) {
            return Ok(());
        }
        let estimate = (at.passed > 0).then(|| {
            let left = u128::from(at.target.saturating_sub(at.passed));
            let more = (left * u128::from(at.pages_read)).div_ceil(u128::from(at.passed));
            let more = u64::try_from(more).unwrap_or(u64::MAX).max(batch);
            u64::from(at.spent).saturating_add(more)
        });
        Err(OverBudget {
            limit: self.limit,
            at,
            estimate: estimate.filter(|&e| e > next),
        })
    }
}

fn target(query: &str) -> String {
    if query.is_empty() {
        LEADS_PATH.to_string()
    } else {
        format!("{LEADS_PATH}?{query}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leads::query::{parse, split_params, QueryLimits};

    fn plan_of(q: &str) -> Plan {
        plan(&parse(q, QueryLimits { max_pairs: 100 }).unwrap(), q)
    }

    #[test]
    fn zero_or_one_pair_relays_the_query_unchanged() {
        assert_eq!(
            plan_of(""),
            Plan::Relay {
                target: "/api/v4/leads".into()
            }
        );
        let q = "filter%5Bstatuses%5D%5B4%5D%5Bpipeline_id%5D=1&filter[statuses][4][status_id]=2&limit=3";
        assert_eq!(
            plan_of(q),
            Plan::Relay {
                target: format!("/api/v4/leads?{q}")
            }
        );
    }

    #[test]
    fn a_repeated_pair_is_asked_once() {
        let Plan::Relay { target } = plan_of("with=contacts&filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=2&filter[statuses][1][pipeline_id]=1&filter[statuses][1][status_id]=2&order[id]=desc") else {
            panic!("not a relay")
        };
        let (_, q) = target.split_once('?').unwrap();
        let keys: Vec<String> = split_params(q)
            .into_iter()
            .map(|p| format!("{}={}", p.key, p.value))
            .collect();
        assert_eq!(
            keys,
            vec![
                "with=contacts",
                "filter[statuses][0][pipeline_id]=1",
                "filter[statuses][0][status_id]=2",
                "order[id]=desc",
                "limit=50",
                "page=1"
            ]
        );
    }

    #[test]
    fn fan_out_carries_one_pair_and_everything_else() {
        let Plan::FanOut(p) = plan_of("filter[responsible_user_id][]=7&page=3&limit=10&filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=142&filter[statuses][1][pipeline_id]=2&filter[statuses][1][status_id]=142&query=abc") else {
            panic!("not a fan-out")
        };
        assert_eq!(p.order, Order::DEFAULT);
        assert_eq!(p.streams.len(), 2);
        let t = p.streams[1].target(4);
        let (path, q) = t.split_once('?').unwrap();
        assert_eq!(path, LEADS_PATH);
        let keys: Vec<String> = split_params(q)
            .into_iter()
            .map(|p| format!("{}={}", p.key, p.value))
            .collect();
        assert_eq!(
            keys,
            vec![
                "filter[responsible_user_id][]=7",
                "query=abc",
                "filter[statuses][0][pipeline_id]=2",
                "filter[statuses][0][status_id]=142",
                "order[id]=asc",
                "limit=250",
                "page=4"
            ]
        );
    }

    fn at(spent: u32, batch: usize, pages_read: u64, passed: u64, target: u64) -> MergeProgress {
        MergeProgress {
            spent,
            batch,
            pages_read,
            passed,
            target,
        }
    }

    #[test]
    fn a_batch_that_reaches_the_bound_exactly_fits() {
        let budget = UpstreamBudget { limit: 10 };
        assert_eq!(budget.check(at(0, 10, 0, 0, 50)), Ok(()));
        assert_eq!(budget.check(at(7, 3, 40, 9000, 9050)), Ok(()));
        assert!(budget.check(at(8, 3, 40, 9000, 9050)).is_err());
        assert!(budget.check(at(0, 11, 0, 0, 50)).is_err());
    }

    #[test]
    fn the_estimate_extrapolates_leads_per_page_read() {
        let budget = UpstreamBudget { limit: 10 };
        // 10 pages gave 2500 leads; 250 000 more to pass: about 1000 more pages.
        let over = budget.check(at(10, 1, 10, 2_500, 252_500)).unwrap_err();
        assert_eq!(over.limit, 10);
        assert_eq!(over.estimate, Some(1_010));
        // Nothing passed yet (more stages than the bound): no estimate, only the batch.
        let over = budget.check(at(0, 32, 0, 0, 50)).unwrap_err();
        assert_eq!(over.estimate, None);
        // A page just past what was read: no estimate above spent + batch.
        let over = budget.check(at(10, 2, 10, 2_500, 2_510)).unwrap_err();
        assert_eq!(over.estimate, None);
        // The largest page of the largest offset does not overflow.
        let far = u64::from(u32::MAX) * 250;
        let over = budget.check(at(10, 1, u64::MAX, 1, far)).unwrap_err();
        assert_eq!(over.estimate, Some(u64::MAX));
    }
}
