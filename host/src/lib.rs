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
//! - [`lifecycle`] keeps the quarantine: admit, claim, promote, reject, manifests, the audit log;
//!   it scans through the [`pipeline::Scan`] seam, here or on the workers;
//! - [`scale_out`] spreads scans over workers on NATS JetStream (`worker`, `watch --dispatch`);
//! - [`cli`] is the `airlock` command.
//!
//! Imports go one way: cli and serve → lifecycle and scale_out (peers: neither
//! imports the other) → pipeline → plugin → artifact (and policy); [`fsutil`]
//! serves the lifecycle and the plugin cache.

pub use airlock_artifact as artifact;
pub mod cli;
pub mod fsutil;
pub mod inference;
pub mod lifecycle;
pub mod pipeline;
pub mod plugin;
pub mod policy;
pub mod scale_out;
pub mod serve;
