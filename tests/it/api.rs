//! The HTTP API of `keywatch run` from the outside (spec sections 5 and 7, issue 5): a real
//! service process on an ephemeral port with a temporary SQLite store, fed through the test broker.
//!
//! - `api_serves_the_state_of_the_public_cases`: several `tests/cases` scenarios at once (their
//!   event times shifted so that each case's `now` is the wall clock), published with
//!   `keywatch publish`; every read endpoint, every filter and its bad values, and `/metrics`
//!   (names, types, values; the scraped text is kept as `target/metrics-sample.txt`, which
//!   `deploy/check` runs `promtool check metrics` on).
//! - `api_registry_changes_need_the_token_and_go_through_the_engine`: PUT and DELETE, auth
//!   failures, bad and oversized bodies, `shared_key`, soft delete, and a restart.
//! - `api_deadlines_pass_on_the_clock_while_the_api_is_busy`: a rewrap deadline passing while the
//!   API is polled every 100 ms still makes the deployment overdue, with its alert.
//! - `api_without_a_token_or_a_broker`: 403 for changes when no token is configured, and `/readyz`
//!   503 with a JSON reason while no partition can be assigned.
//!
//! Needs the broker of `scripts/test` (`KEYWATCH_TEST_BROKERS`). Every wait polls a condition with
//! a deadline. Each test collects all its failed checks and reports them together.

use crate::service::harness::{brokers, create_topic, unique, wait_for};
use crate::support::repo;
use keywatch::timefmt::Millis;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "kw-api-test-token-6f1d";
const POLL: Duration = Duration::from_millis(100);

/// The cases that make up the world of the read test: every disk state, every rewrap state,
/// shared keys, a soft-deleted deployment, failed deletions, an expired key. No IAM cases: their
/// account-wide policies would reach into the other cases' deployments.
const WORLD: &[&str] = &[
    "disable-locks-every-deployment-on-key",
    "delete-then-purge",
    "key-deleted-info-for-soft-deleted-deployment",
    "rewrap-deadline-at-now",
    "ack-rotate-409-failed",
    "delete-blocked-by-protected-resources",
    "expire-keeps-disks-unlocked",
    "dual-auth-set-and-unset",
];

/// Spec section 7: every metric and its Prometheus type.
const SPEC_METRICS: &[(&str, &str)] = &[
    ("keywatch_events_total", "counter"),
    ("keywatch_key_events_total", "counter"),
    ("keywatch_deployments", "gauge"),
    ("keywatch_deployments_rewrap", "gauge"),
    ("keywatch_deployments_authorization", "gauge"),
    ("keywatch_rewrap_deadline_seconds", "gauge"),
    ("keywatch_alerts_total", "counter"),
    ("keywatch_notifications_total", "counter"),
    ("keywatch_outbox_pending", "gauge"),
    ("keywatch_event_processing_seconds", "histogram"),
    ("keywatch_event_age_seconds", "gauge"),
    ("keywatch_consumer_lag", "gauge"),
    ("keywatch_build_info", "gauge"),
];

// ------------------------------------------------------------------ environment

/// The cargo target directory (the binary is `<target>/<profile>/keywatch`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_keywatch"))
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

/// A port nothing listens on right now (the OS picks it; the listener is closed again).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Polls `probe` every 100 ms until it returns `Some` or `timeout` passes (then `None`).
fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

fn enc(crn: &str) -> String {
    utf8_percent_encode(crn, NON_ALPHANUMERIC).to_string()
}

/// Failed checks of one test, reported together at the end.
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(what());
        }
    }

    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.failures
                .push(format!("{what}: got {got:?}, expected {want:?}"));
        }
    }

    fn finish(self, service: &Service) {
        if !self.failures.is_empty() {
            panic!(
                "{} check(s) failed:\n- {}\n{}",
                self.failures.len(),
                self.failures.join("\n- "),
                service.log_tail(30)
            );
        }
    }
}

// ------------------------------------------------------------------ the service process

struct Service {
    child: Option<Child>,
    log: PathBuf,
    http: Http,
}

impl Service {
    fn start(config: &Path, log: &Path, port: u16) -> Service {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("service log file");
        let child = Command::new(env!("CARGO_BIN_EXE_keywatch"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("KEYWATCH_CONFIG")
            .env("KEYWATCH__LOG__LEVEL", "info,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("keywatch run starts");
        let s = Service {
            child: Some(child),
            log: log.to_path_buf(),
            http: Http::new(format!("http://127.0.0.1:{port}")),
        };
        // Up: /healthz answers 200.
        wait_for(
            "GET /healthz to answer 200",
            Duration::from_secs(30),
            || {
                s.assert_running();
                match s
                    .http
                    .try_send(reqwest::Method::GET, "/healthz", None, None)
                {
                    Ok(r) if r.status == 200 => Ok(r),
                    Ok(r) => Err(format!("status {}", r.status)),
                    Err(e) => Err(e.to_string()),
                }
            },
            || s.log_tail(30),
        );
        s
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- last {} lines of {} ---\n{}",
            all.len() - from,
            self.log.display(),
            all[from..].join("\n")
        )
    }

    fn assert_running(&self) {
        // try_wait needs &mut; a child that exited shows up as a closed port plus this check.
        if let Some(pid) = self.child.as_ref().map(Child::id) {
            let alive = Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ");
            assert!(
                alive,
                "keywatch run exited unexpectedly\n{}",
                self.log_tail(40)
            );
        }
    }

    /// Polls `/readyz` until 200; returns every distinct answer seen before (status, body).
    fn wait_ready(&self, timeout: Duration) -> Vec<Resp> {
        let mut before: Vec<Resp> = Vec::new();
        wait_for(
            "GET /readyz to answer 200",
            timeout,
            || {
                self.assert_running();
                let r = self.http.get("/readyz");
                if r.status == 200 {
                    return Ok(());
                }
                let observed = format!("{} {}", r.status, r.body);
                if !before
                    .iter()
                    .any(|b| b.status == r.status && b.body == r.body)
                {
                    before.push(r);
                }
                Err(observed)
            },
            || self.log_tail(30),
        );
        before
    }

    /// SIGTERM, then waits (with a deadline) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -TERM failed");
        let mut status = None;
        wait_for(
            "keywatch run to exit after SIGTERM",
            Duration::from_secs(30),
            || {
                status = child.try_wait().expect("try_wait");
                status.map(|_| ()).ok_or_else(|| "still running".to_owned())
            },
            || self.log_tail(30),
        );
        status.expect("exited")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

// ------------------------------------------------------------------ HTTP

struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    content_type: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): status {} content-type {:?}: {}",
                self.status, self.content_type, self.body
            )
        })
    }

    /// `None` when this is a JSON error `{"error": "..."}` with `status`; otherwise what is wrong.
    fn json_error_problem(&self, status: u16) -> Option<String> {
        let mut p = Vec::new();
        if self.status != status {
            p.push(format!("status {} (expected {status})", self.status));
        }
        if !self.content_type.starts_with("application/json") {
            p.push(format!("content-type {:?}", self.content_type));
        }
        match serde_json::from_str::<Value>(&self.body) {
            Ok(v) if v["error"].as_str().is_some_and(|e| !e.is_empty()) => {}
            _ => p.push(format!(
                "body is not {{\"error\": \"...\"}}: {:?}",
                self.body
            )),
        }
        (!p.is_empty()).then(|| p.join(", "))
    }
}

impl Http {
    fn new(base: String) -> Http {
        Http {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("client"),
            base,
        }
    }

    fn try_send(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Resp, reqwest::Error> {
        self.rt.block_on(async {
            let mut req = self.client.request(method, format!("{}{path}", self.base));
            if let Some(a) = auth {
                req = req.header(reqwest::header::AUTHORIZATION, a);
            }
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b);
            }
            let r = req.send().await?;
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = r.text().await?;
            Ok(Resp {
                status,
                content_type,
                body,
            })
        })
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Resp {
        let m = method.to_string();
        self.try_send(method, path, auth, body)
            .unwrap_or_else(|e| panic!("{m} {path}: {e}"))
    }

    fn get(&self, path: &str) -> Resp {
        self.send(reqwest::Method::GET, path, None, None)
    }

    fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    fn put(&self, path: &str, auth: Option<&str>, body: &Value) -> Resp {
        self.send(
            reqwest::Method::PUT,
            path,
            auth,
            Some(serde_json::to_vec(body).expect("json")),
        )
    }

    fn delete(&self, path: &str, auth: Option<&str>) -> Resp {
        self.send(reqwest::Method::DELETE, path, auth, None)
    }
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

// ------------------------------------------------------------------ configuration and events

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A `keywatch run` configuration: SQLite store in `dir`, the given registry.
fn service_config(
    dir: &Path,
    brokers: &str,
    topic: &str,
    port: u16,
    token: Option<&str>,
    deployments: Vec<toml::Value>,
) -> PathBuf {
    let mut text = format!(
        "[kafka]\nbrokers = {}\ntopic = {}\ngroup_id = {}\n\n[kafka.properties]\n\
         \"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\n\
         [store]\nurl = {}\n\n[http]\nlisten = {}\n",
        toml_str(brokers),
        toml_str(topic),
        toml_str(&unique("group")),
        toml_str(&format!("sqlite://{}", dir.join("keywatch.db").display())),
        toml_str(&format!("127.0.0.1:{port}")),
    );
    if let Some(t) = token {
        text.push_str(&format!("api_token = {}\n", toml_str(t)));
    }
    text.push_str(
        "\n[lifecycle]\nrewrap_deadline = \"4h\"\nsoft_delete_period = \"9d\"\nrestore_window = \"30d\"\n\n",
    );
    let mut registry = toml::Table::new();
    registry.insert("deployments".into(), toml::Value::Array(deployments));
    text.push_str(&toml::to_string(&registry).expect("registry as TOML"));
    let path = dir.join("keywatch.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The `[[deployments]]` of a case's config.toml, each labelled `case = <case>`.
fn case_deployments(case: &str) -> Vec<toml::Value> {
    let path = repo().join("tests/cases").join(case).join("config.toml");
    let text = std::fs::read_to_string(&path).expect("case config");
    let table: toml::Table = text.parse().expect("case config is TOML");
    let lifecycle = table
        .get("lifecycle")
        .cloned()
        .unwrap_or(toml::Value::Table(Default::default()));
    for (k, v) in [
        ("rewrap_deadline", "4h"),
        ("soft_delete_period", "9d"),
        ("restore_window", "30d"),
    ] {
        let got = lifecycle.get(k).and_then(toml::Value::as_str).unwrap_or(v);
        assert_eq!(
            got, v,
            "{case}: the world needs the default lifecycle settings"
        );
    }
    table["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| {
            let mut d = d.clone();
            let t = d.as_table_mut().expect("deployment table");
            let mut labels = t
                .get("labels")
                .and_then(|l| l.as_table().cloned())
                .unwrap_or_default();
            labels.insert("case".into(), toml::Value::String(case.to_owned()));
            t.insert("labels".into(), toml::Value::Table(labels));
            d
        })
        .collect()
}

/// A case moved in time: its events shifted so that the case's `now` (expect.json `now`, or the
/// latest eventTime) is `now`, and what the spec says about its deployments and alerts.
struct ShiftedCase {
    events: Vec<String>,
    /// crn -> field -> expected value (times shifted).
    deployments: BTreeMap<String, serde_json::Map<String, Value>>,
    /// (kind, severity, deployment)
    alerts: Option<Vec<(String, String, String)>>,
}

fn shift_case(case: &str, now: Millis) -> ShiftedCase {
    let folder = repo().join("tests/cases").join(case);
    let expect: Value = serde_json::from_str(
        &std::fs::read_to_string(folder.join("expect.json")).expect("expect.json"),
    )
    .expect("expect.json is JSON");
    let lines: Vec<String> = std::fs::read_to_string(folder.join("events.jsonl"))
        .expect("events.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let time_of = |l: &str| {
        serde_json::from_str::<Value>(l)
            .ok()
            .and_then(|v| v["eventTime"].as_str().and_then(Millis::parse))
    };
    let case_now = expect["now"]
        .as_str()
        .map(|t| Millis::parse(t).expect("expect.now"))
        .or_else(|| lines.iter().filter_map(|l| time_of(l)).max())
        .expect("a time in the case");
    let delta = now.0 - case_now.0;
    let events = lines
        .iter()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(mut v) => {
                if let Some(t) = v["eventTime"].as_str().and_then(Millis::parse) {
                    v["eventTime"] = json!(Millis(t.0 + delta).to_string());
                }
                serde_json::to_string(&v).expect("json")
            }
            Err(_) => l.clone(),
        })
        .collect();
    let deployments = expect["deployments"]
        .as_object()
        .expect("expect.deployments")
        .iter()
        .map(|(crn, fields)| {
            let mut f = fields.as_object().expect("fields").clone();
            for v in f.values_mut() {
                if let Some(t) = v.as_str().and_then(Millis::parse) {
                    *v = json!(Millis(t.0 + delta).to_string());
                }
            }
            (crn.clone(), f)
        })
        .collect();
    let alerts = expect["alerts"].as_array().map(|a| {
        a.iter()
            .map(|a| {
                (
                    a["kind"].as_str().unwrap_or_default().to_owned(),
                    a["severity"].as_str().unwrap_or_default().to_owned(),
                    a["deployment"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    });
    ShiftedCase {
        events,
        deployments,
        alerts,
    }
}

fn same_value(want: &Value, got: &Value) -> bool {
    if let (Some(w), Some(g)) = (want.as_str(), got.as_str()) {
        if let (Some(a), Some(b)) = (Millis::parse(w), Millis::parse(g)) {
            return a == b;
        }
    }
    want == got
}

fn run_keywatch(args: &[&str]) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .args(args)
        .env_remove("KEYWATCH_CONFIG")
        .output()
        .expect("keywatch runs");
    assert!(
        out.status.success(),
        "keywatch {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What `got` lacks and what it has too much of, compared with `want` (both sorted).
fn multiset_diff<T: Ord + Clone + std::fmt::Debug>(got: &[T], want: &[T]) -> String {
    let mut missing = want.to_vec();
    let mut extra = Vec::new();
    for g in got {
        match missing.iter().position(|w| w == g) {
            Some(i) => {
                missing.remove(i);
            }
            None => extra.push(g.clone()),
        }
    }
    format!("missing {missing:?}, unexpected {extra:?}")
}

fn alert_triples(alerts: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = alerts
        .as_array()
        .expect("alerts array")
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap_or_default().to_owned(),
                a["severity"].as_str().unwrap_or_default().to_owned(),
                a["deployment"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

// ------------------------------------------------------------------ Prometheus text format

#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Result<Scrape, String> {
        let mut s = Scrape::default();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (Some(name), Some(t)) = (it.next(), it.next()) else {
                    return Err(format!("line {n}: bad TYPE line {line:?}"));
                };
                if s.types.insert(name.to_owned(), t.to_owned()).is_some() {
                    return Err(format!("line {n}: second TYPE for {name}"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                s.helps.insert(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match line.find('{') {
                Some(i) => {
                    let (labels, after) = parse_labels(&line[i + 1..])
                        .map_err(|e| format!("line {n}: {e}: {line:?}"))?;
                    (&line[..i], labels, after)
                }
                None => {
                    let i = line
                        .find(' ')
                        .ok_or(format!("line {n}: no value: {line:?}"))?;
                    (&line[..i], BTreeMap::new(), &line[i..])
                }
            };
            let value = rest
                .split_whitespace()
                .next()
                .ok_or(format!("line {n}: no value"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .map_err(|_| format!("line {n}: bad value {v:?}"))?,
            };
            s.samples.push((name.to_owned(), labels, value));
        }
        Ok(s)
    }

    fn series(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l, *v))
            .collect()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }

    fn sum(&self, name: &str) -> f64 {
        self.series(name).iter().map(|(_, v)| v).sum()
    }
}

/// Parses `a="x",b="y"} rest`; returns the labels and the rest after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        if i < b.len() && b[i] == b'}' {
            return Ok((labels, &s[i + 1..]));
        }
        let start = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        let name = s[start..i].trim().to_owned();
        if i + 1 >= b.len() || b[i + 1] != b'"' {
            return Err("bad label".into());
        }
        i += 2;
        let mut value = String::new();
        loop {
            match b.get(i) {
                None => return Err("unterminated label value".into()),
                Some(b'"') => break,
                Some(b'\\') => {
                    match b.get(i + 1) {
                        Some(b'n') => value.push('\n'),
                        Some(b'\\') => value.push('\\'),
                        Some(b'"') => value.push('"'),
                        _ => return Err("bad escape".into()),
                    }
                    i += 2;
                }
                Some(_) => {
                    let c = s[i..].chars().next().expect("char");
                    value.push(c);
                    i += c.len_utf8();
                }
            }
        }
        i += 1;
        if labels.insert(name.clone(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
    }
}

/// Runs `promtool check metrics` on `text` when promtool is installed (deploy/check does it in CI
/// on the sample this test leaves behind). `Err` holds promtool's complaint.
fn promtool_check(text: &str) -> Option<Result<(), String>> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({}): {said}", out.status))
    })
}

// ------------------------------------------------------------------ the tests

/// What the world of the read test should look like, from the cases' expectations (the spec) and
/// from `keywatch replay` of the same events at the same `now` (the same engine, offline).
struct World {
    deployments: BTreeMap<String, serde_json::Map<String, Value>>,
    alerts: Vec<(String, String, String)>,
    replay: Value,
    records: usize,
    names: BTreeMap<String, String>,
    case_of: BTreeMap<String, String>,
}

fn build_world(dir: &Path, now: Millis, config: &Path) -> (World, PathBuf) {
    let mut deployments = BTreeMap::new();
    let mut alerts = Vec::new();
    let mut events = Vec::new();
    let mut names = BTreeMap::new();
    let mut case_of = BTreeMap::new();
    for case in WORLD {
        let c = shift_case(case, now);
        events.extend(c.events);
        deployments.extend(c.deployments);
        alerts.extend(
            c.alerts
                .unwrap_or_else(|| panic!("{case}: expect.json lists no alerts")),
        );
        for d in case_deployments(case) {
            let crn = d["crn"].as_str().expect("crn").to_owned();
            names.insert(
                crn.clone(),
                d.get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or(&crn)
                    .to_owned(),
            );
            case_of.insert(crn, case.to_string());
        }
    }
    alerts.sort();
    let path = dir.join("events.jsonl");
    std::fs::write(&path, events.join("\n") + "\n").expect("write events");
    let replay: Value = serde_json::from_slice(&run_keywatch(&[
        "replay",
        "--config",
        config.to_str().expect("utf-8 path"),
        "--now",
        &now.to_string(),
        path.to_str().expect("utf-8 path"),
    ]))
    .expect("replay prints JSON");
    (
        World {
            deployments,
            alerts,
            replay,
            records: events.len(),
            names,
            case_of,
        },
        path,
    )
}

/// Differences between the service's state (via the API) and the world; empty when it matches.
fn world_differences(http: &Http, world: &World) -> Vec<String> {
    let mut d = Vec::new();
    let list = http.get("/v1/deployments");
    if list.status != 200 {
        return vec![format!(
            "GET /v1/deployments: {} {}",
            list.status, list.body
        )];
    }
    let list = list.json();
    let by_crn: BTreeMap<String, Value> = list["deployments"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| (v["crn"].as_str().unwrap_or_default().to_owned(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (crn, fields) in &world.deployments {
        let Some(got) = by_crn.get(crn) else {
            d.push(format!("deployment {crn} missing"));
            continue;
        };
        for (k, v) in fields {
            if !same_value(v, &got[k]) {
                d.push(format!(
                    "{} ({}): {k} = {}, expected {v} (spec case)",
                    world.names[crn], world.case_of[crn], got[k]
                ));
            }
        }
    }
    let alerts = http.get("/v1/alerts?limit=1000");
    if alerts.status != 200 {
        d.push(format!("GET /v1/alerts: {} {}", alerts.status, alerts.body));
    } else {
        let got = alert_triples(&alerts.json()["alerts"]);
        if got != world.alerts {
            d.push(format!(
                "alerts differ from the cases': {}",
                multiset_diff(&got, &world.alerts)
            ));
        }
    }
    d
}

#[test]
fn api_serves_the_state_of_the_public_cases() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("world");
    // One partition: arrival order is publish order, so the alerts are those of the cases.
    create_topic(&brokers, &topic, 1);
    let port = free_port();
    let registry: Vec<toml::Value> = WORLD.iter().flat_map(|c| case_deployments(c)).collect();
    let config = service_config(dir.path(), &brokers, &topic, port, Some(TOKEN), registry);
    let now = Millis::now();
    let (world, events) = build_world(dir.path(), now, &config);
    let started = Instant::now();
    let service = Service::start(&config, &dir.path().join("service.log"), port);
    let http = &service.http;
    let mut c = Checks::default();

    // /readyz: 503 with a JSON reason until the partitions are assigned (when it can be seen: the
    // assignment may already be done by the first request), then 200.
    let not_ready = service.wait_ready(Duration::from_secs(60));
    for r in &not_ready {
        c.eq("/readyz before assignment: status", r.status, 503);
        let reason = serde_json::from_str::<Value>(&r.body).ok();
        c.check(
            reason
                .as_ref()
                .is_some_and(|v| v["reason"].as_str().is_some_and(|s| !s.is_empty())),
            || format!("/readyz 503 without a JSON reason: {:?}", r.body),
        );
    }
    eprintln!(
        "api: /readyz answers before 200: {:?}",
        not_ready.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    let ready = http.get("/readyz");
    c.check(ready.content_type.starts_with("application/json"), || {
        format!("/readyz content-type {:?}", ready.content_type)
    });
    c.check(
        ready.json()["partitions"]
            .as_array()
            .is_some_and(|p| p.contains(&json!(format!("{topic}/0")))),
        || format!("/readyz 200 does not list {topic}/0: {}", ready.body),
    );
    let h = http.get("/healthz");
    c.eq("/healthz status", h.status, 200);

    run_keywatch(&[
        "publish",
        "--config",
        config.to_str().expect("utf-8"),
        events.to_str().expect("utf-8"),
    ]);
    // Applied: every record counted, and the state and alerts of every case.
    // (Polled every 100 ms, like a busy dashboard: deadlines must still be evaluated.)
    let mut last = Vec::new();
    let reached = poll_until(Duration::from_secs(60), || {
        let m = Scrape::parse(&http.get("/metrics").body).ok()?;
        let counted = m.sum("keywatch_events_total") as usize;
        if counted < world.records {
            last = vec![format!("{counted} of {} records counted", world.records)];
            return None;
        }
        last = world_differences(http, &world);
        last.is_empty().then_some(())
    });
    if reached.is_none() {
        c.failures.push(format!(
            "60 s after publishing, the service does not hold the cases' state:\n  {}",
            last.join("\n  ")
        ));
    }
    eprintln!(
        "api: {} records published; cases' state reached: {}; {:.1} s after start",
        world.records,
        reached.is_some(),
        started.elapsed().as_secs_f64()
    );

    // ---- GET /v1/deployments equals `keywatch replay` of the same events at the same now
    let list = http.get_json("/v1/deployments");
    let got = list["deployments"].as_array().expect("deployments").clone();
    let want = world.replay["deployments"]
        .as_array()
        .expect("replay deployments");
    c.eq("number of deployments", got.len(), want.len());
    for w in want {
        let crn = w["crn"].as_str().expect("crn");
        match got.iter().find(|g| g["crn"] == w["crn"]) {
            None => c
                .failures
                .push(format!("{crn} missing from GET /v1/deployments")),
            Some(g) => {
                for (k, v) in w.as_object().expect("object") {
                    c.check(same_value(v, &g[k]), || {
                        format!("{crn}: {k} = {} in the API, {v} in replay", g[k])
                    });
                }
            }
        }
    }
    let view = |crn: &str| {
        want.iter()
            .find(|d| d["crn"] == crn)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let crns_where = |f: &dyn Fn(&Value) -> bool| -> BTreeSet<String> {
        want.iter()
            .filter(|d| f(d))
            .map(|d| d["crn"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let listed = |path: &str| -> Option<BTreeSet<String>> {
        let r = http.get(path);
        (r.status == 200).then(|| {
            r.json()["deployments"]
                .as_array()
                .expect("deployments")
                .iter()
                .map(|d| d["crn"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
    };
    // Every state the world is meant to show, so that the filters below are not vacuous.
    for (field, value) in [
        ("disk", "unlocked"),
        ("disk", "locked"),
        ("disk", "shredded"),
        ("disk", "purged"),
        ("rewrap", "current"),
        ("rewrap", "pending"),
        ("rewrap", "overdue"),
        ("rewrap", "failed"),
        ("lifecycle", "soft_deleted"),
    ] {
        c.check(!crns_where(&|d| d[field] == value).is_empty(), || {
            format!("the world has no deployment with {field} = {value}")
        });
    }
    for disk in ["unlocked", "locked", "shredded", "purged"] {
        c.eq(
            &format!("GET /v1/deployments?disk={disk}"),
            listed(&format!("/v1/deployments?disk={disk}")),
            Some(crns_where(&|d| d["disk"] == disk)),
        );
    }
    for rewrap in ["current", "pending", "overdue", "failed"] {
        c.eq(
            &format!("GET /v1/deployments?rewrap={rewrap}"),
            listed(&format!("/v1/deployments?rewrap={rewrap}")),
            Some(crns_where(&|d| d["rewrap"] == rewrap)),
        );
    }
    for case in WORLD {
        c.eq(
            &format!("GET /v1/deployments?label=case={case}"),
            listed(&format!(
                "/v1/deployments?label={}",
                enc(&format!("case={case}"))
            )),
            Some(
                world
                    .case_of
                    .iter()
                    .filter(|(_, c)| c == case)
                    .map(|(crn, _)| crn.clone())
                    .collect(),
            ),
        );
    }
    c.eq(
        "GET /v1/deployments?label=case=nothing",
        listed("/v1/deployments?label=case%3Dnothing"),
        Some(BTreeSet::new()),
    );
    // key filter: by CRN and by key id, alone and with a disk filter
    let keys = world.replay["keys"].as_array().expect("replay keys");
    let biggest = keys
        .iter()
        .max_by_key(|k| k["deployments"].as_array().map_or(0, Vec::len))
        .expect("a key");
    let key_crn = biggest["crn"].as_str().expect("key crn");
    let key_id = key_crn.rsplit(':').next().expect("key id");
    let on_key: BTreeSet<String> = biggest["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| d.as_str().unwrap_or_default().to_owned())
        .collect();
    c.check(on_key.len() >= 2, || {
        format!("the biggest key protects only {on_key:?}")
    });
    c.eq(
        "GET /v1/deployments?key=<key crn>",
        listed(&format!("/v1/deployments?key={}", enc(key_crn))),
        Some(on_key.clone()),
    );
    c.eq(
        "GET /v1/deployments?key=<key id>",
        listed(&format!("/v1/deployments?key={key_id}")),
        Some(on_key.clone()),
    );
    c.eq(
        "GET /v1/deployments?key=<key id>&disk=locked",
        listed(&format!("/v1/deployments?key={key_id}&disk=locked")),
        Some(
            on_key
                .iter()
                .filter(|d| view(d)["disk"] == "locked")
                .cloned()
                .collect(),
        ),
    );
    c.eq(
        "GET /v1/deployments?key=<unknown key id>",
        listed("/v1/deployments?key=00000000-dead-beef-0000-000000000000"),
        Some(BTreeSet::new()),
    );
    for bad in [
        "/v1/deployments?disk=melted",
        "/v1/deployments?disk=",
        "/v1/deployments?rewrap=late",
        "/v1/deployments?label=novalue",
        "/v1/deployments?disk=locked&disk=shredded",
    ] {
        let r = http.get(bad);
        if let Some(p) = r.json_error_problem(400) {
            c.failures.push(format!("GET {bad}: {p}"));
        }
    }

    // ---- GET /v1/deployments/{crn}: the view, the registry entry and the timeline
    for (crn, name) in &world.names {
        let r = http.get(&format!("/v1/deployments/{}", enc(crn)));
        if r.status != 200 {
            c.failures.push(format!(
                "GET /v1/deployments/<{crn}>: {} {}",
                r.status, r.body
            ));
            continue;
        }
        let v = r.json();
        for (k, want) in view(crn).as_object().expect("view") {
            c.check(same_value(want, &v[k]), || {
                format!(
                    "GET /v1/deployments/<{name}>: {k} = {}, expected {want}",
                    v[k]
                )
            });
        }
        c.eq(
            &format!("{name}: labels.case"),
            v["labels"]["case"].as_str(),
            Some(world.case_of[crn].as_str()),
        );
        c.check(v["owners"].is_array() && v["resources"].is_array(), || {
            format!("{name}: owners/resources missing: {v}")
        });
        c.check(v["timeline"].is_array(), || {
            format!("{name}: no timeline: {v}")
        });
    }
    // The timeline of a locked deployment holds the disable event, at its (shifted) time.
    let locked = crns_where(&|d| d["disk"] == "locked");
    let locked = locked.iter().next().expect("a locked deployment");
    let events_text = std::fs::read_to_string(&events).expect("events");
    let disable_time = events_text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| {
            e["action"] == "kms.secrets.disable"
                && view(locked)["key"].as_str().is_some_and(|k| {
                    k.ends_with(
                        e["target"]["id"]
                            .as_str()
                            .unwrap_or("?")
                            .rsplit(':')
                            .next()
                            .unwrap_or("?"),
                    )
                })
        })
        .and_then(|e| e["eventTime"].as_str().and_then(Millis::parse))
        .expect("the disable event of the locked deployment");
    // Only `/` encoded, as the spec puts it.
    let one = http.get(&format!("/v1/deployments/{}", locked.replace('/', "%2F")));
    c.eq("GET /v1/deployments/{crn with %2F only}", one.status, 200);
    let timeline = one.json()["timeline"].clone();
    c.check(
        timeline.as_array().is_some_and(|t| {
            t.iter().any(|e| {
                e["action"] == "kms.secrets.disable"
                    && e["time"].as_str().and_then(Millis::parse) == Some(disable_time)
            })
        }),
        || format!("timeline of {locked} lacks kms.secrets.disable at {disable_time}: {timeline}"),
    );
    for (path, what) in [
        (
            format!(
                "/v1/deployments/{}",
                enc("crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:99999999-0000-0000-0000-000000000000::")
            ),
            "unknown deployment",
        ),
        ("/v1/deployments/not-a-crn".to_owned(), "not a CRN"),
        (
            "/v1/deployments/crn:v1:bluemix:public:messagehub:us-south:a/unencoded::".to_owned(),
            "CRN with an unencoded /",
        ),
    ] {
        if let Some(p) = http.get(&path).json_error_problem(404) {
            c.failures.push(format!("GET {path} ({what}): {p}"));
        }
    }
    let bad_utf8 = "/v1/deployments/%FF%FE";
    let r = http.get(bad_utf8);
    if r.json_error_problem(400).is_some() && r.json_error_problem(404).is_some() {
        c.failures.push(format!(
            "GET {bad_utf8} (not UTF-8): expected a JSON error 400 or 404, got {} {:?} {:?}",
            r.status, r.content_type, r.body
        ));
    }

    // ---- GET /v1/keys/{key}: state and blast radius, by CRN and by key id
    for k in keys {
        let crn = k["crn"].as_str().expect("crn");
        let id = crn.rsplit(':').next().expect("id");
        let want_deps: BTreeSet<String> = k["deployments"]
            .as_array()
            .expect("deployments")
            .iter()
            .map(|d| d.as_str().unwrap_or_default().to_owned())
            .collect();
        for path in [format!("/v1/keys/{}", enc(crn)), format!("/v1/keys/{id}")] {
            let r = http.get(&path);
            if r.status != 200 {
                c.failures
                    .push(format!("GET {path}: {} {}", r.status, r.body));
                continue;
            }
            let v = r.json();
            c.eq(&format!("GET {path}: crn"), v["crn"].as_str(), Some(crn));
            c.eq(&format!("GET {path}: state"), &v["state"], &k["state"]);
            c.eq(
                &format!("GET {path}: blast_radius"),
                v["blast_radius"].as_u64(),
                Some(want_deps.len() as u64),
            );
            let deps = v["deployments"].as_array().cloned().unwrap_or_default();
            let got: BTreeSet<String> = deps
                .iter()
                .map(|d| d["crn"].as_str().unwrap_or_default().to_owned())
                .collect();
            c.eq(&format!("GET {path}: deployments"), &got, &want_deps);
            for d in &deps {
                let w = view(d["crn"].as_str().unwrap_or_default());
                for f in ["disk", "rewrap", "authorization", "lifecycle"] {
                    c.eq(&format!("GET {path}: {} {f}", d["crn"]), &d[f], &w[f]);
                }
            }
        }
    }
    // a shredded key shows restorable_until
    if let Some(k) = keys.iter().find(|k| k["state"] == "destroyed") {
        let v = http.get_json(&format!(
            "/v1/keys/{}",
            enc(k["crn"].as_str().unwrap_or_default())
        ));
        c.check(
            v["restorable_until"]
                .as_str()
                .and_then(Millis::parse)
                .is_some(),
            || format!("destroyed key without restorable_until: {v}"),
        );
    }
    for path in [
        "/v1/keys/00000000-dead-beef-0000-000000000000".to_owned(),
        format!(
            "/v1/keys/{}",
            enc("crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:99999999-0000-0000-0000-000000000001:key:99999999-0000-0000-0000-000000000002")
        ),
    ] {
        if let Some(p) = http.get(&path).json_error_problem(404) {
            c.failures.push(format!("GET {path} (unknown key): {p}"));
        }
    }

    // ---- GET /v1/alerts and its filters
    let all = http.get_json("/v1/alerts?limit=1000")["alerts"].clone();
    let all_list = all.as_array().expect("alerts").clone();
    c.eq("number of alerts", all_list.len(), world.alerts.len());
    for a in &all_list {
        c.check(!a["delivery"].is_null(), || {
            format!("alert without delivery status: {a}")
        });
        c.check(
            a["created_at"].as_str().and_then(Millis::parse).is_some(),
            || format!("alert without created_at: {a}"),
        );
    }
    let default_list = http.get_json("/v1/alerts")["alerts"]
        .as_array()
        .map_or(0, Vec::len);
    c.check(default_list > 0 && default_list <= all_list.len(), || {
        format!("GET /v1/alerts returned {default_list} alerts")
    });
    let kinds: BTreeSet<&str> = world.alerts.iter().map(|(k, _, _)| k.as_str()).collect();
    for kind in &kinds {
        let got =
            alert_triples(&http.get_json(&format!("/v1/alerts?kind={kind}&limit=1000"))["alerts"]);
        let want: Vec<_> = world
            .alerts
            .iter()
            .filter(|(k, _, _)| k == kind)
            .cloned()
            .collect();
        c.check(got == want, || {
            format!("GET /v1/alerts?kind={kind}: {}", multiset_diff(&got, &want))
        });
    }
    for sev in ["info", "warning", "critical"] {
        let got = alert_triples(
            &http.get_json(&format!("/v1/alerts?severity={sev}&limit=1000"))["alerts"],
        );
        let want: Vec<_> = world
            .alerts
            .iter()
            .filter(|(_, s, _)| s == sev)
            .cloned()
            .collect();
        c.check(got == want, || {
            format!(
                "GET /v1/alerts?severity={sev}: {}",
                multiset_diff(&got, &want)
            )
        });
    }
    let got = alert_triples(
        &http.get_json("/v1/alerts?kind=key_disabled&severity=critical&limit=1000")["alerts"],
    );
    let want_kd: Vec<_> = world
        .alerts
        .iter()
        .filter(|(k, s, _)| k == "key_disabled" && s == "critical")
        .cloned()
        .collect();
    c.eq(
        "GET /v1/alerts?kind=key_disabled&severity=critical",
        got,
        want_kd,
    );
    let newest = http.get_json("/v1/alerts?limit=1")["alerts"].clone();
    c.eq(
        "GET /v1/alerts?limit=1: count",
        newest.as_array().map_or(0, Vec::len),
        1,
    );
    c.eq(
        "GET /v1/alerts?limit=1: the newest",
        &newest[0],
        &all_list[0],
    );
    let two = http.get_json("/v1/alerts?limit=2")["alerts"].clone();
    c.eq(
        "GET /v1/alerts?limit=2",
        two.as_array().cloned().unwrap_or_default(),
        all_list[..2].to_vec(),
    );
    let past = now.0 - 3_600_000;
    let since_past = http.get_json(&format!(
        "/v1/alerts?since={}&limit=1000",
        enc(&Millis(past).to_string())
    ));
    c.eq(
        "GET /v1/alerts?since=<an hour ago>",
        since_past["alerts"].as_array().map_or(0, Vec::len),
        all_list.len(),
    );
    let future = Millis::now().0 + 3_600_000;
    let since_future = http.get_json(&format!(
        "/v1/alerts?since={}",
        enc(&Millis(future).to_string())
    ));
    c.eq(
        "GET /v1/alerts?since=<in an hour>",
        since_future["alerts"].as_array().map_or(99, Vec::len),
        0,
    );
    for bad in [
        "/v1/alerts?kind=key_melted",
        "/v1/alerts?severity=fatal",
        "/v1/alerts?since=yesterday",
        "/v1/alerts?limit=ten",
        "/v1/alerts?colour=red",
    ] {
        if let Some(p) = http.get(bad).json_error_problem(400) {
            c.failures.push(format!("GET {bad}: {p}"));
        }
    }

    // ---- unknown paths and methods: JSON errors too
    for (method, path, status) in [
        (reqwest::Method::GET, "/v2/deployments", 404),
        (reqwest::Method::GET, "/nothing/here", 404),
        (reqwest::Method::POST, "/v1/deployments", 405),
        (reqwest::Method::DELETE, "/v1/alerts", 405),
    ] {
        let r = http.send(method.clone(), path, Some(&bearer()), None);
        if let Some(p) = r.json_error_problem(status) {
            c.failures.push(format!("{method} {path}: {p}"));
        }
    }

    // ---- GET /: the status page names every deployment
    let page = http.get("/");
    c.eq("GET / status", page.status, 200);
    c.check(page.content_type.starts_with("text/html"), || {
        format!("GET / content-type {:?}", page.content_type)
    });
    for (crn, name) in &world.names {
        c.check(
            page.body.contains(name.as_str()) && page.body.contains(crn.as_str()),
            || format!("GET / does not show {name} ({crn})"),
        );
    }

    // ---- /metrics: Prometheus text, every metric of spec section 7 with its type and values
    // consumer lag comes from librdkafka statistics (every 5 s): wait for the first.
    let text = poll_until(Duration::from_secs(20), || {
        let text = http.get("/metrics").body;
        text.contains("\nkeywatch_consumer_lag{").then_some(text)
    });
    let text = text.unwrap_or_else(|| {
        c.failures.push(
            "no keywatch_consumer_lag series 20 s after the records were applied \
             (librdkafka statistics come every 5 s)"
                .into(),
        );
        http.get("/metrics").body
    });
    let metrics = http.get("/metrics");
    c.check(
        metrics
            .content_type
            .starts_with("text/plain; version=0.0.4"),
        || format!("/metrics content-type {:?}", metrics.content_type),
    );
    let sample = target_dir().join("metrics-sample.txt");
    std::fs::write(&sample, &text).expect("write the metrics sample");
    eprintln!("api: wrote {} ({} bytes)", sample.display(), text.len());
    match promtool_check(&text) {
        Some(Err(e)) => c.failures.push(e),
        Some(Ok(())) => eprintln!("api: promtool check metrics: ok"),
        None => eprintln!(
            "api: promtool not installed; deploy/check checks {}",
            sample.display()
        ),
    }
    let m = match Scrape::parse(&text) {
        Ok(m) => m,
        Err(e) => panic!("/metrics is not Prometheus text: {e}\n{text}"),
    };
    for (name, kind) in SPEC_METRICS {
        c.eq(
            &format!("# TYPE {name}"),
            m.types.get(*name).map(String::as_str),
            Some(*kind),
        );
        c.check(m.helps.contains(*name), || format!("{name} has no HELP"));
        let present = if *kind == "histogram" {
            !m.series(&format!("{name}_count")).is_empty()
        } else {
            !m.series(name).is_empty()
        };
        c.check(present, || format!("{name}: no sample"));
    }
    for (n, _, _) in &m.samples {
        c.check(n.starts_with("keywatch_"), || {
            format!("unexpected metric {n}")
        });
    }
    let stats = &world.replay["stats"];
    for (result, stat) in [
        ("applied", "applied"),
        ("ignored", "ignored"),
        ("duplicate", "duplicates"),
        ("invalid", "invalid"),
    ] {
        c.eq(
            &format!("keywatch_events_total{{result=\"{result}\"}}"),
            m.value("keywatch_events_total", &[("result", result)]),
            stats[stat].as_f64(),
        );
    }
    c.eq(
        "keywatch_events_total sum",
        m.sum("keywatch_events_total"),
        world.records as f64,
    );
    let active: Vec<&Value> = want.iter().filter(|d| d["lifecycle"] == "active").collect();
    for (metric, label, field, values) in [
        (
            "keywatch_deployments",
            "disk",
            "disk",
            &["unlocked", "locked", "shredded", "purged"][..],
        ),
        (
            "keywatch_deployments_rewrap",
            "state",
            "rewrap",
            &["current", "pending", "overdue", "failed"][..],
        ),
        (
            "keywatch_deployments_authorization",
            "state",
            "authorization",
            &["ok", "revoked"][..],
        ),
    ] {
        for v in values {
            let n = active.iter().filter(|d| d[field] == *v).count() as f64;
            c.eq(
                &format!("{metric}{{{label}=\"{v}\"}}"),
                m.value(metric, &[(label, v)]),
                Some(n),
            );
        }
        c.eq(
            &format!("{metric}: label sets"),
            m.series(metric).len(),
            values.len(),
        );
    }
    let deadlines = m.series("keywatch_rewrap_deadline_seconds");
    let with_deadline: BTreeSet<String> = active
        .iter()
        .filter(|d| !d["rewrap_deadline_at"].is_null())
        .map(|d| d["crn"].as_str().unwrap_or_default().to_owned())
        .collect();
    let labelled: BTreeSet<String> = deadlines
        .iter()
        .map(|(l, _)| l.get("deployment").cloned().unwrap_or_default())
        .collect();
    c.eq(
        "keywatch_rewrap_deadline_seconds: deployments",
        &labelled,
        &with_deadline,
    );
    let scraped_at = Millis::now();
    for (l, v) in &deadlines {
        let crn = l.get("deployment").cloned().unwrap_or_default();
        let d = view(&crn);
        let at = d["rewrap_deadline_at"].as_str().and_then(Millis::parse);
        if let Some(at) = at {
            let left = scraped_at.seconds_until(at);
            c.check((v - left).abs() < 120.0, || {
                format!("keywatch_rewrap_deadline_seconds{{deployment={crn}}} = {v}, expected about {left}")
            });
            c.check(
                (d["rewrap"] == "overdue" && *v < 0.0) || (d["rewrap"] == "pending" && *v > 0.0),
                || format!("deadline gauge {v} for a {} deployment", d["rewrap"]),
            );
        }
    }
    let mut alert_counts: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (k, s, _) in &world.alerts {
        *alert_counts.entry((k.clone(), s.clone())).or_default() += 1.0;
    }
    for ((k, s), n) in &alert_counts {
        c.eq(
            &format!("keywatch_alerts_total{{kind=\"{k}\",severity=\"{s}\"}}"),
            m.value("keywatch_alerts_total", &[("kind", k), ("severity", s)]),
            Some(*n),
        );
    }
    c.eq(
        "keywatch_alerts_total sum",
        m.sum("keywatch_alerts_total"),
        world.alerts.len() as f64,
    );
    let key_actions = [
        "disable",
        "enable",
        "delete",
        "restore",
        "purge",
        "expire",
        "setkeyfordeletion",
        "unsetkeyfordeletion",
        "rotate",
        "ack-rotate",
        "ack-delete",
        "ack-restore",
        "ack-enable",
        "ack-disable",
    ];
    for (l, _) in m.series("keywatch_key_events_total") {
        let a = l.get("action").cloned().unwrap_or_default();
        c.check(key_actions.contains(&a.as_str()), || {
            format!("keywatch_key_events_total{{action={a:?}}}")
        });
    }
    for action in [
        "disable",
        "delete",
        "purge",
        "rotate",
        "expire",
        "setkeyfordeletion",
        "unsetkeyfordeletion",
    ] {
        c.check(
            m.value("keywatch_key_events_total", &[("action", action)])
                .unwrap_or(0.0)
                >= 1.0,
            || format!("keywatch_key_events_total{{action=\"{action}\"}} missing"),
        );
    }
    c.check(
        m.sum("keywatch_key_events_total") <= stats["applied"].as_f64().unwrap_or(0.0),
        || "more key events than applied events".into(),
    );
    for channel in ["email", "webhook"] {
        for result in ["delivered", "retried", "failed"] {
            c.eq(
                &format!(
                    "keywatch_notifications_total{{channel=\"{channel}\",result=\"{result}\"}}"
                ),
                m.value(
                    "keywatch_notifications_total",
                    &[("channel", channel), ("result", result)],
                ),
                Some(0.0),
            );
        }
    }
    c.eq(
        "keywatch_outbox_pending",
        m.value("keywatch_outbox_pending", &[]),
        Some(0.0),
    );
    let count = m.value("keywatch_event_processing_seconds_count", &[]);
    c.eq(
        "keywatch_event_processing_seconds_count",
        count,
        Some(world.records as f64),
    );
    let buckets = m.series("keywatch_event_processing_seconds_bucket");
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(l, v)| {
            let le = l.get("le").cloned().unwrap_or_default();
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                },
                *v,
            )
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    c.check(bounds.len() >= 8, || {
        format!("only {} histogram buckets", bounds.len())
    });
    c.check(bounds.windows(2).all(|w| w[0].1 <= w[1].1), || {
        "histogram buckets not cumulative".into()
    });
    c.eq("+Inf bucket", bounds.last().map(|b| b.1), count);
    let sum = m
        .value("keywatch_event_processing_seconds_sum", &[])
        .unwrap_or(-1.0);
    c.check(sum >= 0.0 && sum < 60.0 * world.records as f64, || {
        format!("processing sum {sum}")
    });
    let age = m.value("keywatch_event_age_seconds", &[]).unwrap_or(-1.0);
    c.check((0.0..86_400.0).contains(&age), || {
        format!("keywatch_event_age_seconds = {age}")
    });
    c.eq(
        "keywatch_consumer_lag{partition=\"0\"}",
        m.value("keywatch_consumer_lag", &[("partition", "0")]),
        Some(0.0),
    );
    c.eq(
        "keywatch_build_info",
        m.value(
            "keywatch_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        ),
        Some(1.0),
    );
    eprintln!(
        "api: read test done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    c.finish(&service);
}

#[test]
fn api_registry_changes_need_the_token_and_go_through_the_engine() {
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("registry");
    create_topic(&brokers, &topic, 1);
    let port = free_port();
    let configured = case_deployments("disable-then-enable");
    let configured_crn = configured[0]["crn"].as_str().expect("crn").to_owned();
    let config = service_config(dir.path(), &brokers, &topic, port, Some(TOKEN), configured);
    let log = dir.path().join("service.log");
    let mut service = Service::start(&config, &log, port);
    service.wait_ready(Duration::from_secs(60));
    let http = &service.http;
    let mut c = Checks::default();

    let acc = "f047b55a3362ac06afad8a3f2f5586ea";
    let new1 = format!(
        "crn:v1:bluemix:public:messagehub:us-south:a/{acc}:1a1a1a1a-0000-4000-8000-000000000001::"
    );
    let new2 = format!(
        "crn:v1:bluemix:public:messagehub:us-south:a/{acc}:1a1a1a1a-0000-4000-8000-000000000002::"
    );
    let key = format!("crn:v1:bluemix:public:kms:us-south:a/{acc}:1a1a1a1a-0000-4000-8000-0000000000aa:key:1a1a1a1a-0000-4000-8000-0000000000bb");
    let path1 = format!("/v1/deployments/{}", enc(&new1));
    let path2 = format!("/v1/deployments/{}", enc(&new2));
    let body1 = json!({ "name": "orders-prod", "key": key, "owners": ["orders@example.com"],
                        "labels": { "env": "prod", "team": "orders" } });

    // ---- authentication: missing, wrong scheme, wrong token; checked before the body
    let wrong_token = format!("Bearer {TOKEN}x");
    let short_token = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    for (auth, what) in [
        (None, "no Authorization"),
        (Some(format!("Basic {TOKEN}")), "Basic scheme"),
        (Some(TOKEN.to_owned()), "token without scheme"),
        (Some(wrong_token.clone()), "wrong token"),
        (Some(short_token), "prefix of the token"),
        (Some("Bearer ".to_owned()), "empty token"),
    ] {
        let r = http.put(&path1, auth.as_deref(), &body1);
        if let Some(p) = r.json_error_problem(401) {
            c.failures.push(format!("PUT with {what}: {p}"));
        }
        let r = http.delete(
            &format!("/v1/deployments/{}", enc(&configured_crn)),
            auth.as_deref(),
        );
        if let Some(p) = r.json_error_problem(401) {
            c.failures.push(format!("DELETE with {what}: {p}"));
        }
    }
    let r = http.send(
        reqwest::Method::PUT,
        &path1,
        Some(&wrong_token),
        Some(b"not json".to_vec()),
    );
    if let Some(p) = r.json_error_problem(401) {
        c.failures
            .push(format!("PUT with a wrong token and a bad body: {p}"));
    }
    c.eq(
        "GET unauthenticated PUT target",
        http.get(&path1).status,
        404,
    );

    // ---- register (201), read back, update (200)
    let r = http.put(&path1, Some(&bearer()), &body1);
    c.eq("PUT new deployment: status", r.status, 201);
    if r.status == 201 {
        c.eq(
            "PUT new deployment: created",
            &r.json()["created"],
            &json!(true),
        );
    }
    let v = http.get_json(&path1);
    c.eq("registered name", v["name"].as_str(), Some("orders-prod"));
    c.eq("registered key", v["key"].as_str(), Some(key.as_str()));
    c.eq(
        "registered labels",
        &v["labels"],
        &json!({ "env": "prod", "team": "orders" }),
    );
    c.eq(
        "registered owners",
        &v["owners"],
        &json!(["orders@example.com"]),
    );
    for (f, want) in [
        ("lifecycle", "active"),
        ("disk", "unlocked"),
        ("rewrap", "current"),
        ("authorization", "ok"),
    ] {
        c.eq(&format!("registered {f}"), v[f].as_str(), Some(want));
    }
    let by_label = http.get_json("/v1/deployments?label=env%3Dprod")["deployments"].clone();
    c.eq(
        "GET ?label=env=prod",
        by_label
            .as_array()
            .map(|a| a.iter().map(|d| d["crn"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(new1)]),
    );
    let mut body1b = body1.clone();
    body1b["name"] = json!("orders-prod-eu");
    body1b["crn"] = json!(new1);
    let r = http.put(&path1, Some(&bearer()), &body1b);
    c.eq("PUT existing deployment: status", r.status, 200);
    if r.status == 200 {
        c.eq(
            "PUT existing deployment: created",
            &r.json()["created"],
            &json!(false),
        );
    }
    c.eq(
        "updated name",
        http.get_json(&path1)["name"].as_str(),
        Some("orders-prod-eu"),
    );
    c.eq(
        "no shared_key alert for a key with one deployment",
        http.get_json("/v1/alerts?kind=shared_key")["alerts"]
            .as_array()
            .map_or(99, Vec::len),
        0,
    );

    // ---- a second deployment on the same key: shared_key for both, blast radius 2
    let r = http.put(
        &path2,
        Some(&bearer()),
        &json!({ "name": "orders-dr", "key": key }),
    );
    c.eq("PUT second deployment on the key", r.status, 201);
    let shared = alert_triples(&http.get_json("/v1/alerts?kind=shared_key")["alerts"]);
    let mut want = vec![
        ("shared_key".to_owned(), "warning".to_owned(), new1.clone()),
        ("shared_key".to_owned(), "warning".to_owned(), new2.clone()),
    ];
    want.sort();
    c.eq("shared_key alerts after the second PUT", shared, want);
    let k = http.get_json(&format!("/v1/keys/{}", enc(&key)));
    c.eq(
        "blast radius of the shared key",
        k["blast_radius"].as_u64(),
        Some(2),
    );
    let k = http.get_json("/v1/keys/1a1a1a1a-0000-4000-8000-0000000000bb");
    c.eq(
        "blast radius of the shared key (by id)",
        k["blast_radius"].as_u64(),
        Some(2),
    );

    // ---- bad bodies and paths: 400 (413 when too large), and nothing registered
    let count_before = http.get_json("/v1/deployments")["deployments"]
        .as_array()
        .map_or(0, Vec::len);
    let new3 = format!(
        "crn:v1:bluemix:public:messagehub:us-south:a/{acc}:1a1a1a1a-0000-4000-8000-000000000003::"
    );
    let path3 = format!("/v1/deployments/{}", enc(&new3));
    let bad_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"not json".to_vec()),
        ("empty body", Vec::new()),
        ("a JSON array", b"[]".to_vec()),
        ("no key", br#"{"name": "x"}"#.to_vec()),
        (
            "unknown field",
            serde_json::to_vec(&json!({ "key": key, "colour": "red" })).unwrap(),
        ),
        ("key is not a CRN", br#"{"key": "not-a-crn"}"#.to_vec()),
        (
            "key CRN of a deployment",
            serde_json::to_vec(&json!({ "key": new1 })).unwrap(),
        ),
        ("key with a number", br#"{"key": 42}"#.to_vec()),
        (
            "crn differs from the path",
            serde_json::to_vec(&json!({ "key": key, "crn": new1 })).unwrap(),
        ),
        (
            "owner without @",
            serde_json::to_vec(&json!({ "key": key, "owners": ["nobody"] })).unwrap(),
        ),
        (
            "resource not a CRN",
            serde_json::to_vec(&json!({ "key": key, "resources": ["volume-1"] })).unwrap(),
        ),
    ];
    for (what, body) in bad_bodies {
        let r = http.send(reqwest::Method::PUT, &path3, Some(&bearer()), Some(body));
        if let Some(p) = r.json_error_problem(400) {
            c.failures.push(format!("PUT with {what}: {p}"));
        }
    }
    let r = http.put(
        "/v1/deployments/not-a-crn",
        Some(&bearer()),
        &json!({ "key": key }),
    );
    if let Some(p) = r.json_error_problem(400) {
        c.failures
            .push(format!("PUT /v1/deployments/not-a-crn: {p}"));
    }
    let big = json!({ "key": key, "name": "x".repeat(100 * 1024) });
    let r = http.put(&path3, Some(&bearer()), &big);
    if let Some(p) = r.json_error_problem(413) {
        c.failures.push(format!("PUT with a 100 KiB body: {p}"));
    }
    c.eq(
        "deployments after the refused PUTs",
        http.get_json("/v1/deployments")["deployments"]
            .as_array()
            .map_or(0, Vec::len),
        count_before,
    );
    c.eq("GET the refused deployment", http.get(&path3).status, 404);

    // ---- DELETE: unknown 404, soft delete with purge_at = now + soft_delete_period
    let unknown = format!("/v1/deployments/{}", enc(&new3));
    if let Some(p) = http
        .delete(&unknown, Some(&bearer()))
        .json_error_problem(404)
    {
        c.failures.push(format!("DELETE unknown deployment: {p}"));
    }
    let before = Millis::now();
    let r = http.delete(&path2, Some(&bearer()));
    let after = Millis::now();
    c.eq("DELETE: status", r.status, 200);
    if r.status == 200 {
        c.eq(
            "DELETE: lifecycle",
            r.json()["lifecycle"].as_str(),
            Some("soft_deleted"),
        );
    }
    let v = http.get_json(&path2);
    c.eq(
        "soft-deleted lifecycle",
        v["lifecycle"].as_str(),
        Some("soft_deleted"),
    );
    let nine_days = Duration::from_secs(9 * 86_400);
    let purge_at = v["purge_at"].as_str().and_then(Millis::parse);
    c.check(
        purge_at.is_some_and(|p| {
            p >= Millis(before.plus(nine_days).0 - 1000) && p <= after.plus(nine_days)
        }),
        || {
            format!(
                "purge_at = {:?}, expected between {} and {}",
                v["purge_at"],
                before.plus(nine_days),
                after.plus(nine_days)
            )
        },
    );
    let soft = alert_triples(&http.get_json("/v1/alerts?kind=deployment_soft_deleted")["alerts"]);
    c.eq(
        "deployment_soft_deleted alert",
        soft,
        vec![(
            "deployment_soft_deleted".to_owned(),
            "info".to_owned(),
            new2.clone(),
        )],
    );
    let kept_active = http.get_json(&path1);
    c.eq(
        "the other deployment stays active",
        kept_active["lifecycle"].as_str(),
        Some("active"),
    );

    // ---- a restart keeps what the API changed (it is in the store)
    let status = service.terminate();
    c.check(status.success(), || {
        format!("keywatch run exited with {status} on SIGTERM")
    });
    let service2 = Service::start(&config, &log, port);
    service2.wait_ready(Duration::from_secs(60));
    let http = &service2.http;
    let v = http.get(&path1);
    c.eq("after restart: GET registered deployment", v.status, 200);
    if v.status == 200 {
        let v = v.json();
        c.eq(
            "after restart: name",
            v["name"].as_str(),
            Some("orders-prod-eu"),
        );
        c.eq(
            "after restart: labels",
            &v["labels"],
            &json!({ "env": "prod", "team": "orders" }),
        );
    }
    let v = http.get(&path2);
    c.eq("after restart: GET soft-deleted deployment", v.status, 200);
    if v.status == 200 {
        c.eq(
            "after restart: soft-deleted",
            v.json()["lifecycle"].as_str(),
            Some("soft_deleted"),
        );
    }
    c.eq(
        "after restart: shared_key alerts are not raised again",
        http.get_json("/v1/alerts?kind=shared_key")["alerts"]
            .as_array()
            .map_or(0, Vec::len),
        2,
    );
    c.eq(
        "after restart: the configured deployment",
        http.get(&format!("/v1/deployments/{}", enc(&configured_crn)))
            .status,
        200,
    );
    c.finish(&service2);
}

#[test]
fn api_deadlines_pass_on_the_clock_while_the_api_is_busy() {
    // A rewrap deadline that passes after the last record was processed, while the API is polled
    // every 100 ms (a busy dashboard): `run` evaluates deadlines on the wall clock (spec section
    // 3), so the deployment turns overdue, with its alert, a few seconds after the deadline.
    let brokers = brokers();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("clock");
    create_topic(&brokers, &topic, 1);
    let port = free_port();
    let case = "rewrap-deadline-at-now";
    let registry = case_deployments(case);
    let config = service_config(
        dir.path(),
        &brokers,
        &topic,
        port,
        Some(TOKEN),
        registry.clone(),
    );
    let service = Service::start(&config, &dir.path().join("service.log"), port);
    service.wait_ready(Duration::from_secs(60));
    let http = &service.http;
    let mut c = Checks::default();

    // The case's first rotation, moved so that its 4 h deadline is 10 s from now.
    let text = std::fs::read_to_string(repo().join("tests/cases").join(case).join("events.jsonl"))
        .expect("events");
    let mut rotation: Value =
        serde_json::from_str(text.lines().next().expect("a record")).expect("json");
    let due = Millis(Millis::now().0 + 10_000);
    rotation["eventTime"] = json!(Millis(due.0 - 4 * 3_600_000).to_string());
    let key_id = rotation["target"]["id"]
        .as_str()
        .and_then(|k| k.rsplit(':').next())
        .expect("key id")
        .to_owned();
    let crn = registry
        .iter()
        .find(|d| d["key"].as_str().is_some_and(|k| k.ends_with(&key_id)))
        .and_then(|d| d["crn"].as_str())
        .expect("the deployment on the rotated key")
        .to_owned();
    let path = dir.path().join("rotation.jsonl");
    std::fs::write(
        &path,
        serde_json::to_string(&rotation).expect("json") + "\n",
    )
    .expect("write");
    run_keywatch(&[
        "publish",
        "--config",
        config.to_str().expect("utf-8"),
        path.to_str().expect("utf-8"),
    ]);
    let one = format!("/v1/deployments/{}", enc(&crn));
    let rewrap = || {
        http.get_json(&one)["rewrap"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let pending = poll_until(Duration::from_secs(30), || {
        (rewrap() == "pending").then_some(())
    });
    c.check(pending.is_some() && Millis::now() < due, || {
        format!(
            "not seen pending before the deadline {due} (now {}): {}",
            Millis::now(),
            rewrap()
        )
    });
    let overdue = poll_until(Duration::from_secs(40), || {
        (rewrap() == "overdue").then(Millis::now)
    });
    match overdue {
        None => c.failures.push(format!(
            "still {:?} 40 s after a deadline 10 s away, with the API polled every 100 ms \
             (deadlines are not evaluated while HTTP requests keep coming?)",
            rewrap()
        )),
        Some(at) => {
            let late = due.seconds_until(at);
            eprintln!("api: overdue {late:.1} s after the deadline");
            c.check(late <= 15.0, || {
                format!("overdue only {late:.1} s after the deadline")
            });
            let alerts = alert_triples(&http.get_json("/v1/alerts?kind=rewrap_overdue")["alerts"]);
            c.eq(
                "rewrap_overdue alerts",
                alerts,
                vec![(
                    "rewrap_overdue".to_owned(),
                    "warning".to_owned(),
                    crn.clone(),
                )],
            );
            let m = Scrape::parse(&http.get("/metrics").body).expect("metrics parse");
            let left = m.value("keywatch_rewrap_deadline_seconds", &[("deployment", &crn)]);
            c.check(left.is_some_and(|v| v < 0.0), || {
                format!("keywatch_rewrap_deadline_seconds for the overdue deployment: {left:?}")
            });
        }
    }
    c.finish(&service);
}

#[test]
fn api_without_a_token_or_a_broker() {
    // No broker listens on this port: the service runs, serves its store, and is never ready.
    let brokers = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let configured = case_deployments("disable-locks-every-deployment-on-key");
    let crns: BTreeSet<String> = configured
        .iter()
        .map(|d| d["crn"].as_str().expect("crn").to_owned())
        .collect();
    let config = service_config(
        dir.path(),
        &brokers,
        "activity-tracker",
        port,
        None,
        configured,
    );
    let service = Service::start(&config, &dir.path().join("service.log"), port);
    let http = &service.http;
    let mut c = Checks::default();

    c.eq("/healthz", http.get("/healthz").status, 200);
    // Not ready: the store is there, but no partition can be assigned. (Polled until the engine
    // has started, so that the reason is the consumer's and not the start-up's.)
    let listed = wait_for(
        "GET /v1/deployments to answer 200",
        Duration::from_secs(30),
        || {
            let r = http.get("/v1/deployments");
            if r.status == 200 {
                Ok(r.json())
            } else {
                Err(format!("status {}", r.status))
            }
        },
        || service.log_tail(20),
    );
    let got: BTreeSet<String> = listed["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| d["crn"].as_str().unwrap_or_default().to_owned())
        .collect();
    c.eq("deployments served without a broker", &got, &crns);
    let r = http.get("/readyz");
    c.eq("/readyz without a broker: status", r.status, 503);
    c.check(r.content_type.starts_with("application/json"), || {
        format!("/readyz content-type {:?}", r.content_type)
    });
    let reason = serde_json::from_str::<Value>(&r.body).ok();
    c.check(
        reason
            .as_ref()
            .and_then(|v| v["reason"].as_str())
            .is_some_and(|s| s.contains("partition")),
        || {
            format!(
                "/readyz 503 reason does not name the missing assignment: {}",
                r.body
            )
        },
    );
    // No api_token configured: changes are refused with 403, whatever the request carries.
    let crn = crns.iter().next().expect("a deployment");
    for auth in [None, Some(bearer()), Some("Bearer ".to_owned())] {
        let r = http.put(
            &format!("/v1/deployments/{}", enc(crn)),
            auth.as_deref(),
            &json!({ "key": "x" }),
        );
        if let Some(p) = r.json_error_problem(403) {
            c.failures
                .push(format!("PUT without a configured token ({auth:?}): {p}"));
        }
        let r = http.delete(&format!("/v1/deployments/{}", enc(crn)), auth.as_deref());
        if let Some(p) = r.json_error_problem(403) {
            c.failures
                .push(format!("DELETE without a configured token ({auth:?}): {p}"));
        }
    }
    c.eq(
        "deployment still active after the refused DELETE",
        http.get_json(&format!("/v1/deployments/{}", enc(crn)))["lifecycle"].as_str(),
        Some("active"),
    );
    // Metrics are served (and parse) before any record arrives.
    let m = http.get("/metrics");
    c.eq("/metrics without a broker", m.status, 200);
    match Scrape::parse(&m.body) {
        Ok(s) => {
            c.eq(
                "events counted without a broker",
                s.sum("keywatch_events_total"),
                0.0,
            );
            c.eq(
                "keywatch_deployments{disk=\"unlocked\"}",
                s.value("keywatch_deployments", &[("disk", "unlocked")]),
                Some(crns.len() as f64),
            );
        }
        Err(e) => c.failures.push(format!("/metrics does not parse: {e}")),
    }
    if let Some(Err(e)) = promtool_check(&m.body) {
        c.failures.push(format!("before any record: {e}"));
    }
    c.finish(&service);
}
