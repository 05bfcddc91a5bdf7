//! Reads the proxy's own Prometheus text back into numbers, so the console shows exactly what
//! `/metrics` exports (and Grafana graphs) without a second set of counters on the hot path.

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    /// The value of label `key`, if the series has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub series: Vec<Series>,
}

impl Scrape {
    /// Parses the text exposition; lines it cannot read (comments, `# EOF`) are skipped.
    pub fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Scrape { series }
    }

    /// The sum of every series called `name` whose labels pass `keep`.
    pub fn sum_where(&self, name: &str, keep: impl Fn(&Series) -> bool) -> f64 {
        self.series
            .iter()
            .filter(|s| s.name == name && keep(s))
            .map(|s| s.value)
            .sum()
    }

    /// The sum of every series called `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.sum_where(name, |_| true)
    }

    /// The series called `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| s.name == name)
    }

    /// A histogram's cumulative bucket counts summed over its other labels, by upper bound,
    /// in ascending order (`+Inf` last).
    pub fn buckets(&self, histogram: &str) -> Vec<(f64, f64)> {
        let name = format!("{histogram}_bucket");
        let mut out: Vec<(f64, f64)> = Vec::new();
        for s in self.named(&name) {
            let Some(le) = s.label("le").and_then(parse_bound) else {
                continue;
            };
            match out.iter_mut().find(|(b, _)| *b == le) {
                Some((_, n)) => *n += s.value,
                None => out.push((le, s.value)),
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

fn parse_bound(le: &str) -> Option<f64> {
    match le {
        "+Inf" => Some(f64::INFINITY),
        other => other.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Series> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head, Vec::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Series {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y"` (values with `\"`, `\\` and `\n` escapes).
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.push((key.trim_start_matches(',').to_string(), value));
        rest = &after[end + 1..];
    }
    Some(out)
}

/// The `q` quantile (0..1) of observations counted by cumulative `buckets` (as
/// [`Scrape::buckets`] gives them), interpolated within the bucket it falls in, as Prometheus'
/// `histogram_quantile` does; `None` without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                // Past the last finite bound: that bound is all that is known.
                return Some(below.0);
            }
            let share = if count > below.1 {
                (rank - below.1) / (count - below.1)
            } else {
                1.0
            };
            return Some(below.0 + (bound - below.0) * share);
        }
        below = (bound, count);
    }
    Some(below.0)
}

/// The difference of two readings of a cumulative bucket list, by bound.
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(bound, n)| {
            let old = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, n)| *n);
            (*bound, (n - old).max(0.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP kommo_fanout_x x\n\
        kommo_fanout_client_requests_total{route=\"leads\",status=\"200\"} 3\n\
        kommo_fanout_client_requests_total{route=\"passthrough\",status=\"404\"} 1\n\
        kommo_fanout_cache_bytes 1024\n\
        kommo_fanout_lat_seconds_bucket{kind=\"a\",le=\"0.1\"} 1\n\
        kommo_fanout_lat_seconds_bucket{kind=\"a\",le=\"1.0\"} 3\n\
        kommo_fanout_lat_seconds_bucket{kind=\"a\",le=\"+Inf\"} 4\n\
        kommo_fanout_lat_seconds_bucket{kind=\"b\",le=\"0.1\"} 1\n\
        kommo_fanout_lat_seconds_bucket{kind=\"b\",le=\"1.0\"} 1\n\
        kommo_fanout_lat_seconds_bucket{kind=\"b\",le=\"+Inf\"} 1\n\
        odd{v=\"a \\\"q\\\", b\"} 2\n\
        # EOF\n";

    #[test]
    fn reads_names_labels_and_values() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.sum("kommo_fanout_client_requests_total"), 4.0);
        assert_eq!(
            s.sum_where("kommo_fanout_client_requests_total", |s| s.label("route")
                == Some("leads")),
            3.0
        );
        assert_eq!(s.sum("kommo_fanout_cache_bytes"), 1024.0);
        let odd = s.named("odd").next().unwrap();
        assert_eq!(odd.label("v"), Some("a \"q\", b"));
        assert_eq!(odd.value, 2.0);
    }

    #[test]
    fn buckets_sum_over_labels_and_give_quantiles() {
        let s = Scrape::parse(TEXT);
        let b = s.buckets("kommo_fanout_lat_seconds");
        assert_eq!(b, vec![(0.1, 2.0), (1.0, 4.0), (f64::INFINITY, 5.0)]);
        // Rank 2.5 of 5 falls in (0.1, 1.0], a quarter of the way.
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.325).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(&b, 0.99), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn bucket_deltas_are_taken_by_bound() {
        let before = vec![(0.1, 2.0), (1.0, 2.0), (f64::INFINITY, 2.0)];
        let after = vec![(0.1, 3.0), (1.0, 4.0), (f64::INFINITY, 4.0)];
        assert_eq!(
            bucket_delta(&before, &after),
            vec![(0.1, 1.0), (1.0, 2.0), (f64::INFINITY, 2.0)]
        );
    }
}
