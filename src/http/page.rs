//! `GET /`: a small server-rendered status page (no JavaScript, no external assets).

use super::AppState;
use crate::engine::view::DeploymentView;
use crate::engine::{Disk, Rewrap};
use crate::store::AlertFilter;
use crate::timefmt::Millis;
use axum::extract::State;
use axum::response::Html;
use std::fmt::Write;

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

struct KeyLine {
    crn: String,
    state: String,
    deployments: usize,
}

pub async fn status_page(State(s): State<AppState>) -> Html<String> {
    let now = Millis::now();
    let data = s
        .engine
        .query(move |e| {
            let views: Vec<DeploymentView> = e
                .deployments()
                .keys()
                .filter_map(|c| e.deployment_view(c, now))
                .collect();
            let keys: Vec<KeyLine> = e
                .keys()
                .keys()
                .filter_map(|k| e.key_view(k))
                .filter(|k| !k.deployments.is_empty())
                .map(|k| KeyLine {
                    crn: k.crn,
                    state: k.state.as_str().to_owned(),
                    deployments: k.deployments.len(),
                })
                .collect();
            (views, keys, e.stats())
        })
        .await;
    let alerts = match &s.store {
        Some(store) => store
            .alerts(&AlertFilter {
                limit: 25,
                ..AlertFilter::default()
            })
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let ids: Vec<(String, String)> = alerts
        .iter()
        .map(|a| (a.id.clone(), a.cause.clone()))
        .collect();
    let delivery = match &s.store {
        Some(store) => store.delivery_status(&ids).await.unwrap_or_default(),
        None => Default::default(),
    };
    let mut h = String::with_capacity(16 * 1024);
    h.push_str(r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><meta http-equiv="refresh" content="30"><title>keywatch</title><style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1d2733;background:#f6f8fa}
h1{font-size:1.4rem;margin:0 0 .2rem} h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.sub{color:#5b6875;font-size:.9rem} table{border-collapse:collapse;width:100%;background:#fff;font-size:.88rem}
th,td{text-align:left;padding:.35rem .55rem;border-bottom:1px solid #e3e8ee;vertical-align:top} th{background:#eef2f6}
.crn{font-family:ui-monospace,Menlo,monospace;font-size:.78rem;word-break:break-all;color:#44515e}
.pill{display:inline-block;padding:.05rem .5rem;border-radius:1rem;font-size:.8rem;font-weight:600}
.ok{background:#dcf5e3;color:#13632f}.warn{background:#fff1c7;color:#7a5300}.bad{background:#fde0e0;color:#9b1c1c}.gone{background:#2b2b2b;color:#fff}.info{background:#e2ecfb;color:#1d4f91}
.cards{display:flex;gap:.8rem;flex-wrap:wrap;margin:.8rem 0}.card{background:#fff;border:1px solid #e3e8ee;border-radius:.5rem;padding:.6rem .9rem;min-width:8rem}
.card b{display:block;font-size:1.4rem} tr.group th{background:#f6f8fa;text-align:left;font-weight:600}
</style></head><body>"#);
    let _ = write!(
        h,
        "<h1>keywatch</h1><div class=\"sub\">state at {now} &middot; version {}</div>",
        env!("CARGO_PKG_VERSION")
    );
    let Some((views, keys, stats)) = data else {
        h.push_str("<p class=\"pill bad\">the processing loop is not running</p></body></html>");
        return Html(h);
    };
    let count = |d: Disk| {
        views
            .iter()
            .filter(|v| v.disk == d && v.lifecycle == "active")
            .count()
    };
    let rewrap_bad = views
        .iter()
        .filter(|v| matches!(v.rewrap, Rewrap::Overdue | Rewrap::Failed))
        .count();
    let revoked = views
        .iter()
        .filter(|v| v.authorization.as_str() == "revoked")
        .count();
    h.push_str("<div class=\"cards\">");
    for (label, n, class) in [
        ("deployments", views.len(), "info"),
        ("unlocked", count(Disk::Unlocked), "ok"),
        ("locked", count(Disk::Locked), "warn"),
        ("shredded", count(Disk::Shredded), "bad"),
        ("purged", count(Disk::Purged), "gone"),
        ("rewrap overdue/failed", rewrap_bad, "warn"),
        ("authorization revoked", revoked, "bad"),
    ] {
        let _ = write!(
            h,
            "<div class=\"card\"><span class=\"pill {class}\">{label}</span><b>{n}</b></div>"
        );
    }
    h.push_str("</div>");
    let _ = write!(
        h,
        "<div class=\"sub\">events {} &middot; applied {} &middot; ignored {} &middot; duplicates {} &middot; invalid {}</div>",
        stats.events, stats.applied, stats.ignored, stats.duplicates, stats.invalid
    );

    h.push_str("<h2>Deployments by state</h2><table><tr><th>disk</th><th>deployment</th><th>rewrap</th><th>authorization</th><th>lifecycle</th><th>until</th></tr>");
    let mut sorted: Vec<&DeploymentView> = views.iter().collect();
    sorted.sort_by_key(|v| (std::cmp::Reverse(severity_rank(v)), v.name.clone()));
    // Grouped by disk and rewrap state, worst group first, each under a heading row.
    let mut group: Option<(Disk, Rewrap)> = None;
    for v in sorted {
        if group != Some((v.disk, v.rewrap)) {
            group = Some((v.disk, v.rewrap));
            let n = views
                .iter()
                .filter(|w| w.disk == v.disk && w.rewrap == v.rewrap)
                .count();
            let _ = write!(
                h,
                "<tr class=\"group\"><th colspan=\"6\">{} &middot; rewrap {} &middot; {n}</th></tr>",
                pill(v.disk.as_str()),
                pill(v.rewrap.as_str())
            );
        }
        let until = v
            .restorable_until
            .map(|t| format!("restorable until {t}"))
            .or(v.rewrap_deadline_at.map(|t| format!("rewrap by {t}")))
            .or(v.purge_at.map(|t| format!("purged at {t}")))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td><b>{}</b><div class=\"crn\">{}</div></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            pill(v.disk.as_str()),
            escape(&v.name),
            escape(&v.crn),
            pill(v.rewrap.as_str()),
            pill(v.authorization.as_str()),
            pill(&v.lifecycle),
            escape(&until)
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Keys and their blast radius</h2><table><tr><th>key</th><th>state</th><th>deployments</th></tr>");
    for k in &keys {
        let _ = write!(
            h,
            "<tr><td class=\"crn\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&k.crn),
            pill(&k.state),
            k.deployments
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Latest alerts</h2><table><tr><th>when</th><th>severity</th><th>kind</th><th>deployment</th><th>summary</th><th>delivery</th></tr>");
    if alerts.is_empty() {
        h.push_str("<tr><td colspan=\"6\">no alerts</td></tr>");
    }
    for a in &alerts {
        let summary = a
            .doc
            .get("summary")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let name = views
            .iter()
            .find(|v| v.crn == a.deployment)
            .map(|v| v.name.clone())
            .unwrap_or_else(|| a.deployment.clone());
        let d = delivery
            .get(&a.id)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "not routed".into());
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            Millis::from_offset_date_time(a.event_time),
            pill(&a.severity),
            escape(&a.kind),
            escape(&name),
            escape(summary),
            escape(d.trim_matches('"'))
        );
    }
    h.push_str("</table></body></html>");
    Html(h)
}

fn severity_rank(v: &DeploymentView) -> u8 {
    let disk = match v.disk {
        Disk::Purged => 40,
        Disk::Shredded => 30,
        Disk::Locked => 20,
        Disk::Unlocked => 0,
    };
    let rewrap = match v.rewrap {
        Rewrap::Failed => 4,
        Rewrap::Overdue => 3,
        Rewrap::Pending => 2,
        Rewrap::Current => 0,
    };
    disk + rewrap
}

fn pill(state: &str) -> String {
    let class = match state {
        "unlocked" | "current" | "ok" | "active" | "info" => "ok",
        "locked" | "pending" | "overdue" | "warning" | "suspended" | "deactivated"
        | "soft_deleted" => "warn",
        "shredded" | "failed" | "revoked" | "critical" | "destroyed" => "bad",
        "purged" => "gone",
        _ => "info",
    };
    format!("<span class=\"pill {class}\">{}</span>", escape(state))
}
