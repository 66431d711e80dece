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
use crate::wait::or_never;
use futures::{FutureExt as _, StreamExt as _};
use kafka::{ConsumerState, KeywatchContext};
use persist::PersistError;
use rdkafka::consumer::stream_consumer::MessageStream;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// At most this many records are taken from the consumer and applied in one go.
pub const MAX_BATCH: usize = 5000;
/// Bounded in-flight work: at most this many records are applied but not yet in a store
/// transaction (besides the one transaction in flight). Past it the loop stops consuming until
/// the transaction in flight committed, so a slow store pauses consumption.
pub const MAX_PENDING: usize = 2 * MAX_BATCH;
/// Group commit under a backlog: after a batch of at least [`BACKLOG_BATCH`] records (taken
/// without waiting, so the consumer is behind), the next transaction is not started until
/// [`MAX_PENDING`] records are pending or the oldest of them was received [`GATHER_WAIT`] ago.
/// Fewer, larger transactions write each changed entity (and each B-tree page) once for more
/// records: a third less store CPU on the benchmark mix. A smaller batch means the consumer
/// caught up, and what is pending is committed at once (latency at a steady rate is unchanged).
pub const BACKLOG_BATCH: usize = 256;
/// The longest a record waits for others to share its transaction (see [`BACKLOG_BATCH`]).
pub const GATHER_WAIT: Duration = Duration::from_millis(50);
/// How often deadlines are evaluated on the wall clock.
pub const TICK_INTERVAL: Duration = Duration::from_secs(5);
/// Batches are pipelined (the next one is applied while the previous one commits) once no other
/// writer has been seen in the store for this long; until then every batch holds the write lock
/// from loading what the others wrote to its commit.
pub const SOLO_AFTER: Duration = Duration::from_secs(30);
/// The first wait after a store failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

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
    /// Signalled after every commit that wrote alerts: wakes the delivery worker, which otherwise
    /// only looks at the store now and then (see `Worker::with_wakeup`).
    pub alerts_written: Arc<tokio::sync::Notify>,
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

/// A batch: records taken from the consumer in one go and applied to the engine as they were
/// taken. The records themselves are not kept (a transaction that does not commit rewinds the
/// consumer instead, see [`Processor::rewind`]); this is what the bookkeeping after the commit
/// needs.
struct Part {
    received: Instant,
    /// Records taken (applied, skipped as already applied, or invalid).
    len: usize,
    /// Producer timestamps (ms) of the records, for the latency metric.
    timestamps: Vec<i64>,
    /// Next offset to read per partition once the batch is committed. A batch holds a handful
    /// of partitions, so a short vector beats a map.
    next: Vec<((String, i32), i64)>,
    /// Invalid records, for the dead-letter topic.
    dead: Vec<DeadRecord>,
    /// Records applied, ignored, duplicate, invalid.
    counts: [u64; 4],
}

impl Part {
    fn new(received: Instant) -> Part {
        Part {
            received,
            len: 0,
            timestamps: Vec::new(),
            next: Vec::new(),
            dead: Vec::new(),
            counts: [0; 4],
        }
    }
}

/// An invalid record, kept (copied) until its batch committed, then dead-lettered.
struct DeadRecord {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
    reason: String,
}

/// What a committed transaction reports for the bookkeeping of its batches.
struct Commit {
    /// The alerts written (some may have been stored already, by another writer).
    alerts: Vec<crate::engine::Alert>,
    /// Alerts the store did not hold yet.
    new_alerts: usize,
    /// When the transaction committed.
    at: Instant,
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

/// Whether [`Processor::next_commit`] may leave the pending batches gathering.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    WhileGathering,
    No,
}

/// Batches whose store transaction runs on another task while the loop applies the next ones.
struct InFlight {
    parts: Vec<Part>,
    task: tokio::task::JoinHandle<Result<Committed, PersistError>>,
}

/// Group commit: while one transaction is in flight, the batches applied meanwhile wait in
/// `pending` (their changes stay in the engine's dirty set), and the next transaction writes
/// them all at once, each changed entity once.
#[derive(Default)]
struct Pipeline {
    inflight: Option<InFlight>,
    pending: Vec<Part>,
    pending_records: usize,
    /// The last batch showed a backlog (see [`BACKLOG_BATCH`]).
    backlog: bool,
}

impl Pipeline {
    fn take_pending(&mut self) -> Vec<Part> {
        self.pending_records = 0;
        std::mem::take(&mut self.pending)
    }

    /// When the pending batches' transaction is due at the latest: [`GATHER_WAIT`] after the
    /// oldest was received. `None` when nothing is pending.
    fn gather_deadline(&self) -> Option<Instant> {
        self.pending.first().map(|p| p.received + GATHER_WAIT)
    }

    /// Whether the pending batches wait for more records before their transaction starts (see
    /// [`BACKLOG_BATCH`]).
    fn gathering(&self, now: Instant) -> bool {
        self.backlog
            && self.pending_records < MAX_PENDING
            && self.gather_deadline().is_some_and(|d| now < d)
    }
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
    /// The wait before the next attempt after a transaction that failed (reset by a commit).
    backoff: Duration,
    /// The partition and offset of the record in hand (of the one subscribed topic), taken from
    /// the consumer but not applied yet: a rewind in the meantime must read it again too (see
    /// [`Processor::rewind`]).
    unapplied: Option<(i32, i64)>,
    dlq: Option<(FutureProducer, String)>,
    shared: Arc<Shared>,
}

/// Runs until `shutdown` is cancelled; then finishes the batch in hand, commits and returns.
///
/// `store` is the process's one [`Store`] (shared with the HTTP side and the delivery worker, so
/// that on SQLite their writes take turns in `Store::write_turn` with the loop's); the caller
/// closes it once they have all stopped.
pub async fn run(
    settings: Settings,
    store: Store,
    shutdown: CancellationToken,
    health: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<Request>,
) -> Result<(), ServiceError> {
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
        backoff: FIRST_BACKOFF,
        unapplied: None,
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
    // One stream for the whole run: `recv()` makes a stream per record, which registers and
    // unregisters a waker slot under a mutex each time.
    let mut records = consumer.stream();
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
    // The transaction in flight on another task, and the batches applied since it started.
    let mut pipe = Pipeline::default();
    loop {
        let gather_deadline = pipe.gather_deadline();
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(req) = requests.recv() => {
                p.settle(&mut pipe, &consumer, &shutdown).await?;
                p.serve(req, &shutdown).await?;
                continue;
            }
            Some(m) = records.next() => m,
            _ = ticker.tick() => {
                p.settle(&mut pipe, &consumer, &shutdown).await?;
                p.tick_with_retry(&shutdown).await?;
                continue;
            }
            // The transaction in flight ended: its batches' offsets and metrics are done now,
            // not when the next record comes, and what was applied meanwhile is written next.
            // The task is polled through a reference: its output is returned here, so the
            // handle must not be awaited again (see `Processor::finish_joined`).
            joined = or_never(pipe.inflight.as_mut().map(|f| &mut f.task)), if pipe.inflight.is_some() => {
                let f = pipe.inflight.take().expect("a transaction in flight");
                let committed = p.finish_joined(f.parts, joined, &consumer).await?;
                p.next_commit(&mut pipe, committed, Hold::WhileGathering, &consumer, &shutdown).await?;
                continue;
            }
            // Batches gathered for a transaction (see BACKLOG_BATCH): no more records came in time.
            _ = or_never(gather_deadline.map(|d| tokio::time::sleep_until(d.into()))), if pipe.inflight.is_none() => {
                p.next_commit(&mut pipe, true, Hold::No, &consumer, &shutdown).await?;
                continue;
            }
        };
        let received = Instant::now();
        let first = match first {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive error");
                continue;
            }
        };
        p.hold(&first);
        if !p.pipelining() {
            if !p.settle(&mut pipe, &consumer, &shutdown).await? {
                p.process_locked(first, received, &consumer, &mut records, &shutdown)
                    .await?;
            }
            continue;
        }
        // Pipelined: apply the records as they are taken, while the transaction in flight (if
        // any) commits on another task. Adaptive batching: take what is already fetched, without
        // waiting for more. A quiet topic gets one small batch per record (lowest latency); under
        // load, records pile up while a transaction commits, so batches grow by themselves.
        let mut part = Part::new(received);
        let mut next = Some(first);
        while let Some(m) = next.take() {
            if health.consumer.reassigned.swap(false, Ordering::SeqCst) {
                // Partitions moved: commit what was applied, then take the stored progress of
                // the partitions this instance may have been given.
                if part.len > 0 {
                    p.end_batch(&mut pipe, std::mem::replace(&mut part, Part::new(received)));
                }
                if p.settle(&mut pipe, &consumer, &shutdown).await? {
                    break; // rewound: `m` is read again
                }
                if let Err(e) = p.reload_progress().await {
                    p.failed_transaction(&e.into()).await;
                    p.rewind(&consumer, &shutdown).await?;
                    break; // `m` is read again
                }
            }
            p.apply_record(&mut part, &m);
            drop(m);
            if part.len >= MAX_BATCH {
                break;
            }
            next = match records.next().now_or_never().flatten() {
                Some(Ok(m)) => {
                    p.hold(&m);
                    Some(m)
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka receive error");
                    None
                }
                None => None,
            };
        }
        if part.len > 0 {
            pipe.backlog = part.len >= BACKLOG_BATCH;
            p.end_batch(&mut pipe, part);
        }
        let busy = pipe
            .inflight
            .as_ref()
            .is_some_and(|f| !f.task.is_finished());
        if pipe.pending.is_empty() || (busy && pipe.pending_records < MAX_PENDING) {
            continue; // written by the next transaction, together with what comes meanwhile
        }
        let committed = match pipe.inflight.take() {
            Some(f) => p.finish(f, &consumer).await?,
            None => true,
        };
        // Behind a backlog the pending batches may go on gathering (see BACKLOG_BATCH).
        p.next_commit(
            &mut pipe,
            committed,
            Hold::WhileGathering,
            &consumer,
            &shutdown,
        )
        .await?;
    }
    if p.settle(&mut pipe, &consumer, &shutdown).await? {
        tracing::info!("a transaction did not commit at shutdown: its records are read again at the next start");
    }
    tracing::info!("shutting down: evaluating deadlines and committing offsets");
    if let Err(e) = p.tick_with_retry(&shutdown).await {
        tracing::warn!(error = %e, "final deadline check failed");
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing stored since the last commit (the automatic one took everything): not a failure.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
            tracing::debug!("final offset commit: nothing new to commit");
        }
        Err(e) => {
            tracing::warn!(error = %e, "final offset commit failed; the stored progress still prevents double effects");
        }
    }
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
        let mut backoff = FIRST_BACKOFF;
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
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    self.reload().await.ok();
                    return Err(e.into());
                }
            }
        }
    }

    /// Counts the alerts a commit wrote, and wakes the delivery worker for them.
    fn count_alerts(&self, alerts: &[crate::engine::Alert]) {
        if !alerts.is_empty() {
            self.shared.alerts_written.notify_one();
        }
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

    async fn reload_progress(&mut self) -> Result<(), crate::store::StoreError> {
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
    /// what other writers committed): `first` and the records already fetched. A transaction that
    /// fails for a transient reason is retried after a pause, by reading its records again.
    async fn process_locked(
        &mut self,
        first: BorrowedMessage<'_>,
        received: Instant,
        consumer: &StreamConsumer<KeywatchContext>,
        records: &mut MessageStream<'_, KeywatchContext>,
        shutdown: &CancellationToken,
    ) -> Result<(), ServiceError> {
        let store = self.store.clone(); // the transaction borrows it while `apply` borrows self
        let result: Result<(Part, Commit), PersistError> = async {
            self.progress_after_rebalance().await?;
            let mut tx = store.begin().await?;
            if persist::sync(&mut tx, &mut self.engine, self.seq).await? {
                saw_other_writer(&mut self.foreign_at);
            }
            let mut part = Part::new(received);
            self.apply_record(&mut part, &first);
            drop(first);
            while part.len < MAX_BATCH {
                match records.next().now_or_never().flatten() {
                    Some(Ok(m)) => {
                        self.hold(&m);
                        self.progress_after_rebalance().await?;
                        self.apply_record(&mut part, &m);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "kafka receive error");
                        break;
                    }
                    None => break,
                }
            }
            self.engine.tick(Millis::now());
            self.advance(&part.next);
            let (effects, offsets) = self.take_effects([&part]);
            let new_alerts = persist::write_effects(&mut tx, &effects, &offsets).await?;
            self.seq = tx.commit().await?;
            let commit = Commit {
                alerts: effects.alerts,
                new_alerts,
                at: Instant::now(),
            };
            Ok((part, commit))
        }
        .await;
        match result {
            Ok((part, commit)) => {
                self.after_commit(consumer, &[part], commit).await;
                Ok(())
            }
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                self.failed_transaction(&e).await;
                self.rewind(consumer, shutdown).await
            }
            Err(e) => {
                self.rewind(consumer, shutdown).await.ok();
                Err(e.into())
            }
        }
    }

    /// After a rebalance (noted by the consumer context): takes the stored progress of the
    /// partitions this instance may have been given, before a record of theirs is applied.
    async fn progress_after_rebalance(&mut self) -> Result<(), crate::store::StoreError> {
        if self
            .shared
            .consumer
            .reassigned
            .swap(false, Ordering::SeqCst)
        {
            self.reload_progress().await?;
        }
        Ok(())
    }

    /// After a transaction that failed for a transient reason: reports it and pauses (the pause
    /// doubles with every failure in a row, up to [`MAX_BACKOFF`]).
    async fn failed_transaction(&mut self, e: &PersistError) {
        self.shared.store_ok.store(false, Ordering::SeqCst);
        tracing::warn!(error = %e, retry_in = ?self.backoff, "store unavailable; the records are read and applied again");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Applies one record to the engine (no IO) as part of `part`. A record below the progress
    /// of its partition was applied already (by this instance before a restart or a rewind, or
    /// by another) and is skipped.
    fn apply_record(&mut self, part: &mut Part, m: &impl Message) {
        self.unapplied = None;
        part.len += 1;
        if let Some(ms) = m.timestamp().to_millis() {
            part.timestamps.push(ms);
        }
        let (topic, partition) = (m.topic(), m.partition());
        let slot = match part
            .next
            .iter()
            .position(|((t, p), _)| *p == partition && t == topic)
        {
            Some(i) => i,
            None => {
                let tp = (topic.to_owned(), partition);
                let done = match self.progress.get(&tp) {
                    Some(o) => *o,
                    None => {
                        // The first record of this partition since the start: where a rewind
                        // goes back to while nothing of it is committed.
                        self.committed.entry(tp.clone()).or_insert(m.offset());
                        0
                    }
                };
                part.next.push((tp, done));
                part.next.len() - 1
            }
        };
        if m.offset() < part.next[slot].1 {
            return;
        }
        part.next[slot].1 = m.offset() + 1;
        let payload = m.payload().unwrap_or_default();
        let disposition = self.engine.ingest(payload);
        let metrics = &self.shared.metrics;
        match &disposition {
            Disposition::Applied => {
                part.counts[0] += 1;
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
            Disposition::Ignored => part.counts[1] += 1,
            Disposition::Duplicate => part.counts[2] += 1,
            Disposition::Invalid(reason) => {
                part.counts[3] += 1;
                tracing::warn!(topic, partition, offset = m.offset(), %reason, "invalid record");
                part.dead.push(DeadRecord {
                    topic: topic.to_owned(),
                    partition,
                    offset: m.offset(),
                    payload: payload.to_vec(),
                    reason: reason.to_string(),
                });
            }
        }
    }

    /// Notes the record in hand as taken but not applied (until [`apply_record`]).
    ///
    /// [`apply_record`]: Processor::apply_record
    fn hold(&mut self, m: &impl Message) {
        self.unapplied = Some((m.partition(), m.offset()));
    }

    /// Ends a batch applied in pipelined mode: deadlines are evaluated with every batch too (so
    /// that the persisted state is current whenever a transaction commits; the 5 s tick covers
    /// quiet periods), and the batch waits for the next transaction.
    fn end_batch(&mut self, pipe: &mut Pipeline, part: Part) {
        self.engine.tick(Millis::now());
        self.advance(&part.next);
        pipe.pending_records += part.len;
        pipe.pending.push(part);
    }

    /// Takes the engine's changes and alerts since the last call, and the Kafka progress of the
    /// batches they come from (`parts`: exactly the batches applied since the last call).
    fn take_effects<'a>(
        &mut self,
        parts: impl IntoIterator<Item = &'a Part>,
    ) -> (persist::Effects, Vec<PartitionOffset>) {
        let mut next: BTreeMap<&(String, i32), i64> = BTreeMap::new();
        for part in parts {
            for (tp, o) in &part.next {
                let e = next.entry(tp).or_insert(*o);
                *e = (*e).max(*o);
            }
        }
        let offsets = next
            .into_iter()
            .map(|((topic, partition), o)| PartitionOffset {
                group: self.settings.kafka.group_id.clone(),
                topic: topic.clone(),
                partition: *partition,
                next_offset: o,
            })
            .collect();
        (persist::take(&mut self.engine), offsets)
    }

    /// Records that the records up to `next` are applied to the engine (not yet committed).
    fn advance(&mut self, next: &[((String, i32), i64)]) {
        for (tp, o) in next {
            let e = self.progress.entry(tp.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
    }

    /// Starts the store transaction of batches already applied to the engine (all those applied
    /// since the last transaction). It writes only if no other writer committed since this
    /// instance's last transaction; otherwise it writes nothing and reports a conflict (the
    /// engine applied the batches to an outdated state).
    fn commit_in_background(&mut self, parts: Vec<Part>) -> InFlight {
        let store = self.store.clone();
        let expected = self.seq;
        let (effects, offsets) = self.take_effects(&parts);
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
        InFlight { parts, task }
    }

    /// Waits for a background transaction and returns whether it committed. Committed: its
    /// batches' bookkeeping is done. Not committed (conflict or store failure): nothing of them is
    /// in the store, and the caller rewinds.
    async fn finish(
        &mut self,
        f: InFlight,
        consumer: &StreamConsumer<KeywatchContext>,
    ) -> Result<bool, ServiceError> {
        let joined = f.task.await;
        self.finish_joined(f.parts, joined, consumer).await
    }

    /// [`finish`](Processor::finish) once the transaction's task has ended.
    async fn finish_joined(
        &mut self,
        parts: Vec<Part>,
        joined: Result<Result<Committed, PersistError>, tokio::task::JoinError>,
        consumer: &StreamConsumer<KeywatchContext>,
    ) -> Result<bool, ServiceError> {
        let committed = match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Ok(false), // cancelled: the runtime is shutting down
        };
        match committed {
            Ok(Committed::Done {
                seq,
                new_alerts,
                effects,
                at,
            }) => {
                self.seq = seq;
                let commit = Commit {
                    alerts: effects.alerts,
                    new_alerts,
                    at,
                };
                self.after_commit(consumer, &parts, commit).await;
                Ok(true)
            }
            Ok(Committed::Conflict) => {
                tracing::info!(
                    batches = parts.len(),
                    "batches applied while another writer committed are applied again"
                );
                saw_other_writer(&mut self.foreign_at);
                Ok(false)
            }
            Err(e) if e.is_transient() => {
                self.failed_transaction(&e).await;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After the transaction in flight ended (`committed` or not): starts the next one with the
    /// pending batches (unless `hold` lets them gather more, see [`BACKLOG_BATCH`]); or, when it
    /// did not commit, rewinds (the pending batches were applied on top of it). Returns whether
    /// it rewound.
    async fn next_commit(
        &mut self,
        pipe: &mut Pipeline,
        committed: bool,
        hold: Hold,
        consumer: &StreamConsumer<KeywatchContext>,
        shutdown: &CancellationToken,
    ) -> Result<bool, ServiceError> {
        if !committed {
            pipe.take_pending();
            self.rewind(consumer, shutdown).await?;
            return Ok(true);
        }
        if hold == Hold::WhileGathering && pipe.gathering(Instant::now()) {
            return Ok(false);
        }
        if !pipe.pending.is_empty() {
            let parts = pipe.take_pending();
            pipe.inflight = Some(self.commit_in_background(parts));
        }
        Ok(false)
    }

    /// Commits everything applied: waits for the transaction in flight, then writes the pending
    /// batches. Returns whether a transaction did not commit and the consumer was rewound (so
    /// that a record in hand must not be applied: it is read again).
    async fn settle(
        &mut self,
        pipe: &mut Pipeline,
        consumer: &StreamConsumer<KeywatchContext>,
        shutdown: &CancellationToken,
    ) -> Result<bool, ServiceError> {
        let mut rewound = false;
        loop {
            let committed = match pipe.inflight.take() {
                Some(f) => self.finish(f, consumer).await?,
                None => true,
            };
            rewound |= self
                .next_commit(pipe, committed, Hold::No, consumer, shutdown)
                .await?;
            if pipe.inflight.is_none() && pipe.pending.is_empty() {
                return Ok(rewound);
            }
        }
    }

    /// After a transaction that did not commit (another writer committed first, or the store
    /// failed): drops every uncommitted effect by reloading the engine from the store, and moves
    /// the consumer back to the committed progress, so that the records from there are read and
    /// applied again (under the write lock while another writer is around).
    async fn rewind(
        &mut self,
        consumer: &StreamConsumer<KeywatchContext>,
        shutdown: &CancellationToken,
    ) -> Result<(), ServiceError> {
        // The record in hand, if any, must be read again as well.
        if let Some((partition, offset)) = self.unapplied.take() {
            let tp = (self.settings.kafka.topic.clone(), partition);
            self.committed.entry(tp.clone()).or_insert(offset);
            let e = self.progress.entry(tp).or_insert(offset + 1);
            *e = (*e).max(offset + 1);
        }
        let applied = std::mem::replace(&mut self.progress, self.committed.clone());
        let mut backoff = FIRST_BACKOFF;
        loop {
            let reloaded = match self.reload().await {
                Ok(()) => self.reload_progress().await.map_err(PersistError::from),
                Err(e) => Err(e),
            };
            match reloaded {
                Ok(()) => break,
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e.into()),
            }
        }
        for ((topic, partition), ahead) in applied {
            let Some(&back) = self.progress.get(&(topic.clone(), partition)) else {
                continue;
            };
            if back >= ahead {
                continue;
            }
            // With a timeout, librdkafka drops what it fetched from the old position before
            // the call returns: no record past `back` is handed out before the ones from `back`.
            match consumer.seek(
                &topic,
                partition,
                rdkafka::Offset::Offset(back),
                Duration::from_secs(10),
            ) {
                Ok(()) => {
                    tracing::info!(
                        topic,
                        partition,
                        from = ahead,
                        to = back,
                        "records not committed are read again"
                    );
                }
                // A partition no longer assigned is read by its new owner from the stored
                // progress.
                Err(e) if !self.shared.consumer.is_assigned(&topic, partition) => {
                    tracing::debug!(error = %e, topic, partition, "not rewound: partition revoked");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Everything that follows a batch's commit: metrics, progress, dead letters, and the
    /// Kafka offsets (stored only now that the batch is durable).
    async fn after_commit(
        &mut self,
        consumer: &StreamConsumer<KeywatchContext>,
        parts: &[Part],
        commit: Commit,
    ) {
        let shared = self.shared.clone();
        shared.store_ok.store(true, Ordering::SeqCst);
        self.backoff = FIRST_BACKOFF;
        self.count_alerts(&commit.alerts);
        if commit.new_alerts > 0 {
            tracing::info!(alerts = commit.new_alerts, "alerts stored");
        }
        shared.batches.fetch_add(1, Ordering::Relaxed);
        let records: usize = parts.iter().map(|p| p.len).sum();
        shared.metrics.batch_records.observe(records as f64);
        // Measured to the commit, not to now: the bookkeeping of a pipelined transaction may
        // wait for the loop, while its state was committed (and visible) already.
        let committed_at = Millis(Millis::now().0 - commit.at.elapsed().as_millis() as i64);
        // Observed per record into local copies, added to the shared histograms once (when they
        // are dropped): an observation of a shared histogram is three atomic updates, ~3% of the
        // loop's time at two observations per record.
        let processing = shared.metrics.processing.local();
        let produce_to_commit = shared.metrics.produce_to_commit.local();
        for part in parts {
            for (n, result) in
                part.counts
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
            // `progress` was advanced when the batch was applied.
            for (tp, o) in &part.next {
                self.committed.insert(tp.clone(), *o);
            }
            self.dead_letter(&part.dead).await;
            let took = commit
                .at
                .saturating_duration_since(part.received)
                .as_secs_f64();
            for _ in 0..part.len {
                processing.observe(took);
            }
            for ms in &part.timestamps {
                produce_to_commit.observe(((committed_at.0 - ms) as f64 / 1000.0).max(0.0));
            }
        }
        // `next` holds the next offset to read. `store_offset` would store offset + 1 (librdkafka's
        // rd_kafka_offset_store semantics); a partition list is stored exactly as given.
        let touched: std::collections::BTreeSet<&(String, i32)> = parts
            .iter()
            .flat_map(|p| p.next.iter().map(|(tp, _)| tp))
            .collect();
        for tp @ (topic, partition) in touched {
            let Some(offset) = self.committed.get(tp) else {
                continue;
            };
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
    async fn dead_letter(&self, dead: &[DeadRecord]) {
        let Some((producer, topic)) = &self.dlq else {
            return;
        };
        for d in dead {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "keywatch-reason",
                    value: Some(d.reason.as_bytes()),
                })
                .insert(Header {
                    key: "keywatch-source-topic",
                    value: Some(d.topic.as_bytes()),
                })
                .insert(Header {
                    key: "keywatch-source-partition",
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: "keywatch-source-offset",
                    value: Some(offset.as_bytes()),
                });
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .payload(d.payload.as_slice())
                .headers(headers);
            if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
                tracing::error!(error = %e, partition = d.partition, offset = d.offset, "dead-letter produce failed");
            }
        }
    }

    async fn tick_with_retry(&mut self, shutdown: &CancellationToken) -> Result<(), ServiceError> {
        let mut backoff = FIRST_BACKOFF;
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
                    backoff = (backoff * 2).min(MAX_BACKOFF);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(batches: &[(usize, Duration)], backlog: bool, now: Instant) -> Pipeline {
        let mut pipe = Pipeline {
            backlog,
            ..Pipeline::default()
        };
        for &(len, age) in batches {
            let mut part = Part::new(now - age);
            part.len = len;
            pipe.pending_records += len;
            pipe.pending.push(part);
        }
        pipe
    }

    #[test]
    fn batches_gather_only_behind_a_backlog_and_not_for_long() {
        let now = Instant::now();
        let young = Duration::from_millis(1);
        // Behind a backlog: young batches wait for more records.
        let behind = pipeline(&[(BACKLOG_BATCH, young)], true, now);
        assert!(behind.gathering(now));
        assert_eq!(behind.gather_deadline(), Some(now - young + GATHER_WAIT));
        // Caught up (the last batch was small): committed at once, however young.
        assert!(!pipeline(&[(BACKLOG_BATCH, young), (3, young)], false, now).gathering(now));
        // The oldest pending record waited GATHER_WAIT: its transaction starts.
        let old = pipeline(&[(BACKLOG_BATCH, GATHER_WAIT), (300, young)], true, now);
        assert!(!old.gathering(now));
        // Enough records for one transaction: it starts.
        let full = pipeline(
            &[(MAX_BATCH, young), (MAX_PENDING - MAX_BATCH, young)],
            true,
            now,
        );
        assert!(!full.gathering(now));
        assert!(pipeline(&[(MAX_BATCH, young), (MAX_BATCH - 1, young)], true, now).gathering(now));
        // Nothing pending: nothing to wait for.
        let empty = pipeline(&[], true, now);
        assert!(!empty.gathering(now));
        assert_eq!(empty.gather_deadline(), None);
    }
}
