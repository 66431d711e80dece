//! Alert delivery (spec section 4): turns the durable outbox (stored alerts) into notifications
//! and sends them by e-mail and signed webhooks, independently of event processing.
//!
//! Two steps, both driven by one [`Worker`] per instance (`keywatch run` spawns it beside the
//! processing loop), both safe with several instances on one PostgreSQL store:
//!
//! 1. **Planning** ([`Worker::plan`]): alerts after the persisted planner cursor are routed
//!    (`[[routes]]`: `min_severity`, `kinds`, `match_labels`) to recipients (e-mail addresses, the
//!    deployment's `owners`, webhooks) and grouped: one notification per (route, channel,
//!    recipient, cause) listing every affected deployment, due `group_wait` after its first
//!    alert. Alerts of the same cause that arrive before the notification is first attempted join
//!    it; later ones start the group's next *generation*. Ids are a hash of (route, channel,
//!    recipient, cause[, generation]) and rows are inserted with `ON CONFLICT DO NOTHING`; the
//!    cursor moves in the same transaction, under the cursor's row lock, so planning twice (or on
//!    two instances) never duplicates and a restart neither loses nor re-plans an alert.
//! 2. **Sending**: due notifications are claimed with a lease (`FOR UPDATE SKIP LOCKED` on
//!    PostgreSQL), rendered once (the payload is frozen with the first attempt's outcome, so every
//!    retry sends the same body under the same `webhook-id`), sent, and marked delivered, retried
//!    later (exponential backoff with jitter; `Retry-After` on 429) or failed (other 4xx and 5xx
//!    SMTP replies at once; anything else after `[delivery] max_age`).
//!
//! Deployment names, owners, labels and their state now come from the key and deployment entities
//! of the store, loaded into an engine of this worker's own (`state.rs`), refreshed from the
//! entities written since the last look. Nothing here slows the processing loop down: attempts run
//! in tasks of their own, and on PostgreSQL planning holds only the planner cursor's row lock,
//! never the store's advisory write lock (on SQLite every write transaction is short and
//! serialized by the database anyway).
//!
//! Choices where the spec is silent:
//! - A webhook is named in the store and the API by its URL without the path (which may carry a
//!   token) and a short hash of the whole URL: `https://hooks.example.com/... [1a2b3c4d]`. Secrets
//!   are never stored; they are taken from the configuration at each attempt.
//! - A notification whose route or webhook is no longer configured fails (permanently) with that
//!   reason; e-mail addresses are taken as stored.
//! - `owners` of a deployment without owners reaches nobody on that route: logged as a warning.
//! - Alerts stored before this schema version existed are not delivered (the planner cursor starts
//!   at the end of the outbox as it was then).
//! - A redirect answer is a permanent failure (Standard Webhooks: do not follow redirects).
//! - The e-mail `Message-ID` is `<notification id@keywatch>`, stable across retries.
//! - On shutdown the worker plans what was committed, sends what is due at that moment within a
//!   deadline, and leaves everything else pending for the next start.

mod content;
mod email;
mod plan;
mod retry;
mod routes;
mod state;
mod test_alert;
mod webhook;
mod worker;

pub use content::{Content, DeploymentInfo, EmailContent, EventInfo, KeyInfo};
pub use routes::webhook_recipient;
pub use test_alert::{send_test_notifications, TestOutcome};
pub use worker::{Worker, WorkerOptions, WOKEN_POLL_INTERVAL};

use crate::metrics::Metrics;
use prometheus::{IntCounterVec, IntGauge};

/// What the delivery worker reports to Prometheus: `keywatch_notifications_total{channel,result}`
/// and `keywatch_outbox_pending`. Clones share the underlying series.
#[derive(Clone)]
pub struct DeliveryMetrics {
    pub notifications: IntCounterVec,
    pub outbox_pending: IntGauge,
}

impl DeliveryMetrics {
    pub fn new(metrics: &Metrics) -> DeliveryMetrics {
        DeliveryMetrics {
            notifications: metrics.notifications.clone(),
            outbox_pending: metrics.outbox_pending.clone(),
        }
    }

    /// The current value of `keywatch_notifications_total{channel, result}`.
    pub fn count(&self, channel: &str, result: &str) -> u64 {
        self.notifications
            .with_label_values(&[channel, result])
            .get()
    }
}

/// Why delivery could not start or a step failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("store: {0:#}")]
    Store(#[from] crate::store::StoreError),
    /// The configuration cannot be used (exit code 1 for `test-alert`).
    #[error("{0}")]
    Config(String),
}

/// The two notification channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Channel {
    Email,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
        }
    }

    pub fn parse(text: &str) -> Option<Channel> {
        match text {
            "email" => Some(Channel::Email),
            "webhook" => Some(Channel::Webhook),
            _ => None,
        }
    }
}

/// The result of one attempt to send, before the retry policy decides what it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Retrying cannot help (4xx other than 429, an SMTP 5xx reply, a bad address).
    Permanent(String),
    /// Worth retrying (5xx, 429, timeouts, connection errors, SMTP 4xx replies); `retry_after`
    /// is what the receiver asked for.
    Retryable {
        error: String,
        retry_after: Option<std::time::Duration>,
    },
}

impl Attempt {
    /// `Ok` when delivered, otherwise the error as one line.
    pub fn error(&self) -> Option<String> {
        match self {
            Attempt::Delivered => None,
            Attempt::Permanent(e) => Some(e.clone()),
            Attempt::Retryable { error, retry_after } => Some(match retry_after {
                Some(after) => format!(
                    "{error} (retry after {})",
                    crate::settings::display_duration(*after)
                ),
                None => error.clone(),
            }),
        }
    }
}
