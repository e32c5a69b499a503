//! keyward: a signing agent for trading systems.
//! This crate root only re-exports; each concern lives in the module named after it.
#![deny(unsafe_code)]

pub mod audit;
pub mod backend;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod home;
pub mod identity;
pub mod keystore;
pub mod model;
pub mod policy;
pub mod profile;
pub mod proto;
pub mod pubkey;
pub mod secret;
pub mod sys;

pub use error::{Error, Result};
pub use model::{Algorithm, Env, KeyName, KeyType};

/// The agent/library version reported by `hello` and `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
