//! Routing: which routes an alert matches, and the recipients a route has for a deployment.

use super::Channel;
use crate::settings::{RouteSettings, Severity, WebhookSettings};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The word in a route's `email` list that stands for the deployment's owners.
pub const OWNERS: &str = "owners";

/// Whether `route` takes an alert of `kind` and `severity` on a deployment with `labels`
/// (`None`: the deployment is unknown, which only matches routes without `match_labels`).
pub fn matches(
    route: &RouteSettings,
    kind: &str,
    severity: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    if severity_rank(severity) < route.min_severity {
        return false;
    }
    if let Some(kinds) = &route.kinds {
        if !kinds.iter().any(|k| k == kind) {
            return false;
        }
    }
    route.match_labels.iter().all(|(name, value)| {
        labels
            .and_then(|labels| labels.get(name))
            .is_some_and(|v| v == value)
    })
}

/// The recipients of `route` for a deployment with these `owners`, without duplicates, in the
/// order the route names them: `(channel, recipient)`.
pub fn recipients(route: &RouteSettings, owners: &[String]) -> Vec<(Channel, String)> {
    let mut out: Vec<(Channel, String)> = Vec::new();
    let mut push = |channel: Channel, recipient: String| {
        if !recipient.is_empty() && !out.iter().any(|(c, r)| *c == channel && *r == recipient) {
            out.push((channel, recipient));
        }
    };
    for entry in &route.email {
        if entry == OWNERS {
            for owner in owners {
                push(Channel::Email, owner.trim().to_owned());
            }
        } else {
            push(Channel::Email, entry.trim().to_owned());
        }
    }
    for hook in &route.webhooks {
        push(Channel::Webhook, webhook_recipient(hook));
    }
    out
}

/// How a webhook is named in the store and the API: the URL without its path (which may carry a
/// token) plus a short hash of the whole URL, e.g. `https://hooks.example.com/... [1a2b3c4d]`.
pub fn webhook_recipient(hook: &WebhookSettings) -> String {
    let digest = Sha256::digest(hook.url.as_bytes());
    let short = crate::hex::encode(&digest[..4]);
    format!("{} [{short}]", hook.redacted_url())
}

/// The webhook of `route` that `recipient` names, if the route still has it.
pub fn find_webhook<'a>(route: &'a RouteSettings, recipient: &str) -> Option<&'a WebhookSettings> {
    route
        .webhooks
        .iter()
        .find(|hook| webhook_recipient(hook) == recipient)
}

/// An alert severity as the settings order them; unknown names count as `info`.
fn severity_rank(severity: &str) -> Severity {
    match severity {
        "critical" => Severity::Critical,
        "warning" => Severity::Warning,
        _ => Severity::Info,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> RouteSettings {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn severity_kinds_and_labels_all_have_to_match() {
        let r = route(
            r#"name = "ops"
               min_severity = "warning"
               kinds = ["key_deleted", "key_disabled"]
               match_labels = { env = "prod" }
               email = ["ops@example.com"]"#,
        );
        let prod: BTreeMap<String, String> = [("env".into(), "prod".into())].into();
        let dev: BTreeMap<String, String> = [("env".into(), "dev".into())].into();
        assert!(matches(&r, "key_deleted", "critical", Some(&prod)));
        assert!(matches(&r, "key_disabled", "warning", Some(&prod)));
        assert!(!matches(&r, "key_disabled", "info", Some(&prod)));
        assert!(!matches(&r, "key_rotated", "critical", Some(&prod)));
        assert!(!matches(&r, "key_deleted", "critical", Some(&dev)));
        assert!(!matches(&r, "key_deleted", "critical", None));
        let all = route(
            r#"name = "all"
                           email = ["a@example.com"]"#,
        );
        assert!(matches(&all, "shared_key", "info", None));
    }

    #[test]
    fn owners_expand_and_duplicates_collapse() {
        let r = route(
            r#"name = "ops"
               email = ["ops@example.com", "owners"]
               webhooks = [{ url = "https://hooks.example.com/secret-token", secret = "raw" }]"#,
        );
        let got = recipients(&r, &["alice@example.com".into(), "ops@example.com".into()]);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], (Channel::Email, "ops@example.com".into()));
        assert_eq!(got[1], (Channel::Email, "alice@example.com".into()));
        assert_eq!(got[2].0, Channel::Webhook);
        assert!(got[2].1.starts_with("https://hooks.example.com/... ["));
        assert!(!got[2].1.contains("secret-token"));
        assert!(find_webhook(&r, &got[2].1).is_some());
    }
}
