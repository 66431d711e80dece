//! Derived views: what a deployment's rewrap state is given the remembered facts, and the report
//! objects of spec section 6 evaluated at a given time.

use super::model::*;
use super::Engine;
use crate::timefmt::Millis;
use serde::{Deserialize, Serialize};

/// Whether a rotation at `time` (with `corr`) is already confirmed by the deployment: it is older
/// than (or as old as) the last confirmation, or a confirmation carried its correlation id.
pub fn rotation_confirmed(d: &DeploymentRecord, time: Millis, corr: Option<&str>) -> bool {
    d.confirmed_at.is_some_and(|c| time <= c)
        || corr.is_some_and(|c| d.confirmed_correlations.contains_key(c))
}

/// Rewrap state, deadline and the start of the pending period.
pub fn rewrap_detail(
    d: &DeploymentRecord,
    k: &KeyRecord,
    l: &Lifecycle,
) -> (Rewrap, Option<Millis>, Option<Millis>) {
    let since = k
        .rotations
        .iter()
        .filter(|r| d.soft_deleted_at.is_none_or(|s| r.time < s))
        .filter(|r| !rotation_confirmed(d, r.time, r.correlation_id.as_deref()))
        .map(|r| r.time)
        .min();
    let Some(since) = since else {
        return (Rewrap::Current, None, None);
    };
    let deadline = since.plus(l.rewrap_deadline);
    let relevant = d
        .ack_failures
        .iter()
        .filter(|f| d.confirmed_at.is_none_or(|c| f.time > c))
        .filter(|f| {
            f.time >= since
                || f.correlation_id.as_deref().is_some_and(|c| {
                    k.rotations
                        .iter()
                        .any(|r| r.correlation_id.as_deref() == Some(c))
                })
        });
    let mut state = Rewrap::Pending;
    for f in relevant {
        if f.code == 409 {
            state = Rewrap::Failed;
        } else if f.code == 408 && state == Rewrap::Pending {
            state = Rewrap::Overdue;
        }
    }
    if state == Rewrap::Pending && d.clock_overdue_for == Some(since) {
        state = Rewrap::Overdue;
    }
    let deadline = matches!(state, Rewrap::Pending | Rewrap::Overdue).then_some(deadline);
    (state, deadline, Some(since))
}

pub fn rewrap(d: &DeploymentRecord, k: &KeyRecord, l: &Lifecycle) -> (Rewrap, Option<Millis>) {
    let (s, deadline, _) = rewrap_detail(d, k, l);
    (s, deadline)
}

/// A deployment as the report and the API show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub crn: String,
    pub name: String,
    pub key: String,
    pub lifecycle: String,
    pub disk: Disk,
    pub rewrap: Rewrap,
    pub authorization: Authorization,
    pub key_version: Option<String>,
    pub restorable_until: Option<Millis>,
    pub rewrap_deadline_at: Option<Millis>,
    pub deletion_authorized_until: Option<Millis>,
    pub purge_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyView {
    pub crn: String,
    pub state: KeyState,
    pub deployments: Vec<String>,
}

/// The report of spec section 6 without its alerts (which the caller streams or loads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    pub deployments: Vec<DeploymentView>,
    pub keys: Vec<KeyView>,
    pub stats: Stats,
}

/// An alert as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    pub kind: AlertKind,
    pub severity: Severity,
    pub deployment: String,
    pub key: String,
    pub event_time: Option<Millis>,
    pub correlation_id: Option<String>,
}

impl From<&Alert> for AlertView {
    fn from(a: &Alert) -> AlertView {
        AlertView {
            kind: a.kind,
            severity: a.severity,
            deployment: a.deployment.clone(),
            key: a.key.clone(),
            event_time: a.event_time,
            correlation_id: a.correlation_id.clone(),
        }
    }
}

impl Engine {
    pub fn deployment_view(&self, crn: &str, now: Millis) -> Option<DeploymentView> {
        let d = self.deployments.get(crn)?;
        let key_id = self.key_of(crn);
        let k = self.keys.get(&key_id)?;
        let l = &self.lifecycle;
        let disk = k.state.disk();
        let (rewrap, deadline) = rewrap(d, k, l);
        Some(DeploymentView {
            crn: d.spec.crn.clone(),
            name: d.spec.name.clone(),
            key: d.spec.key.clone(),
            lifecycle: if d.soft_deleted_at.is_some() {
                "soft_deleted"
            } else {
                "active"
            }
            .to_owned(),
            disk,
            rewrap,
            authorization: d.auth.as_ref().map_or(Authorization::Ok, |a| a.state),
            key_version: d.key_version.clone(),
            restorable_until: (disk == Disk::Shredded)
                .then(|| k.deleted_at.map(|t| t.plus(l.restore_window)))
                .flatten(),
            rewrap_deadline_at: deadline,
            deletion_authorized_until: k.deletion_authorized_until.filter(|u| *u > now),
            purge_at: d.soft_deleted_at.map(|t| t.plus(l.soft_delete_period)),
        })
    }

    pub fn key_view(&self, key: &str) -> Option<KeyView> {
        let k = self.keys.get(key)?;
        Some(KeyView {
            crn: k.crn.clone(),
            state: k.state,
            deployments: self.deployments_on_key(key),
        })
    }

    /// Deployments sorted by CRN, keys sorted by CRN, and the counters.
    pub fn state_report(&self, now: Millis) -> StateReport {
        let deployments = self
            .deployments
            .keys()
            .filter_map(|c| self.deployment_view(c, now))
            .collect();
        let mut keys: Vec<KeyView> = self
            .keys
            .keys()
            .filter_map(|k| self.key_view(k))
            .filter(|k| !k.deployments.is_empty())
            .collect();
        keys.sort_by(|a, b| a.crn.cmp(&b.crn));
        StateReport {
            deployments,
            keys,
            stats: self.stats,
        }
    }
}
