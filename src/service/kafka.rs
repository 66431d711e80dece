//! The Kafka edge: client configuration from `[kafka]`, the consumer context that tracks
//! assignments, and the dead-letter producer.

use crate::settings::KafkaSettings;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::TopicPartitionList;
use secrecy::ExposeSecret;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Connection settings shared by the consumer and the dead-letter producer.
pub fn base_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    c.set("security.protocol", k.security_protocol.librdkafka_name());
    if let Some(m) = &k.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &k.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &k.sasl_password {
        c.set("sasl.password", p.expose_secret());
    }
    c.set(
        "client.id",
        format!("keywatch-{}", env!("CARGO_PKG_VERSION")),
    );
    c
}

/// keywatch's prefetch and fetch settings, set before `[kafka.properties]` (which may override
/// each of them). `bench/service` runs its second bare-consumer baseline with exactly these
/// (`examples/drain.rs`, `DRAIN_PROPERTIES=keywatch`).
pub const PREFETCH: [(&str, &str); 4] = [
    // Bounded prefetch (librdkafka buffers up to 64 MiB by default) and a short fetch wait, so
    // that a lifecycle event is not held back by a broker that waits out fetch.wait.max.ms on a
    // quiet topic.
    ("queued.max.messages.kbytes", "4096"),
    ("fetch.wait.max.ms", "50"),
    // librdkafka waits fetch.queue.backoff.ms (1 s by default) before fetching again once the
    // bounded queue above was full: with a small queue that halves throughput or worse.
    ("fetch.queue.backoff.ms", "5"),
    // One fetch response is held in memory whole: 50 MiB by default.
    ("fetch.max.bytes", "4194304"),
];

/// The consumer: manual offset storage (offsets are stored only after the store committed),
/// periodic commits of stored offsets, earliest offset for a new group. `[kafka.properties]` apply
/// last, except the settings commit-after-process depends on (rejected by the configuration).
pub fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(k);
    c.set("group.id", &k.group_id);
    c.set("enable.auto.commit", "true");
    c.set("auto.commit.interval.ms", "1000");
    c.set("enable.auto.offset.store", "false");
    c.set("auto.offset.reset", "earliest");
    c.set("enable.partition.eof", "false");
    c.set("statistics.interval.ms", "5000");
    for (name, value) in PREFETCH {
        c.set(name, value);
    }
    for (name, value) in &k.properties {
        c.set(name, value);
    }
    c
}

pub fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(k);
    c.set("enable.idempotence", "true");
    c.set("message.timeout.ms", "30000");
    for (name, value) in &k.properties {
        if is_producer_property(name) {
            c.set(name, value);
        }
    }
    c
}

/// Properties that make sense for the producer too (connection and TLS settings).
fn is_producer_property(name: &str) -> bool {
    name.starts_with("ssl.")
        || name.starts_with("sasl.")
        || name.starts_with("socket.")
        || name.starts_with("reconnect.")
        || name == "client.dns.lookup"
        || name == "broker.address.family"
}

/// What the service and the readiness probe need to know about the consumer.
#[derive(Default)]
pub struct ConsumerState {
    pub assigned: Mutex<BTreeSet<(String, i32)>>,
    /// Set on every assignment: the processing loop reloads stored progress for new partitions.
    pub reassigned: AtomicBool,
    pub rebalances: AtomicU64,
    /// Consumer lag per partition, from librdkafka statistics.
    pub lag: Mutex<Vec<(i32, i64)>>,
    pub errors: AtomicU64,
}

impl ConsumerState {
    /// Whether the partition is assigned to this consumer now.
    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.assigned
            .lock()
            .map(|a| a.contains(&(topic.to_owned(), partition)))
            .unwrap_or(false)
    }
}

pub struct KeywatchContext {
    pub state: Arc<ConsumerState>,
}

impl ClientContext for KeywatchContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = Vec::new();
        for topic in statistics.topics.values() {
            for (id, p) in &topic.partitions {
                if *id >= 0 && p.consumer_lag >= 0 {
                    lag.push((*id, p.consumer_lag));
                }
            }
        }
        if let Ok(mut l) = self.state.lag.lock() {
            *l = lag;
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.state.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for KeywatchContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.state.rebalances.fetch_add(1, Ordering::Relaxed);
        let mut assigned = self
            .state
            .assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match rebalance {
            Rebalance::Assign(tpl) => {
                assigned.clear();
                for e in tpl.elements() {
                    assigned.insert((e.topic().to_owned(), e.partition()));
                }
                self.state.reassigned.store(true, Ordering::SeqCst);
                tracing::info!(partitions = ?assigned, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    assigned.remove(&(e.topic().to_owned(), e.partition()));
                }
                tracing::info!(revoked = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit");
        }
    }
}
