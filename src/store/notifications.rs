//! Notification rows (the delivery side of the outbox): the planner's transaction and cursor,
//! claiming due notifications, recording attempts, and the read side (counts, per-alert status).
//!
//! # Planning
//! [`Store::begin_planning`] locks the one row of `delivery_cursor` (PostgreSQL `FOR UPDATE`,
//! SQLite `BEGIN IMMEDIATE`), so planners of all instances run one at a time without holding the
//! store's write lock (event processing is never blocked by planning). Inside a [`PlanTx`] the
//! planner reads the alerts after the cursor (gap-safe, see the store module), upserts
//! notifications and moves the cursor, all in one transaction.
//!
//! # Claiming
//! [`Store::claim_notifications`] is one statement: it picks due pending rows (PostgreSQL with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait for or take each other's rows),
//! counts the attempt and moves `next_attempt_at` to the end of a lease. Until the lease ends no
//! other instance claims the row; an instance that dies mid-send leaves it to be retried after
//! the lease. [`Store::finish_attempt`] records the outcome only if the row is still the caller's
//! (same attempt number, still pending).
//!
//! A notification that was attempted (`attempts > 0`) never changes its alerts again: later alerts
//! of its group go into a new row of the next `generation`.

use super::{
    alert_from_tuple, json_from_text, query_error, timestamp_from_text, timestamp_text, AlertRow,
    AlertTuple, Backend, EntityRow, Pool, Store, StoreError, Tx, WriteTurn, ROWS_PER_STATEMENT,
    WRITE_LOCK_TIMEOUT,
};
use serde_json::{json, Value};
use sqlx::QueryBuilder;
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use time::OffsetDateTime;

/// One stored notification.
#[derive(Clone, Debug, PartialEq)]
pub struct NotificationRow {
    pub id: String,
    pub route: String,
    /// `email` or `webhook`.
    pub channel: String,
    /// An e-mail address, or a webhook's identity (see the delivery module).
    pub recipient: String,
    pub cause: String,
    /// 0 for the first notification of its group, then 1, 2, ...
    pub generation: i64,
    /// The alerts it carries, in the order they joined.
    pub alert_ids: Vec<String>,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Attempts started (each claim counts one).
    pub attempts: i64,
    /// When it is due (pending), the end of the current lease (claimed), or when it finished.
    pub next_attempt_at: OffsetDateTime,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// The rendered message, stored with the first attempt's outcome.
    pub payload: Option<String>,
}

/// A notification to insert.
#[derive(Clone, Debug, PartialEq)]
pub struct NewNotification {
    pub id: String,
    pub route: String,
    pub channel: String,
    pub recipient: String,
    pub cause: String,
    pub generation: i64,
    pub alert_ids: Vec<String>,
    /// When it becomes due (the first alert's time plus the route's `group_wait`).
    pub next_attempt_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
}

/// What became of one attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptOutcome {
    Delivered,
    /// Try again at `at`.
    Retry {
        at: OffsetDateTime,
        error: String,
    },
    /// Given up: a permanent error, or retried until the maximum age.
    Failed {
        error: String,
    },
}

/// The outcome of one attempt, for [`Store::record_and_claim`].
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedAttempt {
    pub id: String,
    /// The attempt number the claim returned (the row's `attempts` then).
    pub attempt: i64,
    pub outcome: AttemptOutcome,
    /// The rendered message, stored if the row has none yet.
    pub payload: Option<String>,
    pub at: OffsetDateTime,
}

/// What [`Store::record_and_claim`] claims: at most `limit` pending notifications due at
/// `due_at`, each leased until `lease_until`.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub due_at: OffsetDateTime,
    pub lease_until: OffsetDateTime,
    pub limit: i64,
}

/// The planner's transaction; it holds the `delivery_cursor` row. Dropping it without
/// [`commit`](PlanTx::commit) rolls everything back.
pub struct PlanTx<'a> {
    tx: Tx,
    /// Declared after `tx`: dropped after it.
    _turn: WriteTurn,
    backend: Backend,
    cursor: i64,
    _store: PhantomData<&'a Store>,
}

impl Store {
    /// Notifications not yet delivered nor given up (`keywatch_outbox_pending`).
    pub async fn pending_notifications(&self) -> Result<i64, StoreError> {
        let n: (i64,) = on_pool!(&self.pool, |p| {
            sqlx::query_as("SELECT COUNT(*) FROM notifications WHERE status = 'pending'")
                .fetch_one(p)
                .await
        })
        .map_err(query_error("count pending notifications"))?;
        Ok(n.0)
    }

    /// Per alert id: the notifications that carry it, as `[{channel, recipient, status, attempts, last_error}]`.
    pub async fn delivery_status(
        &self,
        alerts: &[(String, String)],
    ) -> Result<HashMap<String, Value>, StoreError> {
        let mut out: HashMap<String, Value> = HashMap::new();
        if alerts.is_empty() {
            return Ok(out);
        }
        let mut causes: Vec<&str> = alerts.iter().map(|(_, c)| c.as_str()).collect();
        causes.sort();
        causes.dedup();
        type Row = (String, String, String, String, i64, Option<String>);
        let mut rows: Vec<Row> = Vec::new();
        for chunk in causes.chunks(200) {
            let mut part: Vec<Row> = on_pool!(&self.pool, |p| {
                let mut q = sqlx::QueryBuilder::new(
                    "SELECT CAST(alert_ids AS TEXT), channel, recipient, status, CAST(attempts AS BIGINT), last_error FROM notifications WHERE cause IN (",
                );
                let mut sep = q.separated(", ");
                for c in chunk {
                    sep.push_bind(*c);
                }
                q.push(")");
                q.build_query_as().fetch_all(p).await
            })
            .map_err(query_error("read notifications"))?;
            rows.append(&mut part);
        }
        for (ids, channel, recipient, status, attempts, last_error) in rows {
            let ids: Vec<String> = serde_json::from_str(&ids).unwrap_or_default();
            for id in ids {
                if alerts.iter().any(|(a, _)| *a == id) {
                    let entry = out.entry(id).or_insert_with(|| json!([]));
                    if let Some(list) = entry.as_array_mut() {
                        list.push(
                            json!({ "channel": channel, "recipient": recipient, "status": status,
                                          "attempts": attempts, "last_error": last_error }),
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// The highest alert sequence number stored (0 when there is none): a cheap "anything new?".
    pub async fn max_alert_seq(&self) -> Result<i64, StoreError> {
        on_pool!(&self.pool, |p| sqlx::query_scalar(
            "SELECT COALESCE(MAX(seq), 0) FROM alerts"
        )
        .fetch_one(p)
        .await)
        .map_err(query_error("read the outbox position"))
    }

    /// The planner's cursor: every alert with `seq` up to it has been planned.
    pub async fn planned_seq(&self) -> Result<i64, StoreError> {
        on_pool!(&self.pool, |p| sqlx::query_scalar(
            "SELECT planned_seq FROM delivery_cursor WHERE singleton = 1"
        )
        .fetch_one(p)
        .await)
        .map_err(query_error("read the delivery cursor"))
    }

    /// Starts planning: waits (at most [`WRITE_LOCK_TIMEOUT`]) for other planners, then holds
    /// the cursor until commit or drop.
    pub async fn begin_planning(&self) -> Result<PlanTx<'_>, StoreError> {
        const SELECT_CURSOR: &str = "SELECT planned_seq FROM delivery_cursor WHERE singleton = 1";
        let turn = self.write_turn().await?;
        let (tx, cursor) = match &self.pool {
            Pool::Sqlite { write, .. } => {
                let mut t = write
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(query_error("begin planning"))?;
                let cursor: i64 = sqlx::query_scalar(SELECT_CURSOR)
                    .fetch_one(&mut *t)
                    .await
                    .map_err(query_error("read the delivery cursor"))?;
                (Tx::Sqlite(t), cursor)
            }
            Pool::Postgres(p) => {
                // One round trip: BEGIN and the transaction's lock timeout.
                let mut t = p
                    .begin_with(format!(
                        "BEGIN; SET LOCAL lock_timeout = '{}ms'",
                        WRITE_LOCK_TIMEOUT.as_millis()
                    ))
                    .await
                    .map_err(query_error("begin planning"))?;
                // After waiting for the lock, READ COMMITTED returns the newest committed row,
                // and every later statement sees what the previous planner committed.
                let cursor: i64 = sqlx::query_scalar(&format!("{SELECT_CURSOR} FOR UPDATE"))
                    .fetch_one(&mut *t)
                    .await
                    .map_err(query_error("lock the delivery cursor"))?;
                (Tx::Postgres(t), cursor)
            }
        };
        Ok(PlanTx {
            tx,
            _turn: turn,
            backend: self.backend(),
            cursor,
            _store: PhantomData,
        })
    }

    /// Claims at most `limit` pending notifications due at `now`, oldest due first: each gets
    /// one more attempt and is leased until `lease_until`. Returns them as updated.
    pub async fn claim_notifications(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StoreError> {
        let claim = Claim {
            due_at: now,
            lease_until,
            limit,
        };
        Ok(self.record_and_claim(&[], Some(&claim)).await?.1)
    }

    /// Records the outcome of attempt number `attempt` of notification `id`, and stores `payload`
    /// if none is stored yet. Returns false (and changes nothing) when the row is no longer this
    /// attempt's: finished already, or claimed again by someone else after the lease ended.
    pub async fn finish_attempt(
        &self,
        id: &str,
        attempt: i64,
        outcome: &AttemptOutcome,
        payload: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let finished = FinishedAttempt {
            id: id.to_owned(),
            attempt,
            outcome: outcome.clone(),
            payload: payload.map(str::to_owned),
            at: now,
        };
        Ok(self.record_and_claim(&[finished], None).await?.0[0])
    }

    /// In one transaction (one commit, one disk flush): records finished attempts (returning per
    /// attempt whether it was still the caller's, see [`finish_attempt`](Store::finish_attempt)),
    /// then claims due notifications as [`claim_notifications`](Store::claim_notifications) does.
    pub async fn record_and_claim(
        &self,
        finished: &[FinishedAttempt],
        claim: Option<&Claim>,
    ) -> Result<(Vec<bool>, Vec<NotificationRow>), StoreError> {
        if finished.is_empty() && claim.is_none_or(|c| c.limit <= 0) {
            return Ok((Vec::new(), Vec::new()));
        }
        let begin = query_error("begin recording delivery attempts");
        let _turn = self.write_turn().await?;
        let mut tx = match &self.pool {
            Pool::Sqlite { write, .. } => {
                Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await.map_err(begin)?)
            }
            Pool::Postgres(p) => Tx::Postgres(p.begin().await.map_err(begin)?),
        };
        let result = record_and_claim_in(&mut tx, self.backend(), finished, claim).await?;
        match tx {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
        .map_err(query_error("commit delivery attempts"))?;
        Ok(result)
    }

    /// The earliest `next_attempt_at` of a pending notification (due, leased or waiting).
    pub async fn next_notification_due(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        let sql = match self.backend() {
            Backend::Sqlite => {
                "SELECT MIN(next_attempt_at) FROM notifications WHERE status = 'pending'"
            }
            Backend::Postgres => {
                "SELECT to_char(MIN(next_attempt_at) AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM notifications WHERE status = 'pending'"
            }
        };
        let text: Option<String> =
            on_pool!(&self.pool, |p| sqlx::query_scalar(sql).fetch_one(p).await)
                .map_err(query_error("read the next due notification"))?;
        text.as_deref().map(timestamp_from_text).transpose()
    }

    /// Every notification, oldest first (tests, `test-alert` and diagnostics), at most `limit`.
    pub async fn notifications(&self, limit: i64) -> Result<Vec<NotificationRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM notifications ORDER BY created_at, id LIMIT $1",
            notification_columns(self.backend())
        );
        let rows: Vec<NotificationTuple> = on_pool!(&self.pool, |p| sqlx::query_as(&sql)
            .bind(limit.max(0))
            .fetch_all(p)
            .await)
        .map_err(query_error("read notifications"))?;
        rows.into_iter().map(notification_from_tuple).collect()
    }

    /// The stored alerts with these ids (any order; unknown ids are left out).
    pub async fn alerts_by_ids(&self, ids: &[String]) -> Result<Vec<AlertRow>, StoreError> {
        let backend = self.backend();
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let rows: Vec<AlertTuple> = on_pool!(&self.pool, |p| {
                let mut q = QueryBuilder::new("SELECT ");
                q.push(backend.alert_columns());
                q.push(" FROM alerts WHERE id IN (");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                q.push(")");
                q.build_query_as().fetch_all(p).await
            })
            .map_err(query_error("read alerts"))?;
            for row in rows {
                out.push(alert_from_tuple(row)?);
            }
        }
        Ok(out)
    }

    /// Entities of the given kinds written with `seq > after`, and the entity sequence they are
    /// complete up to, read from one snapshot (no lock: writers commit in sequence order).
    pub async fn entities_since(
        &self,
        after: i64,
        kinds: &[&str],
    ) -> Result<(Vec<EntityRow>, i64), StoreError> {
        let backend = self.backend();
        // One statement, so one snapshot on both backends: the first row carries the entity
        // sequence (kind and id NULL), the others the entities.
        type Row = (Option<String>, Option<String>, Option<String>, i64);
        let rows: Vec<Row> = on_pool!(&self.pool, |p| {
            let mut q = QueryBuilder::new(
                "SELECT NULL, NULL, NULL, entity_seq FROM store_meta WHERE singleton = 1 \
                 UNION ALL SELECT ",
            );
            q.push(backend.entity_columns());
            q.push(" FROM entities WHERE seq > ").push_bind(after);
            if !kinds.is_empty() {
                q.push(" AND kind IN (");
                let mut list = q.separated(", ");
                for kind in kinds {
                    list.push_bind(*kind);
                }
                q.push(")");
            }
            q.build_query_as().fetch_all(p).await
        })
        .map_err(query_error("read changed entities"))?;
        let mut seq = None;
        let mut entities = Vec::with_capacity(rows.len());
        for row in rows {
            match row {
                (Some(kind), Some(id), Some(doc), row_seq) => {
                    entities.push(super::entity_from_tuple((kind, id, doc, row_seq))?)
                }
                (None, None, None, entity_seq) => seq = Some(entity_seq),
                (kind, id, _, _) => {
                    return Err(StoreError::Corrupt {
                        what: format!("entity {kind:?}/{id:?}"),
                        reason: "a column is NULL".to_owned(),
                    })
                }
            }
        }
        let seq = seq.ok_or_else(|| StoreError::Corrupt {
            what: "store_meta".to_owned(),
            reason: "the entity sequence is missing".to_owned(),
        })?;
        entities.sort_by(|a, b| (a.seq, &a.kind, &a.id).cmp(&(b.seq, &b.kind, &b.id)));
        Ok((entities, seq))
    }
}

impl PlanTx<'_> {
    /// The cursor as locked: alerts up to it are planned.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// At most `limit` alerts after the cursor and up to `up_to` (inclusive), in `seq` order.
    pub async fn alerts_after_cursor(
        &mut self,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let select = format!(
            "SELECT {} FROM alerts WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            self.backend.alert_columns()
        );
        let cursor = self.cursor;
        let rows: Vec<AlertTuple> = on_tx!(&mut self.tx, |c| sqlx::query_as(&select)
            .bind(cursor)
            .bind(up_to)
            .bind(limit.max(0))
            .fetch_all(&mut **c)
            .await)
        .map_err(query_error("read alerts"))?;
        rows.into_iter().map(alert_from_tuple).collect()
    }

    /// Every notification (all generations) of these causes.
    pub async fn notifications_for_causes(
        &mut self,
        causes: &[String],
    ) -> Result<Vec<NotificationRow>, StoreError> {
        let columns = notification_columns(self.backend);
        let mut out = Vec::new();
        let failed = query_error("read notifications");
        match &mut self.tx {
            Tx::Postgres(c) => {
                let rows: Vec<NotificationTuple> = sqlx::query_as(&format!(
                    "SELECT {columns} FROM notifications WHERE cause = ANY($1)"
                ))
                .bind(causes)
                .fetch_all(&mut **c)
                .await
                .map_err(failed)?;
                for row in rows {
                    out.push(notification_from_tuple(row)?);
                }
            }
            Tx::Sqlite(c) => {
                for chunk in causes.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new("SELECT ");
                    q.push(columns.as_str());
                    q.push(" FROM notifications WHERE cause IN (");
                    let mut list = q.separated(", ");
                    for cause in chunk {
                        list.push_bind(cause.as_str());
                    }
                    q.push(")");
                    let rows: Vec<NotificationTuple> = q
                        .build_query_as()
                        .fetch_all(&mut **c)
                        .await
                        .map_err(query_error("read notifications"))?;
                    for row in rows {
                        out.push(notification_from_tuple(row)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Inserts pending notifications; returns how many were new (an id that exists already is
    /// left as it is).
    pub async fn insert_notifications(
        &mut self,
        rows: &[NewNotification],
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut encoded = Vec::with_capacity(rows.len());
        for n in rows {
            let generation = i32::try_from(n.generation).map_err(|_| StoreError::InvalidValue {
                what: format!("generation of notification {}", n.id),
                reason: "too large".to_string(),
            })?;
            encoded.push((
                n,
                generation,
                ids_text(&n.alert_ids)?,
                timestamp_text(n.next_attempt_at)?,
                timestamp_text(n.created_at)?,
            ));
        }
        let failed = query_error("insert notifications");
        match &mut self.tx {
            Tx::Postgres(c) => {
                let text =
                    |f: fn(&NewNotification) -> &str| -> Vec<&str> { rows.iter().map(f).collect() };
                let result = sqlx::query(
                    "INSERT INTO notifications (id, route, channel, recipient, cause, generation, \
                     alert_ids, status, attempts, next_attempt_at, last_error, created_at, \
                     updated_at) \
                     SELECT id, route, channel, recipient, cause, generation, alert_ids::json, \
                     'pending', 0, next::timestamptz, NULL, created::timestamptz, \
                     created::timestamptz \
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::integer[], $7::text[], $8::text[], $9::text[]) \
                     AS r (id, route, channel, recipient, cause, generation, alert_ids, next, \
                     created) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(text(|n| &n.id))
                .bind(text(|n| &n.route))
                .bind(text(|n| &n.channel))
                .bind(text(|n| &n.recipient))
                .bind(text(|n| &n.cause))
                .bind(encoded.iter().map(|e| e.1).collect::<Vec<i32>>())
                .bind(encoded.iter().map(|e| e.2.as_str()).collect::<Vec<&str>>())
                .bind(encoded.iter().map(|e| e.3.as_str()).collect::<Vec<&str>>())
                .bind(encoded.iter().map(|e| e.4.as_str()).collect::<Vec<&str>>())
                .execute(&mut **c)
                .await
                .map_err(failed)?;
                Ok(result.rows_affected())
            }
            Tx::Sqlite(c) => {
                let mut inserted = 0;
                for (n, generation, ids, next, created) in &encoded {
                    inserted += sqlx::query(
                        "INSERT INTO notifications (id, route, channel, recipient, cause, \
                         generation, alert_ids, status, attempts, next_attempt_at, last_error, \
                         created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, NULL, $9, $9) \
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(n.id.as_str())
                    .bind(n.route.as_str())
                    .bind(n.channel.as_str())
                    .bind(n.recipient.as_str())
                    .bind(n.cause.as_str())
                    .bind(*generation)
                    .bind(ids.as_str())
                    .bind(next.as_str())
                    .bind(created.as_str())
                    .execute(&mut **c)
                    .await
                    .map_err(query_error("insert a notification"))?
                    .rows_affected();
                }
                Ok(inserted)
            }
        }
    }

    /// Replaces the alerts of notification `id` if it was never attempted; false otherwise.
    pub async fn extend_notification(
        &mut self,
        id: &str,
        alert_ids: &[String],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let (ts, json) = (self.backend.timestamp_cast(), json_cast(self.backend));
        let sql = format!(
            "UPDATE notifications SET alert_ids = $1{json}, updated_at = $2{ts} \
             WHERE id = $3 AND attempts = 0 AND status = 'pending'"
        );
        let ids = ids_text(alert_ids)?;
        let now = timestamp_text(now)?;
        let changed = on_tx!(&mut self.tx, |c| sqlx::query(&sql)
            .bind(ids.as_str())
            .bind(now.as_str())
            .bind(id)
            .execute(&mut **c)
            .await
            .map(|r| r.rows_affected()))
        .map_err(query_error("add alerts to a notification"))?;
        Ok(changed > 0)
    }

    /// Moves the cursor (never backwards).
    pub async fn set_cursor(&mut self, seq: i64) -> Result<(), StoreError> {
        let seq = seq.max(self.cursor);
        on_tx!(&mut self.tx, |c| sqlx::query(
            "UPDATE delivery_cursor SET planned_seq = $1 WHERE singleton = 1"
        )
        .bind(seq)
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(query_error("move the delivery cursor"))?;
        self.cursor = seq;
        Ok(())
    }

    /// [`Store::record_and_claim`] inside the planning transaction (one commit for both; the
    /// claim sees the notifications planned so far).
    pub async fn record_and_claim(
        &mut self,
        finished: &[FinishedAttempt],
        claim: Option<&Claim>,
    ) -> Result<(Vec<bool>, Vec<NotificationRow>), StoreError> {
        record_and_claim_in(&mut self.tx, self.backend, finished, claim).await
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        match self.tx {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
        .map_err(query_error("commit planning"))
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.tx {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
        .map_err(query_error("roll back planning"))
    }
}

/// The body of [`Store::record_and_claim`] and [`PlanTx::record_and_claim`], inside `tx`.
async fn record_and_claim_in(
    tx: &mut Tx,
    backend: Backend,
    finished: &[FinishedAttempt],
    claim: Option<&Claim>,
) -> Result<(Vec<bool>, Vec<NotificationRow>), StoreError> {
    let ts = backend.timestamp_cast();
    let record_sql = format!(
        "UPDATE notifications SET status = $1, next_attempt_at = $2{ts}, \
         last_error = COALESCE($3, last_error), updated_at = $4{ts}, \
         payload = COALESCE(payload, $5) \
         WHERE id = $6 AND attempts = $7 AND status = 'pending'"
    );
    let mut encoded: Vec<Encoded<'_>> = Vec::with_capacity(finished.len());
    for a in finished {
        let (status, next, error) = match &a.outcome {
            AttemptOutcome::Delivered => ("delivered", a.at, None),
            AttemptOutcome::Retry { at, error } => ("pending", *at, Some(error.as_str())),
            AttemptOutcome::Failed { error } => ("failed", a.at, Some(error.as_str())),
        };
        encoded.push((
            status,
            timestamp_text(next)?,
            error,
            timestamp_text(a.at)?,
            a,
        ));
    }
    let claim_sql = format!(
        "UPDATE notifications SET attempts = attempts + 1, next_attempt_at = $1{ts}, \
         updated_at = $2{ts} \
         WHERE id IN (SELECT id FROM notifications WHERE status = 'pending' \
         AND next_attempt_at <= $3{ts} ORDER BY next_attempt_at LIMIT $4{}) \
         RETURNING {}",
        match backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        },
        notification_columns(backend)
    );
    let claim = claim
        .filter(|c| c.limit > 0)
        .map(|c| -> Result<_, StoreError> {
            Ok((
                timestamp_text(c.lease_until)?,
                timestamp_text(OffsetDateTime::now_utc())?,
                timestamp_text(c.due_at)?,
                c.limit,
            ))
        })
        .transpose()?;
    let mut recorded = Vec::with_capacity(finished.len());
    let mut claimed: Vec<NotificationTuple> = Vec::new();
    match &mut *tx {
        // One statement for the whole batch.
        Tx::Postgres(c) if !encoded.is_empty() => {
            let ids: Vec<&str> = encoded.iter().map(|e| e.4.id.as_str()).collect();
            let attempts: Vec<i64> = encoded.iter().map(|e| e.4.attempt).collect();
            let statuses: Vec<&str> = encoded.iter().map(|e| e.0).collect();
            let nexts: Vec<&str> = encoded.iter().map(|e| e.1.as_str()).collect();
            let errors: Vec<Option<&str>> = encoded.iter().map(|e| e.2).collect();
            let ats: Vec<&str> = encoded.iter().map(|e| e.3.as_str()).collect();
            let payloads: Vec<Option<&str>> =
                encoded.iter().map(|e| e.4.payload.as_deref()).collect();
            let updated: Vec<String> = sqlx::query_scalar(
                "UPDATE notifications AS n SET status = r.status, \
                 next_attempt_at = r.next::timestamptz, \
                 last_error = COALESCE(r.error, n.last_error), updated_at = r.at::timestamptz, \
                 payload = COALESCE(n.payload, r.payload) \
                 FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::text[]) AS r (id, attempt, status, next, error, at, payload) \
                 WHERE n.id = r.id AND n.attempts = r.attempt AND n.status = 'pending' \
                 RETURNING n.id",
            )
            .bind(ids)
            .bind(attempts)
            .bind(statuses)
            .bind(nexts)
            .bind(errors)
            .bind(ats)
            .bind(payloads)
            .fetch_all(&mut **c)
            .await
            .map_err(query_error("record delivery attempts"))?;
            let updated: HashSet<String> = updated.into_iter().collect();
            recorded.extend(encoded.iter().map(|e| updated.contains(&e.4.id)));
        }
        _ => {
            for (status, next, error, at, a) in &encoded {
                let changed = on_tx!(&mut *tx, |c| sqlx::query(&record_sql)
                    .bind(*status)
                    .bind(next.as_str())
                    .bind(*error)
                    .bind(at.as_str())
                    .bind(a.payload.as_deref())
                    .bind(a.id.as_str())
                    .bind(a.attempt)
                    .execute(&mut **c)
                    .await
                    .map(|r| r.rows_affected()))
                .map_err(query_error("record a delivery attempt"))?;
                recorded.push(changed > 0);
            }
        }
    }
    if let Some((lease_until, now, due_at, limit)) = &claim {
        claimed = on_tx!(&mut *tx, |c| sqlx::query_as(&claim_sql)
            .bind(lease_until.as_str())
            .bind(now.as_str())
            .bind(due_at.as_str())
            .bind(*limit)
            .fetch_all(&mut **c)
            .await)
        .map_err(query_error("claim notifications"))?;
    }
    let mut rows = claimed
        .into_iter()
        .map(notification_from_tuple)
        .collect::<Result<Vec<_>, _>>()?;
    rows.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok((recorded, rows))
}

/// status, next attempt (text), error, time (text), the attempt: [`Store::record_and_claim`].
type Encoded<'a> = (
    &'static str,
    String,
    Option<&'a str>,
    String,
    &'a FinishedAttempt,
);

/// id, route, channel, recipient, cause, generation, alert_ids (JSON text), status, attempts,
/// next_attempt_at, last_error, created_at, updated_at, payload
type NotificationTuple = (
    String,
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    i64,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
);

/// Columns matching [`NotificationTuple`].
fn notification_columns(backend: Backend) -> String {
    match backend {
        Backend::Sqlite => "id, route, channel, recipient, cause, generation, alert_ids, status, \
                            attempts, next_attempt_at, last_error, created_at, updated_at, payload"
            .to_string(),
        Backend::Postgres => {
            let ts = |col: &str| {
                format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            };
            format!(
                "id, route, channel, recipient, cause, CAST(generation AS BIGINT), \
                 alert_ids::text, status, CAST(attempts AS BIGINT), {}, last_error, {}, {}, payload",
                ts("next_attempt_at"),
                ts("created_at"),
                ts("updated_at")
            )
        }
    }
}

fn notification_from_tuple(row: NotificationTuple) -> Result<NotificationRow, StoreError> {
    let (
        id,
        route,
        channel,
        recipient,
        cause,
        generation,
        alert_ids,
        status,
        attempts,
        next_attempt_at,
        last_error,
        created_at,
        updated_at,
        payload,
    ) = row;
    let ids = json_from_text(|| format!("alert ids of notification {id}"), &alert_ids)?;
    let alert_ids = serde_json::from_value(ids).map_err(|e| StoreError::Corrupt {
        what: format!("alert ids of notification {id}"),
        reason: e.to_string(),
    })?;
    Ok(NotificationRow {
        next_attempt_at: timestamp_from_text(&next_attempt_at)?,
        created_at: timestamp_from_text(&created_at)?,
        updated_at: timestamp_from_text(&updated_at)?,
        id,
        route,
        channel,
        recipient,
        cause,
        generation,
        alert_ids,
        status,
        attempts,
        last_error,
        payload,
    })
}

/// Appended to a text placeholder that fills a JSON column.
fn json_cast(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::Postgres => "::json",
    }
}

fn ids_text(ids: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(ids).map_err(|e| StoreError::InvalidValue {
        what: "alert ids".to_string(),
        reason: e.to_string(),
    })
}
