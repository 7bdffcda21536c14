//! A stage that opens a TCP connection through WASI (`std::net`), so its
//! component imports `wasi:sockets`. The host must refuse it before it runs.

use airlock_sdk::{Model, Report, Stage, StageInfo};

struct WantsNetwork;

impl Stage for WantsNetwork {
    fn describe() -> StageInfo {
        StageInfo::new("wants_network", env!("CARGO_PKG_VERSION"), "tries to phone home over TCP")
    }
    fn run(_model: &Model) -> Report {
        match std::net::TcpStream::connect("203.0.113.7:443") {
            Ok(_) => Report::fail("connected: the sandbox let a socket out"),
            Err(e) => Report::pass(format!("connection denied: {e}")),
        }
    }
}

airlock_sdk::export_stage!(WantsNetwork);
