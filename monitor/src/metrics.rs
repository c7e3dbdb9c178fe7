//! Prometheus metrics (contract names, OpenTelemetry HTTP label names) and the
//! `/metrics` listener. Label values come from small known sets: methods are
//! normalised, routes are templates, addresses are never labels.

use std::net::SocketAddr;

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use thiserror::Error;
use tracing::{info, warn};

use monitor_common::datapath::{Action, ActionCounter};

use crate::{capture::Direction, http::Exchange};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("registering metrics: {0}")]
    Register(#[from] prometheus::Error),
    #[error("metrics listener on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Request duration buckets (seconds): OpenTelemetry's defaults for HTTP servers.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// OpenTelemetry's rule: known methods as they are, anything else `_OTHER`.
pub fn method_label(method: &str) -> &'static str {
    crate::http::parse::STANDARD_METHODS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("_OTHER")
}

/// The series of one (method, route, status): handles kept by the pipeline so each
/// exchange skips the label lookups.
#[derive(Clone)]
pub struct ExchangeSeries {
    requests: IntCounter,
    duration: prometheus::Histogram,
}

impl ExchangeSeries {
    pub fn observe(&self, exchange: &Exchange) {
        self.requests.inc();
        if let Some(latency) = exchange.latency {
            self.duration.observe(latency.as_secs_f64());
        }
    }
}

/// What the kernel counted, read at scrape time.
pub struct KernelTotals {
    /// Interface name and its counters per action (indexed by `Action`).
    pub interfaces: Vec<(String, [ActionCounter; Action::COUNT])>,
    /// (family, origin) and the entries they hold.
    pub blocklist: Vec<((&'static str, String), u64)>,
    pub samples_lost: u64,
}

pub struct Metrics {
    registry: Registry,
    /// One scrape refreshes and renders at a time (kernel values are set, not added).
    scrape: std::sync::Mutex<()>,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    blocklist_entries: IntGaugeVec,
    policy_decisions: IntCounterVec,
    samples_request: IntCounter,
    samples_response: IntCounter,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    samples_lost: IntCounter,
    parse_errors: IntCounterVec,
    active_flows: IntGauge,
    detections: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let labels = [
            "http_request_method",
            "http_route",
            "http_response_status_code",
        ];
        let http_requests = IntCounterVec::new(
            Opts::new(
                "apimon_http_requests_total",
                "HTTP requests observed, by method, route template and status",
            ),
            &labels,
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_server_request_duration_seconds",
                "Time from a request's first byte to its response's first byte, as seen on the wire",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &labels,
        )?;
        let samples = IntCounterVec::new(
            Opts::new(
                "apimon_samples_total",
                "Payload samples received from the kernel",
            ),
            &["direction"],
        )?;
        let samples_lost = IntCounter::new(
            "apimon_samples_lost_total",
            "Payload samples the kernel dropped because their ring buffer was full",
        )?;
        let parse_errors = IntCounterVec::new(
            Opts::new(
                "apimon_parse_errors_total",
                "Traffic on monitored ports that could not be parsed, by kind",
            ),
            &["kind"],
        )?;
        let policy_decisions = IntCounterVec::new(
            Opts::new(
                "apimon_policy_decisions_total",
                "Policy rules that fired, by rule id and action (would_* in dry run)",
            ),
            &["rule", "action"],
        )?;
        let packets = IntCounterVec::new(
            Opts::new(
                "apimon_packets_total",
                "Packets the ingress datapath handled, by interface and action",
            ),
            &["iface", "action"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "apimon_bytes_total",
                "Bytes the ingress datapath handled, by interface and action",
            ),
            &["iface", "action"],
        )?;
        let blocklist_entries = IntGaugeVec::new(
            Opts::new(
                "apimon_blocklist_entries",
                "Blocklist entries by address family and origin (cli, state, policy:<rule>)",
            ),
            &["family", "origin"],
        )?;
        let detections = IntCounterVec::new(
            Opts::new(
                "apimon_detections_total",
                "Attack detections by OWASP API Top 10 category and rule",
            ),
            &["category", "rule"],
        )?;
        let active_flows =
            IntGauge::new("apimon_http_active_flows", "Connections being reassembled")?;
        let build_info =
            IntGaugeVec::new(Opts::new("apimon_build_info", "apimon build"), &["version"])?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(samples.clone()),
            Box::new(samples_lost.clone()),
            Box::new(parse_errors.clone()),
            Box::new(active_flows.clone()),
            Box::new(policy_decisions.clone()),
            Box::new(packets.clone()),
            Box::new(bytes.clone()),
            Box::new(blocklist_entries.clone()),
            Box::new(detections.clone()),
            Box::new(build_info),
        ] {
            registry.register(collector)?;
        }
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            detections,
            scrape: std::sync::Mutex::new(()),
            packets,
            bytes,
            blocklist_entries,
            policy_decisions,
            samples_request: samples.with_label_values(&[Direction::Request.name()]),
            samples_response: samples.with_label_values(&[Direction::Response.name()]),
            registry,
            http_requests,
            http_duration,
            samples_lost,
            parse_errors,
            active_flows,
        })
    }

    pub fn sample(&self, direction: Direction) {
        match direction {
            Direction::Request => self.samples_request.inc(),
            Direction::Response => self.samples_response.inc(),
        }
    }

    /// Renders after setting what the kernel counted (`None`: kernel values unread).
    pub fn scrape(&self, kernel: Option<&KernelTotals>) -> String {
        let _one_at_a_time = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(kernel) = kernel {
            for (iface, counters) in &kernel.interfaces {
                for action in Action::ALL {
                    let counter = counters[action as usize];
                    let labels = [iface.as_str(), action.name()];
                    set_counter(&self.packets.with_label_values(&labels), counter.packets);
                    set_counter(&self.bytes.with_label_values(&labels), counter.bytes);
                }
            }
            self.blocklist_entries.reset();
            for ((family, origin), count) in &kernel.blocklist {
                self.blocklist_entries
                    .with_label_values(&[family, origin.as_str()])
                    .set(i64::try_from(*count).unwrap_or(i64::MAX));
            }
            self.set_samples_lost(kernel.samples_lost);
        }
        self.render()
    }

    /// Kernel-side loss is a kernel counter; bring ours up to it.
    pub fn set_samples_lost(&self, total: u64) {
        let current = self.samples_lost.get();
        if total > current {
            self.samples_lost.inc_by(total - current);
        }
    }

    pub fn set_active_flows(&self, flows: usize) {
        self.active_flows
            .set(i64::try_from(flows).unwrap_or(i64::MAX));
    }

    /// The counter of a rule's verdicts with `action` (the decision's label).
    pub fn decision_counter(&self, rule: &str, action: &str) -> IntCounter {
        self.policy_decisions.with_label_values(&[rule, action])
    }

    /// The counter of a detection rule's findings.
    pub fn detection_counter(&self, category: &str, rule: &str) -> IntCounter {
        self.detections.with_label_values(&[category, rule])
    }

    /// Counts traffic that could not be parsed, by kind (exchanges count through
    /// `exchange_series`, whose handles the pipeline keeps).
    pub fn parse_problem(&self, kind: &str) {
        self.parse_errors.with_label_values(&[kind]).inc();
    }

    /// The series an exchange of this method, route and status counts in.
    pub fn exchange_series(
        &self,
        method: &str,
        route: &str,
        status: Option<u16>,
    ) -> ExchangeSeries {
        let status = status.map_or_else(String::new, |s| s.to_string());
        let labels = [method_label(method), route, status.as_str()];
        ExchangeSeries {
            requests: self.http_requests.with_label_values(&labels),
            duration: self.http_duration.with_label_values(&labels),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(%error, "Encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A counter set to a kernel total (a counter the kernel reset, with its pins, goes
/// back down: Prometheus reads that as a counter reset).
fn set_counter(counter: &prometheus::IntCounter, total: u64) {
    let current = counter.get();
    if total >= current {
        counter.inc_by(total - current);
    } else {
        counter.reset();
        counter.inc_by(total);
    }
}

/// Reads the kernel's values for a scrape.
pub type KernelReader = std::sync::Arc<dyn Fn() -> Option<KernelTotals> + Send + Sync>;

/// Serves `/metrics` until the task is dropped; kernel values are read at each scrape.
pub async fn serve(
    addr: SocketAddr,
    metrics: std::sync::Arc<Metrics>,
    kernel: KernelReader,
) -> Result<(), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })?;
    info!(%addr, "Serving metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            let kernel = kernel.clone();
            async move {
                // Map reads are syscalls: off the async workers.
                let text = tokio::task::spawn_blocking(move || metrics.scrape(kernel().as_ref()))
                    .await
                    .unwrap_or_default();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::http::parse::request_head;

    #[test]
    fn methods_are_a_closed_set() {
        assert_eq!(method_label("get"), "GET");
        assert_eq!(method_label("PATCH"), "PATCH");
        assert_eq!(method_label("BREW"), "_OTHER");
    }

    #[test]
    fn exchanges_are_counted_by_template() {
        let metrics = Metrics::new().unwrap();
        let routes = crate::http::route::Routes::default();
        let exchange = |target: &str, status| Exchange {
            client: "10.0.0.2:1".parse().unwrap(),
            server: "10.0.0.1:80".parse().unwrap(),
            request: request_head(&format!("GET {target} HTTP/1.1\r\n\r\n")),
            route: routes.template(target).into(),
            started_ns: 0,
            request_body_bytes: 0,
            request_body_complete: true,
            request_body: Vec::new(),
            status,
            response_body_bytes: 0,
            latency: Some(Duration::from_millis(3)),
        };
        for (target, status) in [
            ("/users/1", Some(200)),
            ("/users/2?x=y", Some(200)),
            ("/users/3", None),
        ] {
            let exchange = exchange(target, status);
            metrics
                .exchange_series("GET", &exchange.route, status)
                .observe(&exchange);
        }
        metrics.sample(Direction::Request);
        metrics.set_samples_lost(5);
        metrics.set_samples_lost(3);
        let text = metrics.render();
        assert!(text.contains(
            r#"apimon_http_requests_total{http_request_method="GET",http_response_status_code="200",http_route="/users/{id}"} 2"#
        ), "{text}");
        assert!(
            text.contains(r#"http_response_status_code="",http_route="/users/{id}"} 1"#),
            "{text}"
        );
        assert!(text.contains("apimon_samples_lost_total 5"), "{text}");
        assert!(
            text.contains(r#"apimon_samples_total{direction="request"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("http_server_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains(r#"apimon_build_info{version=""#), "{text}");
        assert!(!text.contains("10.0.0.2"), "addresses are never labels");
    }
}
