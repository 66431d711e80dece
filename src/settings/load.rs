//! Layering (defaults -> file -> environment) with the `config` crate, registry files, and the
//! translation of `config`/`toml` errors into one-line [`SettingsError`]s that name their layer.
//!
//! To say which layer a bad value came from, the layers are deserialized twice: defaults + file
//! first (an error there is the file's, the shipped defaults being known good), then with the
//! environment on top (a new error there is the environment's).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use config::{Config, ConfigError, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::validate;
use super::{AuthorizationEntry, DeploymentEntry, Settings, SettingsError, DEFAULT_CONFIG_TOML};

/// How errors in the shipped defaults are placed (they can only happen if the file is broken).
pub(super) const DEFAULTS_PLACE: &str = "built-in defaults (config/default.toml)";

/// How a missing setting is placed when no config file was given.
const UNSET_PLACE: &str = "configuration (no file given)";

const ENV_PREFIX: &str = "keywatch__";

/// A registry file: deployments and authorizations, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    deployments: Vec<DeploymentEntry>,
    #[serde(default)]
    authorizations: Vec<AuthorizationEntry>,
}

/// A TOML file read and syntax-checked.
pub(super) struct TomlFile {
    /// As shown in messages: the path as given (or as resolved for registry files).
    pub(super) display: String,
    text: String,
    pub(super) table: toml::Table,
}

/// One `KEYWATCH__*` variable: its name and the dotted key path it sets.
pub(super) struct EnvSetting {
    pub(super) name: String,
    pub(super) key: String,
}

/// What the validation needs to say where a value came from.
pub(super) struct Layers<'a> {
    pub(super) defaults: toml::Table,
    pub(super) file: Option<&'a TomlFile>,
    pub(super) env: &'a [EnvSetting],
}

impl Layers<'_> {
    /// The layer that set `key` last: an environment variable, the file, or the defaults. A key
    /// set nowhere (a required setting is missing) belongs in the file, if there is one.
    pub(super) fn place_of(&self, key: &str) -> String {
        if let Some(setting) = self.env.iter().find(|setting| setting.key == key) {
            return format!("environment variable {}", setting.name);
        }
        match self.file {
            Some(file) if table_has_path(&file.table, key) => file.display.clone(),
            _ if table_has_path(&self.defaults, key) => DEFAULTS_PLACE.to_owned(),
            Some(file) => file.display.clone(),
            None => UNSET_PLACE.to_owned(),
        }
    }

    /// The place of a file-only section (routes, deployments, authorizations).
    pub(super) fn file_place(&self) -> String {
        self.file
            .map_or_else(|| DEFAULTS_PLACE.to_owned(), |file| file.display.clone())
    }
}

pub(super) fn load(
    file: Option<&Path>,
    env: &[(String, String)],
) -> Result<Settings, SettingsError> {
    let user_file = file.map(read_toml_file).transpose()?;
    let keywatch_env: Vec<&(String, String)> = env
        .iter()
        .filter(|(name, value)| {
            name.len() > ENV_PREFIX.len()
                && name.to_ascii_lowercase().starts_with(ENV_PREFIX)
                && !value.is_empty()
        })
        .collect();
    let env_settings: Vec<EnvSetting> = keywatch_env
        .iter()
        .map(|(name, _)| EnvSetting {
            name: name.clone(),
            // The prefix is ASCII, so the lower-cased name has it at the same length.
            key: name.to_ascii_lowercase()[ENV_PREFIX.len()..].replace("__", "."),
        })
        .collect();

    // Defaults + file: an error here is the file's.
    let file_place = user_file
        .as_ref()
        .map_or(DEFAULTS_PLACE, |file| file.display.as_str());
    let mut settings: Settings =
        deserialize(layered(user_file.as_ref(), None), |_| file_place.to_owned())?;

    // + environment: a new error here is the environment's.
    if !env_settings.is_empty() {
        let env_map: config::Map<String, String> =
            keywatch_env.iter().map(|&pair| pair.clone()).collect();
        settings = deserialize(layered(user_file.as_ref(), Some(env_map)), |key| {
            env_place(&env_settings, key)
        })?;
        dot_env_kafka_properties(&mut settings, &env_settings);
    }

    settings.sources.file = file.map(Path::to_path_buf);
    settings.sources.environment = env_settings.iter().map(|s| s.name.clone()).collect();

    let layers = Layers {
        defaults: parse_toml(DEFAULT_CONFIG_TOML)
            .map_err(|reason| SettingsError::new(DEFAULTS_PLACE, None, reason))?,
        file: user_file.as_ref(),
        env: &env_settings,
    };
    resolve_webhook_secrets(&mut settings, env, &layers)?;
    let inline_place = layers.file_place();
    for (index, deployment) in settings.deployments.iter_mut().enumerate() {
        deployment.origin = format!("{inline_place}: deployments[{index}]");
    }
    for (index, authorization) in settings.authorizations.iter_mut().enumerate() {
        authorization.origin = format!("{inline_place}: authorizations[{index}]");
    }

    // Registry files are relative to the file that names them (or to the working directory when
    // they came from the environment).
    let registry_from_env = env_settings.iter().any(|s| s.key == "registry_files");
    let base_dir = file
        .filter(|_| !registry_from_env)
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    if let Some(base_dir) = base_dir {
        for path in &mut settings.registry_files {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
    }
    load_registry_files(&mut settings, &layers)?;

    validate::validate(&mut settings, &layers)?;
    Ok(settings)
}

/// Reads and parses a TOML file, reporting syntax errors with line and column.
fn read_toml_file(path: &Path) -> Result<TomlFile, SettingsError> {
    let display = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|error| SettingsError::new(&display, None, describe_io_error(&error)))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| SettingsError::new(&display, None, "the file is not valid utf-8"))?;
    let table = parse_toml(&text).map_err(|reason| SettingsError::new(&display, None, reason))?;
    Ok(TomlFile {
        display,
        text,
        table,
    })
}

/// Parses TOML text; the error says where (line, column) and what, on one line.
pub(super) fn parse_toml(text: &str) -> Result<toml::Table, String> {
    text.parse::<toml::Table>().map_err(|error| {
        // The parser's message may span lines ("invalid string\nexpected ...").
        let message = error
            .message()
            .lines()
            .map(|line| line.trim().trim_end_matches('.'))
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        match error.span() {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                format!("line {line}, column {column}: invalid toml: {message}")
            }
            None => format!("invalid toml: {message}"),
        }
    })
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn describe_io_error(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::NotFound => "cannot read the file: it does not exist".to_owned(),
        std::io::ErrorKind::PermissionDenied => {
            "cannot read the file: permission denied".to_owned()
        }
        std::io::ErrorKind::IsADirectory => "cannot read the file: it is a directory".to_owned(),
        _ => format!(
            "cannot read the file: {}",
            lowercase_first(&error.to_string())
        ),
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The `config` layers: shipped defaults, then the file, then (if given) the environment.
fn layered(
    file: Option<&TomlFile>,
    env: Option<config::Map<String, String>>,
) -> Result<Config, ConfigError> {
    let mut builder =
        Config::builder().add_source(File::from_str(DEFAULT_CONFIG_TOML, FileFormat::Toml));
    if let Some(file) = file {
        builder = builder.add_source(File::from_str(&file.text, FileFormat::Toml));
    }
    if let Some(env) = env {
        builder = builder.add_source(
            Environment::with_prefix("KEYWATCH")
                .prefix_separator("__")
                .separator("__")
                .ignore_empty(true)
                .source(Some(env)),
        );
    }
    builder.build()
}

/// Deserializes a built configuration; `place_of_key` names the layer to blame for a key path.
fn deserialize<T: DeserializeOwned>(
    config: Result<Config, ConfigError>,
    place_of_key: impl Fn(&str) -> String,
) -> Result<T, SettingsError> {
    let result = config.and_then(Config::try_deserialize::<T>);
    result.map_err(|error| {
        let (key, reason) = describe_config_error(error);
        let place = place_of_key(key.as_deref().unwrap_or(""));
        SettingsError::new(place, key, reason)
    })
}

/// The environment variable to blame for an error at `key`.
fn env_place(env: &[EnvSetting], key: &str) -> String {
    let exact = env.iter().find(|setting| setting.key == key);
    // The variable set something below `key` (a wrong type for the table)...
    let below = || {
        env.iter()
            .find(|setting| setting.key.starts_with(&format!("{key}.")))
    };
    // ... or replaced a table above `key` by a string.
    let above = || {
        env.iter().find(|setting| {
            key.starts_with(&format!("{}.", setting.key))
                || key.starts_with(&format!("{}[", setting.key))
        })
    };
    match exact.or_else(below).or_else(above) {
        Some(setting) => format!("environment variable {}", setting.name),
        None => "environment variables KEYWATCH__*".to_owned(),
    }
}

/// Splits a `config` error into a key path and a one-line lowercase reason.
fn describe_config_error(error: ConfigError) -> (Option<String>, String) {
    match error {
        ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            let unexpected = unexpected.to_string();
            let reason = match unexpected.split('`').nth(1) {
                // A number of the wrong size, not of the wrong type.
                Some(number) if unexpected.contains("integer") && expected.contains("integer") => {
                    format!("invalid value {number}: out of range, expected {expected}")
                }
                _ => format!("invalid type: {unexpected}, expected {expected}"),
            };
            (key.map(|key| normalize_key(&key)), toml_words(&reason))
        }
        ConfigError::At { error, key, .. } => {
            let (inner_key, reason) = describe_config_error(*error);
            let key = match (key.map(|key| normalize_key(&key)), inner_key) {
                (Some(outer), Some(inner)) if inner.starts_with('[') => Some(outer + &inner),
                (Some(outer), Some(inner)) => Some(format!("{outer}.{inner}")),
                (outer, inner) => outer.or(inner),
            };
            (key, reason)
        }
        ConfigError::NotFound(key) => (Some(normalize_key(&key)), "missing required key".into()),
        ConfigError::Message(message) => {
            let (key, reason) = describe_serde_message(&message);
            (key, toml_words(&reason))
        }
        ConfigError::FileParse { cause, .. } => (None, format!("invalid toml: {cause}")),
        other => (None, other.to_string()),
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" becomes key `x`, "unknown key (...)".
fn describe_serde_message(message: &str) -> (Option<String>, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let known = tail
                .trim_start_matches(", ")
                .replace("expected one of ", "")
                .replace("expected ", "")
                .replace(" or ", ", ")
                .replace('`', "");
            let reason = if known.is_empty() || known.starts_with("there are no fields") {
                "unknown key".to_owned()
            } else {
                format!("unknown key (known keys here: {known})")
            };
            return (Some(field.to_owned()), reason);
        }
    }
    (None, message.to_owned())
}

/// serde's data model words -> TOML's in "invalid type: X, expected Y": map and struct -> table,
/// sequence -> array. Only X and Y are touched, never a quoted value.
fn toml_words(reason: &str) -> String {
    fn word(text: &str) -> &str {
        match text {
            "map" => "table",
            "sequence" => "array",
            "a map" => "a table",
            "a sequence" => "an array",
            _ if text.starts_with("struct ") => "a table",
            _ => text,
        }
    }
    match reason
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.rsplit_once(", expected "))
    {
        Some((unexpected, expected)) => format!(
            "invalid type: {}, expected {}",
            word(unexpected),
            word(expected)
        ),
        None => reason.to_owned(),
    }
}

/// `deployments[0]crn` (how `config` joins an index and a field) -> `deployments[0].crn`.
fn normalize_key(key: &str) -> String {
    let mut normalized = String::with_capacity(key.len() + 4);
    let mut previous = None;
    for character in key.chars() {
        if previous == Some(']') && character != '[' && character != '.' {
            normalized.push('.');
        }
        normalized.push(character);
        previous = Some(character);
    }
    normalized
}

fn table_has_path(table: &toml::Table, key: &str) -> bool {
    let mut current = table;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        match current.get(part) {
            Some(toml::Value::Table(inner)) if parts.peek().is_some() => current = inner,
            Some(_) => return parts.peek().is_none(),
            None => return false,
        }
    }
    false
}

/// `KEYWATCH__KAFKA__PROPERTIES__SSL_CA_LOCATION` sets `ssl.ca.location`: librdkafka property
/// names use dots, which environment variable names cannot hold.
fn dot_env_kafka_properties(settings: &mut Settings, env: &[EnvSetting]) {
    for setting in env {
        let Some(name) = setting.key.strip_prefix("kafka.properties.") else {
            continue;
        };
        if let Some(value) = settings.kafka.properties.remove(name) {
            settings
                .kafka
                .properties
                .insert(name.replace('_', "."), value);
        }
    }
}

/// Fills `secret` of webhooks that name an environment variable in `secret_env`.
fn resolve_webhook_secrets(
    settings: &mut Settings,
    env: &[(String, String)],
    layers: &Layers<'_>,
) -> Result<(), SettingsError> {
    for (route_index, route) in settings.routes.iter_mut().enumerate() {
        for (index, webhook) in route.webhooks.iter_mut().enumerate() {
            let Some(variable) = &webhook.secret_env else {
                continue;
            };
            let key = format!("routes[{route_index}].webhooks[{index}]");
            let fail = |field: &str, reason: String| {
                SettingsError::new(layers.file_place(), Some(format!("{key}.{field}")), reason)
            };
            if !webhook.secret.expose_secret().is_empty() {
                return Err(fail(
                    "secret",
                    "set either secret or secret_env, not both".to_owned(),
                ));
            }
            let value = env
                .iter()
                .find(|(name, _)| name == variable)
                .map(|(_, value)| value.as_str())
                .unwrap_or_default();
            if value.is_empty() {
                return Err(fail(
                    "secret_env",
                    format!("environment variable {variable} is not set or empty"),
                ));
            }
            webhook.secret = SecretString::from(value.to_owned());
        }
    }
    Ok(())
}

/// Appends the deployments and authorizations of every registry file, in order.
fn load_registry_files(settings: &mut Settings, layers: &Layers<'_>) -> Result<(), SettingsError> {
    let mut seen = BTreeSet::new();
    for (index, path) in settings.registry_files.iter().enumerate() {
        if !seen.insert(normalize_path(path)) {
            return Err(SettingsError::new(
                layers.place_of("registry_files"),
                Some(format!("registry_files[{index}]")),
                format!("{} is listed twice", path.display()),
            ));
        }
        let file = read_toml_file(path)?;
        let registry: RegistryFile = deserialize(
            Config::builder()
                .add_source(File::from_str(&file.text, FileFormat::Toml))
                .build(),
            |_| file.display.clone(),
        )?;
        for (index, mut deployment) in registry.deployments.into_iter().enumerate() {
            deployment.origin = format!("{}: deployments[{index}]", file.display);
            settings.deployments.push(deployment);
        }
        for (index, mut authorization) in registry.authorizations.into_iter().enumerate() {
            authorization.origin = format!("{}: authorizations[{index}]", file.display);
            settings.authorizations.push(authorization);
        }
    }
    Ok(())
}

/// The same file named two ways (`a/../b.toml`, `./b.toml`) compares equal when it exists.
fn normalize_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
