//! The human summary printed by `keywatch check-config`. Secrets appear only as "set"/"not set";
//! webhook URLs only as scheme and host (their paths often carry tokens).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use secrecy::{ExposeSecret, SecretString};

use super::{display_duration, Settings};

pub(super) fn summary(settings: &Settings) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_summary(settings, &mut out);
    out
}

fn set(secret: Option<&SecretString>) -> &'static str {
    match secret {
        Some(secret) if !secret.expose_secret().is_empty() => "set",
        _ => "not set",
    }
}

fn write_summary(settings: &Settings, out: &mut String) -> std::fmt::Result {
    let sources = &settings.sources;
    let file = sources
        .file
        .as_ref()
        .map_or_else(|| "none".to_owned(), |path| path.display().to_string());
    writeln!(
        out,
        "configuration file: {file} (over the built-in defaults)"
    )?;
    if sources.environment.is_empty() {
        writeln!(out, "environment: no KEYWATCH__* variables")?;
    } else {
        writeln!(out, "environment: {}", sources.environment.join(", "))?;
    }

    let kafka = &settings.kafka;
    writeln!(out, "kafka:")?;
    writeln!(out, "  brokers: {}", kafka.brokers)?;
    writeln!(
        out,
        "  topic: {}, consumer group: {}",
        kafka.topic, kafka.group_id
    )?;
    write!(out, "  security: {}", kafka.security_protocol)?;
    if kafka.security_protocol.uses_sasl() {
        write!(
            out,
            ", mechanism {}, username {}, password {}",
            kafka.sasl_mechanism.as_deref().unwrap_or("-"),
            kafka.sasl_username.as_deref().unwrap_or("-"),
            set(kafka.sasl_password.as_ref())
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "  dead-letter topic: {}",
        kafka.dead_letter_topic.as_deref().unwrap_or("none")
    )?;
    if !kafka.properties.is_empty() {
        let names: Vec<&str> = kafka.properties.keys().map(String::as_str).collect();
        writeln!(out, "  extra properties: {}", names.join(", "))?;
    }

    writeln!(out, "store: {}", settings.store.redacted_url())?;
    writeln!(
        out,
        "http: listen {}, api token {}{}",
        settings.http.listen,
        set(settings.http.api_token.as_ref()),
        if settings.http.api_token.is_none() {
            " (mutating endpoints disabled)"
        } else {
            ""
        }
    )?;

    let lifecycle = &settings.lifecycle;
    writeln!(
        out,
        "lifecycle: rewrap deadline {}, soft-delete period {}, restore window {}, dual-auth window {}, purge after {}",
        display_duration(lifecycle.rewrap_deadline),
        display_duration(lifecycle.soft_delete_period),
        display_duration(lifecycle.restore_window),
        display_duration(lifecycle.dual_auth_window),
        display_duration(lifecycle.purge_after),
    )?;

    let smtp = &settings.smtp;
    match &smtp.host {
        Some(host) => writeln!(
            out,
            "smtp: {host}:{} ({}), from {}, username {}, password {}, timeout {}",
            smtp.port,
            smtp.tls,
            smtp.from.as_deref().unwrap_or("-"),
            smtp.username.as_deref().unwrap_or("-"),
            set(smtp.password.as_ref()),
            display_duration(smtp.timeout),
        )?,
        None => writeln!(out, "smtp: not configured (no e-mail)")?,
    }

    writeln!(out, "routes: {}", settings.routes.len())?;
    for route in &settings.routes {
        let kinds = route
            .kinds
            .as_ref()
            .map_or_else(|| "all kinds".to_owned(), |kinds| kinds.join(", "));
        write!(
            out,
            "  {}: {} and above, {kinds}",
            route.name, route.min_severity
        )?;
        if !route.match_labels.is_empty() {
            let labels: Vec<String> = route
                .match_labels
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            write!(out, ", labels {}", labels.join(","))?;
        }
        writeln!(out, ", group wait {}", display_duration(route.group_wait))?;
        if !route.email.is_empty() {
            writeln!(out, "    email: {}", route.email.join(", "))?;
        }
        for webhook in &route.webhooks {
            writeln!(
                out,
                "    webhook: {} (secret {})",
                webhook.redacted_url(),
                if webhook.secret_env.is_some() {
                    "set, from the environment"
                } else {
                    "set"
                }
            )?;
        }
    }

    let keys: BTreeSet<&str> = settings
        .deployments
        .iter()
        .map(|deployment| deployment.key.as_str())
        .collect();
    writeln!(
        out,
        "registry: {} deployment(s) on {} key(s), {} authorization(s)",
        settings.deployments.len(),
        keys.len(),
        settings.authorizations.len()
    )?;
    for path in &settings.registry_files {
        writeln!(out, "  registry file: {}", path.display())?;
    }

    writeln!(
        out,
        "log: {} format, level {}",
        settings.log.format, settings.log.level
    )?;
    let delivery = &settings.delivery;
    writeln!(
        out,
        "delivery: give up after {}, webhook timeout {}, backoff {} to {}",
        display_duration(delivery.max_age),
        display_duration(delivery.webhook_timeout),
        display_duration(delivery.initial_backoff),
        display_duration(delivery.max_backoff),
    )?;
    Ok(())
}
