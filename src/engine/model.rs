//! The engine's vocabulary: states, alerts, lifecycle settings, and the persisted records.

use crate::event::{Initiator, Stamp};
use crate::timefmt::Millis;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// The windows of spec section 2 `[lifecycle]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    pub rewrap_deadline: Duration,
    pub soft_delete_period: Duration,
    pub restore_window: Duration,
    pub dual_auth_window: Duration,
    pub purge_after: Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        const HOUR: u64 = 3600;
        const DAY: u64 = 24 * HOUR;
        Lifecycle {
            rewrap_deadline: Duration::from_secs(4 * HOUR),
            soft_delete_period: Duration::from_secs(9 * DAY),
            restore_window: Duration::from_secs(30 * DAY),
            dual_auth_window: Duration::from_secs(7 * DAY),
            purge_after: Duration::from_secs(90 * DAY),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Suspended,
    Deactivated,
    Destroyed,
    Purged,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Suspended => "suspended",
            KeyState::Deactivated => "deactivated",
            KeyState::Destroyed => "destroyed",
            KeyState::Purged => "purged",
        }
    }

    pub fn disk(self) -> Disk {
        match self {
            KeyState::Active | KeyState::Deactivated => Disk::Unlocked,
            KeyState::Suspended => Disk::Locked,
            KeyState::Destroyed => Disk::Shredded,
            KeyState::Purged => Disk::Purged,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Disk {
    Unlocked,
    Locked,
    Shredded,
    Purged,
}

impl Disk {
    pub const ALL: [Disk; 4] = [Disk::Unlocked, Disk::Locked, Disk::Shredded, Disk::Purged];
    pub fn as_str(self) -> &'static str {
        match self {
            Disk::Unlocked => "unlocked",
            Disk::Locked => "locked",
            Disk::Shredded => "shredded",
            Disk::Purged => "purged",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rewrap {
    Current,
    Pending,
    Overdue,
    Failed,
}

impl Rewrap {
    pub const ALL: [Rewrap; 4] = [
        Rewrap::Current,
        Rewrap::Pending,
        Rewrap::Overdue,
        Rewrap::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Rewrap::Current => "current",
            Rewrap::Pending => "pending",
            Rewrap::Overdue => "overdue",
            Rewrap::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Authorization {
    Ok,
    Revoked,
}

impl Authorization {
    pub const ALL: [Authorization; 2] = [Authorization::Ok, Authorization::Revoked];
    pub fn as_str(self) -> &'static str {
        match self {
            Authorization::Ok => "ok",
            Authorization::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    KeyDisabled,
    KeyEnabled,
    KeyDeleted,
    DeleteBlocked,
    KeyRestored,
    KeyPurged,
    KeyExpired,
    DeletionAuthorized,
    DeletionAuthorizationCancelled,
    KeyRotated,
    RewrapCompleted,
    AckFailed,
    RewrapOverdue,
    AuthorizationRestored,
    AuthorizationRevoked,
    DeploymentSoftDeleted,
    SharedKey,
}

impl AlertKind {
    pub const ALL: [AlertKind; 17] = [
        AlertKind::KeyDisabled,
        AlertKind::KeyEnabled,
        AlertKind::KeyDeleted,
        AlertKind::DeleteBlocked,
        AlertKind::KeyRestored,
        AlertKind::KeyPurged,
        AlertKind::KeyExpired,
        AlertKind::DeletionAuthorized,
        AlertKind::DeletionAuthorizationCancelled,
        AlertKind::KeyRotated,
        AlertKind::RewrapCompleted,
        AlertKind::AckFailed,
        AlertKind::RewrapOverdue,
        AlertKind::AuthorizationRestored,
        AlertKind::AuthorizationRevoked,
        AlertKind::DeploymentSoftDeleted,
        AlertKind::SharedKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::KeyDisabled => "key_disabled",
            AlertKind::KeyEnabled => "key_enabled",
            AlertKind::KeyDeleted => "key_deleted",
            AlertKind::DeleteBlocked => "delete_blocked",
            AlertKind::KeyRestored => "key_restored",
            AlertKind::KeyPurged => "key_purged",
            AlertKind::KeyExpired => "key_expired",
            AlertKind::DeletionAuthorized => "deletion_authorized",
            AlertKind::DeletionAuthorizationCancelled => "deletion_authorization_cancelled",
            AlertKind::KeyRotated => "key_rotated",
            AlertKind::RewrapCompleted => "rewrap_completed",
            AlertKind::AckFailed => "ack_failed",
            AlertKind::RewrapOverdue => "rewrap_overdue",
            AlertKind::AuthorizationRestored => "authorization_restored",
            AlertKind::AuthorizationRevoked => "authorization_revoked",
            AlertKind::DeploymentSoftDeleted => "deployment_soft_deleted",
            AlertKind::SharedKey => "shared_key",
        }
    }

    pub fn parse(s: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One alert: one affected deployment, one cause. Its `id` is derived from the cause, the kind
/// and the deployment, so re-processing the same event can never make a second alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub kind: AlertKind,
    pub severity: Severity,
    pub deployment: String,
    pub key: String,
    pub event_time: Option<Millis>,
    pub correlation_id: Option<String>,
    /// What raised it: an event digest, `registry`, `clock:...` or `api:...`.
    pub cause: String,
    pub action: Option<String>,
    pub initiator: Option<Initiator>,
    pub summary: String,
}

/// A deployment as registered (configuration, registry files or the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub crn: String,
    pub name: String,
    pub key: String,
    #[serde(default)]
    pub owners: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Vec<String>,
}

/// An IAM authorization policy, from configuration or remembered from its create event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub id: String,
    pub source_service: String,
    pub target_service: String,
    pub target_instance: Option<String>,
    pub account: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The persisted state of one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub crn: String,
    pub state: KeyState,
    /// The event that set `state` (last writer wins on it).
    pub state_stamp: Option<Stamp>,
    /// Time of the deletion behind a `destroyed` state.
    pub deleted_at: Option<Millis>,
    /// Set while `state` is purged because `purge_after` passed, not by an event.
    #[serde(default)]
    pub purged_by_clock: bool,
    /// The dual-authorization register: `Some(until)` while an approval is open.
    pub deletion_authorized_until: Option<Millis>,
    pub dual_auth_stamp: Option<Stamp>,
    /// Rotations some deployment may not have confirmed yet.
    #[serde(default)]
    pub rotations: Vec<Rotation>,
    /// Successful `ack-rotate` events that named nobody, not yet matched.
    #[serde(default)]
    pub anonymous_acks: u32,
    /// Anonymous acknowledgements that arrived before any rotation with their correlation id.
    #[serde(default)]
    pub early_acks: BTreeMap<String, u32>,
    /// The newest key version (with its time) named by the anonymous acknowledgements counted so
    /// far, for the deployments they confirm when the count is reached.
    #[serde(default)]
    pub anonymous_version: Option<(Millis, String)>,
    /// The same for the early acknowledgements of a rotation not seen yet, by correlation id.
    #[serde(default)]
    pub early_ack_versions: BTreeMap<String, (Millis, String)>,
}

/// The newer of two versions with their times (the later time wins; on a tie, `b`).
pub fn newer_version(
    a: Option<(Millis, String)>,
    b: Option<(Millis, String)>,
) -> Option<(Millis, String)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl DeploymentRecord {
    /// Records the key version a confirmation at `at` named, unless a later confirmation named one.
    pub fn confirm_version(&mut self, version: &str, at: Millis) {
        if self.key_version_at.is_none_or(|t| at >= t) {
            self.key_version = Some(version.to_owned());
            self.key_version_at = Some(at);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub time: Millis,
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckFailure {
    pub time: Millis,
    pub code: i64,
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthMark {
    pub state: Authorization,
    pub stamp: Stamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Position in the deployment's history (0 for its first entry); not part of the entry's
    /// JSON. An entry is stored as the `timeline` row of slot `n % 50`, so that adding one
    /// writes one small row instead of the deployment's whole timeline.
    #[serde(skip)]
    pub n: u64,
    pub time: Millis,
    pub action: String,
    pub outcome: String,
    pub correlation_id: Option<String>,
    pub effect: String,
}

/// The persisted state of one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub spec: DeploymentSpec,
    pub soft_deleted_at: Option<Millis>,
    /// Latest rewrap confirmation (named acknowledgement, counted acknowledgements, follow-up).
    pub confirmed_at: Option<Millis>,
    /// Correlation ids of rotations this deployment confirmed (possibly before the rotation arrived).
    /// Stored as entities of their own (`correlation`), not in the deployment's document; read
    /// from documents written before that.
    #[serde(default, skip_serializing)]
    pub confirmed_correlations: BTreeMap<String, Millis>,
    pub key_version: Option<String>,
    /// Time of the confirmation that set `key_version` (last writer wins on it, so the order of
    /// arrival does not decide which version is shown).
    #[serde(default)]
    pub key_version_at: Option<Millis>,
    #[serde(default)]
    pub ack_failures: Vec<AckFailure>,
    /// Start of the pending period that the clock declared overdue.
    pub clock_overdue_for: Option<Millis>,
    pub auth: Option<AuthMark>,
    #[serde(default)]
    pub shared_key_alerted: bool,
    /// The newest entries, oldest first (a ring: a new entry drops the oldest without moving
    /// the others). Stored as `timeline` rows, one per entry, not in the deployment's document;
    /// read from documents written before that.
    #[serde(default, skip_serializing)]
    pub timeline: VecDeque<TimelineEntry>,
    /// The number the next timeline entry gets.
    #[serde(skip)]
    pub timeline_next: u64,
}

/// A remembered IAM authorization policy and what happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub id: String,
    /// Unknown while only its deletion has been seen.
    pub spec: Option<PolicySpec>,
    pub created: Option<Stamp>,
    pub deleted: Option<Stamp>,
    #[serde(default)]
    pub from_config: bool,
}

impl PolicyRecord {
    /// A policy known only by its id so far (configuration fills the spec, events the stamps).
    pub fn unknown(id: &str, from_config: bool) -> PolicyRecord {
        PolicyRecord {
            id: id.to_owned(),
            spec: None,
            created: None,
            deleted: None,
            from_config,
        }
    }
}

/// Counters of spec section 6 `stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub events: u64,
    pub applied: u64,
    pub ignored: u64,
    pub duplicates: u64,
    pub invalid: u64,
}
