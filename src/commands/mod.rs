//! The commands of spec section 1, each a thin shell around the engine.

mod inspect;
mod mapped;
mod publish;
pub mod replay;
mod stateful;
mod test_alert; // delivery: `keywatch test-alert`

pub use inspect::{blast_radius, check_config, explain};
pub use publish::publish;
pub use stateful::{replay_into_store, run, status};
pub use test_alert::test_alert;

use crate::cli::Failure;
use crate::settings::Settings;
use crate::setup;
use crate::timefmt::Millis;
use std::io::Write;
use std::path::Path;

/// Writes a line to stdout; a closed pipe (`keywatch ... | head`) is not an error worth a panic.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

/// Loads and validates the configuration, or fails with exit code 1 and a one-line message.
pub fn load_settings(config: Option<&Path>) -> Result<Settings, Failure> {
    Settings::load(config).map_err(|e| Failure::invalid(e.to_string()))
}

pub fn replay_command(
    config: Option<&Path>,
    now: Option<&str>,
    store: bool,
    files: &[String],
) -> Result<(), Failure> {
    if store {
        return replay_into_store(config, now, files);
    }
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "warn");
    let now = match now {
        Some(text) => Some(Millis::parse(text).ok_or_else(|| {
            Failure::invalid(format!("replay: --now: {text:?} is not an RFC 3339 time"))
        })?),
        None => None,
    };
    let mut engine = setup::fresh_engine(&settings)
        .map_err(|e| Failure::invalid(format!("registry error: {e}")))?;
    // Nothing is persisted: do not collect changed entities for a store.
    engine.set_change_tracking(false);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    match replay::replay(&mut engine, files, now, &mut out, true) {
        Ok(_) => out
            .flush()
            .map_err(|e| Failure::runtime(format!("replay: writing the report: {e}"))),
        Err(e @ replay::ReplayError::Open { .. }) => Err(Failure::invalid(e.to_string())),
        Err(e) => Err(Failure::runtime(e.to_string())),
    }
}
