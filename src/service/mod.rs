//! `keywatch run`: the long-running shell around the engine. Consumes Activity Tracker records from
//! Kafka, applies each batch to the engine and persists state changes, processed-event markers,
//! alerts (the outbox) and per-partition progress in ONE store transaction, and only then stores
//! the Kafka offsets. A crash anywhere replays at most the uncommitted tail, which the engine
//! recognises (processed-event markers, stored progress) so no effect happens twice.

pub mod kafka;
pub mod persist;

use crate::engine::{Disposition, Engine, RegistryError};
use crate::event::{classify_action, skim, ActionClass, ActionField};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{PartitionOffset, Store};
use crate::timefmt::Millis;
use futures::FutureExt as _;
use kafka::{ConsumerState, KeywatchContext};
use persist::PersistError;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// At most this many records are applied in one store transaction (bounded in-flight work: the
/// consumer is not polled while a batch is being written, so a slow store pauses consumption).
pub const MAX_BATCH: usize = 5000;
/// How often deadlines are evaluated on the wall clock.
pub const TICK_INTERVAL: Duration = Duration::from_secs(5);
/// Batches are pipelined (the next one is applied while the previous one commits) once no other
/// writer has been seen in the store for this long; until then every batch holds the write lock
/// from loading what the others wrote to its commit.
pub const SOLO_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("store: {0}")]
    Persist(#[from] PersistError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// What the HTTP side can observe of a running service.
#[derive(Default)]
pub struct Shared {
    pub consumer: Arc<ConsumerState>,
    /// The last store transaction succeeded.
    pub store_ok: std::sync::atomic::AtomicBool,
    /// The processing loop is consuming (start-up done).
    pub consuming: std::sync::atomic::AtomicBool,
    pub batches: std::sync::atomic::AtomicU64,
    pub metrics: Metrics,
}

/// A question or a registry change for the engine, served by the processing loop between batches
/// (the loop is the engine's only owner).
pub enum Request {
    Query(Box<dyn FnOnce(&Engine) + Send>),
    /// Register or update a deployment (`PUT /v1/deployments/{crn}`); replies whether it was new.
    Register {
        spec: crate::engine::DeploymentSpec,
        reply: tokio::sync::oneshot::Sender<Result<bool, String>>,
    },
    /// Soft-delete a deployment (`DELETE /v1/deployments/{crn}`); replies whether it existed.
    SoftDelete {
        crn: String,
        reply: tokio::sync::oneshot::Sender<Result<bool, String>>,
    },
}

/// The HTTP side's handle on the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: tokio::sync::mpsc::Sender<Request>,
}

impl EngineHandle {
    pub fn new(capacity: usize) -> (EngineHandle, tokio::sync::mpsc::Receiver<Request>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (EngineHandle { tx }, rx)
    }

    /// Runs `f` on the engine; `None` when the service is not running.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> T + Send + 'static,
    ) -> Option<T> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let q: Box<dyn FnOnce(&Engine) + Send> = Box::new(move |e: &Engine| {
            let _ = reply.send(f(e));
        });
        self.tx.send(Request::Query(q)).await.ok()?;
        rx.await.ok()
    }

    pub async fn request<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Request,
    ) -> Option<T> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }
}

/// Records taken from the consumer in one go, applied and committed together.
struct Batch {
    records: Vec<OwnedMessage>,
    received: Instant,
}

/// A batch applied to the engine: its effects, the progress to store with them, and what
/// follows its commit.
struct Applied {
    effects: persist::Effects,
    offsets: Vec<PartitionOffset>,
    /// Alerts the store did not hold yet (known once written).
    new_alerts: usize,
    /// When the transaction committed (known once committed).
    committed_at: Option<Instant>,
    outcome: Outcome,
}

struct Outcome {
    /// Next offset to read per partition once the batch is committed.
    next: BTreeMap<(String, i32), i64>,
    /// Invalid records: position in the batch and reason.
    dead: Vec<(usize, String)>,
    /// Records applied, ignored, duplicate, invalid.
    counts: [u64; 4],
}

/// The outcome of a background transaction.
enum Committed {
    Done {
        seq: i64,
        new_alerts: usize,
        effects: persist::Effects,
        at: Instant,
    },
    /// Another writer committed first: nothing was written.
    Conflict,
}

/// Records that another writer committed to the store since this instance's last transaction
/// (see [`SOLO_AFTER`]); logged when it ends pipelining.
fn saw_other_writer(foreign_at: &mut Option<Instant>) {
    if foreign_at.is_none_or(|t| t.elapsed() >= SOLO_AFTER) {
        tracing::info!(
            solo_after_s = SOLO_AFTER.as_secs(),
            "another writer shares the store: every batch is applied under its lock until none has been seen for a while"
        );
    }
    *foreign_at = Some(Instant::now());
}

/// Waits for the transaction of the batch in flight to end (forever when there is none). The
/// task is polled through a reference: its output is returned here, so the handle must not be
/// awaited again (see [`Processor::finish_joined`]).
async fn join_in_flight(
    inflight: &mut Option<InFlight>,
) -> Result<Result<Committed, PersistError>, tokio::task::JoinError> {
    match inflight {
        Some(f) => (&mut f.task).await,
        None => std::future::pending().await,
    }
}

/// A batch whose store transaction runs on another task while the loop applies the next one.
struct InFlight {
    batch: Batch,
    outcome: Outcome,
    task: tokio::task::JoinHandle<Result<Committed, PersistError>>,
}

struct Processor {
    settings: Settings,
    store: Store,
    engine: Engine,
    seq: i64,
    /// Next offset to process per (topic, partition): applied to the engine, possibly not yet
    /// committed.
    progress: BTreeMap<(String, i32), i64>,
    /// Next offset per (topic, partition) as committed by this instance.
    committed: BTreeMap<(String, i32), i64>,
    /// When another writer's commit was last seen (see [`SOLO_AFTER`]).
    foreign_at: Option<Instant>,
    dlq: Option<(FutureProducer, String)>,
    shared: Arc<Shared>,
}

/// Runs until `shutdown` is cancelled; then finishes the batch in hand, commits and returns.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    health: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<Request>,
) -> Result<(), ServiceError> {
    let store = Store::connect(&settings.store.url).await?;
    health.store_ok.store(true, Ordering::SeqCst);
    let loaded = persist::load(&store, &settings).await?;
    let mut p = Processor {
        settings: settings.clone(),
        store,
        engine: loaded.engine,
        seq: loaded.seq,
        progress: BTreeMap::new(),
        committed: BTreeMap::new(),
        foreign_at: None,
        dlq: None,
        shared: health.clone(),
    };
    p.startup().await?;

    let context = KeywatchContext {
        state: health.consumer.clone(),
    };
    let consumer: StreamConsumer<KeywatchContext> =
        kafka::consumer_config(&settings.kafka).create_with_context(context)?;
    consumer.subscribe(&[settings.kafka.topic.as_str()])?;
    if let Some(topic) = &settings.kafka.dead_letter_topic {
        let producer: FutureProducer = kafka::producer_config(&settings.kafka).create()?;
        p.dlq = Some((producer, topic.clone()));
    }
    tracing::info!(topic = %settings.kafka.topic, group = %settings.kafka.group_id, store = %p.store.url(), "consuming");
    health.consuming.store(true, Ordering::SeqCst);

    // Every batch evaluates deadlines in its own transaction; this timer covers quiet periods.
    // One timer for the whole loop: a `sleep` inside `select!` restarts on every request or
    // record, so a steady trickle of HTTP requests (< 5 s apart) would starve the deadline check.
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + TICK_INTERVAL, TICK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The batch whose store transaction runs on another task while this loop applies the next.
    let mut inflight: Option<InFlight> = None;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(req) = requests.recv() => {
                p.settle(&mut inflight, &consumer, &shutdown).await?;
                p.serve(req, &shutdown).await?;
                continue;
            }
            m = consumer.recv() => m,
            _ = ticker.tick() => {
                p.settle(&mut inflight, &consumer, &shutdown).await?;
                p.tick_with_retry(&shutdown).await?;
                continue;
            }
            // Nothing new arrived, and the batch in flight committed: its offsets and metrics
            // are done now, not when the next record comes.
            joined = join_in_flight(&mut inflight), if inflight.is_some() => {
                let f = inflight.take().expect("a batch in flight");
                if let Err(batch) = p.finish_joined(f.batch, f.outcome, joined, &consumer).await? {
                    p.redo(vec![batch], &consumer, &shutdown).await?;
                }
                continue;
            }
        };
        let received = Instant::now();
        let mut batch = Vec::with_capacity(64);
        match first {
            Ok(m) => batch.push(m.detach()),
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive error");
                continue;
            }
        }
        // Adaptive batching: take what is already fetched, without waiting for more. A quiet
        // topic gets one small batch per record (lowest latency); under load, records pile up
        // while a batch commits, so batches grow by themselves up to MAX_BATCH.
        while batch.len() < MAX_BATCH {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka receive error");
                    break;
                }
                None => break,
            }
        }
        if health.consumer.reassigned.swap(false, Ordering::SeqCst) {
            p.settle(&mut inflight, &consumer, &shutdown).await?;
            p.reload_progress().await?;
        }
        let batch = Batch {
            records: batch,
            received,
        };
        if !p.pipelining() {
            p.settle(&mut inflight, &consumer, &shutdown).await?;
            let applied = p.process_with_retry(&batch.records, &shutdown).await?;
            p.after_commit(&consumer, &batch, applied).await;
            continue;
        }
        // Pipelined: apply this batch now, while the previous one commits on another task.
        let applied = p.apply(&batch.records);
        p.advance(&applied.outcome.next);
        let failed = match inflight.take() {
            Some(previous) => p.finish(previous, &consumer).await?.err(),
            None => None,
        };
        match failed {
            None => inflight = Some(p.commit_in_background(batch, applied)),
            // The previous batch did not commit, and this one was applied on top of it.
            Some(previous) => p.redo(vec![previous, batch], &consumer, &shutdown).await?,
        }
    }
    p.settle(&mut inflight, &consumer, &shutdown).await?;
    tracing::info!("shutting down: evaluating deadlines and committing offsets");
    if let Err(e) = p.tick_with_retry(&shutdown).await {
        tracing::warn!(error = %e, "final deadline check failed");
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::warn!(error = %e, "final offset commit failed; the stored progress still prevents double effects");
    }
    p.store.close().await;
    Ok(())
}

impl Processor {
    /// Serves one request from the HTTP side.
    async fn serve(
        &mut self,
        req: Request,
        shutdown: &CancellationToken,
    ) -> Result<(), ServiceError> {
        match req {
            Request::Query(f) => f(&self.engine),
            Request::Register { spec, reply } => {
                let r = self
                    .mutate(shutdown, |engine| {
                        let origin = format!("PUT /v1/deployments/{}", spec.crn);
                        let valid = crate::engine::validate_deployment(spec, &origin)
                            .map_err(|e: RegistryError| e.to_string())?;
                        let new = engine.deployments().get(&valid.spec.crn).is_none();
                        engine.register(vec![valid]);
                        Ok(new)
                    })
                    .await?;
                let _ = reply.send(r);
            }
            Request::SoftDelete { crn, reply } => {
                let r = self
                    .mutate(shutdown, |engine| {
                        let now = Millis::now();
                        Ok(engine.soft_delete(&crn, now, &format!("api:delete:{crn}:{}", now.0)))
                    })
                    .await?;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    /// Applies a registry change in its own transaction.
    async fn mutate<T>(
        &mut self,
        shutdown: &CancellationToken,
        f: impl FnOnce(&mut Engine) -> Result<T, String>,
    ) -> Result<Result<T, String>, ServiceError> {
        let mut f = Some(f);
        let mut backoff = Duration::from_millis(100);
        loop {
            let r: Result<Result<T, String>, PersistError> = async {
                let mut tx = self.store.begin().await?;
                if persist::sync(&mut tx, &mut self.engine, self.seq).await? {
                    saw_other_writer(&mut self.foreign_at);
                }
                let out = (f.take().expect("applied once"))(&mut self.engine);
                let (_, alerts) = persist::write(&mut tx, &mut self.engine, &[]).await?;
                self.seq = tx.commit().await?;
                self.count_alerts(&alerts);
                Ok(out)
            }
            .await;
            match r {
                Ok(out) => return Ok(out),
                Err(e) if e.is_transient() && !shutdown.is_cancelled() && f.is_some() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    self.reload().await.ok();
                    return Err(e.into());
                }
            }
        }
    }

    fn count_alerts(&self, alerts: &[crate::engine::Alert]) {
        for a in alerts {
            self.shared
                .metrics
                .alerts
                .with_label_values(&[a.kind.as_str(), a.severity.as_str()])
                .inc();
        }
    }

    /// Registers the configured registry and evaluates deadlines once.
    async fn startup(&mut self) -> Result<(), ServiceError> {
        let mut tx = self.store.begin().await?;
        persist::sync(&mut tx, &mut self.engine, self.seq).await?;
        persist::register_configured(&mut self.engine, &self.settings)?;
        self.engine.tick(Millis::now());
        let (_, alerts) = persist::write(&mut tx, &mut self.engine, &[]).await?;
        self.seq = tx.commit().await?;
        self.count_alerts(&alerts);
        self.reload_progress().await?;
        Ok(())
    }

    async fn reload_progress(&mut self) -> Result<(), ServiceError> {
        let k = &self.settings.kafka;
        for o in self.store.offsets(&k.group_id, &k.topic).await? {
            let e = self
                .progress
                .entry((o.topic, o.partition))
                .or_insert(o.next_offset);
            *e = (*e).max(o.next_offset);
        }
        Ok(())
    }

    async fn process_with_retry(
        &mut self,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Result<Applied, ServiceError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.process(batch).await {
                Ok(applied) => return Ok(applied),
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    self.shared.store_ok.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %e, retry_in = ?backoff, "store unavailable; retrying the batch");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    self.reload().await.ok();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The engine's in-memory state may be ahead of the store after a failed transaction.
    async fn reload(&mut self) -> Result<(), PersistError> {
        let loaded = persist::load(&self.store, &self.settings).await?;
        self.engine = loaded.engine;
        self.seq = loaded.seq;
        Ok(())
    }

    /// Whether the next batch may be applied before the previous one committed: only while no
    /// other writer shares the store (see [`SOLO_AFTER`]).
    fn pipelining(&self) -> bool {
        self.foreign_at.is_none_or(|t| t.elapsed() >= SOLO_AFTER)
    }

    /// Applies one batch in one transaction, holding the write lock throughout (after loading
    /// what other writers committed).
    async fn process(&mut self, batch: &[OwnedMessage]) -> Result<Applied, PersistError> {
        let store = self.store.clone(); // the transaction borrows it while `apply` borrows self
        let mut tx = store.begin().await?;
        if persist::sync(&mut tx, &mut self.engine, self.seq).await? {
            saw_other_writer(&mut self.foreign_at);
        }
        let mut applied = self.apply(batch);
        applied.new_alerts =
            persist::write_effects(&mut tx, &applied.effects, &applied.offsets).await?;
        self.seq = tx.commit().await?;
        applied.committed_at = Some(Instant::now());
        Ok(applied)
    }

    /// Applies one batch to the engine (no IO): records below the progress of their partition
    /// are skipped, deadlines are evaluated, and the effects are taken out of the engine.
    fn apply(&mut self, batch: &[OwnedMessage]) -> Applied {
        // Per partition of the batch: (topic, partition) and the next offset to store. A batch
        // holds a handful of partitions, so a short vector beats a map keyed by owned strings.
        let mut parts: Vec<((&str, i32), i64)> = Vec::new();
        let mut dead = Vec::new();
        // [applied, ignored, duplicate, invalid], added to the metrics once the batch committed.
        let mut counts = [0u64; 4];
        for (i, m) in batch.iter().enumerate() {
            let tp = (m.topic(), m.partition());
            let slot = match parts.iter().position(|(p, _)| *p == tp) {
                Some(i) => i,
                None => {
                    let done = self
                        .progress
                        .get(&(tp.0.to_owned(), tp.1))
                        .copied()
                        .unwrap_or(0);
                    parts.push((tp, done));
                    parts.len() - 1
                }
            };
            if m.offset() < parts[slot].1 {
                continue; // already applied (by this instance before a restart, or by another)
            }
            parts[slot].1 = m.offset() + 1;
            let payload = m.payload().unwrap_or_default();
            let disposition = self.engine.ingest(payload);
            let metrics = &self.shared.metrics;
            match &disposition {
                Disposition::Applied => {
                    counts[0] += 1;
                    if let Ok(s) = skim(payload) {
                        if let ActionField::Str(a) = &s.action {
                            if let ActionClass::Key(k) = classify_action(a) {
                                metrics.key_events.with_label_values(&[k.name()]).inc();
                            }
                        }
                        if let Some(t) = s.event_time.as_deref().and_then(Millis::parse) {
                            metrics.event_age.set(t.seconds_until(Millis::now()));
                        }
                    }
                }
                Disposition::Ignored => counts[1] += 1,
                Disposition::Duplicate => counts[2] += 1,
                Disposition::Invalid(reason) => {
                    counts[3] += 1;
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %reason, "invalid record");
                    dead.push((i, reason.to_string()));
                }
            }
        }
        let next: BTreeMap<(String, i32), i64> = parts
            .iter()
            .map(|((topic, partition), o)| (((*topic).to_owned(), *partition), *o))
            .collect();
        let offsets: Vec<PartitionOffset> = next
            .iter()
            .map(|((topic, partition), o)| PartitionOffset {
                group: self.settings.kafka.group_id.clone(),
                topic: topic.clone(),
                partition: *partition,
                next_offset: *o,
            })
            .collect();
        // Deadlines are evaluated with every batch too, so that the persisted state is current
        // whenever a batch commits (the 5 s tick covers quiet periods).
        self.engine.tick(Millis::now());
        Applied {
            effects: persist::take(&mut self.engine),
            offsets,
            new_alerts: 0,
            committed_at: None,
            outcome: Outcome { next, dead, counts },
        }
    }

    /// Records that the records up to `next` are applied to the engine (not yet committed).
    fn advance(&mut self, next: &BTreeMap<(String, i32), i64>) {
        for (tp, o) in next {
            let e = self.progress.entry(tp.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
    }

    /// Starts the store transaction of a batch already applied to the engine. It writes only if
    /// no other writer committed since this instance's last transaction; otherwise it writes
    /// nothing and reports a conflict (the engine applied the batch to an outdated state).
    fn commit_in_background(&self, batch: Batch, applied: Applied) -> InFlight {
        let store = self.store.clone();
        let expected = self.seq;
        let Applied {
            effects,
            offsets,
            outcome,
            ..
        } = applied;
        let task = tokio::spawn(async move {
            let mut tx = store.begin().await?;
            if tx.seq() != expected {
                tx.rollback().await?;
                return Ok(Committed::Conflict);
            }
            let new_alerts = persist::write_effects(&mut tx, &effects, &offsets).await?;
            let seq = tx.commit().await?;
            Ok(Committed::Done {
                seq,
                new_alerts,
                effects,
                at: Instant::now(),
            })
        });
        InFlight {
            batch,
            outcome,
            task,
        }
    }

    /// Waits for a batch's background transaction. Committed: its bookkeeping is done. Not
    /// committed (conflict or store failure): the batch is handed back to be applied again.
    async fn finish(
        &mut self,
        f: InFlight,
        consumer: &StreamConsumer<KeywatchContext>,
    ) -> Result<Result<(), Batch>, ServiceError> {
        let InFlight {
            batch,
            outcome,
            task,
        } = f;
        let joined = task.await;
        self.finish_joined(batch, outcome, joined, consumer).await
    }

    /// [`finish`](Processor::finish) once the transaction's task has ended.
    async fn finish_joined(
        &mut self,
        batch: Batch,
        outcome: Outcome,
        joined: Result<Result<Committed, PersistError>, tokio::task::JoinError>,
        consumer: &StreamConsumer<KeywatchContext>,
    ) -> Result<Result<(), Batch>, ServiceError> {
        let committed = match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Ok(Err(batch)), // cancelled: the runtime is shutting down
        };
        match committed {
            Ok(Committed::Done {
                seq,
                new_alerts,
                effects,
                at,
            }) => {
                self.seq = seq;
                let applied = Applied {
                    effects,
                    offsets: Vec::new(),
                    new_alerts,
                    committed_at: Some(at),
                    outcome,
                };
                self.after_commit(consumer, &batch, applied).await;
                Ok(Ok(()))
            }
            Ok(Committed::Conflict) => {
                tracing::info!("a batch applied while another writer committed is applied again");
                saw_other_writer(&mut self.foreign_at);
                Ok(Err(batch))
            }
            Err(e) if e.is_transient() => {
                self.shared.store_ok.store(false, Ordering::SeqCst);
                tracing::warn!(error = %e, "store unavailable; retrying the batch");
                Ok(Err(batch))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for the batch in flight, if any, and applies it again if it did not commit.
    async fn settle(
        &mut self,
        inflight: &mut Option<InFlight>,
        consumer: &StreamConsumer<KeywatchContext>,
        shutdown: &CancellationToken,
    ) -> Result<(), ServiceError> {
        if let Some(f) = inflight.take() {
            if let Err(batch) = self.finish(f, consumer).await? {
                self.redo(vec![batch], consumer, shutdown).await?;
            }
        }
        Ok(())
    }

    /// After a batch that did not commit: reloads the engine and the progress from the store
    /// (dropping every uncommitted effect) and applies `batches` again, in order, under the lock.
    async fn redo(
        &mut self,
        batches: Vec<Batch>,
        consumer: &StreamConsumer<KeywatchContext>,
        shutdown: &CancellationToken,
    ) -> Result<(), ServiceError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.reload().await {
                Ok(()) => break,
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.progress = self.committed.clone();
        self.reload_progress().await?;
        for batch in batches {
            let applied = self.process_with_retry(&batch.records, shutdown).await?;
            self.after_commit(consumer, &batch, applied).await;
        }
        Ok(())
    }

    /// Everything that follows a batch's commit: metrics, progress, dead letters, and the
    /// Kafka offsets (stored only now that the batch is durable).
    async fn after_commit(
        &mut self,
        consumer: &StreamConsumer<KeywatchContext>,
        batch: &Batch,
        applied: Applied,
    ) {
        let shared = self.shared.clone();
        shared.store_ok.store(true, Ordering::SeqCst);
        for (n, result) in
            applied
                .outcome
                .counts
                .iter()
                .zip(["applied", "ignored", "duplicate", "invalid"])
        {
            if *n > 0 {
                shared
                    .metrics
                    .events
                    .with_label_values(&[result])
                    .inc_by(*n);
            }
        }
        self.count_alerts(&applied.effects.alerts);
        if applied.new_alerts > 0 {
            tracing::info!(alerts = applied.new_alerts, "alerts stored");
        }
        self.advance(&applied.outcome.next);
        for (tp, o) in &applied.outcome.next {
            self.committed.insert(tp.clone(), *o);
        }
        self.dead_letter(&batch.records, &applied.outcome.dead)
            .await;
        shared.batches.fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .batch_records
            .observe(batch.records.len() as f64);
        // Measured to the commit, not to now: a pipelined batch's bookkeeping waits for the
        // next batch, while its state was committed (and visible) already.
        let at = applied.committed_at.unwrap_or_else(Instant::now);
        let took = at.saturating_duration_since(batch.received).as_secs_f64();
        let committed_at = Millis(Millis::now().0 - at.elapsed().as_millis() as i64);
        for m in &batch.records {
            shared.metrics.processing.observe(took);
            if let Some(ms) = m.timestamp().to_millis() {
                shared
                    .metrics
                    .produce_to_commit
                    .observe(((committed_at.0 - ms) as f64 / 1000.0).max(0.0));
            }
        }
        // `next` holds the next offset to read. `store_offset` would store offset + 1 (librdkafka's
        // rd_kafka_offset_store semantics); a partition list is stored exactly as given.
        for ((topic, partition), offset) in &applied.outcome.next {
            let mut tpl = rdkafka::TopicPartitionList::new();
            let stored = tpl
                .add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))
                .and_then(|_| consumer.store_offsets(&tpl));
            if let Err(e) = stored {
                tracing::debug!(error = %e, topic, partition, "offset not stored (partition revoked?)");
            }
        }
    }

    /// Sends invalid records to the dead-letter topic, with the reason and origin as headers.
    /// Best effort after the batch is durable: a failure is logged (the record is counted invalid
    /// and logged with its position either way).
    async fn dead_letter(&self, batch: &[OwnedMessage], dead: &[(usize, String)]) {
        let Some((producer, topic)) = &self.dlq else {
            return;
        };
        for (i, reason) in dead {
            let m = &batch[*i];
            let partition = m.partition().to_string();
            let offset = m.offset().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "keywatch-reason",
                    value: Some(reason.as_bytes()),
                })
                .insert(Header {
                    key: "keywatch-source-topic",
                    value: Some(m.topic().as_bytes()),
                })
                .insert(Header {
                    key: "keywatch-source-partition",
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: "keywatch-source-offset",
                    value: Some(offset.as_bytes()),
                });
            let payload = m.payload().unwrap_or_default();
            let record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).payload(payload).headers(headers);
            if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
                tracing::error!(error = %e, partition = m.partition(), offset = m.offset(), "dead-letter produce failed");
            }
        }
    }

    async fn tick_with_retry(&mut self, shutdown: &CancellationToken) -> Result<(), ServiceError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let r: Result<(), PersistError> = async {
                let mut tx = self.store.begin().await?;
                if persist::sync(&mut tx, &mut self.engine, self.seq).await? {
                    saw_other_writer(&mut self.foreign_at);
                }
                self.engine.tick(Millis::now());
                let (_, alerts) = persist::write(&mut tx, &mut self.engine, &[]).await?;
                self.seq = tx.commit().await?;
                self.count_alerts(&alerts);
                Ok(())
            }
            .await;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "store unavailable during the deadline check; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    self.reload().await.ok();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Waits for SIGINT or SIGTERM and cancels `token`.
pub async fn cancel_on_signals(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received: stopping");
    token.cancel();
}
