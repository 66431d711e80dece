//! Data-driven engine tests: every folder under tests/cases (and the shared public scenarios, when
//! they are beside the checkout) is events in, expected report out. Adding a case is adding a folder.

use crate::support::{check_scenario, repo};
use std::path::PathBuf;

fn folders(dir: PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("expect.json").exists())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn run_all(dir: PathBuf, required: bool) {
    let cases = folders(dir.clone());
    if required {
        assert!(!cases.is_empty(), "no cases found in {}", dir.display());
    }
    let mut failed = Vec::new();
    for case in &cases {
        let problems = check_scenario(case);
        if !problems.is_empty() {
            failed.push(format!(
                "{}:\n    {}",
                case.display(),
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

#[test]
fn own_cases() {
    run_all(repo().join("tests/cases"), true);
}

#[test]
fn shared_public_scenarios() {
    let dir = repo().join("../shared/samples/scenarios");
    if dir.exists() {
        run_all(dir, true);
    } else {
        eprintln!("shared scenarios not found beside the checkout; .ci/run checks them with check-scenarios");
    }
}
