//! Benchmark load: produces the lines of a JSON Lines file to a topic at a steady rate, and reports
//! how long the broker took to acknowledge them (from each record's timestamp, set when it was
//! handed to librdkafka, to its delivery report): the produce half of any end-to-end latency.
//!
//! usage: cargo run --release --example steady -- BROKERS TOPIC FILE RATE SECONDS

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use std::io::BufRead;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Collects the acknowledgement latency of every delivered record, in milliseconds.
#[derive(Default)]
struct Acks(Mutex<Vec<i64>>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Ok(m) = result {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            // librdkafka's mock cluster reports no usable time here (a few milliseconds after
            // the epoch): only a plausible wall-clock time counts.
            let ts = m
                .timestamp()
                .to_millis()
                .filter(|ts| *ts > 1_000_000_000_000);
            if let (Some(ts), Ok(mut acks)) = (ts, self.0.lock()) {
                acks.push((now_ms - ts).max(0));
            }
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: steady BROKERS TOPIC FILE RATE SECONDS");
        std::process::exit(1);
    }
    let rate: u64 = a[4].parse().expect("RATE");
    let seconds: u64 = a[5].parse().expect("SECONDS");
    let lines: Vec<Vec<u8>> = std::io::BufReader::new(std::fs::File::open(&a[3]).expect("FILE"))
        .split(b'\n')
        .filter_map(Result::ok)
        .filter(|l| !l.is_empty())
        .collect();
    let producer: ThreadedProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", &a[1])
        .set("linger.ms", "0")
        .create_with_context(Acks::default())
        .expect("producer");
    let start = Instant::now();
    let total = rate * seconds;
    let mut sent = 0u64;
    while sent < total {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due.min(total) {
            let line = &lines[(sent as usize) % lines.len()];
            let rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&a[2]).payload(line);
            if producer.send(rec).is_err() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let mut acks = std::mem::take(&mut *producer.context().0.lock().expect("acks"));
    acks.sort_unstable();
    let q = |p: f64| {
        acks.get(((acks.len() as f64 * p) as usize).min(acks.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"sent\": {sent}, \"seconds\": {:.3}, \"acked\": {}, \"ack_p50_ms\": {}, \"ack_p99_ms\": {}, \"ack_max_ms\": {}}}",
        start.elapsed().as_secs_f64(),
        acks.len(),
        q(0.5),
        q(0.99),
        acks.last().copied().unwrap_or(0)
    );
}
