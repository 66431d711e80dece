//! `keywatch test-alert`: a clearly marked test notification through every channel of the
//! configured routes, sent directly (not through the outbox), once, with the exact outcome.

use super::content::Content;
use super::email::EmailSender;
use super::routes::{self, OWNERS};
use super::webhook::WebhookSender;
use super::{Attempt, Channel, DeliveryError};
use crate::settings::{RouteSettings, Settings};
use crate::timefmt::Millis;

/// What happened on one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    pub route: String,
    pub channel: Channel,
    /// The address, or the webhook as the store names it (no path, no secret).
    pub recipient: String,
    /// `Err` holds the exact error.
    pub result: Result<(), String>,
}

/// Sends the test notification through every channel of `route` (every route when `None`).
/// `owners` in a route's e-mail list stands for the owners of the configured deployments the
/// route matches by labels. An unknown route, or none configured, is a configuration error.
pub async fn send_test_notifications(
    settings: &Settings,
    route: Option<&str>,
) -> Result<Vec<TestOutcome>, DeliveryError> {
    let names = || {
        settings
            .routes
            .iter()
            .map(|r| format!("{:?}", r.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let selected: Vec<&RouteSettings> = match route {
        Some(name) => match settings.routes.iter().find(|r| r.name == name) {
            Some(r) => vec![r],
            None if settings.routes.is_empty() => {
                return Err(DeliveryError::Config(format!(
                    "test-alert: unknown route {name:?}: no [[routes]] are configured"
                )))
            }
            None => {
                return Err(DeliveryError::Config(format!(
                    "test-alert: unknown route {name:?}; configured routes: {}",
                    names()
                )))
            }
        },
        None => settings.routes.iter().collect(),
    };
    if selected.is_empty() {
        return Err(DeliveryError::Config(
            "test-alert: no [[routes]] are configured, so there is no channel to test".to_owned(),
        ));
    }
    let webhooks = WebhookSender::new(settings.delivery.webhook_timeout)?;
    let email = EmailSender::new(&settings.smtp)?;
    let run = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let mut outcomes = Vec::new();
    for (index, route) in selected.into_iter().enumerate() {
        let owners = configured_owners(settings, route);
        let recipients = routes::recipients(route, &owners);
        if route.email.iter().any(|e| e == OWNERS) && owners.is_empty() {
            outcomes.push(TestOutcome {
                route: route.name.clone(),
                channel: Channel::Email,
                recipient: OWNERS.to_owned(),
                result: Err("no configured deployment matching this route has owners".to_owned()),
            });
        }
        for (n, (channel, recipient)) in recipients.into_iter().enumerate() {
            let id = format!("test-{run}-{index}-{n}");
            let content = Content::test(&id, &route.name, Millis::now());
            let attempt = match channel {
                Channel::Webhook => match routes::find_webhook(route, &recipient) {
                    Some(hook) => webhooks.send(hook, &id, &content.webhook_body()).await,
                    None => Attempt::Permanent("webhook not found".to_owned()),
                },
                Channel::Email => match &email {
                    Some(sender) => sender.send(&recipient, &id, &content.email()).await,
                    None => Attempt::Permanent(
                        "e-mail is not configured (smtp.host and smtp.from)".to_owned(),
                    ),
                },
            };
            outcomes.push(TestOutcome {
                route: route.name.clone(),
                channel,
                recipient,
                result: match attempt.error() {
                    None => Ok(()),
                    Some(e) => Err(e),
                },
            });
        }
    }
    Ok(outcomes)
}

/// The owners of the configured deployments whose labels the route matches.
fn configured_owners(settings: &Settings, route: &RouteSettings) -> Vec<String> {
    let mut owners: Vec<String> = Vec::new();
    for d in &settings.deployments {
        let labelled = route
            .match_labels
            .iter()
            .all(|(k, v)| d.labels.get(k) == Some(v));
        if labelled {
            for o in &d.owners {
                if !owners.contains(o) {
                    owners.push(o.clone());
                }
            }
        }
    }
    owners
}
