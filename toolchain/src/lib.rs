//! How guest crates become components on this machine, shared by
//! `cargo xtask` (which may also install a route) and `airlock plugin build`
//! (which only uses what is there).
//!
//! Route A is rustup's `wasm32-wasip2` target. Route B needs no rustup
//! download server: Debian's rustc-web with its std source (`-Zbuild-std`),
//! lld, wasi-libc, and `wasm-component-ld` from crates.io
//! (docs/toolchain.md tells both routes, and what was measured of them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The built-in plugins, shipped as `builtin:<name>`: each is the crate
/// `plugins/<name>`. Here because both sides need the one list: xtask builds
/// them, the host resolves `builtin:` names against it.
pub const BUILTINS: [&str; 12] = [
    "source_policy",
    "format_gate",
    "integrity_check",
    "metadata_gadgets",
    "template_guard",
    "pickle_scan",
    "weights",
    "entropy",
    "tokenizer_check",
    "provenance",
    "behavioral",
    "diffusion_deep_scan",
];

pub const TARGET: &str = "wasm32-wasip2";

/// Route B's Debian packages (Debian 12 with bookworm-security). The version
/// is not pinned: bookworm-security keeps only its newest build.
pub const DEBIAN_PACKAGES: [&str; 5] = ["rustc-web", "cargo-web", "rust-web-src", "lld-22", "wasi-libc"];

/// The linker route B installs from crates.io (it is not packaged by Debian).
pub const COMPONENT_LINKER_CRATE: &str = "wasm-component-ld@0.5.31";

/// Explicit 128-bit SIMD: wasm kernels reach native speed only with it. Route
/// B sets it itself (its flags replace the config's); route A takes it from
/// the crate's `.cargo/config.toml`.
const SIMD: &str = "-C target-feature=+simd128";

/// How guests get built.
#[derive(Clone, Debug)]
pub enum Route {
    /// rustup's wasm32-wasip2 target for the active toolchain.
    Rustup,
    /// Debian's rustc-web + rust-web-src with -Zbuild-std, linked by
    /// wasm-component-ld from crates.io.
    Debian { linker: PathBuf },
}

impl Route {
    pub fn describe(&self) -> String {
        match self {
            Route::Rustup => "route A: rustup target wasm32-wasip2".into(),
            Route::Debian { linker } => {
                format!("route B: Debian rustc-web + rust-web-src (-Zbuild-std), linker {}", linker.display())
            }
        }
    }

    /// Where a crate's components land under `target_dir`.
    pub fn components_dir(&self, target_dir: &Path) -> PathBuf {
        target_dir.join(TARGET).join("release")
    }

    /// `cargo build --release` for wasm32-wasip2, run in `crate_dir` (so its
    /// `.cargo/config.toml` applies), into `target_dir`.
    pub fn cargo_build(&self, crate_dir: &Path, target_dir: &Path) -> Command {
        let mut c = match self {
            Route::Rustup => {
                let mut c = Command::new("cargo");
                // Flags (SIMD) come from the crate's .cargo/config.toml, as with a plain `cargo build`.
                c.args(["build", "--release", "--target", TARGET]);
                c
            }
            Route::Debian { linker } => {
                // Debian's std source only builds with Debian's compiler of the same version.
                let mut c = Command::new("/usr/bin/cargo");
                c.args(["build", "--release", "--target", TARGET, "-Zbuild-std=std,panic_abort"])
                    .env("RUSTC", "/usr/bin/rustc")
                    .env("RUSTC_BOOTSTRAP", "1")
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env("CARGO_TARGET_WASM32_WASIP2_LINKER", linker)
                    .env(
                        "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS",
                        format!("{SIMD} -L native=/usr/lib/wasm32-wasi -Clink-arg=--wasm-ld-path=/usr/bin/wasm-ld-22"),
                    );
                c
            }
        };
        c.current_dir(crate_dir).env("CARGO_TARGET_DIR", target_dir);
        c
    }
}

/// Is rustup's wasm32-wasip2 target installed for the active toolchain?
pub fn rustup_has_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET))
}

/// Are Debian's packages for route B installed?
pub fn debian_packages_present() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/lib/rustlib/src/rust").exists()
        && Path::new("/usr/bin/wasm-ld-22").exists()
        && Path::new("/usr/lib/wasm32-wasi").exists()
}

/// Where `cargo install` puts wasm-component-ld.
pub fn component_linker() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    cargo_home.join("bin").join("wasm-component-ld")
}

/// The first route that is ready now, installing nothing. `AIRLOCK_WASM_ROUTE=debian`
/// forces route B. The error says what is missing for each route.
pub fn detect() -> Result<Route, String> {
    let forced = std::env::var("AIRLOCK_WASM_ROUTE").ok();
    if forced.as_deref() != Some("debian") && rustup_has_target() {
        return Ok(Route::Rustup);
    }
    let linker = component_linker();
    if debian_packages_present() && linker.exists() {
        return Ok(Route::Debian { linker });
    }
    Err(format!(
        "no wasm32-wasip2 toolchain: route A needs `rustup target add {TARGET}`; route B needs the Debian \
         packages {}{} and `cargo install wasm-component-ld`{} \
         (`cargo xtask toolchain` in the airlock repo sets up either)",
        DEBIAN_PACKAGES.join(" "),
        if debian_packages_present() { " (present)" } else { "" },
        if linker.exists() { " (present)" } else { "" },
    ))
}

/// True if `bytes` start with a component's header (layer 1), not a core
/// module's: wasmparser's check, so the host, the CLI and xtask agree with
/// the parser wasmtime itself uses.
pub fn is_component(bytes: &[u8]) -> bool {
    wasmparser::Parser::is_component(bytes)
}

#[cfg(test)]
mod tests {
    use super::is_component;

    #[test]
    fn only_a_component_header_is_a_component() {
        // Layer 1, version 0x0d: what wasm-component-ld writes.
        assert!(is_component(b"\0asm\x0d\x00\x01\x00rest"));
        // A core module (layer 0, version 1), a header cut short, and text.
        assert!(!is_component(b"\0asm\x01\x00\x00\x00"));
        assert!(!is_component(b"\0asm\x0d\x00"));
        assert!(!is_component(b"#!/bin/sh\n"));
    }
}
