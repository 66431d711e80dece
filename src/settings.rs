//! Configuration: the typed settings of keywatch, loaded in layers (the shipped
//! `config/default.toml`, the operator's file, `KEYWATCH__SECTION__KEY` environment variables),
//! plus the deployment registry files, checked once before anything starts.
//!
//! Everything after [`Settings::load`] can trust the values: durations are positive, enums are
//! parsed, the listen address is an address, secrets are [`SecretString`]s that never show up in
//! `Debug` output or in [`Settings::summary`]. Every error is one line naming the file (or the
//! environment variable), the key path and the reason.
//!
//! Not checked here, on purpose: CRN and key syntax of deployments and CRN uniqueness (the
//! registry module owns those).

mod load;
mod summary;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

pub use values::{display_duration, LogFormat, SecurityProtocol, Severity, SmtpTls};

/// Every alert kind keywatch raises (spec section 3); route `kinds` must name these.
pub const ALERT_KINDS: &[&str] = &[
    "key_disabled",
    "key_enabled",
    "key_deleted",
    "delete_blocked",
    "key_restored",
    "key_purged",
    "key_expired",
    "deletion_authorized",
    "deletion_authorization_cancelled",
    "key_rotated",
    "rewrap_completed",
    "ack_failed",
    "rewrap_overdue",
    "authorization_restored",
    "authorization_revoked",
    "deployment_soft_deleted",
    "shared_key",
];

/// librdkafka properties that keywatch sets itself: from the named `[kafka]` settings, or because
/// the at-least-once guarantee depends on them (offsets are stored only after processing).
/// `[kafka.properties]` may not set them.
pub const KAFKA_MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "enable.auto.commit",
    "enable.auto.offset.store",
];

/// The shipped defaults, the first configuration layer.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// The complete, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub store: StoreSettings,
    pub http: HttpSettings,
    pub lifecycle: LifecycleSettings,
    pub smtp: SmtpSettings,
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Inline deployments followed by those of every registry file, in file order.
    #[serde(default)]
    pub deployments: Vec<DeploymentEntry>,
    /// After loading: resolved against the directory of the config file that named them (or the
    /// working directory when they came from `KEYWATCH__REGISTRY_FILES`, a comma-separated list).
    #[serde(default, deserialize_with = "values::path_list")]
    pub registry_files: Vec<PathBuf>,
    /// Inline authorizations followed by those of every registry file.
    #[serde(default)]
    pub authorizations: Vec<AuthorizationEntry>,
    pub log: LogSettings,
    pub delivery: DeliverySettings,
    /// Where this configuration came from (filled by the loader).
    #[serde(skip)]
    pub sources: ConfigSources,
}

/// The layers a [`Settings`] was built from, for the summary and for logs.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// The operator's file, if one was given.
    pub file: Option<PathBuf>,
    /// Names (never values) of the `KEYWATCH__*` environment variables that were applied.
    pub environment: Vec<String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub security_protocol: SecurityProtocol,
    /// Normalized to upper case (`PLAIN`, `SCRAM-SHA-512`, ...).
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<SecretString>,
    pub dead_letter_topic: Option<String>,
    /// Extra librdkafka properties. TOML integers and booleans are stringified. A property set by
    /// environment (`KEYWATCH__KAFKA__PROPERTIES__SSL_CA_LOCATION`) has its `_` turned into `.`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://PATH` or `postgres://...` / `postgresql://...`.
    #[serde(deserialize_with = "values::store_url")]
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(deserialize_with = "values::listen_address")]
    pub listen: SocketAddr,
    /// Required by the mutating endpoints; without it they answer 403.
    pub api_token: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSettings {
    #[serde(deserialize_with = "values::positive_duration")]
    pub rewrap_deadline: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub soft_delete_period: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub restore_window: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub dual_auth_window: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub purge_after: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: Option<String>,
    pub port: u16,
    pub from: Option<String>,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    #[serde(deserialize_with = "values::positive_duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub name: String,
    /// Default `info`: every alert.
    #[serde(default)]
    pub min_severity: Severity,
    /// `None` = every kind.
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
    /// The route applies to a deployment when every pair is among its labels.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Addresses; the word `owners` means the owners of each affected deployment.
    #[serde(default)]
    pub email: Vec<String>,
    #[serde(default)]
    pub webhooks: Vec<WebhookSettings>,
    #[serde(
        default = "values::default_group_wait",
        deserialize_with = "values::duration"
    )]
    pub group_wait: Duration,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// `whsec_` + base64 of the key bytes (Standard Webhooks), or raw bytes without the prefix.
    /// After loading it is never empty: it was given here or read from `secret_env`.
    #[serde(default = "values::empty_secret")]
    pub secret: SecretString,
    /// Name of an environment variable holding the secret (instead of `secret`).
    #[serde(default)]
    pub secret_env: Option<String>,
}

/// One registered deployment. Syntax of `crn`/`key` and uniqueness are checked by the registry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentEntry {
    pub crn: String,
    #[serde(default)]
    pub name: Option<String>,
    pub key: String,
    #[serde(default)]
    pub owners: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Vec<String>,
    /// Where it was defined, e.g. `config/keywatch.toml: deployments[2]`.
    #[serde(skip)]
    pub origin: String,
}

/// A known IAM service-to-service authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationEntry {
    /// The IAM policy id.
    pub id: String,
    /// e.g. `messagehub`, `server-protect`.
    pub source_service: String,
    /// `kms` or `hs-crypto`.
    pub target_service: String,
    /// Key Protect / HPCS instance GUID the policy is scoped to, if any.
    #[serde(default)]
    pub target_instance: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// IBM Cloud account id; `None` = any account.
    #[serde(default)]
    pub account: Option<String>,
    /// Where it was defined, e.g. `registry/prod.toml: authorizations[0]`.
    #[serde(skip)]
    pub origin: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive such as `info` or `keywatch=debug,rdkafka=warn`.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// A notification still undelivered after this long is marked failed.
    #[serde(deserialize_with = "values::positive_duration")]
    pub max_age: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub webhook_timeout: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub initial_backoff: Duration,
    #[serde(deserialize_with = "values::positive_duration")]
    pub max_backoff: Duration,
}

/// A configuration problem, displayed as one line:
/// `config error: PLACE: KEY: REASON` (the key part only when there is one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SettingsError {
    /// A file path, `environment variable KEYWATCH__...`, or `built-in defaults`.
    pub place: String,
    /// Dotted key path such as `routes[1].webhooks[0].url`.
    pub key: Option<String>,
    pub reason: String,
}

impl Settings {
    /// Loads the layers (shipped defaults, then `file`, then `KEYWATCH__*` variables of the process
    /// environment), appends the entries of every registry file, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Settings::load_with_env(file, &env)
    }

    /// [`Settings::load`] with an explicit environment instead of the process's.
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Settings, SettingsError> {
        load::load(file, env)
    }

    /// A human summary for `keywatch check-config`; secrets show only as "set" / "not set".
    pub fn summary(&self) -> String {
        summary::summary(self)
    }
}

impl SettingsError {
    pub fn new(place: impl Into<String>, key: Option<String>, reason: impl Into<String>) -> Self {
        // One line, whatever the parts contained.
        let one_line = |text: String| text.split_whitespace().collect::<Vec<_>>().join(" ");
        SettingsError {
            place: one_line(place.into()),
            key: key.map(one_line),
            reason: one_line(reason.into()),
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error: {}: ", self.place)?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.reason)
    }
}

impl StoreSettings {
    /// True for `sqlite://` URLs, false for PostgreSQL.
    pub fn is_sqlite(&self) -> bool {
        self.url.starts_with("sqlite://")
    }

    /// The URL with any password replaced by `***`, safe to log.
    pub fn redacted_url(&self) -> String {
        values::redact_url_password(&self.url)
    }
}

impl WebhookSettings {
    /// `scheme://host[:port]/...`: the path and query may carry a token, so logs show only this.
    pub fn redacted_url(&self) -> String {
        values::redact_url_path(&self.url)
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(name, value)| {
                let shown = if values::looks_secret(name) {
                    "[REDACTED]"
                } else {
                    value.as_str()
                };
                (name.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("properties", &properties)
            .finish()
    }
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.redacted_url())
            .finish()
    }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.redacted_url())
            .field("secret", &self.secret)
            .field("secret_env", &self.secret_env)
            .finish()
    }
}
