//! Shared by the benchmark examples (a module, not an example of its own).

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A bare rdkafka consumer in a fresh group (`PREFIX-<pid>`), subscribed to `topic` from the
/// earliest offset, with the session timeouts the benchmarks give keywatch; `settings` adds or
/// overrides properties (offset commits, fetch wait).
pub fn fresh_consumer(
    brokers: &str,
    topic: &str,
    prefix: &str,
    settings: &[(&str, &str)],
) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{prefix}-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000");
    for (name, value) in settings {
        config.set(*name, *value);
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}
