//! The correlation engine: a deterministic state machine with no IO, no clock and no wire format.
//!
//! Inputs are raw Activity Tracker records (`ingest`), registry changes (`register`,
//! `soft_delete`) and the current time (`tick`). Outputs are plain values: alerts (`take_alerts`)
//! and the entities whose persisted form changed (`take_changes`). `replay`, `run` and the tests
//! all drive this one engine.
//!
//! Order independence: every piece of deployment and key state is either a last-writer-wins
//! register ordered by `(eventTime, digest)` or derived from sets of remembered facts (rotations,
//! confirmations, failures), so the same events in any order end in the same state.

pub mod model;
mod policy;
pub mod view;

use crate::crn::{resource_identity, Crn, KeyCrn, KeyIdentity};
use crate::event::{
    self, ack_of_event_type, classify_action, str_at, AckOf, ActionClass, ActionField, Event,
    EventDigest, InvalidReason, KeyAction, Outcome,
};
use crate::timefmt::Millis;
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
pub use model::*;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const TIMELINE_LIMIT: usize = 50;
const CORRELATION_MEMORY: usize = 256;
const ROTATION_MEMORY: usize = 64;
const FAILURE_MEMORY: usize = 32;

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Applied,
    Ignored,
    Duplicate,
    Invalid(InvalidReason),
}

/// The persisted entity kinds (the store keeps each as a JSON document).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntityKind {
    Key,
    Deployment,
    Policy,
    Event,
    Stats,
    /// A correlation id a deployment confirmed (one small row each, so that remembering one does
    /// not rewrite the deployment's document).
    Correlation,
    /// One entry of a deployment's timeline, in one of its 50 slots (id `["<deployment>", slot]`).
    Timeline,
    /// What one write remembered that needs no entity of its own: the digests of the events it
    /// applied and the correlation ids deployments confirmed (id: a digest of the document). One
    /// row per transaction instead of one per fact: processed-event markers and correlations
    /// were half of the rows a batch wrote, each in a random place of the table.
    Journal,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Key => "key",
            EntityKind::Deployment => "deployment",
            EntityKind::Policy => "policy",
            EntityKind::Event => "event",
            EntityKind::Stats => "stats",
            EntityKind::Correlation => "correlation",
            EntityKind::Timeline => "timeline",
            EntityKind::Journal => "journal",
        }
    }

    pub fn parse(s: &str) -> Option<EntityKind> {
        [
            EntityKind::Key,
            EntityKind::Deployment,
            EntityKind::Policy,
            EntityKind::Event,
            EntityKind::Stats,
            EntityKind::Correlation,
            EntityKind::Timeline,
            EntityKind::Journal,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A changed entity, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: EntityKind,
    pub id: String,
    /// The JSON document, serialized straight from the record (no `Value` tree in between).
    pub doc: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{origin}: crn: {reason}")]
    BadCrn { origin: String, reason: String },
    #[error("{origin}: key: {reason}")]
    BadKey { origin: String, reason: String },
    #[error("{origin}: resources[{index}]: {reason}")]
    BadResource {
        origin: String,
        index: usize,
        reason: String,
    },
    #[error("{origin}: owners[{index}]: {value:?} is not an e-mail address")]
    BadOwner {
        origin: String,
        index: usize,
        value: String,
    },
    #[error("{origin}: deployment {crn} is registered twice (first at {first})")]
    Duplicate {
        origin: String,
        crn: String,
        first: String,
    },
    #[error("{origin}: resource {resource} is already a resource of {other}")]
    SharedResource {
        origin: String,
        resource: String,
        other: String,
    },
    #[error("{origin}: {reason}")]
    BadPolicy { origin: String, reason: String },
}

/// A deployment specification that passed validation.
#[derive(Debug, Clone)]
pub struct ValidDeployment {
    pub spec: DeploymentSpec,
    key: KeyCrn,
}

/// Checks one registry entry: its CRN, its key CRN, its resources and owners.
pub fn validate_deployment(
    spec: DeploymentSpec,
    origin: &str,
) -> Result<ValidDeployment, RegistryError> {
    let mut spec = spec;
    spec.crn = spec.crn.trim().to_owned();
    spec.key = spec.key.trim().to_owned();
    Crn::parse(&spec.crn).map_err(|e| RegistryError::BadCrn {
        origin: origin.into(),
        reason: e.to_string(),
    })?;
    let key = KeyCrn::parse(&spec.key).map_err(|e| RegistryError::BadKey {
        origin: origin.into(),
        reason: e.to_string(),
    })?;
    for (index, r) in spec.resources.iter_mut().enumerate() {
        *r = r.trim().to_owned();
        Crn::parse(r).map_err(|e| RegistryError::BadResource {
            origin: origin.into(),
            index,
            reason: e.to_string(),
        })?;
    }
    for (index, o) in spec.owners.iter().enumerate() {
        let o = o.trim();
        if !o.contains('@')
            || o.starts_with('@')
            || o.ends_with('@')
            || o.contains(char::is_whitespace)
        {
            return Err(RegistryError::BadOwner {
                origin: origin.into(),
                index,
                value: o.to_owned(),
            });
        }
    }
    if spec.name.trim().is_empty() {
        spec.name = spec.crn.clone();
    }
    Ok(ValidDeployment { spec, key })
}

/// Validates a whole registry (unique CRNs, resources owned once).
pub fn validate_registry(
    entries: Vec<(DeploymentSpec, String)>,
) -> Result<Vec<ValidDeployment>, RegistryError> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut owners_of_resources: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (spec, origin) in entries {
        let valid = validate_deployment(spec, &origin)?;
        let id = resource_identity(&valid.spec.crn).unwrap_or_else(|| valid.spec.crn.clone());
        if let Some(first) = seen.insert(id, origin.clone()) {
            return Err(RegistryError::Duplicate {
                origin,
                crn: valid.spec.crn.clone(),
                first,
            });
        }
        for r in &valid.spec.resources {
            let rid = resource_identity(r).unwrap_or_else(|| r.clone());
            if let Some(other) = owners_of_resources.insert(rid, valid.spec.crn.clone()) {
                if other != valid.spec.crn {
                    return Err(RegistryError::SharedResource {
                        origin,
                        resource: r.clone(),
                        other,
                    });
                }
            }
        }
        out.push(valid);
    }
    Ok(out)
}

/// What the engine derives once per deployment from its registration (rebuilt with the indexes).
#[derive(Debug, Clone)]
struct DeploymentIndex {
    key: Option<KeyCrn>,
    /// The key entity id; empty when the key CRN does not parse (never for a validated deployment).
    key_entity: String,
    /// The deployment CRN's service name, lower case.
    service: String,
}

/// The entities changed since the last [`Engine::take_changes`]. A replay without a store turns
/// tracking off: nobody takes the changes there, and the set would grow with the input.
#[derive(Debug, Clone, Default)]
struct Dirty {
    set: BTreeSet<(EntityKind, String)>,
    /// Facts for the next `journal` entity.
    journal: JournalDoc,
    off: bool,
}

/// The document of a `journal` entity (see [`EntityKind::Journal`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct JournalDoc {
    /// Digests of applied events (hex).
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    correlations: Vec<CorrelationDoc>,
}

impl Dirty {
    fn processed(&mut self, digest: &EventDigest) {
        if !self.off {
            self.journal.events.push(digest.hex());
        }
    }

    fn correlation(&mut self, dep: &str, corr: &str, time: Millis) {
        if !self.off {
            self.journal.correlations.push(CorrelationDoc {
                deployment: dep.to_owned(),
                correlation: corr.to_owned(),
                time,
            });
        }
    }

    fn mark(&mut self, kind: EntityKind, id: impl AsRef<str>) {
        if !self.off {
            self.set.insert((kind, id.as_ref().to_owned()));
        }
    }

    /// `mark` for ids that cost something to build.
    fn mark_with(&mut self, kind: EntityKind, id: impl FnOnce() -> String) {
        if !self.off {
            self.set.insert((kind, id()));
        }
    }
}

/// The engine. See the module documentation.
#[derive(Debug, Clone)]
pub struct Engine {
    lifecycle: Lifecycle,
    keys: BTreeMap<String, KeyRecord>,
    deployments: BTreeMap<String, DeploymentRecord>,
    policies: BTreeMap<String, PolicyRecord>,
    seen: HashSet<EventDigest>,
    stats: Stats,
    key_by_identity: HashMap<KeyIdentity, String>,
    keys_by_id: HashMap<String, Vec<String>>,
    deployments_by_key: HashMap<String, Vec<String>>,
    deployment_by_target: HashMap<String, String>,
    /// Per deployment: its parsed key CRN, its key entity id and its service name, so that hot
    /// paths (policy coverage, deadlines) do not parse CRNs again.
    deployment_index: HashMap<String, DeploymentIndex>,
    /// Loaded correlation rows whose deployment was not loaded yet.
    pending_correlations: Vec<CorrelationDoc>,
    /// Whether loading remembers processed-event digests (not for an engine that only answers
    /// questions about state, such as the delivery worker's).
    load_processed: bool,
    /// Loaded timeline rows, placed by `finish_loading`.
    pending_timeline: Vec<TimelineRow>,
    /// Deployments whose timeline was read from their document (written before timeline rows
    /// existed), to be written as rows (see [`Engine::convert_loaded_timelines`]).
    legacy_timelines: Vec<String>,
    alerts: Vec<Alert>,
    dirty: Dirty,
    lower_buf: String,
    latest_event_time: Option<Millis>,
    stats_dirty: bool,
}

impl Engine {
    pub fn new(lifecycle: Lifecycle) -> Engine {
        Engine {
            lifecycle,
            keys: BTreeMap::new(),
            deployments: BTreeMap::new(),
            policies: BTreeMap::new(),
            seen: HashSet::new(),
            stats: Stats::default(),
            key_by_identity: HashMap::new(),
            keys_by_id: HashMap::new(),
            deployments_by_key: HashMap::new(),
            deployment_by_target: HashMap::new(),
            deployment_index: HashMap::new(),
            pending_correlations: Vec::new(),
            load_processed: true,
            pending_timeline: Vec::new(),
            legacy_timelines: Vec::new(),
            alerts: Vec::new(),
            dirty: Dirty::default(),
            lower_buf: String::new(),
            latest_event_time: None,
            stats_dirty: false,
        }
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The latest `eventTime` among the records ingested by this engine (any record, relevant or not).
    pub fn latest_event_time(&self) -> Option<Millis> {
        self.latest_event_time
    }

    // ---------------------------------------------------------------- registry

    /// Registers (or updates) deployments, then raises `shared_key` for every active deployment on
    /// a key that now protects two or more active deployments (once per deployment).
    pub fn register(&mut self, deployments: Vec<ValidDeployment>) {
        for d in deployments {
            self.register_one(d);
        }
        self.rebuild_indexes();
        self.check_shared_keys();
    }

    fn register_one(&mut self, d: ValidDeployment) {
        let key_ref = self.ensure_key(&d.key);
        let crn = d.spec.crn.clone();
        let latest_rotation = self.keys[&key_ref].rotations.iter().map(|r| r.time).max();
        match self.deployments.get_mut(&crn) {
            Some(existing) => {
                let old_key = existing.spec.key.clone();
                existing.spec = d.spec;
                if old_key != existing.spec.key {
                    existing.confirmed_at = latest_rotation;
                }
            }
            None => {
                self.deployments.insert(
                    crn.clone(),
                    DeploymentRecord {
                        spec: d.spec,
                        soft_deleted_at: None,
                        // Rotations before registration are not this deployment's to confirm.
                        confirmed_at: latest_rotation,
                        confirmed_correlations: BTreeMap::new(),
                        key_version: None,
                        key_version_at: None,
                        ack_failures: Vec::new(),
                        clock_overdue_for: None,
                        auth: None,
                        shared_key_alerted: false,
                        timeline: VecDeque::new(),
                        timeline_next: 0,
                    },
                );
            }
        }
        self.dirty.mark(EntityKind::Deployment, crn);
    }

    /// Adds a known authorization policy from configuration.
    pub fn add_configured_policy(&mut self, spec: PolicySpec) {
        let id = spec.id.clone();
        let rec = self
            .policies
            .entry(id.clone())
            .or_insert_with(|| PolicyRecord::unknown(&id, true));
        if rec.spec.is_none() {
            rec.spec = Some(spec);
            rec.from_config = true;
            self.dirty.mark(EntityKind::Policy, id);
        }
    }

    fn ensure_key(&mut self, key: &KeyCrn) -> String {
        let identity = key.identity();
        if let Some(existing) = self.key_by_identity.get(&identity) {
            return existing.clone();
        }
        let id = key_entity_id(&identity);
        self.keys.entry(id.clone()).or_insert_with(|| KeyRecord {
            crn: key.to_string(),
            state: KeyState::Active,
            state_stamp: None,
            deleted_at: None,
            purged_by_clock: false,
            deletion_authorized_until: None,
            dual_auth_stamp: None,
            rotations: Vec::new(),
            anonymous_acks: 0,
            early_acks: BTreeMap::new(),
            anonymous_version: None,
            early_ack_versions: BTreeMap::new(),
        });
        self.dirty.mark(EntityKind::Key, &id);
        self.key_by_identity.insert(identity, id.clone());
        id
    }

    fn check_shared_keys(&mut self) {
        let mut keys: Vec<&String> = self.deployments_by_key.keys().collect();
        keys.sort();
        let mut to_alert = Vec::new();
        for key in keys {
            let active: Vec<&String> = self.deployments_by_key[key]
                .iter()
                .filter(|c| self.deployments[*c].soft_deleted_at.is_none())
                .collect();
            if active.len() >= 2 {
                for crn in active {
                    if !self.deployments[crn].shared_key_alerted {
                        to_alert.push((key.clone(), crn.clone(), active_count(self, key)));
                    }
                }
            }
        }
        for (key, crn, n) in to_alert {
            if let Some(d) = self.deployments.get_mut(&crn) {
                d.shared_key_alerted = true;
            }
            self.dirty.mark(EntityKind::Deployment, &crn);
            let summary = format!(
                "key protects {n} active deployments: deleting or disabling it hits all of them"
            );
            self.raise(
                AlertKind::SharedKey,
                Severity::Warning,
                &crn,
                &key,
                None,
                "registry",
                summary,
            );
        }

        fn active_count(e: &Engine, key: &str) -> usize {
            e.deployments_by_key[key]
                .iter()
                .filter(|c| e.deployments[*c].soft_deleted_at.is_none())
                .count()
        }
    }

    /// Soft-deletes a deployment (API `DELETE`, or an `*.instance.delete` event). Returns false when
    /// the deployment is unknown.
    pub fn soft_delete(&mut self, crn: &str, at: Millis, cause: &str) -> bool {
        // The deployment's own CRN, not one of its resources.
        let Some(dep) = self
            .lookup_deployment(crn)
            .filter(|d| d.eq_ignore_ascii_case(crn.trim()))
        else {
            return false;
        };
        self.soft_delete_known(&dep, at, cause, None, None);
        true
    }

    fn soft_delete_known(
        &mut self,
        crn: &str,
        at: Millis,
        cause: &str,
        ev: Option<&Event>,
        corr: Option<String>,
    ) {
        let purge_at = at.plus(self.lifecycle.soft_delete_period);
        let d = self.deployments.get_mut(crn).expect("known deployment");
        let newly = d.soft_deleted_at.is_none();
        d.soft_deleted_at = Some(d.soft_deleted_at.map_or(at, |t| t.min(at)));
        self.dirty.mark(EntityKind::Deployment, crn);
        if newly {
            let key = self.key_of(crn);
            let summary = format!("deployment soft-deleted; its data is purged at {purge_at}");
            match ev {
                Some(ev) => self.raise_for_event(
                    AlertKind::DeploymentSoftDeleted,
                    Severity::Info,
                    crn,
                    &key,
                    ev,
                    summary,
                ),
                None => self.raise(
                    AlertKind::DeploymentSoftDeleted,
                    Severity::Info,
                    crn,
                    &key,
                    Some((at, corr)),
                    cause,
                    summary,
                ),
            }
        }
    }

    fn rebuild_indexes(&mut self) {
        self.keys_by_id.clear();
        self.key_by_identity.clear();
        for (id, k) in &self.keys {
            if let Ok(kc) = KeyCrn::parse(&k.crn) {
                self.keys_by_id
                    .entry(kc.key_id().to_ascii_lowercase())
                    .or_default()
                    .push(id.clone());
                self.key_by_identity.insert(kc.identity(), id.clone());
            }
        }
        self.deployments_by_key.clear();
        self.deployment_by_target.clear();
        self.deployment_index.clear();
        for (crn, d) in &self.deployments {
            let key = KeyCrn::parse(&d.spec.key).ok();
            let key_entity = key
                .as_ref()
                .and_then(|kc| self.key_by_identity.get(&kc.identity()))
                .cloned();
            if let Some(kid) = &key_entity {
                self.deployments_by_key
                    .entry(kid.clone())
                    .or_default()
                    .push(crn.clone());
            }
            self.deployment_index.insert(
                crn.clone(),
                DeploymentIndex {
                    key,
                    key_entity: key_entity.unwrap_or_default(),
                    service: Crn::parse(crn).map(|c| c.service).unwrap_or_default(),
                },
            );
            self.deployment_by_target
                .insert(crn.to_ascii_lowercase(), crn.clone());
            for r in &d.spec.resources {
                self.deployment_by_target
                    .insert(r.to_ascii_lowercase(), crn.clone());
            }
        }
    }

    fn lookup_deployment(&self, target: &str) -> Option<String> {
        self.deployment_by_target
            .get(&target.trim().to_ascii_lowercase())
            .cloned()
    }

    fn key_of(&self, crn: &str) -> String {
        self.deployment_index
            .get(crn)
            .map(|i| i.key_entity.clone())
            .unwrap_or_default()
    }

    /// The key entity for an event target (a key CRN, or failing that the key id in the request URI).
    fn lookup_key(&self, target: &str, ev: Option<&Event>) -> Option<String> {
        if let Ok(kc) = KeyCrn::parse(target) {
            if let Some(k) = self.key_by_identity.get(&kc.identity()) {
                return Some(k.clone());
            }
            return None;
        }
        let id = ev.and_then(Event::key_id_from_request_uri)?;
        match self.keys_by_id.get(&id.to_ascii_lowercase()) {
            Some(v) if v.len() == 1 => Some(v[0].clone()),
            _ => None,
        }
    }

    pub fn deployments_on_key(&self, key: &str) -> Vec<String> {
        self.deployments_by_key
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    // ---------------------------------------------------------------- events

    /// Processes one raw record.
    pub fn ingest(&mut self, line: &[u8]) -> Disposition {
        self.stats.events += 1;
        self.stats_dirty = true;
        let disposition = self.classify_and_apply(line);
        match &disposition {
            Disposition::Applied => self.stats.applied += 1,
            Disposition::Ignored => self.stats.ignored += 1,
            Disposition::Duplicate => self.stats.duplicates += 1,
            Disposition::Invalid(_) => self.stats.invalid += 1,
        }
        disposition
    }

    fn classify_and_apply(&mut self, line: &[u8]) -> Disposition {
        let skim = match event::skim(line) {
            Ok(s) => s,
            Err(reason) => return Disposition::Invalid(reason),
        };
        // Parsed once: for the latest time seen, and below for the record itself.
        let event_time = skim.event_time.as_deref().and_then(Millis::parse);
        if let Some(t) = event_time {
            if self.latest_event_time.is_none_or(|l| t > l) {
                self.latest_event_time = Some(t);
            }
        }
        let action = match &skim.action {
            ActionField::Str(a) => a.as_ref(),
            _ => return Disposition::Invalid(InvalidReason::NoAction),
        };
        let class = classify_action(action);
        match class {
            ActionClass::RoutineKey => return Disposition::Ignored,
            ActionClass::Other => {
                // A correlated follow-up must name a registered deployment and carry a correlation id.
                let (Some(target), Some(_)) = (&skim.target_id, &skim.correlation_id) else {
                    return Disposition::Ignored;
                };
                if !target.starts_with("crn:") && !target.starts_with("CRN:") {
                    return Disposition::Ignored;
                }
                self.lower_buf.clear();
                self.lower_buf.push_str(target.trim());
                self.lower_buf.make_ascii_lowercase();
                let Some(dep) = self
                    .deployment_by_target
                    .get(self.lower_buf.as_str())
                    .cloned()
                else {
                    return Disposition::Ignored;
                };
                let Some(time) = event_time else {
                    return Disposition::Ignored;
                };
                // Most such events confirm nothing: their correlation id is new for the deployment
                // and belongs to no rotation of its key. They are only remembered (a rotation may
                // arrive later), which needs no full parse.
                let corr = skim.correlation_id.as_deref().unwrap_or_default();
                if corr.is_empty() {
                    return Disposition::Ignored;
                }
                if !self.deployments[&dep]
                    .confirmed_correlations
                    .contains_key(corr)
                    && !self.is_rotation_correlation(&dep, corr)
                {
                    self.remember_correlation(&dep, corr, time);
                    return Disposition::Ignored;
                }
                let Ok(ev) = event::parse_full(line, class) else {
                    return Disposition::Ignored;
                };
                return self.dedup_then(ev, |e, ev| e.apply_follow_up(&dep, ev));
            }
            _ => {}
        }
        // A handled action: it must have a target and a parseable time.
        let Some(target) = skim
            .target_id
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Disposition::Invalid(InvalidReason::NoTarget(action.to_owned()));
        };
        if event_time.is_none() {
            return Disposition::Invalid(InvalidReason::BadTime {
                action: action.to_owned(),
                time: skim.event_time.as_deref().unwrap_or("(missing)").to_owned(),
            });
        }
        match class {
            ActionClass::Key(_) | ActionClass::LegacyAck => {
                let fast = KeyCrn::parse(target)
                    .ok()
                    .map(|k| self.key_by_identity.contains_key(&k.identity()));
                if fast == Some(false) {
                    return Disposition::Ignored;
                }
                let ev = match event::parse_full(line, class) {
                    Ok(ev) => ev,
                    Err(reason) => return Disposition::Invalid(reason),
                };
                let Some(key) = self.lookup_key(&ev.target_id, Some(&ev)) else {
                    return Disposition::Ignored;
                };
                let action = match class {
                    ActionClass::Key(a) => a,
                    _ => {
                        let t = str_at(&ev.response, &["eventAckData", "eventType"])
                            .or_else(|| str_at(&ev.response, &["eventType"]));
                        match t.and_then(ack_of_event_type) {
                            Some(of) => KeyAction::Ack(of),
                            None => return Disposition::Ignored,
                        }
                    }
                };
                self.dedup_then(ev, |e, ev| {
                    e.apply_key_event(&key, ev, action);
                    Disposition::Applied
                })
            }
            ActionClass::InstanceDelete => {
                // Only the deployment's own CRN counts, not one of its resources.
                let Some(dep) = self
                    .lookup_deployment(target)
                    .filter(|d| d.eq_ignore_ascii_case(target))
                else {
                    return Disposition::Ignored;
                };
                let ev = match event::parse_full(line, class) {
                    Ok(ev) => ev,
                    Err(reason) => return Disposition::Invalid(reason),
                };
                if ev.outcome != Outcome::Success {
                    return self.dedup_then(ev, |_, _| Disposition::Applied);
                }
                self.dedup_then(ev, |e, ev| {
                    let corr = ev.correlation_id.clone();
                    e.soft_delete_known(&dep, ev.time, &ev.digest.hex(), Some(ev), corr);
                    e.note(&dep, ev, "soft-deleted");
                    // A rotation after the deletion no longer waits for this deployment: the
                    // anonymous acknowledgements counted may now match those still unconfirmed.
                    let key = e.key_of(&dep);
                    e.settle_anonymous_acks(&key, ev, true);
                    Disposition::Applied
                })
            }
            ActionClass::PolicyCreate | ActionClass::PolicyDelete => {
                let ev = match event::parse_full(line, class) {
                    Ok(ev) => ev,
                    Err(reason) => return Disposition::Invalid(reason),
                };
                self.apply_policy_event(ev)
            }
            ActionClass::RoutineKey | ActionClass::Other => Disposition::Ignored,
        }
    }

    /// Runs `apply` unless the event was handled before (same JSON value).
    fn dedup_then(
        &mut self,
        ev: Event,
        apply: impl FnOnce(&mut Engine, &Event) -> Disposition,
    ) -> Disposition {
        if self.seen.contains(&ev.digest) {
            return Disposition::Duplicate;
        }
        let d = apply(self, &ev);
        if d == Disposition::Applied {
            self.seen.insert(ev.digest);
            self.dirty.processed(&ev.digest);
        }
        d
    }

    fn apply_key_event(&mut self, key: &str, ev: &Event, action: KeyAction) {
        let stamp = ev.stamp();
        let stale = self.keys[key].state_stamp.is_some_and(|s| stamp < s);
        let deployments = self.deployments_on_key(key);
        let success = ev.outcome == Outcome::Success;
        use KeyAction::*;
        match action {
            Disable | Enable | Delete | Restore | Purge | Expire if success => {
                if action == Delete {
                    // A deletion consumes an open dual-authorization approval. This register has
                    // its own last-writer-wins order, independent of the key state's.
                    let k = self.keys.get_mut(key).expect("key");
                    if k.dual_auth_stamp.is_none_or(|s| stamp > s) {
                        k.deletion_authorized_until = None;
                        k.dual_auth_stamp = Some(stamp);
                        self.dirty.mark(EntityKind::Key, key);
                    }
                }
                if stale {
                    for d in &deployments {
                        self.note(
                            d,
                            ev,
                            "stale: older than the key's last state change; no effect",
                        );
                    }
                    return;
                }
                let (state, kind, severity) = match action {
                    Disable => (
                        KeyState::Suspended,
                        AlertKind::KeyDisabled,
                        Severity::Critical,
                    ),
                    Enable => (KeyState::Active, AlertKind::KeyEnabled, Severity::Info),
                    Delete => (
                        KeyState::Destroyed,
                        AlertKind::KeyDeleted,
                        Severity::Critical,
                    ),
                    Restore => (KeyState::Active, AlertKind::KeyRestored, Severity::Warning),
                    Purge => (KeyState::Purged, AlertKind::KeyPurged, Severity::Critical),
                    _ => (
                        KeyState::Deactivated,
                        AlertKind::KeyExpired,
                        Severity::Warning,
                    ),
                };
                let restore_window = self.lifecycle.restore_window;
                let k = self.keys.get_mut(key).expect("key");
                k.state = state;
                k.state_stamp = Some(stamp);
                k.purged_by_clock = false;
                if action == Delete {
                    k.deleted_at = Some(ev.time);
                }
                let deleted_at = k.deleted_at;
                self.dirty.mark(EntityKind::Key, key);
                for d in &deployments {
                    let soft = self.deployments[d].soft_deleted_at.is_some();
                    let sev = if action == Delete && soft {
                        Severity::Info
                    } else {
                        severity
                    };
                    let summary = match action {
                        Disable => "key disabled: the deployment's disks are locked until the key is enabled".to_string(),
                        Enable => "key enabled: the deployment's disks are unlocked".to_string(),
                        Delete => format!(
                            "key deleted: the deployment's data is crypto-shredded; restorable until {}",
                            deleted_at.unwrap_or(ev.time).plus(restore_window)
                        ),
                        Restore => "key restored: the deployment's disks are unlocked again".to_string(),
                        Purge => "key purged: the deployment's data is gone for good".to_string(),
                        _ => "key expired (deactivated): data stays readable, but the key can no longer encrypt".to_string(),
                    };
                    self.note(d, ev, &format!("key {}", state.as_str()));
                    self.raise_for_event(kind, sev, d, key, ev, summary);
                }
            }
            Delete if ev.outcome == Outcome::Failure => {
                for d in &deployments {
                    self.note(d, ev, "deletion refused");
                    if !stale {
                        let summary = format!(
                            "deletion of the key was refused ({}); someone tried to delete it",
                            ev.reason_code
                                .map_or("no reason code".to_string(), |c| format!(
                                    "reason code {c}"
                                ))
                        );
                        self.raise_for_event(
                            AlertKind::DeleteBlocked,
                            Severity::Warning,
                            d,
                            key,
                            ev,
                            summary,
                        );
                    }
                }
            }
            SetKeyForDeletion | UnsetKeyForDeletion if success => {
                let window = self.lifecycle.dual_auth_window;
                let k = self.keys.get_mut(key).expect("key");
                if k.dual_auth_stamp.is_some_and(|s| stamp < s) {
                    for d in &deployments {
                        self.note(
                            d,
                            ev,
                            "stale: older than the last dual-authorization change; no effect",
                        );
                    }
                    return;
                }
                k.dual_auth_stamp = Some(stamp);
                let set = action == SetKeyForDeletion;
                k.deletion_authorized_until = set.then(|| ev.time.plus(window));
                let until = k.deletion_authorized_until;
                self.dirty.mark(EntityKind::Key, key);
                for d in &deployments {
                    if set {
                        self.note(d, ev, "deletion authorized");
                        let summary = format!(
                            "first approval of a dual-authorization delete: a second person can delete the key until {}",
                            until.unwrap_or(ev.time)
                        );
                        if !stale {
                            self.raise_for_event(
                                AlertKind::DeletionAuthorized,
                                Severity::Warning,
                                d,
                                key,
                                ev,
                                summary,
                            );
                        }
                    } else {
                        self.note(d, ev, "deletion authorization cancelled");
                        if !stale {
                            let summary =
                                "the dual-authorization delete approval was withdrawn".to_string();
                            self.raise_for_event(
                                AlertKind::DeletionAuthorizationCancelled,
                                Severity::Info,
                                d,
                                key,
                                ev,
                                summary,
                            );
                        }
                    }
                }
            }
            Rotate if success => self.apply_rotation(key, ev, stale),
            Ack(AckOf::Rotate) if success => self.apply_rotation_ack(key, ev, stale),
            Ack(of)
                if ev.outcome == Outcome::Failure
                    && matches!(ev.reason_code, Some(408) | Some(409)) =>
            {
                self.apply_ack_failure(key, ev, of, stale)
            }
            _ => {
                for d in &deployments {
                    self.note(d, ev, "no effect");
                }
            }
        }
    }

    fn apply_rotation(&mut self, key: &str, ev: &Event, stale: bool) {
        let rotation = Rotation {
            time: ev.time,
            correlation_id: ev.correlation_id.clone(),
        };
        let k = self.keys.get_mut(key).expect("key");
        if !k.rotations.contains(&rotation) {
            k.rotations.push(rotation);
            k.rotations.sort_by(|a, b| {
                a.time
                    .cmp(&b.time)
                    .then(a.correlation_id.cmp(&b.correlation_id))
            });
            if k.rotations.len() > ROTATION_MEMORY {
                let excess = k.rotations.len() - ROTATION_MEMORY;
                k.rotations.drain(..excess);
            }
        }
        let early = ev
            .correlation_id
            .as_ref()
            .and_then(|c| k.early_acks.remove(c))
            .unwrap_or(0);
        k.anonymous_acks += early;
        let early_version = ev
            .correlation_id
            .as_ref()
            .and_then(|c| k.early_ack_versions.remove(c));
        k.anonymous_version = newer_version(k.anonymous_version.take(), early_version);
        self.dirty.mark(EntityKind::Key, key);
        let mut rotated = Vec::new();
        for d in self.deployments_on_key(key) {
            // A follow-up that arrived before this rotation confirms the deployment now, as of
            // its own time: rotations older than that are confirmed too, as after a named ack.
            let followed_up = ev
                .correlation_id
                .as_deref()
                .and_then(|c| self.deployments[&d].confirmed_correlations.get(c).copied());
            if let Some(at) = followed_up {
                self.confirm_at(&d, at.max(ev.time));
            }
            let rec = &self.deployments[&d];
            if rec.soft_deleted_at.is_some_and(|s| s <= ev.time) {
                self.note(&d, ev, "rotation ignored: deployment soft-deleted");
                continue;
            }
            if view::rotation_confirmed(rec, ev.time, ev.correlation_id.as_deref()) {
                self.note(&d, ev, "rotation already confirmed");
                continue;
            }
            rotated.push(d);
        }
        if early > 0 && self.settle_anonymous_acks(key, ev, false) {
            return;
        }
        for d in rotated {
            self.note(&d, ev, "rewrap pending");
            self.dirty.mark(EntityKind::Deployment, &d);
            if !stale {
                let deadline = self.rewrap_deadline_of(&d);
                let summary = format!(
                    "key rotated: the deployment must re-wrap its data keys and confirm by {}",
                    deadline.map_or("(unknown)".to_string(), |t| t.to_string())
                );
                self.raise_for_event(AlertKind::KeyRotated, Severity::Info, &d, key, ev, summary);
            }
        }
    }

    fn rewrap_deadline_of(&self, crn: &str) -> Option<Millis> {
        let d = &self.deployments[crn];
        let key = self.key_of(crn);
        view::rewrap(d, self.keys.get(&key)?, &self.lifecycle).1
    }

    fn apply_rotation_ack(&mut self, key: &str, ev: &Event, stale: bool) {
        let named = ev.ack_resource().map(|r| self.lookup_deployment(r));
        match named {
            Some(Some(d)) => {
                let before = self.rewrap_of(&d);
                self.confirm_at(&d, ev.time);
                let rec = self.deployments.get_mut(&d).expect("deployment");
                if let Some(v) = ev.new_key_version() {
                    rec.confirm_version(v, ev.time);
                }
                if let Some(c) = &ev.correlation_id {
                    self.remember_correlation(&d, c, ev.time);
                }
                self.dirty.mark(EntityKind::Deployment, &d);
                let after = self.rewrap_of(&d);
                self.note(&d, ev, "rewrap confirmed");
                if before != Rewrap::Current && after == Rewrap::Current && !stale {
                    let summary =
                        "the deployment confirmed the rewrap with the new key version".to_string();
                    self.raise_for_event(
                        AlertKind::RewrapCompleted,
                        Severity::Info,
                        &d,
                        key,
                        ev,
                        summary,
                    );
                }
                // Anonymous acknowledgements counted earlier may now match the deployments
                // still unconfirmed (as they would have, had this one come first).
                self.settle_anonymous_acks(key, ev, !stale);
            }
            Some(None) => {
                // Names a resource that is not ours: another service's acknowledgement.
            }
            None => {
                let unconfirmed = self.unconfirmed_on_key(key);
                let k = self.keys.get_mut(key).expect("key");
                let corr_known = ev.correlation_id.as_ref().is_some_and(|c| {
                    k.rotations
                        .iter()
                        .any(|r| r.correlation_id.as_ref() == Some(c))
                });
                self.dirty.mark(EntityKind::Key, key);
                let version = ev.new_key_version().map(|v| (ev.time, v.to_owned()));
                if unconfirmed.is_empty() {
                    match (&ev.correlation_id, corr_known) {
                        (Some(c), false) => {
                            // Arrived before its rotation: remember it for that rotation.
                            *k.early_acks.entry(c.clone()).or_insert(0) += 1;
                            let early = k.early_ack_versions.remove(c);
                            if let Some(v) = newer_version(early, version) {
                                k.early_ack_versions.insert(c.clone(), v);
                            }
                        }
                        _ => {
                            k.anonymous_acks = 0;
                            k.anonymous_version = None;
                        }
                    }
                    return;
                }
                k.anonymous_acks += 1;
                k.anonymous_version = newer_version(k.anonymous_version.take(), version);
                self.settle_anonymous_acks(key, ev, !stale);
            }
        }
    }

    /// When the anonymous acknowledgements of a key reach the number of its unconfirmed
    /// deployments, all of those are confirmed and the count restarts. Returns whether it settled.
    fn settle_anonymous_acks(&mut self, key: &str, ev: &Event, alert: bool) -> bool {
        let unconfirmed = self.unconfirmed_on_key(key);
        let k = self.keys.get_mut(key).expect("key");
        if unconfirmed.is_empty() || (k.anonymous_acks as usize) < unconfirmed.len() {
            return false;
        }
        k.anonymous_acks = 0;
        let latest_rotation = k.rotations.iter().map(|r| r.time).max();
        // The version of this event or of the anonymous acknowledgements counted, the newer.
        let version = newer_version(
            k.anonymous_version.take(),
            ev.new_key_version().map(|v| (ev.time, v.to_owned())),
        );
        for d in unconfirmed {
            self.confirm_at(&d, ev.time.max(latest_rotation.unwrap_or(ev.time)));
            let rec = self.deployments.get_mut(&d).expect("deployment");
            if let Some((t, v)) = &version {
                rec.confirm_version(v, *t);
            }
            if let Some(c) = &ev.correlation_id {
                self.remember_correlation(&d, c, ev.time);
            }
            self.dirty.mark(EntityKind::Deployment, &d);
            self.note(
                &d,
                ev,
                "rewrap confirmed (acknowledgements counted for the key)",
            );
            if alert {
                let summary = "every deployment on the key acknowledged the rotation".to_string();
                self.raise_for_event(
                    AlertKind::RewrapCompleted,
                    Severity::Info,
                    &d,
                    key,
                    ev,
                    summary,
                );
            }
        }
        true
    }

    fn unconfirmed_on_key(&self, key: &str) -> Vec<String> {
        self.deployments_on_key(key)
            .into_iter()
            .filter(|d| self.rewrap_of(d) != Rewrap::Current)
            .collect()
    }

    fn rewrap_of(&self, crn: &str) -> Rewrap {
        let key = self.key_of(crn);
        match self.keys.get(&key) {
            Some(k) => view::rewrap(&self.deployments[crn], k, &self.lifecycle).0,
            None => Rewrap::Current,
        }
    }

    fn apply_ack_failure(&mut self, key: &str, ev: &Event, of: AckOf, stale: bool) {
        let code = ev.reason_code.unwrap_or(0);
        let resource = ev.ack_resource();
        let named = resource.is_some();
        let targets = match resource {
            Some(r) => match self.lookup_deployment(r) {
                Some(d) => vec![d],
                None => Vec::new(),
            },
            None => self
                .deployments_on_key(key)
                .into_iter()
                .filter(|d| self.deployments[d].soft_deleted_at.is_none())
                .collect(),
        };
        let severity = match of {
            AckOf::Delete | AckOf::Disable => Severity::Critical,
            _ => Severity::Warning,
        };
        for d in targets {
            if of == AckOf::Rotate {
                let rec = self.deployments.get_mut(&d).expect("deployment");
                let failure = AckFailure {
                    time: ev.time,
                    code,
                    correlation_id: ev.correlation_id.clone(),
                };
                if !rec.ack_failures.contains(&failure) {
                    rec.ack_failures.push(failure);
                    if rec.ack_failures.len() > FAILURE_MEMORY {
                        rec.ack_failures.remove(0);
                    }
                }
                self.dirty.mark(EntityKind::Deployment, &d);
            }
            // A rotation failure that names nobody concerns the deployments still unconfirmed;
            // one that confirmed the rotation it is about is not affected by it.
            if of == AckOf::Rotate && !named && self.confirmed_failed_rotation(&d, key, ev) {
                continue;
            }
            let what = if code == 408 {
                "did not confirm within the deadline (408)"
            } else {
                "could not act on it: state conflict (409)"
            };
            let action = KeyAction::Ack(of).name();
            self.note(&d, ev, &format!("{action} failed with {code}"));
            if !stale {
                let summary = format!("the deployment {what} for the key's {action} notification");
                self.raise_for_event(AlertKind::AckFailed, severity, &d, key, ev, summary);
            }
        }
    }

    /// Whether `dep` confirmed the rotation an ack-rotate failure `ev` is about (the rotation with
    /// its correlation id, else the key's latest rotation before it) and is `current`. `false`
    /// while that rotation is not known yet (records arrive out of order): the failure may then
    /// well concern the deployment.
    fn confirmed_failed_rotation(&self, dep: &str, key: &str, ev: &Event) -> bool {
        let Some(confirmed) = self.deployments[dep].confirmed_at else {
            return false;
        };
        let rotation = ev
            .correlation_id
            .as_deref()
            .and_then(|c| self.rotation_time(dep, c))
            .or_else(|| {
                self.keys.get(key).and_then(|k| {
                    k.rotations
                        .iter()
                        .map(|r| r.time)
                        .filter(|t| *t <= ev.time)
                        .max()
                })
            });
        rotation.is_some_and(|r| confirmed >= r) && self.rewrap_of(dep) == Rewrap::Current
    }

    /// Remembers a correlation id the deployment confirmed, persisted in the next journal.
    fn remember_correlation(&mut self, dep: &str, corr: &str, time: Millis) {
        if let Some(rec) = self.deployments.get_mut(dep) {
            remember_correlation(rec, corr, time);
            self.dirty.correlation(dep, corr, time);
        }
    }

    /// Whether `corr` is the correlation id of a remembered rotation of the deployment's key.
    fn is_rotation_correlation(&self, dep: &str, corr: &str) -> bool {
        self.rotation_time(dep, corr).is_some()
    }

    /// The time of the (latest) remembered rotation of the deployment's key with id `corr`.
    fn rotation_time(&self, dep: &str, corr: &str) -> Option<Millis> {
        let index = self.deployment_index.get(dep)?;
        self.keys
            .get(&index.key_entity)?
            .rotations
            .iter()
            .filter(|r| r.correlation_id.as_deref() == Some(corr))
            .map(|r| r.time)
            .max()
    }

    fn apply_follow_up(&mut self, dep: &str, ev: &Event) -> Disposition {
        let Some(corr) = ev.correlation_id.clone() else {
            return Disposition::Ignored;
        };
        let key = self.key_of(dep);
        let before = self.rewrap_of(dep);
        if self.deployments[dep]
            .confirmed_correlations
            .contains_key(&corr)
        {
            return Disposition::Ignored;
        }
        self.remember_correlation(dep, &corr, ev.time);
        let Some(rotated_at) = self.rotation_time(dep, &corr) else {
            return Disposition::Ignored;
        };
        // A confirmation like a named ack: the deployment re-wrapped as of the follow-up, so
        // earlier rotations are confirmed too, and earlier ack failures no longer count.
        self.confirm_at(dep, ev.time.max(rotated_at));
        let after = self.rewrap_of(dep);
        self.note(dep, ev, "rewrap confirmed by a correlated follow-up");
        if before != Rewrap::Current && after == Rewrap::Current {
            let summary = format!(
                "the deployment's {} follows up the rotation: rewrap done",
                ev.action
            );
            self.raise_for_event(
                AlertKind::RewrapCompleted,
                Severity::Info,
                dep,
                &key,
                ev,
                summary,
            );
        }
        self.settle_anonymous_acks(&key, ev, true);
        Disposition::Applied
    }

    /// Moves the deployment's last rewrap confirmation to `at` (if later).
    fn confirm_at(&mut self, dep: &str, at: Millis) {
        let rec = self.deployments.get_mut(dep).expect("deployment");
        if rec.confirmed_at.is_none_or(|t| t < at) {
            rec.confirmed_at = Some(at);
            self.dirty.mark(EntityKind::Deployment, dep);
        }
    }

    // ---------------------------------------------------------------- clock

    /// Evaluates deadlines at `now`: rewrap deadlines and the automatic purge of deleted keys.
    pub fn tick(&mut self, now: Millis) {
        // Found first, changed after (this runs after every batch, so it copies nothing that is
        // not due): marking one deployment overdue or one key purged changes nothing another
        // deployment or key is due for.
        let overdue: Vec<(String, String, Millis, Millis)> = self
            .deployments
            .iter()
            .filter_map(|(crn, d)| {
                let key = &self.deployment_index.get(crn)?.key_entity;
                let k = self.keys.get(key)?;
                match view::rewrap_detail(d, k, &self.lifecycle) {
                    (Rewrap::Pending, Some(deadline), Some(since)) if now >= deadline => {
                        Some((crn.clone(), key.clone(), deadline, since))
                    }
                    _ => None,
                }
            })
            .collect();
        for (crn, key, deadline, since) in overdue {
            let corr = self.keys[&key]
                .rotations
                .iter()
                .find(|r| r.time == since)
                .and_then(|r| r.correlation_id.clone());
            let rec = self.deployments.get_mut(&crn).expect("deployment");
            rec.clock_overdue_for = Some(since);
            self.dirty.mark(EntityKind::Deployment, &crn);
            let cause = format!("clock:rewrap:{}", since.0);
            let summary = format!("rewrap not confirmed by the deadline {deadline}");
            self.raise(
                AlertKind::RewrapOverdue,
                Severity::Warning,
                &crn,
                &key,
                Some((deadline, corr)),
                &cause,
                summary,
            );
        }
        let purge_after = self.lifecycle.purge_after;
        let purged: Vec<(String, Millis)> = self
            .keys
            .iter()
            .filter_map(|(key, k)| {
                let deleted_at = k.deleted_at?;
                (k.state == KeyState::Destroyed && now >= deleted_at.plus(purge_after))
                    .then(|| (key.clone(), deleted_at))
            })
            .collect();
        for (key, deleted_at) in purged {
            let at = deleted_at.plus(purge_after);
            let k = self.keys.get_mut(&key).expect("key");
            k.state = KeyState::Purged;
            k.purged_by_clock = true;
            self.dirty.mark(EntityKind::Key, &key);
            let cause = format!("clock:purge:{}", deleted_at.0);
            for d in self.deployments_on_key(&key) {
                let summary =
                    "the deleted key passed its automatic purge date: the data is gone for good"
                        .to_string();
                self.raise(
                    AlertKind::KeyPurged,
                    Severity::Critical,
                    &d,
                    &key,
                    Some((at, None)),
                    &cause,
                    summary,
                );
            }
        }
    }

    // ---------------------------------------------------------------- outputs

    fn raise_for_event(
        &mut self,
        kind: AlertKind,
        severity: Severity,
        crn: &str,
        key: &str,
        ev: &Event,
        summary: String,
    ) {
        let mut alert = self.make_alert(
            kind,
            severity,
            crn,
            key,
            Some((ev.time, ev.correlation_id.clone())),
            &ev.digest.hex(),
            summary,
        );
        alert.action = Some(ev.action.clone());
        alert.initiator = Some(ev.initiator.clone());
        self.alerts.push(alert);
    }

    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        kind: AlertKind,
        severity: Severity,
        crn: &str,
        key: &str,
        when: Option<(Millis, Option<String>)>,
        cause: &str,
        summary: String,
    ) {
        let alert = self.make_alert(kind, severity, crn, key, when, cause, summary);
        self.alerts.push(alert);
    }

    #[allow(clippy::too_many_arguments)]
    fn make_alert(
        &self,
        kind: AlertKind,
        severity: Severity,
        crn: &str,
        key: &str,
        when: Option<(Millis, Option<String>)>,
        cause: &str,
        summary: String,
    ) -> Alert {
        let mut h = Sha256::new();
        h.update(cause.as_bytes());
        h.update(b"|");
        h.update(kind.as_str().as_bytes());
        h.update(b"|");
        h.update(crn.as_bytes());
        let id: String = crate::hex::encode(&h.finalize()[..16]);
        let has_time = when.is_some();
        let (event_time, correlation_id) = when.unwrap_or((Millis(0), None));
        Alert {
            id,
            kind,
            severity,
            deployment: crn.to_owned(),
            key: self
                .keys
                .get(key)
                .map(|k| k.crn.clone())
                .unwrap_or_default(),
            event_time: has_time.then_some(event_time),
            correlation_id,
            cause: cause.to_owned(),
            action: None,
            initiator: None,
            summary,
        }
    }

    fn note(&mut self, crn: &str, ev: &Event, effect: &str) {
        if let Some(d) = self.deployments.get_mut(crn) {
            while d.timeline.len() >= TIMELINE_LIMIT {
                d.timeline.pop_front();
            }
            let n = d.timeline_next;
            d.timeline_next += 1;
            d.timeline.push_back(TimelineEntry {
                n,
                time: ev.time,
                action: ev.action.clone(),
                outcome: ev.outcome.as_str().to_owned(),
                correlation_id: ev.correlation_id.clone(),
                effect: effect.to_owned(),
            });
            self.dirty.mark(EntityKind::Deployment, crn);
            self.dirty
                .mark_with(EntityKind::Timeline, || timeline_entity_id(crn, n));
        }
    }

    /// Whether alerts are waiting for [`Engine::take_alerts`].
    pub fn has_alerts(&self) -> bool {
        !self.alerts.is_empty()
    }

    /// Alerts raised since the last call, in the order they were raised.
    pub fn take_alerts(&mut self) -> Vec<Alert> {
        std::mem::take(&mut self.alerts)
    }

    /// Entities changed since the last call, serialized for the store.
    pub fn take_changes(&mut self) -> Vec<Change> {
        if std::mem::take(&mut self.stats_dirty) {
            self.dirty.mark(EntityKind::Stats, "stats");
        }
        let dirty = std::mem::take(&mut self.dirty.set);
        let mut changes: Vec<Change> = dirty
            .into_iter()
            .filter_map(|(kind, id)| {
                let doc = match kind {
                    EntityKind::Key => serde_json::to_string(self.keys.get(&id)?),
                    EntityKind::Deployment => serde_json::to_string(self.deployments.get(&id)?),
                    EntityKind::Policy => serde_json::to_string(self.policies.get(&id)?),
                    EntityKind::Stats => serde_json::to_string(&self.stats),
                    EntityKind::Timeline => {
                        let (deployment, slot): (String, u64) = serde_json::from_str(&id).ok()?;
                        let entry = self
                            .deployments
                            .get(&deployment)?
                            .timeline
                            .iter()
                            .rev()
                            .find(|e| e.n % TIMELINE_LIMIT as u64 == slot)?;
                        serde_json::to_string(&TimelineRowRef {
                            deployment: &deployment,
                            n: entry.n,
                            entry,
                        })
                    }
                    // Written by earlier versions only; now part of journals.
                    EntityKind::Event | EntityKind::Correlation | EntityKind::Journal => {
                        return None
                    }
                }
                .ok()?;
                Some(Change { kind, id, doc })
            })
            .collect();
        let journal = std::mem::take(&mut self.dirty.journal);
        if !journal.events.is_empty() || !journal.correlations.is_empty() {
            if let Ok(doc) = serde_json::to_string(&journal) {
                // Named by its content: unique per set of facts, and writing the same facts
                // twice writes the same row.
                let digest = Sha256::digest(doc.as_bytes());
                let id = crate::hex::encode(&digest[..16]);
                changes.push(Change {
                    kind: EntityKind::Journal,
                    id,
                    doc,
                });
            }
        }
        changes
    }

    /// Whether changed entities are collected for [`Engine::take_changes`] (on by default). Off for
    /// a replay that only reports: its memory must not grow with the number of events.
    pub fn set_change_tracking(&mut self, on: bool) {
        self.dirty.off = !on;
        if !on {
            self.dirty.set.clear();
            self.dirty.journal = JournalDoc::default();
        }
    }

    /// Forgets pending changes without returning them (after a full reload, for example).
    pub fn clear_changes(&mut self) {
        self.stats_dirty = false;
        self.dirty.set.clear();
        self.dirty.journal = JournalDoc::default();
    }

    /// Loads one persisted entity (start-up, or changes written by another instance).
    pub fn load_entity(
        &mut self,
        kind: EntityKind,
        id: &str,
        doc: serde_json::Value,
    ) -> Result<(), serde_json::Error> {
        match kind {
            EntityKind::Key => {
                self.keys
                    .insert(id.to_owned(), serde_json::from_value(doc)?);
            }
            EntityKind::Deployment => {
                let mut rec: DeploymentRecord = serde_json::from_value(doc)?;
                // Remembered correlations and the timeline are rows of their own (older documents
                // carried them): keep those already loaded.
                match self.deployments.remove(id) {
                    Some(old) => {
                        for (c, t) in old.confirmed_correlations {
                            remember_correlation(&mut rec, &c, t);
                        }
                        rec.timeline = old.timeline;
                        rec.timeline_next = old.timeline_next;
                    }
                    None if !rec.timeline.is_empty() => {
                        for (i, e) in rec.timeline.iter_mut().enumerate() {
                            e.n = i as u64;
                        }
                        rec.timeline_next = rec.timeline.len() as u64;
                        self.legacy_timelines.push(id.to_owned());
                    }
                    None => {}
                }
                self.deployments.insert(id.to_owned(), rec);
            }
            EntityKind::Policy => {
                self.policies
                    .insert(id.to_owned(), serde_json::from_value(doc)?);
            }
            EntityKind::Event => {
                if let Some(d) = EventDigest::from_hex(id).filter(|_| self.load_processed) {
                    self.seen.insert(d);
                }
            }
            EntityKind::Stats => self.stats = serde_json::from_value(doc)?,
            EntityKind::Correlation => {
                let c: CorrelationDoc = serde_json::from_value(doc)?;
                match self.deployments.get_mut(&c.deployment) {
                    Some(rec) => remember_correlation(rec, &c.correlation, c.time),
                    None => self.pending_correlations.push(c),
                }
            }
            EntityKind::Timeline => self.pending_timeline.push(serde_json::from_value(doc)?),
            EntityKind::Journal => {
                let j: JournalDoc = serde_json::from_value(doc)?;
                if self.load_processed {
                    self.seen
                        .extend(j.events.iter().filter_map(|h| EventDigest::from_hex(h)));
                }
                for c in j.correlations {
                    match self.deployments.get_mut(&c.deployment) {
                        Some(rec) => remember_correlation(rec, &c.correlation, c.time),
                        None => self.pending_correlations.push(c),
                    }
                }
            }
        }
        Ok(())
    }

    /// Loading skips processed-event digests from now on (duplicates are not this engine's
    /// business: it never ingests).
    pub fn skip_processed_on_load(&mut self) {
        self.load_processed = false;
    }

    /// Marks the timelines read from deployment documents (written before timeline rows existed)
    /// as changed, so that the next transaction stores them as rows and rewrites the documents
    /// without them. Call after loading (and after clearing the changes loading made).
    pub fn convert_loaded_timelines(&mut self) {
        for crn in std::mem::take(&mut self.legacy_timelines) {
            let Some(rec) = self.deployments.get(&crn) else {
                continue;
            };
            for e in &rec.timeline {
                let id = timeline_entity_id(&crn, e.n);
                self.dirty.mark(EntityKind::Timeline, id);
            }
            self.dirty.mark(EntityKind::Deployment, &crn);
        }
    }

    /// Call after a series of `load_entity`.
    pub fn finish_loading(&mut self) {
        for c in std::mem::take(&mut self.pending_correlations) {
            if let Some(rec) = self.deployments.get_mut(&c.deployment) {
                remember_correlation(rec, &c.correlation, c.time);
            }
        }
        let mut rows = std::mem::take(&mut self.pending_timeline);
        rows.sort_by(|a, b| (&a.deployment, a.n).cmp(&(&b.deployment, b.n)));
        for row in rows {
            if let Some(rec) = self.deployments.get_mut(&row.deployment) {
                place_timeline_entry(rec, row.n, row.entry);
            }
        }
        self.rebuild_indexes();
    }

    pub fn keys(&self) -> &BTreeMap<String, KeyRecord> {
        &self.keys
    }

    pub fn deployments(&self) -> &BTreeMap<String, DeploymentRecord> {
        &self.deployments
    }

    pub fn policies(&self) -> &BTreeMap<String, PolicyRecord> {
        &self.policies
    }

    /// Finds a key entity by CRN or key id.
    pub fn find_key(&self, crn_or_id: &str) -> Option<String> {
        let t = crn_or_id.trim();
        if let Ok(kc) = KeyCrn::parse(t) {
            return self.key_by_identity.get(&kc.identity()).cloned();
        }
        match self.keys_by_id.get(&t.to_ascii_lowercase()) {
            Some(v) if v.len() == 1 => Some(v[0].clone()),
            _ => None,
        }
    }

    /// Finds a deployment by its CRN or one of its resources.
    pub fn find_deployment(&self, crn: &str) -> Option<String> {
        self.lookup_deployment(crn)
    }
}

fn key_entity_id(identity: &KeyIdentity) -> String {
    format!(
        "{}:{}:{}",
        identity.service.service_name(),
        identity.instance,
        identity.key_id
    )
}

/// The store id of a deployment's timeline entry `n`: the JSON array `[deployment, slot]` with
/// slot `n % 50`, so that a new entry overwrites the row of the entry it pushes out.
fn timeline_entity_id(dep: &str, n: u64) -> String {
    serde_json::to_string(&(dep, n % TIMELINE_LIMIT as u64)).unwrap_or_default()
}

/// The document of a stored timeline entry.
#[derive(Debug, Clone, serde::Deserialize)]
struct TimelineRow {
    deployment: String,
    n: u64,
    entry: TimelineEntry,
}

#[derive(serde::Serialize)]
struct TimelineRowRef<'a> {
    deployment: &'a str,
    n: u64,
    entry: &'a TimelineEntry,
}

/// Puts a loaded timeline entry in its place (by number), keeping the newest [`TIMELINE_LIMIT`].
/// Loaded rows come in any order and may repeat entries the deployment holds already.
fn place_timeline_entry(rec: &mut DeploymentRecord, n: u64, mut entry: TimelineEntry) {
    entry.n = n;
    rec.timeline_next = rec.timeline_next.max(n + 1);
    let at = rec.timeline.partition_point(|e| e.n < n);
    match rec.timeline.get_mut(at) {
        Some(e) if e.n == n => *e = entry,
        _ => rec.timeline.insert(at, entry),
    }
    while rec.timeline.len() > TIMELINE_LIMIT {
        rec.timeline.pop_front();
    }
}

/// The document of a remembered correlation in the store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CorrelationDoc {
    deployment: String,
    correlation: String,
    time: Millis,
}

/// Remembers `corr` for the deployment, forgetting the oldest beyond [`CORRELATION_MEMORY`]: the
/// result is the newest ones by (time, id) whatever the order of the calls, so loading the stored
/// rows in any order gives the same memory.
fn remember_correlation(rec: &mut DeploymentRecord, corr: &str, time: Millis) {
    rec.confirmed_correlations.insert(corr.to_owned(), time);
    if rec.confirmed_correlations.len() > CORRELATION_MEMORY {
        if let Some(oldest) = rec
            .confirmed_correlations
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(c, _)| c.clone())
        {
            rec.confirmed_correlations.remove(&oldest);
        }
    }
}
