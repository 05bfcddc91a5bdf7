//! The `kommo-fanout` binary: parse the command line, bind, run.
//!
//! The proxy's library knows only `serve` and `verify`; the binary adds the commands that run
//! the simulated account (`sim`, and `demo` in [`demo`]), so only it depends on `kommo_sim`.
#![forbid(unsafe_code)]

mod demo;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kommo_fanout::config::{self, LogFormat, ServeArgs, VerifyArgs};
use kommo_sim::SimArgs;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use demo::DemoArgs;

/// kommo-fanout: a drop-in base URL for a Kommo account that answers many-stage lead lists.
#[derive(Debug, Parser)]
#[command(name = "kommo-fanout", version, about, long_about = None)]
struct Cli {
    /// Log lines as human-readable text or as one JSON object per line. Filter with RUST_LOG
    /// (e.g. `RUST_LOG=kommo_fanout=debug`).
    #[arg(
        long,
        global = true,
        env = "KOMMO_FANOUT_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in front of a Kommo account.
    Serve(Box<ServeArgs>),
    /// Run the simulated Kommo account.
    Sim(SimArgs),
    /// Run the simulator and the proxy in front of it, and print requests to try.
    Demo(DemoArgs),
    /// Compare the proxy's merged views with direct one-stage reads of a real account.
    Verify(VerifyArgs),
}

/// Invalid flags or values: the same code clap uses for usage errors.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli: Cli = config::parse_args(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    // `verify` prints a report: the in-process proxy's request lines would bury it.
    let default_level = match cli.command {
        Command::Verify(_) => "warn",
        _ => "info",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    match cli.log_format {
        // Colours only for a person at a terminal, not in a file or a log collector.
        LogFormat::Pretty => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init(),
    }
    if matches!(cli.command, Command::Serve(_) | Command::Demo(_)) {
        open_files();
    }
    match cli.command {
        Command::Serve(args) => {
            // Validated before anything starts: `--check` prints it and exits.
            let check = args.check;
            let config = match args.validate() {
                Ok(c) => c,
                Err(e) => return fail(USAGE, &e),
            };
            if check {
                print!("{}", config.describe());
                return ExitCode::SUCCESS;
            }
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.worker_threads {
                builder.worker_threads(n);
            }
            match builder.enable_all().build() {
                Ok(rt) => rt.block_on(serve(config)),
                Err(e) => fail(1, &format!("cannot start the runtime: {e}")),
            }
        }
        Command::Sim(args) => match runtime() {
            Ok(rt) => rt.block_on(sim(args)),
            Err(code) => code,
        },
        Command::Demo(args) => match runtime() {
            Ok(rt) => rt.block_on(async {
                match demo::run(args, kommo_fanout::shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(1, &e),
                }
            }),
            Err(code) => code,
        },
        Command::Verify(args) => {
            let opts = match kommo_fanout::verify::Options::from_args(&args) {
                Ok(o) => o,
                Err(e) => return fail(USAGE, &e),
            };
            match runtime() {
                Ok(rt) => {
                    let report = rt.block_on(kommo_fanout::verify::run(&opts));
                    if args.json {
                        println!("{}", report.json());
                    } else {
                        print!("{}", report.text());
                    }
                    ExitCode::from(report.exit_code())
                }
                Err(code) => code,
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one (see
/// [`kommo_fanout::raise_open_files_limit`]); a failure is only logged.
fn open_files() {
    #[cfg(target_os = "linux")]
    match kommo_fanout::raise_open_files_limit() {
        Ok(Some((from, to))) => tracing::info!(from, to, "raised the open-files limit"),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "open-files limit unchanged"),
    }
}

/// A multi-threaded runtime with one thread per CPU.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(1, &format!("cannot start the runtime: {e}")))
}

async fn serve(config: config::ServeConfig) -> ExitCode {
    let (listener, admin) = match (
        TcpListener::bind(config.listen).await,
        TcpListener::bind(config.admin_listen).await,
    ) {
        (Ok(l), Ok(a)) => (l, a),
        (Err(e), _) => return fail(1, &format!("cannot listen on {}: {e}", config.listen)),
        (_, Err(e)) => return fail(1, &format!("cannot listen on {}: {e}", config.admin_listen)),
    };
    // The bound addresses: with port 0 the system picked the port.
    let bound = |l: &TcpListener| {
        l.local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    tracing::info!(listen = %bound(&listener), admin = %bound(&admin), upstream = %config.upstream.origin.url, "serving");
    match kommo_fanout::run(&config, listener, admin, kommo_fanout::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e),
    }
}

async fn sim(args: SimArgs) -> ExitCode {
    let listen = args.listen();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => return fail(USAGE, &e),
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => return fail(1, &format!("cannot listen on {listen}: {e}")),
    };
    let listen = listener.local_addr().unwrap_or(listen);
    tracing::info!(%listen, "simulated Kommo account serving");
    match kommo_sim::Sim::new(config)
        .run(listener, kommo_fanout::shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e.to_string()),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("kommo-fanout: {message}");
    ExitCode::from(code)
}
