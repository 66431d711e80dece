//! The deployments and keys as the store holds them, for routing (names, owners, labels) and for
//! saying what state the deployments are in now.
//!
//! An engine of the worker's own holds only the `key` and `deployment` entities (no processed-event
//! markers, no policies) and answers with the engine's own views; [`StateCache::refresh`] applies
//! the entities written since the last refresh.

use crate::engine::view::DeploymentView;
use crate::engine::{DeploymentRecord, Engine, EntityKind, KeyRecord, Lifecycle};
use crate::store::{Store, StoreError};
use crate::timefmt::Millis;
use std::time::{Duration, Instant};

pub struct StateCache {
    engine: Engine,
    /// The entity sequence the cache is complete up to.
    seq: i64,
    /// When the last refresh started.
    refreshed_at: Option<Instant>,
}

impl StateCache {
    pub fn new(lifecycle: Lifecycle) -> StateCache {
        StateCache {
            engine: {
                let mut e = Engine::new(lifecycle);
                e.skip_processed_on_load();
                e
            },
            seq: 0,
            refreshed_at: None,
        }
    }

    /// Applies what was written since the last refresh. Afterwards the cache holds at least
    /// every entity committed before the call.
    pub async fn refresh(&mut self, store: &Store) -> Result<(), StoreError> {
        let started = Instant::now();
        let kinds = [
            EntityKind::Key.as_str(),
            EntityKind::Deployment.as_str(),
            EntityKind::Correlation.as_str(),
            EntityKind::Journal.as_str(),
        ];
        let (rows, seq) = store.entities_since(self.seq, &kinds).await?;
        if !rows.is_empty() {
            for row in rows {
                let Some(kind) = EntityKind::parse(&row.kind) else {
                    continue;
                };
                if let Err(e) = self.engine.load_entity(kind, &row.id, row.doc) {
                    tracing::warn!(kind = %row.kind, id = %row.id, error = %e, "delivery: cannot read a stored entity; it is left out of notifications");
                }
            }
            self.engine.finish_loading();
            // Nothing is written from this engine: only forget what loading noted for writing.
            self.engine.convert_loaded_timelines();
            self.engine.clear_changes();
        }
        self.seq = self.seq.max(seq);
        self.refreshed_at = Some(started);
        Ok(())
    }

    /// [`refresh`](StateCache::refresh) unless the last one started less than `max_age` ago.
    pub async fn refresh_if_older(
        &mut self,
        store: &Store,
        max_age: Duration,
    ) -> Result<(), StoreError> {
        match self.refreshed_at {
            Some(at) if at.elapsed() < max_age => Ok(()),
            _ => self.refresh(store).await,
        }
    }

    pub fn deployment(&self, crn: &str) -> Option<&DeploymentRecord> {
        self.engine.deployments().get(crn)
    }

    pub fn view(&self, crn: &str, now: Millis) -> Option<DeploymentView> {
        self.engine.deployment_view(crn, now)
    }

    /// The key with this CRN (compared as the engine compares keys).
    pub fn key(&self, crn: &str) -> Option<&KeyRecord> {
        let id = self.engine.find_key(crn)?;
        self.engine.keys().get(&id)
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        self.engine.lifecycle()
    }
}
