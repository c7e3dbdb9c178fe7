//! The audit log: one JSON object per line, each carrying its sequence number and a
//! SHA-256 hash chained to the previous record's (across rotation and restarts), so
//! that altering, deleting, inserting or reordering records shows. Written by one
//! thread in batches; a caller that must know its event is on disk waits for the fsync.
//!
//! A record is the event as a JSON value (object keys sorted) with
//! `apimon.audit = {seq, prev}`; `hash = SHA-256(prev || that serialisation)` is then
//! added as `apimon.audit.hash`. Verification removes the hash and recomputes it.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread::JoinHandle,
};

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use tracing::{error, warn};

use crate::events::Event;

/// `prev` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Records written per batch at most (one fsync each).
const BATCH: usize = 512;

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where and how records are kept.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    pub path: PathBuf,
    /// Rotate before a file grows past this.
    pub max_file_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` is the newest).
    pub keep_files: u32,
    /// Also print each record on standard output.
    pub stdout: bool,
}

/// Position in the chain: the last record's sequence number and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

impl Default for ChainHead {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.into(),
        }
    }
}

/// The record for `event` following `head`, as one line (without the newline), and the
/// new head.
pub fn seal(event: &Event, head: &ChainHead) -> (String, ChainHead) {
    let mut value = serde_json::to_value(event).unwrap_or_else(
        |e| serde_json::json!({"event": {"action": "unserialisable"}, "message": e.to_string()}),
    );
    let seq = head.seq + 1;
    let audit = audit_table(&mut value);
    audit.insert("seq".into(), seq.into());
    audit.insert("prev".into(), head.hash.clone().into());
    let hash = digest(&head.hash, &value);
    audit_table(&mut value).insert("hash".into(), hash.clone().into());
    (value.to_string(), ChainHead { seq, hash })
}

/// `apimon.audit` of a record, created if missing.
fn audit_table(value: &mut Value) -> &mut Map<String, Value> {
    let apimon = object(object(value).entry("apimon").or_insert(Value::Null));
    object(apimon.entry("audit").or_insert(Value::Null))
}

/// `value` as an object, replacing anything else with an empty one.
fn object(value: &mut Value) -> &mut Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => {
            *other = Value::Object(Map::new());
            object(other)
        }
    }
}

fn digest(prev: &str, value: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev.as_bytes());
    hasher.update(value.to_string().as_bytes());
    hex::encode(hasher.finalize())
}

/// What a message to the writer carries.
enum Job {
    Write(Arc<Event>),
    /// Answered once everything sent before is on disk, or why it is not.
    Sync(mpsc::SyncSender<Result<(), String>>),
}

/// The handle the daemon keeps; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
}

/// Owns the writer thread. Dropping it leaves the thread to end once the last
/// `AuditLog` is gone; `finish` waits for that (the daemon, whose handles may outlive
/// it in tasks, syncs with `AuditLog::sync` instead).
pub struct AuditWriter {
    thread: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Opens the log (continuing the chain of what is there) and starts the writer.
    pub fn open(options: AuditOptions) -> Result<(Self, AuditWriter), AuditError> {
        let mut sink = Sink::open(options)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("apimon-audit".into())
            .spawn(move || sink.run(&rx))
            .map_err(|source| AuditError::Io {
                path: PathBuf::from("audit writer thread"),
                source,
            })?;
        Ok((
            Self { jobs },
            AuditWriter {
                thread: Some(thread),
            },
        ))
    }

    /// Queues a record (written within a batch).
    pub fn record(&self, event: Arc<Event>) {
        if self.jobs.send(Job::Write(event)).is_err() {
            error!("Audit writer is gone; a record was not written");
        }
    }

    /// Blocks until every record queued so far is on disk; an error when a write since
    /// the last sync failed (the records may be missing).
    pub fn sync(&self) -> Result<(), String> {
        let (done, wait) = mpsc::sync_channel(1);
        self.jobs
            .send(Job::Sync(done))
            .map_err(|_| "the audit writer is gone".to_owned())?;
        wait.recv()
            .map_err(|_| "the audit writer is gone".to_owned())?
    }
}

impl AuditWriter {
    /// Waits for the writer to drain (after every `AuditLog` handle is dropped).
    pub fn finish(mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("Audit writer panicked");
        }
    }
}

struct Sink {
    options: AuditOptions,
    file: File,
    size: u64,
    head: ChainHead,
    /// The first write failure since the last sync was answered.
    failure: Option<String>,
}

impl Sink {
    fn open(options: AuditOptions) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: options.path.clone(),
            source,
        };
        if let Some(dir) = options.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // The chain continues from the newest record on disk (this file, else the last
        // rotated one).
        let current = complete_records(&options.path).map_err(io)?;
        let head = last_head_in(&current)
            .or_else(|| last_head_in(&std::fs::read(rotated(&options.path, 1)).ok()?))
            .unwrap_or_default();
        let file = open_append(&options.path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        Ok(Self {
            options,
            file,
            size,
            head,
            failure: None,
        })
    }

    fn run(&mut self, jobs: &mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut waiting = Vec::new();
            let mut lines = String::new();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(job) = next {
                match job {
                    Job::Write(event) => {
                        let (line, head) = seal(&event, &self.head);
                        self.head = head;
                        if self.options.stdout {
                            println!("{line}");
                        }
                        let pending = self.size + lines.len() as u64;
                        if pending > 0
                            && pending + line.len() as u64 + 1 > self.options.max_file_bytes
                        {
                            self.write(&lines);
                            lines.clear();
                            self.rotate();
                        }
                        lines.push_str(&line);
                        lines.push('\n');
                    }
                    Job::Sync(done) => waiting.push(done),
                }
                taken += 1;
                next = if taken < BATCH {
                    jobs.try_recv().ok()
                } else {
                    None
                };
            }
            self.write(&lines);
            if let Err(e) = self.file.sync_data() {
                error!(error = %e, path = %self.options.path.display(), "Audit log fsync failed");
                self.failed(format!("fsync: {e}"));
            }
            if !waiting.is_empty() {
                let answer = match self.failure.take() {
                    Some(failure) => Err(failure),
                    None => Ok(()),
                };
                for done in waiting {
                    let _ = done.send(answer.clone());
                }
            }
        }
    }

    fn write(&mut self, lines: &str) {
        if lines.is_empty() {
            return;
        }
        match self.file.write_all(lines.as_bytes()) {
            Ok(()) => self.size += lines.len() as u64,
            Err(e) => {
                error!(error = %e, path = %self.options.path.display(), "Audit log write failed");
                self.failed(format!("write: {e}"));
            }
        }
    }

    fn failed(&mut self, why: String) {
        let path = self.options.path.display();
        self.failure.get_or_insert_with(|| format!("{path}: {why}"));
    }

    /// `audit.jsonl` becomes `.1`, `.1` becomes `.2`, ... up to `keep_files`.
    fn rotate(&mut self) {
        let path = &self.options.path;
        if let Err(e) = self.file.sync_data() {
            error!(error = %e, "Audit log fsync before rotation failed");
        }
        let keep = self.options.keep_files;
        if keep == 0 {
            let _ = std::fs::remove_file(path);
        } else {
            let _ = std::fs::remove_file(rotated(path, keep));
            for n in (1..keep).rev() {
                let from = rotated(path, n);
                if from.exists()
                    && let Err(e) = std::fs::rename(&from, rotated(path, n + 1))
                {
                    warn!(error = %e, file = %from.display(), "Audit log rotation failed");
                }
            }
            if let Err(e) = std::fs::rename(path, rotated(path, 1)) {
                warn!(error = %e, "Audit log rotation failed");
            }
        }
        match open_append(path) {
            Ok(file) => {
                self.file = file;
                self.size = 0;
            }
            Err(e) => {
                error!(error = %e, path = %path.display(), "Opening a new audit log failed");
                self.failed(format!("opening after rotation: {e}"));
            }
        }
    }
}

/// A crash can leave a last line half written; new records must not be glued to it
/// (that would make the first of them unreadable). Cuts the file back to its last
/// newline; the cut record was never acknowledged as written.
/// The file's bytes up to its last complete record, read once; a half-written last
/// record (a crash mid-write) is cut off on disk too.
fn complete_records(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(bytes);
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    warn!(path = %path.display(), bytes = bytes.len() - keep, "Cutting a half-written last audit record");
    OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(keep as u64)?;
    bytes.truncate(keep);
    Ok(bytes)
}

/// The chain head of the newest record in `records` (searched from the end).
fn last_head_in(records: &[u8]) -> Option<ChainHead> {
    records
        .split(|b| *b == b'\n')
        .rev()
        .find_map(|line| record_head(std::str::from_utf8(line).ok()?))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `audit.jsonl.N`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A record's `apimon.audit` table, if it has one.
fn sealed_fields(value: &Value) -> Option<&Value> {
    value.get("apimon")?.get("audit")
}

fn record_head(line: &str) -> Option<ChainHead> {
    let value: Value = serde_json::from_str(line).ok()?;
    let audit = sealed_fields(&value)?;
    Some(ChainHead {
        seq: audit.get("seq")?.as_u64()?,
        hash: audit.get("hash")?.as_str()?.to_owned(),
    })
}

/// The first thing wrong with a set of audit files, or how many records check out.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Intact { records: u64, first: u64, last: u64 },
    Tampered { place: String, what: String },
}

struct Loaded {
    place: String,
    value: Option<Value>,
    seq: Option<u64>,
}

/// Checks files given oldest first (`audit.jsonl.2 audit.jsonl.1 audit.jsonl`).
pub fn verify(files: &[PathBuf]) -> Result<Verdict, AuditError> {
    let mut records = Vec::new();
    for path in files {
        let file = File::open(path).map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?;
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?;
            let value: Option<Value> = serde_json::from_str(&line).ok();
            let seq = value
                .as_ref()
                .and_then(|v| sealed_fields(v)?.get("seq")?.as_u64());
            records.push(Loaded {
                place: format!("{}:{}", path.display(), index + 1),
                value,
                seq,
            });
        }
    }
    let mut previous: Option<ChainHead> = None;
    let mut seen = std::collections::HashSet::new();
    for (i, record) in records.iter().enumerate() {
        let tampered = |what: String| {
            Ok(Verdict::Tampered {
                place: record.place.clone(),
                what,
            })
        };
        let (Some(value), Some(seq)) = (&record.value, record.seq) else {
            return tampered("altered: not a sealed audit record".into());
        };
        let mut unsealed = value.clone();
        let stated = audit_table(&mut unsealed)
            .remove("hash")
            .and_then(|h| h.as_str().map(str::to_owned));
        let prev = sealed_fields(value)
            .and_then(|a| a.get("prev"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(stated) = stated.filter(|hash| *hash == digest(prev, &unsealed)) else {
            return tampered(format!("altered: record {seq} does not match its hash"));
        };
        if let Some(last) = &previous {
            let expected = last.seq + 1;
            if seq < expected {
                return tampered(if seen.contains(&seq) {
                    format!("inserted: a second record {seq} after record {}", last.seq)
                } else {
                    format!("reordered: record {seq} after record {}", last.seq)
                });
            }
            if seq > expected {
                let comes_later = records[i + 1..]
                    .iter()
                    .any(|r| r.seq.is_some_and(|s| (expected..seq).contains(&s)));
                return tampered(if comes_later {
                    format!("reordered: record {seq} before record {expected}")
                } else if seq - expected == 1 {
                    format!("deleted: record {expected} is missing")
                } else {
                    format!("deleted: records {expected} to {} are missing", seq - 1)
                });
            }
            if prev != last.hash {
                return tampered(format!(
                    "inserted or altered: record {seq} does not follow the record before it"
                ));
            }
        }
        seen.insert(seq);
        previous = Some(ChainHead { seq, hash: stated });
    }
    let first = records.iter().find_map(|r| r.seq).unwrap_or(0);
    Ok(Verdict::Intact {
        records: records.len() as u64,
        first,
        last: previous.map_or(0, |head| head.seq),
    })
}

#[cfg(test)]
mod tests;
