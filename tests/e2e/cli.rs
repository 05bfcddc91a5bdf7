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
        (vec!["sim", "--latency", "fast"], "latency"),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let (code, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
