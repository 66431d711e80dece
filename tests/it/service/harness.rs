//! What the service tests share: the test services (broker, PostgreSQL) from the environment,
//! per-test topics, groups and databases, a guard around a running `keywatch run`, the other
//! commands (`status`, `replay`, `publish`), Kafka helpers and report comparisons.

use keywatch::timefmt::Millis;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// librdkafka settings every test client uses against tansu (its group join is slow otherwise).
pub const SESSION_TIMEOUT_MS: &str = "6000";
pub const HEARTBEAT_INTERVAL_MS: &str = "1000";

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------ environment

/// The broker started by scripts/test. Unset: the test fails (never passes silently).
pub fn brokers() -> String {
    match std::env::var("KEYWATCH_TEST_BROKERS") {
        Ok(b) if !b.trim().is_empty() => b.trim().to_owned(),
        _ => panic!(
            "KEYWATCH_TEST_BROKERS is not set: the service tests need a Kafka-protocol broker. \
             Run them through scripts/test (it starts the tansu broker and exports it), or by hand: \
             scripts/install-tools && scripts/broker start && export KEYWATCH_TEST_BROKERS=127.0.0.1:19092"
        ),
    }
}

/// The PostgreSQL server exported by scripts/test (an admin URL; tests create their own database).
pub fn postgres_admin_url() -> String {
    match std::env::var("KEYWATCH_TEST_POSTGRES") {
        Ok(u) if !u.trim().is_empty() => u.trim().to_owned(),
        _ => panic!(
            "KEYWATCH_TEST_POSTGRES is not set: the scale-out test needs PostgreSQL. Run the tests \
             through scripts/test (it exports postgres://postgres@127.0.0.1:5432/postgres)"
        ),
    }
}

/// A name no other test (or earlier run) uses: `kw-it-<tag>-<pid>-<ms>-<n>`.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "kw-it-{tag}-{}-{ms}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub use crate::support::repo;

/// Prints how long a test took when it ends (shown with `--nocapture`).
pub struct Timing(pub &'static str, pub Instant);

impl Timing {
    pub fn start(name: &'static str) -> Timing {
        Timing(name, Instant::now())
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        eprintln!("{}: {:.1?}", self.0, self.1.elapsed());
    }
}

// ------------------------------------------------------------------ waiting

/// Polls `probe` until it returns `Ok`, or panics after `timeout` naming `what`, the last `Err`
/// (what was observed instead) and the text `context` gives (service logs).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe() {
            Ok(v) => return v,
            Err(observed) => observed,
        };
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\nlast observed: {last}\n{}",
                context()
            );
        }
        std::thread::sleep(POLL);
    }
}

// ------------------------------------------------------------------ topics

/// Creates a topic on the test broker with scripts/broker and waits until its metadata shows
/// every partition.
pub fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let port = brokers
        .split(',')
        .next()
        .and_then(|b| b.rsplit(':').next())
        .unwrap_or("19092")
        .to_owned();
    let out = Command::new(repo().join("scripts/broker"))
        .args(["topic", name, &partitions.to_string(), &port])
        .output()
        .expect("scripts/broker runs");
    assert!(
        out.status.success(),
        "scripts/broker topic {name} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_topic(brokers, name, partitions);
}

pub fn wait_for_topic(brokers: &str, name: &str, partitions: i32) {
    let probe: BaseConsumer = client_config(brokers).create().expect("metadata client");
    wait_for(
        &format!("topic {name} with {partitions} partitions in the metadata"),
        Duration::from_secs(20),
        || match probe.fetch_metadata(Some(name), Duration::from_secs(5)) {
            Ok(md) => {
                let n = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map_or(0, |t| t.partitions().len());
                if n as i32 == partitions {
                    Ok(())
                } else {
                    Err(format!("{n} partitions"))
                }
            }
            Err(e) => Err(e.to_string()),
        },
        String::new,
    );
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c.set("session.timeout.ms", SESSION_TIMEOUT_MS);
    c.set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS);
    c
}

// ------------------------------------------------------------------ configuration

/// One test's configuration file and store.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub store_url: String,
    pub dead_letter_topic: Option<String>,
    /// The `[lifecycle]`, `[[authorizations]]` and `[[deployments]]` part.
    pub registry: String,
}

impl Setup {
    /// A SQLite store in a new temporary directory, a new group.
    pub fn new(brokers: &str, topic: &str, registry: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let store_url = format!("sqlite://{}", dir.path().join("kw.db").display());
        let mut s = Setup {
            config: dir.path().join("keywatch.toml"),
            dir,
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            group: unique("group"),
            store_url,
            dead_letter_topic: None,
            registry: registry.to_owned(),
        };
        s.write();
        s
    }

    /// Rewrites the configuration file after a field changed.
    pub fn write(&mut self) {
        let dlq = self
            .dead_letter_topic
            .as_ref()
            .map(|t| format!("dead_letter_topic = {}\n", toml_str(t)))
            .unwrap_or_default();
        let text = format!(
            "[kafka]\nbrokers = {}\ntopic = {}\ngroup_id = {}\n{dlq}\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"{SESSION_TIMEOUT_MS}\"\n\
             \"heartbeat.interval.ms\" = \"{HEARTBEAT_INTERVAL_MS}\"\n\n\
             [store]\nurl = {}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n\
             [log]\nformat = \"human\"\nlevel = \"info,librdkafka=warn,rdkafka=warn\"\n\n{}\n",
            toml_str(&self.brokers),
            toml_str(&self.topic),
            toml_str(&self.group),
            toml_str(&self.store_url),
            self.registry
        );
        std::fs::write(&self.config, text).expect("write the test configuration");
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `keywatch run` with this configuration; its output goes to `<name>.log`.
    pub fn start(&self, name: &str) -> Service {
        Service::start(&self.config, self.log_path(name), name)
    }
}

fn toml_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// The registry part of a scenario folder's config.toml (it holds nothing else).
pub fn case_registry(case: &str) -> String {
    let path = repo().join("tests/cases").join(case).join("config.toml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Generates `events` records with bench/gen-events (fixed seed), dated from `start`; returns the
/// events file and the registry text.
pub fn generate(dir: &Path, events: usize, seed: u64, start: &str) -> (PathBuf, String) {
    let out = dir.join(format!("events-{seed}-{events}.jsonl"));
    let cfg = dir.join(format!("registry-{seed}-{events}.toml"));
    let o = Command::new("python3")
        .arg(repo().join("bench/gen-events"))
        .args(["--events", &events.to_string(), "--seed", &seed.to_string()])
        .args(["--start", start, "--quiet", "--out"])
        .arg(&out)
        .arg("--config-out")
        .arg(&cfg)
        .output()
        .expect("python3 runs bench/gen-events");
    assert!(
        o.status.success(),
        "bench/gen-events failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let registry = std::fs::read_to_string(&cfg).expect("generated registry");
    (out, registry)
}

/// Generated streams are dated far in the future: the service evaluates rewrap deadlines on the
/// wall clock at times that depend on batching, which would add `rewrap_overdue` alerts that a
/// replay (deadlines at `--now` only) does not have. With events in the future no deadline passes.
pub const FUTURE_START: &str = "2090-01-01T00:00:00Z";

/// A generated stream and a fresh 4-partition topic for it: the events file and the registry text
/// (the files live in `dir`), the records, and each record's partition (`assign_partitions`).
pub struct Stream {
    pub dir: tempfile::TempDir,
    pub events: PathBuf,
    pub registry: String,
    pub all: Vec<Vec<u8>>,
    pub parts: Vec<i32>,
    pub topic: String,
}

impl Stream {
    /// `events` records from `seed` (dated from [`FUTURE_START`]) and a topic `unique(tag)` with 4
    /// partitions on `brokers`, nothing produced yet.
    pub fn new(brokers: &str, tag: &str, events: usize, seed: u64) -> Stream {
        let dir = tempfile::tempdir().unwrap();
        let (events, registry) = generate(dir.path(), events, seed, FUTURE_START);
        let all = records(&events);
        let parts = assign_partitions(&all, &OrderGroups::from_registry(&registry), 4);
        let topic = unique(tag);
        create_topic(brokers, &topic, 4);
        Stream {
            dir,
            events,
            registry,
            all,
            parts,
            topic,
        }
    }

    /// Produces the records in `range` (indexes into `all`) to their partitions of the topic;
    /// returns the last offset written per partition.
    pub fn produce(&self, brokers: &str, range: impl RangeBounds<usize>) -> BTreeMap<i32, i64> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        produce(brokers, &self.topic, &self.all[range], &self.parts[range])
    }
}

/// The records of a JSON Lines file as `publish` and `replay` see them (trimmed, no empty lines).
pub fn records(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .split(|b| *b == b'\n')
        .map(|l| l.trim_ascii().to_vec())
        .filter(|l| !l.is_empty())
        .collect()
}

pub fn write_records(path: &Path, records: &[Vec<u8>]) {
    let mut text = Vec::new();
    for r in records {
        text.extend_from_slice(r);
        text.push(b'\n');
    }
    std::fs::write(path, text).expect("write records");
}

// ------------------------------------------------------------------ the binary

/// A command of the keywatch binary with a clean environment (no KEYWATCH_* or RUST_LOG from
/// the caller's shell).
pub fn keywatch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keywatch"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("KEYWATCH_") || k == "RUST_LOG" {
            c.env_remove(k.as_ref());
        }
    }
    c.env("NO_COLOR", "1");
    c
}

fn run(mut c: Command, what: &str) -> Output {
    let o = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} exited with {}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `keywatch status --config C [--now T]`: stdout as bytes (exit 0 required).
pub fn status_bytes(config: &Path, now: Option<&str>) -> Vec<u8> {
    run(status_command(config, now), "keywatch status").stdout
}

/// `keywatch status --config C [--now T]`, not started.
fn status_command(config: &Path, now: Option<&str>) -> Command {
    let mut c = keywatch();
    c.arg("status").arg("--config").arg(config);
    if let Some(t) = now {
        c.args(["--now", t]);
    }
    c
}

pub fn status(config: &Path, now: Option<&str>) -> Value {
    serde_json::from_slice(&status_bytes(config, now)).expect("status prints JSON")
}

/// `status` while a service may be writing: `Err` with its stderr if it failed.
pub fn try_status(config: &Path) -> Result<Value, String> {
    try_status_at(config, None)
}

/// The state exactly as the service persisted it: `status` at a time before any deadline, so
/// that `status` itself finds nothing due (it evaluates deadlines at `--now` without writing).
pub fn try_persisted(config: &Path) -> Result<Value, String> {
    try_status_at(config, Some("1970-01-01T00:00:00Z"))
}

fn try_status_at(config: &Path, now: Option<&str>) -> Result<Value, String> {
    let o = status_command(config, now)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "status exited with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("status output: {e}"))
}

pub fn events_in(report: &Value) -> u64 {
    report["stats"]["events"].as_u64().expect("stats.events")
}

/// `keywatch replay --config C --now T FILE` (an in-memory store).
pub fn replay(config: &Path, now: &str, file: &Path) -> Value {
    let mut c = keywatch();
    c.arg("replay")
        .arg("--config")
        .arg(config)
        .args(["--now", now])
        .arg(file);
    serde_json::from_slice(&run(c, "keywatch replay").stdout).expect("replay prints JSON")
}

/// `keywatch replay --store --config C FILE`: backfills the configured store (exit 0 required).
pub fn replay_into_store(config: &Path, file: &Path) {
    let mut c = keywatch();
    c.args(["replay", "--store", "--config"])
        .arg(config)
        .arg(file);
    run(c, "keywatch replay --store");
}

/// The persisted state (`keywatch status`) and what `replay` of `events` reports, both at the
/// same `now` (the wall clock, returned first).
pub fn status_and_replay(config: &Path, events: &Path) -> (String, Value, Value) {
    let now = now_text();
    let got = status(config, Some(&now));
    let want = replay(config, &now, events);
    (now, got, want)
}

/// Asserts that `keywatch status` equals what `replay` makes of `events` (at the same `--now`):
/// state, stats and every field of every alert as a multiset, so no alert is lost and none is
/// there twice. Returns both reports, for further checks.
pub fn assert_status_equals_replay(what: &str, config: &Path, events: &Path) -> (Value, Value) {
    let (_, got, want) = status_and_replay(config, events);
    assert_same_report(
        &format!("{what}: status vs replay"),
        &got,
        &want,
        Compare {
            stats: true,
            alert_fields: ALERT_ALL,
        },
    );
    (got, want)
}

/// `keywatch publish --config C [--topic T] FILE`.
pub fn publish(config: &Path, topic: Option<&str>, file: &Path) {
    let mut c = keywatch();
    c.arg("publish").arg("--config").arg(config);
    if let Some(t) = topic {
        c.args(["--topic", t]);
    }
    c.arg(file);
    run(c, "keywatch publish");
}

/// The wall clock in the report's form, for `--now`.
pub fn now_text() -> String {
    Millis::now().to_string()
}

/// A running `keywatch run`; killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
pub struct Service {
    child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Service {
    pub fn start(config: &Path, log: PathBuf, name: &str) -> Service {
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("service log file");
        let child = keywatch()
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("keywatch run starts");
        Service {
            child: Some(child),
            log,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The service's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- last {} lines of {} ({}) ---\n{}",
            all.len() - from,
            self.name,
            self.log.display(),
            all[from..].join("\n")
        )
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("started");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "{} exited unexpectedly with {status}\n{}",
                self.name,
                self.log_tail(40)
            );
        }
    }

    /// SIGTERM, then waits (with a deadline) for the exit; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -TERM {pid} failed");
        let mut child = self.child.take().expect("running");
        let mut status = None;
        let log = self.log_tail(40);
        wait_for(
            &format!("{} to exit after SIGTERM", self.name),
            Duration::from_secs(30),
            || {
                status = child.try_wait().expect("try_wait");
                status.map(|_| ()).ok_or_else(|| "still running".to_owned())
            },
            || log.clone(),
        );
        status.expect("exited")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Waits until the service logged a non-empty partition assignment.
    pub fn wait_assigned(&self, timeout: Duration) {
        wait_for(
            &format!("{} to be assigned partitions", self.name),
            timeout,
            || {
                self.log_text()
                    .lines()
                    .any(|l| l.contains("partitions assigned") && !l.contains("partitions={}"))
                    .then_some(())
                    .ok_or_else(|| "no assignment logged".to_owned())
            },
            || self.log_tail(40),
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `status` reports `n` events (the service may still be catching up).
pub fn wait_for_events(config: &Path, n: u64, timeout: Duration, services: &[&Service]) -> Value {
    let report = wait_for(
        &format!("status to report stats.events == {n}"),
        timeout,
        || {
            let r = try_status(config)?;
            let got = events_in(&r);
            assert!(
                got <= n,
                "status reports {got} events, more than the {n} records"
            );
            if got == n {
                Ok(r)
            } else {
                Err(format!("stats {}", r["stats"]))
            }
        },
        || {
            let mut s = String::new();
            for svc in services {
                s.push_str(&svc.log_tail(30));
                s.push('\n');
            }
            s
        },
    );
    report
}

// ------------------------------------------------------------------ producing

/// Which records must keep their relative order: everything about one key (its key events,
/// acknowledgements, instance deletes and correlated follow-ups of its deployments), and all
/// IAM policy events. Everything else (routine traffic, malformed records) has no order to keep.
pub struct OrderGroups {
    /// Deployment CRN or resource CRN (lower case) -> key id.
    key_of_target: HashMap<String, String>,
}

impl OrderGroups {
    pub fn from_registry(registry: &str) -> OrderGroups {
        let doc: toml::Table = toml::from_str(registry).expect("registry TOML");
        let mut key_of_target = HashMap::new();
        for d in doc
            .get("deployments")
            .and_then(|d| d.as_array())
            .into_iter()
            .flatten()
        {
            let key = key_id(d["key"].as_str().expect("deployment key"));
            key_of_target.insert(
                d["crn"].as_str().expect("crn").to_ascii_lowercase(),
                key.clone(),
            );
            for r in d
                .get("resources")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
            {
                key_of_target.insert(
                    r.as_str().expect("resource").to_ascii_lowercase(),
                    key.clone(),
                );
            }
        }
        OrderGroups { key_of_target }
    }

    /// The ordering group of a record, `None` when it may go anywhere.
    pub fn group(&self, record: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(record).ok()?;
        let action = v.get("action")?.as_str()?;
        if action.starts_with("iam-am.policy.") {
            return Some("iam".to_owned());
        }
        let target = v
            .get("target")?
            .get("id")?
            .as_str()?
            .trim()
            .to_ascii_lowercase();
        if action.contains(".secrets.") {
            return Some(key_id(&target));
        }
        self.key_of_target.get(&target).cloned()
    }
}

fn key_id(key: &str) -> String {
    let k = key.trim().to_ascii_lowercase();
    match k.rfind(":key:") {
        Some(i) => k[i + 5..].to_owned(),
        None => k,
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The partition of each record: one partition per ordering group (by hash), the rest round-robin.
pub fn assign_partitions(records: &[Vec<u8>], groups: &OrderGroups, partitions: i32) -> Vec<i32> {
    let mut rr = 0i32;
    records
        .iter()
        .map(|r| match groups.group(r) {
            Some(g) => (fnv(&g) % partitions as u64) as i32,
            None => {
                rr = (rr + 1) % partitions;
                rr
            }
        })
        .collect()
}

/// Produces `records` in order, each to its partition; returns when all are acknowledged, with
/// the end offset (last offset + 1) of every partition written to. Offsets come from the delivery
/// reports: tansu's ListOffsets answers are not exact, so high watermarks are not used.
pub fn produce(
    brokers: &str,
    topic: &str,
    records: &[Vec<u8>],
    partitions: &[i32],
) -> BTreeMap<i32, i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer");
    produce_with(&producer, topic, records, partitions)
}

pub fn produce_with(
    producer: &FutureProducer,
    topic: &str,
    records: &[Vec<u8>],
    partitions: &[i32],
) -> BTreeMap<i32, i64> {
    let mut pending = Vec::with_capacity(records.len());
    for (r, p) in records.iter().zip(partitions) {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(&r[..]).partition(*p);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, back)) => {
                    // Queue full: let deliveries drain.
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce to {topic}: {e}"
                    );
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    let mut ends = BTreeMap::new();
    for f in pending {
        match futures::executor::block_on(f) {
            Ok(Ok(d)) => {
                let end = ends.entry(d.partition).or_insert(0);
                *end = (*end).max(d.offset + 1);
            }
            Ok(Err((e, _))) => panic!("produce to {topic}: {e}"),
            Err(_) => panic!("produce to {topic}: delivery cancelled"),
        }
    }
    ends
}

/// The end offset of each of `partitions` partitions after the given productions.
pub fn end_offsets(produced: &[&BTreeMap<i32, i64>], partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| {
            produced
                .iter()
                .filter_map(|m| m.get(&p).copied())
                .max()
                .unwrap_or(0)
        })
        .collect()
}

// ------------------------------------------------------------------ offsets

fn partition_list(topic: &str, partitions: i32, offset: Option<Offset>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        match offset {
            Some(o) => {
                tpl.add_partition_offset(topic, p, o).expect("offset");
            }
            None => {
                tpl.add_partition(topic, p);
            }
        }
    }
    tpl
}

fn group_client(brokers: &str, group: &str) -> BaseConsumer {
    client_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("group client")
}

/// The group's committed offset per partition (-1001 = none committed).
pub fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c = group_client(brokers, group);
    let tpl = c
        .committed_offsets(
            partition_list(topic, partitions, None),
            Duration::from_secs(10),
        )
        .expect("committed offsets");
    (0..partitions)
        .map(|p| match tpl.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1001,
        })
        .collect()
}

/// Commits offset 0 (the beginning) for every partition on behalf of `group`, while no member of
/// the group runs: the next consumer of that group gets every record again.
pub fn reset_offsets_to_beginning(brokers: &str, group: &str, topic: &str, partitions: i32) {
    let c = group_client(brokers, group);
    c.commit(
        &partition_list(topic, partitions, Some(Offset::Offset(0))),
        CommitMode::Sync,
    )
    .expect("commit offset 0 for every partition");
    let now = committed_offsets(brokers, group, topic, partitions);
    assert!(
        now.iter().all(|o| *o == 0),
        "offsets of {group} after the reset: {now:?}"
    );
}

/// Reads every record of `topic` (all partitions, from the beginning) until `n` arrived.
pub fn consume_all(
    brokers: &str,
    topic: &str,
    partitions: i32,
    n: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::message::Message;
    let c: BaseConsumer = client_config(brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.assign(&partition_list(topic, partitions, Some(Offset::Beginning)))
        .expect("assign");
    let mut got = Vec::new();
    let mut errors = Vec::new();
    let deadline = Instant::now() + timeout;
    while got.len() < n && Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => got.push(m.detach()),
            Some(Err(e)) => errors.push(e.to_string()),
            None => {}
        }
    }
    assert!(
        got.len() >= n,
        "read {} of {n} records from {topic} within {timeout:?}; errors: {errors:?}; got: {:?}",
        got.len(),
        got.iter()
            .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
            .collect::<Vec<_>>()
    );
    got
}

// ------------------------------------------------------------------ PostgreSQL

/// A fresh database `kw_t_<random>` on the test server, dropped when this is dropped.
pub struct PgDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        let admin_url = postgres_admin_url();
        let name = format!("kw_t_{:016x}", rand::random::<u64>());
        pg_execute(&admin_url, &format!("CREATE DATABASE {name}"));
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url.as_str(), String::new()),
        };
        let prefix = match base.find("://").map(|i| i + 3) {
            Some(start) => match base[start..].find('/') {
                Some(slash) => &base[..start + slash],
                None => base,
            },
            None => panic!("KEYWATCH_TEST_POSTGRES is not a URL: {admin_url}"),
        };
        let url = format!("{prefix}/{name}{query}");
        PgDatabase {
            admin_url,
            name,
            url,
        }
    }
}

impl PgDatabase {
    /// Starts killing every connection to this database, over and over (as an administrator or
    /// a failover would), on a thread of its own until [`ConnectionKiller::stop`].
    pub fn connection_killer(&self) -> ConnectionKiller {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (admin_url, name, flag) = (self.admin_url.clone(), self.name.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            use sqlx::Connection;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {admin_url}: {e}"));
                let mut killed = 0;
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    let k: Vec<bool> = sqlx::query_scalar(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(&name)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("terminate the connections to {name}: {e}"));
                    killed += k.into_iter().filter(|k| *k).count();
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                conn.close().await.ok();
                killed
            })
        });
        ConnectionKiller { stop, thread }
    }
}

pub struct ConnectionKiller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl ConnectionKiller {
    /// Stops killing; returns how many connections were killed.
    pub fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("the killer thread")
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        pg_execute(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn pg_execute(url: &str, sql: &str) {
    use sqlx::Connection;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        sqlx::query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        conn.close().await.ok();
    });
}

// ------------------------------------------------------------------ comparing reports

/// Alerts as a sorted multiset of the given fields.
pub fn alert_multiset(report: &Value, fields: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = report["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| {
            fields
                .iter()
                .map(|f| a[*f].to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    v.sort();
    v
}

pub const ALERT_TRIPLE: &[&str] = &["kind", "deployment", "severity"];
pub const ALERT_ALL: &[&str] = &[
    "kind",
    "severity",
    "deployment",
    "key",
    "event_time",
    "correlation_id",
];

/// Differences between two sorted multisets, at most a few of each side.
fn multiset_diff(got: &[String], want: &[String]) -> String {
    let mut count: BTreeMap<&str, i64> = BTreeMap::new();
    for g in got {
        *count.entry(g).or_default() += 1;
    }
    for w in want {
        *count.entry(w).or_default() -= 1;
    }
    let extra: Vec<String> = count
        .iter()
        .filter(|(_, c)| **c > 0)
        .take(10)
        .map(|(k, c)| format!("  +{c} {k}"))
        .collect();
    let missing: Vec<String> = count
        .iter()
        .filter(|(_, c)| **c < 0)
        .take(10)
        .map(|(k, c)| format!("  {c} {k}"))
        .collect();
    format!(
        "{} alerts vs {} expected; extra (first 10):\n{}\nmissing (first 10):\n{}",
        got.len(),
        want.len(),
        extra.join("\n"),
        missing.join("\n")
    )
}

/// Entry-by-entry differences of two arrays of objects keyed by `crn`.
fn entity_diff(name: &str, got: &Value, want: &Value) -> Vec<String> {
    let index = |v: &Value| -> BTreeMap<String, Value> {
        v.as_array()
            .unwrap_or_else(|| panic!("{name} is an array"))
            .iter()
            .map(|e| (e["crn"].as_str().unwrap_or_default().to_owned(), e.clone()))
            .collect()
    };
    let (g, w) = (index(got), index(want));
    let mut problems = Vec::new();
    for (crn, we) in &w {
        match g.get(crn) {
            None => problems.push(format!("{name}: missing {crn}")),
            Some(ge) if ge != we => {
                let fields: Vec<String> = we
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| ge.get(k.as_str()) != Some(v))
                    .map(|(k, v)| format!("{k} = {} (expected {v})", ge[k.as_str()]))
                    .collect();
                problems.push(format!("{name} {crn}: {}", fields.join(", ")));
            }
            _ => {}
        }
    }
    for crn in g.keys().filter(|c| !w.contains_key(*c)) {
        problems.push(format!("{name}: unexpected {crn}"));
    }
    if problems.is_empty() && got != want {
        problems.push(format!("{name}: same entries in another order"));
    }
    problems
}

pub struct Compare {
    pub stats: bool,
    pub alert_fields: &'static [&'static str],
}

/// Panics with a readable list of differences unless `got` matches `want`.
pub fn assert_same_report(label: &str, got: &Value, want: &Value, how: Compare) {
    let mut problems = entity_diff("deployments", &got["deployments"], &want["deployments"]);
    problems.extend(entity_diff("keys", &got["keys"], &want["keys"]));
    if how.stats && got["stats"] != want["stats"] {
        problems.push(format!(
            "stats = {}, expected {}",
            got["stats"], want["stats"]
        ));
    }
    let (ga, wa) = (
        alert_multiset(got, how.alert_fields),
        alert_multiset(want, how.alert_fields),
    );
    if ga != wa {
        problems.push(multiset_diff(&ga, &wa));
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(30).collect();
        panic!(
            "{label}: {} differences (first 30):\n{}",
            problems.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
