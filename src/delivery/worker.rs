//! The worker: one loop per instance that plans new alerts, claims due notifications, renders
//! them and sends them, with a bounded number of attempts in flight.
//!
//! The loop never waits for a receiver: every attempt runs in a task of its own (at most
//! [`WorkerOptions::max_in_flight`]), bounded by a hard timeout shorter than its lease, and hands
//! its outcome back to the loop. Each turn of the loop writes at most two transactions: planning
//! (only when the outbox grew) and one that records every outcome that arrived meanwhile and
//! claims what is due, so the store sees one commit (one disk flush) per turn, not per message.
//! Store errors pause the loop with a growing backoff; nothing here can stop event processing.
//!
//! On shutdown the worker plans what was committed until then, sends what is due at that moment
//! (waiting at most [`WorkerOptions::flush_deadline`]) and leaves the rest pending in the store
//! for the next start.

use super::content::{Content, EmailContent};
use super::email::EmailSender;
use super::plan::{self, Planned};
use super::retry;
use super::routes::find_webhook;
use super::state::StateCache;
use super::webhook::WebhookSender;
use super::{Attempt, Channel, DeliveryError, DeliveryMetrics};
use crate::engine::Alert;
use crate::settings::{
    display_duration, DeliverySettings, RouteSettings, Settings, WebhookSettings,
};
use crate::store::{AttemptOutcome, Claim, FinishedAttempt, NotificationRow, Store};
use crate::timefmt::Millis;
use crate::wait::or_never;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Alerts read per planning transaction.
const PLAN_BATCH: i64 = 1000;
/// How often `keywatch_outbox_pending` is refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// A notification rendered within this long after the last look at the store shows the state
/// of that look.
const FRESH_STATE: Duration = Duration::from_millis(100);
/// Without routes, planning only moves the outbox cursor past the new alerts (nothing is
/// routed anywhere): it then runs at most this often, and before stopping, instead of in a write
/// transaction of its own every poll (about one per processed batch under load).
const UNROUTED_PLAN_INTERVAL: Duration = Duration::from_secs(1);
/// The poll interval of a worker that is woken for its own process's alerts (see
/// [`Worker::with_wakeup`]), as in `keywatch run`: what is left to see is other instances' work.
pub const WOKEN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The longest pause after repeated store errors.
const MAX_ERROR_PAUSE: Duration = Duration::from_secs(10);

/// Tuning of the worker (not configuration: the defaults suit production and tests alike).
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// How often the outbox and the due notifications are looked at when nothing happens.
    pub poll_interval: Duration,
    /// Attempts in flight at once.
    pub max_in_flight: usize,
    /// On shutdown, how long to keep sending what is due.
    pub flush_deadline: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            poll_interval: Duration::from_millis(25),
            max_in_flight: 32,
            flush_deadline: Duration::from_secs(10),
        }
    }
}

/// The delivery worker of one instance. See the module documentation of `delivery`.
pub struct Worker {
    shared: Arc<Shared>,
    cache: StateCache,
    options: WorkerOptions,
    /// The planner cursor as last seen: nothing to plan while the outbox ends there.
    known_planned: i64,
    /// When the last planning round without routes ran (see [`UNROUTED_PLAN_INTERVAL`]).
    unrouted_planned_at: Option<Instant>,
    /// See [`Worker::with_wakeup`].
    wakeup: Option<Arc<tokio::sync::Notify>>,
}

/// Per finished attempt whether it was recorded, and the notifications claimed.
type Recorded = (Vec<bool>, Vec<NotificationRow>);

/// What attempts (running in tasks of their own) need.
struct Shared {
    store: Store,
    routes: Vec<RouteSettings>,
    delivery: DeliverySettings,
    webhooks: WebhookSender,
    email: Option<EmailSender>,
    metrics: DeliveryMetrics,
    /// Hard bound on one attempt; the lease is longer.
    attempt_timeout: Duration,
    lease: Duration,
}

/// One claimed notification, ready to send.
struct Job {
    row: NotificationRow,
    payload: String,
    /// Rendered now (not yet stored).
    fresh: bool,
    target: Target,
}

enum Target {
    Webhook(WebhookSettings),
    Email(String),
    /// Cannot be sent with the current configuration: fails permanently with this reason.
    Unusable(String),
}

impl Worker {
    /// A worker on `store` with the routes, SMTP and delivery settings of `settings`.
    pub fn new(
        settings: &Settings,
        store: Store,
        metrics: DeliveryMetrics,
    ) -> Result<Worker, DeliveryError> {
        let delivery = settings.delivery.clone();
        let attempt_timeout = delivery.webhook_timeout.max(settings.smtp.timeout) * 3;
        let shared = Shared {
            store,
            routes: settings.routes.clone(),
            webhooks: WebhookSender::new(delivery.webhook_timeout)?,
            email: EmailSender::new(&settings.smtp)?,
            delivery,
            metrics,
            attempt_timeout,
            lease: attempt_timeout + Duration::from_secs(30),
        };
        Ok(Worker {
            shared: Arc::new(shared),
            cache: StateCache::new(crate::setup::lifecycle(settings)),
            options: WorkerOptions::default(),
            known_planned: 0,
            unrouted_planned_at: None,
            wakeup: None,
        })
    }

    pub fn with_options(mut self, options: WorkerOptions) -> Worker {
        self.options = options;
        self
    }

    /// Looks at the store as soon as `wakeup` is signalled (after a commit of this process that
    /// wrote alerts), besides every [`WorkerOptions::poll_interval`] (alerts of instances that
    /// stopped before planning them, retries and leases changed by other instances).
    pub fn with_wakeup(mut self, wakeup: Arc<tokio::sync::Notify>) -> Worker {
        self.wakeup = Some(wakeup);
        self
    }

    /// Plans every alert stored after the planner cursor (in transactions of at most 1000
    /// alerts). Safe to call at any time, from any number of instances.
    pub async fn plan(&mut self) -> Result<Planned, DeliveryError> {
        self.unrouted_planned_at = None;
        Ok(self.plan_then(&[], None).await?.0)
    }

    /// [`plan`](Worker::plan); when it plans anything, its last transaction also records
    /// `finished` and runs `claim` (one commit for all), and returns what that did.
    async fn plan_then(
        &mut self,
        finished: &[FinishedAttempt],
        claim: Option<&Claim>,
    ) -> Result<(Planned, Option<Recorded>), DeliveryError> {
        let store = self.shared.store.clone();
        let mut total = Planned::default();
        let routed = !self.shared.routes.is_empty();
        if !routed {
            if self
                .unrouted_planned_at
                .is_some_and(|t| t.elapsed() < UNROUTED_PLAN_INTERVAL)
            {
                return Ok((total, None));
            }
            self.unrouted_planned_at = Some(Instant::now());
        }
        loop {
            // Every alert up to `bound` is committed, and with it the entities it refers to: a
            // refresh after reading the bound sees them. Routing reads only a deployment's labels
            // and owners, which change with the registry, not with events: the cache is refreshed
            // when it is older than FRESH_STATE or lacks a deployment an alert names, not for
            // every planning round (under load that reloaded every changed deployment each time).
            let bound = store.max_alert_seq().await?;
            if bound <= self.known_planned {
                return Ok((total, None));
            }
            // Before taking the write lock, not while holding it: a refresh that reads many
            // changed documents would otherwise keep the event processing waiting.
            // Without routes nothing is routed: no deployment data needed.
            if routed {
                self.cache.refresh_if_older(&store, FRESH_STATE).await?;
            }
            let mut tx = store.begin_planning().await?;
            let alerts = tx.alerts_after_cursor(bound, PLAN_BATCH).await?;
            if routed
                && alerts
                    .iter()
                    .any(|a| self.cache.deployment(&a.deployment).is_none())
            {
                self.cache.refresh(&store).await?;
            }
            let complete = (alerts.len() as i64) < PLAN_BATCH;
            let reached = match alerts.last() {
                Some(last) if !complete => last.seq,
                _ => bound,
            };
            if alerts.is_empty() && tx.cursor() >= bound {
                self.known_planned = tx.cursor();
                tx.rollback().await?;
                return Ok((total, None));
            }
            let groups = plan::group(&self.shared.routes, &alerts, &self.cache);
            let planned = plan::write(&mut tx, groups, OffsetDateTime::now_utc()).await?;
            tx.set_cursor(reached).await?;
            let recorded = if complete && (!finished.is_empty() || claim.is_some()) {
                Some(tx.record_and_claim(finished, claim).await?)
            } else {
                None
            };
            tx.commit().await?;
            self.known_planned = reached;
            if planned.created + planned.extended > 0 {
                tracing::debug!(
                    alerts = alerts.len(),
                    created = planned.created,
                    extended = planned.extended,
                    "delivery: alerts planned"
                );
            }
            total.alerts += alerts.len();
            total.created += planned.created;
            total.extended += planned.extended;
            if recorded.is_some() {
                return Ok((total, recorded));
            }
        }
    }

    /// Runs until `shutdown` is cancelled, then flushes (see the module documentation).
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(
            routes = self.shared.routes.len(),
            store = %self.shared.store.url(),
            "delivery worker started"
        );
        let (done, mut outcomes) = mpsc::channel(self.options.max_in_flight.max(1) * 2);
        let mut tasks: JoinSet<()> = JoinSet::new();
        // Outcomes received and not yet recorded.
        let mut finished: Vec<FinishedAttempt> = Vec::new();
        let mut errors: u32 = 0;
        let mut gauge_at = Instant::now();
        loop {
            collect(&mut outcomes, &mut finished, &mut tasks);
            if shutdown.is_cancelled() {
                break;
            }
            let wake = match self.step(&mut finished, &mut tasks, &done, None).await {
                Ok(wake) => {
                    errors = 0;
                    wake
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    let pause = self
                        .options
                        .poll_interval
                        .saturating_mul(2u32.saturating_pow(errors.min(16)))
                        .min(MAX_ERROR_PAUSE);
                    tracing::warn!(error = %e, retry_in = ?pause, "delivery: cannot plan, record or claim notifications");
                    Instant::now() + pause
                }
            };
            if Instant::now() >= gauge_at {
                self.update_gauge().await;
                gauge_at = Instant::now() + GAUGE_INTERVAL;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                Some(outcome) = outcomes.recv() => finished.push(outcome),
                _ = tokio::time::sleep_until(wake) => {}
                _ = or_never(self.wakeup.as_deref().map(tokio::sync::Notify::notified)) => {}
            }
        }
        self.flush(tasks, finished, done, outcomes).await;
        self.update_gauge().await;
        tracing::info!("delivery worker stopped");
    }

    /// One turn of the loop: plans (unless flushing), records the finished attempts and claims
    /// what is due at `cutoff` (default: now) in one transaction, starts the claimed attempts.
    /// Returns when to look again.
    async fn step(
        &mut self,
        finished: &mut Vec<FinishedAttempt>,
        tasks: &mut JoinSet<()>,
        done: &mpsc::Sender<FinishedAttempt>,
        cutoff: Option<OffsetDateTime>,
    ) -> Result<Instant, DeliveryError> {
        let mut wake = Instant::now() + self.options.poll_interval;
        let free = self.options.max_in_flight.saturating_sub(tasks.len());
        let now = OffsetDateTime::now_utc();
        let due_at = cutoff.unwrap_or(now);
        let claim = (free > 0).then(|| Claim {
            due_at,
            lease_until: now + self.shared.lease,
            limit: free as i64,
        });
        // Planning, recording and claiming in one transaction when there is something to plan
        // (never while flushing: the flush planned once before it started).
        let mut done_with = match cutoff {
            None => self.plan_then(finished, claim.as_ref()).await?.1,
            Some(_) => None,
        };
        if done_with.is_none() {
            let next_due = match free {
                0 => None, // a finishing attempt wakes the loop
                _ => self.shared.store.next_notification_due().await?,
            };
            let claim_now = next_due.is_some_and(|due| due <= due_at);
            if let Some(due) = next_due.filter(|due| *due > due_at) {
                wake = wake.min(Instant::now() + Duration::try_from(due - now).unwrap_or_default());
            }
            if finished.is_empty() && !claim_now {
                return Ok(wake);
            }
            let claim = claim.filter(|_| claim_now);
            done_with = Some(
                self.shared
                    .store
                    .record_and_claim(finished, claim.as_ref())
                    .await?,
            );
        }
        let (recorded, rows) = done_with.unwrap_or_default();
        for (a, ok) in finished.iter().zip(recorded) {
            if !ok {
                tracing::warn!(notification = %a.id, attempt = a.attempt, "delivery: the notification was taken over after its lease ended; this attempt's outcome is not recorded");
            }
        }
        finished.clear();
        let claimed = rows.len();
        // A failure from here on leaves the claimed rows leased: they are retried after it.
        for job in self.prepare(rows).await? {
            tasks.spawn(attempt(self.shared.clone(), job, done.clone()));
        }
        if claimed > 0 && claimed == free {
            wake = Instant::now(); // maybe more are due
        }
        Ok(wake)
    }

    /// Makes claimed notifications ready to send: the stored payload, or one rendered now from
    /// their alerts and the deployments' state.
    async fn prepare(&mut self, rows: Vec<NotificationRow>) -> Result<Vec<Job>, DeliveryError> {
        let store = self.shared.store.clone();
        let now = OffsetDateTime::now_utc();
        let mut alerts: HashMap<String, Alert> = HashMap::new();
        if rows.iter().any(|r| r.payload.is_none()) {
            self.cache.refresh_if_older(&store, FRESH_STATE).await?;
            let mut ids: Vec<String> = rows
                .iter()
                .filter(|r| r.payload.is_none())
                .flat_map(|r| r.alert_ids.iter().cloned())
                .collect();
            ids.sort();
            ids.dedup();
            for row in store.alerts_by_ids(&ids).await? {
                match serde_json::from_value::<Alert>(row.doc) {
                    Ok(alert) => {
                        alerts.insert(row.id, alert);
                    }
                    Err(e) => {
                        tracing::error!(alert = %row.id, error = %e, "delivery: a stored alert cannot be read; it is left out of its notification")
                    }
                }
            }
        }
        let now_ms = Millis::from_offset_date_time(now);
        Ok(rows
            .into_iter()
            .map(|row| {
                let channel = Channel::parse(&row.channel);
                let target = self.target(&row, channel);
                let (payload, fresh) = match &row.payload {
                    Some(p) => (p.clone(), false),
                    None => {
                        let carried: Vec<Alert> = row
                            .alert_ids
                            .iter()
                            .filter_map(|id| alerts.get(id).cloned())
                            .collect();
                        let content = Content::build(
                            &row.id,
                            &row.route,
                            &carried,
                            &self.cache,
                            Millis::from_offset_date_time(row.created_at),
                            now_ms,
                        );
                        let payload = match channel {
                            Some(Channel::Email) => {
                                serde_json::to_string(&content.email()).unwrap_or_default()
                            }
                            _ => content.webhook_body(),
                        };
                        (payload, true)
                    }
                };
                Job {
                    row,
                    payload,
                    fresh,
                    target,
                }
            })
            .collect())
    }

    fn target(&self, row: &NotificationRow, channel: Option<Channel>) -> Target {
        let Some(route) = self.shared.routes.iter().find(|r| r.name == row.route) else {
            return Target::Unusable(format!("route {:?} is no longer configured", row.route));
        };
        match channel {
            Some(Channel::Webhook) => match find_webhook(route, &row.recipient) {
                Some(hook) => Target::Webhook(hook.clone()),
                None => Target::Unusable(format!(
                    "route {:?} no longer has the webhook {}",
                    row.route, row.recipient
                )),
            },
            Some(Channel::Email) if self.shared.email.is_some() => {
                Target::Email(row.recipient.clone())
            }
            Some(Channel::Email) => {
                Target::Unusable("e-mail is not configured (smtp.host and smtp.from)".to_owned())
            }
            None => Target::Unusable(format!("unknown channel {:?}", row.channel)),
        }
    }

    /// On shutdown: plans what was committed, sends what is due now, waits for the attempts at
    /// most until the flush deadline, and records every outcome it got.
    async fn flush(
        &mut self,
        mut tasks: JoinSet<()>,
        mut finished: Vec<FinishedAttempt>,
        done: mpsc::Sender<FinishedAttempt>,
        mut outcomes: mpsc::Receiver<FinishedAttempt>,
    ) {
        let deadline = Instant::now() + self.options.flush_deadline;
        if let Err(e) = self.plan().await {
            tracing::warn!(error = %e, "delivery: cannot plan the last alerts before stopping; they are planned at the next start");
        }
        // Only what is due now: a retry scheduled during the flush waits for the next start.
        let cutoff = OffsetDateTime::now_utc();
        loop {
            collect(&mut outcomes, &mut finished, &mut tasks);
            if let Err(e) = self
                .step(&mut finished, &mut tasks, &done, Some(cutoff))
                .await
            {
                tracing::warn!(error = %e, "delivery: cannot record or claim notifications while stopping");
            }
            if tasks.is_empty() && outcomes.is_empty() && finished.is_empty() {
                break;
            }
            tokio::select! {
                Some(outcome) = outcomes.recv() => finished.push(outcome),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(running = tasks.len(), "delivery: attempts still running at the shutdown deadline; they are retried after the next start");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    collect(&mut outcomes, &mut finished, &mut tasks);
                    if let Err(e) = self.shared.store.record_and_claim(&finished, None).await {
                        tracing::error!(error = %e, attempts = finished.len(), "delivery: cannot record attempts; they are repeated after their leases");
                    }
                    break;
                }
            }
        }
    }

    async fn update_gauge(&self) {
        match self.shared.store.pending_notifications().await {
            Ok(n) => self.shared.metrics.outbox_pending.set(n),
            Err(e) => tracing::debug!(error = %e, "delivery: cannot count pending notifications"),
        }
    }
}

/// One attempt: send, decide, count, and hand the outcome to the loop, which records it.
async fn attempt(shared: Arc<Shared>, job: Job, done: mpsc::Sender<FinishedAttempt>) {
    let row = &job.row;
    let result = match &job.target {
        Target::Unusable(reason) => Attempt::Permanent(reason.clone()),
        Target::Webhook(hook) => {
            bounded(
                shared.attempt_timeout,
                shared.webhooks.send(hook, &row.id, &job.payload),
            )
            .await
        }
        Target::Email(to) => match (
            &shared.email,
            serde_json::from_str::<EmailContent>(&job.payload),
        ) {
            (Some(sender), Ok(mail)) => {
                bounded(shared.attempt_timeout, sender.send(to, &row.id, &mail)).await
            }
            (None, _) => Attempt::Permanent("e-mail is not configured".to_owned()),
            (_, Err(e)) => Attempt::Permanent(format!("the stored e-mail cannot be read: {e}")),
        },
    };
    let now = OffsetDateTime::now_utc();
    let outcome = retry::decide(&result, row.attempts, row.created_at, now, &shared.delivery);
    let label = match &outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Retry { .. } => "retried",
        AttemptOutcome::Failed { .. } => "failed",
    };
    if let Some(channel) = Channel::parse(&row.channel) {
        shared
            .metrics
            .notifications
            .with_label_values(&[channel.as_str(), label])
            .inc();
    }
    match &outcome {
        AttemptOutcome::Delivered => {
            tracing::info!(notification = %row.id, route = %row.route, channel = %row.channel, recipient = %row.recipient, attempt = row.attempts, alerts = row.alert_ids.len(), "notification delivered")
        }
        AttemptOutcome::Retry { at, error } => {
            tracing::warn!(notification = %row.id, route = %row.route, channel = %row.channel, recipient = %row.recipient, attempt = row.attempts, %error, retry_at = %Millis::from_offset_date_time(*at), "notification not delivered; retrying")
        }
        AttemptOutcome::Failed { error } => {
            tracing::error!(notification = %row.id, route = %row.route, channel = %row.channel, recipient = %row.recipient, attempt = row.attempts, %error, "notification failed")
        }
    }
    let finished = FinishedAttempt {
        id: row.id.clone(),
        attempt: row.attempts,
        outcome,
        payload: job.fresh.then(|| job.payload.clone()),
        at: now,
    };
    if done.send(finished).await.is_err() {
        tracing::error!(notification = %row.id, "delivery: the worker stopped; the attempt is repeated after its lease");
    }
}

/// Takes the outcomes that arrived and reaps the attempt tasks that ended.
fn collect(
    outcomes: &mut mpsc::Receiver<FinishedAttempt>,
    finished: &mut Vec<FinishedAttempt>,
    tasks: &mut JoinSet<()>,
) {
    while let Ok(outcome) = outcomes.try_recv() {
        finished.push(outcome);
    }
    while let Some(ended) = tasks.try_join_next() {
        report_panic(ended);
    }
}

/// `send` with a hard deadline (a retryable failure when it passes).
async fn bounded(limit: Duration, send: impl std::future::Future<Output = Attempt>) -> Attempt {
    match tokio::time::timeout(limit, send).await {
        Ok(result) => result,
        Err(_) => Attempt::Retryable {
            error: format!("timed out after {}", display_duration(limit)),
            retry_after: None,
        },
    }
}

fn report_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "delivery: an attempt panicked; the notification is retried after its lease");
        }
    }
}
