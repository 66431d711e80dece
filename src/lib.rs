//! keywatch: tells operators of bring-your-own-key deployments what a key event did to them.
//!
//! See ARCHITECTURE.md for the map. The engine (`engine`) is pure; everything else is the shell.

pub mod cli;
pub mod commands;
pub mod crn;
pub mod delivery;
pub mod engine;
pub mod errors;
pub mod event;
pub mod hex;
pub mod http;
pub mod metrics;
pub mod service;
pub mod settings;
pub mod setup;
pub mod store;
pub mod timefmt;
mod wait;
