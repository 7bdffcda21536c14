//! A deliberately hostile stage, for the host's containment tests. Its config
//! chooses the misbehaviour: `{"mode": "spin" | "memory-bomb" | "panic" | "slow-pass" |
//! "huge-report" | "read-flood" | "read-loop" | "read-budget" | "remember" | "stderr-spam" |
//! "wasi-escape" | "pass"}`.

use airlock_sdk::{ChunkReader, Model, Report, Stage, StageInfo, context};
use serde::Deserialize;
use std::sync::atomic::{AtomicU32, Ordering};

/// Counts runs in this instance: if the host ever reused an instance for a
/// second model, the second run would see 2.
static RUNS: AtomicU32 = AtomicU32::new(0);

#[derive(Deserialize)]
struct Config {
    mode: String,
}

struct Misbehave;

impl Stage for Misbehave {
    fn describe() -> StageInfo {
        StageInfo::new("misbehave", env!("CARGO_PKG_VERSION"), "a hostile plugin for containment tests")
    }

    fn run(model: &Model) -> Report {
        let mode = match context::config::<Config>() {
            Ok(c) => c.mode,
            Err(e) => return Report::fail(e),
        };
        match mode.as_str() {
            "pass" => Report::pass("misbehave: behaving"),
            "slow-pass" => {
                // Takes 1.5 s, then passes: room for a test to change the file mid-scan.
                let start = std::time::Instant::now();
                while start.elapsed() < std::time::Duration::from_millis(1500) {
                    std::hint::black_box(start);
                }
                Report::pass("misbehave: slow but fine")
            }
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![0xa5; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("deliberate panic from the misbehave plugin"),
            "huge-report" => Report::pass("x".repeat(100 << 20)),
            "read-flood" => {
                // Ask for far more than the host allows in one read.
                let file = &model.files()[0];
                match file.read(0, u32::MAX) {
                    Ok(b) => Report::pass(format!("host returned {} bytes for a u32::MAX read", b.len())),
                    Err(e) => Report::fail(format!("host refused: {e}")),
                }
            }
            "read-loop" => {
                // Reads the start of the file again and again, in 1 MiB reads, forever.
                let file = &model.files()[0];
                let len = file.size().min(1 << 20) as u32;
                let mut total = 0u64;
                loop {
                    match file.read(0, len) {
                        Ok(b) => total += std::hint::black_box(b.len() as u64),
                        Err(e) => return Report::fail(format!("host refused after {total} bytes: {e}")),
                    }
                }
            }
            "read-budget" => {
                let before = context::read_budget();
                let file = &model.files()[0];
                let n = file.read(0, file.size().min(4096) as u32).map(|b| b.len()).unwrap_or(0);
                Report::pass(format!("budget {before} then {} after reading {n}", context::read_budget()))
            }
            "remember" => {
                let n = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
                Report::pass(format!("run {n} in this instance"))
            }
            "read-all" => {
                let file = &model.files()[0];
                let mut n = 0u64;
                for chunk in ChunkReader::file(file) {
                    match chunk {
                        Ok((_, b)) => n += b.len() as u64,
                        Err(e) => return Report::fail(e),
                    }
                }
                Report::pass(format!("read {n} bytes"))
            }
            "stderr-spam" => {
                let line = "spam ".repeat(200);
                for _ in 0..20_000 {
                    eprintln!("{line}");
                }
                Report::pass("spammed stderr")
            }
            "wasi-escape" => {
                let fs = std::fs::read("/etc/passwd").map(|b| b.len());
                let dir = std::fs::read_dir("/").map(|d| d.count());
                let env: Vec<_> = std::env::vars().collect();
                match (fs, dir) {
                    (Err(f), Err(d)) if env.is_empty() => Report::pass(format!("denied: fs={f} dir={d}")),
                    (fs, dir) => Report::fail(format!("escaped: fs={fs:?} dir={dir:?} env={}", env.len())),
                }
            }
            other => Report::fail(format!("unknown mode {other:?}")),
        }
    }
}

airlock_sdk::export_stage!(Misbehave);
