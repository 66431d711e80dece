//! Notification rows (the delivery side of the outbox): counts and per-alert delivery status.

use super::{query_error, Pool, Store, StoreError};
use serde_json::{json, Value};
use std::collections::HashMap;

impl Store {
    /// Notifications not yet delivered nor given up (`keywatch_outbox_pending`).
    pub async fn pending_notifications(&self) -> Result<i64, StoreError> {
        let n: (i64,) = on_pool!(&self.pool, |p| {
            sqlx::query_as("SELECT COUNT(*) FROM notifications WHERE status = 'pending'")
                .fetch_one(p)
                .await
        })
        .map_err(query_error("count pending notifications"))?;
        Ok(n.0)
    }

    /// Per alert id: the notifications that carry it, as `[{channel, recipient, status, attempts, last_error}]`.
    pub async fn delivery_status(
        &self,
        alerts: &[(String, String)],
    ) -> Result<HashMap<String, Value>, StoreError> {
        let mut out: HashMap<String, Value> = HashMap::new();
        if alerts.is_empty() {
            return Ok(out);
        }
        let mut causes: Vec<&str> = alerts.iter().map(|(_, c)| c.as_str()).collect();
        causes.sort();
        causes.dedup();
        type Row = (String, String, String, String, i64, Option<String>);
        let mut rows: Vec<Row> = Vec::new();
        for chunk in causes.chunks(200) {
            let mut part: Vec<Row> = on_pool!(&self.pool, |p| {
                let mut q = sqlx::QueryBuilder::new(
                    "SELECT CAST(alert_ids AS TEXT), channel, recipient, status, CAST(attempts AS BIGINT), last_error FROM notifications WHERE cause IN (",
                );
                let mut sep = q.separated(", ");
                for c in chunk {
                    sep.push_bind(*c);
                }
                q.push(")");
                q.build_query_as().fetch_all(p).await
            })
            .map_err(query_error("read notifications"))?;
            rows.append(&mut part);
        }
        for (ids, channel, recipient, status, attempts, last_error) in rows {
            let ids: Vec<String> = serde_json::from_str(&ids).unwrap_or_default();
            for id in ids {
                if alerts.iter().any(|(a, _)| *a == id) {
                    let entry = out.entry(id).or_insert_with(|| json!([]));
                    if let Some(list) = entry.as_array_mut() {
                        list.push(
                            json!({ "channel": channel, "recipient": recipient, "status": status,
                                          "attempts": attempts, "last_error": last_error }),
                        );
                    }
                }
            }
        }
        Ok(out)
    }
}
