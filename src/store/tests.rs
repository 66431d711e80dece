//! The store against real SQLite files (in temporary directories) and a real PostgreSQL, where
//! each test gets a fresh database `kw_t_<random>` that is dropped afterwards.
//!
//! PostgreSQL is found at `KEYWATCH_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`,
//! without a database name). When it is unreachable the PostgreSQL tests fail, unless
//! `KEYWATCH_SKIP_POSTGRES=1`, in which case they print that they were skipped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection;
use time::macros::datetime;
use time::OffsetDateTime;

use super::*;

/// Declares, for each scenario `name(&TestStore)`, a module `name` with a `sqlite` and a
/// `postgres` test running it.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let store = super::TestStore::sqlite().await;
                super::$name(&store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(store) = super::TestStore::postgres().await {
                    super::$name(&store).await;
                }
            }
        }
    )*};
}

on_both_backends!(
    migrations_are_idempotent,
    concurrent_connects_both_succeed,
    a_newer_schema_is_refused,
    entities_round_trip_through_load,
    seq_increments_once_per_writing_transaction,
    changes_since_returns_only_newer_writes,
    dropping_a_transaction_rolls_everything_back,
    duplicate_alert_ids_are_inserted_once,
    alerts_round_trip_and_filter,
    alerts_since_pages_through_the_outbox,
    existing_events_finds_only_processed_events,
    offsets_only_move_forward,
    concurrent_writers_never_lose_an_update,
    ping_answers,
    lock_waits_that_give_up_are_transient,
);

// ---------------------------------------------------------------------------------------------
// Scenarios run on both backends.

async fn migrations_are_idempotent(t: &TestStore) {
    put(&t.store, &[("key", "k1", json!({"state": "active"}))]).await;
    let again = Store::connect(&t.url).await.expect("second connect");
    let third = Store::connect(&t.url).await.expect("third connect");
    let snapshot = third.load().await.expect("load");
    assert_eq!(snapshot.seq, 1);
    assert_eq!(snapshot.entities.len(), 1);
    assert_eq!(
        applied_migrations(&again).await,
        schema::latest_version(again.backend_name())
    );
}

async fn concurrent_connects_both_succeed(t: &TestStore) {
    // `t` is already migrated; a fresh place shows two first-time migrations racing.
    let fresh = t.fresh_place().await;
    let (a, b) = tokio::join!(Store::connect(&fresh.url), Store::connect(&fresh.url));
    let (a, b) = (a.expect("first connect"), b.expect("second connect"));
    assert_eq!(
        applied_migrations(&a).await,
        schema::latest_version(a.backend_name())
    );
    put(&b, &[("key", "k", json!(1))]).await;
    assert_eq!(a.load().await.expect("load").seq, 1);
    a.close().await;
    b.close().await;
}

async fn a_newer_schema_is_refused(t: &TestStore) {
    on_pool!(&t.store.pool, |p| sqlx::query(
        "INSERT INTO keywatch_migrations (version, name, checksum, applied_at) \
         VALUES (9999, 'from the future', 'x', 'now')"
    )
    .execute(p)
    .await
    .map(|_| ()))
    .expect("insert a future migration");
    let error = Store::connect(&t.url).await.expect_err("connect must fail");
    assert!(
        matches!(error, StoreError::SchemaTooNew { found: 9999, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("schema version 9999"), "{error}");
}

async fn entities_round_trip_through_load(t: &TestStore) {
    let empty = t.store.load().await.expect("load empty");
    assert_eq!(
        empty,
        Snapshot {
            entities: vec![],
            seq: 0
        }
    );

    let docs = [
        (
            "deployment",
            "crn:v1:bluemix:public:messagehub:us-south:a/1:inst::",
            json!({
                "crn": "crn:v1:bluemix:public:messagehub:us-south:a/1:inst::",
                "disk": "shredded", "labels": {"team": "kafka", "env": "prod"},
                "key_version": null, "owners": ["a@example.com", "b@example.com"],
                "restorable_until": "2026-09-19T14:03:11.520Z",
            }),
        ),
        (
            "key",
            "k/with/slashes",
            json!({"state": "destroyed", "version": 3}),
        ),
        (
            "counter",
            "ack",
            json!({"n": 9_007_199_254_740_993_u64, "f": 0.1, "neg": -7}),
        ),
        (
            "event",
            "ab12",
            json!({"nul": "a\u{0}b", "unicode": "Zürich ☃ 𝄞", "quote": "\"'\\"}),
        ),
        ("policy", "", json!([])),
    ];
    let seq = put(&t.store, &docs).await;
    assert_eq!(seq, 1);

    let snapshot = t.store.load().await.expect("load");
    assert_eq!(snapshot.seq, 1);
    let mut expected: Vec<EntityRow> = docs
        .iter()
        .map(|(kind, id, doc)| EntityRow {
            kind: kind.to_string(),
            id: id.to_string(),
            doc: doc.clone(),
            seq: 1,
        })
        .collect();
    expected.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
    assert_eq!(snapshot.entities, expected);

    // Overwriting replaces the document and restamps the row.
    put(
        &t.store,
        &[("key", "k/with/slashes", json!({"state": "purged"}))],
    )
    .await;
    let snapshot = t.store.load().await.expect("load");
    assert_eq!(snapshot.seq, 2);
    assert_eq!(snapshot.entities.len(), docs.len());
    let key = entity(&snapshot.entities, "key", "k/with/slashes");
    assert_eq!((key.doc.clone(), key.seq), (json!({"state": "purged"}), 2));
}

async fn seq_increments_once_per_writing_transaction(t: &TestStore) {
    let mut tx = t.store.begin().await.expect("begin");
    assert_eq!(tx.seq(), 0);
    let first = tx
        .put_entities(&rows(&[("key", "a", json!(1))]))
        .await
        .expect("put");
    let second = tx
        .put_entities(&rows(&[
            ("key", "b", json!(2)),
            ("key", "a", json!(3)),
            ("key", "a", json!(4)),
        ]))
        .await
        .expect("put again");
    assert_eq!((first, second, tx.seq()), (1, 1, 1));
    assert_eq!(tx.commit().await.expect("commit"), 1);

    // A transaction that writes no entity (only alerts and offsets) keeps the sequence.
    let mut tx = t.store.begin().await.expect("begin");
    assert_eq!(tx.put_entities(&[]).await.expect("put nothing"), 1);
    tx.insert_alerts(&[alert("x", "key_deleted", "critical")])
        .await
        .expect("alerts");
    tx.save_offsets(&[offset("g", "t", 0, 5)])
        .await
        .expect("offsets");
    assert_eq!(tx.commit().await.expect("commit"), 1);

    assert_eq!(put(&t.store, &[("key", "c", json!(5))]).await, 2);
    let snapshot = t.store.load().await.expect("load");
    assert_eq!(snapshot.seq, 2);
    let seqs: Vec<(&str, i64)> = snapshot
        .entities
        .iter()
        .map(|e| (e.id.as_str(), e.seq))
        .collect();
    assert_eq!(seqs, [("a", 1), ("b", 1), ("c", 2)]);
    assert_eq!(
        entity(&snapshot.entities, "key", "a").doc,
        json!(4),
        "the later duplicate wins"
    );
}

async fn changes_since_returns_only_newer_writes(t: &TestStore) {
    put(&t.store, &[("key", "a", json!(1)), ("key", "b", json!(1))]).await; // seq 1
    put(
        &t.store,
        &[("key", "b", json!(2)), ("policy", "p", json!(2))],
    )
    .await; // seq 2
    put(&t.store, &[("deployment", "d", json!(3))]).await; // seq 3

    let mut tx = t.store.begin().await.expect("begin");
    assert_eq!(tx.seq(), 3);
    let ids = |rows: Vec<EntityRow>| -> Vec<(i64, String, String)> {
        rows.into_iter().map(|r| (r.seq, r.kind, r.id)).collect()
    };
    let owned = |v: &[(i64, &str, &str)]| -> Vec<(i64, String, String)> {
        v.iter()
            .map(|(s, k, i)| (*s, k.to_string(), i.to_string()))
            .collect()
    };
    assert_eq!(
        ids(tx.changes_since(1).await.expect("changes")),
        owned(&[(2, "key", "b"), (2, "policy", "p"), (3, "deployment", "d")])
    );
    assert_eq!(ids(tx.changes_since(3).await.expect("changes")), owned(&[]));
    assert_eq!(tx.changes_since(0).await.expect("changes").len(), 4);

    // Its own writes are visible to itself.
    tx.put_entities(&rows(&[("key", "a", json!(9))]))
        .await
        .expect("put");
    let own = tx.changes_since(3).await.expect("changes");
    assert_eq!(own.len(), 1);
    assert_eq!((own[0].seq, own[0].doc.clone()), (4, json!(9)));
    tx.commit().await.expect("commit");
}

async fn dropping_a_transaction_rolls_everything_back(t: &TestStore) {
    {
        let mut tx = t.store.begin().await.expect("begin");
        tx.put_entities(&rows(&[("key", "a", json!(1))]))
            .await
            .expect("put");
        tx.insert_alerts(&[alert("a1", "key_deleted", "critical")])
            .await
            .expect("alerts");
        tx.save_offsets(&[offset("g", "t", 0, 10)])
            .await
            .expect("offsets");
        // dropped here, uncommitted
    }
    let mut tx = t.store.begin().await.expect("begin");
    tx.put_entities(&rows(&[("key", "b", json!(1))]))
        .await
        .expect("put");
    tx.rollback().await.expect("explicit rollback");

    assert_eq!(
        t.store.load().await.expect("load"),
        Snapshot {
            entities: vec![],
            seq: 0
        }
    );
    assert!(t
        .store
        .alerts_since(0, 100)
        .await
        .expect("alerts")
        .is_empty());
    assert!(t.store.offsets("g", "t").await.expect("offsets").is_empty());

    // The sequence counters were rolled back too.
    let mut tx = t.store.begin().await.expect("begin");
    assert_eq!(
        tx.put_entities(&rows(&[("key", "c", json!(1))]))
            .await
            .expect("put"),
        1
    );
    tx.insert_alerts(&[alert("a1", "key_deleted", "critical")])
        .await
        .expect("alerts");
    tx.commit().await.expect("commit");
    assert_eq!(t.store.alerts_since(0, 10).await.expect("alerts")[0].seq, 1);
}

async fn duplicate_alert_ids_are_inserted_once(t: &TestStore) {
    let mut tx = t.store.begin().await.expect("begin");
    let mut changed = alert("a", "key_deleted", "critical");
    changed.severity = "info".to_string();
    let new = tx
        .insert_alerts(&[
            alert("a", "key_deleted", "critical"),
            alert("b", "key_disabled", "critical"),
            changed.clone(),
        ])
        .await
        .expect("insert");
    assert_eq!(new, 2);
    tx.commit().await.expect("commit");

    // A redelivered event raises the same ids again: only the new one is stored.
    let mut tx = t.store.begin().await.expect("begin");
    let new = tx
        .insert_alerts(&[
            alert("b", "key_disabled", "critical"),
            changed,
            alert("c", "key_enabled", "info"),
        ])
        .await
        .expect("insert again");
    assert_eq!(new, 1);
    assert_eq!(tx.insert_alerts(&[]).await.expect("insert nothing"), 0);
    tx.commit().await.expect("commit");

    let stored = t.store.alerts_since(0, 100).await.expect("alerts");
    let ids: Vec<&str> = stored.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(
        stored[0].severity, "critical",
        "the first stored alert is kept"
    );
    assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq));
}

async fn alerts_round_trip_and_filter(t: &TestStore) {
    let mut first = alert("a1", "key_deleted", "critical");
    // Not UTC, and finer than a microsecond: stored as UTC, truncated to microseconds.
    first.event_time = datetime!(2026-08-20 16:03:11.520_123_999 +02:00);
    first.created_at = datetime!(2026-08-20 14:05:00 UTC);
    first.doc = json!({"summary": "key deleted", "deployments": [{"crn": "d1"}]});
    let mut second = alert("a2", "key_disabled", "critical");
    second.created_at = datetime!(2026-08-21 00:00:00 UTC);
    let mut third = alert("a3", "key_enabled", "info");
    third.created_at = datetime!(2026-08-22 00:00:00.000_001 UTC);
    let mut tx = t.store.begin().await.expect("begin");
    tx.insert_alerts(&[first.clone(), second, third])
        .await
        .expect("insert");
    tx.commit().await.expect("commit");

    let all = t
        .store
        .alerts(&AlertFilter::default())
        .await
        .expect("alerts");
    let ids = |rows: &[AlertRow]| rows.iter().map(|a| a.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&all), ["a3", "a2", "a1"], "newest first");
    let stored = &all[2];
    let expected = AlertRow {
        id: "a1".to_string(),
        kind: first.kind.clone(),
        severity: first.severity.clone(),
        deployment: first.deployment.clone(),
        key: first.key.clone(),
        cause: first.cause.clone(),
        event_time: datetime!(2026-08-20 14:03:11.520_123 UTC),
        created_at: first.created_at,
        doc: first.doc.clone(),
        seq: 1,
    };
    assert_eq!(stored, &expected);

    let filter = |kind: Option<&str>, severity: Option<&str>, since, limit| AlertFilter {
        kind: kind.map(str::to_string),
        severity: severity.map(str::to_string),
        since,
        limit,
    };
    let find = |f: AlertFilter| async move { ids(&t.store.alerts(&f).await.expect("alerts")) };
    assert_eq!(
        find(filter(Some("key_disabled"), None, None, 10)).await,
        ["a2"]
    );
    assert_eq!(
        find(filter(None, Some("critical"), None, 10)).await,
        ["a2", "a1"]
    );
    assert_eq!(find(filter(None, Some("critical"), None, 1)).await, ["a2"]);
    assert_eq!(
        find(filter(None, None, None, 0)).await,
        Vec::<String>::new()
    );
    assert_eq!(
        find(filter(None, None, None, -5)).await,
        Vec::<String>::new()
    );
    let since = Some(datetime!(2026-08-21 00:00:00 UTC));
    assert_eq!(
        find(filter(None, None, since, 10)).await,
        ["a3", "a2"],
        "since is inclusive"
    );
    let since = Some(datetime!(2026-08-22 02:00:00.000_001 +02:00));
    assert_eq!(
        find(filter(None, None, since, 10)).await,
        ["a3"],
        "since compares instants"
    );
    assert_eq!(
        find(filter(Some("key_enabled"), Some("critical"), None, 10)).await,
        Vec::<String>::new()
    );
}

async fn alerts_since_pages_through_the_outbox(t: &TestStore) {
    for batch in 0..3 {
        let mut tx = t.store.begin().await.expect("begin");
        let alerts: Vec<NewAlert> = (0..4)
            .map(|i| alert(&format!("b{batch}-{i}"), "key_rotated", "info"))
            .collect();
        tx.insert_alerts(&alerts).await.expect("insert");
        tx.commit().await.expect("commit");
    }
    let mut cursor = 0;
    let mut drained = Vec::new();
    loop {
        let page = t.store.alerts_since(cursor, 5).await.expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 5);
        cursor = page.last().expect("non-empty").seq;
        drained.extend(page.into_iter().map(|a| a.id));
    }
    let expected: Vec<String> = (0..3)
        .flat_map(|b| (0..4).map(move |i| format!("b{b}-{i}")))
        .collect();
    assert_eq!(drained, expected);
    assert_eq!(cursor, 12);
}

async fn existing_events_finds_only_processed_events(t: &TestStore) {
    // More ids than one statement takes, to cross a chunk boundary.
    let processed: Vec<String> = (0..1200).map(|i| format!("{i:064x}")).collect();
    let mut tx = t.store.begin().await.expect("begin");
    let markers: Vec<(String, String, serde_json::Value)> = processed
        .iter()
        .step_by(2)
        .map(|id| (EVENT_KIND.to_string(), id.clone(), json!({"t": 1})))
        .collect();
    tx.put_entities(&markers).await.expect("put markers");
    // Same id, other kind: not a processed event.
    tx.put_entities(&rows(&[("key", &processed[1], json!({}))]))
        .await
        .expect("put key");
    let found = tx.existing_events(&processed).await.expect("lookup");
    let expected: HashSet<String> = processed.iter().step_by(2).cloned().collect();
    assert_eq!(found, expected);
    assert!(tx
        .existing_events(&[])
        .await
        .expect("empty lookup")
        .is_empty());
    tx.commit().await.expect("commit");

    // Committed markers are found by the next transaction.
    let mut tx = t.store.begin().await.expect("begin");
    let asked = vec![
        processed[0].clone(),
        processed[1].clone(),
        "unknown".to_string(),
    ];
    let found = tx.existing_events(&asked).await.expect("lookup");
    assert_eq!(found, HashSet::from([processed[0].clone()]));
}

async fn offsets_only_move_forward(t: &TestStore) {
    let save = |offsets: Vec<PartitionOffset>| async move {
        let mut tx = t.store.begin().await.expect("begin");
        tx.save_offsets(&offsets).await.expect("save");
        tx.commit().await.expect("commit");
    };
    save(vec![
        offset("g", "t", 1, 10),
        offset("g", "t", 0, 7),
        offset("g", "t", 0, 3),
    ])
    .await;
    save(vec![offset("g", "t", 1, 5), offset("g", "t", 0, 8)]).await;
    save(vec![offset("g", "other", 0, 100), offset("h", "t", 0, 200)]).await;
    save(vec![]).await;

    let stored = t.store.offsets("g", "t").await.expect("offsets");
    assert_eq!(stored, [offset("g", "t", 0, 8), offset("g", "t", 1, 10)]);
    assert_eq!(
        t.store.offsets("g", "other").await.expect("offsets"),
        [offset("g", "other", 0, 100)]
    );
    assert_eq!(
        t.store.offsets("h", "t").await.expect("offsets"),
        [offset("h", "t", 0, 200)]
    );
    assert!(t
        .store
        .offsets("nobody", "t")
        .await
        .expect("offsets")
        .is_empty());
}

async fn concurrent_writers_never_lose_an_update(t: &TestStore) {
    // Each writer reads the counter inside its transaction and writes it plus one. Without
    // serialized writers two of them would read the same value and an update would be lost.
    const WRITERS: i64 = 8;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = t.store.clone();
            tokio::spawn(async move {
                let mut tx = store.begin().await.expect("begin");
                let current = tx
                    .changes_since(0)
                    .await
                    .expect("changes")
                    .into_iter()
                    .find(|e| e.kind == "counter")
                    .map_or(0, |e| e.doc["n"].as_i64().expect("n"));
                tx.put_entities(&rows(&[("counter", "c", json!({"n": current + 1}))]))
                    .await
                    .expect("put");
                tx.commit().await.expect("commit")
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.expect("writer task"));
    }
    seqs.sort();
    assert_eq!(seqs, (1..=WRITERS).collect::<Vec<_>>());
    let snapshot = t.store.load().await.expect("load");
    assert_eq!(snapshot.entities[0].doc, json!({"n": WRITERS}));
    assert_eq!(snapshot.seq, WRITERS);
}

async fn ping_answers(t: &TestStore) {
    t.store.ping().await.expect("ping");
    t.store.close().await;
    assert!(
        t.store.ping().await.is_err(),
        "a closed store does not answer"
    );
}

async fn lock_waits_that_give_up_are_transient(t: &TestStore) {
    // While a writer holds the lock, a writer that does not wait long fails transiently.
    let holder = t.store.begin().await.expect("begin");
    let source = match &t.place {
        Place::Sqlite { .. } => {
            let options = SqliteConnectOptions::new()
                .filename(sqlite_path(&t.url).expect("path"))
                .busy_timeout(Duration::ZERO);
            let mut other = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("connect");
            let attempt = other.begin_with("BEGIN IMMEDIATE").await.map(|_| ());
            attempt.expect_err("the lock should be taken")
        }
        Place::Postgres { .. } => {
            let mut other = sqlx::PgConnection::connect(&t.url).await.expect("connect");
            let mut tx = other.begin().await.expect("begin");
            sqlx::query("SET LOCAL lock_timeout = '50ms'")
                .execute(&mut *tx)
                .await
                .expect("set lock_timeout");
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITE_LOCK_KEY)
                .execute(&mut *tx)
                .await
                .expect_err("the lock should be taken")
        }
    };
    let error = StoreError::Query {
        what: "take the write lock",
        source,
    };
    assert!(error.is_transient(), "{error:?}");
    holder.rollback().await.expect("rollback");

    let syntax = on_pool!(&t.store.pool, |p| sqlx::query("SELEKT 1")
        .execute(p)
        .await
        .map(|_| ()))
    .expect_err("bad SQL fails");
    let error = StoreError::Query {
        what: "run bad SQL",
        source: syntax,
    };
    assert!(!error.is_transient(), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: writers from several connections (standing in for several instances).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_second_writer_waits_for_the_first_and_sees_its_writes() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let mut first = t.store.begin().await.expect("first begin");
    first
        .put_entities(&rows(&[("key", "k1", json!({"v": 1}))]))
        .await
        .expect("put");

    let other = t.store.clone();
    let second = tokio::spawn(async move {
        let mut tx = other.begin().await.expect("second begin");
        let seen = tx.changes_since(0).await.expect("changes");
        let seq = tx
            .put_entities(&rows(&[("key", "k2", json!({"v": 2}))]))
            .await
            .expect("put");
        tx.commit().await.expect("second commit");
        (seen, seq)
    });

    wait_until("the second writer waits for the write lock", || async {
        waiting_advisory_locks(&t.store).await == 1
    })
    .await;
    assert!(!second.is_finished(), "the second writer must wait");
    assert_eq!(first.commit().await.expect("first commit"), 1);

    let (seen, seq) = second.await.expect("second task");
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].id.as_str(), seen[0].seq), ("k1", 1));
    assert_eq!(seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_cancelled_begin_leaves_no_lock_behind() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let first = t.store.begin().await.expect("first begin");
    let other = t.store.clone();
    let waiting = tokio::spawn(async move {
        let _tx = other.begin().await;
    });
    wait_until("the second writer waits for the write lock", || async {
        waiting_advisory_locks(&t.store).await == 1
    })
    .await;
    waiting.abort();
    assert!(waiting.await.expect_err("aborted").is_cancelled());
    first.commit().await.expect("first commit");

    // Whatever happened to the abandoned connection, writing works and nothing is stuck.
    for _ in 0..3 {
        put(&t.store, &[("key", "k", json!(1))]).await;
    }
    assert_eq!(t.store.load().await.expect("load").seq, 3);
}

// ---------------------------------------------------------------------------------------------
// Opening: URLs, files, errors.

/// A database of schema version 2 (entities WITHOUT ROWID) is migrated to version 3 (a rowid
/// table) with every entity, document and sequence number kept, and the change feed index back.
#[tokio::test]
async fn sqlite_version_2_upgrades_to_a_rowid_entities_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v2.db");
    let url = format!("sqlite://{}", path.display());
    let big = "x".repeat(3000); // spilled to an overflow page in a WITHOUT ROWID table
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("open");
        schema::sqlite_schema_up_to(&mut conn, 2)
            .await
            .expect("schema version 2");
        for (kind, id, doc, seq) in [
            ("key", "k1", format!("{{\"big\":\"{big}\"}}"), 1),
            ("deployment", "d1", "{\"state\":\"active\"}".to_owned(), 2),
        ] {
            sqlx::query("INSERT INTO entities (kind, id, doc, seq) VALUES ($1, $2, $3, $4)")
                .bind(kind)
                .bind(id)
                .bind(doc)
                .bind(seq)
                .execute(&mut conn)
                .await
                .expect("insert");
        }
        sqlx::query("UPDATE store_meta SET entity_seq = 2")
            .execute(&mut conn)
            .await
            .expect("seq");
        conn.close().await.expect("close");
    }
    let store = Store::connect(&url).await.expect("connect and migrate");
    assert_eq!(applied_migrations(&store).await, 3);
    let table: String = on_pool!(&store.pool, |p| sqlx::query_scalar(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'entities'"
    )
    .fetch_one(p)
    .await)
    .expect("entities table");
    assert!(!table.contains("WITHOUT ROWID"), "{table}");
    let indexed: i64 = on_pool!(&store.pool, |p| sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = 'entities_by_seq'"
    )
    .fetch_one(p)
    .await)
    .expect("index");
    assert_eq!(indexed, 1);
    let snapshot = store.load().await.expect("load");
    assert_eq!(snapshot.seq, 2);
    let got: Vec<(String, String, i64)> = snapshot
        .entities
        .iter()
        .map(|e| (e.kind.clone(), e.id.clone(), e.seq))
        .collect();
    assert_eq!(
        got,
        vec![
            ("deployment".to_owned(), "d1".to_owned(), 2),
            ("key".to_owned(), "k1".to_owned(), 1)
        ]
    );
    assert_eq!(snapshot.entities[1].doc, json!({ "big": big }));
    // Upserts still find the row by (id, kind).
    put(&store, &[("key", "k1", json!({"state": "disabled"}))]).await;
    let snapshot = store.load().await.expect("load again");
    assert_eq!(snapshot.entities.len(), 2);
    assert_eq!(snapshot.entities[1].doc, json!({"state": "disabled"}));
    assert_eq!(snapshot.entities[1].seq, 3);
    store.close().await;
}

#[tokio::test]
async fn sqlite_creates_the_file_and_its_parent_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a/b/c/keywatch.db");
    let store = Store::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    assert!(path.is_file(), "{} was not created", path.display());
    assert_eq!(store.backend_name(), "sqlite");
    put(&store, &[("key", "k", json!(1))]).await;
    store.close().await;

    // The data is in that file: a new store on the same path sees it, also as `sqlite:PATH`.
    let reopened = Store::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("reopen");
    assert_eq!(reopened.load().await.expect("load").seq, 1);
    let journal_mode: String = on_pool!(&reopened.pool, |p| sqlx::query_scalar(
        "PRAGMA journal_mode"
    )
    .fetch_one(p)
    .await)
    .expect("journal mode");
    assert_eq!(journal_mode, "wal");
}

#[test]
fn sqlite_urls_map_to_paths() {
    let path = |url: &str| sqlite_path(url).map(|p| p.display().to_string());
    assert_eq!(
        path("sqlite://data/keywatch.db").as_deref(),
        Ok("data/keywatch.db")
    );
    assert_eq!(
        path("sqlite:///var/lib/kw.db").as_deref(),
        Ok("/var/lib/kw.db")
    );
    assert_eq!(path("sqlite:kw.db").as_deref(), Ok("kw.db"));
    assert_eq!(
        path("sqlite://my%20dir/kw.db").as_deref(),
        Ok("my dir/kw.db")
    );
    assert!(path("sqlite://").is_err());
    assert!(path("sqlite::memory:").is_err());
    assert!(path("sqlite://kw.db?mode=ro").is_err());
}

#[test]
fn passwords_never_appear_in_shown_urls() {
    assert_eq!(
        redact_url("postgres://kw:s3cret@db.example:5432/keywatch"),
        "postgres://kw:***@db.example:5432/keywatch"
    );
    assert_eq!(
        redact_url("postgresql://kw:p@ss/w?rd@db/keywatch?sslmode=require"),
        "postgresql://kw:***@db/keywatch?sslmode=require"
    );
    assert_eq!(
        redact_url("postgres://db/keywatch?user=kw&password=s3cret&sslmode=verify-full"),
        "postgres://db/keywatch?user=kw&password=***&sslmode=verify-full"
    );
    assert_eq!(
        redact_url("postgres://kw@db/keywatch"),
        "postgres://kw@db/keywatch"
    );
    assert_eq!(
        redact_url("sqlite://data/keywatch.db"),
        "sqlite://data/keywatch.db"
    );
}

#[tokio::test]
async fn bad_urls_give_clear_errors() {
    let error = |url: &'static str| async move {
        let e = Store::connect(url)
            .await
            .err()
            .unwrap_or_else(|| panic!("{url} must fail"));
        format!("{:#}", anyhow::Error::from(e))
    };

    let message = error("mysql://root:hunter2@localhost/kw").await;
    assert!(
        message.contains("invalid store url mysql://root:***@localhost/kw"),
        "{message}"
    );
    assert!(
        message.contains("sqlite://PATH or postgres://"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");

    let message = error("sqlite://").await;
    assert!(
        message.contains("invalid store url sqlite://: no file path"),
        "{message}"
    );

    let message = error("postgres://kw:hunter2@127.0.0.1:1/keywatch").await;
    assert!(
        message.starts_with("cannot connect to store postgres://kw:***@127.0.0.1:1/keywatch: "),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
    assert!(
        message.to_lowercase().contains("refused"),
        "the cause is kept: {message}"
    );

    let message = error("postgres://kw@127.0.0.1:5432/db?sslmode=bogus").await;
    assert!(
        message.contains("invalid store url postgres://kw@127.0.0.1:5432/db?sslmode=bogus"),
        "{message}"
    );

    // A parent "directory" that is a file.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("file"), b"x").expect("write");
    let url = format!("sqlite://{}/file/sub/kw.db", dir.path().display());
    let e = Store::connect(&url).await.expect_err("must fail");
    let message = format!("{:#}", anyhow::Error::from(e));
    assert!(
        message.starts_with(&format!(
            "cannot create directory {}/file/sub for store {url}: ",
            dir.path().display()
        )),
        "{message}"
    );
}

#[test]
fn timestamps_outside_four_digit_years_are_refused() {
    assert!(timestamp_text(datetime!(9999-12-31 23:59:59.999_999 UTC)).is_ok());
    assert!(timestamp_text(datetime!(0000-01-01 00:00 UTC)).is_ok());
    assert_eq!(
        timestamp_text(datetime!(2026-01-02 03:04:05.6 +01:00)).expect("format"),
        "2026-01-02T02:04:05.600000Z"
    );
    let before_year_zero = OffsetDateTime::UNIX_EPOCH
        .replace_year(-1)
        .expect("year -1");
    assert!(matches!(
        timestamp_text(before_year_zero),
        Err(StoreError::InvalidValue { .. })
    ));
}

/// SQLite: every write transaction runs on the same connection, also while the reading pool's
/// connections are busy, so the writer's page cache survives from one transaction to the next (a
/// connection's TEMP table is the witness: it exists only on the connection that made it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_transactions_share_one_connection() {
    let t = TestStore::sqlite().await;
    let mut tx = t.store.begin().await.expect("begin");
    let Tx::Sqlite(c) = &mut tx.tx else {
        unreachable!("a SQLite transaction")
    };
    sqlx::query("CREATE TEMP TABLE witness (x)")
        .execute(&mut **c)
        .await
        .expect("create temp table");
    tx.commit().await.expect("commit");
    let Pool::Sqlite { read: pool, .. } = &t.store.pool else {
        unreachable!("a SQLite store")
    };
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(pool.acquire().await.expect("a reading connection"));
    }
    let mut tx = t.store.begin().await.expect("begin again");
    let seen: i64 = on_tx!(&mut tx.tx, |c| sqlx::query_scalar(
        "SELECT count(*) FROM temp.sqlite_master WHERE name = 'witness'"
    )
    .fetch_one(&mut **c)
    .await
    .expect("query"));
    assert_eq!(
        seen, 1,
        "the second write transaction ran on another connection"
    );
    tx.rollback().await.expect("rollback");
    drop(readers);
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A migrated store and the place it lives in (removed on drop).
struct TestStore {
    store: Store,
    url: String,
    place: Place,
}

/// Held for its `Drop`, which removes the store.
enum Place {
    Sqlite { _dir: tempfile::TempDir },
    Postgres { _database: TestDatabase },
}

/// Where a store can be created, before it is.
struct FreshPlace {
    url: String,
    _place: Place,
}

impl TestStore {
    async fn sqlite() -> TestStore {
        let fresh = fresh_sqlite();
        let store = Store::connect(&fresh.url).await.expect("connect to sqlite");
        TestStore {
            store,
            url: fresh.url,
            place: fresh._place,
        }
    }

    /// `None` when PostgreSQL is unreachable and `KEYWATCH_SKIP_POSTGRES=1`.
    async fn postgres() -> Option<TestStore> {
        let fresh = fresh_postgres().await?;
        let store = Store::connect(&fresh.url)
            .await
            .expect("connect to postgres");
        Some(TestStore {
            store,
            url: fresh.url,
            place: fresh._place,
        })
    }

    async fn fresh_place(&self) -> FreshPlace {
        match self.place {
            Place::Sqlite { .. } => fresh_sqlite(),
            Place::Postgres { .. } => fresh_postgres()
                .await
                .expect("postgres was reachable a moment ago"),
        }
    }
}

fn fresh_sqlite() -> FreshPlace {
    let dir = tempfile::tempdir().expect("tempdir");
    FreshPlace {
        url: format!("sqlite://{}/keywatch.db", dir.path().display()),
        _place: Place::Sqlite { _dir: dir },
    }
}

async fn fresh_postgres() -> Option<FreshPlace> {
    let database = TestDatabase::create().await?;
    Some(FreshPlace {
        url: database.url.clone(),
        _place: Place::Postgres {
            _database: database,
        },
    })
}

/// A PostgreSQL database of its own, dropped (with its connections) when this is dropped.
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> Option<TestDatabase> {
        let server = std::env::var("KEYWATCH_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
        // Accept the server with or without a database path (scripts/test passes `.../postgres`).
        let server = match server.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('/') {
                Some((host, _db)) => format!("{scheme}://{host}"),
                None => server.clone(),
            },
            None => server.clone(),
        };
        let admin_url = format!("{server}/postgres");
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect(&admin_url),
        )
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        let mut admin = match connected {
            Ok(admin) => admin,
            Err(e) if std::env::var("KEYWATCH_SKIP_POSTGRES").as_deref() == Ok("1") => {
                eprintln!("skipped: PostgreSQL at {server} is not reachable ({e}) and KEYWATCH_SKIP_POSTGRES=1");
                return None;
            }
            Err(e) => panic!(
                "PostgreSQL at {server} is not reachable ({e}); start it (or point \
                 KEYWATCH_TEST_POSTGRES at one) or set KEYWATCH_SKIP_POSTGRES=1 to skip these tests"
            ),
        };
        let name = format!("kw_t_{:016x}", rand::random::<u64>());
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        admin.close().await.expect("close admin connection");
        Some(TestDatabase {
            url: format!("{server}/{name}"),
            admin_url,
            name,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread of its own.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
                Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: cannot drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

fn rows(items: &[(&str, &str, serde_json::Value)]) -> Vec<(String, String, serde_json::Value)> {
    items
        .iter()
        .map(|(kind, id, doc)| (kind.to_string(), id.to_string(), doc.clone()))
        .collect()
}

/// Writes `items` in a transaction of their own; returns the committed sequence number.
async fn put(store: &Store, items: &[(&str, &str, serde_json::Value)]) -> i64 {
    let mut tx = store.begin().await.expect("begin");
    tx.put_entities(&rows(items)).await.expect("put");
    tx.commit().await.expect("commit")
}

fn entity<'a>(entities: &'a [EntityRow], kind: &str, id: &str) -> &'a EntityRow {
    entities
        .iter()
        .find(|e| e.kind == kind && e.id == id)
        .unwrap_or_else(|| panic!("no entity {kind}/{id}"))
}

fn alert(id: &str, kind: &str, severity: &str) -> NewAlert {
    NewAlert {
        id: id.to_string(),
        kind: kind.to_string(),
        severity: severity.to_string(),
        deployment: "crn:v1:bluemix:public:messagehub:us-south:a/1:inst::".to_string(),
        key: "crn:v1:bluemix:public:kms:us-south:a/1:kp:key:k1".to_string(),
        cause: "e1".to_string(),
        event_time: datetime!(2026-08-20 14:03:11.520 UTC),
        created_at: datetime!(2026-08-20 14:03:12 UTC),
        doc: json!({"id": id}),
    }
}

fn offset(group: &str, topic: &str, partition: i32, next_offset: i64) -> PartitionOffset {
    PartitionOffset {
        group: group.to_string(),
        topic: topic.to_string(),
        partition,
        next_offset,
    }
}

async fn applied_migrations(store: &Store) -> i64 {
    on_pool!(&store.pool, |p| sqlx::query_scalar(
        "SELECT count(*) FROM keywatch_migrations"
    )
    .fetch_one(p)
    .await)
    .expect("count migrations")
}

/// Advisory lock requests in this store's database that are waiting.
async fn waiting_advisory_locks(store: &Store) -> i64 {
    let Pool::Postgres(p) = &store.pool else {
        panic!("postgres only")
    };
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(p)
    .await
    .expect("read pg_locks")
}

/// Polls `condition` until it holds; fails after 20 s.
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
