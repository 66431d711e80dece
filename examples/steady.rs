//! Benchmark load: produces the lines of a JSON Lines file to a topic at a steady rate.
//!
//! usage: cargo run --release --example steady -- BROKERS TOPIC FILE RATE SECONDS

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::io::BufRead;
use std::time::{Duration, Instant};

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
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &a[1])
        .set("linger.ms", "0")
        .create()
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
    println!(
        "{{\"sent\": {sent}, \"seconds\": {:.3}}}",
        start.elapsed().as_secs_f64()
    );
}
