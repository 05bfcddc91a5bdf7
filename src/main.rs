//! The `kommo-fanout` binary: parse the command line, bind, run.
//!
//! The proxy's library knows only `serve` and `verify`; the binary adds the commands that run
//! the simulated account (`sim`, and `demo` in [`demo`]), so only it depends on `kommo_sim`.
#![forbid(unsafe_code)]

mod demo;

use std::io::IsTerminal;
use std::net::SocketAddr;
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
    /// Manage the keys clients send instead of a Kommo token.
    #[command(subcommand)]
    Keys(kommo_fanout::keys::KeysCommand),
    /// Authorize the proxy's OAuth integration with the account.
    #[command(subcommand)]
    Oauth(kommo_fanout::credentials::OAuthCommand),
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
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        // Colours only for a person at a terminal, not in a file or a log collector.
        LogFormat::Pretty => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    if matches!(cli.command, Command::Serve(_) | Command::Demo(_)) {
        open_files();
    }
    run(cli.command).unwrap_or_else(|(code, message)| fail(code, &message))
}

/// Runs `command`; an error is the exit code and what to print.
fn run(command: Command) -> Result<ExitCode, (u8, String)> {
    let usage = |e| (USAGE, e);
    match command {
        Command::Serve(args) => {
            // Validated before anything starts: `--check` prints it and exits.
            let check = args.check;
            let config = args.validate().map_err(usage)?;
            if check {
                print!("{}", config.describe());
            } else {
                block_on(config.worker_threads, serve(config))?;
            }
        }
        Command::Sim(args) => {
            let listen = args.listen();
            let config = args.into_config().map_err(usage)?;
            block_on(None, sim(listen, config))?;
        }
        Command::Demo(args) => block_on(None, demo::run(args, kommo_fanout::shutdown_signal()))?,
        Command::Verify(args) => {
            let opts = kommo_fanout::verify::Options::from_args(&args).map_err(usage)?;
            let report = block_on(None, async { Ok(kommo_fanout::verify::run(&opts).await) })?;
            if args.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            return Ok(ExitCode::from(report.exit_code()));
        }
        Command::Keys(command) => {
            print!("{}", kommo_fanout::keys::run(command).map_err(|e| (1, e))?)
        }
        Command::Oauth(command) => {
            println!(
                "{}",
                block_on(None, kommo_fanout::credentials::run_oauth(command))?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
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

/// Runs `job` on a multi-threaded runtime of `threads` (default: one per CPU); a failure
/// exits with code 1.
fn block_on<T>(
    threads: Option<usize>,
    job: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, (u8, String)> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build();
    let runtime = runtime.map_err(|e| (1, format!("cannot start the runtime: {e}")))?;
    runtime.block_on(job).map_err(|e| (1, e))
}

async fn serve(config: config::ServeConfig) -> Result<(), String> {
    let (listener, admin) = (bind(config.listen).await?, bind(config.admin_listen).await?);
    // The bound addresses: with port 0 the system picked the port.
    let bound = |l: &TcpListener| {
        l.local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    let names: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
    match names.is_empty() {
        true => {
            tracing::info!(listen = %bound(&listener), admin = %bound(&admin), upstream = %config.upstream.origin.url, "serving")
        }
        false => {
            tracing::info!(listen = %bound(&listener), admin = %bound(&admin), accounts = %names.join(","), "serving")
        }
    }
    kommo_fanout::run(&config, listener, admin, kommo_fanout::shutdown_signal()).await
}

async fn sim(listen: SocketAddr, config: kommo_sim::SimConfig) -> Result<(), String> {
    let listener = bind(listen).await?;
    let listen = listener.local_addr().unwrap_or(listen);
    tracing::info!(%listen, "simulated Kommo account serving");
    let sim = kommo_sim::Sim::new(config).run(listener, kommo_fanout::shutdown_signal());
    sim.await.map_err(|e| e.to_string())
}

/// A listener on `addr`; the error names the address.
async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr).await;
    listener.map_err(|e| format!("cannot listen on {addr}: {e}"))
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("kommo-fanout: {message}");
    ExitCode::from(code)
}
