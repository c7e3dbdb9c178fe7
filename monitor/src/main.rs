//! The `apimon` binary: `run` is the daemon, every other subcommand a client.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use monitor::{
    cli::{self, Cli, Command, Failure},
    daemon,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let result = match cli.command {
        Command::Run(args) => run_daemon(&cli.paths, args),
        // Offline: a broken config must not stop anyone from checking a policy.
        Command::Policy(cli::PolicyCommand::Check { file }) => cli::check_policy(&file),
        Command::Audit(cli::AuditCommand::Verify { files }) => cli::verify_audit(&files),
        command @ (Command::Completions { .. } | Command::Man) => {
            cli::run_client(command, &monitor::config::Config::default())
        }
        command => cli::resolve_config(&cli.paths, true)
            .and_then(|config| cli::run_client(command, &config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // One line per problem (a policy can have several), each prefixed.
            for line in failure.message().lines() {
                eprintln!("apimon: {line}");
            }
            failure.exit_code()
        }
    }
}

/// Help and version go to stdout with exit 0; a usage error is one line and exit 2.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("apimon: a subcommand is required; see `apimon --help`");
            ExitCode::from(2)
        }
        _ => {
            let rendered = error.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("apimon: {first}");
            ExitCode::from(2)
        }
    }
}

fn run_daemon(paths: &cli::PathArgs, args: cli::RunArgs) -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut config = cli::resolve_config(paths, false)?;
    if !args.ifaces.is_empty() {
        config.daemon.interfaces = args.ifaces;
    }
    if let Some(mode) = args.xdp_mode {
        config.daemon.xdp_mode = mode;
    }
    if let Some(hook) = args.ingress_hook {
        config.daemon.ingress_hook = hook;
    }
    // One thread until the programs are attached and capabilities dropped (they are
    // per thread); blocking work gets threads of its own later, which inherit the drop.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(format!("starting the runtime: {e}")))?;
    runtime
        .block_on(daemon::run(config, args.dry_run))
        .map_err(|e| {
            if e.is_bad_input() {
                Failure::Usage(e.to_string())
            } else {
                Failure::Failed(e.to_string())
            }
        })
}
