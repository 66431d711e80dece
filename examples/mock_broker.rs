//! Benchmark broker: librdkafka's mock cluster (one broker, in this process) with the topics given,
//! served on a local TCP port until standard input closes. Its fetch path does not depend on how
//! much a partition holds (tansu's in-memory storage does: its produce-to-receipt latency grows
//! with the topic), so `bench/service` uses it to measure keywatch's latency apart from tansu's.
//! Prints the bootstrap servers on the first line of standard output.
//!
//! usage: cargo run --release --example mock_broker -- PARTITIONS TOPIC...

use rdkafka::mocking::MockCluster;
use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: mock_broker PARTITIONS TOPIC...");
        std::process::exit(1);
    }
    let partitions: i32 = args[1].parse().expect("PARTITIONS is a number");
    let cluster = MockCluster::new(1).expect("mock cluster");
    for topic in &args[2..] {
        cluster
            .create_topic(topic, partitions, 1)
            .expect("create topic");
    }
    println!("{}", cluster.bootstrap_servers());
    std::io::stdout().flush().expect("stdout");
    // Serve until standard input closes (the benchmark holds it open).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
