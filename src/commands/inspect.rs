//! `check-config`, `explain` and `blast-radius`: questions about the configuration and one event.

use super::replay::open_input;
use super::{emit, load_settings};
use crate::cli::Failure;
use crate::engine::view::DeploymentView;
use crate::engine::{Disposition, Engine};
use crate::setup;
use crate::timefmt::Millis;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::Path;

/// The engine `explain` and `blast-radius` answer from: the persisted state when the configured
/// store already exists (a SQLite file that is there, or a reachable PostgreSQL), otherwise the
/// configured registry in its initial state. The store is only read.
fn engine_for(config: Option<&Path>) -> Result<Engine, Failure> {
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "warn");
    let mut engine = match persisted_engine(&settings) {
        Some(engine) => engine,
        None => setup::fresh_engine(&settings)
            .map_err(|e| Failure::invalid(format!("registry error: {e}")))?,
    };
    engine.take_alerts();
    engine.clear_changes();
    Ok(engine)
}

fn persisted_engine(settings: &crate::settings::Settings) -> Option<Engine> {
    let url = &settings.store.url;
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if !Path::new(path).exists() {
            return None;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let connect = crate::store::Store::connect(url);
        let store = match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
            Ok(Ok(store)) => store,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "store not readable; answering from the configured registry");
                return None;
            }
            Err(_) => {
                tracing::warn!("store did not answer in 5 s; answering from the configured registry");
                return None;
            }
        };
        let loaded = crate::service::persist::load(&store, settings).await.ok()?;
        let mut engine = loaded.engine;
        crate::service::persist::register_configured(&mut engine, settings).ok()?;
        store.close().await;
        Some(engine)
    })
}

pub fn check_config(config: Option<&Path>) -> Result<(), Failure> {
    let settings = load_settings(config)?;
    let (deployments, policies) =
        setup::registry(&settings).map_err(|e| Failure::invalid(format!("registry error: {e}")))?;
    let mut engine = Engine::new(setup::lifecycle(&settings));
    engine.register(deployments.clone());
    let keys = engine.keys().len();
    let shared: Vec<String> = engine
        .keys()
        .iter()
        .filter(|(id, _)| engine.deployments_on_key(id).len() >= 2)
        .map(|(_, k)| {
            format!(
                "{} ({} deployments)",
                k.crn,
                engine
                    .deployments_on_key(&engine.find_key(&k.crn).unwrap_or_default())
                    .len()
            )
        })
        .collect();
    emit(&settings.summary());
    emit(&format!(
        "registry: {} deployments on {} keys, {} known authorizations",
        deployments.len(),
        keys,
        policies.len()
    ));
    for s in &shared {
        emit(&format!("  shared key: {s}"));
    }
    emit("configuration ok");
    Ok(())
}

pub fn blast_radius(config: Option<&Path>, key: &str) -> Result<(), Failure> {
    let engine = engine_for(config)?;
    let now = Millis::now();
    let Some(id) = engine.find_key(key) else {
        return Err(Failure::invalid(format!(
            "blast-radius: no registered deployment uses key {key:?}"
        )));
    };
    let view = engine.key_view(&id).expect("known key");
    let deployments: Vec<DeploymentView> = view
        .deployments
        .iter()
        .filter_map(|c| engine.deployment_view(c, now))
        .collect();
    let out = json!({ "key": view.crn, "state": view.state, "deployments": deployments });
    emit(&serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

pub fn explain(config: Option<&Path>, file: &Path) -> Result<(), Failure> {
    let mut engine = engine_for(config)?;
    // `-` is standard input, as for `replay` (whose input opener this is).
    let mut raw = Vec::new();
    open_input(&file.to_string_lossy())
        .and_then(|(mut input, _)| input.read_to_end(&mut raw))
        .map_err(|e| Failure::invalid(format!("explain: cannot read {}: {e}", file.display())))?;
    let record = match serde_json::from_slice::<Value>(&raw) {
        Ok(v) => serde_json::to_vec(&v).unwrap_or(raw),
        Err(_) => {
            let lines: Vec<&[u8]> = raw
                .split(|b| *b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .collect();
            if lines.len() > 1 {
                return Err(Failure::invalid(format!(
                    "explain: {} holds {} lines that are not one JSON value; explain takes one event",
                    file.display(),
                    lines.len()
                )));
            }
            raw
        }
    };
    let before = views(&engine);
    let keys_before = key_states(&engine);
    let timelines: BTreeMap<String, usize> = engine
        .deployments()
        .iter()
        .map(|(c, d)| (c.clone(), d.timeline.len()))
        .collect();
    let disposition = engine.ingest(&record);
    let now = engine.latest_event_time().unwrap_or_else(Millis::now);
    let alerts = engine.take_alerts();
    let after = views(&engine);
    let mut touched = BTreeSet::new();
    let mut transitions = Vec::new();
    for (crn, a) in &after {
        if timelines.get(crn).copied().unwrap_or(0) != engine.deployments()[crn].timeline.len() {
            touched.insert(crn.clone());
        }
        if let Some(b) = before.get(crn) {
            let (bv, av) = (
                serde_json::to_value(b).unwrap_or_default(),
                serde_json::to_value(a).unwrap_or_default(),
            );
            for field in [
                "lifecycle",
                "disk",
                "rewrap",
                "authorization",
                "key_version",
                "restorable_until",
                "rewrap_deadline_at",
                "deletion_authorized_until",
                "purge_at",
            ] {
                if bv[field] != av[field] {
                    touched.insert(crn.clone());
                    transitions.push(json!({ "deployment": crn, "field": field, "from": bv[field], "to": av[field] }));
                }
            }
        }
    }
    for a in &alerts {
        touched.insert(a.deployment.clone());
    }
    // The key's own state (`active` -> `suspended`, ...), which the deployments' `disk` follows.
    let key_transitions: Vec<Value> = key_states(&engine)
        .into_iter()
        .filter_map(|(crn, to)| {
            let from = keys_before.get(&crn)?;
            (*from != to).then(|| json!({ "key": crn, "field": "state", "from": from, "to": to }))
        })
        .collect();
    let (result, reason) = match &disposition {
        Disposition::Applied => ("applied", None),
        Disposition::Ignored => ("ignored", None),
        Disposition::Duplicate => ("duplicate", None),
        Disposition::Invalid(r) => ("invalid", Some(r.to_string())),
    };
    let action = serde_json::from_slice::<Value>(&record)
        .ok()
        .and_then(|v| v.get("action").cloned());
    let out = json!({
        "action": action,
        "result": result,
        "reason": reason,
        "relevant": disposition == Disposition::Applied,
        "evaluated_at": now,
        "deployments": touched,
        "transitions": transitions,
        "key_transitions": key_transitions,
        "alerts": alerts.iter().map(|a| json!({
            "kind": a.kind, "severity": a.severity, "deployment": a.deployment, "key": a.key,
            "event_time": a.event_time, "correlation_id": a.correlation_id, "summary": a.summary,
        })).collect::<Vec<_>>(),
    });
    emit(&serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

/// The state of every key that protects a registered deployment, by key CRN.
fn key_states(engine: &Engine) -> BTreeMap<String, Value> {
    engine
        .keys()
        .keys()
        .filter_map(|k| engine.key_view(k))
        .map(|v| (v.crn, serde_json::to_value(v.state).unwrap_or_default()))
        .collect()
}

fn views(engine: &Engine) -> BTreeMap<String, DeploymentView> {
    let now = engine.latest_event_time().unwrap_or(Millis(0));
    engine
        .deployments()
        .keys()
        .filter_map(|c| engine.deployment_view(c, now).map(|v| (c.clone(), v)))
        .collect()
}
