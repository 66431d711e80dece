//! Every metric of spec section 7, in one place (Prometheus naming, bounded labels: the only
//! unbounded one is `deployment` on the rewrap deadline gauge, bounded by the registry).

use crate::engine::{AlertKind, Authorization, Disk, Rewrap, Severity};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub events: IntCounterVec,
    pub key_events: IntCounterVec,
    pub deployments: IntGaugeVec,
    pub deployments_rewrap: IntGaugeVec,
    pub deployments_authorization: IntGaugeVec,
    pub rewrap_deadline: GaugeVec,
    pub alerts: IntCounterVec,
    pub notifications: IntCounterVec,
    pub outbox_pending: IntGauge,
    pub processing: Histogram,
    pub produce_to_commit: Histogram,
    pub batch_records: Histogram,
    pub event_age: Gauge,
    pub consumer_lag: IntGaugeVec,
    pub build_info: IntGaugeVec,
}

pub const EVENT_RESULTS: [&str; 4] = ["applied", "ignored", "duplicate", "invalid"];
pub const NOTIFICATION_RESULTS: [&str; 3] = ["delivered", "retried", "failed"];
pub const CHANNELS: [&str; 2] = ["email", "webhook"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let igauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let events = counter(
            "keywatch_events_total",
            "Activity Tracker records read, by what became of them.",
            &["result"],
        );
        let key_events = counter(
            "keywatch_key_events_total",
            "Applied key lifecycle events, by action.",
            &["action"],
        );
        let deployments = igauge(
            "keywatch_deployments",
            "Registered active deployments by disk state.",
            &["disk"],
        );
        let deployments_rewrap = igauge(
            "keywatch_deployments_rewrap",
            "Registered active deployments by rewrap state.",
            &["state"],
        );
        let deployments_authorization = igauge(
            "keywatch_deployments_authorization",
            "Registered active deployments by authorization state.",
            &["state"],
        );
        let rewrap_deadline = GaugeVec::new(
            Opts::new("keywatch_rewrap_deadline_seconds", "Time left until the rewrap deadline (negative when overdue), for deployments with a pending or overdue rewrap."),
            &["deployment"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(rewrap_deadline.clone()))
            .expect("unique metric");
        let alerts = counter(
            "keywatch_alerts_total",
            "Alerts raised and stored, by kind and severity.",
            &["kind", "severity"],
        );
        let notifications = counter(
            "keywatch_notifications_total",
            "Notification delivery attempts, by channel and result.",
            &["channel", "result"],
        );
        let outbox_pending = IntGauge::new(
            "keywatch_outbox_pending",
            "Notifications waiting for delivery.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(outbox_pending.clone()))
            .expect("unique metric");
        let processing = Histogram::with_opts(
            HistogramOpts::new(
                "keywatch_event_processing_seconds",
                "Time from receiving a batch of records to committing it.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(processing.clone()))
            .expect("unique metric");
        let produce_to_commit = Histogram::with_opts(
            HistogramOpts::new(
                "keywatch_produce_to_commit_seconds",
                "Time from a record's Kafka timestamp (its production) to the commit of its batch (not in the spec: for latency benchmarks).",
            )
            .buckets(vec![
                0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09,
                0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(produce_to_commit.clone()))
            .expect("unique metric");
        let batch_records = Histogram::with_opts(
            HistogramOpts::new(
                "keywatch_batch_records",
                "Records per store transaction (several batches under load; not in the spec).",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 15000.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(batch_records.clone()))
            .expect("unique metric");
        let event_age = Gauge::new(
            "keywatch_event_age_seconds",
            "Now minus the eventTime of the last applied event.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(event_age.clone()))
            .expect("unique metric");
        let consumer_lag = igauge(
            "keywatch_consumer_lag",
            "Records behind the partition's high watermark, from librdkafka statistics.",
            &["partition"],
        );
        let build_info = igauge(
            "keywatch_build_info",
            "Always 1; the version label tells the build.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Label sets known in advance start at zero, so that rates see the first increment.
        for r in EVENT_RESULTS {
            events.with_label_values(&[r]);
        }
        for c in CHANNELS {
            for r in NOTIFICATION_RESULTS {
                notifications.with_label_values(&[c, r]);
            }
        }
        for d in Disk::ALL {
            deployments.with_label_values(&[d.as_str()]);
        }
        for r in Rewrap::ALL {
            deployments_rewrap.with_label_values(&[r.as_str()]);
        }
        for a in Authorization::ALL {
            deployments_authorization.with_label_values(&[a.as_str()]);
        }
        let _ = (AlertKind::ALL, Severity::Info);
        Metrics {
            registry,
            events,
            key_events,
            deployments,
            deployments_rewrap,
            deployments_authorization,
            rewrap_deadline,
            alerts,
            notifications,
            outbox_pending,
            processing,
            produce_to_commit,
            batch_records,
            event_age,
            consumer_lag,
            build_info,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
