//! Parsers for single setting values (durations, enums, addresses, URLs), used as serde
//! `deserialize_with` functions so that a bad value is reported with its key path and layer.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Kafka `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

/// Alert severity, ordered `Info < Warning < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (usually port 587).
    Starttls,
    /// TLS from the first byte (usually port 465).
    Tls,
    /// No encryption (a local relay or a test server only).
    None,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    Human,
    Json,
}

/// Formats a duration in the shortest humantime form that reads back to the same value:
/// `4h`, `9d`, `90m`, `30s`, `1500ms`.
pub fn display_duration(duration: Duration) -> String {
    if duration.subsec_nanos() != 0 {
        if duration.subsec_nanos() % 1_000_000 == 0 {
            return format!("{}ms", duration.as_millis());
        }
        return format!("{}ns", duration.as_nanos());
    }
    let seconds = duration.as_secs();
    for (unit_seconds, unit) in [(86_400, "d"), (3_600, "h"), (60, "m")] {
        if seconds != 0 && seconds % unit_seconds == 0 {
            return format!("{}{unit}", seconds / unit_seconds);
        }
    }
    format!("{seconds}s")
}

/// A string-named setting value, parsed case-insensitively (`-` and `_` are interchangeable).
trait NamedValue: Sized + Copy + PartialEq + 'static {
    /// Canonical spelling first; the names listed in error messages.
    const NAMES: &'static [(&'static str, Self)];

    fn parse_name(text: &str) -> Result<Self, String> {
        let wanted = text.trim().to_ascii_lowercase().replace('-', "_");
        Self::NAMES
            .iter()
            .find(|(name, _)| name.to_ascii_lowercase().replace('-', "_") == wanted)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::NAMES.iter().map(|(name, _)| *name).collect();
                format!(
                    "invalid value {text:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }

    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, value)| *value == self)
            .map(|(name, _)| *name)
            .unwrap_or("?")
    }
}

impl NamedValue for SecurityProtocol {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("PLAINTEXT", SecurityProtocol::Plaintext),
        ("SSL", SecurityProtocol::Ssl),
        ("SASL_PLAINTEXT", SecurityProtocol::SaslPlaintext),
        ("SASL_SSL", SecurityProtocol::SaslSsl),
    ];
}

impl NamedValue for Severity {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("info", Severity::Info),
        ("warning", Severity::Warning),
        ("critical", Severity::Critical),
    ];
}

impl NamedValue for SmtpTls {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("starttls", SmtpTls::Starttls),
        ("tls", SmtpTls::Tls),
        ("none", SmtpTls::None),
    ];
}

impl NamedValue for LogFormat {
    const NAMES: &'static [(&'static str, Self)] =
        &[("human", LogFormat::Human), ("json", LogFormat::Json)];
}

/// `FromStr`, `Display`, `Serialize`, `Deserialize` and `as_str` for a [`NamedValue`].
macro_rules! named_value_impls {
    ($($type:ty),+) => {$(
        impl $type {
            /// The canonical spelling, as written in configuration files.
            pub fn as_str(self) -> &'static str {
                NamedValue::name(self)
            }
        }

        impl FromStr for $type {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                <$type as NamedValue>::parse_name(text)
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = deserializer.deserialize_str(StringVisitor("a string"))?;
                text.parse().map_err(de::Error::custom)
            }
        }
    )+};
}

named_value_impls!(SecurityProtocol, Severity, SmtpTls, LogFormat);

impl SecurityProtocol {
    /// The value for librdkafka's `security.protocol`.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// Accepts any string-like value (the `config` crate also offers numbers as strings).
struct StringVisitor(&'static str);

impl Visitor<'_> for StringVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<String, E> {
        Ok(value.to_owned())
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<String, E> {
        Ok(value)
    }
}

/// Parses a humantime duration, with one-line lowercase errors.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| {
        let why = match error {
            humantime::DurationError::UnknownUnit { unit, value, .. } if unit.is_empty() => {
                format!("a time unit is needed, for example {value}s or {value}m")
            }
            humantime::DurationError::UnknownUnit { unit, .. } => {
                format!("unknown time unit {unit:?}")
            }
            humantime::DurationError::InvalidCharacter(at) => {
                format!("invalid character at position {at}")
            }
            humantime::DurationError::NumberExpected(at) => {
                format!("a number is expected at position {at}")
            }
            humantime::DurationError::NumberOverflow => "the number is too large".to_owned(),
            humantime::DurationError::Empty => "the value is empty".to_owned(),
        };
        format!("invalid duration {text:?}: {why}")
    })
}

/// A humantime duration (`"4h"`, `"90m"`, `"30d"`); zero allowed.
pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = deserializer.deserialize_str(StringVisitor("a duration such as \"4h\""))?;
    parse_duration(&text).map_err(de::Error::custom)
}

/// A humantime duration that must be greater than zero.
pub(crate) fn positive_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = deserializer.deserialize_str(StringVisitor("a duration such as \"4h\""))?;
    let value = parse_duration(&text).map_err(de::Error::custom)?;
    if value.is_zero() {
        return Err(de::Error::custom(format!(
            "invalid duration {text:?}: must be greater than zero"
        )));
    }
    Ok(value)
}

pub(crate) fn default_group_wait() -> Duration {
    Duration::from_secs(30)
}

pub(crate) fn empty_secret() -> SecretString {
    SecretString::from(String::new())
}

/// `IP:PORT`, e.g. `127.0.0.1:8080` or `[::]:8080`.
pub(crate) fn listen_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    let text =
        deserializer.deserialize_str(StringVisitor("an address such as \"127.0.0.1:8080\""))?;
    text.trim().parse().map_err(|_| {
        de::Error::custom(format!(
            "invalid listen address {text:?}: expected IP:PORT such as 127.0.0.1:8080 or [::]:8080"
        ))
    })
}

/// `sqlite://PATH`, `postgres://...` or `postgresql://...`.
pub(crate) fn store_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = deserializer.deserialize_str(StringVisitor("a store url"))?;
    let text = text.trim().to_owned();
    let rest = ["sqlite://", "postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| text.strip_prefix(scheme));
    match rest {
        None => Err(de::Error::custom(format!(
            "invalid store url {:?}: expected sqlite://PATH or postgres://USER@HOST/DATABASE",
            redact_url_password(&text)
        ))),
        Some("") => Err(de::Error::custom(format!(
            "invalid store url {:?}: nothing after the scheme",
            text
        ))),
        // A PostgreSQL URL is parsed here, so that a malformed one stops start-up as a
        // configuration error instead of failing later as a connection that could not be made.
        Some(_) if !text.starts_with("sqlite://") => {
            match sqlx::postgres::PgConnectOptions::from_str(&text) {
                Ok(_) => Ok(text),
                Err(e) => Err(de::Error::custom(format!(
                    "invalid store url {:?}: {}",
                    redact_url_password(&text),
                    e.to_string().replace("error with configuration: ", "")
                ))),
            }
        }
        Some(_) => Ok(text),
    }
}

/// A list of paths: a TOML array, or a comma-separated string (from the environment).
pub(crate) fn path_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<PathBuf>, D::Error> {
    struct PathListVisitor;

    impl<'de> Visitor<'de> for PathListVisitor {
        type Value = Vec<PathBuf>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of paths or a comma-separated string")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Vec<PathBuf>, E> {
            Ok(value
                .split(',')
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .map(PathBuf::from)
                .collect())
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<PathBuf>, A::Error> {
            let mut paths = Vec::new();
            while let Some(path) = seq.next_element::<String>()? {
                paths.push(PathBuf::from(path));
            }
            Ok(paths)
        }
    }

    deserializer.deserialize_any(PathListVisitor)
}

/// `scheme://user:***@host...` for a URL with a password; other text unchanged.
pub(crate) fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

/// `scheme://host[:port]/...`: drops credentials, path and query, which may carry tokens.
pub(crate) fn redact_url_path(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "[invalid url]".to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if tail.is_empty() || tail == "/" {
        format!("{scheme}://{host}{tail}")
    } else {
        format!("{scheme}://{host}/...")
    }
}

/// Whether a librdkafka property name looks like it holds a secret.
pub(crate) fn looks_secret(property: &str) -> bool {
    let name = property.to_ascii_lowercase();
    ["password", "secret", "token", "credential", ".pem", "key"]
        .iter()
        .any(|marker| name.contains(marker))
}
