//! Planning: new outbox alerts become notifications (see the module documentation of
//! `delivery` for the rules).

use super::routes;
use super::state::StateCache;
use super::Channel;
use crate::settings::RouteSettings;
use crate::store::{AlertRow, NewNotification, NotificationRow, PlanTx, StoreError};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use time::OffsetDateTime;

/// The notification group an alert goes into.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub route: String,
    pub channel: Channel,
    pub recipient: String,
    pub cause: String,
}

/// The alerts of one group found in one planning batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub alert_ids: Vec<String>,
    /// The earliest alert's time plus the route's `group_wait`.
    pub due: OffsetDateTime,
}

/// What one planning transaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Planned {
    pub alerts: usize,
    pub created: usize,
    pub extended: usize,
}

/// Routes `alerts` and groups them by (route, channel, recipient, cause).
pub fn group(
    route_settings: &[RouteSettings],
    alerts: &[AlertRow],
    cache: &StateCache,
) -> BTreeMap<GroupKey, Group> {
    let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
    for alert in alerts {
        let deployment = cache.deployment(&alert.deployment);
        let labels = deployment.map(|d| &d.spec.labels);
        let owners = deployment.map_or(&[][..], |d| d.spec.owners.as_slice());
        for route in route_settings {
            if !routes::matches(route, &alert.kind, &alert.severity, labels) {
                continue;
            }
            let recipients = routes::recipients(route, owners);
            if recipients.is_empty() {
                tracing::warn!(alert = %alert.id, kind = %alert.kind, deployment = %alert.deployment, route = %route.name,
                    "alert matches a route that has no recipient for it (the deployment has no owners); nobody is notified on this route");
            }
            let due = alert.created_at + route.group_wait;
            for (channel, recipient) in recipients {
                let key = GroupKey {
                    route: route.name.clone(),
                    channel,
                    recipient,
                    cause: alert.cause.clone(),
                };
                let group = groups.entry(key).or_insert_with(|| Group {
                    alert_ids: Vec::new(),
                    due,
                });
                group.due = group.due.min(due);
                if !group.alert_ids.contains(&alert.id) {
                    group.alert_ids.push(alert.id.clone());
                }
            }
        }
    }
    groups
}

/// Writes `groups` into the planner's transaction: alerts already in a notification of their
/// group are skipped, others join the group's notification if it was never attempted, or else
/// start the group's next generation.
pub async fn write(
    tx: &mut PlanTx<'_>,
    groups: BTreeMap<GroupKey, Group>,
    now: OffsetDateTime,
) -> Result<Planned, StoreError> {
    let mut planned = Planned::default();
    let mut new_rows: Vec<NewNotification> = Vec::new();
    if groups.is_empty() {
        return Ok(planned);
    }
    let causes: Vec<String> = groups
        .keys()
        .map(|k| k.cause.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut existing: HashMap<GroupKey, Vec<NotificationRow>> = HashMap::new();
    for row in tx.notifications_for_causes(&causes).await? {
        let Some(channel) = Channel::parse(&row.channel) else {
            continue;
        };
        let key = GroupKey {
            route: row.route.clone(),
            channel,
            recipient: row.recipient.clone(),
            cause: row.cause.clone(),
        };
        existing.entry(key).or_default().push(row);
    }
    for (key, group) in groups {
        let rows = existing.remove(&key).unwrap_or_default();
        let known: HashSet<&str> = rows
            .iter()
            .flat_map(|r| r.alert_ids.iter().map(String::as_str))
            .collect();
        let new_ids: Vec<String> = group
            .alert_ids
            .iter()
            .filter(|id| !known.contains(id.as_str()))
            .cloned()
            .collect();
        if new_ids.is_empty() {
            continue;
        }
        if let Some(open) = rows
            .iter()
            .find(|r| r.status == "pending" && r.attempts == 0)
        {
            let mut merged = open.alert_ids.clone();
            merged.extend(new_ids.iter().cloned());
            // False when a sender claimed it since it was read: then a new generation.
            if tx.extend_notification(&open.id, &merged, now).await? {
                planned.extended += 1;
                continue;
            }
        }
        let generation = rows.iter().map(|r| r.generation + 1).max().unwrap_or(0);
        new_rows.push(NewNotification {
            id: notification_id(&key, generation),
            route: key.route.clone(),
            channel: key.channel.as_str().to_owned(),
            recipient: key.recipient.clone(),
            cause: key.cause.clone(),
            generation,
            alert_ids: new_ids,
            next_attempt_at: group.due,
            created_at: now,
        });
    }
    let inserted = tx.insert_notifications(&new_rows).await?;
    if inserted != new_rows.len() as u64 {
        // Impossible while the cursor is locked: a broken invariant, not something to skip.
        return Err(StoreError::Corrupt {
            what: "notifications".to_owned(),
            reason: format!(
                "{} of {} new notifications existed although their groups did not list them",
                new_rows.len() as u64 - inserted,
                new_rows.len()
            ),
        });
    }
    planned.created = new_rows.len();
    Ok(planned)
}

/// Hex of the first 128 bits of SHA-256 over route, channel, recipient and cause (and the
/// generation after the first), separated by 0x1f.
pub fn notification_id(key: &GroupKey, generation: i64) -> String {
    let mut h = Sha256::new();
    for part in [
        key.route.as_str(),
        key.channel.as_str(),
        key.recipient.as_str(),
        key.cause.as_str(),
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    if generation > 0 {
        h.update(generation.to_string().as_bytes());
    }
    crate::hex::encode(&h.finalize()[..16])
}
