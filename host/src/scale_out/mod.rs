//! Scale-out over NATS JetStream. `airlock worker` takes scan jobs from a
//! work-queue stream and publishes each verdict to a results stream;
//! `airlock watch --dispatch` publishes its claims as jobs and promotes or
//! rejects from those results. The lifecycle stays single-writer: only the
//! watcher moves models and writes the audit log, and it accepts a result only
//! when the worker scanned the same bytes under the same policy.
//!
//! Delivery: a job is acked only after its result is stored in the results
//! stream. A worker that dies mid-scan stops sending progress, the job comes
//! back after the ack wait to another worker, and after `MAX_SCANS` tries it
//! goes to `airlock.dead.<id>` with the reason, which the watcher turns into a
//! rejection (fail closed) that `rescan` can retry. A worker that hands a job
//! back says why on `airlock.dead.<id>_handed_back`, so the dead letter names
//! the cause even when the delivery that files it is not the one that refused.
//!
//! Bytes: a job names the model by its path on storage the workers share, or
//! (`--transfer object-store`) by objects the watcher put in a JetStream
//! Object Store bucket; the worker streams those into a scratch folder and
//! checks each file's size and sha256 against the job before it scans.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, AckKind, consumer::pull, object_store, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::artifact::{FolderLimits, Format, Model, ModelKind, ReadMode, Sidecars};
use crate::pipeline::{Outcome, ScanInput, Scanner};
use crate::policy::{NatsAuth, Policy};

pub use crate::pipeline::digest::policy_digest;

mod dispatch; // the watcher's side: jobs out, replies checked (the `Scan` behind `watch --dispatch`)
mod nats; // the login, streams, bucket and acknowledged publishing both ends share
mod queue; // `airlock queue`: what the server holds, read-only
mod signing; // results signed by workers, checked against the policy's trusted keys
mod split; // a sharded folder scanned in parts: the shards, a part's scan, a join's inputs
mod transfer; // the bytes of an object-store job: fetched, checked, held in scratch
mod wire; // subjects, jobs, results and dead letters
mod worker; // `airlock worker`: jobs in, bytes fetched or found, scans, signed results out
pub use dispatch::*;
use nats::*;
pub use queue::*;
pub use signing::Signer;
use split::*;
pub use transfer::file_digests;
use transfer::*;
pub use wire::*;
pub use worker::*;
