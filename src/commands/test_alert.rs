//! `keywatch test-alert [--config FILE] [--route NAME]`: sends a clearly marked test notification
//! through each channel of the route(s) and prints, per channel, `delivered` or the exact error.
//! Exit code 0 when every channel delivered, 2 otherwise, 1 for bad configuration or an unknown
//! route.

use super::load_settings;
use crate::cli::Failure;
use crate::delivery::{send_test_notifications, DeliveryError};
use crate::setup;
use std::io::Write;
use std::path::Path;

pub fn test_alert(config: Option<&Path>, route: Option<&str>) -> Result<(), Failure> {
    let settings = load_settings(config)?;
    setup::init_logging(Some(&settings), "warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    let outcomes = rt
        .block_on(send_test_notifications(&settings, route))
        .map_err(|e| match e {
            DeliveryError::Config(message) => Failure::invalid(message),
            other => Failure::runtime(format!("test-alert: {other}")),
        })?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0;
    for o in &outcomes {
        let result = match &o.result {
            Ok(()) => "delivered".to_owned(),
            Err(e) => {
                failed += 1;
                format!("failed: {e}")
            }
        };
        let _ = writeln!(
            out,
            "route {}: {} {}: {result}",
            o.route,
            o.channel.as_str(),
            o.recipient
        );
    }
    let _ = out.flush();
    if failed > 0 {
        return Err(Failure::runtime(format!(
            "test-alert: {failed} of {} channels failed",
            outcomes.len()
        )));
    }
    Ok(())
}
