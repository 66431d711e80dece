//! Alert delivery (spec section 4, issue 4) with real parts: the SMTP server of
//! `scripts/smtp-sink` (aiosmtpd), an HTTP receiver inside the test (axum on 127.0.0.1:0) that
//! checks Standard Webhooks signatures with an HMAC of its own, and real SQLite and PostgreSQL
//! stores. Alerts are made as `keywatch run` makes them: the engine applies Activity Tracker
//! records and `persist::write` stores state and alerts in one transaction; the delivery worker is
//! driven through its library API. No Kafka, so the tests are fast.
//!
//! Needs `scripts/install-tools` (the SMTP sink's venv; `scripts/test` runs it) and, for the
//! PostgreSQL test, the server of `KEYWATCH_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`; each test creates a fresh database). Every wait
//! polls a condition with a deadline.

use crate::support::repo;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use keywatch::delivery::{DeliveryMetrics, Worker, WorkerOptions};
use keywatch::engine::{Alert, Engine};
use keywatch::metrics::Metrics;
use keywatch::service::persist;
use keywatch::settings::Settings;
use keywatch::store::{NewAlert, NotificationRow, Store};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ACCOUNT: &str = "f047b55a3362ac06afad8a3f2f5586ea";
const KP_INSTANCE: &str = "00000000-0000-0000-0000-0a2500000003";
const KEY1: &str = "00000000-0000-0000-0000-0a2500000004";
const KEY2: &str = "00000000-0000-0000-0000-0a2500000005";
const SECRET_BYTES: &[u8] = b"keywatch-delivery-test-key-bytes";
/// How long any condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------ fixtures

fn key_crn(key: &str) -> String {
    format!("crn:v1:bluemix:public:kms:us-south:a/{ACCOUNT}:{KP_INSTANCE}:key:{key}")
}

fn deployment_crn(n: u32) -> String {
    format!("crn:v1:bluemix:public:messagehub:us-south:a/{ACCOUNT}:00000000-0000-0000-0000-0d25{n:08x}::")
}

fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(SECRET_BYTES)
    )
}

/// d1, d2, d3 on KEY1 (owners alice, alice, bob; env prod) and d4 on KEY2 (owner carol, env dev).
fn registry_toml() -> String {
    let entry = |n: u32, name: &str, key: &str, owner: &str, env: &str| {
        format!(
            "[[deployments]]\ncrn = \"{}\"\nname = \"{name}\"\nkey = \"{}\"\nowners = [\"{owner}\"]\nlabels = {{ env = \"{env}\" }}\n\n",
            deployment_crn(n),
            key_crn(key)
        )
    };
    [
        entry(1, "orders-prod", KEY1, "alice@example.com", "prod"),
        entry(2, "billing-prod", KEY1, "alice@example.com", "prod"),
        entry(3, "search-prod", KEY1, "bob@example.com", "prod"),
        entry(4, "analytics-dev", KEY2, "carol@example.com", "dev"),
    ]
    .concat()
}

/// An Activity Tracker record of a key lifecycle event, as Key Protect writes it.
fn key_event(action: &str, key: &str, time: &str, correlation: &str) -> String {
    let state = match action {
        "kms.secrets.delete" => 5,
        "kms.secrets.disable" => 2,
        _ => 1,
    };
    serde_json::json!({
        "eventTime": time,
        "action": action,
        "outcome": "success",
        "message": format!("Key Protect: {action}"),
        "severity": "critical",
        "dataEvent": false,
        "correlationId": correlation,
        "initiator": {"id": "IBMid-2700012345", "name": "ops@example.com",
                      "typeURI": "service/security/account/user", "credential": {"type": "token"}},
        "target": {"id": key_crn(key), "name": "Key Protect", "typeURI": "kms/secrets"},
        "reason": {"reasonCode": 200, "reasonType": "OK"},
        "requestData": {"requestURI": format!("/api/v2/keys/{key}"), "instanceID": KP_INSTANCE},
        "observer": {"name": "ActivityTracker"},
        "logSourceCRN": format!("crn:v1:bluemix:public:kms:us-south:a/{ACCOUNT}:{KP_INSTANCE}::"),
        "saveServiceCopy": true,
        "responseData": {"keyState": state}
    })
    .to_string()
}

/// A test world: a configuration file, its store, and the engine `run` would have.
struct World {
    _dir: tempfile::TempDir,
    settings: Settings,
    store: Store,
    engine: Engine,
    seq: i64,
    metrics: DeliveryMetrics,
    _metrics_owner: Arc<Metrics>,
}

impl World {
    /// `extra` holds the `[smtp]`, `[delivery]` and `[[routes]]` of the test. `store_url`: `None`
    /// for a SQLite file in the world's directory.
    async fn new(extra: &str, store_url: Option<&str>, registry: &str) -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = store_url.map_or_else(
            || format!("sqlite://{}/keywatch.db", dir.path().display()),
            str::to_owned,
        );
        let text = format!("[store]\nurl = \"{url}\"\n\n{extra}\n\n{registry}");
        let file = dir.path().join("keywatch.toml");
        std::fs::write(&file, &text).expect("write config");
        let settings = Settings::load_with_env(Some(&file), &[])
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        let store = Store::connect(&settings.store.url).await.expect("store");
        let loaded = persist::load(&store, &settings).await.expect("load");
        let metrics = Arc::new(Metrics::new());
        let mut world = World {
            _dir: dir,
            settings,
            store,
            engine: loaded.engine,
            seq: loaded.seq,
            metrics: DeliveryMetrics::new(&metrics),
            _metrics_owner: metrics,
        };
        // Registration, as `run` does at start-up (raises shared_key alerts).
        let mut tx = world.store.begin().await.expect("begin");
        persist::sync(&mut tx, &mut world.engine, world.seq)
            .await
            .expect("sync");
        persist::register_configured(&mut world.engine, &world.settings).expect("register");
        persist::write(&mut tx, &mut world.engine, &[])
            .await
            .expect("write");
        world.seq = tx.commit().await.expect("commit");
        world
    }

    /// Applies records in one transaction, like one batch of `run`; returns the new alerts.
    async fn apply(&mut self, records: &[String]) -> Vec<Alert> {
        let mut tx = self.store.begin().await.expect("begin");
        persist::sync(&mut tx, &mut self.engine, self.seq)
            .await
            .expect("sync");
        for r in records {
            self.engine.ingest(r.as_bytes());
        }
        let (_, alerts) = persist::write(&mut tx, &mut self.engine, &[])
            .await
            .expect("write");
        self.seq = tx.commit().await.expect("commit");
        alerts
    }

    fn worker(&self, store: Store) -> Worker {
        Worker::new(&self.settings, store, self.metrics.clone())
            .expect("worker")
            .with_options(fast())
    }

    /// Starts a worker on a store of its own (as another process would have).
    async fn start(&self) -> Running {
        let store = Store::connect(&self.settings.store.url)
            .await
            .expect("store");
        Running::spawn(self.worker(store))
    }

    async fn notifications(&self) -> Vec<NotificationRow> {
        self.store
            .notifications(10_000)
            .await
            .expect("notifications")
    }

    /// Waits until there are `n` notifications and none is pending; returns them.
    async fn settled(&self, n: usize) -> Vec<NotificationRow> {
        until(&format!("{n} settled notifications"), || async {
            let rows = self.notifications().await;
            (rows.len() == n && rows.iter().all(|r| r.status != "pending")).then_some(rows)
        })
        .await
    }
}

fn fast() -> WorkerOptions {
    WorkerOptions {
        poll_interval: Duration::from_millis(20),
        max_in_flight: 16,
        flush_deadline: Duration::from_secs(3),
    }
}

struct Running {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Runs `worker` until [`Running::stop`].
    fn spawn(worker: Worker) -> Running {
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run(token.clone()));
        Running { token, handle }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("the worker stops in time")
            .expect("the worker does not panic");
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delivery_toml(max_age: &str, webhook_timeout: &str) -> String {
    format!(
        "[delivery]\nmax_age = \"{max_age}\"\nwebhook_timeout = \"{webhook_timeout}\"\n\
         initial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n"
    )
}

fn webhook_route(name: &str, url: &str, kinds: &str, group_wait: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nkinds = {kinds}\ngroup_wait = \"{group_wait}\"\n\
         webhooks = [{{ url = \"{url}\", secret = \"{}\" }}]\n",
        secret()
    )
}

// ------------------------------------------------------------------------- webhook receiver

/// What the receiver answers to the next request (then [`Reply::Ok`] once the script is used up).
#[derive(Clone, Debug)]
enum Reply {
    Ok,
    Status(u16, &'static str),
    RetryAfter(&'static str),
    /// Answers 200 only after this long (longer than the sender's timeout).
    Slow(Duration),
}

#[derive(Clone, Debug)]
struct Received {
    id: String,
    at: Instant,
    body: Value,
    raw: String,
    /// The signature matched (an HMAC-SHA256 computed here, not with keywatch's code).
    verified: bool,
    /// `webhook-timestamp` within five minutes of now.
    fresh: bool,
}

#[derive(Default)]
struct ReceiverState {
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Received>>,
}

struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(script: Vec<Reply>) -> Receiver {
        Receiver::on("127.0.0.1:0".parse().expect("addr"), script).await
    }

    async fn on(addr: SocketAddr, script: Vec<Reply>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(ReceiverState {
            script: Mutex::new(script.into()),
            received: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/hook/{token}", axum::routing::post(receive))
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
                .expect("receiver");
        });
        Receiver { addr, state, stop }
    }

    fn url(&self) -> String {
        format!("http://{}/hook/path-token-1234", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Requests per `webhook-id`.
    fn per_id(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.received() {
            *m.entry(r.id).or_default() += 1;
        }
        m
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receive(State(s): State<Arc<ReceiverState>>, headers: HeaderMap, raw: String) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(hmac_sha256(
            SECRET_BYTES,
            format!("{id}.{timestamp}.{raw}").as_bytes()
        ))
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (now - t).abs() <= 300);
    s.received.lock().expect("lock").push(Received {
        id,
        at: Instant::now(),
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        verified: signature.split(' ').any(|sig| sig == expected),
        fresh,
        raw,
    });
    let reply = s
        .script
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or(Reply::Ok);
    match reply {
        Reply::Ok => StatusCode::NO_CONTENT.into_response(),
        Reply::Status(code, body) => {
            (StatusCode::from_u16(code).expect("status"), body.to_owned()).into_response()
        }
        Reply::RetryAfter(value) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", value)],
            "slow down",
        )
            .into_response(),
        Reply::Slow(pause) => {
            tokio::time::sleep(pause).await;
            StatusCode::OK.into_response()
        }
    }
}

/// HMAC-SHA256 (RFC 2104) written out, independent of the `hmac` crate keywatch signs with.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// A free port on loopback, for a receiver that starts later.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

// ------------------------------------------------------------------------------- SMTP server

/// `scripts/smtp-sink` on a free port, storing messages in a directory of its own.
struct SmtpSink {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl SmtpSink {
    fn start(extra: &[&str]) -> SmtpSink {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = repo().join("scripts/smtp-sink");
        let mut child = Command::new(&script)
            .args(["--port", "0", "--dir"])
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the smtp-sink banner");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "smtp-sink did not start (printed {line:?}); run scripts/install-tools first"
                )
            });
        SmtpSink { child, dir, port }
    }

    fn messages(&self) -> Vec<Mail> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("read dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        names.sort();
        names.iter().map(|p| Mail::read(p)).collect()
    }

    fn toml(&self) -> String {
        format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"keywatch <keywatch@example.com>\"\ntls = \"none\"\ntimeout = \"5s\"\n",
            self.port
        )
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A received message, decoded enough to assert on.
#[derive(Debug)]
struct Mail {
    rcpt_tos: Vec<String>,
    subject: String,
    message_id: String,
    text: String,
    html: String,
}

impl Mail {
    fn read(path: &Path) -> Mail {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
        let data = v["data"].as_str().expect("data").replace("\r\n", "\n");
        let (head, body) = data.split_once("\n\n").expect("headers and body");
        let headers = unfold(head);
        let boundary = header_param(&headers, "content-type", "boundary").expect("multipart");
        let mut text = String::new();
        let mut html = String::new();
        for part in body.split(&format!("--{boundary}")) {
            let Some((part_head, part_body)) = part.trim_start_matches('\n').split_once("\n\n")
            else {
                continue;
            };
            let part_headers = unfold(part_head);
            let content_type = header(&part_headers, "content-type").unwrap_or_default();
            let encoding = header(&part_headers, "content-transfer-encoding").unwrap_or_default();
            let decoded = decode(part_body, &encoding);
            if content_type.starts_with("text/plain") {
                text = decoded;
            } else if content_type.starts_with("text/html") {
                html = decoded;
            }
        }
        Mail {
            rcpt_tos: v["rcpt_tos"]
                .as_array()
                .expect("rcpt_tos")
                .iter()
                .map(|r| r.as_str().unwrap_or_default().to_owned())
                .collect(),
            subject: header(&headers, "subject").unwrap_or_default(),
            message_id: header(&headers, "message-id").unwrap_or_default(),
            text,
            html,
        }
    }
}

fn unfold(head: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    out
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

fn header_param(headers: &[(String, String)], name: &str, param: &str) -> Option<String> {
    let value = header(headers, name)?;
    value.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.eq_ignore_ascii_case(param)).then(|| v.trim_matches('"').to_owned())
    })
}

fn decode(body: &str, encoding: &str) -> String {
    match encoding.to_ascii_lowercase().as_str() {
        "base64" => {
            let compact: String = body.split_whitespace().collect();
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .expect("base64 part"),
            )
            .expect("utf-8")
        }
        "quoted-printable" => {
            let mut bytes = Vec::new();
            let joined = body.replace("=\n", "");
            let raw = joined.as_bytes();
            let mut i = 0;
            while i < raw.len() {
                if raw[i] == b'=' && i + 2 < raw.len() {
                    let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap_or("");
                    if let Ok(b) = u8::from_str_radix(hex, 16) {
                        bytes.push(b);
                        i += 3;
                        continue;
                    }
                }
                bytes.push(raw[i]);
                i += 1;
            }
            String::from_utf8(bytes).expect("utf-8")
        }
        _ => body.to_owned(),
    }
}

// ------------------------------------------------------------------------------------- tests

/// A deletion of a key shared by three deployments: one message per recipient (the route's
/// address gets all three deployments, each owner theirs), subject and body as the spec says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_once_to_each_recipient_of_a_shared_key_event() {
    let sink = SmtpSink::start(&[]);
    let routes = "[[routes]]\nname = \"ops\"\nmin_severity = \"warning\"\nkinds = [\"key_deleted\"]\n\
                  match_labels = { env = \"prod\" }\nemail = [\"ops@example.com\", \"owners\"]\ngroup_wait = \"0s\"\n";
    let mut world = World::new(
        &format!("{}\n{}\n{routes}", sink.toml(), delivery_toml("1h", "2s")),
        None,
        &registry_toml(),
    )
    .await;
    let alerts = world
        .apply(&[key_event(
            "kms.secrets.delete",
            KEY1,
            "2026-08-20T14:00:00.00+0000",
            "e9331109-f100-5189-b2a2-ae311c8dce97",
        )])
        .await;
    assert_eq!(alerts.len(), 3, "{alerts:#?}");
    let worker = world.start().await;
    let rows = world.settled(3).await;
    worker.stop().await;
    assert!(rows.iter().all(|r| r.status == "delivered"), "{rows:#?}");

    let mails = sink.messages();
    let by_rcpt: BTreeMap<String, &Mail> =
        mails.iter().map(|m| (m.rcpt_tos.join(","), m)).collect();
    assert_eq!(
        by_rcpt.keys().cloned().collect::<Vec<_>>(),
        ["alice@example.com", "bob@example.com", "ops@example.com"],
        "exactly one message per recipient: {mails:#?}"
    );
    assert_eq!(mails.len(), 3);
    let ops = by_rcpt["ops@example.com"];
    assert!(
        ops.subject.starts_with("[CRITICAL] key_deleted: "),
        "{}",
        ops.subject
    );
    assert!(ops.subject.contains(KEY1), "{}", ops.subject);
    assert!(ops.subject.contains("3 deployments"), "{}", ops.subject);
    let first = ops.text.lines().next().expect("a first line");
    for needed in [
        format!("Key {} was deleted", key_crn(KEY1)).as_str(),
        "at 2026-08-20T14:00:00.000Z",
        "by ops@example.com (IBMid-2700012345)",
        "correlation id e9331109-f100-5189-b2a2-ae311c8dce97",
        "3 deployments affected",
        "billing-prod",
        "orders-prod",
        "search-prod",
        "disk shredded",
        "restore the key before 2026-09-19T14:00:00.000Z",
    ] {
        assert!(
            first.contains(needed),
            "first line lacks {needed:?}: {first}"
        );
    }
    for crn in [deployment_crn(1), deployment_crn(2), deployment_crn(3)] {
        assert!(ops.text.contains(&crn), "{}", ops.text);
        assert!(ops.html.contains(&crn), "{}", ops.html);
    }
    assert!(ops.html.contains("<table"), "{}", ops.html);
    assert!(
        ops.html
            .contains("restore the key before 2026-09-19T14:00:00.000Z")
            || ops
                .html
                .contains("Restore the key before 2026-09-19T14:00:00.000Z")
    );
    let alice = by_rcpt["alice@example.com"];
    assert!(
        alice
            .text
            .lines()
            .next()
            .unwrap_or("")
            .contains("2 deployments affected (billing-prod, orders-prod)"),
        "{}",
        alice.text
    );
    assert!(!alice.text.contains("search-prod"), "{}", alice.text);
    let bob = by_rcpt["bob@example.com"];
    assert!(
        bob.text
            .lines()
            .next()
            .unwrap_or("")
            .contains("1 deployment affected (search-prod)"),
        "{}",
        bob.text
    );
    assert!(
        bob.subject.contains("1 deployment affected"),
        "{}",
        bob.subject
    );
    let ids: BTreeSet<&str> = mails.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        3,
        "message ids are the notification ids: {ids:?}"
    );
    assert_eq!(world.metrics.count("email", "delivered"), 3);
}

/// SMTP: a 4xx reply is retried, a 5xx reply fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_retries_a_4xx_reply_and_gives_up_on_a_5xx_reply() {
    for (code, status, attempts, stored) in [("451", "delivered", 2, 1), ("550", "failed", 1, 0)] {
        let sink = SmtpSink::start(&["--reject-first", "1", "--reject-code", code]);
        let routes = "[[routes]]\nname = \"ops\"\nkinds = [\"key_disabled\"]\nemail = [\"ops@example.com\"]\ngroup_wait = \"0s\"\n";
        let mut world = World::new(
            &format!("{}\n{}\n{routes}", sink.toml(), delivery_toml("1h", "2s")),
            None,
            &registry_toml(),
        )
        .await;
        world
            .apply(&[key_event(
                "kms.secrets.disable",
                KEY2,
                "2026-08-20T14:00:00.00+0000",
                "c-disable",
            )])
            .await;
        let worker = world.start().await;
        let rows = world.settled(1).await;
        worker.stop().await;
        assert_eq!(rows[0].status, status, "reply {code}: {rows:#?}");
        assert_eq!(rows[0].attempts, attempts, "reply {code}: {rows:#?}");
        let error = rows[0].last_error.clone().unwrap_or_default();
        assert!(error.contains(code), "reply {code}: {error}");
        assert_eq!(sink.messages().len(), stored, "reply {code}");
        let mail = sink.messages();
        if let Some(m) = mail.first() {
            assert!(
                m.subject.starts_with("[WARNING] key_disabled: ")
                    || m.subject.starts_with("[CRITICAL] key_disabled: "),
                "{}",
                m.subject
            );
            assert!(
                m.text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .contains("enable the key"),
                "{}",
                m.text
            );
        }
    }
}

/// The body fields of spec section 4, a signature that verifies, and the same `webhook-id` (and
/// body) on every retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_is_signed_complete_and_keeps_its_id_across_retries() {
    let rx = Receiver::start(vec![Reply::Status(500, "try later"), Reply::Ok]).await;
    let routes = webhook_route("hooks", &rx.url(), "[\"key_deleted\"]", "0s");
    let mut world = World::new(
        &format!("{}\n{routes}", delivery_toml("1h", "2s")),
        None,
        &registry_toml(),
    )
    .await;
    world
        .apply(&[key_event(
            "kms.secrets.delete",
            KEY1,
            "2026-08-20T14:00:00.00+0000",
            "corr-1",
        )])
        .await;
    let worker = world.start().await;
    let rows = world.settled(1).await;
    worker.stop().await;
    let row = &rows[0];
    assert_eq!(
        (row.status.as_str(), row.attempts),
        ("delivered", 2),
        "{row:#?}"
    );
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("HTTP 500 Internal Server Error: try later"),
        "{row:#?}"
    );
    assert!(
        !row.recipient.contains("path-token"),
        "the URL path is not stored: {}",
        row.recipient
    );

    let got = rx.received();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got.iter().all(|r| r.verified && r.fresh),
        "signatures: {got:#?}"
    );
    assert_eq!(got[0].id, row.id);
    assert_eq!(got[1].id, row.id, "webhook-id is stable across retries");
    assert_eq!(got[0].raw, got[1].raw, "every retry sends the same body");
    let body = &got[1].body;
    assert_eq!(body["id"], row.id.as_str());
    assert_eq!(body["kind"], "key_deleted");
    assert_eq!(body["severity"], "critical");
    assert_eq!(body["test"], false);
    let summary = body["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("3 deployments affected") && summary.contains("was deleted"),
        "{summary}"
    );
    assert_eq!(body["key"]["crn"], key_crn(KEY1).as_str());
    assert_eq!(body["key"]["state"], "destroyed");
    assert_eq!(body["key"]["restorable_until"], "2026-09-19T14:00:00.000Z");
    let deployments = body["deployments"].as_array().expect("deployments");
    let names: BTreeSet<&str> = deployments
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["billing-prod", "orders-prod", "search-prod"])
    );
    for d in deployments {
        assert!(
            d["crn"].as_str().is_some_and(|c| c.starts_with("crn:v1:")),
            "{d}"
        );
        assert_eq!(d["disk"], "shredded", "{d}");
        assert_eq!(d["lifecycle"], "active", "{d}");
        assert_eq!(d["rewrap"], "current", "{d}");
        assert_eq!(d["authorization"], "ok", "{d}");
        assert_eq!(d["restorable_until"], "2026-09-19T14:00:00.000Z", "{d}");
        assert_eq!(d["alert_kind"], "key_deleted", "{d}");
    }
    assert_eq!(body["event"]["action"], "kms.secrets.delete");
    assert_eq!(body["event"]["event_time"], "2026-08-20T14:00:00.000Z");
    assert_eq!(body["event"]["correlation_id"], "corr-1");
    assert_eq!(body["event"]["initiator"]["name"], "ops@example.com");
    assert_eq!(body["event"]["initiator"]["id"], "IBMid-2700012345");
    assert!(
        body["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    assert_eq!(world.metrics.count("webhook", "retried"), 1);
    assert_eq!(world.metrics.count("webhook", "delivered"), 1);
}

/// The receiver is down (connection refused) while the first worker tries, which then stops;
/// a second worker on the same store (a restart) delivers everything once the receiver is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_then_up_gets_everything_once_across_a_restart() {
    let addr = free_port();
    let url = format!("http://{addr}/hook/path-token-1234");
    let routes = webhook_route("hooks", &url, "[\"key_deleted\", \"key_disabled\"]", "0s");
    let mut world = World::new(
        &format!("{}\n{routes}", delivery_toml("1h", "1s")),
        None,
        &registry_toml(),
    )
    .await;
    world
        .apply(&[key_event(
            "kms.secrets.delete",
            KEY1,
            "2026-08-20T14:00:00.00+0000",
            "c-1",
        )])
        .await;
    world
        .apply(&[key_event(
            "kms.secrets.disable",
            KEY2,
            "2026-08-20T14:01:00.00+0000",
            "c-2",
        )])
        .await;
    let first = world.start().await;
    until("two failed attempts per notification", || async {
        let rows = world.notifications().await;
        (rows.len() == 2
            && rows
                .iter()
                .all(|r| r.attempts >= 2 && r.status == "pending"))
        .then_some(())
    })
    .await;
    first.stop().await;
    let before = world.notifications().await;
    assert!(
        before
            .iter()
            .all(|r| r.last_error.as_deref().unwrap_or("").contains("connect")),
        "{before:#?}"
    );

    let second = world.start().await;
    let rx = Receiver::on(addr, vec![]).await;
    let rows = world.settled(2).await;
    second.stop().await;
    assert!(rows.iter().all(|r| r.status == "delivered"), "{rows:#?}");
    let per_id = rx.per_id();
    assert_eq!(per_id.len(), 2, "{per_id:?}");
    assert!(
        per_id.values().all(|n| *n == 1),
        "each notification arrives once: {per_id:?}"
    );
    assert!(rx.received().iter().all(|r| r.verified));
    assert!(world.metrics.count("webhook", "retried") >= 4);
}

/// The setup of the webhook retry tests: a `hooks` route to `rx` for `key_disabled`, KEY2
/// disabled once (correlation id `correlation`), and a worker that runs until the one notification
/// settles. Returns the world and the notification rows.
async fn one_webhook_alert(
    rx: &Receiver,
    max_age: &str,
    webhook_timeout: &str,
    correlation: &str,
) -> (World, Vec<NotificationRow>) {
    let routes = webhook_route("hooks", &rx.url(), "[\"key_disabled\"]", "0s");
    let mut world = World::new(
        &format!("{}\n{routes}", delivery_toml(max_age, webhook_timeout)),
        None,
        &registry_toml(),
    )
    .await;
    world
        .apply(&[key_event(
            "kms.secrets.disable",
            KEY2,
            "2026-08-20T14:00:00.00+0000",
            correlation,
        )])
        .await;
    let worker = world.start().await;
    let rows = world.settled(1).await;
    worker.stop().await;
    (world, rows)
}

/// 429 with `Retry-After: 1`: the next attempt waits that second, although the backoff is 20ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_its_retry_after() {
    let rx = Receiver::start(vec![Reply::RetryAfter("1"), Reply::Ok]).await;
    let (_world, rows) = one_webhook_alert(&rx, "1h", "2s", "c-429").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 2),
        "{rows:#?}"
    );
    let got = rx.received();
    assert_eq!(got.len(), 2);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "retried after {gap:?}, Retry-After said 1s"
    );
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("HTTP 429"),
        "{rows:#?}"
    );
}

/// 400 is permanent: one request, failed, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_fails_at_once() {
    let rx = Receiver::start(vec![Reply::Status(400, "bad payload")]).await;
    let (world, rows) = one_webhook_alert(&rx, "1h", "2s", "c-400").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("failed", 1),
        "{rows:#?}"
    );
    assert_eq!(
        rows[0].last_error.as_deref(),
        Some("HTTP 400 Bad Request: bad payload")
    );
    assert_eq!(rx.received().len(), 1);
    assert_eq!(world.metrics.count("webhook", "failed"), 1);
    assert_eq!(world.metrics.count("webhook", "retried"), 0);
    assert_eq!(world.store.pending_notifications().await.expect("count"), 0);
}

/// A worker woken after commits (as in `run`) delivers an alert committed while it waits,
/// although it would not look at the store by itself for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_worker_delivers_without_polling() {
    let rx = Receiver::start(vec![Reply::Ok]).await;
    let routes = webhook_route("hooks", &rx.url(), "[\"key_disabled\"]", "0s");
    let mut world = World::new(
        &format!("{}\n{routes}", delivery_toml("1h", "2s")),
        None,
        &registry_toml(),
    )
    .await;
    let wakeup = Arc::new(tokio::sync::Notify::new());
    // On the store the events are written through, as in `run`.
    let running = Running::spawn(
        world
            .worker(world.store.clone())
            .with_wakeup(wakeup.clone())
            .with_options(WorkerOptions {
                poll_interval: Duration::from_secs(3600),
                ..fast()
            }),
    );
    // The worker has looked once (nothing to do) and now waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(world.notifications().await.is_empty());
    let alerts = world
        .apply(&[key_event(
            "kms.secrets.disable",
            KEY2,
            "2026-08-20T14:00:00.00+0000",
            "c-woken",
        )])
        .await;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    wakeup.notify_one();
    let rows = world.settled(1).await;
    assert_eq!(rows[0].status, "delivered", "{rows:#?}");
    assert_eq!(rx.received().len(), 1);
    running.stop().await;
}

/// 500 is retried (twice here) until it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_is_retried_until_delivered() {
    let rx = Receiver::start(vec![
        Reply::Status(500, ""),
        Reply::Status(503, ""),
        Reply::Ok,
    ])
    .await;
    let (world, rows) = one_webhook_alert(&rx, "1h", "2s", "c-500").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 3),
        "{rows:#?}"
    );
    assert_eq!(rx.per_id().values().copied().collect::<Vec<_>>(), [3]);
    assert_eq!(world.metrics.count("webhook", "retried"), 2);
    assert_eq!(world.metrics.count("webhook", "delivered"), 1);
}

/// A receiver slower than `webhook_timeout` is a timeout, retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_times_out_and_is_retried() {
    let rx = Receiver::start(vec![Reply::Slow(Duration::from_secs(5)), Reply::Ok]).await;
    let (_world, rows) = one_webhook_alert(&rx, "1h", "500ms", "c-slow").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 2),
        "{rows:#?}"
    );
    let error = rows[0].last_error.clone().unwrap_or_default();
    assert!(error.starts_with("timed out after 500ms"), "{error}");
    assert_eq!(
        rx.per_id().len(),
        1,
        "one notification, received twice under one id"
    );
}

/// 5xx forever: retried until `max_age`, then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_end_at_the_maximum_age() {
    let rx = Receiver::start(vec![Reply::Status(502, ""); 1000]).await;
    let (world, rows) = one_webhook_alert(&rx, "1s", "2s", "c-old").await;
    assert_eq!(rows[0].status, "failed", "{rows:#?}");
    let error = rows[0].last_error.clone().unwrap_or_default();
    assert!(
        error.starts_with("gave up after") && error.contains("over 1s: HTTP 502"),
        "{error}"
    );
    assert!(rows[0].attempts >= 3, "{rows:#?}");
    assert_eq!(world.metrics.count("webhook", "failed"), 1);
}

/// Grouping by cause: alerts of one cause join the notification until it is first attempted,
/// later ones start a new one; planning twice, or from a restarted worker, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_of_one_cause_are_grouped_and_planning_is_idempotent() {
    let routes = webhook_route(
        "hooks",
        "http://127.0.0.1:9/hook/x",
        "[\"key_disabled\"]",
        "30s",
    );
    let world = World::new(
        &format!("{}\n{routes}", delivery_toml("1h", "2s")),
        None,
        &registry_toml(),
    )
    .await;
    let insert = |deployment: u32| {
        let alert = Alert {
            id: format!("alert-{deployment}"),
            kind: keywatch::engine::AlertKind::KeyDisabled,
            severity: keywatch::engine::Severity::Warning,
            deployment: deployment_crn(deployment),
            key: key_crn(KEY1),
            event_time: None,
            correlation_id: None,
            cause: "the-cause".to_owned(),
            action: Some("kms.secrets.disable".to_owned()),
            initiator: None,
            summary: "key disabled".to_owned(),
        };
        let store = world.store.clone();
        async move {
            let now = time::OffsetDateTime::now_utc();
            let mut tx = store.begin().await.expect("begin");
            tx.insert_alerts(&[NewAlert {
                id: alert.id.clone(),
                kind: "key_disabled".into(),
                severity: "warning".into(),
                deployment: alert.deployment.clone(),
                key: alert.key.clone(),
                cause: alert.cause.clone(),
                event_time: now,
                created_at: now,
                doc: serde_json::to_value(&alert).expect("doc"),
            }])
            .await
            .expect("insert");
            tx.commit().await.expect("commit");
        }
    };
    let mut worker = world.worker(world.store.clone());
    // The registration's shared_key alerts match no route.
    assert_eq!(worker.plan().await.expect("plan").created, 0);
    insert(1).await;
    let planned = worker.plan().await.expect("plan");
    assert_eq!((planned.alerts, planned.created), (1, 1));
    insert(2).await;
    let planned = worker.plan().await.expect("plan");
    assert_eq!((planned.created, planned.extended), (0, 1));
    assert_eq!(worker.plan().await.expect("plan again").alerts, 0);
    let rows = world.notifications().await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0].alert_ids, ["alert-1", "alert-2"]);
    assert_eq!(rows[0].generation, 0);
    let due = rows[0].next_attempt_at - rows[0].created_at;
    assert!(
        due > time::Duration::seconds(25),
        "due after group_wait: {due}"
    );

    // Once attempted, it keeps its alerts: a later alert of the cause starts generation 1.
    let far = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let claimed = world
        .store
        .claim_notifications(far, far, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    insert(3).await;
    let mut restarted = world.worker(world.store.clone());
    let planned = restarted.plan().await.expect("plan after restart");
    assert_eq!(
        (planned.alerts, planned.created, planned.extended),
        (1, 1, 0)
    );
    let rows = world.notifications().await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let next = rows
        .iter()
        .find(|r| r.generation == 1)
        .expect("generation 1");
    assert_eq!(next.alert_ids, ["alert-3"]);
    assert_ne!(next.id, rows[0].id);
    assert_eq!(restarted.plan().await.expect("plan").alerts, 0);
    assert_eq!(
        world.store.planned_seq().await.expect("cursor"),
        world.store.max_alert_seq().await.expect("max")
    );
}

/// With `group_wait`, alerts of one cause committed in separate transactions before the
/// notification is due arrive as one webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_wait_collects_later_alerts_of_the_cause() {
    let rx = Receiver::start(vec![]).await;
    let routes = webhook_route("hooks", &rx.url(), "[\"shared_key\"]", "4s");
    // Registering the deployments one by one raises shared_key alerts of the cause "registry".
    let one = registry_toml();
    let first_two: String = one
        .split("[[deployments]]")
        .filter(|s| !s.trim().is_empty())
        .take(2)
        .map(|s| format!("[[deployments]]{s}"))
        .collect();
    let mut world = World::new(
        &format!("{}\n{routes}", delivery_toml("1h", "2s")),
        None,
        &first_two,
    )
    .await;
    let worker = world.start().await;
    // A third deployment on the same key, registered in a later transaction.
    let third = keywatch::engine::validate_deployment(
        keywatch::engine::DeploymentSpec {
            crn: deployment_crn(3),
            name: "search-prod".into(),
            key: key_crn(KEY1),
            owners: vec![],
            labels: Default::default(),
            resources: vec![],
        },
        "test",
    )
    .expect("valid");
    let mut tx = world.store.begin().await.expect("begin");
    persist::sync(&mut tx, &mut world.engine, world.seq)
        .await
        .expect("sync");
    world.engine.register(vec![third]);
    persist::write(&mut tx, &mut world.engine, &[])
        .await
        .expect("write");
    world.seq = tx.commit().await.expect("commit");
    let rows = world.settled(1).await;
    worker.stop().await;
    assert_eq!(rows[0].alert_ids.len(), 3, "{rows:#?}");
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].body["deployments"].as_array().map(Vec::len),
        Some(3),
        "{}",
        got[0].body
    );
}

/// Two workers (two instances) on one fresh PostgreSQL database: every notification is
/// delivered exactly once, while alerts keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_postgresql_deliver_each_notification_once() {
    let db = FreshDatabase::create().await;
    let rx = Receiver::start(vec![]).await;
    let keys: Vec<String> = (0..30)
        .map(|i| format!("00000000-0000-0000-0000-0b25{i:08x}"))
        .collect();
    let registry: String = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            format!(
                "[[deployments]]\ncrn = \"{}\"\nname = \"es-{i}\"\nkey = \"{}\"\nowners = [\"o{i}@example.com\"]\n\n",
                deployment_crn(100 + i as u32),
                key_crn(key)
            )
        })
        .collect();
    let routes = webhook_route("hooks", &rx.url(), "[\"key_disabled\"]", "0s");
    let mut world = World::new(
        &format!("{}\n{routes}", delivery_toml("1h", "2s")),
        Some(&db.url),
        &registry,
    )
    .await;
    let a = world.start().await;
    let b = world.start().await;
    for (i, key) in keys.iter().enumerate() {
        world
            .apply(&[key_event(
                "kms.secrets.disable",
                key,
                &format!("2026-08-20T14:{:02}:00.00+0000", i % 60),
                &format!("c-{i}"),
            )])
            .await;
    }
    let rows = world.settled(keys.len()).await;
    a.stop().await;
    b.stop().await;
    assert!(
        rows.iter()
            .all(|r| r.status == "delivered" && r.attempts == 1),
        "{rows:#?}"
    );
    let per_id = rx.per_id();
    assert_eq!(per_id.len(), keys.len());
    assert!(
        per_id.values().all(|n| *n == 1),
        "delivered twice: {per_id:?}"
    );
    assert_eq!(
        world.metrics.count("webhook", "delivered"),
        keys.len() as u64
    );
    world.store.close().await;
}

/// `keywatch test-alert` through the binary: per channel `delivered` or the exact error, exit 0,
/// 2 when a channel failed, 1 for an unknown route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_alert_reports_every_channel() {
    let sink = SmtpSink::start(&[]);
    let good = Receiver::start(vec![]).await;
    let bad = Receiver::start(vec![Reply::Status(500, "receiver broken"); 10]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("keywatch.toml");
    let text = format!(
        "[store]\nurl = \"sqlite://{}/kw.db\"\n\n{}\n{}\n{}\n[[routes]]\nname = \"ops\"\nemail = [\"ops@example.com\", \"owners\"]\nwebhooks = [{{ url = \"{}\", secret = \"{}\" }}]\n\n{}",
        dir.path().display(),
        sink.toml(),
        delivery_toml("1h", "2s"),
        webhook_route("broken", &bad.url(), "[\"key_deleted\"]", "0s"),
        good.url(),
        secret(),
        registry_toml()
    );
    std::fs::write(&config, text).expect("write");
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_keywatch"))
                .args(args)
                .env_remove("KEYWATCH_CONFIG")
                .output()
                .expect("runs")
        })
    };
    let config_arg = config.display().to_string();
    let args = |route: &str| {
        vec![
            "test-alert".into(),
            "--config".into(),
            config_arg.clone(),
            "--route".into(),
            route.into(),
        ]
    };

    let ok = run(args("ops")).await.expect("join");
    let stdout = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    // ops@example.com, the owners alice, bob and carol, and the webhook.
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("route ops: ") && l.ends_with(": delivered")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.contains("email alice@example.com")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("path-token"),
        "webhook paths are not printed: {stdout}"
    );
    let mails = sink.messages();
    assert_eq!(mails.len(), 4);
    assert!(
        mails
            .iter()
            .all(|m| m.subject.starts_with("[INFO] test: ") && m.subject.contains("TEST")),
        "{mails:#?}"
    );
    let hooks = good.received();
    assert_eq!(hooks.len(), 1);
    assert!(hooks[0].verified);
    assert_eq!(hooks[0].body["test"], true);
    assert_eq!(hooks[0].body["kind"], "test");

    let failed = run(args("broken")).await.expect("join");
    let stdout = String::from_utf8_lossy(&failed.stdout).into_owned();
    assert_eq!(failed.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("route broken: webhook http://127.0.0.1:")
            && stdout.contains(": failed: HTTP 500 Internal Server Error: receiver broken"),
        "{stdout}"
    );

    let unknown = run(args("nope")).await.expect("join");
    let stderr = String::from_utf8_lossy(&unknown.stderr).into_owned();
    assert_eq!(unknown.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown route \"nope\"") && stderr.contains("\"ops\""),
        "{stderr}"
    );
}

// ------------------------------------------------------------------------------- PostgreSQL

/// A database of its own on the server of `KEYWATCH_TEST_POSTGRES`, dropped at the end.
struct FreshDatabase {
    url: String,
    admin: String,
    name: String,
}

impl FreshDatabase {
    async fn create() -> FreshDatabase {
        use sqlx::Connection;
        let admin = std::env::var("KEYWATCH_TEST_POSTGRES")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let mut parsed =
            reqwest::Url::parse(admin.trim()).expect("KEYWATCH_TEST_POSTGRES is a URL");
        if parsed.path().len() <= 1 {
            parsed.set_path("/postgres");
        }
        let admin = parsed.to_string();
        let name = format!("kw_delivery_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is not reachable ({e}); run the tests through scripts/test"));
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        conn.close().await.ok();
        parsed.set_path(&format!("/{name}"));
        FreshDatabase {
            url: parsed.to_string(),
            admin,
            name,
        }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}
