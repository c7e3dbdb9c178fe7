//! `apimon run`: wires loader, enforcer and control socket together, then waits for
//! signals. Kernel state outlives the process on purpose (pinned maps and links).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::{Instant, SystemTime},
};

use aya::Ebpf;
use monitor_common::datapath::Action;
use serde_json::Value;
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    audit::{AuditError, AuditLog, AuditOptions},
    capture::{self, CaptureMaps, Segment},
    cidr,
    clock::{self, Clocks},
    config::{Config, IngressHook, MetricsAddr, SchedulingPolicy},
    control::{
        self, ControlError, InterfaceView, ListEntryView, PolicyView, Request, SampleCounts,
        StatsView, StatusView, TopKey, TopRow,
    },
    enforce::{self, EnforceError, Enforcer, EntryWithHits, state::StateFile},
    events::{Bus, Event},
    http::{self, Limits, Pipeline, route::Routes},
    loader::{self, Attachment, LoadOptions, LoaderError, TcHook},
    maps::{Datapath, ListKind, MapsError, Traffic},
    metrics::{self, ExchangeSeries, Metrics},
    policy::{Policy, file::PolicyError},
    privilege::{self, PrivilegeError},
    secrets::{Fingerprinter, SecretsError},
    verdict::{self, ActivePolicy, Verdicts},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error(transparent)]
    Control(#[from] control::ServerError),
    #[error("no interface given and no default route found; pass --iface IF")]
    NoInterface,
    #[error("{0}")]
    PinDirBusy(String),
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error("cannot create state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
}

/// What the control handler needs; shared with the sweeper.
struct Shared {
    enforcer: Arc<Mutex<Enforcer>>,
    policy: ActivePolicy,
    /// The config file the policy is re-read from on reload.
    config_path: PathBuf,
    traffic: Traffic,
    capture: CaptureMaps,
    started: Instant,
    /// `run --dry-run`: every policy, also reloaded ones, only records.
    force_dry_run: bool,
    /// Name, XDP mode and the ifindex attached to.
    interfaces: Vec<(String, &'static str, u32)>,
    events: Bus,
}

impl Shared {
    fn enforcer(&self) -> MutexGuard<'_, Enforcer> {
        // A panic while holding the lock cannot leave the lists half-written (commit
        // rolls back), so a poisoned lock is still usable.
        self.enforcer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub async fn run(config: Config, dry_run: bool) -> Result<(), DaemonError> {
    let daemon = &config.daemon;
    let interfaces = if daemon.interfaces.is_empty() {
        vec![default_route_interface().ok_or(DaemonError::NoInterface)?]
    } else {
        daemon.interfaces.clone()
    };
    for iface in &interfaces {
        if loader::if_index(iface).is_none() {
            return Err(DaemonError::UnknownInterface(iface.clone()));
        }
    }
    if dry_run {
        info!("Dry run: policy verdicts are only recorded; operator blocklist entries still apply");
    }
    std::fs::create_dir_all(&daemon.state_dir).map_err(|source| DaemonError::StateDir {
        path: daemon.state_dir.clone(),
        source,
    })?;
    // Claim the socket and the pin directory before touching any kernel state, so a
    // second daemon changes nothing that belongs to the first.
    let mut policy = Policy::from_config(&config.policy, &config.path, None)?;
    policy.doc.dry_run |= dry_run;
    info!(source = %policy.source, rules = policy.rule_count(), dry_run = policy.doc.dry_run, "Policy loaded");
    // Configured templates first, then the OpenAPI description's (read at start only).
    let mut route_templates = config.capture.routes.clone();
    route_templates.extend(policy.detections.route_templates());
    let policy: ActivePolicy = Arc::new(RwLock::new(Arc::new(policy)));
    let listener = control::bind(&daemon.socket)?;
    let secrets = Fingerprinter::open(&daemon.state_dir)?;
    let _socket_file = RemoveOnDrop(daemon.socket.clone());
    loader::prepare_pin_dir(&daemon.bpffs_dir)?;
    let _pin_lock = loader::lock_pin_dir(&daemon.bpffs_dir)?;

    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: Some(&daemon.bpffs_dir),
        capacities: &config.datapath,
        ring_bytes: config.capture.ring_bytes,
    })?;
    start_kernel_log(&mut ebpf);
    let mut datapath = Datapath::new(&mut ebpf)?;
    datapath.set_capture_enabled(!config.capture.ports.is_empty())?;
    datapath.set_rate_limits(config.datapath.rate_config())?;
    let traffic = Traffic::new(&mut ebpf)?;
    let mut capture_maps = CaptureMaps::new(&mut ebpf)?;
    capture_maps.configure(&config.capture)?;
    let rings = capture::SampleRings::take(&mut ebpf)?;
    // Lists go into the maps before anything is attached: no window for blocked traffic.
    let enforcer = Enforcer::open(datapath, StateFile::new(&daemon.state_dir))?;

    let mut attachments: Vec<Attachment> = Vec::new();
    for iface in &interfaces {
        let attached = match daemon.ingress_hook {
            IngressHook::Xdp => {
                loader::attach(&mut ebpf, iface, daemon.xdp_mode, &daemon.bpffs_dir)
            }
            IngressHook::Tc => {
                loader::attach_tc(&mut ebpf, iface, TcHook::Ingress, &daemon.bpffs_dir)
            }
        };
        match attached {
            Ok(attachment) => {
                loader::unpin_other_ingress(&daemon.bpffs_dir, iface, attachment.mode);
                attachments.push(attachment);
            }
            Err(e) => {
                // Links adopted from a crashed daemon keep enforcing; ours go.
                for attachment in attachments {
                    release_or_detach(attachment);
                }
                return Err(e.into());
            }
        }
    }
    let xdp_interfaces = attachments
        .iter()
        .map(|a| (a.iface.clone(), a.mode.name(), a.ifindex))
        .collect();
    if !config.capture.ports.is_empty() {
        // Responses are observed on egress; without it requests are still seen.
        for iface in &interfaces {
            match loader::attach_tc(&mut ebpf, iface, TcHook::Egress, &daemon.bpffs_dir) {
                Ok(attachment) => attachments.push(attachment),
                Err(e) => warn!(iface, error = %e, "No response capture on this interface"),
            }
        }
    }
    // Loaded and attached: from here on the daemon runs with what it still needs. The
    // audit writer and every other thread start afterwards, so they inherit the drop
    // and the scheduling policy (set first: leaving some policies takes privilege).
    set_scheduling_policy(daemon.scheduling_policy);
    privilege::keep_only_runtime_capabilities()?;
    let (audit, audit_writer) = AuditLog::open(AuditOptions {
        path: daemon.audit_log.clone(),
        max_file_bytes: config.audit.max_file_bytes,
        keep_files: config.audit.keep_files,
        stdout: config.audit.stdout,
    })?;
    let events = Bus::with_audit(audit);
    let metrics = Arc::new(Metrics::new()?);
    let shared = Arc::new(Shared {
        enforcer: Arc::new(Mutex::new(enforcer)),
        policy: policy.clone(),
        config_path: config.path.clone(),
        traffic,
        capture: capture_maps,
        started: Instant::now(),
        force_dry_run: dry_run,
        interfaces: xdp_interfaces,
        events: events.clone(),
    });
    let mut sink = PipelineSink {
        pipeline: Pipeline::new(
            Limits {
                max_flows: config.capture.max_flows,
                max_memory: config.capture.max_flow_memory,
                idle_timeout: config.capture.flow_idle_timeout,
                body_inspect_bytes: config.capture.max_bytes_per_request as usize,
            },
            Routes::new(&route_templates),
        ),
        observers: Observers {
            metrics: metrics.clone(),
            events: events.clone(),
            verdicts: Verdicts::new(
                policy.clone(),
                shared.enforcer.clone(),
                metrics.clone(),
                events.clone(),
                secrets.clone(),
            ),
            secrets,
            series: foldhash::HashMap::default(),
        },
        batch_clocks: None,
        latest_ns: 0,
    };
    let poll_interval = config.capture.poll_interval;
    let capture_task =
        tokio::spawn(async move { capture::read_samples(rings, poll_interval, &mut sink).await });
    let metrics_task = match daemon.metrics_addr {
        MetricsAddr::Off => None,
        MetricsAddr::Listen(addr) => {
            let scrape_state = shared.clone();
            let kernel: metrics::KernelReader = Arc::new(move || kernel_totals(&scrape_state));
            Some(tokio::spawn(async move {
                if let Err(e) = metrics::serve(addr, metrics.clone(), kernel).await {
                    error!(error = %e, "Metrics listener failed");
                }
            }))
        }
    };

    let handler_state = shared.clone();
    let control_task = tokio::spawn(control::serve(
        listener,
        Arc::new(move |request| handle(&handler_state, request)),
        events.clone(),
    ));
    let sweeper_task = tokio::spawn(sweep_loop(shared.clone(), daemon.sweep_interval));
    info!(
        interfaces = %interfaces.join(","),
        socket = %daemon.socket.display(),
        pins = %daemon.bpffs_dir.display(),
        scheduling_policy = ?daemon.scheduling_policy,
        version = VERSION,
        "Daemon started"
    );
    events.publish(
        Event::new("event", "process", "daemon_started")
            .with_field("version", VERSION)
            .with_field("interfaces", interfaces.clone()),
    );

    let result = wait_for_shutdown(&shared).await;
    control_task.abort();
    sweeper_task.abort();
    capture_task.abort();
    if let Err(error) = shared.enforcer().flush() {
        error!(%error, "Writing the lists' state file failed; policy blocks made since the last write are lost on restart");
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    for attachment in attachments {
        let iface = attachment.iface.clone();
        match attachment.detach() {
            Ok(()) => info!(iface, "Detached XDP"),
            Err(e) => error!(iface, error = %e, "Detaching XDP failed"),
        }
    }
    info!("Daemon stopped");
    events.publish(Event::new("event", "process", "daemon_stopped"));
    // Everything recorded is on disk before the process ends.
    if let Err(error) = events.sync_audit() {
        error!(%error, "Audit records may be missing");
    }
    drop(events);
    drop(audit_writer);
    result
}

/// The kernel's counters for a scrape; None (and a warning) when a map cannot be read.
fn kernel_totals(shared: &Shared) -> Option<metrics::KernelTotals> {
    let read = || -> Result<metrics::KernelTotals, MapsError> {
        let mut interfaces = Vec::new();
        for (name, _, ifindex) in &shared.interfaces {
            interfaces.push((name.clone(), shared.traffic.iface_counters(*ifindex)?));
        }
        let blocklist = shared.enforcer().census(ListKind::Block);
        Ok(metrics::KernelTotals {
            interfaces,
            blocklist: blocklist.into_iter().collect(),
            samples_lost: shared.capture.totals()?.lost,
        })
    };
    read()
        .map_err(|error| warn!(%error, "Reading kernel counters for a scrape failed"))
        .ok()
}

/// Who learns about observed exchanges.
struct Observers {
    metrics: Arc<Metrics>,
    events: Bus,
    verdicts: Verdicts,
    secrets: Fingerprinter,
    /// Metric handles by (method, status, route): no label lookups per exchange.
    series: foldhash::HashMap<(&'static str, Option<u16>, Arc<str>), ExchangeSeries>,
}

/// Cached series at most (label sets are bounded; this bounds the cache regardless).
const MAX_CACHED_SERIES: usize = 4096;

impl Observers {
    fn observe(&mut self, event: http::Event<'_>, clocks: &Clocks) {
        let exchange = match event {
            http::Event::Request(request) => return self.verdicts.judge(&request, clocks),
            http::Event::ParseError(problem) => {
                self.verdicts.inspect_problem(&problem);
                return self.metrics.parse_problem(problem.kind.name());
            }
            http::Event::OtherProtocol(protocol) => {
                return self.metrics.parse_problem(protocol.metric_label());
            }
            http::Event::Exchange(exchange) => exchange,
        };
        self.verdicts.inspect(exchange, clocks);
        self.series_for(exchange).observe(exchange);
        if self.events.wants_http() {
            let at = clocks.to_wall(exchange.started_ns);
            self.events
                .publish_http(Event::http_exchange(exchange, at, &self.secrets));
        }
    }

    fn series_for(&mut self, exchange: &http::Exchange) -> &ExchangeSeries {
        let method = metrics::method_label(exchange.request.method());
        if self.series.len() >= MAX_CACHED_SERIES {
            self.series.clear();
        }
        let metrics = &self.metrics;
        self.series
            .entry((method, exchange.status, exchange.route.clone()))
            .or_insert_with(|| metrics.exchange_series(method, &exchange.route, exchange.status))
    }
}

/// Feeds captured segments through reassembly and parsing to the observers.
struct PipelineSink {
    pipeline: Pipeline,
    observers: Observers,
    /// Read at the batch's first segment (converts its kernel timestamps to wall time).
    batch_clocks: Option<Clocks>,
    /// Newest kernel timestamp of the current batch.
    latest_ns: u64,
}

impl capture::SampleSink for PipelineSink {
    fn segment(&mut self, segment: &Segment<'_>) {
        self.observers.metrics.sample(segment.direction);
        self.latest_ns = self.latest_ns.max(segment.timestamp_ns);
        let clocks = self.batch_clocks();
        let observers = &mut self.observers;
        self.pipeline
            .ingest(segment, &mut |event: http::Event<'_>| {
                observers.observe(event, &clocks)
            });
    }

    fn batch_done(&mut self) {
        self.end_batch(self.latest_ns);
    }

    fn idle(&mut self) {
        // Idle connections end even when no traffic arrives to notice them.
        self.end_batch(clock::monotonic_ns());
    }
}

impl PipelineSink {
    /// The current batch's clocks; its first segment reads them and the policy.
    fn batch_clocks(&mut self) -> Clocks {
        *self.batch_clocks.get_or_insert_with(|| {
            self.observers.verdicts.refresh();
            Clocks::now()
        })
    }

    /// Ends connections idle at `now_ns` (or over the memory bound).
    fn end_batch(&mut self, now_ns: u64) {
        let clocks = self.batch_clocks();
        let observers = &mut self.observers;
        self.pipeline
            .enforce_limits(now_ns, &mut |event: http::Event<'_>| {
                observers.observe(event, &clocks)
            });
        self.observers
            .metrics
            .set_active_flows(self.pipeline.active_flows());
        self.batch_clocks = None;
    }
}

/// On a failed start: a link adopted from an earlier daemon stays pinned (and keeps
/// enforcing); a link this start created is detached.
fn release_or_detach(attachment: Attachment) {
    let iface = attachment.iface.clone();
    if attachment.adopted {
        attachment.release();
        return;
    }
    if let Err(e) = attachment.detach() {
        error!(iface, error = %e, "Detaching XDP failed");
    }
}

/// Sets the calling thread's scheduling policy (see `SchedulingPolicy`). The daemon's
/// runtime runs on this thread, and the threads it starts later inherit the policy.
/// Either policy works, so a failure is only worth a warning.
fn set_scheduling_policy(policy: SchedulingPolicy) {
    if let Err(error) = policy.apply_to_this_thread() {
        warn!(%error, ?policy, "Setting the scheduling policy failed; keeping the inherited one");
    }
}

/// Removes a file when dropped (the control socket, on every way out of `run`).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.0.display(), error = %e, "Removing the control socket failed");
        }
    }
}

async fn wait_for_shutdown(shared: &Arc<Shared>) -> Result<(), DaemonError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!(signal = "SIGTERM", "Shutting down"); return Ok(()); }
            _ = interrupt.recv() => { info!(signal = "SIGINT", "Shutting down"); return Ok(()); }
            _ = hangup.recv() => {
                info!(signal = "SIGHUP", "Reloading the policy");
                let shared = shared.clone();
                // Errors are logged and published by the reload itself.
                let _ = tokio::task::spawn_blocking(move || reload_policy(&shared)).await;
            }
        }
    }
}

/// Re-reads the config's policy and swaps it in whole; a policy with errors is refused
/// and the running one stays. Limiters of unchanged rules keep their state.
fn reload_policy(shared: &Shared) -> Result<Value, ControlError> {
    let loaded = Config::load(&shared.config_path, true)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            let old = verdict::current(&shared.policy);
            Policy::from_config(&config.policy, &shared.config_path, Some(&old))
                .map_err(|e| e.to_string())
        });
    match loaded {
        Ok(mut policy) => {
            policy.doc.dry_run |= shared.force_dry_run;
            let view = policy_view(&policy);
            info!(source = %policy.source, rules = policy.rule_count(), "Policy reloaded");
            *shared
                .policy
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
            shared.events.publish(
                Event::new("event", "configuration", "policy_reloaded")
                    .with_field("source", view.source.clone())
                    .with_field("rules", view.rules),
            );
            recorded(shared)?;
            to_value(&view)
        }
        Err(message) => {
            warn!(error = %message, "Policy reload refused; the running policy stays");
            shared.events.publish(
                Event::new("event", "configuration", "policy_reloaded")
                    .with_message(message.clone())
                    .with_field("refused", true),
            );
            Err(ControlError::bad_request(format!(
                "policy refused, the running one stays:\n{message}"
            )))
        }
    }
}

/// Waits until what the caller is about to be told is in the audit log on disk.
fn recorded(shared: &Shared) -> Result<(), ControlError> {
    shared.events.sync_audit().map_err(|e| {
        ControlError::failed(format!(
            "applied, but the audit log could not record it: {e}"
        ))
    })
}

fn policy_view(policy: &Policy) -> PolicyView {
    PolicyView {
        source: policy.source.to_string(),
        rules: policy.rule_count() as u64,
        loaded_at: clock::rfc3339(policy.loaded_at),
        dry_run: policy.doc.dry_run,
    }
}

/// Forwards aya-log records from the kernel into our tracing output.
fn start_kernel_log(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "Kernel log forwarding unavailable");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "Kernel log forwarding unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "Kernel log forwarding stopped");
                    return;
                }
            }
        }
    });
}

async fn sweep_loop(shared: Arc<Shared>, interval: std::time::Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let upkeep = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let mut enforcer = upkeep.enforcer();
            let expired = enforcer.sweep(SystemTime::now())?;
            enforcer.settle()?;
            enforcer.flush()?;
            Ok::<_, EnforceError>(expired)
        })
        .await;
        match swept {
            Ok(Ok(expired)) => {
                for (kind, entry) in expired {
                    let action = format!("{}_expired", kind.noun());
                    info!(event.action = %action, cidr = %entry.cidr, origin = %entry.origin, "Entry expired");
                    shared.events.publish(Event::list_change(&action, &entry));
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "Datapath upkeep failed (expired blocks stay ignored by the kernel)")
            }
            Err(e) => warn!(error = %e, "Sweeper task failed"),
        }
    }
}

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_interface() -> Option<String> {
    let v4 = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|table| {
            table.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
                    .then(|| fields[0].to_owned())
            })
        });
    v4.or_else(|| {
        std::fs::read_to_string("/proc/net/ipv6_route")
            .ok()
            .and_then(|table| {
                table.lines().find_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.len() == 10
                        && fields[0] == "0".repeat(32)
                        && fields[1] == "00"
                        && fields[9] != "lo")
                        .then(|| fields[9].to_owned())
                })
            })
    })
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, ControlError> {
    serde_json::to_value(value).map_err(|e| ControlError::failed(e.to_string()))
}

fn parse_cidrs(cidrs: &[String]) -> Result<Vec<ipnet::IpNet>, ControlError> {
    if cidrs.is_empty() {
        return Err(ControlError::bad_request("no CIDR given"));
    }
    cidrs
        .iter()
        .map(|text| cidr::parse(text).map_err(|e| ControlError::bad_request(e.to_string())))
        .collect()
}

fn enforce_error(error: EnforceError) -> ControlError {
    ControlError::failed(error.to_string())
}

fn entry_view(entry: &enforce::Entry, hits: u64) -> ListEntryView {
    ListEntryView {
        cidr: entry.cidr.to_string(),
        reason: entry.reason.clone(),
        origin: entry.origin.clone(),
        created_at: clock::rfc3339(entry.created_at),
        expires_at: entry.expires_at.map(clock::rfc3339),
        hits,
    }
}

fn handle(shared: &Shared, request: Request) -> Result<Value, ControlError> {
    match request {
        Request::Status => to_value(&StatusView {
            version: VERSION.into(),
            uptime_s: shared.started.elapsed().as_secs(),
            interfaces: shared
                .interfaces
                .iter()
                .map(|(name, mode, ifindex)| InterfaceView {
                    name: name.clone(),
                    mode: (*mode).into(),
                    // A link dies with its interface; a namesake created since is not ours.
                    attached: loader::if_index(name) == Some(*ifindex),
                })
                .collect(),
            policy: policy_view(&verdict::current(&shared.policy)),
        }),
        Request::BlockAdd {
            cidrs,
            ttl_ms,
            reason,
        } => {
            let ttl = ttl_ms
                .map(|ms| clock::check_ttl(std::time::Duration::from_millis(ms)))
                .transpose()
                .map_err(|why| ControlError::bad_request(format!("ttl {why}")))?;
            add(shared, ListKind::Block, &cidrs, ttl, reason)
        }
        Request::AllowAdd { cidrs, reason } => add(shared, ListKind::Allow, &cidrs, None, reason),
        Request::BlockRm { cidrs } => remove(shared, ListKind::Block, &cidrs),
        Request::AllowRm { cidrs } => remove(shared, ListKind::Allow, &cidrs),
        Request::BlockLs => list(shared, ListKind::Block),
        Request::AllowLs => list(shared, ListKind::Allow),
        Request::Stats => stats(shared),
        Request::Top { by, limit } => top(shared, by, limit),
        Request::PolicyReload => reload_policy(shared),
        Request::PolicyShow => Ok(Value::from(verdict::current(&shared.policy).to_toml())),
        // Streams are served by the control socket itself.
        Request::Events { .. } => Err(ControlError::failed("events are served by the socket")),
    }
}

fn add(
    shared: &Shared,
    kind: ListKind,
    cidrs: &[String],
    ttl: Option<std::time::Duration>,
    reason: Option<String>,
) -> Result<Value, ControlError> {
    let nets = parse_cidrs(cidrs)?;
    let reason = reason.unwrap_or_default();
    let added = shared
        .enforcer()
        .add(kind, &nets, ttl, &reason, enforce::ORIGIN_CLI)
        .map_err(enforce_error)?;
    let action = format!("{}_added", kind.noun());
    for entry in &added {
        let expires_at = entry
            .expires_at
            .map_or_else(|| "never".to_owned(), clock::rfc3339);
        info!(event.action = %action, cidr = %entry.cidr, reason = %entry.reason, %expires_at, "List entry added");
        shared.events.publish(Event::list_change(&action, entry));
    }
    recorded(shared)?;
    to_value(&added.iter().map(|e| entry_view(e, 0)).collect::<Vec<_>>())
}

fn remove(shared: &Shared, kind: ListKind, cidrs: &[String]) -> Result<Value, ControlError> {
    let nets = parse_cidrs(cidrs)?;
    let removed = shared
        .enforcer()
        .remove(kind, &nets)
        .map_err(enforce_error)?;
    let action = format!("{}_removed", kind.noun());
    for entry in &removed {
        info!(event.action = %action, cidr = %entry.cidr, "List entry removed");
        shared.events.publish(Event::list_change(&action, entry));
    }
    recorded(shared)?;
    to_value(&removed.iter().map(|e| entry_view(e, 0)).collect::<Vec<_>>())
}

fn list(shared: &Shared, kind: ListKind) -> Result<Value, ControlError> {
    let entries = shared.enforcer().entries(kind).map_err(enforce_error)?;
    to_value(
        &entries
            .iter()
            .map(|EntryWithHits { entry, hits }| entry_view(entry, *hits))
            .collect::<Vec<_>>(),
    )
}

fn stats(shared: &Shared) -> Result<Value, ControlError> {
    let counters = shared
        .traffic
        .counters()
        .map_err(|e| ControlError::failed(e.to_string()))?;
    let mut packets = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    for action in Action::ALL {
        let counter = counters[action as usize];
        packets.insert(action.name().to_owned(), counter.packets);
        bytes.insert(action.name().to_owned(), counter.bytes);
    }
    let samples = shared
        .capture
        .totals()
        .map_err(|e| ControlError::failed(e.to_string()))?;
    to_value(&StatsView {
        packets,
        bytes,
        samples: SampleCounts {
            captured: samples.captured,
            lost: samples.lost,
        },
        blocklist_entries: shared.enforcer().len(ListKind::Block) as u64,
    })
}

fn top(shared: &Shared, by: TopKey, limit: usize) -> Result<Value, ControlError> {
    let mut sources = shared
        .traffic
        .sources()
        .map_err(|e| ControlError::failed(e.to_string()))?;
    let key = |stats: &monitor_common::datapath::IpStats| match by {
        TopKey::Packets => stats.packets,
        TopKey::Bytes => stats.bytes,
        TopKey::Drops => stats.drops,
    };
    sources.sort_by(|(a_ip, a), (b_ip, b)| key(b).cmp(&key(a)).then_with(|| a_ip.cmp(b_ip)));
    sources.truncate(limit);
    let clocks = Clocks::now();
    let rows: Vec<TopRow> = sources
        .into_iter()
        .map(|(ip, stats): (IpAddr, _)| TopRow {
            ip: ip.to_string(),
            packets: stats.packets,
            bytes: stats.bytes,
            drops: stats.drops,
            last_seen: clock::rfc3339(clocks.to_wall(stats.last_seen_ns)),
        })
        .collect();
    to_value(&rows)
}

impl DaemonError {
    /// Errors in what the operator asked for (exit 2) rather than failures (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DaemonError::NoInterface | DaemonError::UnknownInterface(_) | DaemonError::Policy(_)
        )
    }
}
