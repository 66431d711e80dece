//! `keywatch publish`: produces JSON Lines records to the configured topic, one record per line,
//! with a null key (as Activity Tracker routes them). For demos, tests and re-feeding archives.

use super::load_settings;
use crate::cli::Failure;
use crate::commands::replay::open_input;
use crate::service::kafka;
use crate::setup;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

pub fn publish(
    config: Option<&Path>,
    topic: Option<&str>,
    files: &[String],
) -> Result<(), Failure> {
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "warn");
    let topic = topic.unwrap_or(&settings.kafka.topic).to_owned();
    let mut inputs = Vec::new();
    for name in files {
        let (reader, _) = open_input(name)
            .map_err(|e| Failure::invalid(format!("publish: cannot open {name}: {e}")))?;
        inputs.push((name.clone(), reader));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let mut cfg = kafka::producer_config(&settings.kafka);
        cfg.set("linger.ms", "5");
        let producer: FutureProducer = cfg
            .create()
            .map_err(|e| Failure::runtime(format!("publish: kafka: {e}")))?;
        let mut sent = 0u64;
        let mut pending = futures::stream::FuturesOrdered::new();
        for (name, mut reader) in inputs {
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| Failure::runtime(format!("publish: reading {name}: {e}")))?;
                if n == 0 {
                    break;
                }
                let record = line.trim_ascii();
                if record.is_empty() {
                    continue;
                }
                let payload = record.to_vec();
                let producer = producer.clone();
                let topic = topic.clone();
                pending.push_back(async move {
                    let r: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(&topic).payload(&payload);
                    producer
                        .send(r, Duration::from_secs(30))
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| e)
                });
                if pending.len() >= 1000 {
                    use futures::StreamExt;
                    if let Some(r) = pending.next().await {
                        r.map_err(|e| Failure::runtime(format!("publish: kafka: {e}")))?;
                        sent += 1;
                    }
                }
            }
        }
        use futures::StreamExt;
        while let Some(r) = pending.next().await {
            r.map_err(|e| Failure::runtime(format!("publish: kafka: {e}")))?;
            sent += 1;
        }
        producer
            .flush(Duration::from_secs(30))
            .map_err(|e| Failure::runtime(format!("publish: kafka: {e}")))?;
        eprintln!("published {sent} records to {topic}");
        Ok(())
    })
}
