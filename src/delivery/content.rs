//! What a notification says: built once from its alerts and the deployments' state at that moment,
//! then rendered as the webhook's JSON body or as an e-mail (subject, plain text, HTML).
//!
//! The first line (`summary`, also the first line of the e-mail) says what happened, to which key,
//! how many deployments it affected, what state they are in now, what the operator can still do,
//! and the event's time, initiator and correlation id.

use super::state::StateCache;
use crate::engine::{Alert, KeyState, Severity};
use crate::event::Initiator;
use crate::timefmt::Millis;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything one notification tells; see the module documentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Content {
    /// The notification id (`webhook-id`).
    pub id: String,
    /// True for `keywatch test-alert`.
    pub test: bool,
    pub route: String,
    /// The kind of the most severe alert.
    pub kind: String,
    /// The highest severity among the alerts.
    pub severity: String,
    /// The first line; see the module documentation.
    pub summary: String,
    pub key: KeyInfo,
    /// One entry per affected deployment, most severe first, then by name.
    pub deployments: Vec<DeploymentInfo>,
    pub event: EventInfo,
    /// What the operator can still do, as a sentence.
    pub advice: String,
    pub created_at: Millis,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub crn: Option<String>,
    /// `active`, `suspended`, `deactivated`, `destroyed` or `purged`, as keywatch knows it now.
    pub state: Option<String>,
    /// Until when a destroyed key can be restored.
    pub restorable_until: Option<Millis>,
}

/// An affected deployment: the alert it got, and its state now (the report's fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub crn: String,
    pub name: String,
    pub alert_id: String,
    pub alert_kind: String,
    pub severity: String,
    pub alert_summary: String,
    /// `None` when keywatch does not know the deployment (any more).
    pub lifecycle: Option<String>,
    pub disk: Option<String>,
    pub rewrap: Option<String>,
    pub authorization: Option<String>,
    pub key_version: Option<String>,
    pub restorable_until: Option<Millis>,
    pub rewrap_deadline_at: Option<Millis>,
    pub deletion_authorized_until: Option<Millis>,
    pub purge_at: Option<Millis>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventInfo {
    /// The Activity Tracker action (`kms.secrets.delete`), absent for clock and registry causes.
    pub action: Option<String>,
    pub event_time: Option<Millis>,
    pub correlation_id: Option<String>,
    pub initiator: Option<Initiator>,
}

/// An e-mail, ready for the transport.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmailContent {
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Content {
    /// The content of notification `id` of `route` (created at `created_at`) carrying `alerts`,
    /// with the deployments' state in `cache` evaluated at `now`.
    pub(crate) fn build(
        id: &str,
        route: &str,
        alerts: &[Alert],
        cache: &StateCache,
        created_at: Millis,
        now: Millis,
    ) -> Content {
        let mut alerts: Vec<&Alert> = alerts.iter().collect();
        alerts.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then_with(|| name_of(cache, a).cmp(&name_of(cache, b)))
                .then_with(|| a.deployment.cmp(&b.deployment))
        });
        // One entry per deployment: its most severe alert.
        let mut seen = std::collections::HashSet::new();
        alerts.retain(|a| seen.insert(a.deployment.clone()));
        let top = alerts.first().copied();
        let kind = top.map_or("unknown", |a| a.kind.as_str()).to_owned();
        let severity = top
            .map_or(Severity::Info, |a| a.severity)
            .as_str()
            .to_owned();
        let key_crn = top.map(|a| a.key.clone()).filter(|k| !k.is_empty());
        let key = match &key_crn {
            Some(crn) => {
                let record = cache.key(crn);
                KeyInfo {
                    crn: Some(crn.clone()),
                    state: record.map(|k| k.state.as_str().to_owned()),
                    restorable_until: record
                        .filter(|k| k.state == KeyState::Destroyed)
                        .and_then(|k| k.deleted_at)
                        .map(|t| t.plus(cache.lifecycle().restore_window)),
                }
            }
            None => KeyInfo::default(),
        };
        let deployments: Vec<DeploymentInfo> = alerts
            .iter()
            .map(|a| {
                let view = cache.view(&a.deployment, now);
                DeploymentInfo {
                    crn: a.deployment.clone(),
                    name: name_of(cache, a),
                    alert_id: a.id.clone(),
                    alert_kind: a.kind.as_str().to_owned(),
                    severity: a.severity.as_str().to_owned(),
                    alert_summary: a.summary.clone(),
                    lifecycle: view.as_ref().map(|v| v.lifecycle.clone()),
                    disk: view.as_ref().map(|v| v.disk.as_str().to_owned()),
                    rewrap: view.as_ref().map(|v| v.rewrap.as_str().to_owned()),
                    authorization: view.as_ref().map(|v| v.authorization.as_str().to_owned()),
                    key_version: view.as_ref().and_then(|v| v.key_version.clone()),
                    restorable_until: view.as_ref().and_then(|v| v.restorable_until),
                    rewrap_deadline_at: view.as_ref().and_then(|v| v.rewrap_deadline_at),
                    deletion_authorized_until: view
                        .as_ref()
                        .and_then(|v| v.deletion_authorized_until),
                    purge_at: view.as_ref().and_then(|v| v.purge_at),
                }
            })
            .collect();
        let event = top.map_or_else(EventInfo::default, |a| EventInfo {
            action: a.action.clone(),
            event_time: a.event_time,
            correlation_id: a.correlation_id.clone(),
            initiator: a.initiator.clone(),
        });
        let advice = advice(&kind, &key, &deployments);
        let summary = format!(
            "{}{}: {}; {}.",
            happened(&kind, key.crn.as_deref().unwrap_or("(unknown)")),
            event_clause(&event),
            deployments_clause(&deployments),
            advice
        );
        Content {
            id: id.to_owned(),
            test: false,
            route: route.to_owned(),
            kind,
            severity,
            summary,
            key,
            deployments,
            event,
            advice,
            created_at,
        }
    }

    /// A clearly marked test notification (`keywatch test-alert`).
    pub fn test(id: &str, route: &str, now: Millis) -> Content {
        Content {
            id: id.to_owned(),
            test: true,
            route: route.to_owned(),
            kind: "test".to_owned(),
            severity: "info".to_owned(),
            summary: format!(
                "TEST notification from keywatch for route \"{route}\", sent at {now}: no key \
                 event happened and nothing needs to be done; it shows that this channel works."
            ),
            key: KeyInfo::default(),
            deployments: Vec::new(),
            event: EventInfo::default(),
            advice: "nothing to do: this is a test".to_owned(),
            created_at: now,
        }
    }

    /// The webhook's JSON body (spec section 4): `id`, `kind`, `severity`, `summary`, `key`,
    /// `deployments`, `event`, `created_at`, plus `test`, `route` and `advice`.
    pub fn webhook_body(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            kind: &'a str,
            severity: &'a str,
            summary: &'a str,
            key: &'a KeyInfo,
            deployments: &'a [DeploymentInfo],
            event: &'a EventInfo,
            created_at: Millis,
            advice: &'a str,
            route: &'a str,
            test: bool,
        }
        serde_json::to_string(&Body {
            id: &self.id,
            kind: &self.kind,
            severity: &self.severity,
            summary: &self.summary,
            key: &self.key,
            deployments: &self.deployments,
            event: &self.event,
            created_at: self.created_at,
            advice: &self.advice,
            route: &self.route,
            test: self.test,
        })
        .unwrap_or_else(|_| "{}".to_owned())
    }

    /// The e-mail: subject `[SEVERITY] kind: ...`, a plain text body and its HTML alternative.
    pub fn email(&self) -> EmailContent {
        let severity = self.severity.to_ascii_uppercase();
        let subject = if self.test {
            format!(
                "[{severity}] test: keywatch TEST notification for route {} (no action needed)",
                self.route
            )
        } else {
            let key = self.key.crn.as_deref().map_or("(unknown)", short_key);
            let n = self.deployments.len();
            format!(
                "[{severity}] {}: {}, {n} deployment{} affected",
                self.kind,
                happened(&self.kind, key),
                plural(n)
            )
        };
        EmailContent {
            subject,
            text: self.email_text(),
            html: self.email_html(),
        }
    }

    fn email_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "{}", self.summary);
        t.push('\n');
        if !self.test {
            let _ = writeln!(t, "What happened");
            let _ = writeln!(
                t,
                "  {}{}.",
                happened(&self.kind, self.key.crn.as_deref().unwrap_or("(unknown)")),
                event_clause(&self.event)
            );
            for (label, value) in self.event_facts() {
                let _ = writeln!(t, "  {label}: {value}");
            }
            t.push('\n');
            let _ = writeln!(t, "Key");
            let _ = writeln!(t, "  {}", self.key.crn.as_deref().unwrap_or("(unknown)"));
            let _ = writeln!(t, "  state now: {}", self.key_state());
            t.push('\n');
            let _ = writeln!(t, "Deployments ({})", self.deployments.len());
            for d in &self.deployments {
                let _ = writeln!(t, "  - {} ({})", d.name, d.crn);
                let _ = writeln!(
                    t,
                    "    alert: {} [{}]: {}",
                    d.alert_kind, d.severity, d.alert_summary
                );
                let _ = writeln!(t, "    now: {}", deployment_state(d));
            }
            t.push('\n');
        }
        let _ = writeln!(t, "What you can do");
        let _ = writeln!(t, "  {}.", capitalize(&self.advice));
        t.push('\n');
        let _ = writeln!(t, "-- ");
        let _ = writeln!(
            t,
            "keywatch, route \"{}\", notification {} (created {}).",
            self.route, self.id, self.created_at
        );
        t
    }

    fn email_html(&self) -> String {
        let e = escape;
        let mut h = String::new();
        h.push_str("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body style=\"font-family: sans-serif\">\n");
        let _ = writeln!(h, "<p><strong>{}</strong></p>", e(&self.summary));
        if !self.test {
            let _ = writeln!(
                h,
                "<h3>What happened</h3>\n<p>{}{}.</p>",
                e(&happened(
                    &self.kind,
                    self.key.crn.as_deref().unwrap_or("(unknown)")
                )),
                e(&event_clause(&self.event))
            );
            h.push_str("<table>\n");
            for (label, value) in self.event_facts() {
                let _ = writeln!(
                    h,
                    "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
                    e(label),
                    e(&value)
                );
            }
            h.push_str("</table>\n");
            let _ = writeln!(
                h,
                "<h3>Key</h3>\n<p><code>{}</code><br>state now: {}</p>",
                e(self.key.crn.as_deref().unwrap_or("(unknown)")),
                e(&self.key_state())
            );
            let _ = writeln!(h, "<h3>Deployments ({})</h3>", self.deployments.len());
            h.push_str("<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">\n<tr><th>deployment</th><th>alert</th><th>state now</th></tr>\n");
            for d in &self.deployments {
                let _ = writeln!(
                    h,
                    "<tr><td>{}<br><small><code>{}</code></small></td><td>{} [{}]: {}</td><td>{}</td></tr>",
                    e(&d.name),
                    e(&d.crn),
                    e(&d.alert_kind),
                    e(&d.severity),
                    e(&d.alert_summary),
                    e(&deployment_state(d))
                );
            }
            h.push_str("</table>\n");
        }
        let _ = writeln!(
            h,
            "<h3>What you can do</h3>\n<p>{}.</p>",
            e(&capitalize(&self.advice))
        );
        let _ = writeln!(
            h,
            "<hr><p><small>keywatch, route \"{}\", notification {} (created {}).</small></p>",
            e(&self.route),
            e(&self.id),
            self.created_at
        );
        h.push_str("</body></html>\n");
        h
    }

    fn event_facts(&self) -> Vec<(&'static str, String)> {
        let ev = &self.event;
        vec![
            (
                "action",
                ev.action.clone().unwrap_or_else(|| "-".to_owned()),
            ),
            (
                "event time",
                ev.event_time
                    .map_or_else(|| "-".to_owned(), |t| t.to_string()),
            ),
            ("initiator", initiator_text(ev.initiator.as_ref())),
            (
                "correlation id",
                ev.correlation_id.clone().unwrap_or_else(|| "-".to_owned()),
            ),
        ]
    }

    fn key_state(&self) -> String {
        let mut s = self
            .key
            .state
            .clone()
            .unwrap_or_else(|| "unknown".to_owned());
        if let Some(until) = self.key.restorable_until {
            let _ = write!(s, ", restorable until {until}");
        }
        s
    }
}

fn name_of(cache: &StateCache, a: &Alert) -> String {
    cache
        .deployment(&a.deployment)
        .map(|d| d.spec.name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| a.deployment.clone())
}

/// What happened, as the start of a sentence naming `key`.
fn happened(kind: &str, key: &str) -> String {
    match kind {
        "key_disabled" => format!("Key {key} was disabled"),
        "key_enabled" => format!("Key {key} was enabled"),
        "key_deleted" => format!("Key {key} was deleted"),
        "delete_blocked" => format!("Someone tried to delete key {key}; the deletion was refused"),
        "key_restored" => format!("Key {key} was restored"),
        "key_purged" => format!("Key {key} was purged"),
        "key_expired" => format!("Key {key} expired"),
        "deletion_authorized" => {
            format!("Deletion of key {key} was authorized (dual authorization)")
        }
        "deletion_authorization_cancelled" => {
            format!("The deletion authorization of key {key} was cancelled")
        }
        "key_rotated" => format!("Key {key} was rotated"),
        "rewrap_completed" => format!("The rewrap after the rotation of key {key} is complete"),
        "ack_failed" => format!("A rewrap onto key {key} failed"),
        "rewrap_overdue" => format!("The rewrap after the rotation of key {key} is overdue"),
        "authorization_revoked" => {
            format!("The IAM authorization to use key {key} was revoked")
        }
        "authorization_restored" => {
            format!("The IAM authorization to use key {key} was restored")
        }
        "deployment_soft_deleted" => format!("A deployment protected by key {key} was deleted"),
        "shared_key" => format!("Key {key} protects more than one deployment"),
        other => format!("{other} on key {key}"),
    }
}

/// ` at TIME by WHO, correlation id C`, with what is known.
fn event_clause(ev: &EventInfo) -> String {
    let mut s = String::new();
    if let Some(t) = ev.event_time {
        let _ = write!(s, " at {t}");
    }
    if ev.initiator.is_some() {
        let _ = write!(s, " by {}", initiator_text(ev.initiator.as_ref()));
    }
    if let Some(c) = &ev.correlation_id {
        let _ = write!(s, ", correlation id {c}");
    } else if ev.action.is_some() {
        s.push_str(", no correlation id");
    }
    s
}

fn initiator_text(initiator: Option<&Initiator>) -> String {
    match initiator {
        Some(Initiator {
            name: Some(name),
            id: Some(id),
        }) if name != id => format!("{name} ({id})"),
        Some(Initiator { name: Some(n), .. }) | Some(Initiator { id: Some(n), .. }) => n.clone(),
        _ => "an unknown initiator".to_owned(),
    }
}

/// `3 deployments affected (a, b, c), now disk shredded, rewrap current, authorization ok`.
fn deployments_clause(deployments: &[DeploymentInfo]) -> String {
    let n = deployments.len();
    let mut names: Vec<&str> = deployments
        .iter()
        .take(5)
        .map(|d| d.name.as_str())
        .collect();
    let more = n.saturating_sub(names.len());
    let more_text = format!("{more} more");
    if more > 0 {
        names.push(&more_text);
    }
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for d in deployments {
        *states.entry(short_state(d)).or_default() += 1;
    }
    let state = if states.len() == 1 {
        states.into_keys().next().unwrap_or_default()
    } else {
        states
            .into_iter()
            .map(|(s, count)| format!("{count} with {s}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "{n} deployment{} affected ({}), now {state}",
        plural(n),
        names.join(", ")
    )
}

fn short_state(d: &DeploymentInfo) -> String {
    match (&d.disk, &d.rewrap, &d.authorization) {
        (Some(disk), Some(rewrap), Some(auth)) => {
            let mut s = format!("disk {disk}, rewrap {rewrap}, authorization {auth}");
            if d.lifecycle.as_deref() == Some("soft_deleted") {
                s.insert_str(0, "soft-deleted, ");
            }
            s
        }
        _ => "state unknown".to_owned(),
    }
}

fn deployment_state(d: &DeploymentInfo) -> String {
    let mut s = match &d.lifecycle {
        Some(l) => format!("lifecycle {l}, {}", short_state(d)),
        None => short_state(d),
    };
    if let Some(t) = d.restorable_until {
        let _ = write!(s, ", restorable until {t}");
    }
    if let Some(t) = d.rewrap_deadline_at {
        let _ = write!(s, ", rewrap deadline {t}");
    }
    if let Some(t) = d.deletion_authorized_until {
        let _ = write!(s, ", deletion authorized until {t}");
    }
    if let Some(t) = d.purge_at {
        let _ = write!(s, ", purged at {t}");
    }
    s
}

/// What the operator can still do about it.
fn advice(kind: &str, key: &KeyInfo, deployments: &[DeploymentInfo]) -> String {
    let earliest =
        |f: fn(&DeploymentInfo) -> Option<Millis>| deployments.iter().filter_map(f).min();
    match kind {
        "key_disabled" => "enable the key to unlock their disks".to_owned(),
        "key_deleted" => match key
            .restorable_until
            .or_else(|| earliest(|d| d.restorable_until))
        {
            Some(until) => {
                format!("restore the key before {until} to recover their data")
            }
            None => "the key can no longer be restored".to_owned(),
        },
        "delete_blocked" => {
            "find out who tried to delete the key and why; nothing changed yet".to_owned()
        }
        "key_purged" => "their data cannot be recovered any more".to_owned(),
        "key_expired" => {
            "rotate or replace the key: data stays readable, but it can no longer be wrapped"
                .to_owned()
        }
        "deletion_authorized" => match earliest(|d| d.deletion_authorized_until) {
            Some(until) => {
                format!("if the deletion is not intended, cancel the authorization before {until}")
            }
            None => "if the deletion is not intended, cancel the authorization".to_owned(),
        },
        "key_rotated" | "ack_failed" | "rewrap_overdue" => {
            match earliest(|d| d.rewrap_deadline_at) {
                Some(deadline) if kind != "rewrap_overdue" => {
                    format!("rewrap them onto the new key version before {deadline}")
                }
                _ => "rewrap them onto the new key version now".to_owned(),
            }
        }
        "authorization_revoked" => {
            "restore the IAM service-to-service authorization to the key".to_owned()
        }
        "deployment_soft_deleted" => match earliest(|d| d.purge_at) {
            Some(at) => format!("restore the deployment before {at} to keep its data"),
            None => "restore the deployment to keep its data".to_owned(),
        },
        "shared_key" => {
            "consider a key per deployment: one key event affects all of them".to_owned()
        }
        _ => "no action needed".to_owned(),
    }
}

/// The key id (last CRN segment) for the subject line.
fn short_key(crn: &str) -> &str {
    crn.rsplit(':').find(|s| !s.is_empty()).map_or(crn, |id| id)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_test_content_is_marked() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let c = Content::test("t1", "ops", Millis(0));
        let mail = c.email();
        assert!(
            mail.subject.starts_with("[INFO] test: "),
            "{}",
            mail.subject
        );
        assert!(mail.subject.contains("TEST"));
        assert!(mail.text.starts_with("TEST notification"));
        let body: serde_json::Value = serde_json::from_str(&c.webhook_body()).expect("json");
        assert_eq!(body["test"], true);
        assert_eq!(body["id"], "t1");
    }

    #[test]
    fn the_key_id_is_the_last_crn_segment() {
        assert_eq!(
            short_key("crn:v1:bluemix:public:kms:us-south:a/acc:inst:key:abc-123"),
            "abc-123"
        );
        assert_eq!(short_key("plain"), "plain");
    }
}
