//! `envelope check`: a valid config prints its resolved summary; an invalid one names file, line, column and field,
//! exits non-zero, and binds nothing.

use std::process::Command;

fn check(config: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("envelope-cli-{}-{}", std::process::id(), config.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("envelope.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_config_is_summarised() {
    let (code, out, _) = check(
        "[[listener]]\nname = \"in\"\nlisten = \"127.0.0.1:1\"\n\n[[upstream]]\nname = \"app\"\nendpoints = [\"http://127.0.0.1:2\"]\n\n[[route]]\nname = \"all\"\nmatch = { path_prefix = \"/\" }\nupstream = \"app\"\n",
    );
    assert_eq!(code, 0);
    assert!(out.contains("config OK: 1 listener(s), 1 upstream(s), 1 route(s)"), "{out}");
    assert!(out.contains("route all / -> app"), "{out}");
    assert!(out.contains("envelope-history.db (retention 2592000s, flush every 10s)"), "{out}");
}

#[test]
fn errors_are_located_and_exit_non_zero_without_binding() {
    // The listener address is taken; check must not try to bind it (and must still fail on the typo).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, _, err) =
        check(&format!("[[listener]]\nname = \"in\"\nlisten = \"127.0.0.1:{port}\"\nmax_conections = 5\n"));
    assert_eq!(code, 2);
    assert!(err.contains("envelope.toml:4:1: `listener[0].max_conections`: unknown field"), "{err}");
}

/// README command one: the demo runs to completion by itself, and shows the breaker open during the incidents and
/// traffic recovering afterwards.
#[test]
fn the_demo_runs_to_completion_and_shows_the_envelope_at_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_envelope")).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let second =
        |token: &str| token.strip_suffix('s').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let rows: Vec<&str> = text.lines().filter(|l| l.split_whitespace().next().is_some_and(second)).collect();
    // About one line per second of its 25: a loaded machine may run a second late or skip one.
    assert!((20..=27).contains(&rows.len()), "one line per second: {} lines\n{text}", rows.len());
    assert!(
        rows.iter().any(|r| r.contains("outage") && r.ends_with("open")),
        "the breaker is open in the outage: {text}"
    );
    assert!(rows.last().unwrap().ends_with("closed"), "and closed again at the end: {text}");
    assert!(text.contains("What the envelope did, per phase:"));
}
