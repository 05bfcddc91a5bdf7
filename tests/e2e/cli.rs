//! The binary's command line: invalid input exits 2 with a message, before binding anything.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kommo-fanout"))
        .args(args)
        .env_remove("KOMMO_FANOUT_UPSTREAM")
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_flags_exit_2_with_a_message() {
    for (args, needle) in [
        (vec!["serve"], "--upstream"),
        (vec!["serve", "--upstream", "kommo.com"], "--upstream"),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--max-pairs",
                "0",
            ],
            "max-pairs",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--listen",
                "nowhere",
            ],
            "listen",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--worker-threads",
                "0",
            ],
            "worker-threads",
        ),
        (vec!["sim", "--latency", "fast"], "latency"),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let (code, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `--sendfile-min-bytes` no longer does anything: accepted, with a warning saying so, so
/// existing command lines and config files keep starting.
#[test]
fn the_deprecated_sendfile_flag_is_accepted_with_a_warning() {
    let upstream = ["serve", "--upstream", "http://127.0.0.1:1", "--check"];
    let (code, stderr) = run(&[&upstream[..], &["--sendfile-min-bytes", "0"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("--sendfile-min-bytes"), "{stderr}");
    assert!(stderr.contains("no effect"), "{stderr}");
    let (code, stderr) = run(&upstream);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("sendfile"),
        "no warning without it: {stderr}"
    );
}

/// Live views' flags: validated (the error names the flag), and shown by `--check`, from flags
/// and from the environment alike.
#[test]
fn live_view_flags_are_checked_and_shown() {
    let upstream = ["serve", "--upstream", "http://127.0.0.1:1", "--check"];
    for (extra, needle) in [
        (vec!["--sync", "--sync-with", "only_deleted"], "--sync-with"),
        (
            vec!["--sync", "--sync-with", "contacts,bogus"],
            "--sync-with",
        ),
        (
            vec![
                "--sync",
                "--sync-interval",
                "10s",
                "--sync-max-staleness",
                "5s",
            ],
            "--sync-max-staleness",
        ),
        (
            vec!["--sync", "--sync-interval", "100ms"],
            "--sync-interval",
        ),
    ] {
        let (code, stderr) = run(&[&upstream[..], &extra].concat());
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
    let shown = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kommo-fanout"))
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("binary runs");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let off = shown(&upstream, &[]);
    assert!(off.contains("sync = false"), "{off}");
    assert!(!off.contains("sync_interval"), "{off}");
    let on = shown(
        &[
            &upstream[..],
            &["--sync", "--sync-with", "contacts,loss_reason"],
        ]
        .concat(),
        &[],
    );
    for line in [
        "sync = true",
        "sync_interval = \"5s\"",
        "sync_max_staleness = \"15s\"",
        "sync_with = \"contacts,loss_reason\"",
    ] {
        assert!(on.contains(line), "{line} in {on}");
    }
    let env = shown(
        &upstream,
        &[
            ("KOMMO_FANOUT_SYNC", "true"),
            ("KOMMO_FANOUT_SYNC_INTERVAL", "2s"),
        ],
    );
    assert!(env.contains("sync = true"), "{env}");
    assert!(env.contains("sync_max_staleness = \"6s\""), "{env}");
}

/// The first log line of `args` that contains `needle`, or what stderr said until it closed
/// or 10 s passed, and the process's `/proc/PID/limits` then. The process is killed after.
fn log_line(args: &[&str], needle: &str) -> (String, String) {
    log_line_of(
        Command::new(env!("CARGO_BIN_EXE_kommo-fanout")).args(args),
        needle,
    )
}

/// [`log_line`] of any command.
fn log_line_of(command: &mut Command, needle: &str) -> (String, String) {
    use std::io::BufRead;
    let mut child = command
        .env_remove("KOMMO_FANOUT_UPSTREAM")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(&needle) {
                let _ = tx.send(line);
                return;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = tx.send(seen);
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| "no line within 10 s".into());
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    (line, limits)
}

/// The port in `key=127.0.0.1:PORT` of a log line.
fn port_of(line: &str, key: &str) -> u16 {
    let prefix = format!("{key}=127.0.0.1:");
    let at = line.find(&prefix).expect(line) + prefix.len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect(line)
}

#[test]
fn start_lines_name_the_bound_ports_without_terminal_colours() {
    let (serve, _) = log_line(
        &[
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        "serving",
    );
    let (sim, _) = log_line(
        &["sim", "--listen", "127.0.0.1:0"],
        "simulated Kommo account",
    );
    for (line, keys) in [(&serve, &["listen", "admin"][..]), (&sim, &["listen"][..])] {
        assert!(
            !line.contains('\u{1b}'),
            "no escape codes off a terminal: {line:?}"
        );
        for key in keys {
            assert_ne!(port_of(line, key), 0, "{key} in {line:?}");
        }
    }
}

/// Started under a soft limit of 256 open files, `serve` raises it to the hard limit.
#[test]
fn serve_raises_the_soft_open_files_limit_to_the_hard_one() {
    let hard = {
        let out = Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .expect("sh runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    if hard == "unlimited" || hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        // Nothing to raise to here.
        return;
    }
    let (line, limits) = log_line_of(
        Command::new("sh").args([
            "-c",
            "ulimit -Sn 256 && exec \"$0\" serve --upstream http://127.0.0.1:1 \
             --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0",
            env!("CARGO_BIN_EXE_kommo-fanout"),
        ]),
        "serving",
    );
    assert!(line.contains("serving"), "{line}");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a limits line");
    // "Max open files  SOFT  HARD  files": the soft limit is now the hard one.
    let soft_and_hard: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        soft_and_hard,
        [hard.as_str(), hard.as_str()],
        "{open_files}"
    );
}
