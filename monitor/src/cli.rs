//! Command-line interface: clap definitions, and the client commands that talk to the
//! daemon over the control socket. Exit codes follow the operator contract.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::{
    cidr, clock,
    config::{self, Config, IngressHook, MetricsAddr, XdpModeSetting},
    control::{
        Client, ClientError, ErrorKind, ListEntryView, PolicyView, Request, StatsView, StatusView,
        TopKey, TopRow,
    },
    events::Event,
};

const EXAMPLES: &str = "\
Examples:
  apimon run --iface eth0                 run the daemon on eth0
  apimon block add 203.0.113.7 --ttl 15m --reason 'credential stuffing'
  apimon block add 2001:db8:bad::/48      block an IPv6 prefix until removed
  apimon block ls --json
  apimon top --by drops --limit 10
  apimon events --follow --http --json    every observed API call, live
  apimon status";

#[derive(Debug, Parser)]
#[command(name = "apimon", version, about = "eBPF API traffic monitor and enforcer", after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub paths: PathArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Paths and addresses; a flag beats the config file, which beats the default.
#[derive(Debug, Args)]
pub struct PathArgs {
    /// Config file [default: /etc/apimon/apimon.toml]
    #[arg(long, global = true, env = "APIMON_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Control socket [default: /run/apimon/apimon.sock]
    #[arg(long, global = true, env = "APIMON_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State dir (persisted lists) [default: /var/lib/apimon]
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory for pinned maps and links on bpffs [default: /sys/fs/bpf/apimon]
    #[arg(long, global = true, value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// Audit log [default: /var/log/apimon/audit.jsonl]
    #[arg(long, global = true, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Metrics listener, HOST:PORT or `off` [default: 127.0.0.1:9750]
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_addr: Option<MetricsAddr>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (SIGINT/SIGTERM stop it, SIGHUP reloads).
    Run(RunArgs),
    /// Show whether the daemon runs and every interface is attached (exit 0 only then).
    Status(JsonFlag),
    /// Manage the blocklist.
    #[command(subcommand)]
    Block(BlockCommand),
    /// Manage the allowlist (allowlisted sources are never dropped).
    #[command(subcommand)]
    Allow(AllowCommand),
    /// Packet and byte counters per datapath action.
    Stats(JsonFlag),
    /// Top talkers by source address.
    Top(TopArgs),
    /// Recent events from the running daemon; --follow keeps streaming them.
    #[command(
        after_help = "Examples:\n  apimon events                      the last 1000 notable events\n  apimon events --follow --json      list changes and verdicts as they happen\n  apimon events --http               also every observed API call"
    )]
    Events(EventsArgs),
    /// Check, reload or show the policy.
    #[command(
        subcommand,
        after_help = "Examples:\n  apimon policy check /etc/apimon/apimon.toml   validate before reloading\n  apimon policy reload                          swap it in (same as SIGHUP)\n  apimon policy show --json"
    )]
    Policy(PolicyCommand),
    /// Work with audit logs (offline).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a shell completion script (offline).
    #[command(after_help = "Example:\n  apimon completions bash > /etc/bash_completion.d/apimon")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, generated from these definitions, as roff (offline).
    #[command(after_help = "Example:\n  apimon man > /usr/local/share/man/man1/apimon.1")]
    Man,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files, given oldest first (audit.jsonl.2
    /// audit.jsonl.1 audit.jsonl): exit 0 when intact, 1 naming the first record that
    /// was altered, deleted, inserted or reordered.
    Verify {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (or a config file with a [policy] table) offline; each
    /// problem is reported as FILE:LINE:COLUMN: reason.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Re-read the policy from the daemon's config (as SIGHUP does); a policy with
    /// errors is refused and the running one stays.
    Reload,
    /// Print the active policy as TOML.
    Show(JsonFlag),
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep streaming new events until interrupted
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object (Elastic Common Schema) per line
    #[arg(long)]
    pub json: bool,
    /// Also stream one event per observed HTTP request (implies --follow)
    #[arg(long)]
    pub http: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface to attach to (repeatable) [default: the default route's]
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
    /// XDP mode: auto tries native, then falls back to skb
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpModeSetting>,
    /// Run the ingress datapath at XDP (default) or at TC ingress
    #[arg(long, value_enum, value_name = "HOOK")]
    pub ingress_hook: Option<IngressHook>,
    /// Only record what policy actions would do
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BlockCommand {
    /// Block CIDRs (a bare address is a /32 or /128).
    Add {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        /// Remove the block after this long (90s, 15m, 4h, 7d) [default: permanent]
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Why, for the audit trail
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Unblock CIDRs (exactly as listed).
    Rm {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
    },
    /// List blocked CIDRs.
    Ls(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum AllowCommand {
    /// Always pass these CIDRs.
    Add {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Remove CIDRs from the allowlist.
    Rm {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
    },
    /// List allowlisted CIDRs.
    Ls(JsonFlag),
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[arg(long, value_enum, default_value = "packets")]
    pub by: TopKey,
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    clock::parse_duration(text).map_err(|e| format!("{e} (omit --ttl for a permanent entry)"))
}

/// A client command's failure, with the contract's exit code.
#[derive(Debug)]
pub enum Failure {
    /// Exit 1: the operation failed.
    Failed(String),
    /// Exit 2: bad usage or bad input.
    Usage(String),
    /// Exit 3: the daemon is not reachable.
    Unreachable(String),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
        })
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Failed(m) | Failure::Usage(m) | Failure::Unreachable(m) => m,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        match &error {
            ClientError::Unreachable { path, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Failure::Failed(format!(
                    "permission denied on {}: the control socket is for root",
                    path.display()
                ))
            }
            ClientError::Unreachable { .. } => Failure::Unreachable(error.to_string()),
            ClientError::Remote(remote) => match remote.kind {
                ErrorKind::BadRequest => Failure::Usage(remote.message.clone()),
                ErrorKind::Failed | ErrorKind::Forbidden => Failure::Failed(remote.message.clone()),
            },
            ClientError::Protocol(_) => Failure::Failed(error.to_string()),
        }
    }
}

/// The effective config: file (or defaults), then flags on top.
///
/// Clients read only the `[daemon]` paths: a typo in a policy must not keep an
/// operator from `status` or `policy reload` (which reports it).
pub fn resolve_config(paths: &PathArgs, for_client: bool) -> Result<Config, Failure> {
    let (path, named) = match &paths.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    let loaded = if for_client {
        Config::load_daemon_section(&path, named)
    } else {
        Config::load(&path, named)
    };
    let mut config = loaded.map_err(|e| Failure::Usage(e.to_string()))?;
    let daemon = &mut config.daemon;
    if let Some(socket) = &paths.socket {
        daemon.socket = socket.clone();
    }
    if let Some(dir) = &paths.state_dir {
        daemon.state_dir = dir.clone();
    }
    if let Some(dir) = &paths.bpffs_dir {
        daemon.bpffs_dir = dir.clone();
    }
    if let Some(file) = &paths.audit_log {
        daemon.audit_log = file.clone();
    }
    if let Some(addr) = paths.metrics_addr {
        daemon.metrics_addr = addr;
    }
    Ok(config)
}

/// Validates CIDRs before bothering the daemon: bad input is exit 2.
fn checked_cidrs(cidrs: Vec<String>) -> Result<Vec<String>, Failure> {
    cidrs
        .iter()
        .map(|text| {
            cidr::parse(text)
                .map(|net| net.to_string())
                .map_err(|e| Failure::Usage(e.to_string()))
        })
        .collect()
}

fn print_json<T: Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Failed(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Runs a client command (everything but `run`).
pub fn run_client(command: Command, config: &Config) -> Result<(), Failure> {
    // Validate input first: a typo is exit 2 whether or not the daemon runs.
    let request = match command {
        Command::Run(_) => return Err(Failure::Usage("`run` is not a client command".into())),
        Command::Status(flag) => return status(config, flag.json),
        Command::Block(BlockCommand::Add { cidrs, ttl, reason }) => Request::BlockAdd {
            cidrs: checked_cidrs(cidrs)?,
            ttl_ms: ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            reason,
        },
        Command::Block(BlockCommand::Rm { cidrs }) => Request::BlockRm {
            cidrs: checked_cidrs(cidrs)?,
        },
        Command::Allow(AllowCommand::Add { cidrs, reason }) => Request::AllowAdd {
            cidrs: checked_cidrs(cidrs)?,
            reason,
        },
        Command::Allow(AllowCommand::Rm { cidrs }) => Request::AllowRm {
            cidrs: checked_cidrs(cidrs)?,
        },
        Command::Block(BlockCommand::Ls(flag)) => return list(config, Request::BlockLs, flag.json),
        Command::Allow(AllowCommand::Ls(flag)) => return list(config, Request::AllowLs, flag.json),
        Command::Stats(flag) => return stats(config, flag.json),
        Command::Top(args) => return top(config, args),
        Command::Events(args) => return events(config, args),
        Command::Policy(PolicyCommand::Check { file }) => return check_policy(&file),
        Command::Audit(AuditCommand::Verify { files }) => return verify_audit(&files),
        Command::Policy(PolicyCommand::Reload) => {
            let view: PolicyView = connect(config)?.call_as(Request::PolicyReload)?;
            println!(
                "policy reloaded from {}: {} rules{}",
                view.source,
                view.rules,
                if view.dry_run { " (dry run)" } else { "" }
            );
            return Ok(());
        }
        Command::Policy(PolicyCommand::Show(flag)) => {
            let text: String = connect(config)?.call_as(Request::PolicyShow)?;
            if flag.json {
                let value: toml::Value = toml::from_str(&text)
                    .map_err(|e| Failure::Failed(format!("the daemon's policy: {e}")))?;
                return print_json(&value);
            }
            print!("{text}");
            return Ok(());
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "apimon", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            use clap::CommandFactory as _;
            return clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Failure::Failed(format!("writing the man page: {e}")));
        }
    };
    let changed: Vec<ListEntryView> = connect(config)?.call_as(request)?;
    for entry in &changed {
        let until = entry
            .expires_at
            .as_deref()
            .map_or_else(String::new, |t| format!(" until {t}"));
        println!("{}{until}", entry.cidr);
    }
    Ok(())
}

fn connect(config: &Config) -> Result<Client, Failure> {
    Ok(Client::connect(&config.daemon.socket)?)
}

fn status(config: &Config, json: bool) -> Result<(), Failure> {
    let status: StatusView = connect(config)?.call_as(Request::Status)?;
    if json {
        print_json(&status)?;
    } else {
        println!("apimon {} up {}s", status.version, status.uptime_s);
        for iface in &status.interfaces {
            let state = if iface.attached {
                "attached"
            } else {
                "NOT attached"
            };
            println!("  {}: {state} ({})", iface.name, iface.mode);
        }
        println!(
            "policy: {} ({} rules, loaded {})",
            status.policy.source, status.policy.rules, status.policy.loaded_at
        );
    }
    if status.interfaces.iter().all(|iface| iface.attached) {
        Ok(())
    } else {
        Err(Failure::Failed("not every interface is attached".into()))
    }
}

fn list(config: &Config, request: Request, json: bool) -> Result<(), Failure> {
    let entries: Vec<ListEntryView> = connect(config)?.call_as(request)?;
    if json {
        return print_json(&entries);
    }
    println!(
        "{:<43} {:<21} {:>12} {:<16} REASON",
        "CIDR", "EXPIRES (UTC)", "HITS (pkts)", "ORIGIN"
    );
    for e in &entries {
        println!(
            "{:<43} {:<21} {:>12} {:<16} {}",
            e.cidr,
            e.expires_at.as_deref().unwrap_or("never"),
            e.hits,
            e.origin,
            e.reason
        );
    }
    Ok(())
}

fn stats(config: &Config, json: bool) -> Result<(), Failure> {
    let stats: StatsView = connect(config)?.call_as(Request::Stats)?;
    if json {
        return print_json(&stats);
    }
    println!("{:<16} {:>16} {:>18}", "ACTION", "PACKETS", "BYTES");
    for (action, packets) in &stats.packets {
        let bytes = stats.bytes.get(action).copied().unwrap_or(0);
        println!("{action:<16} {packets:>16} {bytes:>18}");
    }
    println!("blocklist entries: {}", stats.blocklist_entries);
    println!(
        "samples: {} captured, {} lost",
        stats.samples.captured, stats.samples.lost
    );
    Ok(())
}

fn top(config: &Config, args: TopArgs) -> Result<(), Failure> {
    let rows: Vec<TopRow> = connect(config)?.call_as(Request::Top {
        by: args.by,
        limit: args.limit,
    })?;
    if args.json {
        return print_json(&rows);
    }
    println!(
        "{:<40} {:>12} {:>14} {:>12} LAST SEEN (UTC)",
        "SOURCE", "PACKETS", "BYTES", "DROPS (pkts)"
    );
    for r in &rows {
        println!(
            "{:<40} {:>12} {:>14} {:>12} {}",
            r.ip, r.packets, r.bytes, r.drops, r.last_seen
        );
    }
    Ok(())
}

fn events(config: &Config, args: EventsArgs) -> Result<(), Failure> {
    let follow = args.follow || args.http;
    let mut client = connect(config)?;
    let history: Vec<Event> = client.call_as(Request::Events {
        follow,
        http: args.http,
    })?;
    let print = |event: &Event| -> Result<(), Failure> {
        let line = if args.json {
            serde_json::to_string(event).map_err(|e| Failure::Failed(e.to_string()))?
        } else {
            event_line(event)
        };
        println!("{line}");
        Ok(())
    };
    for event in &history {
        print(event)?;
    }
    if !follow {
        return Ok(());
    }
    let mut client = client.without_timeout()?;
    while let Some(event) = client.next_event()? {
        print(&event)?;
    }
    Err(Failure::Unreachable(
        "the daemon closed the event stream".into(),
    ))
}

/// One human-readable line: time, action, then what the event is about.
pub fn event_line(event: &Event) -> String {
    let mut line = format!("{} {:<14}", event.timestamp, event.event.action);
    if let (Some(source), Some(destination)) = (&event.source, &event.destination) {
        let port = |p: Option<u16>| p.map_or_else(String::new, |p| format!(":{p}"));
        line.push_str(&format!(
            " {}{} -> {}{}",
            source.ip,
            port(source.port),
            destination.ip,
            port(destination.port)
        ));
    }
    if let (Some(http), Some(url)) = (&event.http, &event.url) {
        line.push_str(&format!(" {} ", http.request.method));
        if let Some(domain) = &url.domain {
            line.push_str(domain);
        }
        line.push_str(&url.path);
        if let Some(query) = &url.query {
            line.push('?');
            line.push_str(query);
        }
        match &http.response {
            Some(response) => line.push_str(&format!(" {}", response.status_code)),
            None => line.push_str(" (no response)"),
        }
        if let Some(ns) = event.event.duration {
            line.push_str(&format!(" {:.3}ms", ns as f64 / 1e6));
        }
    }
    if let Some(rule) = &event.rule {
        line.push_str(&format!(" rule={}", rule.id));
        if let Some(category) = &rule.category {
            line.push_str(&format!(" category={category}"));
        }
    }
    for (name, value) in &event.apimon {
        match value {
            serde_json::Value::String(text) => line.push_str(&format!(" {name}={text}")),
            serde_json::Value::Null => {}
            other => line.push_str(&format!(" {name}={other}")),
        }
    }
    if let Some(message) = &event.message {
        line.push_str(&format!(" \"{message}\""));
    }
    line
}

/// `policy check FILE`: a policy file, or a config file whose `[policy]` it checks
/// (following `file = ...`). Exit 0 when valid, 2 with every problem otherwise.
pub fn check_policy(path: &std::path::Path) -> Result<(), Failure> {
    use crate::policy::{Policy, file::PolicyDoc};
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let is_config = toml::from_str::<toml::Table>(&text).is_ok_and(|table| {
        ["daemon", "datapath", "capture", "policy"]
            .iter()
            .any(|key| table.contains_key(*key))
    });
    let policy = if is_config {
        let config = Config::parse(&text, path).map_err(|e| Failure::Usage(e.to_string()))?;
        Policy::from_config(&config.policy, path, None)
    } else {
        PolicyDoc::read(path)
            .and_then(|doc| Policy::new(doc, crate::policy::Source::File(path.to_owned()), None))
    }
    .map_err(|e| Failure::Usage(e.to_string()))?;
    println!(
        "{}: OK, {} rules (policy from {})",
        path.display(),
        policy.rule_count(),
        policy.source
    );
    Ok(())
}

/// `audit verify FILE...`.
pub fn verify_audit(files: &[PathBuf]) -> Result<(), Failure> {
    use crate::audit::{self, Verdict};
    match audit::verify(files).map_err(|e| Failure::Usage(e.to_string()))? {
        Verdict::Intact {
            records,
            first,
            last,
        } => {
            println!("OK: {records} records, sequence {first} to {last}, chain intact");
            Ok(())
        }
        Verdict::Tampered { place, what } => Err(Failure::Failed(format!("{place}: {what}"))),
    }
}
