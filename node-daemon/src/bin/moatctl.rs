//! moatctl: the node-level troubleshooting CLI. See `moatctl --help`.
use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use moatd::api::{self, Request, Response};

#[derive(Parser, Debug)]
#[command(version, about = "Moat node troubleshooting CLI")]
struct Args {
    #[arg(long, default_value = api::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Is moatd ready; what does it hold; what did it reject.
    Status,
    /// The node's endpoints with identity, mode and labels.
    Endpoints,
    /// Identities, rules and map entry counts.
    Policy,
    /// Re-read the policy directory now; prints the status once applied.
    Reload,
}

fn main() {
    let args = Args::parse();
    let request = match args.command {
        Command::Status => Request::Status,
        Command::Endpoints => Request::ListEndpoints,
        Command::Policy => Request::Policy,
        Command::Reload => Request::Reload,
    };
    match api::call(&args.socket, &request, Duration::from_secs(10)) {
        Ok(response) => {
            let value = match response {
                Response::Status(s) => serde_json::to_value(s),
                Response::Endpoints { endpoints } => serde_json::to_value(endpoints),
                Response::Policy { document } => Ok(document),
                other => serde_json::to_value(other),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&value.unwrap_or_default()).unwrap_or_default()
            );
        }
        Err(e) => {
            eprintln!("moatctl: {e}");
            std::process::exit(1);
        }
    }
}
