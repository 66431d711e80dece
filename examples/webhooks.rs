//! Benchmark of alert delivery (issue 4): N alerts to a local webhook receiver, `group_wait = 0s`.
//!
//! usage: cargo run --release --example webhooks -- [--alerts N] [--rate R] [--store URL]
//!
//! N deployments, each on a key of its own, are registered; then one `kms.secrets.disable` event
//! per key is applied by the engine and stored with `persist::write`, exactly as `keywatch run`
//! stores a batch, so each alert is one notification. The delivery worker runs with its
//! production defaults against a receiver (axum, 204) on 127.0.0.1 that checks every signature.
//! Two phases, each on a fresh store:
//! - burst: all N alerts committed in one transaction; reports notifications/s from the commit to
//!   the last arrival, and the commit-to-arrival latencies;
//! - steady: one alert per transaction at R alerts/s (default 100); reports the latencies.
//!
//! Latency is measured from the return of the store commit to the receiver's arrival, on one
//! monotonic clock. Output: a Markdown table on stdout (and JSON lines on stderr).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use keywatch::delivery::{DeliveryMetrics, Worker, WorkerOptions, WOKEN_POLL_INTERVAL};
use keywatch::metrics::Metrics;
use keywatch::service::persist;
use keywatch::settings::Settings;
use keywatch::store::Store;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ACCOUNT: &str = "f047b55a3362ac06afad8a3f2f5586ea";
const KP: &str = "00000000-0000-0000-0000-0b0000000001";
const SECRET: &[u8] = b"bench-secret-key-bytes";

#[derive(Default)]
struct Arrivals {
    /// Deployment CRN -> arrival time.
    at: Mutex<HashMap<String, Instant>>,
    bad_signatures: Mutex<usize>,
    duplicates: Mutex<usize>,
}

struct Args {
    alerts: usize,
    rate: f64,
    store: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        alerts: 1000,
        rate: 100.0,
        store: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--alerts" => a.alerts = value().parse().unwrap_or_else(|_| usage("--alerts N")),
            "--rate" => a.rate = value().parse().unwrap_or_else(|_| usage("--rate R")),
            "--store" => a.store = Some(value()),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("webhooks: {problem}");
    }
    eprintln!("usage: cargo run --release --example webhooks -- [--alerts N] [--rate R] [--store postgres://...]");
    std::process::exit(if problem.is_empty() { 0 } else { 1 });
}

fn key_crn(i: usize) -> String {
    format!(
        "crn:v1:bluemix:public:kms:us-south:a/{ACCOUNT}:{KP}:key:00000000-0000-0000-0000-{i:012x}"
    )
}

fn deployment_crn(i: usize) -> String {
    format!(
        "crn:v1:bluemix:public:messagehub:us-south:a/{ACCOUNT}:00000000-0000-0000-0001-{i:012x}::"
    )
}

fn disable_event(i: usize) -> String {
    serde_json::json!({
        "eventTime": "2026-08-20T14:00:00.00+0000",
        "action": "kms.secrets.disable",
        "outcome": "success",
        "correlationId": format!("bench-{i}"),
        "initiator": {"id": "IBMid-1", "name": "bench@example.com"},
        "target": {"id": key_crn(i), "name": "Key Protect", "typeURI": "kms/secrets"},
        "reason": {"reasonCode": 204},
        "requestData": {"requestURI": format!("/api/v2/keys/00000000-0000-0000-0000-{i:012x}"), "instanceID": KP},
        "responseData": {"keyState": 2}
    })
    .to_string()
}

async fn receive(State(s): State<Arc<Arrivals>>, headers: HeaderMap, body: String) -> StatusCode {
    let now = Instant::now();
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("key");
    mac.update(format!("{}.{}.{}", h("webhook-id"), h("webhook-timestamp"), body).as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    if h("webhook-signature") != expected {
        *s.bad_signatures.lock().expect("lock") += 1;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    for d in v["deployments"].as_array().into_iter().flatten() {
        let crn = d["crn"].as_str().unwrap_or_default().to_owned();
        if s.at.lock().expect("lock").insert(crn, now).is_some() {
            *s.duplicates.lock().expect("lock") += 1;
        }
    }
    StatusCode::NO_CONTENT
}

struct Phase {
    name: &'static str,
    latencies_ms: Vec<f64>,
    span: Duration,
    delivered: usize,
    bad_signatures: usize,
    duplicates: usize,
}

async fn phase(name: &'static str, a: &Args, steady: bool) -> Phase {
    let arrivals = Arc::new(Arrivals::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

    let dir = tempfile::tempdir().expect("temp dir");
    let url = match &a.store {
        Some(u) => fresh_postgres(u).await,
        None => format!("sqlite://{}/bench.db", dir.path().display()),
    };
    let mut text = format!(
        "[store]\nurl = \"{url}\"\n\n[delivery]\nmax_age = \"1h\"\nwebhook_timeout = \"5s\"\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n\
         [[routes]]\nname = \"bench\"\nkinds = [\"key_disabled\"]\ngroup_wait = \"0s\"\nwebhooks = [{{ url = \"http://{addr}/hook\", secret = \"whsec_{}\" }}]\n\n",
        base64::engine::general_purpose::STANDARD.encode(SECRET)
    );
    for i in 0..a.alerts {
        text.push_str(&format!(
            "[[deployments]]\ncrn = \"{}\"\nname = \"es-{i}\"\nkey = \"{}\"\nowners = [\"team{i}@example.com\"]\n\n",
            deployment_crn(i),
            key_crn(i)
        ));
    }
    let file = dir.path().join("bench.toml");
    std::fs::write(&file, text).expect("config");
    let settings = Settings::load_with_env(Some(&file), &[]).expect("settings");
    let store = Store::connect(&settings.store.url).await.expect("store");
    let loaded = persist::load(&store, &settings).await.expect("load");
    let (mut engine, mut seq) = (loaded.engine, loaded.seq);
    let mut tx = store.begin().await.expect("begin");
    persist::register_configured(&mut engine, &settings).expect("register");
    persist::write(&mut tx, &mut engine, &[])
        .await
        .expect("write");
    seq = seq.max(tx.commit().await.expect("commit"));

    let metrics = Metrics::new();
    let wakeup = std::sync::Arc::new(tokio::sync::Notify::new());
    // One store shared with the writer above, as in `keywatch run`.
    let worker = Worker::new(&settings, store.clone(), DeliveryMetrics::new(&metrics))
        .expect("worker")
        // As in `keywatch run`: woken after each commit that wrote alerts.
        .with_wakeup(wakeup.clone())
        .with_options(WorkerOptions {
            poll_interval: WOKEN_POLL_INTERVAL,
            ..Default::default()
        });
    let token = CancellationToken::new();
    let running = tokio::spawn(worker.run(token.clone()));

    let mut committed: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    if steady {
        let interval = Duration::from_secs_f64(1.0 / a.rate);
        for i in 0..a.alerts {
            let due = started + interval * i as u32;
            tokio::time::sleep_until(due.into()).await;
            let mut tx = store.begin().await.expect("begin");
            persist::sync(&mut tx, &mut engine, seq)
                .await
                .expect("sync");
            engine.ingest(disable_event(i).as_bytes());
            persist::write(&mut tx, &mut engine, &[])
                .await
                .expect("write");
            seq = tx.commit().await.expect("commit");
            committed.insert(deployment_crn(i), Instant::now());
            wakeup.notify_one();
        }
    } else {
        let mut tx = store.begin().await.expect("begin");
        persist::sync(&mut tx, &mut engine, seq)
            .await
            .expect("sync");
        for i in 0..a.alerts {
            engine.ingest(disable_event(i).as_bytes());
        }
        let (n, _) = persist::write(&mut tx, &mut engine, &[])
            .await
            .expect("write");
        assert_eq!(n, a.alerts, "one alert per event");
        tx.commit().await.expect("commit");
        let at = Instant::now();
        wakeup.notify_one();
        for i in 0..a.alerts {
            committed.insert(deployment_crn(i), at);
        }
    }
    let commit_start = committed.values().min().copied().unwrap_or(started);
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrivals.at.lock().expect("lock").len() < a.alerts {
        assert!(
            Instant::now() < deadline,
            "not everything arrived within 300s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    token.cancel();
    running.await.expect("worker");
    let at = arrivals.at.lock().expect("lock").clone();
    let last = at.values().max().copied().unwrap_or(commit_start);
    let mut latencies_ms: Vec<f64> = committed
        .iter()
        .map(|(crn, c)| at[crn].saturating_duration_since(*c).as_secs_f64() * 1000.0)
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    let delivered = metrics
        .notifications
        .with_label_values(&["webhook", "delivered"])
        .get() as usize;
    let bad_signatures = *arrivals.bad_signatures.lock().expect("lock");
    let duplicates = *arrivals.duplicates.lock().expect("lock");
    store.close().await;
    if let Some(admin) = &a.store {
        drop_postgres(admin, &url).await;
    }
    Phase {
        name,
        latencies_ms,
        span: last.saturating_duration_since(commit_start),
        delivered,
        bad_signatures,
        duplicates,
    }
}

/// A database of its own on the server of `admin` (a postgres:// URL).
async fn fresh_postgres(admin: &str) -> String {
    use sqlx::Connection;
    let mut url = reqwest::Url::parse(admin).expect("--store is a URL");
    let name = format!("kw_bench_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let mut c = sqlx::PgConnection::connect(admin).await.expect("connect");
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .expect("create database");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// Drops the database `fresh_postgres` made for a phase.
async fn drop_postgres(admin: &str, url: &str) {
    use sqlx::Connection;
    let name = url.rsplit('/').next().unwrap_or_default();
    if let Ok(mut c) = sqlx::PgConnection::connect(admin).await {
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let store = a
        .store
        .as_deref()
        .map_or("sqlite (temporary file)", |_| "postgresql (fresh database)");
    let burst = phase("burst (one commit)", &a, false).await;
    let steady = phase("steady", &a, true).await;
    println!("| phase | store | alerts | notifications/s | p50 ms | p99 ms | max ms | delivered | bad signatures | duplicates |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in [&burst, &steady] {
        let rate = a.alerts as f64 / p.span.as_secs_f64().max(1e-9);
        let name = if p.name == "steady" {
            format!("steady ({} alerts/s)", a.rate)
        } else {
            p.name.to_owned()
        };
        println!(
            "| {name} | {store} | {} | {rate:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            a.alerts,
            percentile(&p.latencies_ms, 50.0),
            percentile(&p.latencies_ms, 99.0),
            percentile(&p.latencies_ms, 100.0),
            p.delivered,
            p.bad_signatures,
            p.duplicates
        );
        eprintln!(
            "{}",
            serde_json::json!({"phase": p.name, "store": store, "alerts": a.alerts,
                "notifications_per_second": rate, "p50_ms": percentile(&p.latencies_ms, 50.0),
                "p99_ms": percentile(&p.latencies_ms, 99.0), "max_ms": percentile(&p.latencies_ms, 100.0),
                "delivered": p.delivered, "bad_signatures": p.bad_signatures, "duplicates": p.duplicates})
        );
    }
}
