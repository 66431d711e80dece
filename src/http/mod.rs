//! The HTTP side of `keywatch run`: health and readiness, Prometheus metrics, the REST API of spec
//! section 5 and the status page. Engine questions go through [`EngineHandle`] (answered by the
//! processing loop between batches); alerts are read from the store.

mod page;

use crate::engine::view::DeploymentView;
use crate::engine::{DeploymentSpec, Disk, Engine, Rewrap};
use crate::service::{EngineHandle, Request, Shared};
use crate::settings::Settings;
use crate::store::{AlertFilter, Store};
use crate::timefmt::Millis;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
    engine: EngineHandle,
    store: Option<Store>,
    api_token: Option<SecretString>,
}

impl AppState {
    pub fn new(
        settings: &Settings,
        shared: Arc<Shared>,
        engine: EngineHandle,
        store: Option<Store>,
    ) -> AppState {
        AppState {
            shared,
            engine,
            store,
            api_token: settings.http.api_token.clone(),
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/deployments", get(list_deployments))
        .route(
            "/v1/deployments/{crn}",
            get(get_deployment)
                .put(put_deployment)
                .delete(delete_deployment),
        )
        .route("/v1/keys/{key}", get(get_key))
        .route("/v1/alerts", get(list_alerts))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Turns the plain-text rejections of axum's extractors (query string, path) into JSON errors.
async fn json_errors(r: Response) -> Response {
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(r.status().is_client_error() || r.status().is_server_error()) || is_json {
        return r;
    }
    let status = r.status();
    let body = axum::body::to_bytes(r.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}

/// A JSON error `{ "error": ... }` with a status code.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the processing loop is not running",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

async fn readyz(State(s): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    match &s.store {
        Some(store) => {
            if let Err(e) = store.ping().await {
                reasons.push(format!("store unreachable: {e}"));
            }
        }
        None => reasons.push("no store".to_string()),
    }
    if !s.shared.consuming.load(Ordering::SeqCst) {
        reasons.push("the consumer has not started".into());
    }
    let assigned: Vec<String> = s
        .shared
        .consumer
        .assigned
        .lock()
        .map(|a| a.iter().map(|(t, p)| format!("{t}/{p}")).collect())
        .unwrap_or_default();
    if assigned.is_empty() {
        reasons.push("no partitions assigned".into());
    }
    if reasons.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "partitions": assigned })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": reasons.join("; ") })),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let now = Millis::now();
    let gauges = s.engine.query(move |e| gauge_values(e, now)).await;
    let m = &s.shared.metrics;
    if let Some(g) = gauges {
        for (label, v) in g.disk {
            m.deployments.with_label_values(&[label]).set(v);
        }
        for (label, v) in g.rewrap {
            m.deployments_rewrap.with_label_values(&[label]).set(v);
        }
        for (label, v) in g.auth {
            m.deployments_authorization
                .with_label_values(&[label])
                .set(v);
        }
        m.rewrap_deadline.reset();
        for (crn, left) in g.deadlines {
            m.rewrap_deadline
                .with_label_values(&[crn.as_str()])
                .set(left);
        }
    }
    if let Ok(lag) = s.shared.consumer.lag.lock() {
        m.consumer_lag.reset();
        for (p, l) in lag.iter() {
            m.consumer_lag
                .with_label_values(&[p.to_string().as_str()])
                .set(*l);
        }
    }
    if let Some(store) = &s.store {
        if let Ok(n) = store.pending_notifications().await {
            m.outbox_pending.set(n);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

struct Gauges {
    disk: Vec<(&'static str, i64)>,
    rewrap: Vec<(&'static str, i64)>,
    auth: Vec<(&'static str, i64)>,
    deadlines: Vec<(String, f64)>,
}

/// Active deployments per state, and the time left to each pending rewrap deadline.
fn gauge_values(e: &Engine, now: Millis) -> Gauges {
    let views: Vec<DeploymentView> = e
        .deployments()
        .keys()
        .filter_map(|c| e.deployment_view(c, now))
        .filter(|v| v.lifecycle == "active")
        .collect();
    let count = |f: &dyn Fn(&DeploymentView) -> &'static str, labels: &[&'static str]| {
        labels
            .iter()
            .map(|l| (*l, views.iter().filter(|v| f(v) == *l).count() as i64))
            .collect::<Vec<_>>()
    };
    let disk_labels: Vec<&'static str> = Disk::ALL.iter().map(|d| d.as_str()).collect();
    let rewrap_labels: Vec<&'static str> = Rewrap::ALL.iter().map(|d| d.as_str()).collect();
    Gauges {
        disk: count(&|v| v.disk.as_str(), &disk_labels),
        rewrap: count(&|v| v.rewrap.as_str(), &rewrap_labels),
        auth: count(&|v| v.authorization.as_str(), &["ok", "revoked"]),
        deadlines: views
            .iter()
            .filter_map(|v| {
                v.rewrap_deadline_at
                    .map(|d| (v.crn.clone(), now.seconds_until(d)))
            })
            .collect(),
    }
}

#[derive(Deserialize)]
struct DeploymentFilter {
    disk: Option<String>,
    rewrap: Option<String>,
    key: Option<String>,
    label: Option<String>,
}

async fn list_deployments(
    State(s): State<AppState>,
    Query(f): Query<DeploymentFilter>,
) -> ApiResult {
    if let Some(d) = &f.disk {
        if !Disk::ALL.iter().any(|x| x.as_str() == d) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("disk: {d:?} is not one of unlocked, locked, shredded, purged"),
            ));
        }
    }
    if let Some(r) = &f.rewrap {
        if !Rewrap::ALL.iter().any(|x| x.as_str() == r) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("rewrap: {r:?} is not one of current, pending, overdue, failed"),
            ));
        }
    }
    let label = match &f.label {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "label: expected NAME=VALUE")
                })?,
        ),
        None => None,
    };
    let now = Millis::now();
    let list = s
        .engine
        .query(move |e| {
            let key = f.key.as_deref().map(|k| e.find_key(k));
            if let Some(None) = key {
                return Vec::new();
            }
            let key_members: Option<Vec<String>> = key.flatten().map(|k| e.deployments_on_key(&k));
            e.deployments()
                .iter()
                .filter(|(crn, _)| key_members.as_ref().is_none_or(|m| m.contains(crn)))
                .filter(|(_, d)| {
                    label
                        .as_ref()
                        .is_none_or(|(k, v)| d.spec.labels.get(k) == Some(v))
                })
                .filter_map(|(crn, _)| e.deployment_view(crn, now))
                .filter(|v| f.disk.as_deref().is_none_or(|d| v.disk.as_str() == d))
                .filter(|v| f.rewrap.as_deref().is_none_or(|r| v.rewrap.as_str() == r))
                .collect::<Vec<_>>()
        })
        .await
        .ok_or_else(ApiError::unavailable)?;
    Ok(Json(json!({ "deployments": list })).into_response())
}

async fn get_deployment(State(s): State<AppState>, Path(crn): Path<String>) -> ApiResult {
    let now = Millis::now();
    let found = s
        .engine
        .query(move |e| {
            let crn = e.find_deployment(&crn)?;
            let d = e.deployments().get(&crn)?;
            let view = e.deployment_view(&crn, now)?;
            let mut v = serde_json::to_value(view).ok()?;
            v["owners"] = json!(d.spec.owners);
            v["labels"] = json!(d.spec.labels);
            v["resources"] = json!(d.spec.resources);
            v["timeline"] = json!(d.timeline);
            Some(v)
        })
        .await
        .ok_or_else(ApiError::unavailable)?;
    match found {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "no such deployment")),
    }
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.api_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "mutating endpoints are disabled: http.api_token is not configured",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer <api_token>",
            )
        })?;
    if bool::from(given.as_bytes().ct_eq(token.expose_secret().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong api token"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentBody {
    crn: Option<String>,
    name: Option<String>,
    key: String,
    #[serde(default)]
    owners: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    resources: Vec<String>,
}

async fn put_deployment(
    State(s): State<AppState>,
    Path(crn): Path<String>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    authorize(&s, &headers)?;
    // A body over BODY_LIMIT (413) or unreadable: answer in JSON like every other error.
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let b: DeploymentBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    if b.crn.as_deref().is_some_and(|c| c.trim() != crn.trim()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "crn in the body differs from the crn in the path",
        ));
    }
    let spec = DeploymentSpec {
        crn: crn.clone(),
        name: b.name.unwrap_or_default(),
        key: b.key,
        owners: b.owners,
        labels: b.labels,
        resources: b.resources,
    };
    let r = s
        .engine
        .request(|reply| Request::Register { spec, reply })
        .await
        .ok_or_else(ApiError::unavailable)?;
    match r {
        Ok(created) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((
                status,
                Json(json!({ "crn": crn.trim(), "created": created })),
            )
                .into_response())
        }
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, e)),
    }
}

async fn delete_deployment(
    State(s): State<AppState>,
    Path(crn): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&s, &headers)?;
    let c = crn.clone();
    let r = s
        .engine
        .request(|reply| Request::SoftDelete { crn: c, reply })
        .await
        .ok_or_else(ApiError::unavailable)?;
    match r {
        Ok(true) => Ok(Json(json!({ "crn": crn, "lifecycle": "soft_deleted" })).into_response()),
        Ok(false) => Err(ApiError::new(StatusCode::NOT_FOUND, "no such deployment")),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, e)),
    }
}

async fn get_key(State(s): State<AppState>, Path(key): Path<String>) -> ApiResult {
    let now = Millis::now();
    let found = s
        .engine
        .query(move |e| {
            let id = e.find_key(&key)?;
            let k = e.keys().get(&id)?;
            let view = e.key_view(&id)?;
            let deployments: Vec<DeploymentView> = view
                .deployments
                .iter()
                .filter_map(|c| e.deployment_view(c, now))
                .collect();
            Some(json!({
                "crn": view.crn, "state": view.state,
                "restorable_until": (k.state == crate::engine::KeyState::Destroyed)
                    .then(|| k.deleted_at.map(|t| t.plus(e.lifecycle().restore_window))).flatten(),
                "deletion_authorized_until": k.deletion_authorized_until.filter(|u| *u > now),
                "blast_radius": deployments.len(),
                "deployments": deployments,
            }))
        })
        .await
        .ok_or_else(ApiError::unavailable)?;
    found.map(|v| Json(v).into_response()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no registered deployment uses this key",
        )
    })
}

async fn list_alerts(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let mut filter = AlertFilter::default();
    for (k, v) in &q {
        match k.as_str() {
            "kind" => {
                if crate::engine::AlertKind::parse(v).is_none() {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("kind: unknown alert kind {v:?}"),
                    ));
                }
                filter.kind = Some(v.clone());
            }
            "severity" => {
                if !["info", "warning", "critical"].contains(&v.as_str()) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "severity: one of info, warning, critical",
                    ));
                }
                filter.severity = Some(v.clone());
            }
            "since" => {
                let t = Millis::parse(v).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("since: {v:?} is not an RFC 3339 time"),
                    )
                })?;
                filter.since = Some(t.to_offset_date_time());
            }
            "limit" => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "limit: not a number"))?;
                filter.limit = n.clamp(1, 1000);
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown filter {other:?}"),
                ))
            }
        }
    }
    let store = s.store.as_ref().ok_or_else(ApiError::unavailable)?;
    let rows = store
        .alerts(&filter)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")))?;
    let statuses = store
        .delivery_status(
            &rows
                .iter()
                .map(|r| (r.id.clone(), r.cause.clone()))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap_or_default();
    let alerts: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut v = r.doc.clone();
            v["created_at"] = json!(Millis::from_offset_date_time(r.created_at));
            v["delivery"] = statuses
                .get(&r.id)
                .cloned()
                .unwrap_or_else(|| json!("not routed"));
            v
        })
        .collect();
    Ok(Json(json!({ "alerts": alerts })).into_response())
}
