//! Benchmark baseline: a bare rdkafka consumer that reads COUNT records of a topic and reports the
//! latency from each record's timestamp (its production) to its receipt: what the broker and the
//! client alone cost, before keywatch does anything. Commits offsets every second and waits at most
//! `fetch.wait.max.ms` = 50 ms per fetch, as keywatch does (`FETCH_WAIT_MS` overrides it).
//!
//! usage: cargo run --release --example receive_latency -- BROKERS TOPIC COUNT

mod common;

use rdkafka::Message;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: receive_latency BROKERS TOPIC COUNT");
        std::process::exit(1);
    }
    let count: usize = args[3].parse().expect("COUNT is a number");
    let fetch_wait = std::env::var("FETCH_WAIT_MS").unwrap_or_else(|_| "50".into());
    // LATENCY_PROPERTIES="name=value,name=value" adds consumer properties (to compare settings).
    let extra = std::env::var("LATENCY_PROPERTIES").unwrap_or_default();
    let mut settings = vec![
        ("enable.auto.commit", "true"),
        ("auto.commit.interval.ms", "1000"),
        ("fetch.wait.max.ms", fetch_wait.as_str()),
    ];
    settings.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
    let consumer = common::fresh_consumer(&args[1], &args[2], "latency", &settings);
    let mut latencies = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(600);
    while latencies.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            if let Some(ts) = m.timestamp().to_millis() {
                latencies.push((now_ms - ts).max(0));
            }
        }
    }
    latencies.sort_unstable();
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"records\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"max_ms\": {}}}",
        latencies.len(),
        q(0.5),
        q(0.99),
        latencies.last().copied().unwrap_or(0)
    );
}
