//! The audit log: append-only JSON Lines with a hash chain.
//!
//! Each entry records the sha256 of the line before it (`prev`), and
//! `audit.head` records the sequence number and sha256 of the last line. An
//! edited, dropped, reordered or truncated entry breaks the chain or the head.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    /// `INFO` for promotions and rescans, `CRITICAL` for rejections.
    pub level: String,
    /// `promoted`, `rejected` or `rescan`.
    pub event: String,
    pub model: String,
    pub sha256: Option<String>,
    pub failed_stage: Option<String>,
    pub reason: Option<String>,
    /// Stages switched off by policy when this model was scanned.
    #[serde(default)]
    pub disabled_stages: Vec<String>,
    /// Who asked for an action (`cli`, `web`); absent for the watcher's own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// sha256 of the previous line (64 zeros for the first).
    pub prev: String,
}

/// What a caller fills in; the log adds `seq`, `time` and `prev`.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub level: &'static str,
    pub event: &'static str,
    pub model: String,
    pub sha256: Option<String>,
    pub failed_stage: Option<String>,
    pub reason: Option<String>,
    pub disabled_stages: Vec<String>,
    pub actor: Option<String>,
}

pub struct AuditLog {
    path: PathBuf,
    head: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Head {
    seq: u64,
    sha256: String,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn sha(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// Every entry ends with a newline; bytes after the last one are a line
/// whose write was cut short (the disk filled, the process died before the
/// rollback). They are dropped, with a warning. Returns the length kept.
fn drop_torn_tail(f: &mut fs::File, path: &Path) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Look back in steps for the last newline; an entry is a few KB at most.
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                tracing::warn!(
                    "audit log {}: dropped {} bytes of a torn last line (an append cut short)",
                    path.display(),
                    len - keep
                );
                f.set_len(keep)?;
                f.sync_all()?;
            }
            return Ok(keep);
        }
        if start == 0 {
            tracing::warn!("audit log {}: dropped {len} bytes of a torn first line", path.display());
            f.set_len(0)?;
            f.sync_all()?;
            return Ok(0);
        }
        end = start;
    }
}

impl AuditLog {
    pub fn new(path: &Path) -> AuditLog {
        AuditLog { path: path.to_path_buf(), head: path.with_extension("head") }
    }

    fn read_head(&self) -> io::Result<Head> {
        match fs::read(&self.head) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| io::Error::other(format!("{}: {e}", self.head.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Head { seq: 0, sha256: GENESIS.into() }),
            Err(e) => Err(e),
        }
    }

    /// Drops a torn last line (an append cut short), then rolls the head
    /// forward when a crash fell between appending a line and moving the
    /// head: the last line then chains exactly onto the head.
    /// Anything else that disagrees is left for `verify` to report.
    pub fn repair(&self) -> io::Result<()> {
        let _lock = self.lock()?;
        match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(mut f) => {
                drop_torn_tail(&mut f, &self.path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        let head = self.read_head()?;
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(last) = text.lines().last() else { return Ok(()) };
        let Ok(entry) = serde_json::from_str::<Entry>(last) else { return Ok(()) };
        if entry.seq == head.seq + 1 && entry.prev == head.sha256 {
            tracing::warn!(
                "audit log: the head was one entry behind after a crash; rolled forward to seq {}",
                entry.seq
            );
            let head = Head { seq: entry.seq, sha256: sha(last.as_bytes()) };
            super::root::write_atomic(&self.head, &serde_json::to_vec(&head).map_err(io::Error::other)?)?;
        }
        Ok(())
    }

    /// Appends one entry, fsynced, and moves the head.
    /// An exclusive lock on `audit.lock` beside the log, held while the head is
    /// read and the entry and the new head are written. Every process and
    /// thread that appends takes it (the watcher's threads, `rescan`), so no
    /// two entries get one sequence number and no head is written over a newer one.
    fn lock(&self) -> io::Result<fs::File> {
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).open(self.path.with_extension("lock"))?;
        // flock(2): exclusive, waits; released when the file is dropped.
        file.lock()?;
        Ok(file)
    }

    pub fn append(&self, r: Record) -> io::Result<Entry> {
        let _lock = self.lock()?;
        let head = self.read_head()?;
        let entry = Entry {
            seq: head.seq + 1,
            time: now_rfc3339(),
            level: r.level.into(),
            event: r.event.into(),
            model: r.model,
            sha256: r.sha256,
            failed_stage: r.failed_stage,
            reason: r.reason,
            disabled_stages: r.disabled_stages,
            actor: r.actor,
            prev: head.sha256,
        };
        let line = serde_json::to_string(&entry).map_err(io::Error::other)?;
        let mut f = OpenOptions::new().create(true).read(true).append(true).open(&self.path)?;
        let len = drop_torn_tail(&mut f, &self.path)?;
        // A write cut short (a full disk) is taken back, so the next append
        // starts on a line boundary and the chain stays whole.
        if let Err(e) = f.write_all(format!("{line}\n").as_bytes()).and_then(|()| f.sync_all()) {
            let _ = f.set_len(len).and_then(|()| f.sync_all());
            return Err(e);
        }
        let head = Head { seq: entry.seq, sha256: sha(line.as_bytes()) };
        super::root::write_atomic(&self.head, &serde_json::to_vec(&head).map_err(io::Error::other)?)?;
        Ok(entry)
    }

    /// All entries, in order.
    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        text.lines()
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| io::Error::other(format!("line {}: {e}", i + 1))))
            .collect()
    }

    /// Checks the chain and the head. `Ok(n)` is the number of entries.
    pub fn verify(&self) -> Result<u64, String> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let mut prev = GENESIS.to_string();
        let mut seq = 0;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let e: Entry = serde_json::from_str(line).map_err(|e| format!("line {n}: not an audit entry ({e})"))?;
            if e.prev != prev {
                return Err(format!(
                    "line {n} (seq {}): the chain is broken: the entry before it was edited, dropped or reordered",
                    e.seq
                ));
            }
            if e.seq != seq + 1 {
                return Err(format!("line {n}: sequence number {} follows {seq}", e.seq));
            }
            prev = sha(line.as_bytes());
            seq = e.seq;
        }
        let head = self.read_head().map_err(|e| e.to_string())?;
        if head.seq != seq || head.sha256 != prev {
            return Err(format!(
                "the log ends at seq {seq} but {} records seq {}: entries were dropped from the end or the last one was edited",
                self.head.display(),
                head.seq
            ));
        }
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk cut an append short (the red team's D6): the next append
    /// drops the torn line and the chain holds.
    #[test]
    fn a_torn_append_is_dropped_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(&dir.path().join("audit.jsonl"));
        let rec = |m: &str| Record { level: "INFO", event: "promoted", model: m.into(), ..Record::default() };
        log.append(rec("a")).unwrap();
        let mut f = OpenOptions::new().append(true).open(dir.path().join("audit.jsonl")).unwrap();
        f.write_all(br#"{"seq":2,"time":"2026-12-07T00:00:00Z","lev"#).unwrap();
        drop(f);
        assert!(log.verify().is_err());
        log.append(rec("b")).unwrap();
        assert_eq!(log.verify(), Ok(2));
        assert_eq!(log.entries().unwrap().iter().map(|e| e.model.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    /// Appenders in parallel, each with its own handle as separate processes
    /// have (the watcher's threads, `rescan`): one sequence, one chain.
    #[test]
    fn parallel_appenders_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let log = AuditLog::new(&path);
                    for i in 0..40 {
                        log.append(Record {
                            level: "INFO",
                            event: "rescan",
                            model: format!("m{t}-{i}"),
                            ..Record::default()
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = AuditLog::new(&path);
        assert_eq!(log.verify(), Ok(320));
        let seqs: Vec<u64> = log.entries().unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=320).collect::<Vec<_>>());
    }
}
