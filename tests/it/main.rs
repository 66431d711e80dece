//! The one integration test binary (see matklad, "Delete Cargo Integration Tests").

mod api;
mod cli;
mod delivery;
mod order;
mod scenarios;
mod service;
mod support;
