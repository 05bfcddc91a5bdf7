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
}
