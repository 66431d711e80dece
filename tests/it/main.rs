//! The one integration test binary (see matklad, "Delete Cargo Integration Tests").

mod cli;
mod order;
mod scenarios;
mod service;
mod support;
