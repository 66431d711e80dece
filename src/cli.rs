//! The command line: argument parsing, dispatch, and the mapping of failures to exit codes
//! (0 success, 1 invalid input or configuration, 2 runtime failure).

use crate::commands;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "keywatch",
    version,
    about = "Tells operators of BYOK deployments what a key event did to them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Process Activity Tracker events from JSON Lines files (`-` = stdin) offline and print the report.
    Replay {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
        /// Evaluate deadlines at this time (RFC 3339); default: the latest eventTime read.
        #[arg(long)]
        now: Option<String>,
        /// Write into the configured store instead of an in-memory one (backfill).
        #[arg(long)]
        store: bool,
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// The service: consume, correlate, persist, alert, serve HTTP.
    Run {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the state persisted in the configured store as the report of `replay`.
    Status {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
        /// Evaluate deadlines and approval windows at this time, without writing; default: now.
        #[arg(long)]
        now: Option<String>,
    },
    /// Produce JSON Lines records (`-` = stdin) to the configured topic, one record per line (demos, re-feeding archives).
    Publish {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
        /// Topic to produce to; default: `[kafka] topic`.
        #[arg(long)]
        topic: Option<String>,
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Validate the configuration and the registry, and print a summary.
    CheckConfig {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// For one event: is it relevant, which deployments it touches, which transitions and alerts it causes.
    Explain {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
        file: PathBuf,
    },
    /// Which deployments a key protects, with their state. KEY is a key CRN or key id.
    BlastRadius {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
        key: String,
    },
    /// Send a clearly marked test notification through each channel of the route(s) and report per channel.
    TestAlert {
        #[arg(long, env = "KEYWATCH_CONFIG")]
        config: Option<PathBuf>,
        /// Only this route (default: every route).
        #[arg(long)]
        route: Option<String>,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

/// clap's error as one line (spec section 1): its first paragraph and its tip, if any, without
/// the usage and the pointer to `--help` that follow.
fn usage_error_line(text: &str) -> String {
    let mut paragraphs = text
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty());
    let first = paragraphs.next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(&first);
    let mut line = format!("keywatch: {first}");
    if let Some(tip) = paragraphs.find(|p| p.starts_with("tip:")) {
        line.push_str(&format!(" ({tip})"));
    }
    line.push_str("; see `keywatch --help`");
    line
}

/// Parses the arguments and runs the command; returns the process exit code.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    return 0;
                }
                // `keywatch` alone: invalid input, named in one line with the commands there are.
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    use clap::CommandFactory;
                    let names: Vec<String> = Cli::command()
                        .get_subcommands()
                        .map(|c| c.get_name().to_owned())
                        .filter(|n| n != "help")
                        .collect();
                    eprintln!(
                        "keywatch: a command is required ({}); see `keywatch --help`",
                        names.join(", ")
                    );
                    return 1;
                }
                _ => {}
            }
            eprintln!("{}", usage_error_line(&e.render().to_string()));
            return 1;
        }
    };
    let result = match cli.command {
        Command::Replay {
            config,
            now,
            store,
            files,
        } => commands::replay_command(config.as_deref(), now.as_deref(), store, &files),
        Command::Run { config } => commands::run(config.as_deref()),
        Command::Status { config, now } => commands::status(config.as_deref(), now.as_deref()),
        Command::Publish {
            config,
            topic,
            files,
        } => commands::publish(config.as_deref(), topic.as_deref(), &files),
        Command::CheckConfig { config } => commands::check_config(config.as_deref()),
        Command::Explain { config, file } => commands::explain(config.as_deref(), &file),
        Command::BlastRadius { config, key } => commands::blast_radius(config.as_deref(), &key),
        Command::TestAlert { config, route } => {
            commands::test_alert(config.as_deref(), route.as_deref())
        }
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("{}", f.message.replace('\n', " "));
            f.code
        }
    }
}
