//! `keywatch run` from the outside (spec sections 3, 4 and 8): the real binary against a real
//! Kafka-protocol broker (tansu, started by scripts/test and named by KEYWATCH_TEST_BROKERS), with
//! SQLite or a fresh PostgreSQL database, compared with what `keywatch replay` makes of the same
//! records. Without KEYWATCH_TEST_BROKERS these tests fail and say how to run them.
//!
//! Ordering: Activity Tracker records have no key, so records spread over partitions arrive in an
//! arbitrary order, and the spec lets alerts (not state) depend on that order. To compare alerts
//! exactly with a replay of the file, records are produced so that everything whose relative order
//! matters (the events of one key and its deployments; IAM policy events) shares one partition,
//! in file order (`harness::OrderGroups`); routine traffic is spread round-robin.

pub(crate) mod harness;

use harness::*;
use rdkafka::message::{Headers, Message};
use serde_json::Value;
use std::time::{Duration, Instant};

/// A deadline for the service to work through what it was given (first group join included).
const CATCH_UP: Duration = Duration::from_secs(60);

/// The parts of a report the clock changes: rewrap, disk and key state.
fn clock_view(report: &Value) -> Vec<String> {
    let deployments = report["deployments"]
        .as_array()
        .expect("deployments")
        .iter();
    let keys = report["keys"].as_array().expect("keys").iter();
    deployments
        .map(|d| format!("{} rewrap={} disk={}", d["crn"], d["rewrap"], d["disk"]))
        .chain(keys.map(|k| format!("{} state={}", k["crn"], k["state"])))
        .collect()
}

/// Waits until `group` has committed every partition up to `ends`.
/// (At least: the exact committed offset is checked by `restart_resumes_after_graceful_stop`.)
fn wait_for_commits(brokers: &str, group: &str, topic: &str, ends: &[i64], svc: &Service) {
    wait_for(
        &format!("{group} to commit every partition of {topic} up to its end {ends:?}"),
        CATCH_UP,
        || {
            let got = committed_offsets(brokers, group, topic, ends.len() as i32);
            if got.iter().zip(ends).all(|(g, e)| g >= e) {
                Ok(())
            } else {
                Err(format!("committed {got:?}"))
            }
        },
        || svc.log_tail(30),
    );
}

/// One scenario folder through publish -> run -> SIGTERM, then `status --now T` vs `replay --now T`.
fn end_to_end_case(brokers: &str, case: &str) {
    let started = Instant::now();
    let events = repo().join("tests/cases").join(case).join("events.jsonl");
    let n = records(&events).len() as u64;
    let topic = unique(case);
    // One partition: the records arrive in file order, as replay reads them.
    create_topic(brokers, &topic, 1);
    let setup = Setup::new(brokers, &topic, &case_registry(case));
    publish(&setup.config, None, &events);

    let mut svc = setup.start("run");
    wait_for_events(&setup.config, n, CATCH_UP, &[&svc]);
    // The service evaluates the clock (rewrap deadlines, purges) every 5 s on the wall clock, not
    // right after a batch; the cases are dated in the past, so deadlines and purge times have
    // passed: wait until the persisted state has caught up with the clock.
    let clock_started = Instant::now();
    wait_for(
        &format!("{case}: the service to evaluate the wall clock (deadlines, purges)"),
        Duration::from_secs(30),
        || {
            let want = replay(&setup.config, &now_text(), &events);
            let got = try_persisted(&setup.config)?;
            if clock_view(&got) == clock_view(&want) {
                Ok(())
            } else {
                Err(format!(
                    "status {:?}\nreplay {:?}",
                    clock_view(&got),
                    clock_view(&want)
                ))
            }
        },
        || svc.log_tail(20),
    );
    let clock_lag = clock_started.elapsed();
    svc.assert_running();
    let exit = svc.terminate();
    assert!(
        exit.success(),
        "{case}: SIGTERM must end the service with 0, got {exit}\n{}",
        svc.log_tail(30)
    );
    let (t, got, want) = status_and_replay(&setup.config, &events);
    assert_same_report(
        &format!("{case}: status --now {t} vs replay --now {t}"),
        &got,
        &want,
        Compare {
            stats: true,
            alert_fields: ALERT_TRIPLE,
        },
    );
    assert_eq!(events_in(&got), n);
    eprintln!(
        "end_to_end {case}: {n} records in {:.1?} (waited {clock_lag:.1?} for the clock)",
        started.elapsed()
    );
}

#[test]
fn end_to_end_status_equals_replay() {
    let _timing = Timing::start("end_to_end_status_equals_replay");
    let brokers = brokers();
    let cases = [
        "delete-restore-with-configured-window",
        "iam-delete-before-create",
        "duplicates-key-order-and-whitespace",
        "correlated-follow-up",
        "invalid-records",
        "rewrap-deadline-at-now",
    ];
    // Each case has its own topic, group and store: run them side by side.
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|case| (case, s.spawn(|| end_to_end_case(&brokers, case))))
            .collect();
        let failed: Vec<&str> = handles
            .into_iter()
            .filter_map(|(case, h)| h.join().is_err().then_some(*case))
            .collect();
        assert!(
            failed.is_empty(),
            "cases failed (their messages are above): {failed:?}"
        );
    });
}

/// A graceful stop commits exactly the next offset to read; a restart resumes there and misses
/// nothing (spec 8: at-least-once consumption).
#[test]
fn restart_resumes_after_graceful_stop() {
    let _timing = Timing::start("restart_resumes_after_graceful_stop");
    let brokers = brokers();
    let stream = Stream::new(&brokers, "restart", 2_000, 31);
    let n = stream.all.len();
    let setup = Setup::new(&brokers, &stream.topic, &stream.registry);
    let half = n / 2;

    let first_half = stream.produce(&brokers, ..half);
    let mut svc = setup.start("run-1");
    wait_for_events(&setup.config, half as u64, CATCH_UP, &[&svc]);
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));
    // The committed offset of a partition is the offset of the next record to read.
    let ends = end_offsets(&[&first_half], 4);
    assert_eq!(
        committed_offsets(&brokers, &setup.group, &stream.topic, 4),
        ends,
        "committed offsets after a graceful stop (expected the end of each partition)"
    );

    stream.produce(&brokers, half..);
    let mut svc = setup.start("run-2");
    wait_for_events(&setup.config, n as u64, CATCH_UP, &[&svc]);
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));
    assert_status_equals_replay("stop, more records, restart", &setup.config, &stream.events);
}

/// Kill -9 in the middle of a stream, restart: the result equals an uninterrupted replay's.
#[test]
fn crash_safety() {
    let _timing = Timing::start("crash_safety");
    let brokers = brokers();
    let stream = Stream::new(&brokers, "crash", 20_000, 20_260_801);
    let n = stream.all.len();
    let setup = Setup::new(&brokers, &stream.topic, &stream.registry);

    // Three quarters of the stream exist when the service dies, so it dies with 0 < events < N;
    // it is killed while it works through the second and third quarters, after it has committed
    // some offsets (the restart resumes from them, with the store usually ahead of them).
    let (q1, q3) = (n / 4, 3 * n / 4);
    stream.produce(&brokers, ..q1);
    let mut first = setup.start("run-1");
    let before = wait_for(
        "the first instance to persist some events and commit some offsets",
        CATCH_UP,
        || {
            let events = try_status(&setup.config).map(|r| events_in(&r)).ok();
            let committed = committed_offsets(&brokers, &setup.group, &stream.topic, 4);
            match events {
                Some(e) if e > 0 && committed.iter().any(|o| *o > 0) => Ok(e),
                _ => Err(format!("events {events:?}, committed {committed:?}")),
            }
        },
        || first.log_tail(30),
    );
    let seen = std::thread::scope(|s| {
        let producing = s.spawn(|| stream.produce(&brokers, q1..q3));
        let seen = wait_for(
            "the first instance to process records of the second quarter",
            CATCH_UP,
            || match try_status(&setup.config).map(|r| events_in(&r)) {
                Ok(e) if e > before => Ok(e),
                other => Err(format!("events {other:?}")),
            },
            || first.log_tail(30),
        );
        first.kill9();
        producing.join().expect("produced");
        seen
    });
    let committed_at_kill: i64 = committed_offsets(&brokers, &setup.group, &stream.topic, 4)
        .iter()
        .map(|o| (*o).max(0))
        .sum();
    let at_kill = events_in(&status(&setup.config, None));
    assert!(
        at_kill > 0 && at_kill < n as u64,
        "killed at {at_kill} of {n} events"
    );
    eprintln!(
        "crash_safety: killed -9 with status showing {seen} events ({q3} produced, {n} in all; \
         store: {at_kill}; committed offsets: {committed_at_kill} records)"
    );

    stream.produce(&brokers, q3..);
    let mut second = setup.start("run-2");
    wait_for_events(&setup.config, n as u64, CATCH_UP, &[&second]);
    let exit = second.terminate();
    assert!(exit.success(), "exit {exit}\n{}", second.log_tail(30));

    // Every field of every alert, as a multiset: no alert lost, none twice.
    let (got, want) =
        assert_status_equals_replay("after kill -9 and restart", &setup.config, &stream.events);
    assert_eq!(
        got["alerts"].as_array().unwrap().len(),
        want["alerts"].as_array().unwrap().len()
    );
}

/// Records delivered again (offsets reset, or a new group) change nothing and raise nothing.
#[test]
fn redelivery() {
    let _timing = Timing::start("redelivery");
    let brokers = brokers();
    let stream = Stream::new(&brokers, "redelivery", 3_000, 4_242);
    let n = stream.all.len() as u64;
    let mut setup = Setup::new(&brokers, &stream.topic, &stream.registry);
    let produced = stream.produce(&brokers, ..);
    let ends = end_offsets(&[&produced], 4);
    // A fixed --now makes the printed reports comparable byte for byte.
    let now = "2026-12-01T00:00:00.000Z";

    let mut svc = setup.start("run-1");
    wait_for_events(&setup.config, n, CATCH_UP, &[&svc]);
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));
    let before = status_bytes(&setup.config, Some(now));
    let before_json: Value = serde_json::from_slice(&before).unwrap();
    assert_same_report(
        "first run: status vs replay",
        &before_json,
        &replay(&setup.config, now, &stream.events),
        Compare {
            stats: true,
            alert_fields: ALERT_ALL,
        },
    );
    assert_eq!(ends.iter().sum::<i64>(), n as i64, "end offsets {ends:?}");

    // (a) The same group from the beginning: every record is received again and skipped.
    reset_offsets_to_beginning(&brokers, &setup.group, &stream.topic, 4);
    let mut svc = setup.start("run-2-same-group");
    wait_for_commits(&brokers, &setup.group, &stream.topic, &ends, &svc);
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));
    let after = status_bytes(&setup.config, Some(now));
    if before != after {
        let after_json: Value = serde_json::from_slice(&after).unwrap();
        assert_same_report(
            "redelivery to the same group",
            &after_json,
            &before_json,
            Compare {
                stats: true,
                alert_fields: ALERT_ALL,
            },
        );
        panic!(
            "redelivery to the same group changed the status output (same content, other bytes)"
        );
    }

    // (b) A new group on the same store: every record is processed again, as duplicates.
    setup.group = unique("group-b");
    setup.write();
    let mut svc = setup.start("run-3-new-group");
    wait_for_events(&setup.config, 2 * n, CATCH_UP, &[&svc]);
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));
    let again = status(&setup.config, Some(now));
    assert_same_report(
        "a new group on the same store",
        &again,
        &before_json,
        Compare {
            stats: false,
            alert_fields: ALERT_ALL,
        },
    );
    assert_eq!(
        again["stats"]["applied"], before_json["stats"]["applied"],
        "stats {}",
        again["stats"]
    );
    assert_eq!(
        again["stats"]["invalid"].as_u64().unwrap(),
        2 * before_json["stats"]["invalid"].as_u64().unwrap(),
        "stats {}",
        again["stats"]
    );
}

/// Two instances in one group share a PostgreSQL store: the result is one instance's. Then one
/// instance stops and the other takes over its partitions (scale in).
#[test]
fn scale_out_postgres() {
    let _timing = Timing::start("scale_out_postgres");
    let brokers = brokers();
    let db = PgDatabase::create();
    let stream = Stream::new(&brokers, "scale", 4_000, 777);
    let n = stream.all.len();
    let mut setup = Setup::new(&brokers, &stream.topic, &stream.registry);
    setup.store_url = db.url.clone();
    setup.write();
    let half = n / 2;

    let mut a = setup.start("instance-a");
    let mut b = setup.start("instance-b");
    a.wait_assigned(CATCH_UP);
    b.wait_assigned(CATCH_UP);
    stream.produce(&brokers, ..half);
    wait_for_events(&setup.config, half as u64, CATCH_UP, &[&a, &b]);
    // Both took part: each holds partitions of the topic in its last assignment.
    for svc in [&a, &b] {
        let log = svc.log_text();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .unwrap_or("");
        assert!(
            last.contains(&stream.topic),
            "{}: last assignment {last:?}",
            svc.name
        );
    }

    // Scale in: b stops, a gets its partitions and continues from b's committed offsets.
    let exit = b.terminate();
    assert!(
        exit.success(),
        "instance-b exited with {exit}\n{}",
        b.log_tail(30)
    );
    stream.produce(&brokers, half..);
    wait_for_events(&setup.config, n as u64, CATCH_UP, &[&a]);
    let exit = a.terminate();
    assert!(
        exit.success(),
        "instance-a exited with {exit}\n{}",
        a.log_tail(30)
    );

    assert_status_equals_replay(
        "two instances on PostgreSQL, then one",
        &setup.config,
        &stream.events,
    );
}

/// The store's connections are killed again and again while the service (alone on PostgreSQL,
/// so it pipelines its transactions) consumes a stream arriving in small pieces: transactions fail
/// mid-way, and the service must drop their effects, read their records again from Kafka (none
/// is kept in memory for a retry) and end with exactly the state and alerts of an undisturbed run.
#[test]
fn store_connections_killed() {
    let _timing = Timing::start("store_connections_killed");
    let brokers = brokers();
    let db = PgDatabase::create();
    let stream = Stream::new(&brokers, "pgkill", 3_000, 31_337);
    let n = stream.all.len();
    let mut setup = Setup::new(&brokers, &stream.topic, &stream.registry);
    setup.store_url = db.url.clone();
    setup.write();

    let mut svc = setup.start("run");
    svc.wait_assigned(CATCH_UP);
    let killer = db.connection_killer();
    let chunk = n.div_ceil(30);
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        stream.produce(&brokers, start..end);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let killed = killer.stop();
    assert!(killed > 0, "no connection was killed");
    wait_for_events(&setup.config, n as u64, CATCH_UP, &[&svc]);
    let exit = svc.terminate();
    assert!(exit.success(), "exited with {exit}\n{}", svc.log_tail(30));
    let log = svc.log_text();
    assert!(
        log.contains("store unavailable"),
        "no transaction failed, so nothing was tested:\n{}",
        svc.log_tail(30)
    );

    assert_status_equals_replay(
        "PostgreSQL connections killed while the service consumes",
        &setup.config,
        &stream.events,
    );
}

/// Another process writes into the store while the service runs (`replay --store` backfilling
/// the middle third of a stream into the same SQLite file): the service's next batch, applied to
/// an engine that does not know those writes (while the batch before it committed, or from the
/// start), must not be written over them. It is applied again under the lock after loading them,
/// and the service says so. The end state is that of the whole stream replayed in order.
#[test]
fn another_writer_between_batches() {
    let _timing = Timing::start("another_writer_between_batches");
    let brokers = brokers();
    let stream = Stream::new(&brokers, "foreign", 3_000, 4_242);
    let n = stream.all.len();
    let setup = Setup::new(&brokers, &stream.topic, &stream.registry);
    let (a, b) = (n / 3, 2 * n / 3);

    let mut svc = setup.start("run");
    svc.wait_assigned(CATCH_UP);
    stream.produce(&brokers, ..a);
    wait_for_events(&setup.config, a as u64, CATCH_UP, &[&svc]);
    let middle = stream.dir.path().join("middle.jsonl");
    write_records(&middle, &stream.all[a..b]);
    replay_into_store(&setup.config, &middle);
    stream.produce(&brokers, b..);
    // A service that wrote its outdated state over the backfill would count only a + (n - b).
    wait_for_events(&setup.config, n as u64, CATCH_UP, &[&svc]);
    let exit = svc.terminate();
    assert!(exit.success(), "exited with {exit}\n{}", svc.log_tail(30));
    assert!(
        svc.log_text().contains("another writer shares the store"),
        "the service did not notice the other writer:\n{}",
        svc.log_tail(30)
    );

    assert_status_equals_replay(
        "a backfill between the service's batches",
        &setup.config,
        &stream.events,
    );
}

/// Malformed records in the middle of a stream are counted, dead-lettered, and passed over.
#[test]
fn poison_input() {
    let _timing = Timing::start("poison_input");
    let brokers = brokers();
    let case = "disable-then-enable";
    let base = records(&repo().join("tests/cases").join(case).join("events.jsonl"));
    let key = {
        let first: Value = serde_json::from_slice(&base[0]).unwrap();
        first["target"]["id"].as_str().unwrap().to_owned()
    };
    let poison: Vec<Vec<u8>> = vec![
        b"this is not JSON".to_vec(),
        br#"[{"action":"kms.secrets.disable"}]"#.to_vec(),
        br#"{"action":"kms.secrets.delete","eventTime":"2026-08-20T10:00:00.000Z","outcome":"success","target":{"typeURI":"kms/secrets"}}"#.to_vec(),
        format!(r#"{{"action":"kms.secrets.enable","eventTime":"yesterday","outcome":"success","target":{{"id":"{key}"}}}}"#).into_bytes(),
        br#"{"action":"kms.secrets.rotate","eventTime":"2026-08-20T1"#.to_vec(),
    ];
    // The first event, the poison, then the rest: what comes after must still be applied.
    let mut all = vec![base[0].clone()];
    all.extend(poison.iter().cloned());
    all.extend(base[1..].iter().cloned());
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("poisoned.jsonl");
    write_records(&events, &all);

    let topic = unique("poison");
    let dlq = format!("{topic}-dlq");
    create_topic(&brokers, &topic, 1);
    create_topic(&brokers, &dlq, 1);
    let mut setup = Setup::new(&brokers, &topic, &case_registry(case));
    setup.dead_letter_topic = Some(dlq.clone());
    setup.write();
    publish(&setup.config, None, &events);

    let mut svc = setup.start("run");
    wait_for_events(&setup.config, all.len() as u64, CATCH_UP, &[&svc]);
    let dead = consume_all(&brokers, &dlq, 1, poison.len(), Duration::from_secs(30));
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));

    let (got, _) = assert_status_equals_replay("poisoned stream", &setup.config, &events);
    assert_eq!(
        got["stats"]["invalid"],
        poison.len(),
        "stats {}",
        got["stats"]
    );
    assert_eq!(
        got["stats"]["applied"],
        base.len(),
        "the records after the poison are applied: {}",
        got["stats"]
    );
    let disks: Vec<&Value> = got["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["disk"])
        .collect();
    assert!(
        disks.iter().all(|d| *d == "unlocked"),
        "the enable after the poison was applied: {disks:?}"
    );

    assert_eq!(dead.len(), poison.len(), "dead-letter records");
    for (i, m) in dead.iter().enumerate() {
        let offset = 1 + i; // the poison follows the first record
        assert_eq!(
            m.payload().unwrap_or_default(),
            &poison[i][..],
            "dead letter {i}: payload kept as it was"
        );
        let headers = m.headers().expect("dead letters carry headers");
        let header = |name: &str| -> String {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| panic!("dead letter {i}: no header {name}"))
        };
        assert!(
            !header("keywatch-reason").trim().is_empty(),
            "dead letter {i}: empty reason"
        );
        assert_eq!(header("keywatch-source-topic"), topic, "dead letter {i}");
        assert_eq!(header("keywatch-source-partition"), "0", "dead letter {i}");
        assert_eq!(
            header("keywatch-source-offset"),
            offset.to_string(),
            "dead letter {i}"
        );
    }
}

/// librdkafka's mock cluster as the broker: it goes down and comes back, and Fetch / OffsetCommit
/// requests fail for a while; the same process works through everything.
#[test]
fn broker_fault() {
    let _timing = Timing::start("broker_fault");
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // The mock cluster needs no external service, but the suite is run through scripts/test.
    brokers();

    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("fault");
    mock.create_topic(&topic, 4, 1).expect("mock topic");
    let mock_brokers = mock.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let (events, registry) = generate(dir.path(), 1_500, 99, FUTURE_START);
    let all = records(&events);
    let parts = assign_partitions(&all, &OrderGroups::from_registry(&registry), 4);
    let setup = Setup::new(&mock_brokers, &topic, &registry);
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &mock_brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer");
    let (p1, p2) = (500, 1_000);

    let mut svc = setup.start("run");
    let pid = svc.pid();
    let produced_1 = produce_with(&producer, &topic, &all[..p1], &parts[..p1]);
    wait_for_events(&setup.config, p1 as u64, CATCH_UP, &[&svc]);
    // After the outage the group is joined again and consumption resumes from the committed
    // offsets: make sure there are some.
    wait_for_commits(
        &mock_brokers,
        &setup.group,
        &topic,
        &end_offsets(&[&produced_1], 4),
        &svc,
    );

    // The broker goes away for longer than the session timeout: the service notices (client
    // errors), its group session times out and it loses its partitions; it must keep running.
    let count = |what: &str| svc.log_text().matches(what).count();
    let (errors_before, revoked_before) =
        (count("kafka client error"), count("partitions revoked"));
    let outage = Instant::now();
    mock.broker_down(1).expect("broker down");
    // Records produced during the outage wait in the producer until the broker is back.
    let producing = {
        let (producer, topic) = (producer.clone(), topic.clone());
        let (records, parts) = (all[p1..p2].to_vec(), parts[p1..p2].to_vec());
        std::thread::spawn(move || produce_with(&producer, &topic, &records, &parts))
    };
    wait_for(
        "the service to notice the outage and lose its partitions (session timeout)",
        Duration::from_secs(30),
        || {
            let (errors, revoked) = (count("kafka client error"), count("partitions revoked"));
            if errors > errors_before && revoked > revoked_before {
                Ok(())
            } else {
                Err(format!(
                    "{errors} client errors, {revoked} revocations logged"
                ))
            }
        },
        || svc.log_tail(20),
    );
    svc.assert_running();
    let outage_len = outage.elapsed();
    mock.broker_up(1).expect("broker up");
    let produced_2 = producing.join().expect("produced during the outage");
    wait_for_events(&setup.config, p2 as u64, CATCH_UP, &[&svc]);
    eprintln!(
        "broker_fault: outage of {:.1?}; caught up {:.1?} after it began",
        outage_len,
        outage.elapsed()
    );

    // Failing fetches and offset commits for a while.
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5],
    );
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 3],
    );
    let produced_3 = produce_with(&producer, &topic, &all[p2..], &parts[p2..]);
    wait_for_events(&setup.config, all.len() as u64, CATCH_UP, &[&svc]);
    let ends = end_offsets(&[&produced_1, &produced_2, &produced_3], 4);
    wait_for_commits(&mock_brokers, &setup.group, &topic, &ends, &svc);
    svc.assert_running();
    assert_eq!(svc.pid(), pid, "no restart");
    assert!(svc.terminate().success(), "{}", svc.log_tail(30));

    assert_status_equals_replay("after broker faults", &setup.config, &events);
}
