//! The lists persisted in the state dir, so a reboot (which empties bpffs) restores
//! them. Written atomically (temp file, fsync, rename, fsync dir) before a change is
//! acknowledged.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::lists::{Entry, Lists};
use crate::maps::ListKind;

pub const STATE_FILE: &str = "lists.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({reason}); move it aside to start with empty lists")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Deserialize, Serialize)]
struct StateDocument {
    version: u32,
    blocklist: Vec<Entry>,
    allowlist: Vec<Entry>,
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(STATE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved lists; a missing file is empty lists.
    pub fn load(&self) -> Result<Lists, StateError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lists::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let document: StateDocument =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if document.version != STATE_VERSION {
            return Err(corrupt(format!("unknown version {}", document.version)));
        }
        Ok(Lists::from_entries(document.blocklist, document.allowlist))
    }

    pub fn save(&self, lists: &Lists) -> Result<(), StateError> {
        let document = StateDocument {
            version: STATE_VERSION,
            blocklist: lists.get(ListKind::Block).values().cloned().collect(),
            allowlist: lists.get(ListKind::Allow).values().cloned().collect(),
        };
        let write_error = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write_error)?;
        let temp = self.path.with_extension("json.tmp");
        let mut file = File::create(&temp).map_err(write_error)?;
        let bytes = serde_json::to_vec_pretty(&document)
            .map_err(|e| write_error(std::io::Error::other(e)))?;
        file.write_all(&bytes).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        fs::rename(&temp, &self.path).map_err(write_error)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::cidr;

    #[test]
    fn lists_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::new(dir.path());
        assert_eq!(state.load().unwrap(), Lists::default());
        let mut lists = Lists::default();
        lists.insert(
            ListKind::Block,
            Entry {
                cidr: cidr::parse("198.51.100.0/24").unwrap(),
                reason: "scanner".into(),
                origin: "cli".into(),
                created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
                expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(20_500)),
                rate_pps: None,
            },
        );
        lists.insert(
            ListKind::Allow,
            Entry {
                cidr: cidr::parse("2001:db8::1").unwrap(),
                reason: String::new(),
                origin: "cli".into(),
                created_at: SystemTime::UNIX_EPOCH,
                expires_at: None,
                rate_pps: None,
            },
        );
        state.save(&lists).unwrap();
        assert_eq!(state.load().unwrap(), lists);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::new(dir.path());
        fs::write(state.path(), "{\"version\":1,\"blocklist\":[{").unwrap();
        let err = state.load().unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
        fs::write(
            state.path(),
            "{\"version\":9,\"blocklist\":[],\"allowlist\":[]}",
        )
        .unwrap();
        assert!(
            state
                .load()
                .unwrap_err()
                .to_string()
                .contains("unknown version 9")
        );
    }
}
