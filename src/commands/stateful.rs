//! The commands that use the durable store: `run`, `status` and `replay --store`.

use super::load_settings;
use crate::cli::Failure;
use crate::commands::replay::{open_input, write_report};
use crate::engine::view::{AlertView, StateReport};
use crate::engine::{Alert, Disposition};
use crate::service::{self, persist, EngineHandle, Shared};
use crate::settings::Settings;
use crate::setup;
use crate::store::Store;
use crate::timefmt::Millis;
use std::io::{BufRead, Cursor, Write};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))
}

async fn connect(settings: &Settings) -> Result<Store, Failure> {
    Store::connect(&settings.store.url)
        .await
        .map_err(store_failure)
}

/// A store error as the command's one line, with its causes (the reason a connection failed);
/// a cause whose text its error already ends with is not repeated (sqlx's errors show their own).
fn store_failure(e: impl std::error::Error) -> Failure {
    Failure::runtime(format!("store: {}", crate::errors::causes(&e).join(": ")))
}

pub fn run(config: Option<&Path>) -> Result<(), Failure> {
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "info");
    setup::registry(&settings).map_err(|e| Failure::invalid(format!("registry error: {e}")))?;
    let rt = runtime()?;
    rt.block_on(async move {
        let token = CancellationToken::new();
        tokio::spawn(service::cancel_on_signals(token.clone()));
        let shared = Arc::new(Shared::default());
        let (handle, requests) = EngineHandle::new(64);
        let listener = tokio::net::TcpListener::bind(settings.http.listen)
            .await
            .map_err(|e| Failure::runtime(format!("run: http.listen {}: {e}", settings.http.listen)))?;
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "http");
        // One store for the process: the loop, the HTTP side and the delivery worker share its
        // pools, and on SQLite its writer connection and the turns writers take on it (two
        // stores would be two writers waiting for each other in SQLite's busy handler, each
        // dropping the other's page cache).
        let store = connect(&settings).await?;
        let state = crate::http::AppState::new(&settings, shared.clone(), handle, Some(store.clone()));
        let http = tokio::spawn(crate::http::serve(listener, state, token.clone()));
        // Delivery: the worker drains the outbox beside the processing loop. It stops after the
        // loop's last commit (its own token, cancelled below), so that commit is planned and
        // what is due is flushed before the process exits.
        let worker = crate::delivery::Worker::new(
            &settings,
            store.clone(),
            crate::delivery::DeliveryMetrics::new(&shared.metrics),
        )
        .map_err(|e| Failure::invalid(format!("run: delivery: {e}")))?
        // Woken by the processing loop's commits that write alerts; the store is looked at once
        // a second besides (what other instances left), instead of every 25 ms.
        .with_wakeup(shared.alerts_written.clone())
        .with_options(crate::delivery::WorkerOptions {
            poll_interval: crate::delivery::WOKEN_POLL_INTERVAL,
            ..Default::default()
        });
        let delivery_token = CancellationToken::new();
        let delivery = tokio::spawn(worker.run(delivery_token.clone()));
        let result = service::run(settings, store.clone(), token.clone(), shared, requests).await;
        token.cancel();
        delivery_token.cancel();
        let _ = delivery.await;
        let _ = http.await;
        store.close().await;
        result.map_err(|e| Failure::runtime(format!("run: {e:#}")))
    })
}

pub fn status(config: Option<&Path>, now: Option<&str>) -> Result<(), Failure> {
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "warn");
    let now = parse_now(now)?.unwrap_or_else(Millis::now);
    // A store that does not exist yet holds nothing applied: the report is that of the
    // registry alone (what `replay` prints for no events), and `status` does not create it.
    if let Some(file) = Store::sqlite_file(&settings.store.url).filter(|f| !f.exists()) {
        tracing::warn!(store = %file.display(), "no store yet: nothing has been applied (`keywatch run` or `replay --store` creates it)");
        let mut engine = setup::fresh_engine(&settings)
            .map_err(|e| Failure::invalid(format!("registry error: {e}")))?;
        let alerts = engine.take_alerts();
        return print_report(&engine.state_report(now), &alerts);
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let store = connect(&settings).await?;
        print_stored_report(&store, &settings, now, true).await
    })
}

fn parse_now(now: Option<&str>) -> Result<Option<Millis>, Failure> {
    match now {
        Some(text) => Millis::parse(text)
            .map(Some)
            .ok_or_else(|| Failure::invalid(format!("--now: {text:?} is not an RFC 3339 time"))),
        None => Ok(None),
    }
}

/// The report of the persisted state: what `replay` prints for the events applied so far.
///
/// Deadlines are evaluated at `now` as `replay` evaluates them at its `--now`, without writing
/// anything: a rewrap deadline that passed since the service last checked (or while it was not
/// running) shows as `overdue`, with the `rewrap_overdue` alert the service raises when it
/// checks. So `status --now T` and `replay --now T` of the same events agree. Without
/// `deadlines` none is evaluated (`replay --store` evaluated and persisted them already).
async fn print_stored_report(
    store: &Store,
    settings: &Settings,
    now: Millis,
    deadlines: bool,
) -> Result<(), Failure> {
    let mut engine = persist::load(store, settings)
        .await
        .map_err(store_failure)?
        .engine;
    if deadlines {
        engine.tick(now);
    }
    let due = engine.take_alerts();
    let state = engine.state_report(now);
    let mut alerts = Vec::new();
    let mut cursor = 0;
    loop {
        let page = store
            .alerts_since(cursor, 10_000)
            .await
            .map_err(store_failure)?;
        let Some(last) = page.last() else { break };
        cursor = last.seq;
        alerts.extend(
            page.iter()
                .filter_map(|row| serde_json::from_value::<Alert>(row.doc.clone()).ok()),
        );
    }
    alerts.extend(due);
    print_report(&state, &alerts)
}

/// Writes the report of section 6 to stdout: `state` and `alerts` in their order.
fn print_report(state: &StateReport, alerts: &[Alert]) -> Result<(), Failure> {
    let mut alerts_jsonl = Vec::new();
    for alert in alerts {
        serde_json::to_writer(&mut alerts_jsonl, &AlertView::from(alert)).ok();
        alerts_jsonl.push(b'\n');
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    write_report(&mut out, state, &mut Cursor::new(alerts_jsonl))
        .and_then(|_| out.flush())
        .map_err(|e| Failure::runtime(format!("writing the report: {e}")))
}

/// `replay --store`: backfills the configured store from files with the same engine, one
/// transaction per 1000 records, then prints the stored report.
pub fn replay_into_store(
    config: Option<&Path>,
    now: Option<&str>,
    files: &[String],
) -> Result<(), Failure> {
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "warn");
    setup::registry(&settings).map_err(|e| Failure::invalid(format!("registry error: {e}")))?;
    let now = parse_now(now)?;
    let mut inputs = Vec::new();
    for name in files {
        let (reader, _) = open_input(name)
            .map_err(|e| Failure::invalid(format!("replay: cannot open {name}: {e}")))?;
        inputs.push((name.clone(), reader));
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let store = connect(&settings).await?;
        let fail = |e: persist::PersistError| store_failure(e);
        let loaded = persist::load(&store, &settings).await.map_err(fail)?;
        let (mut engine, mut seq) = (loaded.engine, loaded.seq);
        let mut tx = store.begin().await.map_err(|e| fail(e.into()))?;
        persist::sync(&mut tx, &mut engine, seq)
            .await
            .map_err(fail)?;
        persist::register_configured(&mut engine, &settings).map_err(fail)?;
        persist::write(&mut tx, &mut engine, &[])
            .await
            .map_err(fail)?;
        seq = tx.commit().await.map_err(|e| fail(e.into()))?;
        let mut line = Vec::new();
        for (name, mut reader) in inputs {
            let mut number = 0u64;
            loop {
                let mut tx = store.begin().await.map_err(|e| fail(e.into()))?;
                persist::sync(&mut tx, &mut engine, seq)
                    .await
                    .map_err(fail)?;
                let mut in_batch = 0;
                let mut eof = false;
                while in_batch < 1000 {
                    line.clear();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(|e| Failure::runtime(format!("replay: reading {name}: {e}")))?;
                    if n == 0 {
                        eof = true;
                        break;
                    }
                    number += 1;
                    let record = line.trim_ascii();
                    if record.is_empty() {
                        continue;
                    }
                    in_batch += 1;
                    if let Disposition::Invalid(reason) = engine.ingest(record) {
                        tracing::warn!(input = %name, line = number, %reason, "invalid record");
                    }
                }
                persist::write(&mut tx, &mut engine, &[])
                    .await
                    .map_err(fail)?;
                seq = tx.commit().await.map_err(|e| fail(e.into()))?;
                if eof {
                    break;
                }
            }
        }
        // As in `replay`: no --now and no eventTime read, no deadline evaluation (nothing the
        // wall clock decided is persisted).
        let at = now.or(engine.latest_event_time());
        let now = at.unwrap_or_else(Millis::now);
        let mut tx = store.begin().await.map_err(|e| fail(e.into()))?;
        persist::sync(&mut tx, &mut engine, seq)
            .await
            .map_err(fail)?;
        if at.is_some() {
            engine.tick(now);
        }
        persist::write(&mut tx, &mut engine, &[])
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(|e| fail(e.into()))?;
        print_stored_report(&store, &settings, now, false).await
    })
}
