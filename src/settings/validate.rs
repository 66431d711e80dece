//! Checks that span several values (SASL needs credentials, e-mail routes need SMTP, ...) and the
//! contents of routes, webhooks and registry entries. Single values were parsed on the way in.

use std::collections::BTreeSet;

use base64::Engine as _;
use secrecy::ExposeSecret;

use super::load::Layers;
use super::{Settings, SettingsError, ALERT_KINDS, KAFKA_MANAGED_PROPERTIES};

const SASL_MECHANISMS: &[&str] = &[
    "PLAIN",
    "SCRAM-SHA-256",
    "SCRAM-SHA-512",
    "OAUTHBEARER",
    "GSSAPI",
];
/// Mechanisms that authenticate with `sasl_username` and `sasl_password`.
const SASL_PASSWORD_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
const AUTHORIZATION_TARGETS: &[&str] = &["kms", "hs-crypto"];
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Validates (and normalizes: SASL mechanism upper case) the loaded settings.
pub(super) fn validate(settings: &mut Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    validate_kafka(settings, layers)?;
    validate_http(settings, layers)?;
    validate_routes(settings, layers)?;
    validate_smtp(settings, layers)?;
    validate_registry(settings)?;
    validate_log(settings, layers)?;
    validate_delivery(settings, layers)?;
    Ok(())
}

/// An error at a top-level `key`, placed in the layer that set it.
fn at(layers: &Layers<'_>, key: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError::new(layers.place_of(key), Some(key.to_owned()), reason)
}

fn blank(text: &str) -> bool {
    text.trim().is_empty()
}

/// One entry of `kafka.brokers`: `host`, `host:port`, `[ipv6]:port`, optionally after a
/// `protocol://` prefix, as librdkafka reads `bootstrap.servers`. A host of digits only (a number
/// given where a list was meant, `brokers = 5`) and a port outside 1-65535 are refused.
fn broker_entry_ok(entry: &str) -> bool {
    let e = entry.trim();
    let e = e.split_once("://").map_or(e, |(_, rest)| rest);
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
    let (host, port) = if let Some(rest) = e.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, tail)) => match tail.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return false,
            },
            None => return false,
        }
    } else if e.matches(':').count() == 1 {
        let (h, p) = e.split_once(':').expect("one colon");
        (h, Some(p))
    } else {
        (e, None) // a host alone, or an unbracketed IPv6 address
    };
    !blank(host) && !host.bytes().all(|b| b.is_ascii_digit()) && port.is_none_or(port_ok)
}

fn validate_kafka(settings: &mut Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    let kafka = &mut settings.kafka;
    if kafka.brokers.split(',').any(|b| !broker_entry_ok(b)) {
        return Err(at(
            layers,
            "kafka.brokers",
            format!(
                "invalid broker list {:?}: expected host:port entries separated by commas",
                kafka.brokers
            ),
        ));
    }
    for (key, value) in [
        ("kafka.topic", &kafka.topic),
        ("kafka.group_id", &kafka.group_id),
    ] {
        if blank(value) {
            return Err(at(layers, key, "must not be empty"));
        }
    }
    if let Some(topic) = &kafka.dead_letter_topic {
        if blank(topic) {
            return Err(at(
                layers,
                "kafka.dead_letter_topic",
                "must not be empty (leave it out to disable dead-lettering)",
            ));
        }
        if *topic == kafka.topic {
            return Err(at(
                layers,
                "kafka.dead_letter_topic",
                format!("must differ from kafka.topic ({topic:?}): invalid records would be consumed again"),
            ));
        }
    }

    if kafka.security_protocol.uses_sasl() {
        let Some(mechanism) = &kafka.sasl_mechanism else {
            return Err(at(
                layers,
                "kafka.sasl_mechanism",
                format!(
                    "required with security_protocol {} (Event Streams uses PLAIN)",
                    kafka.security_protocol
                ),
            ));
        };
        let normalized = mechanism.trim().to_ascii_uppercase();
        if !SASL_MECHANISMS.contains(&normalized.as_str()) {
            return Err(at(
                layers,
                "kafka.sasl_mechanism",
                format!(
                    "invalid value {mechanism:?}: expected one of {}",
                    SASL_MECHANISMS.join(", ")
                ),
            ));
        }
        if SASL_PASSWORD_MECHANISMS.contains(&normalized.as_str()) {
            if kafka.sasl_username.as_deref().is_none_or(blank) {
                return Err(at(
                    layers,
                    "kafka.sasl_username",
                    format!(
                        "required with sasl_mechanism {normalized} (Event Streams uses \"token\")"
                    ),
                ));
            }
            if kafka
                .sasl_password
                .as_ref()
                .is_none_or(|password| password.expose_secret().is_empty())
            {
                return Err(at(
                    layers,
                    "kafka.sasl_password",
                    format!(
                        "required with sasl_mechanism {normalized}; set it with KEYWATCH__KAFKA__SASL_PASSWORD"
                    ),
                ));
            }
        }
        kafka.sasl_mechanism = Some(normalized);
    } else {
        let stray = [
            ("kafka.sasl_mechanism", kafka.sasl_mechanism.is_some()),
            ("kafka.sasl_username", kafka.sasl_username.is_some()),
            ("kafka.sasl_password", kafka.sasl_password.is_some()),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(at(
                layers,
                key,
                format!(
                    "set, but security_protocol is {}; SASL settings need SASL_PLAINTEXT or SASL_SSL",
                    kafka.security_protocol
                ),
            ));
        }
    }

    for name in kafka.properties.keys() {
        let key = format!("kafka.properties.{name}");
        if blank(name) {
            return Err(at(layers, &key, "a property name must not be empty"));
        }
        if KAFKA_MANAGED_PROPERTIES.contains(&name.as_str()) {
            let reason = match name.as_str() {
                "enable.auto.commit" | "enable.auto.offset.store" => {
                    "managed by keywatch: offsets are committed only after events are processed"
                        .to_owned()
                }
                _ => "managed by keywatch: use the kafka settings of the same meaning".to_owned(),
            };
            return Err(at(layers, &key, reason));
        }
    }
    Ok(())
}

fn validate_http(settings: &Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    if let Some(token) = &settings.http.api_token {
        if blank(token.expose_secret()) {
            return Err(at(
                layers,
                "http.api_token",
                "must not be empty (leave it out to disable the mutating endpoints)",
            ));
        }
    }
    Ok(())
}

fn validate_smtp(settings: &Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    let smtp = &settings.smtp;
    if smtp.host.as_deref().is_some_and(blank) {
        return Err(at(layers, "smtp.host", "must not be empty"));
    }
    if smtp.port == 0 {
        return Err(at(layers, "smtp.port", "must be between 1 and 65535"));
    }
    if let Some(from) = &smtp.from {
        if !is_email_address(from) {
            return Err(at(
                layers,
                "smtp.from",
                format!("invalid e-mail address {from:?}: expected an address such as keywatch@example.com"),
            ));
        }
    }
    let has_password = smtp
        .password
        .as_ref()
        .is_some_and(|password| !password.expose_secret().is_empty());
    match (&smtp.username, has_password) {
        (Some(_), false) => {
            return Err(at(
                layers,
                "smtp.password",
                "required with smtp.username; set it with KEYWATCH__SMTP__PASSWORD",
            ))
        }
        (None, true) => return Err(at(layers, "smtp.username", "required with smtp.password")),
        _ => {}
    }
    if let Some(route) = settings.routes.iter().find(|route| !route.email.is_empty()) {
        for (key, set) in [
            ("smtp.host", smtp.host.is_some()),
            ("smtp.from", smtp.from.is_some()),
        ] {
            if !set {
                return Err(at(
                    layers,
                    key,
                    format!("not set, but route {:?} sends e-mail", route.name),
                ));
            }
        }
    }
    Ok(())
}

fn validate_routes(settings: &Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    let place = layers.file_place();
    let mut names = BTreeSet::new();
    for (route_index, route) in settings.routes.iter().enumerate() {
        let fail = |field: &str, reason: String| {
            let key = if field.is_empty() {
                format!("routes[{route_index}]")
            } else {
                format!("routes[{route_index}].{field}")
            };
            SettingsError::new(&place, Some(key), reason)
        };
        if blank(&route.name) {
            return Err(fail("name", "must not be empty".to_owned()));
        }
        if !names.insert(route.name.as_str()) {
            return Err(fail(
                "name",
                format!("duplicate route name {:?}", route.name),
            ));
        }
        if route.email.is_empty() && route.webhooks.is_empty() {
            return Err(fail(
                "",
                format!(
                    "route {:?} has no receivers: set email or webhooks",
                    route.name
                ),
            ));
        }
        if let Some(kinds) = &route.kinds {
            if kinds.is_empty() {
                return Err(fail(
                    "kinds",
                    "is empty and would match nothing; leave it out to match every kind".to_owned(),
                ));
            }
            for (index, kind) in kinds.iter().enumerate() {
                if !ALERT_KINDS.contains(&kind.as_str()) {
                    return Err(fail(
                        &format!("kinds[{index}]"),
                        format!(
                            "unknown alert kind {kind:?}: expected one of {}",
                            ALERT_KINDS.join(", ")
                        ),
                    ));
                }
            }
        }
        for label in route.match_labels.keys() {
            if blank(label) {
                return Err(fail(
                    "match_labels",
                    "a label name must not be empty".to_owned(),
                ));
            }
        }
        for (index, address) in route.email.iter().enumerate() {
            if address != "owners" && !is_email_address(address) {
                return Err(fail(
                    &format!("email[{index}]"),
                    format!(
                        "invalid e-mail address {address:?}: expected an address such as ops@example.com or the word owners"
                    ),
                ));
            }
        }
        for (index, webhook) in route.webhooks.iter().enumerate() {
            let field = |name: &str| format!("webhooks[{index}].{name}");
            if let Err(reason) = check_webhook_url(&webhook.url) {
                return Err(fail(&field("url"), reason));
            }
            if let Err(reason) = check_webhook_secret(webhook.secret.expose_secret()) {
                return Err(fail(&field("secret"), reason));
            }
        }
    }
    Ok(())
}

fn check_webhook_url(url: &str) -> Result<(), String> {
    let shown = super::values::redact_url_path(url);
    let parsed = reqwest::Url::parse(url)
        .map_err(|error| format!("invalid webhook url {shown:?}: {error}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "invalid webhook url {shown:?}: expected an http:// or https:// url"
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid webhook url {shown:?}: no host"));
    }
    Ok(())
}

/// A Standard Webhooks secret: `whsec_` + standard base64 of the key, or raw bytes.
fn check_webhook_secret(secret: &str) -> Result<(), String> {
    if secret.is_empty() {
        return Err("must not be empty: set secret or secret_env".to_owned());
    }
    if let Some(encoded) = secret.strip_prefix("whsec_") {
        match base64::engine::general_purpose::STANDARD.decode(encoded) {
            Ok(key) if !key.is_empty() => {}
            Ok(_) => return Err("the whsec_ secret holds no key bytes".to_owned()),
            Err(_) => {
                return Err(
                    "a secret starting with whsec_ must continue with standard base64 (the secret itself is not shown)"
                        .to_owned(),
                )
            }
        }
    }
    Ok(())
}

/// Deployments and authorizations: what is not the registry module's (CRN syntax, uniqueness).
fn validate_registry(settings: &Settings) -> Result<(), SettingsError> {
    for deployment in &settings.deployments {
        let (place, key) = split_origin(&deployment.origin);
        let fail = |field: String, reason: String| {
            SettingsError::new(&place, Some(format!("{key}.{field}")), reason)
        };
        for (index, owner) in deployment.owners.iter().enumerate() {
            if !is_email_address(owner) {
                return Err(fail(
                    format!("owners[{index}]"),
                    format!("invalid e-mail address {owner:?}: expected an address such as team@example.com"),
                ));
            }
        }
        if deployment.labels.keys().any(|label| blank(label)) {
            return Err(fail(
                "labels".to_owned(),
                "a label name must not be empty".to_owned(),
            ));
        }
    }

    let mut ids = BTreeSet::new();
    for authorization in &settings.authorizations {
        let (place, key) = split_origin(&authorization.origin);
        let fail = |field: &str, reason: String| {
            SettingsError::new(&place, Some(format!("{key}.{field}")), reason)
        };
        for (field, value) in [
            ("id", &authorization.id),
            ("source_service", &authorization.source_service),
        ] {
            if blank(value) {
                return Err(fail(field, "must not be empty".to_owned()));
            }
        }
        if !AUTHORIZATION_TARGETS.contains(&authorization.target_service.as_str()) {
            return Err(fail(
                "target_service",
                format!(
                    "invalid value {:?}: expected kms or hs-crypto",
                    authorization.target_service
                ),
            ));
        }
        if !ids.insert(authorization.id.as_str()) {
            return Err(fail(
                "id",
                format!("duplicate authorization id {:?}", authorization.id),
            ));
        }
    }
    Ok(())
}

fn validate_log(settings: &Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    let level = settings.log.level.trim();
    if level.is_empty() {
        return Err(at(
            layers,
            "log.level",
            "must not be empty (for example \"info\")",
        ));
    }
    // A bare word is a valid EnvFilter target, but here it is almost always a mistyped level.
    for directive in level.split(',').map(str::trim) {
        if !directive.contains('=')
            && !directive.contains('[')
            && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(at(
                layers,
                "log.level",
                format!(
                    "invalid directive {directive:?}: expected a level ({}) or target=level",
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
    }
    if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(level) {
        return Err(at(
            layers,
            "log.level",
            format!("invalid filter {level:?}: {error}"),
        ));
    }
    Ok(())
}

fn validate_delivery(settings: &Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    let delivery = &settings.delivery;
    if delivery.initial_backoff > delivery.max_backoff {
        return Err(at(
            layers,
            "delivery.initial_backoff",
            format!(
                "{} is longer than delivery.max_backoff ({})",
                super::display_duration(delivery.initial_backoff),
                super::display_duration(delivery.max_backoff)
            ),
        ));
    }
    Ok(())
}

/// `"file.toml: deployments[2]"` -> (`"file.toml"`, `"deployments[2]"`).
fn split_origin(origin: &str) -> (String, String) {
    match origin.rsplit_once(": ") {
        Some((place, key)) => (place.to_owned(), key.to_owned()),
        None => (origin.to_owned(), String::new()),
    }
}

/// `local@domain` with no spaces; display names (`Ops <ops@example.com>`) are accepted.
fn is_email_address(text: &str) -> bool {
    let address = match (text.find('<'), text.rfind('>')) {
        (Some(start), Some(end)) if start < end && text.ends_with('>') => &text[start + 1..end],
        _ => text,
    };
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !address.chars().any(char::is_whitespace)
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}
