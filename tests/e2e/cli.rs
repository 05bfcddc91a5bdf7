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

/// Threads of a running process named `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == name)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn worker_threads_sets_the_number_of_serving_threads() {
    for n in [1usize, 3] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kommo-fanout"))
            .args(["serve", "--upstream", "http://127.0.0.1:1"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--worker-threads", &n.to_string()])
            .env_remove("KOMMO_FANOUT_UPSTREAM")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("binary runs");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = 0;
        while std::time::Instant::now() < deadline {
            seen = threads_named(child.id(), "fanout-worker");
            if seen >= n {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Settle: all start at once; none may come later, and no work-stealing runtime runs
        // beside them.
        std::thread::sleep(std::time::Duration::from_millis(200));
        seen = seen.max(threads_named(child.id(), "fanout-worker"));
        let stealing = threads_named(child.id(), "tokio-rt-worker");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, n, "--worker-threads {n}");
        assert_eq!(stealing, 0, "--worker-threads {n}");
    }
}
