//! IAM authorization policies: remembering them from their create events (or configuration) and
//! revoking or restoring the deployments they cover.

use super::model::*;
use super::{Disposition, Engine, EntityKind};
use crate::crn::{Crn, KeyCrn};
use crate::event::{object_or_json_string, str_at, value_at, ActionClass, Event, Outcome, Stamp};
use serde_json::Value;

/// Reads the authorization a create event describes; `None` for anything that is not an
/// authorization to a key service.
pub fn policy_from_create(ev: &Event) -> Option<PolicySpec> {
    let body = object_or_json_string(value_at(&ev.request, &["body"]).cloned());
    let response = object_or_json_string(value_at(&ev.response, &["response_body"]).cloned());
    let doc = if body.get("subjects").is_some() {
        &body
    } else {
        &response
    };
    let kind = str_at(doc, &["type"]).or_else(|| str_at(&response, &["type"]))?;
    if !kind.eq_ignore_ascii_case("authorization") {
        return None;
    }
    let source = attribute(doc, "subjects", "serviceName")?;
    let target = attribute(doc, "resources", "serviceName")?;
    if !matches!(target.to_ascii_lowercase().as_str(), "kms" | "hs-crypto") {
        return None;
    }
    let id = str_at(&response, &["id"])
        .map(str::to_owned)
        .or_else(|| policy_id_from_target(&ev.target_id))?;
    let roles = doc
        .get("roles")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter_map(|r| str_at(r, &["role_id"]).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Some(PolicySpec {
        id,
        source_service: source.to_ascii_lowercase(),
        target_service: target.to_ascii_lowercase(),
        target_instance: attribute(doc, "resources", "serviceInstance").map(str::to_owned),
        account: attribute(doc, "resources", "accountId")
            .or_else(|| attribute(doc, "subjects", "accountId"))
            .map(str::to_owned)
            .or_else(|| {
                Crn::parse(&ev.target_id)
                    .ok()
                    .and_then(|c| c.account().map(str::to_owned))
            }),
        roles,
    })
}

fn attribute<'v>(doc: &'v Value, list: &str, name: &str) -> Option<&'v str> {
    doc.get(list)?.as_array()?.iter().find_map(|entry| {
        entry.get("attributes")?.as_array()?.iter().find_map(|a| {
            (a.get("name")?.as_str()? == name)
                .then(|| a.get("value")?.as_str())
                .flatten()
        })
    })
}

/// `crn:v1:bluemix:public:iam-am::a/<account>::policy:<id>` -> `<id>`.
pub fn policy_id_from_target(target: &str) -> Option<String> {
    let c = Crn::parse(target).ok()?;
    (c.resource_type.eq_ignore_ascii_case("policy") && !c.resource.is_empty())
        .then(|| c.resource.clone())
}

fn policy_id_from_delete(ev: &Event) -> Option<String> {
    policy_id_from_target(&ev.target_id).or_else(|| {
        let url = str_at(&ev.request, &["url"])?;
        let path = url.split(['?', '#']).next()?;
        path.rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    })
}

/// Whether `policy` authorizes the deployment `service` to use `key`.
pub fn covers(policy: &PolicySpec, deployment_service: &str, key: &KeyCrn) -> bool {
    policy
        .target_service
        .eq_ignore_ascii_case(key.service.service_name())
        && policy
            .target_instance
            .as_deref()
            .is_none_or(|i| i.eq_ignore_ascii_case(key.instance()))
        && (policy
            .source_service
            .eq_ignore_ascii_case(deployment_service)
            || policy.source_service.eq_ignore_ascii_case("server-protect"))
        && policy
            .account
            .as_deref()
            .is_none_or(|a| Some(a) == key.account())
}

impl Engine {
    pub(super) fn apply_policy_event(&mut self, ev: Event) -> Disposition {
        if ev.outcome != Outcome::Success {
            return Disposition::Ignored;
        }
        match ev.class {
            ActionClass::PolicyCreate => {
                let Some(spec) = policy_from_create(&ev) else {
                    return Disposition::Ignored;
                };
                self.dedup_then(ev, |e, ev| {
                    e.apply_policy_create(spec, ev);
                    Disposition::Applied
                })
            }
            _ => {
                let Some(id) = policy_id_from_delete(&ev) else {
                    return Disposition::Ignored;
                };
                let known = self.policies.get(&id).is_some_and(|p| p.spec.is_some());
                if !known {
                    // Remember the deletion: a create that arrives later must not bring it back.
                    if self.seen.contains(&ev.digest) {
                        return Disposition::Ignored;
                    }
                    let rec = self
                        .policies
                        .entry(id.clone())
                        .or_insert_with(|| PolicyRecord::unknown(&id, false));
                    let stamp = ev.stamp();
                    rec.deleted = Some(rec.deleted.map_or(stamp, |d| d.max(stamp)));
                    self.dirty.mark(EntityKind::Policy, id);
                    return Disposition::Ignored;
                }
                self.dedup_then(ev, |e, ev| {
                    let stamp = ev.stamp();
                    let rec = e.policies.get_mut(&id).expect("policy");
                    rec.deleted = Some(rec.deleted.map_or(stamp, |d| d.max(stamp)));
                    let spec = rec.spec.clone().expect("known policy");
                    e.dirty.mark(EntityKind::Policy, &id);
                    e.mark_covered(&spec, Authorization::Revoked, stamp, ev);
                    Disposition::Applied
                })
            }
        }
    }

    fn apply_policy_create(&mut self, spec: PolicySpec, ev: &Event) {
        let id = spec.id.clone();
        let stamp = ev.stamp();
        let rec = self
            .policies
            .entry(id.clone())
            .or_insert_with(|| PolicyRecord::unknown(&id, false));
        rec.spec = Some(spec.clone());
        rec.created = Some(rec.created.map_or(stamp, |c| c.min(stamp)));
        let deleted = rec.deleted;
        self.dirty.mark(EntityKind::Policy, id);
        self.mark_covered(&spec, Authorization::Ok, stamp, ev);
        if let Some(del) = deleted {
            self.mark_covered(&spec, Authorization::Revoked, del, ev);
        }
    }

    /// Writes `state` at `stamp` into the authorization register of every deployment the policy
    /// covers (last writer wins) and raises an alert where the state changed.
    fn mark_covered(&mut self, spec: &PolicySpec, state: Authorization, stamp: Stamp, ev: &Event) {
        // The index holds every deployment with its parsed key: one pass, no lookups; sorted
        // afterwards so that alerts come in the deployments' order.
        let mut crns: Vec<String> = self
            .deployment_index
            .iter()
            .filter(|(_, i)| i.key.as_ref().is_some_and(|k| covers(spec, &i.service, k)))
            .map(|(crn, _)| crn.clone())
            .collect();
        crns.sort_unstable();
        for crn in crns {
            let d = &self.deployments[&crn];
            let before = d.auth.as_ref().map_or(Authorization::Ok, |a| a.state);
            if d.auth.as_ref().is_some_and(|a| a.stamp >= stamp) {
                continue;
            }
            let d = self.deployments.get_mut(&crn).expect("deployment");
            d.auth = Some(AuthMark { state, stamp });
            self.dirty.mark(EntityKind::Deployment, &crn);
            let key_id = self.key_of(&crn);
            if before != state {
                let (kind, severity, summary, effect) = match state {
                    Authorization::Revoked => (
                        AlertKind::AuthorizationRevoked,
                        Severity::Critical,
                        format!(
                            "the IAM authorization {} -> {} ({}) was deleted: the deployment can no longer use its key",
                            spec.source_service, spec.target_service, spec.id
                        ),
                        "authorization revoked",
                    ),
                    Authorization::Ok => (
                        AlertKind::AuthorizationRestored,
                        Severity::Info,
                        format!(
                            "an IAM authorization {} -> {} ({}) covers the deployment again",
                            spec.source_service, spec.target_service, spec.id
                        ),
                        "authorization restored",
                    ),
                };
                self.note(&crn, ev, effect);
                self.raise_for_event(kind, severity, &crn, &key_id, ev, summary);
            } else {
                self.note(&crn, ev, "authorization unchanged");
            }
        }
    }
}
