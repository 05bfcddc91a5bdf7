//! The flags of `kommo-fanout sim`; each one can also come from `KOMMO_FANOUT_<FLAG>`.

use std::net::SocketAddr;
use std::time::Duration;

use super::{FaultRule, JsonStyle, SimConfig, SimOAuth, SimRateLimit, TokenSpec};

/// Most leads the sim will generate (about 1 GB of memory); more is surely a typo.
const MAX_LEADS: usize = 2_000_000;

/// Run a simulated Kommo account (the demo upstream and the benchmarks' target).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, env = "KOMMO_FANOUT_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Number of leads to generate (deleted ones included).
    #[arg(long, env = "KOMMO_FANOUT_LEADS", default_value_t = 20_000)]
    pub leads: usize,

    /// Seed of the dataset, the latency jitter and the fault dice.
    #[arg(long, env = "KOMMO_FANOUT_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Delay before every answer, e.g. `80ms`.
    #[arg(long, env = "KOMMO_FANOUT_LATENCY", default_value = "80ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,

    /// Each delay is drawn from `latency ± jitter`.
    #[arg(long, env = "KOMMO_FANOUT_JITTER", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub jitter: Duration,

    /// Accepted bearer token, `TOKEN` or `TOKEN:users=1001,1002` (sees only those users' leads).
    /// Repeatable; in the environment separate tokens with `;`. None: one token, `demo-token`.
    #[arg(long = "token", env = "KOMMO_FANOUT_TOKEN", value_delimiter = ';')]
    pub tokens: Vec<TokenSpec>,

    /// Allow at most this many requests per `--rate-window` (Kommo: 7 per second); off by default.
    #[arg(long, env = "KOMMO_FANOUT_RATE_LIMIT")]
    pub rate_limit: Option<u32>,

    /// The trailing window `--rate-limit` counts in.
    #[arg(long, env = "KOMMO_FANOUT_RATE_WINDOW", default_value = "1s", value_parser = humantime::parse_duration)]
    pub rate_window: Duration,

    /// Consecutive 429s after which the client is blocked (every request 403 HTML); 0 never blocks.
    #[arg(long, env = "KOMMO_FANOUT_BLOCK_AFTER", default_value_t = 10)]
    pub block_after: u32,

    /// How long a block lasts.
    #[arg(long, env = "KOMMO_FANOUT_BLOCK_FOR", default_value = "60s", value_parser = humantime::parse_duration)]
    pub block_for: Duration,

    /// Inject a fault, `KIND[@PROBABILITY]` with KIND one of 500, 429, html403, reset, truncate,
    /// drop (a leads page loses a lead) or misplace (a one-stage leads page lists a lead of another
    /// stage), e.g. `500@0.05`. Repeatable; in the environment separate faults with `,`.
    #[arg(long = "fault", env = "KOMMO_FANOUT_FAULT", value_delimiter = ',')]
    pub faults: Vec<FaultRule>,

    /// How JSON bodies are spelled: compact, php (`\/`, `\u00e9`, `\u0026`... as PHP's
    /// json_encode writes them) or pretty (indented). Kommo's own spelling is not known for sure.
    #[arg(long, env = "KOMMO_FANOUT_JSON_STYLE", default_value_t = JsonStyle::Compact)]
    pub json_style: JsonStyle,

    /// Changes per second the account undergoes while it serves (moves between stages and
    /// pipelines, price edits, creations, deletions, restores), each one bumping `updated_at` and
    /// recorded in `GET /api/v4/events`; e.g. `2.5`. 0 keeps the account still.
    #[arg(long, env = "KOMMO_FANOUT_CHURN", default_value_t = 0.0)]
    pub churn: f64,

    /// Serve `POST /oauth2/access_token` as Kommo's OAuth server for the integration with this id
    /// (with `--oauth-client-secret` and `--oauth-redirect-uri`); an authorization code to trade is
    /// logged at start.
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_CLIENT_ID")]
    pub oauth_client_id: Option<String>,

    /// The integration's secret key, for `--oauth-client-id`.
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_CLIENT_SECRET", hide_env_values = true)]
    pub oauth_client_secret: Option<String>,

    /// The integration's redirect URI, for `--oauth-client-id`.
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_REDIRECT_URI")]
    pub oauth_redirect_uri: Option<String>,

    /// How long OAuth access tokens live, whole seconds, at least 1s (Kommo's: 24h); with
    /// `--oauth-client-id` only.
    #[arg(long, env = "KOMMO_FANOUT_TOKEN_TTL", value_parser = humantime::parse_duration)]
    pub token_ttl: Option<Duration>,
}

impl SimArgs {
    /// Where to listen.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Validate the flags and build the sim's configuration; an error names the flag at fault.
    pub fn into_config(self) -> Result<SimConfig, String> {
        if self.leads > MAX_LEADS {
            return Err(format!(
                "--leads {} is more than the sim supports ({MAX_LEADS})",
                self.leads
            ));
        }
        if !self.churn.is_finite() || self.churn < 0.0 {
            return Err(format!(
                "--churn {} must be a number of changes per second, 0 or more",
                self.churn
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for spec in &self.tokens {
            if !seen.insert(spec.token.as_str()) {
                return Err(format!("--token {:?} is given twice", spec.token));
            }
        }
        let rate_limit = match self.rate_limit {
            None => None,
            Some(0) => return Err("--rate-limit must be at least 1".to_string()),
            Some(requests) => {
                if self.rate_window.is_zero() {
                    return Err("--rate-window must be longer than zero".to_string());
                }
                if self.block_after > 0 && self.block_for.is_zero() {
                    return Err(
                        "--block-for must be longer than zero (or set --block-after 0)".to_string(),
                    );
                }
                Some(SimRateLimit {
                    requests,
                    window: self.rate_window,
                    block_after: self.block_after,
                    block_for: self.block_for,
                })
            }
        };
        let oauth = self.oauth()?;
        Ok(SimConfig {
            leads: self.leads,
            seed: self.seed,
            latency: self.latency,
            jitter: self.jitter,
            tokens: self.tokens,
            rate_limit,
            faults: self.faults,
            json_style: self.json_style,
            churn: self.churn,
            oauth,
        })
    }

    /// The OAuth integration: all three `--oauth-*` flags or none, `--token-ttl` only with them.
    fn oauth(&self) -> Result<Option<SimOAuth>, String> {
        let flags = [
            ("--oauth-client-id", &self.oauth_client_id),
            ("--oauth-client-secret", &self.oauth_client_secret),
            ("--oauth-redirect-uri", &self.oauth_redirect_uri),
        ];
        let missing: Vec<&str> = flags
            .iter()
            .filter(|(_, value)| value.is_none())
            .map(|(flag, _)| *flag)
            .collect();
        if missing.len() == flags.len() {
            return match self.token_ttl {
                Some(_) => Err(
                    "--token-ttl needs --oauth-client-id, --oauth-client-secret and \
                     --oauth-redirect-uri"
                        .to_string(),
                ),
                None => Ok(None),
            };
        }
        if !missing.is_empty() {
            return Err(format!("OAuth needs {} as well", missing.join(" and ")));
        }
        for (flag, value) in flags {
            let value = value.as_deref().unwrap_or_default();
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{flag} must be non-empty, without spaces"));
            }
        }
        let token_ttl = self.token_ttl.unwrap_or(SimOAuth::KOMMO_TOKEN_TTL);
        if token_ttl < Duration::from_secs(1) {
            return Err(
                "--token-ttl must be at least 1s (expires_in is whole seconds)".to_string(),
            );
        }
        Ok(Some(SimOAuth {
            client_id: self.oauth_client_id.clone().unwrap_or_default(),
            client_secret: self.oauth_client_secret.clone().unwrap_or_default(),
            redirect_uri: self.oauth_redirect_uri.clone().unwrap_or_default(),
            token_ttl,
            sees: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fault;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn parse(args: &[&str]) -> Result<SimArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied())).map(|c| c.sim)
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.listen(), "127.0.0.1:8081".parse().unwrap());
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.leads, 20_000);
        assert_eq!(cfg.seed, 42);
        assert_eq!(cfg.latency, Duration::from_millis(80));
        assert_eq!(cfg.jitter, Duration::ZERO);
        assert!(cfg.tokens.is_empty() && cfg.faults.is_empty() && cfg.rate_limit.is_none());
        assert_eq!(cfg.json_style, JsonStyle::Compact);
        assert_eq!(cfg.churn, 0.0);
        assert_eq!(cfg.oauth, None);
    }

    #[test]
    fn oauth_flags_map_to_config() {
        let base = [
            "--oauth-client-id=c-1",
            "--oauth-client-secret=s3cret",
            "--oauth-redirect-uri=https://example.test/cb",
        ];
        let cfg = parse(&base).unwrap().into_config().unwrap();
        let oauth = cfg.oauth.unwrap();
        assert_eq!(
            oauth,
            SimOAuth::new("c-1", "s3cret", "https://example.test/cb")
        );
        assert_eq!(oauth.token_ttl, Duration::from_secs(86_400));
        let mut args = base.to_vec();
        args.push("--token-ttl=3s");
        let cfg = parse(&args).unwrap().into_config().unwrap();
        assert_eq!(cfg.oauth.unwrap().token_ttl, Duration::from_secs(3));

        let err = parse(&base[..2]).unwrap().into_config().unwrap_err();
        assert!(err.contains("--oauth-redirect-uri"), "{err}");
        let err = parse(&["--token-ttl=5s"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.contains("--token-ttl"), "{err}");
        let mut args = base.to_vec();
        args.push("--token-ttl=500ms");
        let err = parse(&args).unwrap().into_config().unwrap_err();
        assert!(err.contains("--token-ttl"), "{err}");
        let err = parse(&[base[0], "--oauth-client-secret=", base[2]])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.contains("--oauth-client-secret"), "{err}");
    }

    #[test]
    fn flags_map_to_config() {
        let cfg = parse(&[
            "--leads=3000",
            "--latency=5ms",
            "--token=a",
            "--token",
            "b:users=1001,1002",
            "--rate-limit=7",
            "--block-after=3",
            "--fault=500@0.25",
            "--fault=reset",
            "--fault=drop",
            "--fault",
            "misplace@0.5",
            "--json-style=php",
            "--churn=2.5",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(cfg.leads, 3000);
        assert_eq!(cfg.latency, Duration::from_millis(5));
        assert_eq!(cfg.tokens[0], TokenSpec::full("a"));
        assert_eq!(cfg.tokens[1].responsible_user_ids, Some(vec![1001, 1002]));
        let rl = cfg.rate_limit.unwrap();
        assert_eq!(
            (rl.requests, rl.window, rl.block_after),
            (7, Duration::from_secs(1), 3)
        );
        assert_eq!(cfg.faults[0].fault, Fault::Status500);
        assert_eq!(cfg.faults[0].probability, 0.25);
        assert_eq!(cfg.faults[1].fault, Fault::ConnectionReset);
        assert_eq!(
            (cfg.faults[2].fault.clone(), cfg.faults[2].probability),
            (Fault::DropLead, 1.0)
        );
        assert_eq!(
            (cfg.faults[3].fault.clone(), cfg.faults[3].probability),
            (Fault::MisplaceLead, 0.5)
        );
        assert_eq!(cfg.json_style, JsonStyle::Php);
        assert_eq!(cfg.churn, 2.5);
        for (flag, style) in [
            ("compact", JsonStyle::Compact),
            ("PHP", JsonStyle::Php),
            ("pretty", JsonStyle::Pretty),
        ] {
            let cfg = parse(&["--json-style", flag])
                .unwrap()
                .into_config()
                .unwrap();
            assert_eq!(cfg.json_style, style);
        }
    }

    #[test]
    fn bad_flags_are_named() {
        assert!(parse(&["--fault=teapot"]).is_err());
        assert!(parse(&["--json-style=yaml"]).is_err());
        assert!(parse(&["--fault=500@2"]).is_err());
        assert!(parse(&["--token=a:users=x"]).is_err());
        assert!(parse(&["--latency=soon"]).is_err());
        let err = parse(&["--rate-limit=0"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.contains("--rate-limit"), "{err}");
        let err = parse(&["--token=a", "--token=a"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.contains("--token"), "{err}");
        assert!(parse(&["--churn=often"]).is_err());
        for bad in ["--churn=-1", "--churn=NaN", "--churn=inf"] {
            let err = parse(&[bad]).unwrap().into_config().unwrap_err();
            assert!(err.contains("--churn"), "{bad}: {err}");
        }
    }
}
