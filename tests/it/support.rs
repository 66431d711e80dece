//! Shared helpers: run the engine over a scenario folder in-process, and compare reports.

use keywatch::commands::replay::replay;
use keywatch::settings::Settings;
use keywatch::setup;
use keywatch::timefmt::Millis;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Replays `events` with the configuration `config` and returns the report as JSON.
pub fn replay_report(config: &Path, events: &[&Path], now: Option<Millis>) -> Value {
    let settings = Settings::load_with_env(Some(config), &[])
        .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    let mut engine =
        setup::fresh_engine(&settings).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    let mut out = Vec::new();
    let inputs: Vec<String> = events.iter().map(|p| p.display().to_string()).collect();
    replay(&mut engine, &inputs, now, &mut out, false).expect("replay");
    serde_json::from_slice(&out).expect("the report is JSON")
}

fn same(want: &Value, got: &Value) -> bool {
    if let (Some(w), Some(g)) = (want.as_str(), got.as_str()) {
        if let (Some(a), Some(b)) = (Millis::parse(w), Millis::parse(g)) {
            return a == b;
        }
    }
    want == got
}

/// Compares a report with a scenario's expect.json exactly as `check-scenarios` does.
pub fn differences(expect: &Value, report: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let deployments: BTreeMap<String, &Value> = report["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| (d["crn"].as_str().unwrap_or_default().to_owned(), d))
        .collect();
    for (crn, fields) in expect["deployments"]
        .as_object()
        .expect("expect.deployments")
    {
        let Some(got) = deployments.get(crn) else {
            problems.push(format!("deployment missing from report: {crn}"));
            continue;
        };
        for (k, v) in fields.as_object().expect("fields") {
            if !same(v, &got[k]) {
                problems.push(format!("{}: {k} = {}, expected {v}", got["name"], got[k]));
            }
        }
    }
    if let Some(want) = expect.get("alerts").and_then(Value::as_array) {
        let key = |a: &Value| format!("{} [{}] {}", a["kind"], a["severity"], a["deployment"]);
        let mut want: Vec<String> = want.iter().map(key).collect();
        let mut got: Vec<String> = report["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(key)
            .collect();
        want.sort();
        got.sort();
        if want != got {
            problems.push(format!(
                "alerts differ:\n  expected {want:#?}\n  got {got:#?}"
            ));
        }
    }
    if let Some(stats) = expect.get("stats").and_then(Value::as_object) {
        for (k, v) in stats {
            if report["stats"][k] != *v {
                problems.push(format!("stats.{k} = {}, expected {v}", report["stats"][k]));
            }
        }
    }
    problems
}

/// Runs one scenario folder (config.toml, events.jsonl, expect.json); returns its differences.
pub fn check_scenario(folder: &Path) -> Vec<String> {
    let expect: Value = serde_json::from_str(
        &std::fs::read_to_string(folder.join("expect.json")).expect("expect.json"),
    )
    .expect("expect.json is JSON");
    let now = expect
        .get("now")
        .and_then(Value::as_str)
        .map(|t| Millis::parse(t).expect("now parses"));
    let report = replay_report(
        &folder.join("config.toml"),
        &[&folder.join("events.jsonl")],
        now,
    );
    differences(&expect, &report)
}
