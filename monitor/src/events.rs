//! Events in Elastic Common Schema shape, and the bus that hands them to live
//! subscribers (`apimon events`) and, later, to the audit sinks.
//!
//! Two streams: notable events (list changes, verdicts, daemon lifecycle) that are
//! kept in a short in-memory history, and one event per observed HTTP exchange, built
//! only while someone subscribes to it (a busy host sees many).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    audit::AuditLog,
    clock,
    http::{Exchange, parse::RequestHead},
    secrets::Fingerprinter,
};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Event {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub event: EventMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Url>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<UserAgent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    /// apimon's own fields (route template, CIDR, TTL, counts, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub apimon: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct EventMeta {
    /// `event`, `alert` or `state`.
    pub kind: String,
    pub category: Vec<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<u8>,
    /// Nanoseconds (ECS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Endpoint {
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self {
            ip: addr.ip().to_canonical().to_string(),
            port: Some(addr.port()),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Http {
    pub version: String,
    pub request: HttpRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponse>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub body: Body,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct HttpResponse {
    pub status_code: u16,
    pub body: Body,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Body {
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Url {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct UserAgent {
    pub original: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Rule {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

impl Event {
    /// An event happening now.
    pub fn new(kind: &str, category: &str, action: &str) -> Self {
        Self {
            timestamp: clock::rfc3339_millis(SystemTime::now()),
            event: EventMeta {
                kind: kind.into(),
                category: vec![category.into()],
                action: action.into(),
                ..EventMeta::default()
            },
            ..Self::default()
        }
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn with_field(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.apimon.insert(name.into(), value.into());
        self
    }

    /// An event about one request: its endpoints, method, path, query (credentials
    /// fingerprinted), host, user agent and route, at `at`.
    pub fn about_request(
        kind: &str,
        action: &str,
        subject: &Subject<'_>,
        at: SystemTime,
        secrets: &Fingerprinter,
    ) -> Self {
        let head = subject.head;
        let (path, query) = crate::http::route::split_target(head.target());
        let mut event = Self::new(kind, "web", action);
        event.timestamp = clock::rfc3339_millis(at);
        event.source = Some(subject.client.into());
        event.destination = Some(subject.server.into());
        event.http = Some(Http {
            version: format!("1.{}", head.version()),
            request: HttpRequest {
                method: head.method().to_owned(),
                body: Body::default(),
            },
            response: None,
        });
        event.url = Some(Url {
            path: path.into(),
            query: query.map(|query| secrets.redact_query(query)),
            domain: head.host().map(str::to_owned),
        });
        event.user_agent = head.user_agent().map(|original| UserAgent {
            original: original.to_owned(),
        });
        event.with_field("route", subject.route)
    }

    /// An event about a whole exchange: `about_request`, and the body sizes and status.
    pub fn about_exchange(
        kind: &str,
        action: &str,
        exchange: &Exchange,
        at: SystemTime,
        secrets: &Fingerprinter,
    ) -> Self {
        let mut event = Self::about_request(kind, action, &exchange.into(), at, secrets);
        if let Some(http) = &mut event.http {
            http.request.body.bytes = exchange.request_body_bytes;
            http.response = exchange.status.map(|status_code| HttpResponse {
                status_code,
                body: Body {
                    bytes: exchange.response_body_bytes,
                },
            });
        }
        event
    }

    /// One observed HTTP exchange.
    pub fn http_exchange(exchange: &Exchange, at: SystemTime, secrets: &Fingerprinter) -> Self {
        let mut event = Self::about_exchange("event", "http_request", exchange, at, secrets);
        event.event.outcome = Some(
            match exchange.status {
                Some(status) if status < 400 => "success",
                Some(_) => "failure",
                None => "unknown",
            }
            .into(),
        );
        event.event.duration = exchange
            .latency
            .map(|l| u64::try_from(l.as_nanos()).unwrap_or(u64::MAX));
        event
    }

    /// A list change (`block_added`, `throttle_expired`, ...); a throttle's carries its
    /// packet rate (`rate_pps`, null otherwise).
    pub fn list_change(action: &str, entry: &crate::enforce::Entry) -> Self {
        Self::new("event", "configuration", action)
            .with_field(
                "rate_pps",
                entry.rate_pps.map_or(serde_json::Value::Null, Into::into),
            )
            .with_field("cidr", entry.cidr.to_string())
            .with_field("reason", entry.reason.clone())
            .with_field("origin", entry.origin.clone())
            .with_field(
                "expires_at",
                entry
                    .expires_at
                    .map(clock::rfc3339)
                    .map_or(serde_json::Value::Null, serde_json::Value::from),
            )
    }

    /// Stands in for events a slow subscriber missed: nothing is lost silently.
    pub fn lost(count: u64) -> Self {
        Self::new("event", "process", "events_lost")
            .with_message(format!(
                "{count} events were not delivered to this subscriber"
            ))
            .with_field("lost", count)
    }
}

/// The request an event is about.
pub struct Subject<'a> {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub head: &'a RequestHead,
    pub route: &'a str,
}

impl<'a> From<&'a Exchange> for Subject<'a> {
    fn from(exchange: &'a Exchange) -> Self {
        Self {
            client: exchange.client,
            server: exchange.server,
            head: &exchange.request,
            route: &exchange.route,
        }
    }
}

impl<'a> From<&crate::http::RequestStart<'a>> for Subject<'a> {
    fn from(request: &crate::http::RequestStart<'a>) -> Self {
        Self {
            client: request.client,
            server: request.server,
            head: request.head,
            route: request.route,
        }
    }
}

/// Notable events kept for `apimon events` without `--follow`.
pub const HISTORY: usize = 1000;
/// Events queued per subscriber before it is told it lost some.
const SUBSCRIBER_QUEUE: usize = 4096;

/// Publishes events to whoever listens. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    notable: broadcast::Sender<Arc<Event>>,
    http: broadcast::Sender<Arc<Event>>,
    history: Arc<Mutex<VecDeque<Arc<Event>>>>,
    /// Every notable event is also an audit record.
    audit: Option<AuditLog>,
}

impl Default for Bus {
    fn default() -> Self {
        Self {
            notable: broadcast::channel(SUBSCRIBER_QUEUE).0,
            http: broadcast::channel(SUBSCRIBER_QUEUE).0,
            history: Arc::default(),
            audit: None,
        }
    }
}

/// What one subscriber receives.
pub struct Subscription {
    pub notable: broadcast::Receiver<Arc<Event>>,
    pub http: Option<broadcast::Receiver<Arc<Event>>>,
}

impl Bus {
    /// A bus whose notable events are also written to the audit log.
    pub fn with_audit(audit: AuditLog) -> Self {
        Self {
            audit: Some(audit),
            ..Self::default()
        }
    }

    /// Blocks until every event published so far is in the audit log on disk (what a
    /// CLI caller was told has happened, has been recorded).
    pub fn sync_audit(&self) -> Result<(), String> {
        match &self.audit {
            Some(audit) => audit.sync(),
            None => Ok(()),
        }
    }

    pub fn publish(&self, event: Event) {
        let event = Arc::new(event);
        if let Some(audit) = &self.audit {
            audit.record(event.clone());
        }
        {
            let mut history = self
                .history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(event.clone());
        }
        // No subscriber is not an error.
        let _ = self.notable.send(event);
    }

    /// Whether anyone wants per-exchange events (so they are built only then).
    pub fn wants_http(&self) -> bool {
        self.http.receiver_count() > 0
    }

    pub fn publish_http(&self, event: Event) {
        let _ = self.http.send(Arc::new(event));
    }

    pub fn history(&self) -> Vec<Arc<Event>> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub fn subscribe(&self, http: bool) -> Subscription {
        Subscription {
            notable: self.notable.subscribe(),
            http: http.then(|| self.http.subscribe()),
        }
    }
}

impl Subscription {
    /// The next event, or `Event::lost` after an overflow; None once the bus is gone.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        let received = match &mut self.http {
            Some(http) => tokio::select! {
                event = self.notable.recv() => event,
                event = http.recv() => event,
            },
            None => self.notable.recv().await,
        };
        match received {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(count)) => Some(Arc::new(Event::lost(count))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::http::parse::request_head;

    fn exchange(target: &str, status: Option<u16>) -> Exchange {
        Exchange {
            client: "10.0.0.2:40000".parse().unwrap(),
            server: "[::ffff:10.0.0.1]:8080".parse().unwrap(),
            route: "/users/{id}".into(),
            request: request_head(&format!(
                "POST {target} HTTP/1.1\r\nHost: api.example\r\nUser-Agent: curl/8\r\nContent-Length: 12\r\n\r\n"
            )),
            started_ns: 0,
            request_body_bytes: 12,
            request_body_complete: true,
            request_body: Vec::new(),
            status,
            response_body_bytes: 3,
            latency: Some(Duration::from_micros(1500)),
        }
    }

    #[test]
    fn an_exchange_becomes_an_ecs_event_with_secrets_fingerprinted() {
        let secrets = Fingerprinter::with_key([1; 32]);
        let event = Event::http_exchange(
            &exchange("/users/7?token=s3cret&x=1", Some(201)),
            SystemTime::UNIX_EPOCH,
            &secrets,
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["@timestamp"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["event"]["action"], "http_request");
        assert_eq!(json["event"]["outcome"], "success");
        assert_eq!(json["event"]["duration"], 1_500_000);
        assert_eq!(json["source"]["ip"], "10.0.0.2");
        assert_eq!(
            json["destination"]["ip"], "10.0.0.1",
            "mapped shown as IPv4"
        );
        assert_eq!(json["destination"]["port"], 8080);
        assert_eq!(json["http"]["request"]["method"], "POST");
        assert_eq!(json["http"]["request"]["body"]["bytes"], 12);
        assert_eq!(json["http"]["response"]["status_code"], 201);
        assert_eq!(json["http"]["response"]["body"]["bytes"], 3);
        assert_eq!(json["url"]["path"], "/users/7");
        assert_eq!(json["url"]["domain"], "api.example");
        assert_eq!(json["user_agent"]["original"], "curl/8");
        assert_eq!(json["apimon"]["route"], "/users/{id}");
        let query = json["url"]["query"].as_str().unwrap();
        assert!(
            query.starts_with("token=hmac:") && query.ends_with("&x=1"),
            "{query}"
        );
        assert!(!json.to_string().contains("s3cret"));
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn unanswered_exchanges_have_no_response() {
        let secrets = Fingerprinter::with_key([1; 32]);
        let event = Event::http_exchange(&exchange("/a", None), SystemTime::now(), &secrets);
        assert_eq!(event.event.outcome.as_deref(), Some("unknown"));
        assert!(event.http.unwrap().response.is_none());
        assert!(event.url.unwrap().query.is_none());
    }

    #[tokio::test]
    async fn subscribers_get_events_history_is_bounded_and_overflow_is_reported() {
        let bus = Bus::default();
        assert!(!bus.wants_http());
        let mut sub = bus.subscribe(true);
        assert!(bus.wants_http());
        bus.publish(Event::new("event", "network", "block_added"));
        assert_eq!(sub.next().await.unwrap().event.action, "block_added");
        for _ in 0..SUBSCRIBER_QUEUE + 10 {
            bus.publish_http(Event::new("event", "web", "http_request"));
        }
        let first = sub.next().await.unwrap();
        assert_eq!(first.event.action, "events_lost");
        assert_eq!(first.apimon["lost"], 10);
        for _ in 0..HISTORY + 5 {
            bus.publish(Event::new("event", "network", "block_removed"));
        }
        assert_eq!(bus.history().len(), HISTORY);
    }
}
