//! Secrets never leave the daemon in clear: a keyed fingerprint (HMAC-SHA-256 under a
//! per-install key) stands in their place, so operators can still see that two
//! requests carried the same credential without learning it.

use std::{
    fs::OpenOptions,
    io::{Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use thiserror::Error;

use crate::http::query;

/// File in the state dir holding the per-install key.
pub const KEY_FILE: &str = "fingerprint.key";
const KEY_BYTES: usize = 32;
/// Hex digits of the MAC shown: 64 bits tell secrets apart without being a target.
const SHOWN_HEX: usize = 16;

#[derive(Debug, Error)]
pub enum SecretsError {
    #[error("fingerprint key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "fingerprint key {path} has {found} bytes, expected {KEY_BYTES}; remove it to make a new one"
    )]
    BadKey { path: PathBuf, found: usize },
    #[error("no randomness for a new fingerprint key: {0}")]
    Random(String),
}

/// Query parameters and JSON/form fields whose values are credentials.
const SECRET_NAMES: &[&str] = &[
    "access_token",
    "api_key",
    "apikey",
    "auth",
    "authorization",
    "client_secret",
    "cookie",
    "id_token",
    "jwt",
    "key",
    "pass",
    "passwd",
    "password",
    "refresh_token",
    "secret",
    "session",
    "sessionid",
    "sig",
    "signature",
    "token",
    "x_api_key",
];

/// Whether a parameter or header name names a credential (case, `-` and `_` ignored).
pub fn is_secret_name(name: &str) -> bool {
    // Called for every parameter of every inspected request: compared in place.
    let same = |known: &str| {
        known.len() == name.len()
            && known.bytes().zip(name.bytes()).all(|(k, n)| {
                let n = if n == b'-' {
                    b'_'
                } else {
                    n.to_ascii_lowercase()
                };
                k == n
            })
    };
    SECRET_NAMES.iter().any(|known| same(known))
}

/// Whether a field of this name may hold a credential: a credential's name as its last
/// part (`user.password`, `auth[token]`), or a name that contains one of the words
/// credentials go by (`newPassword`, `accessToken`).
pub fn may_hold_secret(name: &str) -> bool {
    const WORDS: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "api-key",
        "credential",
        "session",
        "cookie",
        "authorization",
    ];
    is_secret_name(crate::http::query::leaf_name(name))
        || WORDS.iter().any(|word| {
            name.as_bytes()
                .windows(word.len())
                .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
        })
}

#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter { key: <hidden> }")
    }
}

impl Fingerprinter {
    pub fn with_key(key: [u8; KEY_BYTES]) -> Self {
        Self { key }
    }

    /// Loads the key from the state dir, creating it (mode 0600) on first use.
    pub fn open(state_dir: &Path) -> Result<Self, SecretsError> {
        let path = state_dir.join(KEY_FILE);
        let io = |source| SecretsError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::File::open(&path) {
            Ok(mut file) => {
                let mut key = Vec::new();
                file.read_to_end(&mut key).map_err(io)?;
                let key: [u8; KEY_BYTES] =
                    key.as_slice()
                        .try_into()
                        .map_err(|_| SecretsError::BadKey {
                            path: path.clone(),
                            found: key.len(),
                        })?;
                Ok(Self { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_BYTES];
                getrandom::fill(&mut key).map_err(|e| SecretsError::Random(e.to_string()))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                file.write_all(&key).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(Self { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// `hmac:` and the first hex digits of HMAC-SHA-256(key, secret).
    pub fn fingerprint(&self, secret: &[u8]) -> String {
        // HMAC takes keys of any length; this cannot fail for a 32-byte key.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return "hmac:unavailable".into();
        };
        mac.update(secret);
        let digest = mac.finalize().into_bytes();
        let mut text = String::from("hmac:");
        text.push_str(&hex::encode(digest)[..SHOWN_HEX]);
        text
    }

    /// A query string with every credential's value replaced by its fingerprint.
    /// Values are compared and fingerprinted as sent (still percent-encoded).
    pub fn redact_query(&self, query: &str) -> String {
        let mut out = String::with_capacity(query.len());
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, value)) if is_secret_name(&query::decode(name)) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(&self.fingerprint(value.as_bytes()));
                }
                _ => out.push_str(pair),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprinter() -> Fingerprinter {
        Fingerprinter::with_key([7; KEY_BYTES])
    }

    #[test]
    fn same_secret_same_fingerprint_other_key_other_fingerprint() {
        let a = fingerprinter().fingerprint(b"hunter2");
        assert_eq!(a, fingerprinter().fingerprint(b"hunter2"));
        assert_ne!(a, fingerprinter().fingerprint(b"hunter3"));
        assert_ne!(
            a,
            Fingerprinter::with_key([8; KEY_BYTES]).fingerprint(b"hunter2")
        );
        assert!(a.starts_with("hmac:") && a.len() == 5 + SHOWN_HEX, "{a}");
    }

    #[test]
    fn credentials_in_queries_are_replaced_everything_else_kept() {
        let f = fingerprinter();
        let redacted = f.redact_query("q=shoes&API-Key=abc123&page=2&access_token=t0k&Api%5Fkey=x");
        assert!(
            !redacted.contains("abc123") && !redacted.contains("t0k"),
            "{redacted}"
        );
        assert!(redacted.starts_with("q=shoes&API-Key=hmac:"), "{redacted}");
        assert!(
            redacted.contains("&page=2&access_token=hmac:"),
            "{redacted}"
        );
        assert!(!redacted.ends_with("=x"), "{redacted}");
        assert_eq!(f.redact_query("a=1&b&=c&"), "a=1&b&=c&");
        assert_eq!(f.redact_query(""), "");
    }

    #[test]
    fn the_key_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Fingerprinter::open(dir.path()).unwrap().fingerprint(b"s");
        let second = Fingerprinter::open(dir.path()).unwrap().fingerprint(b"s");
        assert_eq!(first, second);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let error = Fingerprinter::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("has 5 bytes"), "{error}");
    }
}
