//! The binary from the outside: exit codes and one-line errors for bad input (spec section 1).

use crate::support::repo;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn keywatch(args: &[&str]) -> Output {
    keywatch_reading(args, std::process::Stdio::null())
}

/// [`keywatch`] with `stdin` as its standard input (for the `-` input name).
fn keywatch_reading(args: &[&str], stdin: impl Into<std::process::Stdio>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .args(args)
        .env_remove("KEYWATCH_CONFIG")
        .stdin(stdin)
        .output()
        .expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The JSON a run printed; the run must have exited 0.
fn json_output(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// [`keywatch`], then [`json_output`].
fn keywatch_json(args: &[&str]) -> serde_json::Value {
    json_output(&keywatch(args))
}

#[test]
fn a_missing_input_file_is_invalid_input() {
    let o = keywatch(&["replay", "/nonexistent/events.jsonl"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/events.jsonl"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn a_directory_as_input_is_invalid_input() {
    let dir = repo().join("tests/cases");
    let o = keywatch(&["replay", dir.to_str().expect("utf-8 path")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
}

/// Usage errors are one line on stderr too (spec section 1), naming what was wrong.
#[test]
fn usage_errors_are_one_line() {
    for (args, names) in [
        (&["frobnicate"][..], "frobnicate"),
        (&["replay", "--bogus", "x"][..], "--bogus"),
        (&["blast-radius"][..], "<KEY>"),
        (&["status", "--now"][..], "--now"),
        (&[][..], "a command is required"),
    ] {
        let o = keywatch(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    let o = keywatch(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Usage:"));
}

#[test]
fn a_bad_flag_is_invalid_input() {
    let o = keywatch(&["replay", "--bogus", "x"]);
    assert_eq!(o.status.code(), Some(1));
    let o = keywatch(&["replay", "--now", "yesterday", "-"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--now"), "{}", stderr(&o));
}

#[test]
fn a_bad_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kw.toml");
    std::fs::write(&path, "[lifecycle]\nrewrap_deadline = \"4 hourz\"\n").unwrap();
    let o = keywatch(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("kw.toml") && e.contains("rewrap_deadline"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
}

#[test]
fn a_bad_registry_entry_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kw.toml");
    std::fs::write(
        &path,
        "[[deployments]]\ncrn = \"crn:v1:bluemix:public:messagehub:us-south:a/acc:guid::\"\nkey = \"not-a-key\"\n",
    )
    .unwrap();
    let o = keywatch(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("deployments[0]") && e.contains("key"), "{e}");
}

#[test]
fn garbage_input_never_panics_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.jsonl");
    let mut garbage = Vec::new();
    for line in ["{", "}", "[]", "null", "\"x\"", "{\"action\":null}", "{\"action\":\"kms.secrets.delete\"}", "\u{0}\u{1}", "{\"action\":\"kms.secrets.delete\",\"target\":{\"id\":5},\"eventTime\":\"2026-01-01T00:00:00Z\"}"] {
        garbage.extend_from_slice(line.as_bytes());
        garbage.push(b'\n');
    }
    garbage.extend_from_slice(&[0xff, 0xfe, b'\n']);
    std::fs::write(&path, garbage).unwrap();
    let report = keywatch_json(&["replay", path.to_str().unwrap()]);
    assert_eq!(report["stats"]["events"], 10);
    assert_eq!(report["stats"]["invalid"], 10);
}

#[test]
fn replay_reads_stdin_and_several_files() {
    let case = repo().join("../shared/samples/scenarios/crypto-shred");
    if !case.exists() {
        return;
    }
    let config = case.join("config.toml");
    let events = case.join("events.jsonl");
    let o = keywatch_reading(
        &[
            "replay",
            "--config",
            config.to_str().unwrap(),
            "-",
            events.to_str().unwrap(),
        ],
        std::fs::File::open(&events).unwrap(),
    );
    let report = json_output(&o);
    assert_eq!(report["stats"]["events"], 64);
    assert_eq!(
        report["stats"]["duplicates"], 2,
        "the second copy's applied events are duplicates"
    );
}

/// `DIR/config.toml`: the SQLite store `db`, and the registry of the scenario folder `case`.
fn store_config(dir: &Path, db: &Path, case: Option<&Path>) -> PathBuf {
    let registry = case.map_or(String::new(), |c| {
        std::fs::read_to_string(c.join("config.toml")).unwrap()
    });
    let config = dir.join("config.toml");
    let text = format!("[store]\nurl = \"sqlite://{}\"\n{registry}", db.display());
    std::fs::write(&config, text).unwrap();
    config
}

/// `status` on a store that does not exist yet: what `replay` prints for no events (the
/// registry in its initial state), and the store is not created by looking at it.
#[test]
fn status_of_a_store_not_created_yet_is_the_registry_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("not-yet").join("keywatch.db");
    let case = repo().join("tests/cases/disable-then-enable");
    let config = store_config(dir.path(), &db, Some(&case));
    let status = keywatch_json(&["status", "--config", config.to_str().unwrap()]);
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let now = "2026-08-20T12:00:00Z";
    let replay = keywatch_json(&[
        "replay",
        "--config",
        case.join("config.toml").to_str().unwrap(),
        "--now",
        now,
        empty.to_str().unwrap(),
    ]);
    assert!(!status["deployments"].as_array().unwrap().is_empty());
    assert_eq!(status["deployments"], replay["deployments"]);
    assert_eq!(status["alerts"], replay["alerts"]);
    assert!(
        !db.exists() && !db.parent().unwrap().exists(),
        "status created the store"
    );
}

/// A store that cannot be opened: one line that says why (the cause, not only "cannot connect").
#[test]
fn a_store_that_cannot_be_opened_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keywatch.db");
    std::fs::write(
        &db,
        "this is not a database, it is text long enough to have a header",
    )
    .unwrap();
    let config = store_config(dir.path(), &db, None);
    let o = keywatch(&["status", "--config", config.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("not a database"), "{err}");
}

/// `replay --store` of a file with no event time and no `--now` evaluates no deadline: the wall
/// clock would otherwise decide what is persisted (here: purge a key deleted months ago).
#[test]
fn replay_without_any_event_time_evaluates_no_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let case = repo().join("tests/cases/key-deleted-info-for-soft-deleted-deployment");
    let config = store_config(dir.path(), &dir.path().join("keywatch.db"), Some(&case));
    let config = config.to_str().unwrap();
    let before = keywatch_json(&[
        "replay",
        "--store",
        "--config",
        config,
        case.join("events.jsonl").to_str().unwrap(),
    ]);
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "not json\n").unwrap();
    let after = keywatch_json(&[
        "replay",
        "--store",
        "--config",
        config,
        empty.to_str().unwrap(),
    ]);
    assert_eq!(
        after["keys"], before["keys"],
        "the key state moved with the wall clock"
    );
    assert_eq!(after["alerts"], before["alerts"]);
    assert!(
        before["keys"].to_string().contains("destroyed"),
        "{}",
        before["keys"]
    );
}

/// `status --now T` evaluates the rewrap deadlines at T as `replay --now T` does (a deadline that
/// passed since the last check is `overdue`, with its `rewrap_overdue` alert), and writes nothing:
/// asked again at the earlier time, the store still says `pending`.
#[test]
fn status_evaluates_deadlines_at_now_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let case = repo().join("tests/cases/rewrap-deadline-at-now");
    let config = store_config(dir.path(), &dir.path().join("keywatch.db"), Some(&case));
    let config = config.to_str().unwrap();
    let events = case.join("events.jsonl");
    let early = "2026-08-20T12:00:00Z";
    let late = "2026-08-21T12:00:00Z";
    let o = keywatch(&[
        "replay",
        "--store",
        "--config",
        config,
        "--now",
        early,
        events.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let status = keywatch_json(&["status", "--config", config, "--now", late]);
    let replay = keywatch_json(&[
        "replay",
        "--config",
        case.join("config.toml").to_str().unwrap(),
        "--now",
        late,
        events.to_str().unwrap(),
    ]);
    let rewrap = |r: &serde_json::Value| -> Vec<String> {
        r["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["rewrap"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(rewrap(&status), ["overdue", "overdue"]);
    assert_eq!(status["deployments"], replay["deployments"]);
    assert_eq!(status["alerts"], replay["alerts"]);
    let again = keywatch_json(&["status", "--config", config, "--now", early]);
    assert_eq!(
        rewrap(&again),
        ["pending", "pending"],
        "status wrote its evaluation"
    );
    assert!(!again["alerts"].to_string().contains("rewrap_overdue"));
}

/// `explain -` reads the event from standard input and lists the key's own transition besides the
/// deployments' (`kms.secrets.disable`: key `active` -> `suspended`, disk `unlocked` -> `locked`).
#[test]
fn explain_reads_stdin_and_names_the_key_transition() {
    let dir = tempfile::tempdir().unwrap();
    let case = repo().join("tests/cases/disable-then-enable");
    let events = std::fs::read_to_string(case.join("events.jsonl")).unwrap();
    let disable = events.lines().next().unwrap();
    assert!(disable.contains("kms.secrets.disable"), "{disable}");
    let event = dir.path().join("disable.json");
    std::fs::write(&event, disable).unwrap();
    let o = keywatch_reading(
        &[
            "explain",
            "--config",
            case.join("config.toml").to_str().unwrap(),
            "-",
        ],
        std::fs::File::open(&event).unwrap(),
    );
    let out = json_output(&o);
    assert_eq!(out["result"], "applied");
    let keys = out["key_transitions"].as_array().expect("key_transitions");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["from"], "active");
    assert_eq!(keys[0]["to"], "suspended");
    assert!(keys[0]["key"].as_str().unwrap().contains(":key:"));
    let disk: Vec<_> = out["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["field"] == "disk")
        .collect();
    assert!(!disk.is_empty(), "{out}");
    assert!(disk.iter().all(|t| t["to"] == "locked"), "{out}");
}
