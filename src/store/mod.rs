//! The durable store: engine entities, the alert outbox and Kafka progress, in SQLite or PostgreSQL.
//!
//! The store knows nothing about keys or deployments. It keeps:
//! - `entities`: JSON documents identified by `(kind, id)`, each stamped with the sequence number
//!   of the transaction that last wrote it (`seq`). The engine's state is the set of entities.
//! - `alerts`: the transactional outbox. A few indexed columns plus the full JSON document. Alert
//!   ids are deterministic, so a replayed event cannot store an alert twice.
//! - `kafka_offsets`: the next offset to read per consumer group, topic and partition.
//! - `notifications`: delivery state, written by the delivery worker (`notifications.rs`), and
//!   `delivery_cursor`, the planner's position in the outbox.
//!
//! # Writers are serialized
//! Every write goes through one [`StoreTx`]. On PostgreSQL, [`Store::begin`] takes the
//! transaction-scoped advisory lock [`WRITE_LOCK_KEY`] before anything else, so writers from all
//! instances sharing the database run one at a time; on SQLite, `BEGIN IMMEDIATE` does the same.
//! Because the lock is held, [`StoreTx::changes_since`] is complete: nobody can commit a newer
//! sequence number while the transaction is open. Waiting for the lock is bounded
//! ([`WRITE_LOCK_TIMEOUT`]: PostgreSQL `lock_timeout`, SQLite `busy_timeout`); past it `begin`
//! fails with an error for which [`StoreError::is_transient`] is true.
//!
//! On SQLite the writers of one process also take turns in memory first ([`Store::write_turn`],
//! a FIFO lock held until the transaction ends): a writer that found the file locked would
//! otherwise sleep in SQLite's busy handler (1, 2, 5, 10, ... 100 ms steps) and come back late,
//! which showed as the tail of the produce-to-commit latency. Other processes on the same file
//! still meet `busy_timeout`.
//!
//! # Sequence numbers
//! - Entity sequence (`store_meta.entity_seq`): incremented once per transaction that writes
//!   entities; every entity written in that transaction carries the new value. [`Snapshot::seq`]
//!   and [`StoreTx::commit`] report it.
//! - Alert sequence (`store_meta.alert_seq`): one number per alert, assigned in the order alerts
//!   are inserted. Since writers are serialized, alert sequence numbers become visible in order,
//!   so `alerts_since(cursor)` is a gap-safe outbox cursor. Numbers are strictly increasing but
//!   not dense: an alert skipped as a duplicate leaves a hole.
//!
//! # Representation
//! - Timestamps: SQLite stores RFC 3339 text in UTC with exactly six fractional digits
//!   (`2026-08-20T14:03:11.520000Z`), so text order is time order; PostgreSQL stores `timestamptz`.
//!   Both have microsecond precision: finer parts of an [`OffsetDateTime`] are truncated. Years
//!   outside 0000..=9999 are rejected. The Rust code binds and reads text on both backends; the
//!   PostgreSQL SQL casts on the way in and formats with `to_char` on the way out.
//! - JSON documents: SQLite `TEXT`, PostgreSQL `json` (kept as written; `jsonb` would reject
//!   `\u0000`). Documents are written as `serde_json` text and parsed back on read.
//!
//! # Schema migrations
//! Embedded SQL, one set per backend (`migrations/sqlite`, `migrations/postgres`), versioned in
//! `keywatch_migrations` with a checksum. They run inside one transaction that first takes
//! [`MIGRATION_LOCK_KEY`] (PostgreSQL) or `BEGIN IMMEDIATE` (SQLite), so several instances may
//! start at once. A database with a newer schema than this build knows is refused.
//!
//! # Errors
//! [`StoreError`] keeps the cause as its `source()`: print the whole chain (anyhow's `{:#}`).

/// Runs `$body` with `$p` bound to the pool of whichever backend `$pool` holds.
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite { read: $p, .. } => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// Runs `$body` with `$c` bound to the `&mut sqlx::Transaction` of whichever backend `$tx` holds.
macro_rules! on_tx {
    ($tx:expr, |$c:ident| $body:expr) => {
        match $tx {
            Tx::Sqlite($c) => $body,
            Tx::Postgres($c) => $body,
        }
    };
}

mod notifications;
mod schema;
// Delivery (src/delivery): the notification rows and the planner's transaction.
pub use notifications::{
    AttemptOutcome, Claim, FinishedAttempt, NewNotification, NotificationRow, PlanTx,
};
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::QueryBuilder;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// The entity kind of processed-event markers, looked up by [`StoreTx::existing_events`].
pub const EVENT_KIND: &str = "event";

/// PostgreSQL advisory lock held by every write transaction ("keywatch" in ASCII).
pub const WRITE_LOCK_KEY: i64 = 0x6b65_7977_6174_6368;

/// PostgreSQL advisory lock held while the schema is migrated ("kwmigrat" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x6b77_6d69_6772_6174;

/// How long [`Store::begin`] waits for other writers before it gives up.
pub const WRITE_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle on the store; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// The URL with any password replaced by `***`, for messages.
    url: String,
    /// SQLite: this process's writers, one at a time in arrival order (shared by clones).
    write_turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// A writer's turn ([`Store::write_turn`]); `None` on PostgreSQL, whose advisory lock queues
/// writers itself. Held by a transaction after its connection, so it is given up only once the
/// transaction has ended.
pub(crate) type WriteTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

/// The store's content needed at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Every entity, sorted by `(kind, id)` (byte order).
    pub entities: Vec<EntityRow>,
    /// The entity sequence number the entities are complete up to.
    pub seq: i64,
}

/// One stored entity.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityRow {
    pub kind: String,
    pub id: String,
    pub doc: serde_json::Value,
    /// The sequence number of the transaction that last wrote it.
    pub seq: i64,
}

/// An alert to insert; see [`AlertRow`] for the fields.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAlert {
    pub id: String,
    pub kind: String,
    pub severity: String,
    pub deployment: String,
    pub key: String,
    pub cause: String,
    pub event_time: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub doc: serde_json::Value,
}

/// One stored alert.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertRow {
    /// Deterministic and unique: inserting the same id again is a no-op.
    pub id: String,
    pub kind: String,
    pub severity: String,
    pub deployment: String,
    pub key: String,
    /// The id of the event that caused the alert.
    pub cause: String,
    pub event_time: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub doc: serde_json::Value,
    /// Position in the outbox (see the module documentation).
    pub seq: i64,
}

/// Kafka progress: the next offset to consume in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PartitionOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Which alerts [`Store::alerts`] returns: all conditions must hold; newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertFilter {
    /// Exact alert kind.
    pub kind: Option<String>,
    /// Exact severity.
    pub severity: Option<String>,
    /// Only alerts with `created_at >= since`.
    pub since: Option<OffsetDateTime>,
    /// At most this many (negative counts as zero).
    pub limit: i64,
}

impl Default for AlertFilter {
    fn default() -> Self {
        AlertFilter {
            kind: None,
            severity: None,
            since: None,
            limit: 100,
        }
    }
}

/// One write transaction, holding the store's write lock. Dropping it without
/// [`commit`](StoreTx::commit) rolls everything back.
pub struct StoreTx<'a> {
    tx: Tx,
    /// Declared after `tx`: dropped after it.
    _turn: WriteTurn,
    backend: Backend,
    /// The entity sequence when the lock was taken.
    seq_before: i64,
    /// The entity sequence this transaction writes with, once it has written an entity.
    written_seq: Option<i64>,
    _store: PhantomData<&'a Store>,
}

/// What went wrong in the store, grouped by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configured URL cannot be used: fix the configuration.
    #[error("invalid store url {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot create directory {} for store {url}", path.display())]
    CreateDirectory {
        url: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to store {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the schema of store {url}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// The database was migrated by a newer keywatch: refuse to touch it.
    #[error("store {url} has schema version {found}, newer than this keywatch knows ({known})")]
    SchemaTooNew { url: String, found: i64, known: i64 },
    #[error("store {url}: migration {version} ({name}) changed after it was applied")]
    MigrationChanged {
        url: String,
        version: i64,
        name: String,
    },
    /// A statement failed; `what` names the operation.
    #[error("store: cannot {what}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A value cannot be stored (for example a timestamp outside years 0000..=9999).
    #[error("store: cannot store {what}: {reason}")]
    InvalidValue { what: String, reason: String },
    /// Stored data does not parse: a broken invariant.
    #[error("store holds an invalid {what}: {reason}")]
    Corrupt { what: String, reason: String },
}

impl StoreError {
    /// True when retrying the same operation later may succeed (connection trouble, lock wait
    /// timeouts, serialization failures). Everything else needs a person.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { source, .. } | StoreError::Query { source, .. } => {
                is_transient_sqlx(source)
            }
            _ => false,
        }
    }
}

impl Store {
    /// The file of a `sqlite:` store URL (`None` for PostgreSQL or an invalid URL).
    pub fn sqlite_file(url: &str) -> Option<PathBuf> {
        url.starts_with("sqlite:")
            .then(|| sqlite_path(url).ok())
            .flatten()
    }

    /// Opens (creating if needed) and migrates the store at `url`: `sqlite://PATH` (relative to
    /// the working directory, or absolute as `sqlite:///abs/path`) or `postgres://...` /
    /// `postgresql://...`.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let shown = redact_url(url);
        let pool = if url.starts_with("sqlite:") {
            let (read, write) = open_sqlite(url, &shown).await?;
            Pool::Sqlite { read, write }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Pool::Postgres(open_postgres(url, &shown).await?)
        } else {
            return Err(StoreError::InvalidUrl {
                url: shown,
                reason: "expected sqlite://PATH or postgres://...".to_string(),
            });
        };
        let store = Store {
            pool,
            url: shown,
            write_turn: Default::default(),
        };
        schema::migrate(&store).await?;
        Ok(store)
    }

    /// SQLite: waits (at most [`WRITE_LOCK_TIMEOUT`]) until no other writer of this process
    /// holds the database, in arrival order. Taken before `BEGIN IMMEDIATE` by every write
    /// transaction.
    pub(crate) async fn write_turn(&self) -> Result<WriteTurn, StoreError> {
        match self.pool {
            Pool::Sqlite { .. } => {
                tokio::time::timeout(WRITE_LOCK_TIMEOUT, self.write_turn.clone().lock_owned())
                    .await
                    .map(Some)
                    .map_err(|_| StoreError::Query {
                        what: "wait for this process's other writers",
                        source: sqlx::Error::PoolTimedOut,
                    })
            }
            Pool::Postgres(_) => Ok(None),
        }
    }

    /// The URL without its password, for logs and messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .map(|_| ()))
        .map(|_| ())
        .map_err(query_error("reach the database"))
    }

    /// Waits for the connections to close; later calls fail.
    pub async fn close(&self) {
        if let Pool::Sqlite { write, .. } = &self.pool {
            write.close().await;
        }
        on_pool!(&self.pool, |p| p.close().await)
    }

    /// Everything needed at start-up, read from one consistent snapshot.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        let backend = self.backend();
        let select = format!("SELECT {} FROM entities", backend.entity_columns());
        let (rows, seq) = on_pool!(&self.pool, |p| {
            let mut t = p
                .begin_with(backend.begin_snapshot())
                .await
                .map_err(query_error("begin a read transaction"))?;
            let rows: Vec<EntityTuple> = sqlx::query_as(&select)
                .fetch_all(&mut *t)
                .await
                .map_err(query_error("read entities"))?;
            let seq: i64 = sqlx::query_scalar(SELECT_ENTITY_SEQ)
                .fetch_one(&mut *t)
                .await
                .map_err(query_error("read the entity sequence"))?;
            t.rollback()
                .await
                .map_err(query_error("end a read transaction"))?;
            (rows, seq)
        });
        let mut entities = rows
            .into_iter()
            .map(entity_from_tuple)
            .collect::<Result<Vec<_>, _>>()?;
        entities.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
        Ok(Snapshot { entities, seq })
    }

    /// Starts a write transaction; waits (at most [`WRITE_LOCK_TIMEOUT`]) for other writers.
    ///
    /// Dropping the future while it waits gives the connection back to the pool with nothing
    /// held: PostgreSQL rolls the abandoned transaction back (tested), and sqlx rolls back a
    /// SQLite `BEGIN` whose caller went away.
    pub async fn begin(&self) -> Result<StoreTx<'_>, StoreError> {
        let turn = self.write_turn().await?;
        let tx = match &self.pool {
            Pool::Sqlite { write, .. } => Tx::Sqlite(
                write
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(query_error("begin a write transaction"))?,
            ),
            Pool::Postgres(p) => {
                let mut t = p
                    .begin()
                    .await
                    .map_err(query_error("begin a write transaction"))?;
                sqlx::query("SELECT set_config('lock_timeout', $1, true)")
                    .bind(format!("{}ms", WRITE_LOCK_TIMEOUT.as_millis()))
                    .execute(&mut *t)
                    .await
                    .map_err(query_error("set the lock timeout"))?;
                // A statement of its own: READ COMMITTED takes a new snapshot per statement,
                // so everything after it sees the commits of the writers it waited for.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK_KEY)
                    .execute(&mut *t)
                    .await
                    .map_err(query_error("take the write lock"))?;
                Tx::Postgres(t)
            }
        };
        let mut tx = StoreTx {
            tx,
            _turn: turn,
            backend: self.backend(),
            seq_before: 0,
            written_seq: None,
            _store: PhantomData,
        };
        tx.seq_before = on_tx!(&mut tx.tx, |c| sqlx::query_scalar(SELECT_ENTITY_SEQ)
            .fetch_one(&mut **c)
            .await)
        .map_err(query_error("read the entity sequence"))?;
        Ok(tx)
    }

    /// The stored progress of one consumer group on one topic, by partition.
    pub async fn offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<PartitionOffset>, StoreError> {
        let rows: Vec<(String, String, i32, i64)> = on_pool!(&self.pool, |p| sqlx::query_as(
            "SELECT group_id, topic, partition_id, next_offset FROM kafka_offsets \
             WHERE group_id = $1 AND topic = $2 ORDER BY partition_id"
        )
        .bind(group)
        .bind(topic)
        .fetch_all(p)
        .await)
        .map_err(query_error("read kafka offsets"))?;
        Ok(rows
            .into_iter()
            .map(|(group, topic, partition, next_offset)| PartitionOffset {
                group,
                topic,
                partition,
                next_offset,
            })
            .collect())
    }

    /// Alerts matching `filter`, newest (highest `seq`) first.
    pub async fn alerts(&self, filter: &AlertFilter) -> Result<Vec<AlertRow>, StoreError> {
        let backend = self.backend();
        let since = filter.since.map(timestamp_text).transpose()?;
        let rows: Vec<AlertTuple> = on_pool!(&self.pool, |p| {
            let mut q = QueryBuilder::new("SELECT ");
            q.push(backend.alert_columns());
            q.push(" FROM alerts WHERE TRUE");
            if let Some(kind) = &filter.kind {
                q.push(" AND kind = ").push_bind(kind.as_str());
            }
            if let Some(severity) = &filter.severity {
                q.push(" AND severity = ").push_bind(severity.as_str());
            }
            if let Some(since) = &since {
                q.push(" AND created_at >= ")
                    .push_bind(since.as_str())
                    .push(backend.timestamp_cast());
            }
            q.push(" ORDER BY seq DESC LIMIT ")
                .push_bind(filter.limit.max(0));
            q.build_query_as().fetch_all(p).await
        })
        .map_err(query_error("read alerts"))?;
        rows.into_iter().map(alert_from_tuple).collect()
    }

    /// The outbox drain: at most `limit` alerts with `seq > after`, in `seq` order.
    pub async fn alerts_since(&self, after: i64, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        let select = format!(
            "SELECT {} FROM alerts WHERE seq > $1 ORDER BY seq LIMIT $2",
            self.backend().alert_columns()
        );
        let rows: Vec<AlertTuple> = on_pool!(&self.pool, |p| sqlx::query_as(&select)
            .bind(after)
            .bind(limit.max(0))
            .fetch_all(p)
            .await)
        .map_err(query_error("read alerts"))?;
        rows.into_iter().map(alert_from_tuple).collect()
    }

    fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite { .. } => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .field("url", &self.url)
            .finish()
    }
}

impl StoreTx<'_> {
    /// The entity sequence as this transaction sees it: the one it writes with once it has
    /// written, otherwise the one current when the lock was taken.
    pub fn seq(&self) -> i64 {
        self.written_seq.unwrap_or(self.seq_before)
    }

    /// Entities written (by anyone) with `seq > since`, sorted by `(seq, kind, id)`. Complete,
    /// because the write lock is held.
    pub async fn changes_since(&mut self, since: i64) -> Result<Vec<EntityRow>, StoreError> {
        let select = format!(
            "SELECT {} FROM entities WHERE seq > $1",
            self.backend.entity_columns()
        );
        let rows: Vec<EntityTuple> = on_tx!(&mut self.tx, |c| sqlx::query_as(&select)
            .bind(since)
            .fetch_all(&mut **c)
            .await)
        .map_err(query_error("read changed entities"))?;
        let mut entities = rows
            .into_iter()
            .map(entity_from_tuple)
            .collect::<Result<Vec<_>, _>>()?;
        entities.sort_by(|a, b| (a.seq, &a.kind, &a.id).cmp(&(b.seq, &b.kind, &b.id)));
        Ok(entities)
    }

    /// Which of these processed-event ids (entities of kind [`EVENT_KIND`]) are stored.
    pub async fn existing_events(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        let failed = query_error("look up processed events");
        let mut found = HashSet::new();
        if ids.is_empty() {
            return Ok(found);
        }
        match &mut self.tx {
            Tx::Postgres(c) => {
                let rows: Vec<String> =
                    sqlx::query_scalar("SELECT id FROM entities WHERE kind = $1 AND id = ANY($2)")
                        .bind(EVENT_KIND)
                        .bind(ids)
                        .fetch_all(&mut **c)
                        .await
                        .map_err(failed)?;
                found.extend(rows);
            }
            Tx::Sqlite(c) => {
                for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new("SELECT id FROM entities WHERE kind = ");
                    q.push_bind(EVENT_KIND).push(" AND id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(id.as_str());
                    }
                    q.push(")");
                    let rows: Vec<String> = q
                        .build_query_scalar()
                        .fetch_all(&mut **c)
                        .await
                        .map_err(failed)?;
                    found.extend(rows);
                }
            }
        }
        Ok(found)
    }

    /// Inserts or replaces entities. All of them get this transaction's new sequence number
    /// (allocated by the first call that writes), which is returned. When the same `(kind, id)`
    /// appears twice, the later document wins. With no rows, nothing is written and
    /// [`seq`](StoreTx::seq) is returned.
    pub async fn put_entities(
        &mut self,
        rows: &[(String, String, serde_json::Value)],
    ) -> Result<i64, StoreError> {
        let texts = rows
            .iter()
            .map(|(kind, _, doc)| Ok((kind.as_str(), json_text(doc)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let refs: Vec<(&str, &str, &str)> = texts
            .iter()
            .zip(rows)
            .map(|((kind, doc), (_, id, _))| (*kind, id.as_str(), doc.as_str()))
            .collect();
        self.put_entity_texts(&refs).await
    }

    /// [`put_entities`](StoreTx::put_entities) with documents already serialized as JSON text.
    pub async fn put_entity_texts(
        &mut self,
        rows: &[(&str, &str, &str)],
    ) -> Result<i64, StoreError> {
        if rows.is_empty() {
            return Ok(self.seq());
        }
        // The last document of an entity wins.
        let mut unique: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for (kind, id, doc) in rows {
            unique.insert((kind, id), doc);
        }
        let seq = self.write_seq().await?;
        let failed = query_error("write entities");
        match &mut self.tx {
            Tx::Postgres(c) => {
                let mut kinds = Vec::with_capacity(unique.len());
                let mut ids = Vec::with_capacity(unique.len());
                let mut docs = Vec::with_capacity(unique.len());
                for ((kind, id), doc) in &unique {
                    kinds.push(*kind);
                    ids.push(*id);
                    docs.push(*doc);
                }
                sqlx::query(
                    "INSERT INTO entities (kind, id, doc, seq) \
                     SELECT kind, id, doc::json, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) \
                     AS r (kind, id, doc) \
                     ON CONFLICT (id, kind) DO UPDATE SET doc = excluded.doc, seq = excluded.seq",
                )
                .bind(&kinds)
                .bind(&ids)
                .bind(&docs)
                .bind(seq)
                .execute(&mut **c)
                .await
                .map_err(failed)?;
            }
            Tx::Sqlite(c) => {
                let unique: Vec<_> = unique.iter().collect();
                for chunk in unique.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new("INSERT INTO entities (kind, id, doc, seq) ");
                    q.push_values(chunk, |mut row, ((kind, id), doc)| {
                        row.push_bind(*kind)
                            .push_bind(*id)
                            .push_bind(*doc)
                            .push_bind(seq);
                    });
                    q.push(
                        " ON CONFLICT (id, kind) DO UPDATE SET doc = excluded.doc, seq = excluded.seq",
                    );
                    q.build().execute(&mut **c).await.map_err(failed)?;
                }
            }
        }
        Ok(seq)
    }

    /// Inserts alerts in the given order; an alert whose id is already stored (or appeared
    /// earlier in `alerts`) is skipped. Returns how many were new.
    pub async fn insert_alerts(&mut self, alerts: &[NewAlert]) -> Result<u64, StoreError> {
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        for alert in alerts {
            if seen.insert(alert.id.as_str()) {
                unique.push(EncodedAlert {
                    alert,
                    event_time: timestamp_text(alert.event_time)?,
                    created_at: timestamp_text(alert.created_at)?,
                    doc: json_text(&alert.doc)?,
                });
            }
        }
        if unique.is_empty() {
            return Ok(0);
        }
        let count = i64::try_from(unique.len()).unwrap_or(i64::MAX);
        let last: i64 = on_tx!(&mut self.tx, |c| sqlx::query_scalar(
            "UPDATE store_meta SET alert_seq = alert_seq + $1 WHERE singleton = 1 RETURNING alert_seq"
        )
        .bind(count)
        .fetch_one(&mut **c)
        .await)
        .map_err(query_error("allocate alert sequence numbers"))?;
        let first = last - count + 1;
        let failed = query_error("insert alerts");
        match &mut self.tx {
            Tx::Postgres(c) => {
                fn column<'a>(
                    alerts: &'a [EncodedAlert<'a>],
                    field: impl Fn(&'a EncodedAlert<'a>) -> &'a str,
                ) -> Vec<&'a str> {
                    alerts.iter().map(field).collect()
                }
                let seqs: Vec<i64> = (first..=last).collect();
                let result = sqlx::query(
                    "INSERT INTO alerts (id, seq, kind, severity, deployment, key_crn, cause, \
                     event_time, created_at, doc) \
                     SELECT id, seq, kind, severity, deployment, key_crn, cause, \
                     event_time::timestamptz, created_at::timestamptz, doc::json \
                     FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
                     AS r (id, seq, kind, severity, deployment, key_crn, cause, event_time, \
                     created_at, doc) \
                     ORDER BY seq \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(column(&unique, |a| &a.alert.id))
                .bind(seqs)
                .bind(column(&unique, |a| &a.alert.kind))
                .bind(column(&unique, |a| &a.alert.severity))
                .bind(column(&unique, |a| &a.alert.deployment))
                .bind(column(&unique, |a| &a.alert.key))
                .bind(column(&unique, |a| &a.alert.cause))
                .bind(column(&unique, |a| &a.event_time))
                .bind(column(&unique, |a| &a.created_at))
                .bind(column(&unique, |a| &a.doc))
                .execute(&mut **c)
                .await
                .map_err(failed)?;
                Ok(result.rows_affected())
            }
            Tx::Sqlite(c) => {
                let mut inserted = 0;
                let mut seq = first;
                for chunk in unique.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new(
                        "INSERT INTO alerts (id, seq, kind, severity, deployment, key_crn, cause, \
                         event_time, created_at, doc) ",
                    );
                    q.push_values(chunk, |mut row, encoded| {
                        let alert = encoded.alert;
                        row.push_bind(alert.id.as_str())
                            .push_bind(seq)
                            .push_bind(alert.kind.as_str())
                            .push_bind(alert.severity.as_str())
                            .push_bind(alert.deployment.as_str())
                            .push_bind(alert.key.as_str())
                            .push_bind(alert.cause.as_str())
                            .push_bind(encoded.event_time.as_str())
                            .push_bind(encoded.created_at.as_str())
                            .push_bind(encoded.doc.as_str());
                        seq += 1;
                    });
                    q.push(" ON CONFLICT (id) DO NOTHING");
                    inserted += q
                        .build()
                        .execute(&mut **c)
                        .await
                        .map_err(failed)?
                        .rows_affected();
                }
                Ok(inserted)
            }
        }
    }

    /// Records Kafka progress: per (group, topic, partition) the stored `next_offset` becomes
    /// the maximum of the stored and the given one, so progress never goes backwards.
    pub async fn save_offsets(&mut self, offsets: &[PartitionOffset]) -> Result<(), StoreError> {
        let mut highest: BTreeMap<(&str, &str, i32), i64> = BTreeMap::new();
        for o in offsets {
            let entry = highest
                .entry((o.group.as_str(), o.topic.as_str(), o.partition))
                .or_insert(o.next_offset);
            *entry = (*entry).max(o.next_offset);
        }
        if highest.is_empty() {
            return Ok(());
        }
        let now = timestamp_text(OffsetDateTime::now_utc())?;
        let failed = query_error("save kafka offsets");
        match &mut self.tx {
            Tx::Postgres(c) => {
                let groups: Vec<&str> = highest.keys().map(|k| k.0).collect();
                let topics: Vec<&str> = highest.keys().map(|k| k.1).collect();
                let partitions: Vec<i32> = highest.keys().map(|k| k.2).collect();
                let next_offsets: Vec<i64> = highest.values().copied().collect();
                sqlx::query(
                    "INSERT INTO kafka_offsets (group_id, topic, partition_id, next_offset, updated_at) \
                     SELECT group_id, topic, partition_id, next_offset, $5::timestamptz \
                     FROM UNNEST($1::text[], $2::text[], $3::integer[], $4::bigint[]) \
                     AS r (group_id, topic, partition_id, next_offset) \
                     ON CONFLICT (group_id, topic, partition_id) DO UPDATE SET \
                     next_offset = GREATEST(kafka_offsets.next_offset, excluded.next_offset), \
                     updated_at = excluded.updated_at",
                )
                .bind(groups)
                .bind(topics)
                .bind(partitions)
                .bind(next_offsets)
                .bind(now.as_str())
                .execute(&mut **c)
                .await
                .map_err(failed)?;
            }
            Tx::Sqlite(c) => {
                let highest: Vec<_> = highest.into_iter().collect();
                for chunk in highest.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new(
                        "INSERT INTO kafka_offsets \
                         (group_id, topic, partition_id, next_offset, updated_at) ",
                    );
                    q.push_values(
                        chunk,
                        |mut row, ((group, topic, partition), next_offset)| {
                            row.push_bind(*group)
                                .push_bind(*topic)
                                .push_bind(*partition)
                                .push_bind(*next_offset)
                                .push_bind(now.as_str());
                        },
                    );
                    q.push(
                        " ON CONFLICT (group_id, topic, partition_id) DO UPDATE SET \
                         next_offset = max(kafka_offsets.next_offset, excluded.next_offset), \
                         updated_at = excluded.updated_at",
                    );
                    q.build().execute(&mut **c).await.map_err(failed)?;
                }
            }
        }
        Ok(())
    }

    /// Commits; returns the entity sequence now current (see [`seq`](StoreTx::seq)).
    pub async fn commit(self) -> Result<i64, StoreError> {
        let seq = self.seq();
        match self.tx {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
        .map_err(query_error("commit"))?;
        Ok(seq)
    }

    /// Rolls back explicitly (dropping does the same, without waiting).
    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.tx {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
        .map_err(query_error("roll back"))
    }

    async fn write_seq(&mut self) -> Result<i64, StoreError> {
        if let Some(seq) = self.written_seq {
            return Ok(seq);
        }
        let seq: i64 = on_tx!(&mut self.tx, |c| sqlx::query_scalar(
            "UPDATE store_meta SET entity_seq = entity_seq + 1 WHERE singleton = 1 RETURNING entity_seq"
        )
        .fetch_one(&mut **c)
        .await)
        .map_err(query_error("allocate an entity sequence number"))?;
        self.written_seq = Some(seq);
        Ok(seq)
    }
}

#[derive(Clone)]
enum Pool {
    /// `read`: the pool reads (and [`on_pool!`]) use. `write`: the one connection every write
    /// transaction of this process runs on. SQLite drops a connection's page cache when another
    /// connection wrote to the database since its last transaction; writers taking turns on the
    /// pool's connections started every transaction with a cold cache and read its pages again.
    Sqlite {
        read: SqlitePool,
        write: SqlitePool,
    },
    Postgres(PgPool),
}

enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// The SQL that differs between the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Appended to a text placeholder compared with a timestamp column.
    fn timestamp_cast(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => "::timestamptz",
        }
    }

    fn begin_snapshot(self) -> &'static str {
        match self {
            // Deferred: in WAL mode the first read fixes the snapshot for the transaction.
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        }
    }

    /// Columns matching [`EntityTuple`].
    fn entity_columns(self) -> &'static str {
        match self {
            Backend::Sqlite => "kind, id, doc, seq",
            Backend::Postgres => "kind, id, doc::text, seq",
        }
    }

    /// Columns matching [`AlertTuple`].
    fn alert_columns(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "id, seq, kind, severity, deployment, key_crn, cause, event_time, created_at, doc"
            }
            Backend::Postgres => {
                "id, seq, kind, severity, deployment, key_crn, cause, \
                 to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                 to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                 doc::text"
            }
        }
    }
}

/// How long opening the store waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Rows per multi-row statement: well below both backends' bound-parameter limits.
const ROWS_PER_STATEMENT: usize = 500;

const SELECT_ENTITY_SEQ: &str = "SELECT entity_seq FROM store_meta WHERE singleton = 1";

/// kind, id, doc (JSON text), seq
type EntityTuple = (String, String, String, i64);

/// id, seq, kind, severity, deployment, key, cause, event_time, created_at (RFC 3339), doc (JSON text)
type AlertTuple = (
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

struct EncodedAlert<'a> {
    alert: &'a NewAlert,
    event_time: String,
    created_at: String,
    doc: String,
}

const TIMESTAMP_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// The reading pool and the one writing connection ([`Pool::Sqlite`]) of a SQLite store.
async fn open_sqlite(url: &str, shown: &str) -> Result<(SqlitePool, SqlitePool), StoreError> {
    let path = sqlite_path(url).map_err(|reason| StoreError::InvalidUrl {
        url: shown.to_string(),
        reason,
    })?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDirectory {
            url: shown.to_string(),
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a committed transaction (and with it an alert) survives a power loss, which
        // the outbox promises before the Kafka offset is committed.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(WRITE_LOCK_TIMEOUT)
        .foreign_keys(true)
        // 1 MiB of page cache per reading connection (4 of them): the database pages are in the
        // OS page cache anyway, and SQLite's own caches were ~20 MiB of the service's peak RSS.
        .pragma("cache_size", "-1024")
        .pragma("temp_store", "memory")
        // A backstop: the checkpointer task below copies the WAL long before this.
        .pragma("wal_autocheckpoint", "10000");
    first_connection::<sqlx::SqliteConnection>(&options, shown).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(WRITE_LOCK_TIMEOUT)
        // A local file does not go stale like a network connection: no `SELECT 1` round trip to
        // the connection's worker thread before every transaction.
        .test_before_acquire(false)
        .connect_lazy_with(options.clone());
    // The writer keeps its cache from one transaction to the next (it is the only connection
    // that writes), so it gets more: a transaction under load touches ~1 MiB of pages.
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(WRITE_LOCK_TIMEOUT)
        .test_before_acquire(false)
        .connect_lazy_with(options.pragma("cache_size", WRITER_CACHE));
    spawn_checkpointer(pool.clone());
    Ok((pool, writer))
}

/// The writing connection's page cache (`PRAGMA cache_size`; negative: KiB).
const WRITER_CACHE: &str = "-4096";

/// How often a task of its own copies the SQLite WAL into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// Runs `PRAGMA wal_checkpoint(PASSIVE)` every [`CHECKPOINT_INTERVAL`] on a connection of its own
/// until the pool is closed. Otherwise SQLite checkpoints inside the commit that crosses
/// `wal_autocheckpoint` pages, on the writer's critical path (about a tenth of the service's
/// SQLite time); a passive checkpoint waits for nobody and nobody waits for it.
fn spawn_checkpointer(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECKPOINT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            if pool.is_closed() {
                break;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                if pool.is_closed() {
                    break;
                }
                tracing::debug!(error = %e, "WAL checkpoint failed; SQLite's own checkpoint remains");
            }
        }
    });
}

async fn open_postgres(url: &str, shown: &str) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::InvalidUrl {
            url: shown.to_string(),
            reason: e.to_string(),
        })?
        .application_name("keywatch")
        // Plan every statement for its actual parameters. The tables grow from empty, and a
        // generic plan cached while they were small (a scan of every processed-event marker
        // for each lookup) would stay until the next auto-analyze; planning is cheap next
        // to that.
        .options([("plan_cache_mode", "force_custom_plan")]);
    first_connection::<sqlx::PgConnection>(&options, shown).await?;
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(WRITE_LOCK_TIMEOUT)
        .connect_lazy_with(options))
}

/// Opens and closes one connection, so that a store that cannot be reached fails at once with
/// the real cause (a pool would retry until its timeout and report only that).
///
/// SQLite answers "database is locked" without waiting when two processes switch a new file to
/// WAL at the same moment; that case is retried until [`CONNECT_TIMEOUT`].
async fn first_connection<C: sqlx::Connection>(
    options: &C::Options,
    shown: &str,
) -> Result<(), StoreError> {
    let failed = |source| StoreError::Connect {
        url: shown.to_string(),
        source,
    };
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    let connection = loop {
        match tokio::time::timeout_at(deadline, C::connect_with(options)).await {
            Ok(Ok(connection)) => break connection,
            Ok(Err(e)) if is_sqlite_busy(&e) && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => {
                return Err(failed(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                ))))
            }
        }
    };
    connection.close().await.map_err(failed)
}

/// The file path of a `sqlite:` URL: `sqlite://PATH` or `sqlite:PATH`, percent-decoded, without
/// query parameters (which are not supported).
fn sqlite_path(url: &str) -> Result<PathBuf, String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if rest.contains('?') {
        return Err("query parameters are not supported".to_string());
    }
    if rest.is_empty() {
        return Err("no file path".to_string());
    }
    if rest == ":memory:" || rest.starts_with(":memory:") {
        return Err("an in-memory database is not durable; give a file path".to_string());
    }
    let decoded = percent_encoding::percent_decode_str(rest)
        .decode_utf8()
        .map_err(|_| "the path is not UTF-8 after percent-decoding".to_string())?;
    Ok(Path::new(decoded.as_ref()).to_path_buf())
}

/// `url` with the password (userinfo or `password=` parameter) replaced by `***`.
fn redact_url(url: &str) -> String {
    let mut shown = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => match rest[..at].split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
                None => url.to_string(),
            },
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    if let Some(query_start) = shown.find('?') {
        let (base, query) = shown.split_at(query_start + 1);
        let query = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        shown = format!("{base}{query}");
    }
    shown
}

fn timestamp_text(t: OffsetDateTime) -> Result<String, StoreError> {
    let t = t.to_offset(UtcOffset::UTC);
    let invalid = |reason: String| StoreError::InvalidValue {
        what: format!("timestamp {t}"),
        reason,
    };
    if !(0..=9999).contains(&t.year()) {
        return Err(invalid("the year is outside 0000..=9999".to_string()));
    }
    t.format(TIMESTAMP_FORMAT)
        .map_err(|e| invalid(e.to_string()))
}

fn timestamp_from_text(text: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| StoreError::Corrupt {
        what: format!("timestamp {text:?}"),
        reason: e.to_string(),
    })
}

fn json_text(doc: &serde_json::Value) -> Result<String, StoreError> {
    serde_json::to_string(doc).map_err(|e| StoreError::InvalidValue {
        what: "JSON document".to_string(),
        reason: e.to_string(),
    })
}

fn json_from_text(
    what: impl FnOnce() -> String,
    text: &str,
) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what: what(),
        reason: e.to_string(),
    })
}

fn entity_from_tuple((kind, id, doc, seq): EntityTuple) -> Result<EntityRow, StoreError> {
    let doc = json_from_text(|| format!("document of entity {kind}/{id}"), &doc)?;
    Ok(EntityRow { kind, id, doc, seq })
}

fn alert_from_tuple(row: AlertTuple) -> Result<AlertRow, StoreError> {
    let (id, seq, kind, severity, deployment, key, cause, event_time, created_at, doc) = row;
    let doc = json_from_text(|| format!("document of alert {id}"), &doc)?;
    Ok(AlertRow {
        event_time: timestamp_from_text(&event_time)?,
        created_at: timestamp_from_text(&created_at)?,
        id,
        kind,
        severity,
        deployment,
        key,
        cause,
        doc,
        seq,
    })
}

fn query_error(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
    move |source| StoreError::Query { what, source }
}

fn is_transient_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                is_sqlite_busy(error)
            } else {
                // PostgreSQL: connection exceptions, operator intervention (shutdown), lock
                // timeout, serialization failure, deadlock, too many connections.
                code.starts_with("08")
                    || code.starts_with("57P")
                    || matches!(code.as_ref(), "55P03" | "40001" | "40P01" | "53300")
            }
        }
        _ => false,
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED, with their extended codes.
fn is_sqlite_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                && db
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|n| matches!(n & 0xff, 5 | 6))
        }
        _ => false,
    }
}
