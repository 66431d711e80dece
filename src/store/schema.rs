//! Schema migrations: embedded SQL per backend, each applied once, serialized across instances.
//!
//! All pending migrations run in one transaction. On PostgreSQL it first takes the advisory lock
//! [`MIGRATION_LOCK_KEY`], so a second instance starting at the same moment waits, then sees the
//! migrations recorded and applies nothing; on SQLite `BEGIN IMMEDIATE` has the same effect.
//! Every applied migration is recorded with a SHA-256 checksum of its SQL: editing a released
//! migration is refused at start-up; add a new one instead.

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{timestamp_text, Pool, Store, StoreError, Tx, MIGRATION_LOCK_KEY};

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/sqlite/0001_initial.sql"),
    },
    // Delivery: planner cursor, notification generations and frozen payloads.
    Migration {
        version: 2,
        name: "delivery",
        sql: include_str!("migrations/sqlite/0002_delivery.sql"),
    },
    Migration {
        version: 3,
        name: "entities_rowid",
        sql: include_str!("migrations/sqlite/0003_entities_rowid.sql"),
    },
];

const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/postgres/0001_initial.sql"),
    },
    // Delivery: planner cursor, notification generations and frozen payloads.
    Migration {
        version: 2,
        name: "delivery",
        sql: include_str!("migrations/postgres/0002_delivery.sql"),
    },
];

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS keywatch_migrations (
    version    BIGINT PRIMARY KEY,
    name       TEXT   NOT NULL,
    checksum   TEXT   NOT NULL,
    applied_at TEXT   NOT NULL
)";

/// Brings the schema of `store` up to date.
pub(super) async fn migrate(store: &Store) -> Result<(), StoreError> {
    let url = store.url.as_str();
    let failed = |source| StoreError::Migrate {
        url: url.to_string(),
        source,
    };
    let (mut tx, migrations) = match &store.pool {
        Pool::Sqlite { read: p, .. } => (
            Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await.map_err(failed)?),
            SQLITE,
        ),
        Pool::Postgres(p) => {
            let mut t = p.begin().await.map_err(failed)?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK_KEY)
                .execute(&mut *t)
                .await
                .map_err(failed)?;
            (Tx::Postgres(t), POSTGRES)
        }
    };
    on_tx!(&mut tx, |c| sqlx::raw_sql(CREATE_MIGRATIONS_TABLE)
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected()))
    .map_err(failed)?;
    let applied: Vec<(i64, String)> = on_tx!(&mut tx, |c| sqlx::query_as(
        "SELECT version, checksum FROM keywatch_migrations ORDER BY version"
    )
    .fetch_all(&mut **c)
    .await)
    .map_err(failed)?;

    let known = migrations.last().map_or(0, |m| m.version);
    if let Some(&(found, _)) = applied.iter().find(|(version, _)| *version > known) {
        return Err(StoreError::SchemaTooNew {
            url: url.to_string(),
            found,
            known,
        });
    }
    let now = timestamp_text(OffsetDateTime::now_utc())?;
    for migration in migrations {
        let checksum = checksum(migration.sql);
        match applied
            .iter()
            .find(|(version, _)| *version == migration.version)
        {
            Some((_, stored)) if *stored == checksum => continue,
            Some(_) => {
                return Err(StoreError::MigrationChanged {
                    url: url.to_string(),
                    version: migration.version,
                    name: migration.name.to_string(),
                })
            }
            None => {}
        }
        on_tx!(&mut tx, |c| sqlx::raw_sql(migration.sql)
            .execute(&mut **c)
            .await
            .map(|r| r.rows_affected()))
        .map_err(failed)?;
        on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO keywatch_migrations (version, name, checksum, applied_at) \
             VALUES ($1, $2, $3, $4)"
        )
        .bind(migration.version)
        .bind(migration.name)
        .bind(checksum.as_str())
        .bind(now.as_str())
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(failed)?;
    }
    match tx {
        Tx::Sqlite(t) => t.commit().await,
        Tx::Postgres(t) => t.commit().await,
    }
    .map_err(failed)
}

/// The schema version this build creates, per backend name (`"sqlite"`, `"postgres"`).
#[cfg(test)]
pub(super) fn latest_version(backend: &str) -> i64 {
    let migrations = if backend == "sqlite" {
        SQLITE
    } else {
        POSTGRES
    };
    migrations.last().map_or(0, |m| m.version)
}

/// Creates the SQLite schema as an earlier build left it, up to `version` (for upgrade tests).
#[cfg(test)]
pub(super) async fn sqlite_schema_up_to(
    conn: &mut sqlx::SqliteConnection,
    version: i64,
) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(CREATE_MIGRATIONS_TABLE)
        .execute(&mut *conn)
        .await?;
    for m in SQLITE.iter().filter(|m| m.version <= version) {
        sqlx::raw_sql(m.sql).execute(&mut *conn).await?;
        sqlx::query(
            "INSERT INTO keywatch_migrations (version, name, checksum, applied_at) \
             VALUES ($1, $2, $3, 'then')",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(checksum(m.sql))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

fn checksum(sql: &str) -> String {
    crate::hex::encode(&Sha256::digest(sql.as_bytes()))
}
