//! Benchmark baseline: a bare rdkafka consumer that joins a fresh group, reads N records of a topic
//! and discards them. Prints the rate from the first to the last record.
//!
//! usage: cargo run --release --example drain -- BROKERS TOPIC COUNT

mod common;

use rdkafka::Message;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: drain BROKERS TOPIC COUNT");
        std::process::exit(1);
    }
    let count: u64 = args[3].parse().expect("COUNT is a number");
    // DRAIN_PROPERTIES="name=value,name=value" adds consumer properties (to compare prefetch
    // settings); "keywatch" stands for keywatch's own (`keywatch::service::kafka::PREFETCH`).
    let extra = std::env::var("DRAIN_PROPERTIES").unwrap_or_default();
    let mut settings = vec![("enable.auto.commit", "false")];
    for item in extra.split(',').filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some(kv) => settings.push(kv),
            None if item == "keywatch" => settings.extend(keywatch::service::kafka::PREFETCH),
            None => {
                eprintln!("drain: DRAIN_PROPERTIES: {item:?} is neither name=value nor keywatch");
                std::process::exit(1);
            }
        }
    }
    let consumer = common::fresh_consumer(&args[1], &args[2], "drain", &settings);
    let mut n = 0u64;
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < count && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, |p| p.len() as u64);
            n += 1;
        }
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "{{\"records\": {n}, \"seconds\": {secs:.3}, \"records_per_second\": {:.0}, \"mb_per_second\": {:.1}}}",
        n as f64 / secs.max(1e-9),
        bytes as f64 / 1e6 / secs.max(1e-9)
    );
}
