use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use tempfile::TempDir;

use super::*;

/// One of the shared scenario configs (samples/scenarios/rotation-and-rewrap), verbatim.
const SCENARIO_ROTATION: &str = r#"[lifecycle]
rewrap_deadline = "4h"
soft_delete_period = "9d"
restore_window = "30d"

[[deployments]]
crn = "crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03ea00000005::"
name = "es-0"
key = "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03ea00000001:key:00000000-0000-0000-0000-03ea00000002"
owners = ["team@example.com"]
resources = []

[[deployments]]
crn = "crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03ea00000006::"
name = "es-1"
key = "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03ea00000003:key:00000000-0000-0000-0000-03ea00000004"
owners = ["team@example.com"]
resources = []

[[deployments]]
crn = "crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03ea00000007::"
name = "es-2"
key = "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03ea00000003:key:00000000-0000-0000-0000-03ea00000004"
owners = ["team@example.com"]
resources = []
"#;

/// The scenario ack-failures: a deployment with `resources`.
const SCENARIO_ACK_FAILURES: &str = r#"[lifecycle]
rewrap_deadline = "4h"
soft_delete_period = "9d"
restore_window = "30d"

[[deployments]]
crn = "crn:v1:bluemix:public:messagehub:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03eb00000006::"
name = "es-0"
key = "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03eb00000001:key:00000000-0000-0000-0000-03eb00000002"
owners = ["team@example.com"]
resources = ["crn:v1:bluemix:public:is:us-south-1:a/f047b55a3362ac06afad8a3f2f5586ea::volume:r006-00000000-0000-0000-0000-03eb00000005"]
"#;

const ES_CRN: &str = "crn:v1:bluemix:public:messagehub:us-south:a/acc:inst-1::";
const KEY_CRN: &str = "crn:v1:bluemix:public:kms:us-south:a/acc:kp-1:key:k-1";

/// A temporary directory with files in it; configs are loaded from there.
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create directories");
        std::fs::write(&path, text).expect("write file");
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Loads `text` as the config file `kw.toml` with the given environment.
fn load_text_env(text: &str, vars: &[(&str, &str)]) -> (Files, Result<Settings, SettingsError>) {
    let files = Files::new();
    let path = files.write("kw.toml", text);
    let result = Settings::load_with_env(Some(&path), &env(vars));
    (files, result)
}

fn load_text(text: &str) -> Settings {
    match load_text_env(text, &[]).1 {
        Ok(settings) => settings,
        Err(error) => panic!("expected the config to load, got: {error}"),
    }
}

/// The error message for `text` loaded as `kw.toml`, with the temporary path replaced by `kw.toml`.
fn error_env(text: &str, vars: &[(&str, &str)]) -> String {
    let (files, result) = load_text_env(text, vars);
    match result {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains('\n'), "not one line: {message}");
            message.replace(&files.path("kw.toml").display().to_string(), "kw.toml")
        }
    }
}

fn error(text: &str) -> String {
    error_env(text, &[])
}

const WEBHOOK_ROUTE: &str = r#"
[[routes]]
name = "ops"
webhooks = [{ url = "https://hooks.example.com/in", secret = "whsec_c2VjcmV0LWtleS1ieXRlcw==" }]
"#;

#[test]
fn the_built_in_defaults_load_and_are_safe() {
    let settings = Settings::load_with_env(None, &[]).expect("defaults load");
    assert_eq!(settings.kafka.brokers, "127.0.0.1:9092");
    assert_eq!(settings.kafka.topic, "activity-tracker");
    assert_eq!(settings.kafka.group_id, "keywatch");
    assert_eq!(
        settings.kafka.security_protocol,
        SecurityProtocol::Plaintext
    );
    assert!(settings.kafka.sasl_password.is_none());
    assert!(settings.kafka.dead_letter_topic.is_none());
    assert!(settings.kafka.properties.is_empty());
    assert_eq!(settings.store.url, "sqlite://data/keywatch.db");
    assert_eq!(settings.http.listen.to_string(), "127.0.0.1:8080");
    assert!(settings.http.api_token.is_none());
    let hours = |n: u64| Duration::from_secs(n * 3600);
    assert_eq!(settings.lifecycle.rewrap_deadline, hours(4));
    assert_eq!(settings.lifecycle.soft_delete_period, hours(9 * 24));
    assert_eq!(settings.lifecycle.restore_window, hours(30 * 24));
    assert_eq!(settings.lifecycle.dual_auth_window, hours(7 * 24));
    assert_eq!(settings.lifecycle.purge_after, hours(90 * 24));
    assert_eq!(settings.smtp.host, None);
    assert_eq!(settings.smtp.port, 587);
    assert_eq!(settings.smtp.tls, SmtpTls::Starttls);
    assert_eq!(settings.smtp.timeout, Duration::from_secs(10));
    assert_eq!(settings.log.format, LogFormat::Human);
    assert_eq!(settings.log.level, "info");
    assert_eq!(settings.delivery.max_age, hours(24));
    assert_eq!(settings.delivery.webhook_timeout, Duration::from_secs(10));
    assert_eq!(settings.delivery.initial_backoff, Duration::from_secs(1));
    assert_eq!(settings.delivery.max_backoff, Duration::from_secs(300));
    assert!(settings.routes.is_empty());
    assert!(settings.deployments.is_empty());
    assert!(settings.authorizations.is_empty());
    assert!(settings.registry_files.is_empty());
    assert!(settings.sources.file.is_none());
}

#[test]
fn the_defaults_document_every_optional_setting() {
    for line in [
        "# sasl_mechanism =",
        "# sasl_username =",
        "# sasl_password =",
        "# dead_letter_topic =",
        "# api_token =",
        "# host =",
        "# from =",
        "# username =",
        "# password =",
        "# registry_files =",
        "# [[routes]]",
        "# [[deployments]]",
        "# [[authorizations]]",
        "secret_env",
        "# target_instance =",
        "# account =",
        "# match_labels =",
        "# group_wait =",
        "# resources =",
    ] {
        assert!(
            DEFAULT_CONFIG_TOML.contains(line),
            "config/default.toml does not document {line:?}"
        );
    }
}

#[test]
fn scenario_configs_load() {
    let settings = load_text(SCENARIO_ROTATION);
    assert_eq!(settings.deployments.len(), 3);
    assert_eq!(settings.deployments[2].name.as_deref(), Some("es-2"));
    assert_eq!(settings.deployments[1].key, settings.deployments[2].key);
    assert_eq!(settings.deployments[0].owners, ["team@example.com"]);
    assert_eq!(
        settings.deployments[0].origin.rsplit(": ").next(),
        Some("deployments[0]")
    );
    assert!(settings.deployments[2]
        .origin
        .ends_with("kw.toml: deployments[2]"));
    assert_eq!(
        settings.lifecycle.rewrap_deadline,
        Duration::from_secs(4 * 3600)
    );
    // Not in the scenario file: from the defaults.
    assert_eq!(
        settings.lifecycle.purge_after,
        Duration::from_secs(90 * 86_400)
    );
    assert_eq!(settings.kafka.topic, "activity-tracker");

    let settings = load_text(SCENARIO_ACK_FAILURES);
    assert_eq!(settings.deployments.len(), 1);
    assert_eq!(settings.deployments[0].resources.len(), 1);
}

#[test]
fn the_shipped_example_loads_with_its_secrets_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let vars = env(&[
        ("KEYWATCH__KAFKA__SASL_PASSWORD", "example-api-key"),
        ("KEYWATCH__HTTP__API_TOKEN", "example-token"),
        ("KEYWATCH__SMTP__PASSWORD", "example-smtp-password"),
        (
            "KEYWATCH_OPS_WEBHOOK_SECRET",
            "whsec_ZXhhbXBsZS13ZWJob29rLWtleQ==",
        ),
    ]);
    let settings = match Settings::load_with_env(Some(&path), &vars) {
        Ok(settings) => settings,
        Err(error) => panic!("config/example.toml: {error}"),
    };
    assert_eq!(settings.deployments.len(), 3);
    let keys: std::collections::BTreeSet<&str> = settings
        .deployments
        .iter()
        .map(|d| d.key.as_str())
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(settings.authorizations.len(), 1);
    assert!(settings.deployments[0]
        .origin
        .ends_with("registry.example.toml: deployments[0]"));
    assert_eq!(settings.kafka.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(settings.kafka.sasl_mechanism.as_deref(), Some("PLAIN"));
    assert!(!settings.routes.is_empty());

    // Without the secrets it names what is missing.
    let error = Settings::load_with_env(Some(&path), &[]).expect_err("secrets missing");
    assert_eq!(
        error.key.as_deref(),
        Some("routes[0].webhooks[0].secret_env")
    );
    let error = Settings::load_with_env(Some(&path), &vars[3..]).expect_err("secrets missing");
    assert_eq!(
        error.to_string(),
        format!(
            "config error: {}: kafka.sasl_password: required with sasl_mechanism PLAIN; set it with KEYWATCH__KAFKA__SASL_PASSWORD",
            path.display()
        )
    );
}

#[test]
fn environment_overrides_files_and_defaults() {
    let text = r#"
[kafka]
brokers = "file-broker:9093"
security_protocol = "sasl_ssl"
sasl_mechanism = "plain"
sasl_username = "token"
"#;
    let vars = [
        (
            "KEYWATCH__KAFKA__BROKERS",
            "env-broker-1:9093,env-broker-2:9093",
        ),
        ("KEYWATCH__KAFKA__SASL_PASSWORD", "api-key-from-env"),
        (
            "KEYWATCH__KAFKA__PROPERTIES__SSL_CA_LOCATION",
            "/etc/ca.pem",
        ),
        ("KEYWATCH__HTTP__API_TOKEN", "token-from-env"),
        ("KEYWATCH__LIFECYCLE__REWRAP_DEADLINE", "90m"),
        ("KEYWATCH__SMTP__PORT", "2525"),
        ("KEYWATCH__STORE__URL", "postgres://kw:pw@db:5432/kw"),
        ("keywatch__log__format", "json"),
        ("KEYWATCH__LOG__LEVEL", ""),
        ("KEYWATCH_CONFIG", "/ignored.toml"),
        ("HOME", "/root"),
    ];
    let (_files, result) = load_text_env(text, &vars);
    let settings = result.expect("loads");
    assert_eq!(
        settings.kafka.brokers,
        "env-broker-1:9093,env-broker-2:9093"
    );
    assert_eq!(settings.kafka.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(settings.kafka.sasl_mechanism.as_deref(), Some("PLAIN"));
    let password = settings.kafka.sasl_password.as_ref().expect("password");
    assert_eq!(password.expose_secret(), "api-key-from-env");
    assert_eq!(
        settings
            .kafka
            .properties
            .get("ssl.ca.location")
            .map(String::as_str),
        Some("/etc/ca.pem")
    );
    let token = settings.http.api_token.as_ref().expect("token");
    assert_eq!(token.expose_secret(), "token-from-env");
    assert_eq!(
        settings.lifecycle.rewrap_deadline,
        Duration::from_secs(90 * 60)
    );
    assert_eq!(settings.smtp.port, 2525);
    assert_eq!(settings.store.url, "postgres://kw:pw@db:5432/kw");
    assert_eq!(settings.log.format, LogFormat::Json);
    // Empty means unset: the default stays.
    assert_eq!(settings.log.level, "info");
    assert_eq!(
        settings.sources.environment,
        [
            "KEYWATCH__KAFKA__BROKERS",
            "KEYWATCH__KAFKA__SASL_PASSWORD",
            "KEYWATCH__KAFKA__PROPERTIES__SSL_CA_LOCATION",
            "KEYWATCH__HTTP__API_TOKEN",
            "KEYWATCH__LIFECYCLE__REWRAP_DEADLINE",
            "KEYWATCH__SMTP__PORT",
            "KEYWATCH__STORE__URL",
            "keywatch__log__format",
        ]
    );
}

#[test]
fn kafka_properties_accept_strings_numbers_and_booleans() {
    let settings = load_text(
        r#"
[kafka.properties]
"session.timeout.ms" = 45000
"enable.ssl.certificate.verification" = false
"client.id" = "keywatch-1"
"#,
    );
    let properties = &settings.kafka.properties;
    assert_eq!(properties["session.timeout.ms"], "45000");
    assert_eq!(properties["enable.ssl.certificate.verification"], "false");
    assert_eq!(properties["client.id"], "keywatch-1");
}

#[test]
fn unknown_keys_are_rejected_with_the_key_and_the_file() {
    let message = error("colour = \"blue\"\n");
    assert!(
        message.starts_with("config error: kw.toml: colour: unknown key (known keys here: kafka, "),
        "{message}"
    );
    assert_eq!(
        error("[kafka]\nbrokers = \"b:9092\"\nbrokerz = \"b:9092\"\n"),
        "config error: kw.toml: kafka.brokerz: unknown key (known keys here: brokers, topic, \
         group_id, security_protocol, sasl_mechanism, sasl_username, sasl_password, \
         dead_letter_topic, properties)"
    );
    assert!(error("[lifecycle]\nrewrap_dedline = \"4h\"\n")
        .starts_with("config error: kw.toml: lifecycle.rewrap_dedline: unknown key"));

    let deployment = format!(
        "[[deployments]]\ncrn = \"{ES_CRN}\"\nkey = \"{KEY_CRN}\"\n\n\
         [[deployments]]\ncrn = \"{ES_CRN}2\"\nkey = \"{KEY_CRN}\"\nowner = [\"a@b.c\"]\n"
    );
    assert!(error(&deployment).starts_with(
        "config error: kw.toml: deployments[1].owner: unknown key (known keys here: crn, "
    ));

    let webhook = "[[routes]]\nname = \"ops\"\nwebhooks = [{ url = \"https://h.example\", secret = \"s\", retries = 3 }]\n";
    assert!(
        error(webhook)
            .starts_with("config error: kw.toml: routes[0].webhooks[0].retries: unknown key"),
        "{}",
        error(webhook)
    );

    assert!(error("[kafka.properties.nested]\na = 1\n").starts_with(
        "config error: kw.toml: kafka.properties.nested: invalid type: table, expected a string"
    ));
}

#[test]
fn unknown_environment_variables_are_rejected_by_name() {
    assert!(
        error_env("", &[("KEYWATCH__KAFKA__BROKER", "x:1")]).starts_with(
            "config error: environment variable KEYWATCH__KAFKA__BROKER: kafka.broker: unknown key"
        ),
        "{}",
        error_env("", &[("KEYWATCH__KAFKA__BROKER", "x:1")])
    );
    assert!(error_env("", &[("KEYWATCH__COLOUR", "blue")])
        .starts_with("config error: environment variable KEYWATCH__COLOUR: colour: unknown key"));
}

#[test]
fn errors_are_one_line_and_name_file_key_and_reason() {
    let files = Files::new();
    let missing = files.path("nope.toml");
    let message = Settings::load_with_env(Some(&missing), &[])
        .expect_err("missing file")
        .to_string();
    assert_eq!(
        message,
        format!(
            "config error: {}: cannot read the file: it does not exist",
            missing.display()
        )
    );

    // The parser's wording is its own; the shape (line, column, one line) is ours.
    assert_eq!(
        error("[kafka]\nbrokers = \"a:1\"\ntopic = \n"),
        "config error: kw.toml: line 3, column 9: invalid toml: invalid string; expected `\"`, `'`"
    );
    assert_eq!(
        error("[kafka]\ntopic = \"a\"\ntopic = \"b\"\n"),
        "config error: kw.toml: line 3, column 1: invalid toml: duplicate key `topic` in table `kafka`"
    );
    assert!(
        error("[kafka\n").starts_with("config error: kw.toml: line 1, column 7: invalid toml: ")
    );

    assert_eq!(
        error("[smtp]\nport = \"submission\"\n"),
        "config error: kw.toml: smtp.port: invalid type: string \"submission\", expected an integer"
    );
    assert_eq!(
        error("[smtp]\nport = 70000\n"),
        "config error: kw.toml: smtp.port: invalid value 70000: out of range, expected an unsigned 16 bit integer"
    );
    assert_eq!(
        error("[lifecycle]\nrewrap_deadline = \"4 hourz\"\n"),
        "config error: kw.toml: lifecycle.rewrap_deadline: invalid duration \"4 hourz\": unknown time unit \"hourz\""
    );
    assert_eq!(
        error("[lifecycle]\nrestore_window = \"30\"\n"),
        "config error: kw.toml: lifecycle.restore_window: invalid duration \"30\": a time unit is needed, for example 30s or 30m"
    );
    assert_eq!(
        error("[lifecycle]\npurge_after = \"0s\"\n"),
        "config error: kw.toml: lifecycle.purge_after: invalid duration \"0s\": must be greater than zero"
    );
    assert_eq!(
        error("[kafka]\nsecurity_protocol = \"SASL_TLS\"\n"),
        "config error: kw.toml: kafka.security_protocol: invalid value \"SASL_TLS\": expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
    );
    assert_eq!(
        error("[smtp]\ntls = \"ssl\"\n"),
        "config error: kw.toml: smtp.tls: invalid value \"ssl\": expected one of starttls, tls, none"
    );
    assert_eq!(
        error("[log]\nformat = \"xml\"\n"),
        "config error: kw.toml: log.format: invalid value \"xml\": expected one of human, json"
    );
    assert_eq!(
        error("[http]\nlisten = \"localhost:8080\"\n"),
        "config error: kw.toml: http.listen: invalid listen address \"localhost:8080\": expected IP:PORT such as 127.0.0.1:8080 or [::]:8080"
    );
    assert_eq!(
        error("[store]\nurl = \"mysql://kw:hunter2@db/kw\"\n"),
        "config error: kw.toml: store.url: invalid store url \"mysql://kw:***@db/kw\": expected sqlite://PATH or postgres://USER@HOST/DATABASE"
    );
    assert_eq!(
        error("[store]\nurl = \"postgres://kw:hunter2@db/kw?sslmode=sometimes\"\n"),
        "config error: kw.toml: store.url: invalid store url \"postgres://kw:***@db/kw?sslmode=sometimes\": unknown value \"sometimes\" for `ssl_mode`"
    );
    assert_eq!(
        error("[store]\nurl = \"sqlite://\"\n"),
        "config error: kw.toml: store.url: invalid store url \"sqlite://\": nothing after the scheme"
    );
    assert_eq!(
        error("kafka = \"x\"\n"),
        "config error: kw.toml: kafka: invalid type: string \"x\", expected a table"
    );
    assert_eq!(
        error(&format!("[[deployments]]\ncrn = \"{ES_CRN}\"\n")),
        "config error: kw.toml: deployments[0].key: missing required key"
    );
    assert_eq!(
        error("[[routes]]\nname = \"ops\"\nmin_severity = \"urgent\"\nemail = [\"a@b.c\"]\n"),
        "config error: kw.toml: routes[0].min_severity: invalid value \"urgent\": expected one of info, warning, critical"
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    assert_eq!(
        error_env("", &[("KEYWATCH__LIFECYCLE__REWRAP_DEADLINE", "soon")]),
        "config error: environment variable KEYWATCH__LIFECYCLE__REWRAP_DEADLINE: lifecycle.rewrap_deadline: invalid duration \"soon\": a number is expected at position 0"
    );
    assert_eq!(
        error_env("", &[("KEYWATCH__HTTP__LISTEN", "8080")]),
        "config error: environment variable KEYWATCH__HTTP__LISTEN: http.listen: invalid listen address \"8080\": expected IP:PORT such as 127.0.0.1:8080 or [::]:8080"
    );
    assert_eq!(
        error_env("", &[("KEYWATCH__SMTP__PORT", "many")]),
        "config error: environment variable KEYWATCH__SMTP__PORT: smtp.port: invalid type: string \"many\", expected an integer"
    );
    assert_eq!(
        error_env("", &[("KEYWATCH__KAFKA", "broker:9092")]),
        "config error: environment variable KEYWATCH__KAFKA: kafka: invalid type: string \"broker:9092\", expected a table"
    );
    // A missing setting is placed in the file, where it should be added.
    assert_eq!(
        error_env("", &[("KEYWATCH__KAFKA__SECURITY_PROTOCOL", "SASL_SSL")]),
        "config error: kw.toml: kafka.sasl_mechanism: required with security_protocol SASL_SSL (Event Streams uses PLAIN)"
    );
    assert_eq!(
        error_env(
            "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"token\"\n",
            &[]
        ),
        "config error: kw.toml: kafka.sasl_password: required with sasl_mechanism PLAIN; set it with KEYWATCH__KAFKA__SASL_PASSWORD"
    );
    assert_eq!(
        Settings::load_with_env(None, &env(&[("KEYWATCH__KAFKA__SECURITY_PROTOCOL", "SASL_SSL")]))
            .expect_err("no mechanism")
            .to_string(),
        "config error: configuration (no file given): kafka.sasl_mechanism: required with security_protocol SASL_SSL (Event Streams uses PLAIN)"
    );
    assert_eq!(
        error_env("", &[("KEYWATCH__KAFKA__SASL_MECHANISM", "PLAIN")]),
        "config error: environment variable KEYWATCH__KAFKA__SASL_MECHANISM: kafka.sasl_mechanism: set, but security_protocol is PLAINTEXT; SASL settings need SASL_PLAINTEXT or SASL_SSL"
    );
}

#[test]
fn registry_files_are_relative_to_the_file_that_names_them() {
    let files = Files::new();
    files.write(
        "etc/registry/prod.toml",
        &format!(
            "[[deployments]]\ncrn = \"{ES_CRN}\"\nkey = \"{KEY_CRN}\"\nlabels = {{ env = \"prod\" }}\n\n\
             [[authorizations]]\nid = \"policy-1\"\nsource_service = \"messagehub\"\ntarget_service = \"kms\"\nroles = [\"Reader\"]\n"
        ),
    );
    let absolute = files.write(
        "elsewhere/more.toml",
        &format!("[[deployments]]\ncrn = \"{ES_CRN}2\"\nkey = \"{KEY_CRN}\"\n"),
    );
    let config = files.write(
        "etc/kw.toml",
        &format!(
            "registry_files = [\"registry/prod.toml\", \"{}\"]\n\n\
             [[deployments]]\ncrn = \"{ES_CRN}0\"\nkey = \"{KEY_CRN}\"\n",
            absolute.display()
        ),
    );
    let settings = Settings::load_with_env(Some(&config), &[]).expect("loads");
    assert_eq!(
        settings.registry_files,
        [files.path("etc/registry/prod.toml"), absolute.clone()]
    );
    let crns: Vec<&str> = settings
        .deployments
        .iter()
        .map(|d| d.crn.as_str())
        .collect();
    assert_eq!(
        crns,
        [
            format!("{ES_CRN}0"),
            ES_CRN.to_owned(),
            format!("{ES_CRN}2")
        ]
    );
    assert_eq!(
        settings.deployments[0].origin,
        format!("{}: deployments[0]", config.display())
    );
    assert_eq!(
        settings.deployments[1].origin,
        format!(
            "{}: deployments[0]",
            files.path("etc/registry/prod.toml").display()
        )
    );
    assert_eq!(settings.deployments[1].labels["env"], "prod");
    assert_eq!(settings.authorizations.len(), 1);
    assert_eq!(
        settings.authorizations[0].origin,
        format!(
            "{}: authorizations[0]",
            files.path("etc/registry/prod.toml").display()
        )
    );

    // From the environment: a comma-separated list (absolute paths here).
    let other = files.write(
        "other.toml",
        &format!("[[deployments]]\ncrn = \"{ES_CRN}3\"\nkey = \"{KEY_CRN}\"\n"),
    );
    let list = format!("{}, {}", other.display(), absolute.display());
    let settings =
        Settings::load_with_env(Some(&config), &env(&[("KEYWATCH__REGISTRY_FILES", &list)]))
            .expect("loads");
    assert_eq!(settings.registry_files, [other, absolute]);
    assert_eq!(settings.deployments.len(), 3);
}

#[test]
fn registry_file_errors_name_the_registry_file() {
    let files = Files::new();
    let registry = files.write(
        "registry.toml",
        &format!("[kafka]\nbrokers = \"x:1\"\n\n[[deployments]]\ncrn = \"{ES_CRN}\"\nkey = \"{KEY_CRN}\"\n"),
    );
    let config = files.write("kw.toml", "registry_files = [\"registry.toml\"]\n");
    let message = Settings::load_with_env(Some(&config), &[])
        .expect_err("kafka in a registry file")
        .to_string();
    assert_eq!(
        message,
        format!(
            "config error: {}: kafka: unknown key (known keys here: deployments, authorizations)",
            registry.display()
        )
    );

    files.write(
        "registry.toml",
        &format!("[[deployments]]\ncrn = \"{ES_CRN}\"\nkey = \"{KEY_CRN}\"\nowners = [\"team\"]\n"),
    );
    let message = Settings::load_with_env(Some(&config), &[])
        .expect_err("bad owner")
        .to_string();
    assert_eq!(
        message,
        format!(
            "config error: {}: deployments[0].owners[0]: invalid e-mail address \"team\": expected an address such as team@example.com",
            registry.display()
        )
    );

    let config = files.write("kw2.toml", "registry_files = [\"absent.toml\"]\n");
    let message = Settings::load_with_env(Some(&config), &[])
        .expect_err("absent registry")
        .to_string();
    assert_eq!(
        message,
        format!(
            "config error: {}: cannot read the file: it does not exist",
            files.path("absent.toml").display()
        )
    );

    let config = files.write(
        "kw3.toml",
        "registry_files = [\"registry.toml\", \"./registry.toml\"]\n",
    );
    let message = Settings::load_with_env(Some(&config), &[])
        .expect_err("listed twice")
        .to_string();
    assert!(message.contains(": registry_files[1]: "), "{message}");
    assert!(message.ends_with("is listed twice"), "{message}");
}

#[test]
fn routes_are_validated() {
    let settings = load_text(&format!(
        "[smtp]\nhost = \"smtp.example.com\"\nfrom = \"keywatch <kw@example.com>\"\n\n\
         [[routes]]\nname = \"mail\"\nmin_severity = \"Warning\"\nkinds = [\"key_deleted\", \"shared_key\"]\n\
         match_labels = {{ env = \"prod\" }}\nemail = [\"ops@example.com\", \"owners\"]\ngroup_wait = \"0s\"\n\
         {WEBHOOK_ROUTE}"
    ));
    assert_eq!(settings.routes.len(), 2);
    let ops = &settings.routes[0];
    assert_eq!(ops.min_severity, Severity::Warning);
    assert_eq!(ops.group_wait, Duration::ZERO);
    assert_eq!(ops.match_labels["env"], "prod");
    let hooks = &settings.routes[1];
    assert_eq!(hooks.min_severity, Severity::Info);
    assert_eq!(hooks.kinds, None);
    assert_eq!(hooks.group_wait, Duration::from_secs(30));
    assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Critical);

    let route = |body: &str| format!("[[routes]]\nname = \"ops\"\n{body}\n");
    assert_eq!(
        error(&format!("{WEBHOOK_ROUTE}{WEBHOOK_ROUTE}")),
        "config error: kw.toml: routes[1].name: duplicate route name \"ops\""
    );
    assert_eq!(
        error("[[routes]]\nname = \" \"\nemail = [\"a@b.c\"]\n"),
        "config error: kw.toml: routes[0].name: must not be empty"
    );
    assert_eq!(
        error("[[routes]]\nemail = [\"a@b.c\"]\n"),
        "config error: kw.toml: routes[0].name: missing required key"
    );
    assert_eq!(
        error(&route("")),
        "config error: kw.toml: routes[0]: route \"ops\" has no receivers: set email or webhooks"
    );
    assert_eq!(
        error(&route("email = [\"ops\"]")),
        "config error: kw.toml: routes[0].email[0]: invalid e-mail address \"ops\": expected an address such as ops@example.com or the word owners"
    );
    assert_eq!(
        error(&route("email = [\"ops@example.com\"]")),
        "config error: kw.toml: smtp.host: not set, but route \"ops\" sends e-mail"
    );
    assert_eq!(
        error(&format!(
            "[smtp]\nhost = \"smtp.example.com\"\n\n{}",
            route("email = [\"ops@example.com\"]")
        )),
        "config error: kw.toml: smtp.from: not set, but route \"ops\" sends e-mail"
    );
    assert!(error(&route(
        "kinds = [\"key_deleted\", \"key_shredded\"]\nemail = [\"owners\"]"
    ))
    .starts_with(
        "config error: kw.toml: routes[0].kinds[1]: unknown alert kind \"key_shredded\": expected one of key_disabled, "
    ));
    assert_eq!(
        error(&route("kinds = []\nwebhooks = [{ url = \"https://h.example\", secret = \"s\" }]")),
        "config error: kw.toml: routes[0].kinds: is empty and would match nothing; leave it out to match every kind"
    );
    assert_eq!(
        error(&route("webhooks = [{ url = \"ftp://h.example/x\", secret = \"s\" }]")),
        "config error: kw.toml: routes[0].webhooks[0].url: invalid webhook url \"ftp://h.example/...\": expected an http:// or https:// url"
    );
    assert_eq!(
        error(&route("webhooks = [{ url = \"hooks.example.com/in\", secret = \"s\" }]")),
        "config error: kw.toml: routes[0].webhooks[0].url: invalid webhook url \"[invalid url]\": relative URL without a base"
    );
    assert_eq!(
        error(&route("webhooks = [{ url = \"https://h.example\", secret = \"\" }]")),
        "config error: kw.toml: routes[0].webhooks[0].secret: must not be empty: set secret or secret_env"
    );
    assert_eq!(
        error(&route("webhooks = [{ url = \"https://h.example\" }]")),
        "config error: kw.toml: routes[0].webhooks[0].secret: must not be empty: set secret or secret_env"
    );
    assert_eq!(
        error(&route("webhooks = [{ url = \"https://h.example\", secret = \"whsec_not base64!\" }]")),
        "config error: kw.toml: routes[0].webhooks[0].secret: a secret starting with whsec_ must continue with standard base64 (the secret itself is not shown)"
    );
    // Raw secrets without the prefix are used as bytes.
    load_text(&route(
        "webhooks = [{ url = \"http://127.0.0.1:9000/hook\", secret = \"plain text secret\" }]",
    ));
}

#[test]
fn webhook_secrets_can_come_from_the_environment() {
    let text = "[[routes]]\nname = \"ops\"\nwebhooks = [{ url = \"https://h.example/in\", secret_env = \"OPS_HOOK_SECRET\" }]\n";
    let (_files, result) = load_text_env(text, &[("OPS_HOOK_SECRET", "whsec_a2V5")]);
    let settings = result.expect("loads");
    assert_eq!(
        settings.routes[0].webhooks[0].secret.expose_secret(),
        "whsec_a2V5"
    );

    assert_eq!(
        error(text),
        "config error: kw.toml: routes[0].webhooks[0].secret_env: environment variable OPS_HOOK_SECRET is not set or empty"
    );
    assert_eq!(
        error_env(
            "[[routes]]\nname = \"ops\"\nwebhooks = [{ url = \"https://h.example/in\", secret = \"s\", secret_env = \"OPS_HOOK_SECRET\" }]\n",
            &[("OPS_HOOK_SECRET", "x")]
        ),
        "config error: kw.toml: routes[0].webhooks[0].secret: set either secret or secret_env, not both"
    );
}

#[test]
fn kafka_settings_are_validated() {
    let sasl = "[kafka]\nsecurity_protocol = \"SASL_SSL\"\n";
    assert_eq!(
        error(&format!("{sasl}sasl_mechanism = \"PLAINTEXT\"\n")),
        "config error: kw.toml: kafka.sasl_mechanism: invalid value \"PLAINTEXT\": expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI"
    );
    assert_eq!(
        error(&format!("{sasl}sasl_mechanism = \"SCRAM-SHA-512\"\n")),
        "config error: kw.toml: kafka.sasl_username: required with sasl_mechanism SCRAM-SHA-512 (Event Streams uses \"token\")"
    );
    // OAUTHBEARER brings its own credentials through properties.
    let settings = load_text(&format!("{sasl}sasl_mechanism = \"oauthbearer\"\n"));
    assert_eq!(
        settings.kafka.sasl_mechanism.as_deref(),
        Some("OAUTHBEARER")
    );
    assert_eq!(
        settings.kafka.security_protocol.librdkafka_name(),
        "sasl_ssl"
    );

    assert_eq!(
        error("[kafka]\ndead_letter_topic = \"activity-tracker\"\n"),
        "config error: kw.toml: kafka.dead_letter_topic: must differ from kafka.topic (\"activity-tracker\"): invalid records would be consumed again"
    );
    assert_eq!(
        error("[kafka]\nbrokers = \"a:1,,b:2\"\n"),
        "config error: kw.toml: kafka.brokers: invalid broker list \"a:1,,b:2\": expected host:port entries separated by commas"
    );
    for bad in [
        "5",
        "\"b:0\"",
        "\"b:99999\"",
        "\"b:x\"",
        "\"a:1, :2\"",
        "\"[::1\"",
    ] {
        let text = format!("[kafka]\nbrokers = {bad}\n");
        assert!(
            error(&text).starts_with("config error: kw.toml: kafka.brokers: invalid broker list"),
            "{bad}: {}",
            error(&text)
        );
    }
    for good in [
        "b:9092",
        "b1:9092, b2:9093",
        "SASL_SSL://broker-0.example.com:9093",
        "[::1]:9092",
        "localhost",
        "10.0.0.1:9092",
    ] {
        let settings = load_text(&format!("[kafka]\nbrokers = \"{good}\"\n"));
        assert_eq!(settings.kafka.brokers, good);
    }
    assert_eq!(
        error("[kafka]\ntopic = \"\"\n"),
        "config error: kw.toml: kafka.topic: must not be empty"
    );
    assert_eq!(
        error("[kafka.properties]\n\"enable.auto.commit\" = true\n"),
        "config error: kw.toml: kafka.properties.enable.auto.commit: managed by keywatch: offsets are committed only after events are processed"
    );
    assert_eq!(
        error("[kafka.properties]\n\"bootstrap.servers\" = \"x:1\"\n"),
        "config error: kw.toml: kafka.properties.bootstrap.servers: managed by keywatch: use the kafka settings of the same meaning"
    );
}

#[test]
fn other_sections_are_validated() {
    assert_eq!(
        error("[http]\napi_token = \"\"\n"),
        "config error: kw.toml: http.api_token: must not be empty (leave it out to disable the mutating endpoints)"
    );
    assert_eq!(
        error("[smtp]\nusername = \"kw\"\n"),
        "config error: kw.toml: smtp.password: required with smtp.username; set it with KEYWATCH__SMTP__PASSWORD"
    );
    assert_eq!(
        error("[smtp]\nfrom = \"keywatch\"\n"),
        "config error: kw.toml: smtp.from: invalid e-mail address \"keywatch\": expected an address such as keywatch@example.com"
    );
    assert_eq!(
        error("[log]\nlevel = \"infoo\"\n"),
        "config error: kw.toml: log.level: invalid directive \"infoo\": expected a level (trace, debug, info, warn, error, off) or target=level"
    );
    load_text("[log]\nlevel = \"info,keywatch=debug,rdkafka=warn\"\n");
    assert_eq!(
        error("[delivery]\ninitial_backoff = \"10m\"\n"),
        "config error: kw.toml: delivery.initial_backoff: 10m is longer than delivery.max_backoff (5m)"
    );
    let authorization = |body: &str| {
        format!("[[authorizations]]\nid = \"p-1\"\nsource_service = \"messagehub\"\n{body}\n")
    };
    assert_eq!(
        error(&authorization("target_service = \"key-protect\"")),
        "config error: kw.toml: authorizations[0].target_service: invalid value \"key-protect\": expected kms or hs-crypto"
    );
    assert_eq!(
        error(&format!(
            "{}{}",
            authorization("target_service = \"kms\""),
            authorization("target_service = \"hs-crypto\"")
        )),
        "config error: kw.toml: authorizations[1].id: duplicate authorization id \"p-1\""
    );
    let settings = load_text(&authorization(
        "target_service = \"kms\"\ntarget_instance = \"kp-1\"\naccount = \"acc\"",
    ));
    assert_eq!(
        settings.authorizations[0].target_instance.as_deref(),
        Some("kp-1")
    );
    assert_eq!(settings.authorizations[0].account.as_deref(), Some("acc"));
}

#[test]
fn secrets_never_appear_in_debug_output_or_the_summary() {
    let text = "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"token\"\n\n\
         [kafka.properties]\n\"ssl.key.password\" = \"kafka-property-secret\"\n\n\
         [store]\nurl = \"postgres://kw:store-secret@db:5432/kw\"\n\n\
         [smtp]\nhost = \"smtp.example.com\"\nfrom = \"kw@example.com\"\nusername = \"kw\"\n\n\
         [[routes]]\nname = \"ops\"\nemail = [\"owners\"]\n\
         webhooks = [{ url = \"https://hooks.example.com/services/url-secret\", secret = \"whsec_d2ViaG9vay1zZWNyZXQ=\" }]\n";
    let vars = [
        ("KEYWATCH__KAFKA__SASL_PASSWORD", "sasl-secret"),
        ("KEYWATCH__HTTP__API_TOKEN", "api-secret"),
        ("KEYWATCH__SMTP__PASSWORD", "smtp-secret"),
    ];
    let (_files, result) = load_text_env(text, &vars);
    let settings = result.expect("loads");
    let debug = format!("{settings:?}");
    let summary = settings.summary();
    for secret in [
        "sasl-secret",
        "api-secret",
        "smtp-secret",
        "store-secret",
        "kafka-property-secret",
        "url-secret",
        "d2ViaG9vay1zZWNyZXQ",
    ] {
        assert!(!debug.contains(secret), "{secret} in Debug output: {debug}");
        assert!(!summary.contains(secret), "{secret} in summary: {summary}");
    }
    assert!(summary.contains("password set"), "{summary}");
    assert!(summary.contains("api token set"), "{summary}");
    assert!(
        summary.contains("postgres://kw:***@db:5432/kw"),
        "{summary}"
    );
    assert!(
        summary.contains("webhook: https://hooks.example.com/..."),
        "{summary}"
    );
    assert!(
        summary.contains("KEYWATCH__KAFKA__SASL_PASSWORD"),
        "{summary}"
    );
}

#[test]
fn the_summary_reads_well() {
    let settings = load_text(SCENARIO_ROTATION);
    let summary = settings.summary();
    assert!(summary.contains("brokers: 127.0.0.1:9092"), "{summary}");
    assert!(
        summary.contains("api token not set (mutating endpoints disabled)"),
        "{summary}"
    );
    assert!(
        summary.contains("lifecycle: rewrap deadline 4h, soft-delete period 9d, restore window 30d, dual-auth window 7d, purge after 90d"),
        "{summary}"
    );
    assert!(
        summary.contains("registry: 3 deployment(s) on 2 key(s), 0 authorization(s)"),
        "{summary}"
    );
    assert!(summary.contains("smtp: not configured"), "{summary}");
}

#[test]
fn durations_display_in_their_shortest_form() {
    for (text, shown) in [
        ("4h", "4h"),
        ("30d", "30d"),
        ("90m", "90m"),
        ("36h", "36h"),
        ("1h 30m 10s", "5410s"),
        ("1500ms", "1500ms"),
        ("0s", "0s"),
    ] {
        let parsed = values::parse_duration(text).expect("parses");
        assert_eq!(display_duration(parsed), shown);
        assert_eq!(values::parse_duration(shown), Ok(parsed));
    }
}

#[test]
fn named_values_parse_case_insensitively() {
    assert_eq!("sasl_ssl".parse(), Ok(SecurityProtocol::SaslSsl));
    assert_eq!(
        "SASL-PLAINTEXT".parse(),
        Ok(SecurityProtocol::SaslPlaintext)
    );
    assert_eq!("Critical".parse(), Ok(Severity::Critical));
    assert_eq!("STARTTLS".parse(), Ok(SmtpTls::Starttls));
    assert_eq!(SecurityProtocol::SaslSsl.to_string(), "SASL_SSL");
    assert_eq!(Severity::Warning.as_str(), "warning");
}
