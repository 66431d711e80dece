//! Turning settings into a ready engine: registry validation, configured authorizations, logging.

use crate::engine::{
    validate_registry, DeploymentSpec, Engine, Lifecycle, PolicySpec, RegistryError,
    ValidDeployment,
};
use crate::settings::{LogFormat, Settings};

/// The lifecycle windows of the configuration, as the engine takes them.
pub fn lifecycle(settings: &Settings) -> Lifecycle {
    let l = &settings.lifecycle;
    Lifecycle {
        rewrap_deadline: l.rewrap_deadline,
        soft_delete_period: l.soft_delete_period,
        restore_window: l.restore_window,
        dual_auth_window: l.dual_auth_window,
        purge_after: l.purge_after,
    }
}

/// Validates the configured registry (deployments and authorizations).
pub fn registry(
    settings: &Settings,
) -> Result<(Vec<ValidDeployment>, Vec<PolicySpec>), RegistryError> {
    let entries = settings
        .deployments
        .iter()
        .map(|d| {
            let spec = DeploymentSpec {
                crn: d.crn.clone(),
                name: d.name.clone().unwrap_or_default(),
                key: d.key.clone(),
                owners: d.owners.clone(),
                labels: d.labels.clone(),
                resources: d.resources.clone(),
            };
            (spec, d.origin.clone())
        })
        .collect();
    let deployments = validate_registry(entries)?;
    let mut policies = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for a in &settings.authorizations {
        if a.id.trim().is_empty() {
            return Err(RegistryError::BadPolicy {
                origin: a.origin.clone(),
                reason: "id: must not be empty".into(),
            });
        }
        if !ids.insert(a.id.clone()) {
            return Err(RegistryError::BadPolicy {
                origin: a.origin.clone(),
                reason: format!("id: authorization {} is listed twice", a.id),
            });
        }
        let target = a.target_service.trim().to_ascii_lowercase();
        if target != "kms" && target != "hs-crypto" {
            return Err(RegistryError::BadPolicy {
                origin: a.origin.clone(),
                reason: format!(
                    "target_service: {:?} is not a key service (kms or hs-crypto)",
                    a.target_service
                ),
            });
        }
        policies.push(PolicySpec {
            id: a.id.trim().to_owned(),
            source_service: a.source_service.trim().to_ascii_lowercase(),
            target_service: target,
            target_instance: a.target_instance.clone().filter(|s| !s.trim().is_empty()),
            account: a.account.clone().filter(|s| !s.trim().is_empty()),
            roles: a.roles.clone(),
        });
    }
    Ok((deployments, policies))
}

/// A fresh engine holding the configured registry (raises `shared_key` alerts as it registers).
pub fn fresh_engine(settings: &Settings) -> Result<Engine, RegistryError> {
    let (deployments, policies) = registry(settings)?;
    let mut engine = Engine::new(lifecycle(settings));
    for p in policies {
        engine.add_configured_policy(p);
    }
    engine.register(deployments);
    Ok(engine)
}

/// Logs go to stderr, human or JSON, filtered by `[log] level` (or `RUST_LOG` when set).
pub fn init_logging(settings: Option<&Settings>, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let level = settings
        .map(|s| s.log.level.clone())
        .unwrap_or_else(|| default_level.to_owned());
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = settings.is_some_and(|s| matches!(s.log.format, LogFormat::Json));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
