//! The control socket: one small, versioned, line-delimited JSON protocol that the CLI
//! and the tests speak to the daemon. One request per line, one reply per line.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::events::{Bus, Event, Subscription};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the daemon reads; longer ones are refused.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// A connection that sends nothing for this long is closed (file descriptors are finite).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the CLI waits for a reply (a `top` over a million sources takes a while).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TopKey {
    Packets,
    Bytes,
    Drops,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    BlockAdd {
        cidrs: Vec<String>,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    },
    BlockRm {
        cidrs: Vec<String>,
    },
    BlockLs,
    AllowAdd {
        cidrs: Vec<String>,
        #[serde(default)]
        reason: Option<String>,
    },
    AllowRm {
        cidrs: Vec<String>,
    },
    AllowLs,
    Stats,
    Top {
        by: TopKey,
        limit: usize,
    },
    /// Recent notable events; with `follow`, the reply is followed by one event per
    /// line until the client hangs up. `http` adds one event per observed exchange.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        http: bool,
    },
    /// Re-read the policy from the config (as SIGHUP does).
    PolicyReload,
    /// The active policy, as TOML.
    PolicyShow,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    pub version: u32,
    pub request: Request,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself was wrong (CLI exit 2).
    BadRequest,
    /// The operation failed (CLI exit 1).
    Failed,
    /// The peer may not use the socket.
    Forbidden,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ControlError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::BadRequest,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Value),
    Error(ControlError),
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ReplyFrame {
    pub version: u32,
    pub reply: Reply,
}

// Result shapes (the contract's `--json` output: objects may gain fields, these stay).

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ListEntryView {
    pub cidr: String,
    pub reason: String,
    pub origin: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub hits: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct TopRow {
    pub ip: String,
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub last_seen: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct SampleCounts {
    pub captured: u64,
    pub lost: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct StatsView {
    pub packets: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
    pub samples: SampleCounts,
    pub blocklist_entries: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct InterfaceView {
    pub name: String,
    pub mode: String,
    pub attached: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PolicyView {
    pub source: String,
    pub rules: u64,
    pub loaded_at: String,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct StatusView {
    pub version: String,
    pub uptime_s: u64,
    pub interfaces: Vec<InterfaceView>,
    pub policy: PolicyView,
}

/// What the daemon does with one request; runs on a blocking thread (map walks).
pub type Handler = Arc<dyn Fn(Request) -> Result<Value, ControlError> + Send + Sync>;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("control socket {path}: another daemon is already listening")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket (mode 0600), replacing a stale file left by a dead daemon.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io = |source| ServerError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Handler, bus: Bus) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, handler.clone(), bus.clone()));
            }
            Err(error) => {
                warn!(%error, "Control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, handler: Handler, bus: Bus) {
    // Root only: checked on the peer's credentials, not just the file mode.
    let allowed_uid = nix::unistd::geteuid().as_raw();
    let peer_uid = stream.peer_cred().map(|cred| cred.uid()).ok();
    let (read, mut write) = stream.into_split();
    if peer_uid != Some(allowed_uid) {
        warn!(peer_uid, "Refused a control connection from another user");
        let error = ControlError {
            kind: ErrorKind::Forbidden,
            message: "permission denied: the control socket is for root only".into(),
        };
        let _ = write_reply(&mut write, Reply::Error(error)).await;
        return;
    }
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader)
                .take(MAX_REQUEST_BYTES + 1)
                .read_until(b'\n', &mut line),
        )
        .await;
        match read {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                debug!(%error, "Control connection read failed");
                return;
            }
            Err(_) => {
                debug!("Control connection idle; closing it");
                return;
            }
        }
        if line.len() as u64 > MAX_REQUEST_BYTES {
            let error =
                ControlError::bad_request(format!("request larger than {MAX_REQUEST_BYTES} bytes"));
            let _ = write_reply(&mut write, Reply::Error(error)).await;
            return;
        }
        let reply = match parse_request(&line) {
            Ok(Request::Events { follow, http }) => {
                // Subscribe before taking the history: nothing falls in between.
                let subscription = bus.subscribe(http);
                let history = bus.history();
                let history: Vec<&Event> = history.iter().map(|event| &**event).collect();
                let history = serde_json::to_value(history).unwrap_or_default();
                if write_reply(&mut write, Reply::Ok(history)).await.is_err() || !follow {
                    continue;
                }
                stream_events(reader, write, subscription).await;
                return;
            }
            Ok(request) => {
                debug!(?request, "Control request");
                let handler = handler.clone();
                match tokio::task::spawn_blocking(move || handler(request)).await {
                    Ok(Ok(value)) => Reply::Ok(value),
                    Ok(Err(error)) => Reply::Error(error),
                    Err(join) => Reply::Error(ControlError::failed(format!(
                        "request handler failed: {join}"
                    ))),
                }
            }
            Err(error) => Reply::Error(error),
        };
        if write_reply(&mut write, reply).await.is_err() {
            return;
        }
    }
}

/// Writes events as they come until the client hangs up (or sends anything).
async fn stream_events(
    mut reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut subscription: Subscription,
) {
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            _ = reader.read(&mut byte) => return,
            event = subscription.next() => {
                let Some(event) = event else { return };
                let Ok(mut bytes) = serde_json::to_vec(&*event) else { continue };
                bytes.push(b'\n');
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Parses one request line; anything malformed is a `bad_request` naming the problem.
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    let text =
        std::str::from_utf8(line).map_err(|_| ControlError::bad_request("request is not UTF-8"))?;
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|e| ControlError::bad_request(format!("request is not JSON: {e}")))?;
    match value.get("version").and_then(Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(ControlError::bad_request(format!(
                "unsupported protocol version {v} (this daemon speaks {PROTOCOL_VERSION})"
            )));
        }
        None => {
            return Err(ControlError::bad_request(
                "request has no numeric `version`",
            ));
        }
    }
    serde_json::from_value::<RequestFrame>(value)
        .map(|frame| frame.request)
        .map_err(|e| ControlError::bad_request(format!("invalid request: {e}")))
}

async fn write_reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    reply: Reply,
) -> std::io::Result<()> {
    let frame = ReplyFrame {
        version: PROTOCOL_VERSION,
        reply,
    };
    let mut bytes = serde_json::to_vec(&frame).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("daemon not reachable at {path}: {source} (is `apimon run` running?)")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Remote(ControlError),
    #[error("control protocol error: {0}")]
    Protocol(String),
}

/// The CLI's side of the socket (blocking: one request, one reply).
pub struct Client {
    stream: BufReader<StdUnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = StdUnixStream::connect(path).map_err(|source| ClientError::Unreachable {
            path: path.to_owned(),
            source,
        })?;
        let protocol = |e: std::io::Error| ClientError::Protocol(e.to_string());
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .map_err(protocol)?;
        stream
            .set_write_timeout(Some(CLIENT_TIMEOUT))
            .map_err(protocol)?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    pub fn call(&mut self, request: Request) -> Result<Value, ClientError> {
        let protocol = |e: String| ClientError::Protocol(e);
        let frame = RequestFrame {
            version: PROTOCOL_VERSION,
            request,
        };
        let mut bytes = serde_json::to_vec(&frame).map_err(|e| protocol(e.to_string()))?;
        bytes.push(b'\n');
        // A daemon that refuses the peer answers and closes at once: the reply may be
        // waiting even when the request could not be written.
        let written = self.stream.get_mut().write_all(&bytes);
        let mut line = String::new();
        let read = self
            .stream
            .read_line(&mut line)
            .map_err(|e| protocol(format!("reading the reply: {e}")))?;
        if read == 0 {
            return Err(protocol(match written {
                Err(e) => e.to_string(),
                Ok(()) => "the daemon closed the connection without replying".into(),
            }));
        }
        let frame: ReplyFrame =
            serde_json::from_str(&line).map_err(|e| protocol(format!("malformed reply: {e}")))?;
        match frame.reply {
            Reply::Ok(value) => Ok(value),
            Reply::Error(error) => Err(ClientError::Remote(error)),
        }
    }

    /// After an `events` call with `follow`: the next streamed event (blocks; None when
    /// the daemon went away).
    pub fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| ClientError::Protocol(format!("malformed event: {e}"))),
            Err(e) => Err(ClientError::Protocol(format!("reading events: {e}"))),
        }
    }

    /// Following events waits as long as it takes.
    pub fn without_timeout(self) -> Result<Self, ClientError> {
        self.stream
            .get_ref()
            .set_read_timeout(None)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(self)
    }

    /// Calls and decodes the result into its view type.
    pub fn call_as<T: serde::de::DeserializeOwned>(
        &mut self,
        request: Request,
    ) -> Result<T, ClientError> {
        let value = self.call(request)?;
        serde_json::from_value(value)
            .map_err(|e| ClientError::Protocol(format!("unexpected reply shape: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let request = Request::BlockAdd {
            cidrs: vec!["10.0.0.1/32".into()],
            ttl_ms: Some(2000),
            reason: Some("test".into()),
        };
        let frame = RequestFrame {
            version: PROTOCOL_VERSION,
            request: request.clone(),
        };
        let line = serde_json::to_vec(&frame).unwrap();
        assert_eq!(parse_request(&line).unwrap(), request);
        assert_eq!(
            parse_request(br#"{"version":1,"request":{"op":"top","by":"drops","limit":3}}"#)
                .unwrap(),
            Request::Top {
                by: TopKey::Drops,
                limit: 3
            }
        );
    }

    #[test]
    fn garbage_gets_a_bad_request_naming_the_problem() {
        let cases: [(&[u8], &str); 6] = [
            (b"\xff\xfe", "not UTF-8"),
            (b"hello", "not JSON"),
            (b"{}", "no numeric `version`"),
            (
                br#"{"version":2,"request":{"op":"stats"}}"#,
                "unsupported protocol version 2",
            ),
            (
                br#"{"version":1,"request":{"op":"reboot"}}"#,
                "unknown variant `reboot`",
            ),
            (
                br#"{"version":1,"request":{"op":"block_add","cidrs":"x"}}"#,
                "invalid request",
            ),
        ];
        for (line, expected) in cases {
            let error = parse_request(line).unwrap_err();
            assert_eq!(error.kind, ErrorKind::BadRequest);
            assert!(
                error.message.contains(expected),
                "{} !~ {expected}",
                error.message
            );
        }
    }
}
