//! The bridge between the engine and the store: loading the engine from persisted entities,
//! syncing what other instances wrote, and writing one batch's changes and alerts atomically.

use crate::engine::{Alert, Change, Engine, EntityKind};
use crate::settings::Settings;
use crate::setup;
use crate::store::{NewAlert, PartitionOffset, Store, StoreError, StoreTx};
use crate::timefmt::Millis;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored entity {kind}/{id} cannot be read: {source}")]
    Corrupt {
        kind: String,
        id: String,
        source: serde_json::Error,
    },
    #[error("registry error: {0}")]
    Registry(#[from] crate::engine::RegistryError),
}

impl PersistError {
    /// Worth retrying (the database was unreachable or busy), as opposed to a broken invariant.
    pub fn is_transient(&self) -> bool {
        matches!(self, PersistError::Store(e) if e.is_transient())
    }
}

/// The engine as persisted, plus the sequence number it is complete up to.
pub struct Loaded {
    pub engine: Engine,
    pub seq: i64,
}

/// Loads every persisted entity into a new engine. Unknown entity kinds are skipped (a newer
/// build may have written them); unreadable documents are an error.
pub async fn load(store: &Store, settings: &Settings) -> Result<Loaded, PersistError> {
    let snapshot = store.load().await?;
    let mut engine = Engine::new(setup::lifecycle(settings));
    for row in snapshot.entities {
        apply_row(&mut engine, &row.kind, &row.id, row.doc)?;
    }
    engine.finish_loading();
    engine.clear_changes();
    engine.convert_loaded_timelines();
    Ok(Loaded {
        engine,
        seq: snapshot.seq,
    })
}

fn apply_row(
    engine: &mut Engine,
    kind: &str,
    id: &str,
    doc: serde_json::Value,
) -> Result<(), PersistError> {
    let Some(k) = EntityKind::parse(kind) else {
        tracing::warn!(kind, id, "skipping an entity of unknown kind");
        return Ok(());
    };
    engine
        .load_entity(k, id, doc)
        .map_err(|source| PersistError::Corrupt {
            kind: kind.to_owned(),
            id: id.to_owned(),
            source,
        })
}

/// Brings `engine` up to date with what others committed since `seq` (inside `tx`, so complete).
/// Returns whether there was anything (another writer committed since `seq`).
pub async fn sync(
    tx: &mut StoreTx<'_>,
    engine: &mut Engine,
    seq: i64,
) -> Result<bool, PersistError> {
    let rows = tx.changes_since(seq).await?;
    if rows.is_empty() {
        return Ok(false);
    }
    for row in rows {
        apply_row(engine, &row.kind, &row.id, row.doc)?;
    }
    engine.finish_loading();
    engine.convert_loaded_timelines();
    Ok(true)
}

/// Registers the configured deployments and authorizations (new ones raise `shared_key`).
pub fn register_configured(engine: &mut Engine, settings: &Settings) -> Result<(), PersistError> {
    let (deployments, policies) = setup::registry(settings)?;
    for p in policies {
        engine.add_configured_policy(p);
    }
    let changed: Vec<_> = deployments
        .into_iter()
        .filter(|d| {
            engine
                .deployments()
                .get(&d.spec.crn)
                .is_none_or(|existing| existing.spec != d.spec)
        })
        .collect();
    if !changed.is_empty() {
        engine.register(changed);
    }
    Ok(())
}

/// One batch's effects, taken out of the engine: the changed entities (serialized) and the new
/// alerts. Written by [`write_effects`], possibly on another task while the engine goes on.
pub struct Effects {
    changes: Vec<Change>,
    pub alerts: Vec<Alert>,
}

/// Takes the engine's pending changes and alerts.
pub fn take(engine: &mut Engine) -> Effects {
    Effects {
        changes: engine.take_changes(),
        alerts: engine.take_alerts(),
    }
}

/// Writes the engine's pending changes and alerts, and the given Kafka progress, into `tx`.
/// Returns the number of new alerts.
pub async fn write(
    tx: &mut StoreTx<'_>,
    engine: &mut Engine,
    offsets: &[PartitionOffset],
) -> Result<(usize, Vec<Alert>), PersistError> {
    let effects = take(engine);
    let inserted = write_effects(tx, &effects, offsets).await?;
    Ok((inserted, effects.alerts))
}

/// Writes `effects` and the given Kafka progress into `tx`; returns the number of new alerts.
pub async fn write_effects(
    tx: &mut StoreTx<'_>,
    effects: &Effects,
    offsets: &[PartitionOffset],
) -> Result<usize, PersistError> {
    if !effects.changes.is_empty() {
        let rows: Vec<(&str, &str, &str)> = effects
            .changes
            .iter()
            .map(|c| (c.kind.as_str(), c.id.as_str(), c.doc.as_str()))
            .collect();
        tx.put_entity_texts(&rows).await?;
    }
    let now = time::OffsetDateTime::now_utc();
    let new: Vec<NewAlert> = effects.alerts.iter().map(|a| new_alert(a, now)).collect();
    let inserted = if new.is_empty() {
        0
    } else {
        tx.insert_alerts(&new).await? as usize
    };
    if !offsets.is_empty() {
        tx.save_offsets(offsets).await?;
    }
    Ok(inserted)
}

fn new_alert(a: &Alert, now: time::OffsetDateTime) -> NewAlert {
    NewAlert {
        id: a.id.clone(),
        kind: a.kind.as_str().to_owned(),
        severity: a.severity.as_str().to_owned(),
        deployment: a.deployment.clone(),
        key: a.key.clone(),
        cause: a.cause.clone(),
        event_time: a.event_time.map(Millis::to_offset_date_time).unwrap_or(now),
        created_at: now,
        doc: serde_json::to_value(a).unwrap_or_default(),
    }
}
