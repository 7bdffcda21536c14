//! airlock: a quarantine host for AI model files.
//!
//! A model passes through a chain of stages, each a sandboxed WebAssembly
//! component (see `wit/stage.wit`):
//!
//! - [`artifact`] opens the model read-only and parses its container strictly;
//! - [`policy`] loads the chain, the grants and the limits;
//! - [`plugin`] runs each stage's component in a fresh, limited sandbox;
//! - [`inference`] runs the model for a stage granted `inference` (sandboxed worker or OpenAI API);
//! - [`pipeline`] runs the chain over a model and decides the verdict;
//! - [`store`] keeps the quarantine: claim, promote, reject, manifests, the audit log;
//! - [`scale_out`] spreads scans over workers on NATS JetStream (`worker`, `watch --dispatch`);
//! - [`cli`] is the `airlock` command.
//!
//! Imports go one way: cli → store → scale_out → pipeline → plugin → artifact (and
//! policy); [`fsutil`] serves the store and the plugin cache.

pub use airlock_artifact as artifact;
pub mod cli;
pub mod fsutil;
pub mod inference;
pub mod pipeline;
pub mod plugin;
pub mod policy;
pub mod scale_out;
pub mod serve;
pub mod store;
