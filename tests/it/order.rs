//! Order independence (spec section 3): any permutation of a set of state-setting events ends in
//! the same deployment and key state. Anonymous (counted) acknowledgements are left out: counting
//! is order-dependent by definition.

use keywatch::engine::Engine;
use keywatch::settings::Settings;
use keywatch::setup;
use keywatch::timefmt::Millis;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::OnceLock;

const ACCOUNT: &str = "f047b55a3362ac06afad8a3f2f5586ea";
const K1: &str =
    "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:inst-1:key:key-1";
const K2: &str =
    "crn:v1:bluemix:public:hs-crypto:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:inst-2:key:key-2";
const D1: &str =
    "crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:dep-1::";
const D2: &str =
    "crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:dep-2::";
const D3: &str = "crn:v1:bluemix:public:databases-for-postgresql:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:dep-3::";
const VOL2: &str =
    "crn:v1:bluemix:public:is:us-south-1:a/f047b55a3362ac06afad8a3f2f5586ea::volume:vol-2";

fn config() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        let toml = format!(
            r#"
[[deployments]]
crn = "{D1}"
name = "d1"
key = "{K1}"
[[deployments]]
crn = "{D2}"
name = "d2"
key = "{K1}"
resources = ["{VOL2}"]
[[deployments]]
crn = "{D3}"
name = "d3"
key = "{K2}"
"#
        );
        std::fs::write(&path, toml).expect("write config");
        Settings::load_with_env(Some(&path), &[]).expect("config loads")
    })
}

fn at(minutes: i64) -> String {
    Millis(1_787_234_400_000 + minutes * 60_000).to_string()
}

fn key_event(action: &str, key: &str, minute: i64, outcome: &str, extra: Value) -> String {
    let mut e = json!({
        "eventTime": at(minute), "action": action, "outcome": outcome,
        "correlationId": format!("corr-{action}-{minute}"),
        "initiator": {"id": "IBMid-1", "name": "ops@example.com"},
        "target": {"id": key, "typeURI": "kms/secrets"},
        "reason": {"reasonCode": 200},
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            e[k] = v;
        }
    }
    e.to_string()
}

fn policy_create(
    id: &str,
    source: &str,
    target: &str,
    instance: &str,
    minute: i64,
    as_strings: bool,
) -> String {
    let body = json!({"type": "authorization",
        "subjects": [{"attributes": [{"name": "accountId", "value": ACCOUNT}, {"name": "serviceName", "value": source}]}],
        "roles": [{"role_id": "crn:v1:bluemix:public:iam::::serviceRole:Reader"}],
        "resources": [{"attributes": [{"name": "accountId", "value": ACCOUNT}, {"name": "serviceName", "value": target},
                                      {"name": "serviceInstance", "value": instance}]}]});
    let response = json!({"id": id}).to_string();
    let request = if as_strings {
        json!(json!({"body": body}).to_string())
    } else {
        json!({"body": body})
    };
    json!({"eventTime": at(minute), "action": "iam-am.policy.create", "outcome": "success",
        "correlationId": format!("pc-{id}"),
        "target": {"id": format!("crn:v1:bluemix:public:iam-am::a/{ACCOUNT}::policy:{id}")},
        "requestData": request, "responseData": {"response_body": response}})
    .to_string()
}

fn policy_delete(id: &str, minute: i64) -> String {
    json!({"eventTime": at(minute), "action": "iam-am.policy.delete", "outcome": "success",
        "correlationId": format!("pd-{id}"),
        "target": {"id": format!("crn:v1:bluemix:public:iam-am::a/{ACCOUNT}::policy:{id}")}})
    .to_string()
}

fn pool() -> Vec<String> {
    let rot = |key: &str, minute: i64, corr: &str| {
        key_event(
            &format!(
                "{}.secrets.rotate",
                if key == K2 { "hs-crypto" } else { "kms" }
            ),
            key,
            minute,
            "success",
            json!({"correlationId": corr}),
        )
    };
    vec![
        key_event("kms.secrets.disable", K1, 10, "success", json!({})),
        key_event("kms.secrets.enable", K1, 20, "success", json!({})),
        key_event("kms.secrets.disable", K1, 20, "success", json!({"correlationId": "same-time"})),
        key_event("kms.secrets.delete", K1, 30, "success", json!({"responseData": {"keyState": 5}})),
        key_event("kms.secrets.restore", K1, 40, "success", json!({})),
        key_event("hs-crypto.secrets.expire", K2, 15, "success", json!({})),
        key_event("hs-crypto.secrets.purge", K2, 50, "success", json!({})),
        key_event("kms.secrets.setkeyfordeletion", K1, 22, "success", json!({})),
        key_event("kms.secrets.unsetkeyfordeletion", K1, 23, "success", json!({})),
        rot(K1, 12, "R1"),
        key_event("kms.secrets.ack-rotate", K1, 14, "success",
            json!({"correlationId": "R1", "responseData": {"resourceCRN": D1, "eventAckData": {"newKeyVersionId": "v2", "eventType": "rotation"}}})),
        key_event("kms.secrets.ack-rotate", K1, 16, "failure",
            json!({"correlationId": "R1", "reason": {"reasonCode": 408}, "responseData": {"resourceCRN": VOL2}})),
        json!({"eventTime": at(13), "action": "messagehub.instance.update", "outcome": "success", "correlationId": "R1",
            "target": {"id": D2}})
        .to_string(),
        rot(K2, 25, "R2"),
        key_event("hs-crypto.secrets.ack-rotate", K2, 27, "failure",
            json!({"correlationId": "R2", "reason": {"reasonCode": 409}, "responseData": {"eventAckData": {"resourceCRN": D3}}})),
        rot(K1, 60, "R3"),
        policy_create("P1", "messagehub", "kms", "inst-1", 5, false),
        policy_delete("P1", 35),
        policy_create("P2", "server-protect", "hs-crypto", "inst-2", 36, true),
        policy_delete("P2", 37),
        policy_create("P3", "messagehub", "kms", "inst-1", 38, true),
        json!({"eventTime": at(45), "action": "messagehub.instance.delete", "outcome": "success", "target": {"id": D1}})
            .to_string(),
        // A later named ack with a newer version: `key_version` is the newer one in any order.
        key_event("kms.secrets.ack-rotate", K1, 70, "success",
            json!({"correlationId": "R3", "responseData": {"resourceCRN": D1, "eventAckData": {"newKeyVersionId": "v3", "eventType": "rotation"}}})),
        // A follow-up of R3: confirms D2 as of its time (R1 and its 408 included), in any order.
        json!({"eventTime": at(66), "action": "is.volume.update", "outcome": "success", "correlationId": "R3",
            "target": {"id": VOL2}})
        .to_string(),
    ]
}

fn final_state(events: &[String]) -> Value {
    let mut engine: Engine = setup::fresh_engine(config()).expect("registry");
    for e in events {
        engine.ingest(e.as_bytes());
    }
    let now = Millis(1_787_234_400_000 + 24 * 3600 * 1000);
    engine.tick(now);
    let report = engine.state_report(now);
    json!({ "deployments": report.deployments, "keys": report.keys })
}

#[test]
fn every_pool_event_is_applied() {
    let mut engine: Engine = setup::fresh_engine(config()).expect("registry");
    for e in pool() {
        let d = engine.ingest(e.as_bytes());
        assert!(
            matches!(d, keywatch::engine::Disposition::Applied),
            "{d:?} for {e}"
        );
    }
}

/// A replay without a store turns change tracking off: same state, but nothing is collected for a
/// store (the collection grew with every applied event and remembered correlation).
#[test]
fn without_change_tracking_the_state_is_the_same_and_nothing_is_collected() {
    let mut tracked: Engine = setup::fresh_engine(config()).expect("registry");
    let mut untracked: Engine = setup::fresh_engine(config()).expect("registry");
    tracked.take_changes();
    untracked.set_change_tracking(false);
    for e in pool() {
        tracked.ingest(e.as_bytes());
        untracked.ingest(e.as_bytes());
    }
    assert!(tracked.take_changes().len() > 10);
    assert_eq!(untracked.take_changes().len(), 0);
    let now = Millis(1_787_234_400_000 + 24 * 3600 * 1000);
    let state = |e: &mut Engine| {
        e.tick(now);
        let r = e.state_report(now);
        json!({ "deployments": r.deployments, "keys": r.keys, "stats": r.stats })
    };
    assert_eq!(state(&mut tracked), state(&mut untracked));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn any_order_gives_the_same_state(
        (chosen, shuffled) in prop::sample::subsequence(pool(), 1..=22)
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle()))
    ) {
        let a = final_state(&chosen);
        let b = final_state(&shuffled);
        prop_assert_eq!(a, b);
    }
}

/// A correlation id a deployment remembers is persisted in the write's `journal` entity, not by
/// rewriting the deployment's document; an engine loaded from the persisted entities in any order
/// (the journal before its deployment here) confirms the rotation exactly as the original does,
/// and knows the events applied before (a second copy is a duplicate).
#[test]
fn remembered_correlations_are_journaled_and_reload_in_any_order() {
    use keywatch::engine::{Change, Disposition, EntityKind};
    let mut engine: Engine = setup::fresh_engine(config()).expect("registry");
    let mut persisted: Vec<Change> = engine.take_changes();
    let follow_up =
        json!({"eventTime": at(5), "action": "messagehub.instance.update", "outcome": "success",
        "correlationId": "early-R9", "target": {"id": D1}})
        .to_string();
    assert!(matches!(
        engine.ingest(follow_up.as_bytes()),
        Disposition::Ignored
    ));
    let disable = key_event("kms.secrets.disable", K2, 6, "success", json!({}));
    assert!(matches!(
        engine.ingest(disable.as_bytes()),
        Disposition::Applied
    ));
    persisted.extend(engine.take_changes());
    let changes = engine.take_changes();
    assert!(changes.is_empty(), "taken twice: {changes:?}");
    let journals: Vec<Value> = persisted
        .iter()
        .filter(|c| c.kind == EntityKind::Journal)
        .map(|c| serde_json::from_str(&c.doc).expect("JSON"))
        .collect();
    assert_eq!(journals.len(), 1, "one journal per write: {journals:?}");
    assert_eq!(
        journals[0]["correlations"][0]["correlation"], "early-R9",
        "{journals:?}"
    );
    assert_eq!(journals[0]["correlations"][0]["deployment"], D1);
    assert_eq!(journals[0]["events"].as_array().map(Vec::len), Some(1));
    assert!(
        !persisted
            .iter()
            .any(|c| c.kind == EntityKind::Deployment && c.doc.contains("early-R9")),
        "remembering a correlation wrote it into a deployment document"
    );

    // As a store holds them: the last document per entity, loaded here in reverse key order.
    let stored: std::collections::BTreeMap<(EntityKind, &str), &str> = persisted
        .iter()
        .map(|c| ((c.kind, c.id.as_str()), c.doc.as_str()))
        .collect();
    let mut reloaded = Engine::new(*engine.lifecycle());
    for ((kind, id), doc) in stored.iter().rev() {
        let doc: Value = serde_json::from_str(doc).expect("JSON document");
        reloaded.load_entity(*kind, id, doc).expect("loads");
    }
    reloaded.finish_loading();
    assert!(matches!(
        reloaded.ingest(disable.as_bytes()),
        Disposition::Duplicate
    ));

    let rotation = key_event(
        "kms.secrets.rotate",
        K1,
        10,
        "success",
        json!({"correlationId": "early-R9"}),
    );
    for e in [&mut engine, &mut reloaded] {
        assert!(matches!(
            e.ingest(rotation.as_bytes()),
            Disposition::Applied
        ));
    }
    let now = Millis(1_787_234_400_000 + 3600 * 1000);
    let state = |e: &mut Engine| {
        e.tick(now);
        let r = e.state_report(now);
        json!({ "deployments": r.deployments, "keys": r.keys })
    };
    let (a, b) = (state(&mut engine), state(&mut reloaded));
    assert_eq!(a, b);
    let d1 = a["deployments"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["crn"] == D1))
        .expect("d1 in the report");
    assert_eq!(
        d1["rewrap"], "current",
        "the early follow-up confirmed the rotation: {d1}"
    );
    let d2 = a["deployments"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["crn"] == D2))
        .expect("d2 in the report");
    assert_eq!(d2["rewrap"], "pending", "{d2}");
}

/// A deployment's timeline is persisted one `timeline` row per entry, in 50 slots that new entries
/// overwrite, never inside the deployment's document (which every state change rewrites). An
/// engine loaded from the rows in any order has the same timeline; a document written before
/// timeline rows existed (timeline inside) is read, and converted to rows at the next write.
#[test]
fn timeline_entries_are_rows_of_their_own_and_reload_in_any_order() {
    use keywatch::engine::{Change, EntityKind};
    use std::collections::BTreeMap;
    let mut engine: Engine = setup::fresh_engine(config()).expect("registry");
    let mut store: BTreeMap<(EntityKind, String), String> = BTreeMap::new();
    let mut persist = |changes: Vec<Change>| {
        for c in changes {
            store.insert((c.kind, c.id), c.doc);
        }
    };
    persist(engine.take_changes());
    // 120 state changes of K1, in batches of 7: more than twice the 50 entries a timeline keeps.
    for i in 0..120 {
        let action = if i % 2 == 0 { "disable" } else { "enable" };
        let e = key_event(
            &format!("kms.secrets.{action}"),
            K1,
            100 + i,
            "success",
            json!({}),
        );
        engine.ingest(e.as_bytes());
        if i % 7 == 6 {
            persist(engine.take_changes());
        }
    }
    persist(engine.take_changes());
    let d1 = &engine.deployments()[D1];
    assert_eq!(d1.timeline.len(), 50);
    assert_eq!(d1.timeline_next, 120);

    let rows: Vec<(&(EntityKind, String), &String)> = store
        .iter()
        .filter(|((k, id), _)| *k == EntityKind::Timeline && id.contains(D1))
        .collect();
    assert_eq!(rows.len(), 50, "one row per slot");
    let doc: Value =
        serde_json::from_str(&store[&(EntityKind::Deployment, D1.to_owned())]).unwrap();
    assert!(
        doc.get("timeline").is_none(),
        "the document carries no timeline: {doc}"
    );

    let mut reloaded = Engine::new(*engine.lifecycle());
    for ((kind, id), doc) in store.iter().rev() {
        let doc: Value = serde_json::from_str(doc).expect("JSON document");
        reloaded.load_entity(*kind, id, doc).expect("loads");
    }
    reloaded.finish_loading();
    for crn in [D1, D2, D3] {
        assert_eq!(
            reloaded.deployments()[crn].timeline,
            engine.deployments()[crn].timeline,
            "{crn}"
        );
        assert_eq!(
            reloaded.deployments()[crn].timeline_next,
            engine.deployments()[crn].timeline_next
        );
    }

    // A document from before timeline rows: the timeline inside it, no rows.
    let mut legacy = doc.clone();
    legacy["timeline"] = json!(engine.deployments()[D1].timeline);
    let mut old = Engine::new(*engine.lifecycle());
    old.load_entity(EntityKind::Deployment, D1, legacy)
        .expect("loads");
    old.finish_loading();
    old.clear_changes();
    assert_eq!(
        json!(old.deployments()[D1].timeline),
        json!(engine.deployments()[D1].timeline)
    );
    old.convert_loaded_timelines();
    let changes = old.take_changes();
    let timeline_rows = changes
        .iter()
        .filter(|c| c.kind == EntityKind::Timeline)
        .count();
    assert_eq!(timeline_rows, 50);
    let rewritten = changes
        .iter()
        .find(|c| c.kind == EntityKind::Deployment)
        .expect("the document is rewritten");
    assert!(!rewritten.doc.contains("\"timeline\""), "{}", rewritten.doc);
}
